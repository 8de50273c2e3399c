"""``python -m benchmarks speed``: RegretNet training speed and time to a target revenue.

Iterations per second at RegretNet's own configuration (batch 128, 25 misreport Adam steps per
iteration) on 2x2 and 3x10, for two implementations run in the same process:

* ``fused``: the shared loop (``diffecon.train``): misreport search, network update and multiplier
  updates in one jitted step, ``steps_per_call`` steps per dispatch via ``lax.scan``;
* ``per_op_dispatch``: the reference implementation's structure (one ``sess.run`` per misreport
  step and one per update), reproduced in JAX with a jitted misreport step and a jitted update
  called from Python; same maths, same shapes.

Their ratio is the speed-up of fusing. Compile time is measured apart. Then the wall time for
RegretNet on 2x2 to reach a target (training-batch revenue and regret, averaged over a logging
window) with the default recipe, and GemNet's pipeline on 2x2: training with the suite's recipe,
then the certified repair (its wall time, boxes and MILPs) and the independent verification.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.common import TABLE_METRICS, make_record, markdown_table, write_json
from diffecon.outcome import utility
from diffecon.plotting import plot_training_curves, save_figure
from diffecon.regret import misreport_utility
from diffecon.regretnet import (
    RegretNetConfig,
    init_regretnet_state,
    regretnet_sample_fn,
    regretnet_step_fn,
)
from diffecon.settings import Setting, get_setting
from diffecon.training import TrainConfig, train

SUITE = "speed"


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    """Options of the speed suite.

    Attributes:
      settings: where iterations per second are measured.
      iterations: timed iterations per implementation (after a warm-up that compiles).
      train_set_size: RegretNet's fixed training set for these runs (does not affect speed).
      target_setting: where the time to a target revenue is measured.
      target_revenue: training-batch revenue to reach...
      target_regret: ...with training-batch regret at most this.
      max_steps: give up after this many steps.
      seed: seeds everything.
      quick: a small smoke run.
      out: output folder.
      gemnet_setting: where GemNet's training plus repair is timed (``None``: skip).
      gemnet_max_level: the repair's finest grid there.
      gemnet_workers: MILP processes of the repair (0: one per CPU).
    """

    settings: tuple[str, ...] = ("additive_2x2_uniform", "additive_3x10_uniform")
    iterations: int = 500
    train_set_size: int = 65_536
    target_setting: str = "additive_2x2_uniform"
    target_revenue: float = 0.85
    target_regret: float = 2e-3
    max_steps: int = 40_000
    seed: int = 0
    quick: bool = False
    out: str = "out/speed"
    gemnet_setting: str | None = "additive_2x2_uniform"
    gemnet_max_level: int = 6
    gemnet_workers: int = 0


def _fused_its(
    setting: Setting, rn: RegretNetConfig, iterations: int, seed: int
) -> tuple[float, float]:
    """(iterations per second, compile seconds) of the shared loop.

    One run of ``iterations + per_call`` steps logging after every call; the rate is the median
    over calls after the first (which compiles).
    """
    graphdef, state = init_regretnet_state(setting, rn, jax.random.key(seed))
    per_call = max(1, min(100, iterations // 5))
    res = train(
        state,
        regretnet_step_fn(graphdef, setting, rn),
        regretnet_sample_fn(setting, rn),
        TrainConfig(
            steps=iterations + per_call,
            steps_per_call=per_call,
            log_every=per_call,
            progress=False,
            n_devices=1,
        ),
    )
    # median of the per-call rates: robust to other work on the machine coming and going
    rates = [
        (b["step"] - a["step"]) / (b["wall_s"] - a["wall_s"])
        for a, b in itertools.pairwise(res.history)
    ]
    its = float(np.median(rates))
    return its, max(0.0, res.history[0]["wall_s"] - per_call / its)


def _per_op_its(
    setting: Setting, rn: RegretNetConfig, iterations: int, seed: int
) -> tuple[float, float]:
    """(iterations per second, compile seconds) with one dispatch per misreport step and update.

    The rate is the median over blocks of iterations (robust to other work on the machine).
    """
    graphdef, state = init_regretnet_state(setting, rn, jax.random.key(seed))
    opt, mis_opt = optax.adam(rn.learning_rate), optax.adam(rn.misreport_lr)

    @jax.jit
    def mis_step(params, values, mis, mis_state):
        net = nnx.merge(graphdef, params)
        g = jax.grad(lambda m: -jnp.sum(misreport_utility(net, values, m)))(mis)
        upd, mis_state = mis_opt.update(g, mis_state, mis)
        return setting.project(jnp.asarray(optax.apply_updates(mis, upd))), mis_state

    @jax.jit
    def update(params, opt_state, values, mis, lagrange, rho):
        def loss_fn(p):
            net = nnx.merge(graphdef, p)
            out = net(values)
            regret = jnp.mean(
                jax.nn.relu(misreport_utility(net, values, mis) - utility(values, out)), 0
            )
            return (
                -jnp.mean(out.revenue) + jnp.sum(lagrange * regret) + 0.5 * rho * jnp.sum(regret**2)
            )

        grads = jax.grad(loss_fn)(params)
        upd, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, upd), opt_state

    params, opt_state = state.params, state.opt_state
    key = jax.random.key(seed)

    def iteration(i, params, opt_state):
        idx = jax.random.randint(jax.random.fold_in(key, i), (rn.batch_size,), 0, rn.train_set_size)
        values, mis = state.data[idx], state.misreports[idx]
        mis_state = mis_opt.init(mis)
        for _ in range(rn.misreport_steps):
            mis, mis_state = mis_step(params, values, mis, mis_state)
        return update(params, opt_state, values, mis, state.lagrange, state.rho)

    t0 = time.perf_counter()
    params, opt_state = iteration(0, params, opt_state)
    jax.block_until_ready(params)
    compile_s = time.perf_counter() - t0
    block = max(1, iterations // 5)
    rates = []
    for start in range(1, iterations + 1, block):
        t1 = time.perf_counter()
        for i in range(start, min(start + block, iterations + 1)):
            params, opt_state = iteration(i, params, opt_state)
        jax.block_until_ready(params)
        rates.append((min(start + block, iterations + 1) - start) / (time.perf_counter() - t1))
    return float(np.median(rates)), compile_s


def run(config: SpeedConfig) -> list[dict[str, Any]]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    iters = 20 if config.quick else config.iterations
    size = 1024 if config.quick else config.train_set_size
    records: list[dict[str, Any]] = []
    for name in config.settings:
        setting = get_setting(name)
        rn = RegretNetConfig(train_set_size=size)
        record = functools.partial(make_record, suite=SUITE, setting=name, seed=config.seed)
        t0 = time.perf_counter()
        fused, fused_compile = _fused_its(setting, rn, iters, config.seed)
        fused_wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        per_op, per_op_compile = _per_op_its(setting, rn, iters, config.seed)
        per_op_wall = time.perf_counter() - t0
        for mech, its, comp, wall in (
            ("regretnet_fused", fused, fused_compile, fused_wall),
            ("regretnet_per_op_dispatch", per_op, per_op_compile, per_op_wall),
        ):
            records.append(
                record(
                    mechanism=mech,
                    metric="iters_per_s",
                    value=its,
                    n_samples=iters,
                    wall_s=wall,
                )
            )
            records.append(record(mechanism=mech, metric="compile_s", value=comp, wall_s=wall))
        records.append(
            record(
                mechanism="regretnet_fused",
                metric="speedup_vs_per_op_dispatch",
                value=fused / per_op,
                n_samples=iters,
                wall_s=fused_wall + per_op_wall,
            )
        )
        print(
            f"[speed] {name}: fused {fused:.1f} it/s, per-op dispatch {per_op:.1f} it/s, "
            f"ratio {fused / per_op:.2f}",
            flush=True,
        )

    # Time to a target revenue on the target setting with the default recipe.
    setting = get_setting(config.target_setting)
    rn = (
        RegretNetConfig(rho_every=3750)
        if not config.quick
        else RegretNetConfig(train_set_size=size)
    )
    max_steps = 200 if config.quick else config.max_steps
    graphdef, state = init_regretnet_state(setting, rn, jax.random.key(config.seed))
    reached: dict[str, float] = {}

    class _ReachedTargetError(Exception):
        pass

    def on_log(step, row):
        history.append(row)
        if row["revenue"] >= config.target_revenue and row["regret"] <= config.target_regret:
            reached.update(step=step, wall_s=row["wall_s"])
            raise _ReachedTargetError

    t0 = time.perf_counter()
    history: list[dict[str, Any]] = []
    try:
        res = train(
            state,
            regretnet_step_fn(graphdef, setting, rn),
            regretnet_sample_fn(setting, rn),
            TrainConfig(
                steps=max_steps,
                steps_per_call=100 if not config.quick else 20,
                log_every=500 if not config.quick else 20,
                progress=False,
                seed=config.seed,
            ),
            on_log=on_log,
        )
        del res
    except _ReachedTargetError:
        pass
    wall = time.perf_counter() - t0
    record = functools.partial(
        make_record,
        suite=SUITE,
        setting=config.target_setting,
        mechanism="regretnet_fused",
        seed=config.seed,
    )
    target = f"train revenue >= {config.target_revenue} with train regret <= {config.target_regret}"
    if reached:
        records.append(
            record(
                metric="wall_s_to_target",
                value=reached["wall_s"],
                wall_s=wall,
                target=target,
            )
        )
        records.append(
            record(
                metric="steps_to_target",
                value=reached["step"],
                wall_s=wall,
                target=target,
            )
        )
        print(f"[speed] reached {target} at step {reached['step']} after {reached['wall_s']:.1f}s")
    else:
        records.append(
            record(
                metric="wall_s_to_target",
                value=float("nan"),
                wall_s=wall,
                target=f"NOT reached in {max_steps} steps: {target}",
            )
        )
        print(f"[speed] did not reach {target} in {max_steps} steps")
    if history:
        save_figure(
            plot_training_curves(history, title=f"RegretNet on {config.target_setting}"),
            str(out / "time_to_target.png"),
        )
    if config.gemnet_setting is not None:
        records.extend(_gemnet_pipeline(config))
    write_json(records, out / "speed.json")
    table = markdown_table(records, metrics=TABLE_METRICS["speed"])
    (out / "speed.md").write_text(table)
    print(table)
    return records


def _gemnet_pipeline(config: SpeedConfig) -> list[dict[str, Any]]:
    """GemNet training, repair and verification on one setting, each timed."""
    from benchmarks.gemnet import QUICK_RECIPE, RECIPES, train_recipe
    from gemnet import RepairConfig, repair, verify_certificate

    name = str(config.gemnet_setting)
    setting = get_setting(name)
    stages = QUICK_RECIPE if config.quick else RECIPES[name]
    steps = sum(stage.steps for stage in stages)
    level = 3 if config.quick else config.gemnet_max_level
    t0 = time.perf_counter()
    model, _, _ = train_recipe(
        setting, stages, seed=config.seed, runs_dir=None, progress=not config.quick
    )
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, cert = repair(
        model,
        setting,
        RepairConfig(
            max_level=level,
            workers=1 if config.quick else config.gemnet_workers,
            progress=not config.quick,
        ),
    )
    repair_s = time.perf_counter() - t0
    report = verify_certificate(model, setting, cert)
    record = functools.partial(
        make_record, suite=SUITE, setting=name, mechanism="gemnet", seed=config.seed
    )
    extra = {"train_steps": steps, "max_level": level, "verified": report.ok}
    records = [
        record(metric="train_wall_s", value=train_s, wall_s=train_s, **extra),
        record(metric="repair_wall_s", value=repair_s, wall_s=repair_s, **extra),
        record(
            metric="train_plus_repair_s",
            value=train_s + repair_s,
            wall_s=train_s + repair_s,
            target="under 20 minutes (1200 s) on the 2-core CPU",
            **extra,
        ),
        record(metric="n_boxes", value=cert.n_boxes, wall_s=repair_s, **extra),
        record(metric="milps", value=cert.stats.get("milps", 0), wall_s=repair_s, **extra),
        record(metric="verify_wall_s", value=report.wall_s, wall_s=report.wall_s, **extra),
    ]
    print(
        f"[speed] GemNet {name}: train {train_s:.1f}s + repair {repair_s:.1f}s "
        f"({cert.n_boxes} boxes, {cert.stats.get('milps', 0)} MILPs, level {level}), "
        f"verified {report.ok}",
        flush=True,
    )
    return records
