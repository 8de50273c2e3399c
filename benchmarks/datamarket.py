"""Data-market suite: learned menus and market mechanisms against the optima of the theory.

``python -m benchmarks datamarket --settings dm_single_uniform dm_2_uniform_theta0.5_alpha0.5_bic``

Single buyer: trains (or, with ``--pretrained``, loads) a RochetNet-style menu of experiments,
prunes it, and evaluates it next to the closed-form optimum (where the spec gives one) and the LP
optimum on type grids of growing size. Several buyers: trains (or loads) a RegretNet-style market
and evaluates it next to the closed-form optimum with the same code (revenue on ``--n-samples``
profiles; ex post: joint misreport-and-disobey regret by the shared strong search; BIC: interim
regret, obedience and IR). Every number carries its standard error. Writes ``datamarket.json``,
``datamarket.md`` and plots (menus and which type buys which experiment; learned and optimal
experiments over the value profiles) into ``--out``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import datamarket as dm
from benchmarks.common import TABLE_METRICS, make_record, markdown_table, write_json
from datamarket.multi import STRONG_SEARCH
from diffecon import TrainConfig
from diffecon.plotting import save_figure
from diffecon.regret import RegretConfig

SUITE = "datamarket"
METRICS = TABLE_METRICS[SUITE]

# Per-setting budgets (steps and configs) sized for the 2-core CPU.
MENU_RECIPE = (2000, dm.MenuTrainConfig(n_items=64, batch_size=4096))
# Market rows: 40k steps (~3 min ex post, ~6 min BIC on one core); rho grows by rho_increment
# every 200 steps (to 4000 ex post, 2000 BIC). With the weaker schedule of earlier runs (1500
# steps, rho to 40) ex post networks bought revenue above the optimum with regret ~1e-3.
MARKET_STEPS = 40_000
_MARKET_BASE = dm.MarketTrainConfig(
    hidden=48, batch_size=128, misreport_grid=24, bic_types=64, learning_rate=2e-3, rho_every=200
)
MARKET_RECIPES = {
    "expost": dataclasses.replace(_MARKET_BASE, rho_increment=20.0),
    "bic": dataclasses.replace(_MARKET_BASE, rho_increment=10.0),
}
# Exp(1) values (unbounded, revenue from the tail): at width 48 the ex post rows stayed more than
# 3% below the optimum; width 96 brings them within it.
EXPOST_EXP_RECIPE = dataclasses.replace(_MARKET_BASE, hidden=96, rho_increment=10.0)


def market_recipe(setting: dm.MarketSetting) -> dm.MarketTrainConfig:
    """The training recipe of a market row."""
    if setting.incentive == "expost" and "_exp_" in setting.name:
        return EXPOST_EXP_RECIPE
    return MARKET_RECIPES[setting.incentive]


QUICK_MENU = (100, dm.MenuTrainConfig(n_items=16, batch_size=1024))
QUICK_MARKET = (60, dm.MarketTrainConfig(hidden=16, batch_size=32, misreport_grid=8, bic_types=16))
LP_GRIDS = {  # (prior points, scale points) of the LP grids, coarse to fine
    "dm_single_enlarged_uniform": ((10, 10), (20, 20), (30, 30)),
}
LP_GRIDS_1D = ((100, 1), (200, 1), (400, 1))

DEFAULT_SETTINGS = tuple(dm.list_settings())


@dataclasses.dataclass(frozen=True)
class DataMarketBenchConfig:
    """Options of the data-market suite.

    Attributes:
      settings: settings to run (``datamarket.list_settings()``).
      pretrained: load committed checkpoints instead of training.
      n_samples: profiles (types) for revenue and ex post violations.
      regret_profiles: profiles (ex post) or own types per buyer (BIC) for regret.
      optimum_regret_profiles: the same for the closed-form optima (slower to evaluate).
      quick: a smoke run (tiny models, few steps, small samples; checkpoints under ``out``).
      seed: seeds training and evaluation.
      out: output folder.
      checkpoints_dir: committed checkpoints.
      runs_dir: resumable training runs.
    """

    settings: tuple[str, ...] = DEFAULT_SETTINGS
    pretrained: bool = False
    n_samples: int = 1_000_000
    regret_profiles: int = 1000
    optimum_regret_profiles: int = 300
    quick: bool = False
    seed: int = 0
    out: str = "out/datamarket"
    checkpoints_dir: str = "benchmarks/results/checkpoints"
    runs_dir: str = "runs"


def _quick(config: DataMarketBenchConfig) -> DataMarketBenchConfig:
    out = Path(config.out)
    return dataclasses.replace(
        config,
        n_samples=20_000,
        regret_profiles=20,
        optimum_regret_profiles=20,
        checkpoints_dir=str(out / "checkpoints"),
        runs_dir=str(out / "runs"),
    )


def _train_config(name: str, steps: int, config: DataMarketBenchConfig) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        seed=config.seed,
        steps_per_call=10,
        log_every=max(steps // 50, 1) * 10 if steps >= 100 else 10,
        checkpoint_every=0,
        checkpoint_dir=str(Path(config.runs_dir) / f"datamarket_{name}"),
        run_name=f"datamarket {name}",
        progress=False,
    )


def _records(rec: dict[str, Any], mechanism: str, est: dict, wall: float, **extra) -> list[dict]:
    names = {
        "revenue": "revenue",
        "regret": "regret",
        "obedience_violation": "obedience_violation",
        "ir_violation": "ir_violation",
        "envelope_excess": "envelope_excess",
    }
    out = []
    for key, metric in names.items():
        if key in est:
            e = est[key]
            out.append(
                make_record(
                    **rec,
                    mechanism=mechanism,
                    metric=metric,
                    value=e.value,
                    stderr=e.stderr,
                    n_samples=e.n_samples,
                    wall_s=wall,
                    **extra,
                )
            )
    return out


# --------------------------------------------------------------------------------------------------
# Single buyer.


def _plot_menu(
    name: str, types: dm.BuyerTypes, learned: dm.Menu, optimum: dm.Menu | None, path: Path
) -> None:
    """Learned menu items, and which type buys which item (learned vs theory)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ex, prices = np.asarray(learned.experiments), np.asarray(learned.prices)
    text = [
        f"item {k}: price {prices[k]:.4f}\n pi = {np.round(ex[k], 3).tolist()}"
        for k in range(len(prices))
    ]
    axes[0].axis("off")
    axes[0].text(
        0,
        1,
        "learned menu (after pruning)\n\n" + "\n".join(text[:8]),
        va="top",
        family="monospace",
        fontsize=8,
    )
    if types.enlarged:
        t = np.linspace(0, 1, 201, dtype=np.float32)
        s = np.linspace(types.scale_low or 0.0, types.scale_high, 201, dtype=np.float32)
        tt, ss = np.meshgrid(t, s)
        priors = jnp.stack([tt.ravel(), 1 - tt.ravel()], -1)
        prices_all = np.append(prices, 0.0)
        paid = prices_all[np.asarray(learned.choose(priors, jnp.asarray(ss.ravel())))]
        im = axes[1].imshow(
            paid.reshape(tt.shape),
            origin="lower",
            extent=(0, 1, s[0], s[-1]),
            aspect="auto",
            cmap="viridis",
        )
        fig.colorbar(im, ax=axes[1], label="price paid (learned)")
        if optimum is not None:
            p = float(np.asarray(optimum.prices)[0])
            # theory: buy full information iff scale * min(t, 1 - t) >= p
            axes[1].contour(tt, ss, ss * np.minimum(tt, 1 - tt) - p, levels=[0], colors="w")
        axes[1].set_xlabel("prior of state 0")
        axes[1].set_ylabel("value scale")
        axes[1].set_title("which type buys what (white: theory's boundary)")
    else:
        t = np.linspace(0, 1, 1001, dtype=np.float32)
        priors = jnp.stack([t, 1 - t], -1)
        ones = jnp.ones_like(t)
        for menu, label, style in ((learned, "learned", "-"), (optimum, "optimum", "--")):
            if menu is None:
                continue
            prices_all = np.append(np.asarray(menu.prices), 0.0)
            choice = np.asarray(menu.choose(priors, ones, types.payoff_matrix))
            axes[1].plot(t, prices_all[choice], style, label=f"price paid ({label})")
        axes[1].set_xlabel("prior of state 0")
        axes[1].set_ylabel("price of the item bought")
        axes[1].legend()
        axes[1].set_title("which type buys which experiment")
    fig.suptitle(name)
    save_figure(fig, str(path))


def _run_single(name: str, config: DataMarketBenchConfig, out: Path) -> list[dict[str, Any]]:
    types = dm.SINGLE_BUYER_SETTINGS[name]
    rec: dict[str, Any] = {"suite": SUITE, "setting": name, "seed": config.seed}
    records: list[dict[str, Any]] = []
    ckpt = Path(config.checkpoints_dir) / f"datamarket_{name}"
    steps, recipe = QUICK_MENU if config.quick else MENU_RECIPE
    t0 = time.perf_counter()
    if config.pretrained:
        model, _, meta = dm.load_menu(ckpt, types)
        train_wall = float(meta.get("train_wall_s", float("nan")))
    else:
        model, result = dm.train_menu(types, recipe, _train_config(name, steps, config))
        # a resumed run reads its history back: the last line holds the whole training time
        train_wall = result.history[-1]["wall_s"] if result.history else result.wall_s
        dm.save_menu(
            model,
            ckpt,
            types=types,
            config=recipe,
            step=steps,
            extra_meta={"train_wall_s": train_wall, "history": result.history},
        )
    menu = dm.prune_menu(model, types, key=jax.random.key(config.seed + 1))
    est = dm.evaluate_menu(
        menu, types, key=jax.random.key(config.seed + 2), n_samples=config.n_samples
    )
    extra = {
        "prices": np.asarray(menu.prices).round(5).tolist(),
        "experiments": np.asarray(menu.experiments).round(4).tolist(),
    }
    records += _records(rec, "learned_menu", est, time.perf_counter() - t0, **extra)
    records.append(
        make_record(
            **rec,
            mechanism="learned_menu",
            metric="train_wall_s",
            value=train_wall,
            wall_s=train_wall,
            pretrained=config.pretrained,
        )
    )
    records.append(
        make_record(
            **rec,
            mechanism="learned_menu",
            metric="menu_items",
            value=len(extra["prices"]),
            wall_s=0.0,
        )
    )
    optimum = None
    if name in ("dm_single_uniform", "dm_single_enlarged_uniform"):
        optimum = dm.full_information_menu(0.25 if name == "dm_single_uniform" else 0.14233)
    elif name == "dm_single_mix":
        optimum = dm.mix_two_item_menu()
    if optimum is not None:
        est_opt = dm.evaluate_menu(
            optimum, types, key=jax.random.key(config.seed + 2), n_samples=config.n_samples
        )
        records += _records(
            rec, "optimal", est_opt, 0.0, reference=types.optimum, source=types.optimum_source
        )
    grids = LP_GRIDS.get(name, LP_GRIDS_1D)
    for n_priors, n_scales in grids[:1] if config.quick else grids:
        priors, scales, weights = types.grid(n_priors, n_scales)
        lp = dm.optimal_menu_lp(priors, scales=scales, weights=weights, payoff=types.payoff_matrix)
        # The learned menu and the closed form on the LP's own grid, for an exact comparison.
        on_grid = {"lp_optimum": lp.revenue}
        for label, m in (("learned_menu", menu), ("optimal", optimum)):
            if m is None:
                continue
            choice = np.asarray(
                m.choose(
                    jnp.asarray(priors, jnp.float32),
                    jnp.asarray(scales, jnp.float32),
                    types.payoff_matrix,
                )
            )
            on_grid[label] = float(weights @ np.append(np.asarray(m.prices), 0.0)[choice])
        grid_label = f"{n_priors}" + (f"x{n_scales}" if types.enlarged else "")
        records.append(
            make_record(
                **rec,
                mechanism=f"lp_grid_{grid_label}",
                metric="revenue",
                value=lp.revenue,
                n_samples=len(weights),
                wall_s=lp.wall_s,
                max_ic_violation=lp.max_ic_violation,
                max_obedience_violation=lp.max_obedience_violation,
                rounds=lp.rounds,
                n_ic_constraints=lp.n_ic_constraints,
                on_grid=on_grid,
                lp_prices=sorted({round(float(p), 4) for p in lp.prices}),
            )
        )
        print(
            f"[datamarket] {name}: LP on {grid_label} types {lp.revenue:.5f} (same grid: {on_grid})"
        )
    _plot_menu(name, types, menu, optimum, out / f"menu_{name}.png")
    print(
        f"[datamarket] {name}: learned {est['revenue']} with {len(extra['prices'])} items; "
        f"optimum {types.optimum}"
    )
    return records


# --------------------------------------------------------------------------------------------------
# Several buyers.


def _plot_market(name: str, setting: dm.MarketSetting, learned, optimum, path: Path) -> None:
    """Buyer 0's chance of acting correctly (and payment) over the value profiles."""
    lo = [float(setting.marginal(i).icdf(jnp.asarray(0.0))) for i in range(2)]
    hi = [float(setting.marginal(i).icdf(jnp.asarray(0.99))) for i in range(2)]
    res = 101
    a = np.linspace(lo[0], hi[0], res, dtype=np.float32)
    b = np.linspace(lo[1], hi[1], res, dtype=np.float32)
    aa, bb = np.meshgrid(a, b)
    n = setting.n_buyers
    rest = [float(setting.marginal(i).icdf(jnp.asarray(0.5))) for i in range(2, n)]
    cols = [aa.ravel(), bb.ravel(), *[np.full(aa.size, r, np.float32) for r in rest]]
    bids = jnp.asarray(np.stack(cols, -1)[..., None])
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    for row, (label, mech) in enumerate((("learned", learned), ("optimal", optimum))):
        out = jax.jit(mech.market_outcome)(bids)
        x = np.asarray(dm.market_gains(out.experiments, setting)["x"][:, 0]).reshape(res, res)
        pay = np.asarray(out.pay[:, 0]).reshape(res, res)
        for col, (z, title, cmap) in enumerate(
            ((x, "P(buyer 0 acts correctly)", "viridis"), (pay, "payment of buyer 0", "magma"))
        ):
            im = axes[row, col].imshow(
                z,
                origin="lower",
                extent=(a[0], a[-1], b[0], b[-1]),
                aspect="auto",
                cmap=cmap,
                vmin=0 if col == 0 else None,
                vmax=1 if col == 0 else None,
            )
            fig.colorbar(im, ax=axes[row, col])
            axes[row, col].set_title(f"{label}: {title}")
            axes[row, col].set_xlabel("v_0")
            axes[row, col].set_ylabel("v_1")
    fig.suptitle(name + (" (others at their medians)" if n > 2 else ""))
    save_figure(fig, str(path))


def _run_market(name: str, config: DataMarketBenchConfig, out: Path) -> list[dict[str, Any]]:
    setting = dm.MARKET_SETTINGS[name]
    rec: dict[str, Any] = {"suite": SUITE, "setting": name, "seed": config.seed}
    records: list[dict[str, Any]] = []
    ckpt = Path(config.checkpoints_dir) / f"datamarket_{name}"
    steps, recipe = QUICK_MARKET if config.quick else (MARKET_STEPS, market_recipe(setting))
    t0 = time.perf_counter()
    if config.pretrained:
        model, _, meta = dm.load_market(ckpt, setting)
        train_wall = float(meta.get("train_wall_s", float("nan")))
    else:
        model, result = dm.train_market(setting, recipe, _train_config(name, steps, config))
        # a resumed run reads its history back: the last line holds the whole training time
        train_wall = result.history[-1]["wall_s"] if result.history else result.wall_s
        dm.save_market(
            model,
            ckpt,
            config=recipe,
            step=steps,
            extra_meta={"train_wall_s": train_wall, "history": result.history},
        )
    search = RegretConfig.quick() if config.quick else STRONG_SEARCH
    est = dm.evaluate_market(
        model,
        setting,
        key=jax.random.key(config.seed + 1),
        n_samples=config.n_samples,
        regret_profiles=config.regret_profiles,
        regret_config=search,
    )
    records += _records(rec, "learned", est, time.perf_counter() - t0)
    records.append(
        make_record(
            **rec,
            mechanism="learned",
            metric="train_wall_s",
            value=train_wall,
            wall_s=train_wall,
            pretrained=config.pretrained,
        )
    )
    optimum = dm.ExPostOptimal(setting) if setting.incentive == "expost" else dm.BICOptimal(setting)
    t1 = time.perf_counter()
    est_opt = dm.evaluate_market(
        optimum,
        setting,
        key=jax.random.key(config.seed + 1),
        n_samples=config.n_samples,
        regret_profiles=config.optimum_regret_profiles,
        regret_config=search,
    )
    records += _records(
        rec,
        "optimal",
        est_opt,
        time.perf_counter() - t1,
        reference=setting.optimum,
        source=setting.optimum_source,
    )
    ratio = est["revenue"].value / est_opt["revenue"].value
    records.append(
        make_record(
            **rec, mechanism="learned", metric="revenue_vs_optimal", value=ratio, wall_s=0.0
        )
    )
    if setting.n_buyers >= 2:
        _plot_market(name, setting, model, optimum, out / f"market_{name}.png")
    print(
        f"[datamarket] {name}: learned {est['revenue']} (optimal {est_opt['revenue']}, "
        f"ratio {ratio:.4f}), regret {est['regret']}, obedience "
        f"{est['obedience_violation']}, IR {est['ir_violation']}"
    )
    return records


def run(config: DataMarketBenchConfig) -> list[dict[str, Any]]:
    """Run the suite; returns the records it wrote."""
    if config.quick:
        config = _quick(config)
    for name in config.settings:
        dm.get_setting(name)  # unknown names fail before any work
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for name in config.settings:
        if name in dm.SINGLE_BUYER_SETTINGS:
            records += _run_single(name, config, out)
        else:
            records += _run_market(name, config, out)
        write_json(records, out / "datamarket.json")
    (out / "datamarket.md").write_text(markdown_table(records, metrics=METRICS) + "\n")
    return records
