"""``python -m benchmarks readme``: regenerate the README's results tables from committed JSON.

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` markers; the text
between them is replaced by the table built from ``benchmarks/results/NAME/NAME.json`` (by the
suite module's ``readme_table(records)`` where it has one, a condensed view). A test
checks that the committed README equals what this command would write.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

from benchmarks.common import RESULTS_DIR, TABLE_METRICS, markdown_table, read_json

README = Path(__file__).resolve().parent.parent / "README.md"


@dataclasses.dataclass(frozen=True)
class ReadmeConfig:
    """Options of the README generator.

    Attributes:
      readme: the file to update.
      results: folder holding ``NAME/NAME.json``.
      check: only check that the README is up to date (exit 1 if not).
    """

    readme: str = str(README)
    results: str = str(RESULTS_DIR)
    check: bool = False


def render(text: str, results: Path) -> str:
    """``text`` with every marked table regenerated from its JSON."""

    def table(match: re.Match) -> str:
        name = match.group(1)
        path = results / name / f"{name}.json"
        if name not in TABLE_METRICS or not path.is_file():
            raise ValueError(f"README table {name!r} has no results file {path}")
        records = read_json(path)
        # a suite may condense its table for the README (its full table is NAME.md)
        custom = getattr(importlib.import_module(f"benchmarks.{name}"), "readme_table", None)
        body = custom(records) if custom else markdown_table(records, metrics=TABLE_METRICS[name])
        commands = sorted({r["command"] for r in records})
        devices = sorted({r["device"] for r in records})
        note = f"\n_Generated from `benchmarks/results/{name}/{name}.json`; produced by "
        if len(commands) > 3:  # one command per setting: name one, count the rest
            shown = f"`{commands[0]}` and {len(commands) - 1} more like it (each record's "
            shown += "`command` field holds its own)"
        else:
            shown = "; ".join(f"`{c}`" for c in commands)
        note += shown + " on " + "; ".join(devices) + "._\n"
        return f"<!-- results:{name} -->\n{body}{note}<!-- /results:{name} -->"

    return re.sub(r"<!-- results:(\w+) -->.*?<!-- /results:\1 -->", table, text, flags=re.S)


def run(config: ReadmeConfig) -> bool:
    path = Path(config.readme)
    old = path.read_text()
    new = render(old, Path(config.results))
    if config.check:
        if new != old:
            print(f"{path} is out of date with {config.results}; run `python -m benchmarks readme`")
            return False
        print(f"{path} is up to date")
        return True
    path.write_text(new)
    print(f"updated {path}")
    return True
