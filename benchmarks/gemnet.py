"""GemNet suite: train (or load) GemNet/RochetNet, repair, verify, and measure.

``python -m benchmarks gemnet --settings additive_1x2_uniform additive_2x2_uniform``

Per setting: training (or the committed checkpoint with ``--pretrained``), for several bidders
the repair (boxes, MILPs, time) and an independent verification of its certificate, then revenue
+- SE and the over-allocation rate on ``--n-samples`` profiles, an adversarial over-allocation
search, and regret under the shared search. Writes ``gemnet.json`` (records), ``gemnet.md`` and
plots of a bidder's menu over its own values for a fixed ``b_-i``, before and after repair.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    TABLE_METRICS,
    Stage,
    make_record,
    markdown_table,
    train_stages,
    write_json,
)
from diffecon import OptimalLP, TrainConfig, evaluate, get_setting, optimal_dsic_lp
from diffecon.plotting import plot_allocation_map, save_figure
from diffecon.regret import RegretConfig, regret_search, regret_stats
from gemnet import (
    GemNetConfig,
    GemNetTrainConfig,
    RepairConfig,
    RepairError,
    adversarial_over_allocation,
    certifiable_share,
    load_certificate,
    load_gemnet,
    repair,
    repair_breakdown,
    save_certificate,
    save_gemnet,
    train_gemnet,
)
from gemnet.repair import RepairedGemNet
from gemnet.verify import verify_certificate

SUITE = "gemnet"


GemNetStage = Stage[GemNetTrainConfig]

_ROCHETNET = GemNetTrainConfig(network=GemNetConfig(menu_size=256), batch_size=8192)
_RELU_2X2 = GemNetTrainConfig(
    network=GemNetConfig(menu_size=64, alloc_clip=0.1, activation="relu"), batch_size=4096
)
_TANH_128 = GemNetTrainConfig(network=GemNetConfig(menu_size=128, alloc_clip=0.1), batch_size=4096)


def _fee_menu_stage(fees: str, *, batch_size: int, steps: int) -> GemNetStage:
    """Item-price bundles with ``fees`` and no learned elements: compatible by construction
    (GemNet.compatible_by_construction), so trained with no penalty and never repaired."""
    network = GemNetConfig(menu_size=0, item_prices=True, fees=fees, activation="relu")
    return GemNetStage(
        GemNetTrainConfig(
            network=network,
            batch_size=batch_size,
            kappa_init=100.0,
            kappa_final=1000.0,
            rho=0.0,
            lagrange_init=0.0,
        ),
        steps,
    )


_ENTRY_FEE_10 = _fee_menu_stage("entry", batch_size=1024, steps=6000)

# Per-setting training recipes (stages of steps, menu size, batch); others use the default.
RECIPES: dict[str, tuple[GemNetStage, ...]] = {
    "additive_1x2_uniform": (GemNetStage(_ROCHETNET, 4000),),
    "unit_1x2_uniform": (GemNetStage(_ROCHETNET, 4000),),
    "unit_1x2_uniform_23": (GemNetStage(_ROCHETNET, 4000),),
    "additive_1x2_uniform_416_47": (GemNetStage(_ROCHETNET, 4000),),
    # ReLU: piecewise-linear prices in b_-i (as an affine maximiser's are) train to more revenue.
    # 64 elements train faster than 128 and certify as high (README). The first stage imitates
    # the fitted AMA (compatible menus at the AMA's revenue); the second trains for revenue from
    # there, its soft choice starting as sharp as the imitation's.
    "additive_2x2_uniform": (
        GemNetStage(
            dataclasses.replace(_RELU_2X2, imitate="ama", kappa_init=200.0, kappa_final=200.0),
            3000,
        ),
        GemNetStage(dataclasses.replace(_RELU_2X2, kappa_init=200.0), 12_000),
    ),
    "additive_2x3_uniform": (GemNetStage(_TANH_128, 10_000),),
    "additive_3x3_uniform": (GemNetStage(_TANH_128, 6000),),
    # 30 coordinates: the repair's grid cannot hold the profile space. A menu of the 1,023
    # item-price bundles with a learned entry fee and no learned elements is compatible by
    # construction (GemNet.compatible_by_construction), so it needs no repair and no penalty.
    "additive_3x10_uniform": (_ENTRY_FEE_10,),
    "additive_5x10_uniform": (_ENTRY_FEE_10,),
    # Exact 0/1 allocations (alloc_clip) let the two bidders split the items, as the optimum does.
    "yao_2x2_discrete_37": (
        GemNetStage(
            GemNetTrainConfig(
                network=GemNetConfig(menu_size=32, alloc_clip=0.1),
                batch_size=2048,
                learning_rate=3e-3,
                kappa_final=300.0,
                rho=1.0,
            ),
            6000,
        ),
    ),
}
# ``--fees``: menus of item-price bundles with monotone bundle fees and no learned elements,
# compatible by construction (GemNet.compatible_by_construction): no repair, any number of bidders.
FEE_RECIPE = (_fee_menu_stage("bundle", batch_size=4096, steps=10_000),)
METRICS = TABLE_METRICS[SUITE]


@dataclasses.dataclass(frozen=True)
class GemNetBenchConfig:
    """Options of the GemNet suite.

    Attributes:
      settings: settings to run (their recipes are in ``benchmarks/gemnet.py``).
      pretrained: load committed checkpoints and certificates instead of training and repairing.
      repair_pretrained: with ``pretrained``, repair the committed network afresh (and commit the
        new certificate) instead of loading its certificate: a repair change is measured on the
        same trained menus.
      n_samples: profiles for revenue and the over-allocation rate.
      regret_profiles: profiles searched for regret.
      adversarial_starts: starts of the adversarial over-allocation search.
      max_level: the repair's finest grid (``2^max_level`` cells per coordinate).
      max_boxes: the repair gives up beyond this many pending boxes (``RepairConfig.max_boxes``).
      fees: train ``FEE_RECIPE`` (item-price bundles with bundle fees, compatible by
        construction) instead of the setting's recipe; its checkpoints are ``gemnet_<setting>_fees``
        and its records' mechanism ``gemnet_fees``.
      pairwise: the repair's pairwise candidate test (``RepairConfig.pairwise``; 0: off).
      interpolate: the repaired menus are interpolated between the cells' corners
        (``RepairConfig.interpolate``) instead of taken at the cells' centres.
      keep_certificate: write a new certificate that verifies into ``checkpoints_dir`` (off for
        experiments that must leave the committed one in place).
      workers: MILP processes (0: one per CPU).
      quick: a smoke run (tiny networks and training, small samples; checkpoints under ``out``).
      seed: seeds training and evaluation.
      out: output folder.
      checkpoints_dir: committed checkpoints and certificates.
      runs_dir: resumable training runs.
    """

    settings: tuple[str, ...] = ("additive_1x2_uniform", "unit_1x2_uniform")
    pretrained: bool = False
    repair_pretrained: bool = False
    n_samples: int = 1_000_000
    regret_profiles: int = 200
    adversarial_starts: int = 4096
    max_level: int = 5
    max_boxes: int = RepairConfig.max_boxes
    pairwise: int = 0
    fees: bool = False
    interpolate: bool = False
    keep_certificate: bool = True
    workers: int = 0
    quick: bool = False
    seed: int = 0
    out: str = "out/gemnet"
    checkpoints_dir: str = "benchmarks/results/checkpoints"
    runs_dir: str = "runs"


QUICK_RECIPE = (
    GemNetStage(
        GemNetTrainConfig(network=GemNetConfig(menu_size=16, hidden=32), batch_size=512), 200
    ),
)


def _quick(config: GemNetBenchConfig) -> GemNetBenchConfig:
    out = Path(config.out)
    return dataclasses.replace(
        config,
        n_samples=20_000,
        regret_profiles=10,
        adversarial_starts=64,
        max_level=3,
        workers=1,
        checkpoints_dir=str(out / "checkpoints"),
        runs_dir=str(out / "runs"),
    )


def _optimal_lp(setting) -> OptimalLP | None:
    """The exact optimal DSIC auction of a small discrete setting (``None`` for the others)."""
    try:
        return optimal_dsic_lp(setting)
    except ValueError:
        return None


def _exact_revenue(mechanism, lp: OptimalLP) -> float:
    """Expected revenue by enumerating the support (no sampling error)."""
    pay = mechanism(jnp.asarray(lp.profiles, jnp.float32)).pay
    return float(np.sum(lp.probs * np.asarray(pay, np.float64).sum(-1)))


def _outcome_table(mechanism, lp: OptimalLP) -> str:
    """Markdown: every profile's allocation and payments, the mechanism's beside the LP's."""
    out = mechanism(jnp.asarray(lp.profiles, jnp.float32))
    alloc, pay = np.asarray(out.alloc), np.asarray(out.pay)
    rows = [
        "| profile (values; per bidder) | GemNet allocation | GemNet payments "
        "| LP allocation | LP payments |",
        "|---|---|---|---|---|",
    ]

    def fmt(x):
        x = np.round(np.asarray(x, np.float64), 4) + 0.0  # -1e-15 -> 0
        return "; ".join(", ".join(f"{v:.4g}" for v in np.atleast_1d(r)) for r in x)

    for p in range(len(lp.probs)):
        rows.append(
            f"| {fmt(lp.profiles[p])} | {fmt(alloc[p])} | {fmt(pay[p])} | "
            f"{fmt(lp.alloc[p])} | {fmt(lp.pay[p])} |"
        )
    return "\n".join(rows) + "\n"


def _checkpoint_dir(name: str, config: GemNetBenchConfig) -> Path:
    return Path(config.checkpoints_dir) / f"gemnet_{name}{'_fees' if config.fees else ''}"


def train_recipe(
    setting, stages: tuple[GemNetStage, ...], *, seed: int, runs_dir: str | None, progress: bool
):
    """Train the ``stages`` of a recipe in order on ``setting``.

    Returns ``(model, history, train_wall_s)``: the history of all stages (steps counted from
    the first stage's start, each row with its ``stage``), and the stages' summed wall time
    (including parts done before a resume from ``runs_dir``).
    """

    def train_stage(k, stage, **continuation):
        run_name = f"gemnet_{setting.name}" + (f"_stage{k}" if k > 1 else "")
        return train_gemnet(
            setting,
            stage.config,
            TrainConfig(
                steps=stage.steps,
                seed=seed,
                log_every=max(stage.steps // 500, 1) * 10,
                checkpoint_every=1000 if runs_dir else 0,
                checkpoint_dir=str(Path(runs_dir) / run_name) if runs_dir else None,
                run_name=run_name.replace("_", " ", 1),
                progress=progress,
            ),
            **continuation,
        )

    return train_stages(stages, train_stage)


def _model(name: str, config: GemNetBenchConfig):
    setting = get_setting(name)
    ckpt = _checkpoint_dir(name, config)
    if config.pretrained:
        model, _, meta = load_gemnet(ckpt, setting)
        return setting, model, float(meta.get("train_wall_s", float("nan")))
    if config.quick:
        stages = QUICK_RECIPE
        if config.fees:
            network = dataclasses.replace(FEE_RECIPE[0].config.network, hidden=32)
            stages = (GemNetStage(dataclasses.replace(FEE_RECIPE[0].config, network=network), 200),)
    elif config.fees:
        stages = FEE_RECIPE
    else:
        stages = RECIPES.get(name, (GemNetStage(GemNetTrainConfig(), 10_000),))
    model, history, wall = train_recipe(
        setting,
        stages,
        seed=config.seed,
        runs_dir=str(Path(config.runs_dir) / "fees") if config.fees else config.runs_dir,
        progress=not config.quick,
    )
    save_gemnet(
        model,
        ckpt,
        setting=setting,
        config=stages[-1].config,
        step=sum(stage.steps for stage in stages),
        extra_meta={
            "train_wall_s": wall,
            "history": history,
            "stages": [dataclasses.asdict(stage) for stage in stages],
        },
    )
    return setting, model, wall


def _eval_chunk(model) -> int:
    """Profiles per evaluation chunk: the menus of a chunk (``[chunk, n, elements, m]``) stay near
    200 MB."""
    per_profile = model.n_bidders * model.n_elements * (model.n_items + 1)
    return int(min(100_000, max(1_000, 5e7 // per_profile)))


def _certifiable_shares(model, setting, rec: dict[str, Any], config: GemNetBenchConfig):
    """Share of uniform-grid boxes that the interval test certifies before repair, per level:
    how fine the repair's partition must get (a level-L grid has 2^(L * n * m) boxes)."""
    records = []
    for level in range(config.max_level + 2):
        t0 = time.perf_counter()
        est = certifiable_share(
            model,
            setting,
            level=level,
            key=jax.random.key(config.seed + 5),
            n_boxes=512 if config.quick else 4096,
        )
        records.append(
            make_record(
                **rec,
                mechanism="gemnet_unrepaired",
                metric=f"certifiable_share_level_{level}",
                value=est.value,
                stderr=est.stderr,
                n_samples=est.n_samples,
                wall_s=time.perf_counter() - t0,
                level=level,
                grid_boxes=float(2.0 ** (level * setting.n_bidders * setting.n_items)),
            )
        )
    print(
        f"[gemnet] {setting.name}: share of grid boxes certified before repair, by level: "
        + ", ".join(f"{r['level']}: {r['value']:.3f}" for r in records)
    )
    return records


def run(config: GemNetBenchConfig) -> list[dict[str, Any]]:
    """Run the suite; returns the records it wrote."""
    if config.quick:
        config = _quick(config)
    for name in config.settings:
        get_setting(name)  # unknown names fail before any work
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for name in config.settings:
        t0 = time.perf_counter()
        setting, model, train_wall = _model(name, config)
        mechanism: Any = model
        extra: dict[str, Any] = {}
        label = "rochetnet" if setting.n_bidders == 1 else "gemnet"
        if config.fees:
            label = "gemnet_fees"
        rec: dict[str, Any] = {"suite": SUITE, "setting": name, "seed": config.seed}
        if setting.n_bidders > 1 and _optimal_lp(setting) is None and not model.item_prices:
            records.extend(_certifiable_shares(model, setting, rec, config))
        cert = None
        if setting.n_bidders > 1 and model.compatible_by_construction:
            # item-price bundles only: no profile over-allocates, whatever the weights (the
            # proof is GemNet.compatible_by_construction's); nothing to repair
            records.append(
                make_record(
                    **rec,
                    mechanism=label,
                    metric="certified",
                    value=1.0,
                    wall_s=0.0,
                    certified_by="construction",
                )
            )
        elif setting.n_bidders > 1:
            cert_dir = _checkpoint_dir(name, config) / "certificate"
            if config.pretrained and not config.repair_pretrained:
                cert = load_certificate(cert_dir)
            else:
                try:
                    _, cert = repair(
                        model,
                        setting,
                        RepairConfig(
                            max_level=config.max_level,
                            max_boxes=config.max_boxes,
                            pairwise=config.pairwise,
                            interpolate=config.interpolate,
                            workers=config.workers,
                            progress=not config.quick,
                            time_limit_s=120.0,
                        ),
                    )
                except RepairError as err:
                    # reported, not hidden: the unrepaired network is measured below
                    print(f"[gemnet] {name}: repair did not finish: {err}")
                    label = "gemnet_unrepaired"
                    records.append(
                        make_record(
                            **rec,
                            mechanism=label,
                            metric="certified",
                            value=0.0,
                            wall_s=time.perf_counter() - t0,
                            reason=str(err),
                            max_level=config.max_level,
                        )
                    )
        if cert is not None:
            mechanism = RepairedGemNet(model, cert)
            report = verify_certificate(model, setting, cert)
            fresh = not (config.pretrained and not config.repair_pretrained)
            if report.ok and fresh and config.keep_certificate:
                save_certificate(cert, cert_dir)  # only a certificate that verifies is kept
            label = "gemnet_repaired"
            extra = {"repair": cert.stats, "verified": report.ok}
            records.append(
                make_record(
                    **rec,
                    mechanism=label,
                    metric="certified",
                    value=float(report.ok),
                    wall_s=report.wall_s,
                    **extra,
                )
            )
            records.append(
                make_record(
                    **rec,
                    mechanism=label,
                    metric="repair_wall_s",
                    value=cert.stats.get("wall_s", float("nan")),
                    wall_s=cert.stats.get("wall_s", 0.0),
                    n_boxes=cert.n_boxes,
                    milps=cert.stats.get("milps"),
                )
            )
            # where the repair's revenue goes (kept elements at higher prices vs switches)
            breakdown = repair_breakdown(
                model, mechanism, setting, key=jax.random.key(config.seed + 4), n_samples=200_000
            )
            for metric, e in breakdown.items():
                records.append(
                    make_record(
                        **rec,
                        mechanism=label,
                        metric=f"repair_{metric}",
                        value=e.value,
                        stderr=e.stderr,
                        n_samples=e.n_samples,
                        wall_s=0.0,
                    )
                )
            # the unrepaired network, for comparison
            base = evaluate(
                model,
                setting,
                key=jax.random.key(config.seed),
                n_samples=200_000,
                chunk_size=_eval_chunk(model),
            )
            for metric in ("revenue", "over_allocation_rate"):
                records.append(
                    make_record(
                        **rec,
                        mechanism="gemnet_unrepaired",
                        metric=metric,
                        value=base[metric].value,
                        stderr=base[metric].stderr,
                        n_samples=base[metric].n_samples,
                        wall_s=0.0,
                    )
                )
            if setting.value_dim == 2 and setting.bounded and _optimal_lp(setting) is None:
                for tag, mech in (("before", model), ("after", mechanism)):
                    save_figure(
                        plot_allocation_map(
                            mech, setting, title=f"GemNet {name}, bidder 0, {tag} repair"
                        ),
                        str(out / f"menu_{name}_{tag}_repair.png"),
                    )
        records.append(
            make_record(
                **rec,
                mechanism=label,
                metric="train_wall_s",
                value=train_wall,
                wall_s=train_wall,
                pretrained=config.pretrained,
            )
        )
        est = evaluate(
            mechanism,
            setting,
            key=jax.random.key(config.seed + 1),
            n_samples=config.n_samples,
            chunk_size=_eval_chunk(model),
        )
        for metric in ("revenue", "over_allocation_rate", "ir_violation"):
            records.append(
                make_record(
                    **rec,
                    mechanism=label,
                    metric=metric,
                    value=est[metric].value,
                    stderr=est[metric].stderr,
                    n_samples=est[metric].n_samples,
                    wall_s=time.perf_counter() - t0,
                )
            )
        adv = adversarial_over_allocation(
            mechanism,
            setting,
            key=jax.random.key(config.seed + 2),
            n_starts=config.adversarial_starts,
            steps=30 if config.quick else 200,
        )
        records.append(
            make_record(
                **rec,
                mechanism=label,
                metric="adversarial_over_allocation",
                value=adv.max_over_allocation,
                n_samples=adv.n_starts,
                wall_s=time.perf_counter() - t0,
                worst_profile=np.asarray(adv.worst_profile).tolist(),
            )
        )
        profiles = setting.sample(jax.random.key(config.seed + 3), (config.regret_profiles,))
        res = regret_search(
            mechanism,
            jnp.asarray(profiles),
            key=jax.random.key(config.seed + 4),
            setting=setting,
            config=RegretConfig.quick() if config.quick else RegretConfig(),
            progress=not config.quick,
        )
        stats = regret_stats(res)
        value, se = stats["regret_max"]
        records.append(
            make_record(
                **rec,
                mechanism=label,
                metric="regret_max",
                value=value,
                stderr=se,
                n_samples=config.regret_profiles,
                wall_s=time.perf_counter() - t0,
            )
        )
        lp = _optimal_lp(setting) if setting.n_bidders > 1 else None
        if lp is not None:
            for tag, mech in (("gemnet_unrepaired", model), (label, mechanism)):
                records.append(
                    make_record(
                        **rec,
                        mechanism=tag,
                        metric="exact_revenue",
                        value=_exact_revenue(mech, lp),
                        n_samples=len(lp.probs),
                        wall_s=time.perf_counter() - t0,
                        optimal_lp_revenue=lp.revenue,
                    )
                )
            (out / f"outcomes_{name}.md").write_text(_outcome_table(mechanism, lp))
            print(
                f"[gemnet] {name}: exact revenue {records[-1]['value']:.6f} over the "
                f"{len(lp.probs)} profiles; optimal DSIC auction (LP) {lp.revenue:.6f}"
            )
        ref = setting.reference("optimal")
        print(
            f"[gemnet] {name}: {label} revenue {est['revenue']}"
            + (f" (optimal {ref.value:.6g})" if ref else "")
            + f", over-allocation {est['over_allocation_rate']}, adversarial "
            f"{adv.max_over_allocation:.3g}, regret_max {value:.3g}"
        )
        write_json(records, out / "gemnet.json")
    (out / "gemnet.md").write_text(markdown_table(records, metrics=METRICS) + "\n")
    return records
