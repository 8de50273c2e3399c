"""What every benchmark suite shares: result records, JSON files, Markdown tables and staged
training recipes."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import jax

import diffecon

ConfigT = TypeVar("ConfigT")


@dataclasses.dataclass(frozen=True)
class Stage(Generic[ConfigT]):
    """One stage of a training recipe: ``steps`` of ``config``.

    A later stage continues from the previous stage's final state (parameters and multipliers);
    its optimizer and schedules start afresh, and ``reset_multipliers`` restarts the multipliers
    at the stage config's initial values.
    """

    config: ConfigT
    steps: int
    reset_multipliers: bool = False


def train_stages(
    stages: Sequence[Stage[Any]], train_stage: Callable[..., tuple[Any, Any]]
) -> tuple[Any, list[dict[str, Any]], float]:
    """Train ``stages`` in order; returns ``(model, history, train_wall_s)``.

    ``train_stage(k, stage, init_state=..., reset_multipliers=..., fingerprint=...)`` trains stage
    ``k`` (from 1) and returns ``(model, TrainResult)``; stage ``k > 1`` starts from the previous
    result's state and its resumable run is fingerprinted with its place in the recipe. The
    history counts steps from the first stage's start (each row with its ``stage``); the wall time
    sums the stages' own (including parts done before a resume).
    """
    if not stages:
        raise ValueError("a recipe needs at least one stage")
    state, model, history, wall = None, None, [], 0.0
    for k, stage in enumerate(stages, start=1):
        model, result = train_stage(
            k,
            stage,
            init_state=state,
            reset_multipliers=stage.reset_multipliers,
            fingerprint={"stage": k, "stage1_steps": stages[0].steps} if k > 1 else None,
        )
        state = result.state
        offset = history[-1]["step"] if history else 0
        history += [{**row, "step": row["step"] + offset, "stage": k} for row in result.history]
        wall += result.history[-1]["wall_s"] if result.history else result.wall_s
    return model, history, wall


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
