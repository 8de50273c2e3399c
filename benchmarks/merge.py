"""``python -m benchmarks merge``: combine result files of partial runs into one.

Long reference runs are split into parts that run side by side (for example RegretNet's regret
search on 10,000 profiles apart from the baselines); each record keeps the command that produced
it. Records of the same (suite, setting, mechanism, metric) in a later input replace earlier ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from benchmarks.common import TABLE_METRICS, markdown_table, read_json, write_json


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Options of the merge.

    Attributes:
      inputs: result JSON files, in order of precedence (later wins).
      out: the merged JSON file; a Markdown table is written beside it.
    """

    inputs: tuple[str, ...]
    out: str


def run(config: MergeConfig) -> bool:
    merged: dict[tuple, dict] = {}
    for path in config.inputs:
        for r in read_json(Path(path)):
            merged[(r["suite"], r["setting"], r["mechanism"], r["metric"])] = r
    # keep each setting's rows together, settings in order of first appearance
    order = {setting: i for i, setting in reversed(list(enumerate(k[1] for k in merged)))}
    records = sorted(merged.values(), key=lambda r: order[r["setting"]])
    out = Path(config.out)
    write_json(records, out)
    suite = records[0]["suite"] if records else "revenue"
    table = markdown_table(records, metrics=TABLE_METRICS.get(suite, ("revenue",)))
    out.with_suffix(".md").write_text(table)
    print(f"merged {len(records)} records from {len(config.inputs)} files into {out}")
    return True
