"""``python -m benchmarks <suite> [options]``; ``<suite> --help`` lists a suite's options."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

import tyro

# suite name -> (module, config class); a suite's module is imported only when it runs.
SUITES: dict[str, tuple[str, str]] = {
    "revenue": ("benchmarks.revenue", "RevenueConfig"),
    "speed": ("benchmarks.speed", "SpeedConfig"),
    "readme": ("benchmarks.readme", "ReadmeConfig"),
    "merge": ("benchmarks.merge", "MergeConfig"),
    "gemnet": ("benchmarks.gemnet", "GemNetBenchConfig"),
    "genrec": ("benchmarks.genrec", "GenRecBenchConfig"),
    "llm_auction": ("benchmarks.llm_auction", "LLMAuctionBenchConfig"),
    "datamarket": ("benchmarks.datamarket", "DataMarketBenchConfig"),
}


def _load(suite: str) -> tuple[type, Callable[[Any], Any]]:
    module = importlib.import_module(SUITES[suite][0])
    return getattr(module, SUITES[suite][1]), module.run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUITES:
        names = ", ".join(SUITES)
        print(f"usage: python -m benchmarks <suite> [options]   (suites: {names})", file=sys.stderr)
        return 2
    config_type, run = _load(argv[0])
    config = tyro.cli(config_type, args=argv[1:], prog=f"python -m benchmarks {argv[0]}")
    result = run(config)
    return 1 if result is False else 0


if __name__ == "__main__":
    sys.exit(main())
