"""What every benchmark suite shares: result records, JSON files and Markdown tables."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

import diffecon

RESULTS_DIR = Path(__file__).parent / "results"
CHECKPOINTS_DIR = RESULTS_DIR / "checkpoints"

# Which metrics each suite's Markdown table shows (the suite's own table and the README's).
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    "genrec": (
        "ndcg10",
        "recall10",
        "ndcg10_organic",
        "ndcg10_ad",
        "ad_rate",
        "revenue_first_price",
        "revenue_myerson",
        "advertiser_welfare",
        "high_value_share",
        "ndcg10_difference",
        "ndcg10_ratio",
        "users_per_s",
        "compile_s",
    ),
    # one row per measured quantity; the setting and mechanism columns say what it is
    "llm_auction": ("value", "reference", "z_score"),
    "datamarket": (
        "revenue",
        "revenue_vs_optimal",
        "regret",
        "obedience_violation",
        "ir_violation",
        "envelope_excess",
        "train_wall_s",
    ),
    "gemnet": (
        "revenue",
        "exact_revenue",
        "over_allocation_rate",
        "adversarial_over_allocation",
        "regret_max",
        "certified",
        "train_wall_s",
        "repair_wall_s",
    ),
    "revenue": (
        "revenue",
        "regret_mean",
        "regret_max",
        "regret_share_above_1e-3",
        "ir_violation",
        "train_wall_s",
    ),
    "speed": (
        "iters_per_s",
        "compile_s",
        "speedup_vs_per_op_dispatch",
        "wall_s_to_target",
        "steps_to_target",
        "train_wall_s",
        "repair_wall_s",
        "train_plus_repair_s",
        "n_boxes",
        "milps",
    ),
}

RECORD_KEYS = (
    "suite",
    "setting",
    "mechanism",
    "metric",
    "value",
    "stderr",
    "n_samples",
    "seed",
    "wall_s",
    "device",
    "version",
    "command",
)


def device_description() -> str:
    """E.g. ``cpu x2 (x86_64, 2 cores)`` or ``gpu x1 (NVIDIA H100)``."""
    devs = jax.devices()
    kind = devs[0].device_kind
    return f"{devs[0].platform} x{len(devs)} ({kind}, {platform.machine()}, {os.cpu_count()} cores)"


def command_line() -> str:
    """The command that produced a result, as a user would type it."""
    args = sys.argv[1:]
    return "python -m benchmarks " + " ".join(shlex.quote(a) for a in args)


def make_record(
    *,
    suite: str,
    setting: str,
    mechanism: str,
    metric: str,
    value: float,
    stderr: float = 0.0,
    n_samples: int = 0,
    seed: int,
    wall_s: float,
    **extra: Any,
) -> dict[str, Any]:
    """One measured number with everything needed to reproduce and judge it."""
    return {
        "suite": suite,
        "setting": setting,
        "mechanism": mechanism,
        "metric": metric,
        "value": float(value),
        "stderr": float(stderr),
        "n_samples": int(n_samples),
        "seed": int(seed),
        "wall_s": round(float(wall_s), 3),
        "device": device_description(),
        "version": f"diffecon {diffecon.__version__}, jax {jax.__version__}",
        "command": command_line(),
        # other work sharing the machine slows timings; the load says how much there was
        "load_avg_1m": round(os.getloadavg()[0], 2),
        **extra,
    }


def write_json(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Write records atomically (a crash never leaves a half-written results file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(list(records), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def fmt(value: float, stderr: float) -> str:
    """``0.8791 ± 0.0003``; small numbers in scientific notation."""
    body = f"{value:.2e}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"
    return f"{body} ± {stderr:.1g}" if stderr else body


def markdown_table(
    records: Iterable[Mapping[str, Any]],
    *,
    metrics: Sequence[str],
    row_keys: Sequence[str] = ("setting", "mechanism"),
) -> str:
    """Pivot records into a Markdown table: one row per ``row_keys``, one column per metric."""
    rows: dict[tuple, dict[str, str]] = {}
    for r in records:
        if r["metric"] not in metrics:
            continue
        rows.setdefault(tuple(r[k] for k in row_keys), {})[r["metric"]] = fmt(
            r["value"], r["stderr"]
        )
    head = "| " + " | ".join([*row_keys, *metrics]) + " |"
    sep = "|" + "---|" * (len(row_keys) + len(metrics))
    body = [
        "| " + " | ".join([*map(str, k), *(cells.get(m, "") for m in metrics)]) + " |"
        for k, cells in rows.items()
    ]
    return "\n".join([head, sep, *body]) + "\n"
