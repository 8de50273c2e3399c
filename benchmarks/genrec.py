"""GEM-Rec suite: semantic IDs, the sequence model, bid-aware decoding and the baselines.

``python -m benchmarks genrec`` (ML-100k) or ``python -m benchmarks genrec --quick`` (synthetic).

One run: item texts -> MiniLM embeddings -> RQ-VAE semantic IDs (codebook usage) -> the simulated
ad market and the leave-one-out split -> GEM-Rec's encoder-decoder and SASRec trained on the same
training targets (or, with ``--pretrained``, the committed checkpoints) and the popularity
ranking -> on the test targets: the lambda sweep (relevance total / organic / ad, ad rate, revenue
under first price and Myerson, advertiser welfare), its revenue-relevance frontier plot, the bid
shock (a share of the ads bid ``factor`` times more; the high-value share of shown ads), and the
decoding throughput at beam 10 with compile time apart. Every number is a mean over test users
with its standard error; the flag draws are common to all lambdas, so changes are paired.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import genrec
from benchmarks.common import TABLE_METRICS, make_record, markdown_table, read_json, write_json
from diffecon.evaluation import mean_estimate
from diffecon.plotting import save_figure
from diffecon.training import TrainConfig

SUITE = "genrec"
METRICS = TABLE_METRICS[SUITE]


@dataclasses.dataclass(frozen=True)
class GenRecBenchConfig:
    """Options of the GEM-Rec suite.

    Attributes:
      pretrained: load the committed RQ-VAE, GEM-Rec and SASRec checkpoints instead of training.
      quick: a smoke run on synthetic data with tiny models (checkpoints under ``out``).
      lambdas: bid weights of the sweep.
      shock_lambdas: bid weights of the bid-shock scenario.
      shock_share: share of the ads whose bids are multiplied in the shock.
      shock_factor: the multiplier.
      rqvae_steps: RQ-VAE training steps.
      gemrec_steps: sequence-model training steps.
      sasrec_steps: SASRec training steps.
      beam: beam width (lists of this length; Recall/NDCG up to @10).
      search_width: width of the organic beam search behind the lists (>= ``beam``); throughput
        is timed at both ``beam`` and this width.
      exclude_seen: rank only items the user has not been shown before the target (the usual
        full-ranking protocol, e.g. RecBole's), for every model alike.
      timing_repeats: timed decodes of all test users (the median is reported).
      seed: seeds training, the market and the flag draws.
      pool: folders of other runs of this suite (e.g. other seeds) whose ``genrec.json`` is
        pooled with this run's paired organic comparison (``pooled_*`` rows).
      out: output folder.
      checkpoints_dir: committed checkpoints (``genrec_*``).
    """

    pretrained: bool = False
    quick: bool = False
    lambdas: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
    shock_lambdas: tuple[float, ...] = (0.0, 0.5, 1.0)
    shock_share: float = 0.05
    shock_factor: float = 10.0
    rqvae_steps: int = 3000
    gemrec_steps: int = 3000
    sasrec_steps: int = 3000
    beam: int = 10
    search_width: int = 40
    exclude_seen: bool = True
    timing_repeats: int = 5
    seed: int = 0
    pool: tuple[str, ...] = ()
    out: str = "out/genrec"
    checkpoints_dir: str = "benchmarks/results/checkpoints"


@dataclasses.dataclass(frozen=True)
class _Recipe:
    rqvae: genrec.RQVAEConfig
    gemrec: genrec.GemRecConfig
    sasrec: genrec.SASRecConfig
    optim: genrec.SeqTrainConfig
    market: genrec.AdMarketConfig


FULL = _Recipe(
    rqvae=genrec.RQVAEConfig(),
    gemrec=genrec.GemRecConfig(),
    sasrec=genrec.SASRecConfig(),
    optim=genrec.SeqTrainConfig(),
    market=genrec.AdMarketConfig(),
)
QUICK = _Recipe(
    rqvae=genrec.RQVAEConfig(input_dim=16, hidden=(32,), latent=8, codebook_size=8, batch_size=64),
    gemrec=genrec.GemRecConfig(
        codebook_size=8,
        d_model=32,
        heads=2,
        head_dim=16,
        mlp=64,
        encoder_layers=1,
        decoder_layers=1,
        history=8,
        user_buckets=64,
    ),
    sasrec=genrec.SASRecConfig(d_model=32, mlp=64, layers=1, history=8),
    optim=genrec.SeqTrainConfig(batch_size=64, learning_rate=3e-3, warmup_steps=10),
    market=genrec.AdMarketConfig(sponsored_fraction=0.4, prefix_depth=1),
)


def _quick(config: GenRecBenchConfig) -> GenRecBenchConfig:
    return dataclasses.replace(
        config,
        rqvae_steps=100,
        gemrec_steps=100,
        sasrec_steps=100,
        beam=10,
        search_width=12,
        timing_repeats=2,
        checkpoints_dir=(
            str(Path(config.out) / "checkpoints")
            if config.checkpoints_dir == GenRecBenchConfig.checkpoints_dir
            else config.checkpoints_dir
        ),
    )


def _train_config(steps: int, seed: int, name: str, quick: bool) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        seed=seed,
        steps_per_call=50,
        log_every=50 if quick else 500,
        run_name=name,
        progress=not quick,
    )


def _semantic_ids(config, recipe, data, ckpt: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Codes ``[items, D]`` (no collision token) and facts about the RQ-VAE."""
    c = recipe.rqvae
    if config.pretrained:
        like = genrec.RQVAE(c, rngs=nnx.Rngs(0))
        _, meta = genrec.load_model(like, ckpt)
        return np.asarray(meta["codes"], np.int32), meta
    t0 = time.perf_counter()
    if config.quick:
        embeddings = genrec.synthetic_embeddings(data, dim=c.input_dim, seed=config.seed)
    else:
        embeddings = genrec.embed_texts(list(data.texts))
    embed_s = time.perf_counter() - t0
    model, codes, result = genrec.train_rqvae(
        embeddings, c, _train_config(config.rqvae_steps, config.seed, "rqvae", config.quick)
    )
    meta = {
        "codes": codes.tolist(),
        "embed_wall_s": embed_s,
        "train_wall_s": result.wall_s,
        "history": result.history,
    }
    genrec.save_model(model, ckpt, meta=meta)
    return codes, meta


def _sequence_model(
    kind, config, recipe, split, codes, n_items, ckpt: Path
) -> tuple[Any, dict[str, Any]]:
    steps = config.gemrec_steps if kind == "gemrec" else config.sasrec_steps
    if config.pretrained:
        if kind == "gemrec":
            like: Any = genrec.GemRec(recipe.gemrec, rngs=nnx.Rngs(0))
        else:
            like = genrec.SASRec(recipe.sasrec, n_items, rngs=nnx.Rngs(0))
        return genrec.load_model(like, ckpt)
    train_config = _train_config(steps, config.seed, kind, config.quick)
    if kind == "gemrec":
        model, result = genrec.train_gemrec(split, codes, recipe.gemrec, recipe.optim, train_config)
    else:
        model, result = genrec.train_sasrec(
            split, n_items, recipe.sasrec, recipe.optim, train_config
        )
    meta = {"steps": steps, "train_wall_s": result.wall_s, "history": result.history}
    genrec.save_model(model, ckpt, meta=meta)
    return model, meta


def _shock(market: genrec.AdMarket, share: float, factor: float, seed: int):
    """The market with ``share`` of the ads bidding ``factor`` times more, and which ones."""
    rng = np.random.default_rng(seed + 1)
    ads = np.flatnonzero(market.sponsored)
    high = np.zeros_like(market.sponsored)
    high[rng.choice(ads, max(1, round(share * len(ads))), replace=False)] = True
    return market.with_bids(np.where(high, market.bids * factor, market.bids)), high


def run(config: GenRecBenchConfig) -> list[dict[str, Any]]:
    """Run the suite; returns the records it wrote."""
    if config.quick:
        config = _quick(config)
    recipe = QUICK if config.quick else FULL
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpts = Path(config.checkpoints_dir)
    t_start = time.perf_counter()
    records: list[dict[str, Any]] = []

    data = (
        genrec.synthetic_interactions(seed=config.seed)
        if config.quick
        else genrec.load_movielens_100k()
    )
    setting = data.name
    base = {"suite": SUITE, "setting": setting, "seed": config.seed}

    def record(mechanism: str, metric: str, value, stderr=0.0, n=0, **extra):
        records.append(
            make_record(
                **base,
                mechanism=mechanism,
                metric=metric,
                value=value,
                stderr=stderr,
                n_samples=n,
                wall_s=time.perf_counter() - t_start,
                pretrained=config.pretrained,
                **extra,
            )
        )

    def record_estimates(mechanism: str, estimates, **extra):
        for metric, est in estimates.items():
            record(mechanism, metric, est.value, est.stderr, est.n_samples, **extra)

    # semantic IDs
    raw_codes, rq_meta = _semantic_ids(config, recipe, data, ckpts / "genrec_rqvae")
    usage = genrec.codebook_usage(raw_codes, recipe.rqvae.codebook_size)
    record("rqvae", "codebook_usage", usage["usage"], n=len(raw_codes), **usage)
    record("rqvae", "unique_id_share", usage["unique_ids_share"], n=len(raw_codes))
    codes = genrec.add_collision_token(raw_codes)
    k = recipe.gemrec.codebook_size
    if codes.max() >= k:
        raise ValueError(
            f"{codes[:, -1].max() + 1} items share one ID; the collision level has {k}"
        )

    # market, log, split
    market_config = dataclasses.replace(recipe.market, seed=config.seed)
    market, log = genrec.simulate_ad_market(data, codes, market_config)
    split = genrec.split_leave_one_out(log)
    targets, target_is_ad = split.targets("test")
    record("market", "logged_ad_share", log.ad_share, n=int(sum(map(len, log.items))))
    record("market", "test_ad_share", float(target_is_ad.mean()), n=split.n_users)

    # models
    gemrec_model, g_meta = _sequence_model(
        "gemrec", config, recipe, split, codes, data.n_items, ckpts / "genrec_gemrec"
    )
    sasrec_model, s_meta = _sequence_model(
        "sasrec", config, recipe, split, codes, data.n_items, ckpts / "genrec_sasrec"
    )
    record("rqvae", "train_wall_s", rq_meta.get("train_wall_s", float("nan")))
    record("gemrec", "train_wall_s", g_meta.get("train_wall_s", float("nan")))
    record("sasrec", "train_wall_s", s_meta.get("train_wall_s", float("nan")))

    # baselines
    def seen_items(which: str):
        return split.seen(which, data.n_items) if config.exclude_seen else None

    def baseline_rankings(which: str, exclude) -> dict[str, np.ndarray]:
        popular = genrec.popularity_ranking(split, data.n_items, k=config.beam, exclude=exclude)
        return {
            "sasrec": genrec.sasrec_ranking(
                sasrec_model, split, which, k=config.beam, exclude=exclude
            ),
            "popularity": np.broadcast_to(popular, (split.n_users, config.beam)),
        }

    seen = seen_items("test")
    test_rankings = baseline_rankings("test", seen)
    for name, ranked in test_rankings.items():
        per_user = genrec.ranking_metrics(ranked, targets)
        per_user["ndcg10_organic"] = np.where(target_is_ad, np.nan, per_user["ndcg10"])
        record_estimates(name, genrec.summarize(per_user))

    # GEM-Rec decoding
    trie = genrec.build_trie(codes, market.sponsored, codebook_size=k)
    h = recipe.gemrec.history
    inputs = genrec.gemrec_inputs(split, codes, history=h, codebook_size=k)
    col = split.target_column("test")
    users = jnp.arange(split.n_users)
    history = jnp.asarray(inputs[:, col : col + h])
    uniform = jax.random.uniform(jax.random.key(config.seed + 7), (split.n_users,))
    exclude = None if seen is None else jnp.asarray(seen)
    graphdef, params = nnx.split(gemrec_model)

    def decode_fn(params, users, history, bids, uniform, lam, width=config.search_width):
        return genrec.bid_aware_beam_search(
            nnx.merge(graphdef, params),
            users,
            history,
            bids,
            uniform,
            trie=trie,
            lam=lam,
            beam=config.beam,
            exclude=exclude,
            width=width,
        )

    def auction_fn(params, users, history, bids, lam):
        return genrec.ad_auction(
            nnx.merge(graphdef, params),
            users,
            history,
            bids,
            trie=trie,
            lam=lam,
            bisection_steps=20,
            exclude=exclude,
        )

    decode = jax.jit(decode_fn)
    auction = jax.jit(auction_fn)

    def evaluate(bid_vector: np.ndarray, lam: float, high=None):
        bids = jnp.broadcast_to(jnp.asarray(bid_vector), (split.n_users, data.n_items))
        out = decode(params, users, history, bids, uniform, lam)
        pay = auction(params, users, history, bids, lam)
        is_ad = np.asarray(out.is_ad)
        items = np.asarray(out.items)
        per_user = genrec.ranking_metrics(items, targets)
        per_user["ndcg10_organic"] = np.where(is_ad, np.nan, per_user["ndcg10"])
        per_user["ndcg10_ad"] = np.where(is_ad, per_user["ndcg10"], np.nan)
        per_user.update(
            genrec.market_metrics(
                is_ad=is_ad,
                shown_ad=items[:, 0],
                bids=bid_vector,
                values=bid_vector,
                charge_first_price=bid_vector[np.maximum(items[:, 0], 0)],
                charge_myerson=np.asarray(pay.myerson_charge),
                high_value=high,
            )
        )
        # the auction re-runs the <AD> search: its winner must be the ad the decode shows
        per_user["auction_mismatch"] = (is_ad & (np.asarray(pay.ad) != items[:, 0])).astype(float)
        return per_user

    # paired with the baselines on the same users (organic targets): GEM-Rec decoding under
    # <ORG> (lambda-free, TIGER's constrained beam search); validation targets too, since one
    # split's comparison moves by more than its SE from one training run to the next
    @jax.jit
    def organic_decode(params, users, history, exclude):
        n = users.shape[0]
        return genrec.constrained_beam_search(
            nnx.merge(graphdef, params),
            users,
            history,
            jnp.zeros(n),
            trie=trie,
            beam=config.beam,
            flag=jnp.zeros(n, bool),
            exclude=exclude,
            width=config.search_width,
        )

    for which in ("test", "valid"):
        w_targets, w_is_ad = split.targets(which)
        w_col = split.target_column(which)
        w_seen = seen if which == "test" else seen_items(which)
        organic = ~w_is_ad
        decoded = organic_decode(
            params,
            users,
            jnp.asarray(inputs[:, w_col : w_col + h]),
            None if w_seen is None else jnp.asarray(w_seen),
        )
        ours = genrec.ranking_metrics(np.asarray(decoded.items), w_targets)["ndcg10"][organic]
        theirs = test_rankings if which == "test" else baseline_rankings(which, w_seen)
        suffix = "" if which == "test" else "_valid"
        record_estimates(
            f"gemrec_organic{suffix}", {"ndcg10_organic": mean_estimate(ours)}, targets=which
        )
        for name, ranked in theirs.items():
            ndcg = genrec.ranking_metrics(ranked, w_targets)["ndcg10"][organic]
            mech = f"gemrec_organic_vs_{name}{suffix}"
            if which == "valid":
                record_estimates(
                    f"{name}{suffix}", {"ndcg10_organic": mean_estimate(ndcg)}, targets=which
                )
            diff = mean_estimate(ours - ndcg)
            record(
                mech, "ndcg10_difference", diff.value, diff.stderr, diff.n_samples, targets=which
            )
            record(
                mech,
                "ndcg10_ratio",
                float(ours.mean() / ndcg.mean()),
                n=int(organic.sum()),
                targets=which,
            )

    sweep: dict[float, dict[str, np.ndarray]] = {}
    for lam in config.lambdas:
        sweep[lam] = evaluate(market.bids, lam)
        record_estimates(f"gemrec_lambda_{lam:g}", genrec.summarize(sweep[lam]), lam=lam)
    base_lam = min(config.lambdas)
    for lam in config.lambdas:
        if lam == base_lam:
            continue
        change = mean_estimate(sweep[lam]["ndcg10"] - sweep[base_lam]["ndcg10"])
        record(
            f"gemrec_lambda_{lam:g}",
            "ndcg10_change_vs_lambda0",
            change.value,
            change.stderr,
            change.n_samples,
        )
        rev0 = sweep[base_lam]["revenue_first_price"].mean()
        if rev0 > 0:
            record(
                f"gemrec_lambda_{lam:g}",
                "revenue_ratio_vs_lambda0",
                sweep[lam]["revenue_first_price"].mean() / rev0,
                n=split.n_users,
            )

    # bid shock
    shocked, high = _shock(market, config.shock_share, config.shock_factor, config.seed)
    shock: dict[float, dict[str, np.ndarray]] = {}
    for lam in config.shock_lambdas:
        shock[lam] = evaluate(shocked.bids, lam, high)
        record_estimates(
            f"gemrec_shock_lambda_{lam:g}", genrec.summarize(shock[lam]), lam=lam, shock=True
        )
    s0 = min(config.shock_lambdas)
    for lam in config.shock_lambdas:
        rev0 = shock[s0]["revenue_first_price"].mean()
        if lam != s0 and rev0 > 0:
            record(
                f"gemrec_shock_lambda_{lam:g}",
                "revenue_ratio_vs_lambda0",
                shock[lam]["revenue_first_price"].mean() / rev0,
                n=split.n_users,
            )

    # throughput: compile apart, then the median of timed decodes of all test users, at the
    # spec's beam (search width = beam) and at the width the quality numbers use
    bids = jnp.broadcast_to(jnp.asarray(market.bids), (split.n_users, data.n_items))
    for width in sorted({config.beam, config.search_width}):
        t0 = time.perf_counter()
        fresh = jax.jit(lambda *args, w=width: decode_fn(*args, width=w))  # nothing cached
        compiled = fresh.lower(params, users, history, bids, uniform, 1.0).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(compiled(params, users, history, bids, uniform, 1.0))
        times = []
        for _ in range(config.timing_repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(params, users, history, bids, uniform, 1.0))
            times.append(time.perf_counter() - t0)
        mech = "gemrec_decode" if width == config.beam else f"gemrec_decode_width_{width}"
        facts = {"beam": config.beam, "search_width": width, "batch": split.n_users}
        median = float(np.median(times))
        record(
            mech,
            "users_per_s",
            split.n_users / median,
            n=config.timing_repeats,
            times_s=times,
            **facts,
        )
        record(mech, "compile_s", compile_s, **facts)

    if config.pool:
        others = [read_json(Path(folder) / "genrec.json") for folder in config.pool]
        for r in pooled_comparison([records, *others]):
            record(
                r["mechanism"], r["metric"], r["value"], r["stderr"], r["n_samples"], runs=r["runs"]
            )

    _plot_frontier(sweep, shock, out / "genrec_frontier.png", setting)
    write_json(records, out / "genrec.json")
    (out / "genrec.md").write_text(markdown_table(records, metrics=METRICS) + "\n")
    _print_summary(records)
    return records


def pooled_comparison(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Pool the paired organic comparison of independent runs (e.g. seeds) of this suite.

    For each baseline and target set: the mean over runs of the paired NDCG@10 difference (SE
    ``sqrt(sum SE_r^2) / runs``, the runs being independent) and the ratio of GEM-Rec's summed
    per-run means to the baseline's. Returns bare ``mechanism/metric/value/stderr/n_samples/runs``
    dicts.

    Raises:
      ValueError: fewer than two runs, runs of different settings, a run seeded like another, or
        a run without the paired rows.
    """
    if len(runs) < 2:
        raise ValueError(f"pooling needs at least two runs, got {len(runs)}")
    tables = [{(r["mechanism"], r["metric"]): r for r in run} for run in runs]
    settings = {r["setting"] for run in runs for r in run}
    if len(settings) != 1:
        raise ValueError(f"runs of different settings cannot be pooled: {sorted(settings)}")
    seeds = [run[0]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"runs share a seed, so they are not independent: {seeds}")
    out = []
    for suffix in ("", "_valid"):
        for name in ("sasrec", "popularity"):
            keys = {
                "ours": (f"gemrec_organic{suffix}", "ndcg10_organic"),
                "theirs": (f"{name}{suffix}", "ndcg10_organic"),
                "diff": (f"gemrec_organic_vs_{name}{suffix}", "ndcg10_difference"),
            }
            for seed, table in zip(seeds, tables, strict=True):
                missing = [k for k in keys.values() if k not in table]
                if missing:
                    raise ValueError(f"run with seed {seed} lacks {missing}; rerun it")
            diffs = [t[keys["diff"]] for t in tables]
            n = len(runs)
            mech = f"pooled_gemrec_organic_vs_{name}{suffix}"
            out.append(
                {
                    "mechanism": mech,
                    "metric": "ndcg10_difference",
                    "value": float(np.mean([d["value"] for d in diffs])),
                    "stderr": float(np.sqrt(sum(d["stderr"] ** 2 for d in diffs)) / n),
                    "n_samples": int(sum(d["n_samples"] for d in diffs)),
                    "runs": seeds,
                }
            )
            ours = sum(t[keys["ours"]]["value"] for t in tables)
            theirs = sum(t[keys["theirs"]]["value"] for t in tables)
            out.append(
                {
                    "mechanism": mech,
                    "metric": "ndcg10_ratio",
                    "value": float(ours / theirs),
                    "stderr": 0.0,
                    "n_samples": int(sum(d["n_samples"] for d in diffs)),
                    "runs": seeds,
                }
            )
    return out


def _plot_frontier(sweep, shock, path: Path, setting: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, runs, title in ((axes[0], sweep, "bids as logged"), (axes[1], shock, "bid shock")):
        lams = sorted(runs)
        ndcg = [mean_estimate(runs[lam]["ndcg10"]) for lam in lams]
        rev = [mean_estimate(runs[lam]["revenue_first_price"]) for lam in lams]
        ax.errorbar(
            [r.value for r in rev],
            [n.value for n in ndcg],
            xerr=[r.stderr for r in rev],
            yerr=[n.stderr for n in ndcg],
            marker="o",
            capsize=3,
        )
        for lam, r, n in zip(lams, rev, ndcg, strict=True):
            ax.annotate(f"λ={lam:g}", (r.value, n.value), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("revenue per user (first price)")
        ax.set_ylabel("total NDCG@10")
        ax.set_title(f"GEM-Rec on {setting}: {title}")
        ax.grid(alpha=0.3)
    save_figure(fig, str(path))


def _print_summary(records) -> None:
    by = {(r["mechanism"], r["metric"]): r for r in records}
    for (mech, metric), r in by.items():
        if metric in (
            "ndcg10",
            "ndcg10_organic",
            "revenue_first_price",
            "high_value_share",
            "revenue_ratio_vs_lambda0",
            "ndcg10_change_vs_lambda0",
            "ndcg10_difference",
            "ndcg10_ratio",
            "users_per_s",
            "compile_s",
            "codebook_usage",
        ):
            print(f"[genrec] {mech:28s} {metric:26s} {r['value']:.4f} ± {r['stderr']:.2g}")
