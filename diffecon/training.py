"""The one training loop: jitted steps over sharded batches, orbax checkpoints, JSONL metrics, tqdm.

A package supplies two pure functions:

* ``sample_batch(key, state) -> batch``: a pytree whose leaves have a leading batch axis (it may
  read the state, e.g. to index a fixed training set);
* ``step_fn(state, batch, key) -> (state, metrics)``: one optimisation step; ``metrics`` is a dict
  of scalars.

``train`` owns everything else. The PRNG key of step ``t`` is ``fold_in(key(seed), t)``, so a run
stopped after a checkpoint and resumed reproduces the uninterrupted run bit for bit. Batches are
split over the ``data`` axis of a :func:`diffecon.sharding.data_mesh`; the state is replicated, so
gradients averaged over the global batch are all-reduced by XLA.

Checkpoints are orbax ``StandardCheckpointer`` trees written into a temporary folder and renamed
into place only once complete, with a ``meta.json`` that records the step, a fingerprint of the run
and the tree signature; a failed save never replaces the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from diffecon.sharding import batch_sharding, data_mesh, replicated

__all__ = [
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
    "train",
]

State = Any
Batch = Any
StepFn = Callable[[State, Batch, jax.Array], tuple[State, Mapping[str, jax.Array]]]
SampleFn = Callable[[jax.Array, State], Batch]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long and how to train; everything about the model lives in the step function.

    Attributes:
      steps: total number of optimisation steps.
      seed: the run's seed; step ``t`` uses ``fold_in(key(seed), t)``.
      steps_per_call: steps fused into one jitted ``lax.scan`` call (fewer dispatches).
      log_every: write a JSONL metrics line every this many steps (multiple of steps_per_call).
      checkpoint_every: save every this many steps (0: only at the end; multiple of
        steps_per_call).
      checkpoint_dir: where checkpoints go (``None``: no checkpoints, no resume).
      max_to_keep: checkpoints kept on disk.
      metrics_path: JSONL file (default ``checkpoint_dir/metrics.jsonl`` if a directory is given).
      progress: show a tqdm bar.
      n_devices: devices of the data mesh (default: all local devices).
      run_name: recorded in checkpoints; resuming with another name is refused.
    """

    steps: int
    seed: int = 0
    steps_per_call: int = 10
    log_every: int = 100
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    max_to_keep: int = 2
    metrics_path: str | None = None
    progress: bool = True
    n_devices: int | None = None
    run_name: str = "run"

    def __post_init__(self):
        if self.steps < 0 or self.steps_per_call < 1:
            raise ValueError(f"need steps >= 0 and steps_per_call >= 1, got {self}")
        for name in ("log_every", "checkpoint_every"):
            every = getattr(self, name)
            if every < 0 or (every and every % self.steps_per_call):
                raise ValueError(
                    f"{name}={every} must be a non-negative multiple of "
                    f"steps_per_call={self.steps_per_call}"
                )


@dataclasses.dataclass
class TrainResult:
    """What ``train`` returns: the final state, the logged metrics and the wall time."""

    state: State
    history: list[dict[str, Any]]
    wall_s: float
    start_step: int
    steps: int


# --------------------------------------------------------------------------------------------------
# Checkpoints


def _signature(tree) -> list[list]:
    """Paths, shapes and dtypes of a pytree's leaves: what a checkpoint must match to restore."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        [jax.tree_util.keystr(path), list(np.shape(x)), str(jnp.asarray(x).dtype)]
        for path, x in leaves
    ]


def _as_flat_dict(tree) -> dict[str, Any]:
    """Leaves keyed by position: checkpoints stay independent of the pytree classes used."""
    return {f"{i:06d}": x for i, x in enumerate(jax.tree.leaves(tree))}


def _step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step:09d}"


def latest_checkpoint(directory: str | os.PathLike) -> int | None:
    """The newest complete checkpoint's step in ``directory`` (``None`` if there is none)."""
    d = Path(directory)
    if not d.is_dir():
        return None
    steps = [
        int(p.name[5:])
        for p in d.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (p / "meta.json").is_file()
    ]
    return max(steps) if steps else None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    state: State,
    *,
    meta: Mapping[str, Any] | None = None,
    max_to_keep: int | None = None,
) -> Path:
    """Atomically save ``state`` as checkpoint ``step`` of ``directory``.

    The tree is written into a temporary folder and renamed into place only when complete, so a
    failure at any point leaves every earlier checkpoint as it was.
    """
    d = Path(directory).resolve()
    d.mkdir(parents=True, exist_ok=True)
    final = _step_dir(d, step)
    tmp = d / f".tmp_step_{step:09d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ckptr = ocp.StandardCheckpointer()
    try:
        tmp.mkdir()
        ckptr.save(tmp / "state", jax.device_get(_as_flat_dict(state)))
        ckptr.wait_until_finished()
        record = {"step": int(step), "signature": _signature(state), **dict(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(record))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        # orbax writes in a background thread: let it stop before the folder is removed.
        with contextlib.suppress(Exception):
            ckptr.wait_until_finished()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckptr.close()
    if max_to_keep:
        kept = sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in kept[:-max_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore_checkpoint(
    directory: str | os.PathLike,
    like: State,
    *,
    step: int | None = None,
    expect_meta: Mapping[str, Any] | None = None,
) -> tuple[State, dict[str, Any]]:
    """Restore checkpoint ``step`` (default: the latest) into the structure of ``like``.

    Args:
      directory: the checkpoint directory.
      like: a state with the expected structure, shapes and dtypes (e.g. a freshly built one).
      step: which checkpoint (default: the latest complete one).
      expect_meta: entries that ``meta.json`` must hold with equal values (e.g. the seed).

    Returns:
      ``(state, meta)``.

    Raises:
      ValueError: no checkpoint, unreadable or corrupt files, or a checkpoint that does not match
        ``like`` or ``expect_meta`` (the message names the first difference).
    """
    d = Path(directory).resolve()
    if step is None:
        step = latest_checkpoint(d)
        if step is None:
            raise ValueError(f"no complete checkpoint in {str(d)!r}")
    path = _step_dir(d, step)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt: cannot read meta.json ({err})"
        ) from err
    want, have = _signature(like), meta.get("signature")
    if want != have:
        if not isinstance(have, list) or len(want) != len(have):
            n_have = len(have) if isinstance(have, list) else "?"
            raise ValueError(
                f"checkpoint {str(path)!r} does not match the model: it holds {n_have} arrays, "
                f"the model has {len(want)}"
            )
        first = next(i for i, (a, b) in enumerate(zip(want, have, strict=True)) if a != b)
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the model at leaf {want[first][0]}: "
            f"checkpoint has shape {have[first][1]} {have[first][2]}, "
            f"model expects {want[first][1]} {want[first][2]}"
        )
    for k, v in (expect_meta or {}).items():
        if meta.get(k) != v:
            raise ValueError(
                f"checkpoint {str(path)!r} was written with {k}={meta.get(k)!r}, "
                f"this run has {k}={v!r}"
            )
    leaves, treedef = jax.tree.flatten(like)
    abstract = {
        k: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype)
        for k, x in _as_flat_dict(leaves).items()
    }
    try:
        ckptr = ocp.StandardCheckpointer()
        flat = ckptr.restore(path / "state", abstract)
        ckptr.close()
        state = jax.tree.unflatten(treedef, [jnp.asarray(flat[k]) for k in sorted(flat)])
    except Exception as err:  # orbax/tensorstore raise many kinds; all mean the same to a user
        raise ValueError(
            f"checkpoint {str(path)!r} is corrupt or unreadable: {type(err).__name__}: {err}"
        ) from err
    return state, meta


# --------------------------------------------------------------------------------------------------
# The loop


def _make_runner(step_fn: StepFn, sample_batch: SampleFn, base_key, n_steps: int, mesh):
    """A jitted function running ``n_steps`` steps from ``start``; returns mean metrics."""
    data = batch_sharding(mesh)

    def one(state, t):
        key = jax.random.fold_in(base_key, t)
        k_data, k_step = jax.random.split(key)
        batch = sample_batch(k_data, state)
        batch = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, data), batch)
        state, metrics = step_fn(state, batch, k_step)
        return state, metrics

    def run(state, start):
        state, metrics = jax.lax.scan(one, state, start + jnp.arange(n_steps))
        return state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

    rep = replicated(mesh)
    return jax.jit(run, in_shardings=(rep, rep), out_shardings=(rep, rep), donate_argnums=0)


def _read_history(path: Path, upto: int) -> list[dict[str, Any]]:
    """Metrics lines already written for steps <= ``upto`` (later ones belong to a lost run)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a torn last line from a killed run
        if row.get("step", math.inf) <= upto:
            rows.append(row)
    return rows


def train(
    state: State,
    step_fn: StepFn,
    sample_batch: SampleFn,
    config: TrainConfig,
    *,
    fingerprint: Mapping[str, Any] | None = None,
    on_log: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Run ``config.steps`` steps of ``step_fn`` from ``state``, resuming from a checkpoint if any.

    Args:
      state: the initial train state (a pytree of arrays), used as is when no checkpoint exists and
        as the structure to restore into when one does.
      step_fn: ``(state, batch, key) -> (state, metrics)``, pure.
      sample_batch: ``(key, state) -> batch`` whose leaves have the global batch as leading axis
        (divisible by the number of devices).
      config: loop settings.
      fingerprint: JSON-able facts about the run (hyperparameters) that a resumed run must share;
        recorded in every checkpoint and checked on resume.
      on_log: called with ``(step, metrics)`` at every log point.

    Returns:
      A :class:`TrainResult`.
    """
    t0 = time.perf_counter()
    mesh = data_mesh(jax.devices()[: config.n_devices] if config.n_devices else None)
    meta = {"seed": config.seed, "run_name": config.run_name, **dict(fingerprint or {})}
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    metrics_path = (
        Path(config.metrics_path)
        if config.metrics_path
        else (ckpt_dir / "metrics.jsonl" if ckpt_dir else None)
    )

    start = 0
    if ckpt_dir is not None and latest_checkpoint(ckpt_dir) is not None:
        state, saved = restore_checkpoint(ckpt_dir, state, expect_meta=meta)
        start = int(saved["step"])
    history = _read_history(metrics_path, start) if metrics_path else []
    if metrics_path:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in history))

    state = jax.device_put(state, replicated(mesh))
    base_key = jax.random.key(config.seed)
    runners: dict[int, Callable] = {}
    k = config.steps_per_call
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not config.progress,
        desc=config.run_name,
        dynamic_ncols=True,
    )
    step = start
    while step < config.steps:
        n = min(k, config.steps - step)
        if n not in runners:
            runners[n] = _make_runner(step_fn, sample_batch, base_key, n, mesh)
        state, metrics = runners[n](state, jnp.asarray(step, jnp.int32))
        step += n
        bar.update(n)
        log_now = (config.log_every and step % config.log_every == 0) or step == config.steps
        if log_now:
            row = {k_: float(v) for k_, v in jax.device_get(metrics).items()}
            row = {"step": step, **row, "wall_s": round(time.perf_counter() - t0, 3)}
            history.append(row)
            if metrics_path:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix({k_: f"{v:.4g}" for k_, v in row.items() if k_ not in ("step",)})
            if on_log:
                on_log(step, row)
        if ckpt_dir is not None and (
            (config.checkpoint_every and step % config.checkpoint_every == 0)
            or step == config.steps
        ):
            save_checkpoint(ckpt_dir, step, state, meta=meta, max_to_keep=config.max_to_keep)
    bar.close()
    return TrainResult(
        state=state,
        history=history,
        wall_s=time.perf_counter() - t0,
        start_step=start,
        steps=config.steps,
    )
