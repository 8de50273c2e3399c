"""``python -m benchmarks revenue``: revenue, welfare, IR and regret of mechanisms per setting.

Baselines are built from the settings' distributions; RegretNet is trained through the shared
loop (``--no-pretrained``) or loaded from the checkpoints committed under
``benchmarks/results/checkpoints`` (the default, ``--pretrained``). GemNet (``gemnet``) is the
committed network of ``python -m benchmarks gemnet`` (which trains and repairs it), with its
committed certificate re-verified before the repaired mechanism is evaluated. Writes
``revenue.json`` (one record per number, with its standard error, sample size, seed, wall time,
device, version and command), ``revenue.md`` and PNG plots into ``--out``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path
from typing import Any

import jax

from benchmarks.common import (
    CHECKPOINTS_DIR,
    TABLE_METRICS,
    Stage,
    make_record,
    markdown_table,
    train_stages,
    write_json,
)
from diffecon.baselines import make_baseline
from diffecon.evaluation import evaluate
from diffecon.plotting import (
    plot_allocation_map,
    plot_revenue_bars,
    plot_training_curves,
    save_figure,
)
from diffecon.regret import RegretConfig, regret_search, regret_stats
from diffecon.regretnet import RegretNetConfig, load_regretnet, save_regretnet, train_regretnet
from diffecon.settings import Setting, get_setting
from diffecon.training import TrainConfig

SUITE = "revenue"

# What runs by default: each setting with the mechanisms that apply to it.
DEFAULT_PLAN: dict[str, tuple[str, ...]] = {
    "single_item_2_uniform": ("itemwise_myerson", "vcg", "first_price"),
    "additive_1x2_uniform": (
        "optimal",
        "itemwise_myerson",
        "bundle_myerson",
        "regretnet",
        "gemnet",
    ),
    "unit_1x2_uniform": ("optimal",),
    "unit_1x2_uniform_23": ("optimal",),
    "additive_1x2_uniform_416_47": ("optimal", "itemwise_myerson", "bundle_myerson"),
    "additive_2x2_uniform": (
        "itemwise_myerson",
        "vcg",
        "bundle_myerson",
        "vvca",
        "ama",
        "regretnet",
        "gemnet",
    ),
}


RegretNetStage = Stage[RegretNetConfig]


# Stage 1 is the reference configuration (batch 128, 25 misreport Adam steps at lr 0.1, lambda from
# 5, rho from 1 by +5) for fewer iterations than the paper's 400k, with the rho schedule compressed
# in proportion. Stage 2 continues with a stronger adversary: each cached misreport is first
# replaced by the best point of an 11 x 11 grid when better, then Adam with a decaying step size
# keeps its best iterate. The paper's adversary overshoots and leaves regret that the strong test
# search finds (see RegretNetConfig.misreport_keep_best): on 1x2, stage 1 alone has regret 1.3e-3
# under the strong search (benchmarks/results/revenue/regretnet_stage1, `--regretnet-stages 1`).
# On 2x2, stage 1 already has regret 4.5e-4 at revenue 0.854, so stage 2 restarts the multipliers
# lower and fixed (lambda 20, rho 20) to trade that spare regret for revenue.
_STRONG_ADVERSARY: dict = dict(
    misreport_grid=11, misreport_keep_best=True, misreport_final_lr_fraction=0.01
)
REGRETNET_RECIPES: dict[str, tuple[RegretNetStage, ...]] = {
    "additive_2x2_uniform": (
        RegretNetStage(RegretNetConfig(rho_every=3750), 150_000),
        RegretNetStage(
            RegretNetConfig(
                lagrange_init=20.0, rho_init=20.0, rho_increment=0.0, **_STRONG_ADVERSARY
            ),
            10_000,
            reset_multipliers=True,
        ),
    ),
    "additive_1x2_uniform": (
        RegretNetStage(RegretNetConfig(rho_every=2500), 100_000),
        RegretNetStage(RegretNetConfig(rho_every=2500, **_STRONG_ADVERSARY), 20_000),
    ),
}
QUICK_REGRETNET = (
    RegretNetStage(
        RegretNetConfig(
            hidden=32, batch_size=64, train_set_size=4096, misreport_steps=5, rho_every=50
        ),
        200,
    ),
)

REVENUE_METRICS = ("revenue", "welfare", "ir_violation", "over_allocation_rate")


@dataclasses.dataclass(frozen=True)
class RevenueConfig:
    """Options of the revenue suite.

    Attributes:
      settings: settings to run (default: those of the default plan).
      mechanisms: mechanisms to run on every chosen setting (default: the plan's per setting).
      exclude: mechanisms to leave out.
      n_samples: profiles for revenue, welfare, IR and over-allocation.
      regret_profiles: profiles searched for regret on learned mechanisms.
      baseline_regret_profiles: profiles searched for regret on classic baselines.
      seed: seeds training, evaluation and the regret search.
      pretrained: load RegretNet from committed checkpoints instead of training it.
      regretnet_stages: train only the first this many stages of a recipe (0: all). A truncated
        recipe is recorded as ``regretnet_stageK`` and never exported over the committed
        checkpoints; it needs ``--no-pretrained`` (it resumes from ``runs_dir``).
      quick: a small smoke run (tiny training, 20k samples, the quick regret search).
      out: output folder.
      runs_dir: where training runs keep their resumable checkpoints.
      checkpoints_dir: where trained RegretNets are exported (and loaded by ``--pretrained``).
    """

    settings: tuple[str, ...] = ()
    mechanisms: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    n_samples: int = 1_000_000
    regret_profiles: int = 500
    baseline_regret_profiles: int = 200
    seed: int = 0
    pretrained: bool = True
    regretnet_stages: int = 0
    quick: bool = False
    out: str = "out/revenue"
    runs_dir: str = "runs"
    checkpoints_dir: str = str(CHECKPOINTS_DIR)


def _plan(config: RevenueConfig) -> dict[str, tuple[str, ...]]:
    settings = config.settings or tuple(DEFAULT_PLAN)
    for name in settings:
        get_setting(name)  # unknown names fail here, before any work
    plan = {
        s: config.mechanisms or DEFAULT_PLAN.get(s, ("vcg", "itemwise_myerson", "bundle_myerson"))
        for s in settings
    }
    return {s: tuple(m for m in mechs if m not in config.exclude) for s, mechs in plan.items()}


def _regretnet(setting: Setting, config: RevenueConfig) -> tuple[Any, dict[str, Any]]:
    """Train (or load) RegretNet for ``setting``; returns the model and facts to record."""
    ckpt = Path(config.checkpoints_dir) / f"regretnet_{setting.name}"
    if config.regretnet_stages and config.pretrained:
        raise ValueError("--regretnet-stages trains (or resumes) a recipe: add --no-pretrained")
    if config.pretrained and not config.quick:
        model, meta = load_regretnet(ckpt, setting)
        return model, {"train_wall_s": meta.get("train_wall_s"), "history": meta.get("history", [])}
    if config.quick:
        stages = QUICK_REGRETNET
    elif setting.name in REGRETNET_RECIPES:
        stages = REGRETNET_RECIPES[setting.name]
    else:
        raise ValueError(
            f"no RegretNet recipe for {setting.name!r}; known: {sorted(REGRETNET_RECIPES)}"
        )
    truncated = 0 < config.regretnet_stages < len(stages)
    stages = stages[: config.regretnet_stages] if truncated else stages

    def train_stage(k, stage, **continuation):
        run_name = f"regretnet_{setting.name}" + (f"_stage{k}" if k > 1 else "")
        run_name += "_quick" if config.quick else ""
        return train_regretnet(
            setting,
            stage.config,
            TrainConfig(
                steps=stage.steps,
                seed=config.seed,
                steps_per_call=min(100, stage.steps),
                log_every=min(1000, stage.steps),
                checkpoint_every=10_000 if stage.steps >= 10_000 else 0,
                checkpoint_dir=str(Path(config.runs_dir) / run_name),
                run_name=run_name,
            ),
            **continuation,
        )

    model, history, train_wall = train_stages(stages, train_stage)
    if not (config.quick or truncated):
        save_regretnet(
            model,
            ckpt,
            setting=setting,
            config=stages[-1].config,
            step=history[-1]["step"],
            extra_meta={"train_wall_s": train_wall, "history": history},
        )
    return model, {"train_wall_s": train_wall, "history": history}


def _gemnet(setting: Setting, config: RevenueConfig) -> tuple[Any, str, dict[str, Any]]:
    """The committed GemNet for ``setting`` as ``(mechanism, name, facts to record)``.

    With several bidders the network is repaired by its committed certificate, which must verify
    (``gemnet``); a network committed without one (the repair did not run) is evaluated as it is
    and named ``gemnet_unrepaired``. With one bidder GemNet is RochetNet, compatible as it is, and
    a GemNet of item-price bundles only (``GemNet.compatible_by_construction``) needs no repair.
    """
    from gemnet import RepairedGemNet, load_certificate, load_gemnet, verify_certificate

    if not config.pretrained:
        raise ValueError(
            "GemNet is trained and repaired by `python -m benchmarks gemnet`; the revenue suite "
            "evaluates the committed network (drop --no-pretrained)"
        )
    ckpt = Path(config.checkpoints_dir) / f"gemnet_{setting.name}"
    if not ckpt.is_dir():
        raise ValueError(f"no committed GemNet for {setting.name!r} (looked in {ckpt})")
    model, _, meta = load_gemnet(ckpt, setting)
    facts = {"train_wall_s": meta.get("train_wall_s"), "history": meta.get("history", [])}
    if model.compatible_by_construction:  # one bidder, or item-price bundles only
        return model, "gemnet", {**facts, "compatible_by_construction": True}
    if not (ckpt / "certificate").is_dir():
        return model, "gemnet_unrepaired", facts
    cert = load_certificate(ckpt / "certificate")
    report = verify_certificate(model, setting, cert)
    if not report.ok:
        raise ValueError(
            f"the committed GemNet certificate for {setting.name!r} does not verify: "
            f"{report.summary()}"
        )
    return RepairedGemNet(model, cert), "gemnet", {**facts, "certificate_boxes": cert.n_boxes}


def run(config: RevenueConfig) -> list[dict[str, Any]]:
    """Run the suite; returns the records it wrote."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    n_samples = 20_000 if config.quick else config.n_samples
    regret_cfg = RegretConfig.quick() if config.quick else RegretConfig()
    records: list[dict[str, Any]] = []
    plan = _plan(config)
    for setting_name, mechanisms in plan.items():
        setting = get_setting(setting_name)
        bars = []
        for mech_name in mechanisms:
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            try:
                if mech_name == "regretnet":
                    mech, extra = _regretnet(setting, config)
                    if config.regretnet_stages:
                        mech_name = f"regretnet_stage{config.regretnet_stages}"
                elif mech_name == "gemnet":
                    mech, mech_name, extra = _gemnet(setting, config)
                else:
                    mech = make_baseline(mech_name, setting, key=jax.random.key(config.seed))
            except ValueError as err:
                print(f"[revenue] skip {mech_name} on {setting_name}: {err}")
                continue
            build_s = time.perf_counter() - t0
            learned = mech_name.startswith(("regretnet", "gemnet"))
            record = functools.partial(
                make_record,
                suite=SUITE,
                setting=setting_name,
                mechanism=mech_name,
                seed=config.seed,
            )
            t1 = time.perf_counter()
            est = evaluate(mech, setting, key=jax.random.key(config.seed + 1), n_samples=n_samples)
            eval_s = time.perf_counter() - t1
            for metric in REVENUE_METRICS:
                e = est[metric]
                records.append(
                    record(
                        metric=metric,
                        value=e.value,
                        stderr=e.stderr,
                        n_samples=e.n_samples,
                        wall_s=eval_s,
                    )
                )
            bars.append(
                {
                    "mechanism": mech_name,
                    "value": est["revenue"].value,
                    "stderr": est["revenue"].stderr,
                }
            )
            n_regret = config.regret_profiles if learned else config.baseline_regret_profiles
            if config.quick:
                n_regret = min(n_regret, 256)
            if n_regret:
                t2 = time.perf_counter()
                values = setting.sample(jax.random.key(config.seed + 2), (n_regret,))
                res = regret_search(
                    mech,
                    values,
                    key=jax.random.key(config.seed + 3),
                    setting=setting,
                    config=regret_cfg,
                )
                regret_s = time.perf_counter() - t2
                for metric, (v, se) in regret_stats(res).items():
                    if metric == "ir_violation":
                        continue  # measured on n_samples above
                    records.append(
                        record(metric=metric, value=v, stderr=se, n_samples=n_regret,
                            wall_s=regret_s, regret_search=dataclasses.asdict(regret_cfg),
                        )
                    )  # fmt: skip
            if learned and extra.get("train_wall_s") is not None:
                records.append(
                    record(metric="train_wall_s", value=extra["train_wall_s"], wall_s=build_s)
                )
            elif build_s > 1.0:
                records.append(record(metric="build_wall_s", value=build_s, wall_s=build_s))
            if learned and extra.get("history"):
                save_figure(
                    plot_training_curves(extra["history"], title=f"{mech_name} on {setting_name}"),
                    str(out / f"train_{mech_name}_{setting_name}.png"),
                )
            if setting.value_dim == 2 and setting.bounded and (learned or mech_name == "optimal"):
                save_figure(
                    plot_allocation_map(mech, setting),
                    str(out / f"alloc_{mech_name}_{setting_name}.png"),
                )
            print(
                f"[revenue] {setting_name:28s} {mech_name:18s} revenue {est['revenue']}"
                f" (build {build_s:.1f}s, eval {eval_s:.1f}s)",
                flush=True,
            )
        refs = {
            r.mechanism if r.kind == "revenue" else f"{r.mechanism} ({r.kind})": r.value
            for r in setting.references
            if r.mechanism in ("optimal",)
            or (r.mechanism == "regretnet" and "regretnet" in mechanisms)
        }
        if bars:
            save_figure(
                plot_revenue_bars(bars, references=refs, title=setting_name),
                str(out / f"revenue_{setting_name}.png"),
            )
    write_json(records, out / "revenue.json")
    table = markdown_table(records, metrics=TABLE_METRICS["revenue"])
    (out / "revenue.md").write_text(table)
    print(table)
    for line in reference_check(records):
        print("[revenue] vs exact:", line)
    return records


def reference_check(records: list[dict[str, Any]]) -> list[str]:
    """Lines comparing each revenue with its setting's exact reference (for logs and tests)."""
    lines = []
    for r in records:
        if r["metric"] != "revenue":
            continue
        setting = get_setting(r["setting"])
        ref = setting.reference(r["mechanism"]) or (
            setting.reference("optimal") if r["mechanism"] == "optimal" else None
        )
        if ref is None or not ref.exact:
            continue
        z = (r["value"] - ref.value) / max(r["stderr"], 1e-12)
        lines.append(
            f"{r['setting']} {r['mechanism']}: {r['value']:.6f} vs {ref.value:.6f} ({z:+.2f} SE)"
        )
    return lines
