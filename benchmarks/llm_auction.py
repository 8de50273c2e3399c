"""llm_auction suite: payments, monotonicity, regret, the committed LMs, the bid sweep, speed.

``python -m benchmarks llm_auction`` (``--quick`` for a smoke run)

* race payments: realised second-price payments averaged over ``mc_draws`` races against the
  race's closed form (and the linear rule's TV envelope formula), for several bid vectors and
  agent counts; payments non-decreasing in the own bid and zero at a zero bid;
* monotonicity: the share of ``monotonicity_cases`` random cases on which each rule passes each
  property (:func:`llm_auction.monotonicity_report`);
* regret of misreported bids under each payment rule and valuation (the core's regret search);
* the committed LMs' held-out bits per character (Hamlet, both editions);
* the bid sweep mirroring the paper's demonstration: the modern-spelling and First Folio agents
  bid for shares of one text; per share and rule, each agent's log-likelihood of the output,
  payments, example generations, and a plot;
* speed: tokens per second against the number of agents, and the auction's overhead over
  sampling with the same forward passes but no aggregation or payments.

Writes ``llm_auction.json`` (records), ``llm_auction.md`` (tables and generations) and
``sweep.png`` into ``--out``.
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

from benchmarks.common import (
    TABLE_METRICS,
    fmt,
    make_record,
    markdown_table,
    read_json,
    write_json,
)
from diffecon import mean_estimate
from diffecon.plotting import save_figure
from diffecon.regret import RegretConfig, regret_search, regret_stats
from llm_auction import (
    AuctionConfig,
    PositionAuction,
    TransformerLM,
    agent_log_probs,
    bid_setting,
    decode,
    draw_race,
    envelope_expected_payments,
    format_report,
    generate,
    linear_expected_payments,
    load_lm,
    log_likelihoods,
    make_agents,
    monotonicity_report,
    myerson_payments,
    race,
    race_expected_payments,
)
from llm_auction.corpus import EDITIONS, corpus_tokens
from llm_auction.generate import Payment, _auction_step
from llm_auction.train import bits_per_char

SUITE = "llm_auction"
METRICS = TABLE_METRICS[SUITE]
AGENTS = ("modern", "folio")
PAYMENT_CASES: tuple[tuple[float, ...], ...] = (
    (1.0, 1.0),
    (0.3, 2.0),
    (1.0, 2.0, 3.0),
    (0.5, 4.0, 1.0, 2.0),
    (1.0, 0.2, 3.0, 0.7, 1.5),
)
REGRET_CASES = (
    ("linear", "race", "token_change"),
    ("linear", "envelope", "tv"),
    ("linear", "myerson", "kl"),
    ("linear", "envelope", "kl"),
    ("linear", "myerson", "tv"),
    ("linear", "first_price", "tv"),
    ("log_linear", "envelope", "tv"),
    ("log_linear", "myerson", "kl"),
    ("log_linear", "first_price", "tv"),
)


PARTS = ("payments", "monotonicity", "lm", "sweep", "speed", "regret")


@dataclasses.dataclass(frozen=True)
class LLMAuctionBenchConfig:
    """Options of the llm_auction suite.

    Attributes:
      quick: a smoke run (small samples, short texts).
      seed: seeds every part.
      out: output folder.
      checkpoints_dir: where ``llm_auction_{base,modern,folio}`` are.
      mc_draws: races per bid vector for the realised payments.
      monotonicity_cases: random cases per rule.
      regret_profiles: value profiles of the regret search.
      regret_agents: agent counts of the regret search.
      eval_chars: held-out characters scored for bits per character.
      query: the shared text both agents continue.
      shares: the modern agent's bid shares of the sweep.
      sweep_samples: generations per share and rule.
      max_new_tokens: length of each generation.
      speed_agents: agent counts timed.
      speed_repeats: timed runs per count (the fastest is kept; auction and no-auction runs
        alternate, so both see the same machine load).
      parts: which parts to run; records of a partial run replace the same records in an
        existing ``llm_auction.json`` in ``out``.
    """

    quick: bool = False
    seed: int = 0
    out: str = "out/llm_auction"
    checkpoints_dir: str = "benchmarks/results/checkpoints"
    mc_draws: int = 100_000
    monotonicity_cases: int = 10_000
    regret_profiles: int = 100
    regret_agents: tuple[int, ...] = (2, 3)
    eval_chars: int = 60_000
    query: str = "My lord, "
    shares: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    sweep_samples: int = 32
    max_new_tokens: int = 96
    speed_agents: tuple[int, ...] = (1, 2, 4, 8)
    speed_repeats: int = 20
    parts: tuple[str, ...] = PARTS


def _quick(config: LLMAuctionBenchConfig) -> LLMAuctionBenchConfig:
    return dataclasses.replace(
        config,
        mc_draws=20_000,
        monotonicity_cases=500,
        regret_profiles=8,
        regret_agents=(2,),
        eval_chars=3_000,
        shares=(0.0, 0.5, 1.0),
        sweep_samples=2,
        max_new_tokens=16,
        speed_agents=(1, 2),
        speed_repeats=2,
    )


def _distributions(key, n, vocab=16):
    conc = jnp.exp(jax.random.uniform(jax.random.fold_in(key, 1), (n, 1), minval=-2.0, maxval=0.5))
    return jax.random.dirichlet(key, jnp.broadcast_to(conc, (n, vocab)))


def _payments(config, rec) -> list[dict[str, Any]]:
    records = []
    for c, case in enumerate(PAYMENT_CASES):
        t0 = time.perf_counter()
        bids = jnp.asarray(case)
        n = bids.shape[0]
        probs = _distributions(jax.random.key(config.seed * 1000 + c), n)

        def one(k, probs=probs, bids=bids):
            return race(probs, bids, draw_race(k, bids.shape[0])).payments

        keys = jax.random.split(jax.random.key(config.seed + 100 + c), config.mc_draws)
        pays = np.asarray(jax.jit(jax.vmap(one))(keys))
        closed = np.asarray(race_expected_payments(probs, bids))
        tv = np.asarray(linear_expected_payments(probs, bids))
        wall = time.perf_counter() - t0
        label = f"race payment, n={n}, bids={case}"
        for i in range(n):
            est = mean_estimate(pays[:, i])
            z = (est.value - closed[i]) / est.stderr if est.stderr > 0 else 0.0
            records.append(
                make_record(
                    **rec,
                    setting=label,
                    mechanism=f"agent {i}: realised vs race closed form",
                    metric="value",
                    value=est.value,
                    stderr=est.stderr,
                    n_samples=est.n_samples,
                    wall_s=wall,
                )
            )
            for metric, value in (("reference", closed[i]), ("z_score", z)):
                records.append(
                    make_record(
                        **rec,
                        setting=label,
                        mechanism=f"agent {i}: realised vs race closed form",
                        metric=metric,
                        value=value,
                        n_samples=est.n_samples,
                        wall_s=wall,
                    )
                )
            records.append(
                make_record(
                    **rec,
                    setting=label,
                    mechanism=f"agent {i}: TV envelope formula vs race closed form",
                    metric="value",
                    value=tv[i],
                    wall_s=wall,
                )
            )
    # monotone in the own bid, zero at zero, on random cases
    t0 = time.perf_counter()
    xs = jnp.concatenate([jnp.zeros(1), jnp.logspace(-3, 2, 30)])
    n_cases = 20 if config.quick else 200
    kinds = {
        "race (expected)": lambda lp, b: race_expected_payments(jnp.exp(lp), b)[0],
        "envelope linear": lambda lp, b: envelope_expected_payments(lp, b, nodes=48)[0],
        "envelope log-linear": lambda lp, b: envelope_expected_payments(
            lp, b, rule="log_linear", nodes=48
        )[0],
        "myerson linear (KL)": lambda lp, b: myerson_payments(lp, b, nodes=48)[0],
    }
    for name, fn in kinds.items():

        def curve(key, fn=fn):
            lp = jnp.log(_distributions(key, 3, 8))
            others = jnp.exp(jax.random.normal(jax.random.fold_in(key, 2), (2,)))
            z = jax.vmap(lambda x: fn(lp, jnp.concatenate([x[None], others])))(xs)
            ok = (z[0] == 0.0) & jnp.all(jnp.diff(z) >= -1e-6 * (1.0 + z[1:]))
            return ok

        keys = jax.random.split(jax.random.key(config.seed + 7), n_cases)
        ok = np.asarray(jax.jit(jax.vmap(curve))(keys))
        records.append(
            make_record(
                **rec,
                setting="payment non-decreasing in own bid and 0 at 0 (share of cases)",
                mechanism=name,
                metric="value",
                value=float(ok.mean()),
                n_samples=n_cases,
                wall_s=time.perf_counter() - t0,
            )
        )
    return records


def _monotonicity(config, rec) -> tuple[list[dict[str, Any]], str]:
    t0 = time.perf_counter()
    report = monotonicity_report(
        key=jax.random.key(config.seed + 11), n_cases=config.monotonicity_cases
    )
    wall = time.perf_counter() - t0
    records = [
        make_record(
            **rec,
            setting=f"monotonicity {prop}: share of cases passing",
            mechanism=rule,
            metric="value",
            value=r["pass_rate"],
            n_samples=int(r["n_cases"]),
            wall_s=wall,
            worst_violation=r["worst"],
        )
        for rule, props in report.items()
        for prop, r in props.items()
    ]
    return records, format_report(report)


def _regret(config, rec) -> list[dict[str, Any]]:
    records = []
    search = RegretConfig.quick() if config.quick else RegretConfig(n_starts=20, steps=100)
    for n in config.regret_agents:
        setting = bid_setting(n)
        lp = jnp.log(_distributions(jax.random.key(config.seed + 20 + n), n))
        values = setting.sample(jax.random.key(config.seed + 30 + n), (config.regret_profiles,))
        for rule, payment, valuation in REGRET_CASES[: 2 if config.quick else None]:
            t0 = time.perf_counter()
            mech = PositionAuction(lp, rule=rule, payment=payment, valuation=valuation)
            res = regret_search(
                mech,
                values,
                key=jax.random.key(config.seed + 40 + n),
                setting=setting,
                config=search,
                progress=False,
            )
            stats = regret_stats(res)
            for metric in ("regret_mean", "regret_max"):
                value, se = stats[metric]
                records.append(
                    make_record(
                        **rec,
                        setting=f"{metric}, n={n} agents, values U[0,1]",
                        mechanism=f"{rule} rule, {payment} payments, {valuation} valuation",
                        metric="value",
                        value=value,
                        stderr=se,
                        n_samples=config.regret_profiles,
                        wall_s=time.perf_counter() - t0,
                    )
                )
            print(
                f"[llm_auction] regret n={n} {rule}/{payment}/{valuation}: {stats['regret_mean']}"
            )
    return records


def _load_agents(config):
    models = {}
    for name in ("base", *AGENTS):
        models[name] = load_lm(Path(config.checkpoints_dir) / f"llm_auction_{name}")
    return models


def _lm_records(config, rec, models) -> list[dict[str, Any]]:
    records = []
    for edition in EDITIONS:
        tokens = corpus_tokens((edition,), "held_out")[: config.eval_chars]
        for name, (model, meta) in models.items():
            t0 = time.perf_counter()
            bpc = bits_per_char(model, tokens)
            records.append(
                make_record(
                    **rec,
                    setting=f"held-out bits/char, Hamlet ({edition} spelling)",
                    mechanism=f"{name} LM",
                    metric="value",
                    value=bpc,
                    n_samples=len(tokens),
                    wall_s=time.perf_counter() - t0,
                    train_wall_s=meta.get("train_wall_s"),
                )
            )
    return records


def _sweep(config, rec, models) -> tuple[list[dict[str, Any]], str, Any]:
    records, rows = [], []
    modern, _ = models["modern"]
    wrapper, p_modern = TransformerLM.of(modern)
    _, p_folio = TransformerLM.of(models["folio"][0])
    agents = make_agents(wrapper, [p_modern, p_folio], ["", ""])
    keys = jax.random.split(jax.random.key(config.seed + 50), config.sweep_samples)
    curves: dict[str, dict[str, list]] = {}
    sweeps: tuple[tuple[str, Payment], ...] = (("linear", "race"), ("log_linear", "envelope"))
    for rule, payment in sweeps:
        auction = AuctionConfig(
            rule=rule, payment=payment, max_new_tokens=config.max_new_tokens, end_token=None
        )
        curve = curves.setdefault(rule, {"share": [], "ll": [], "se": [], "pay": []})
        for share in config.shares:
            t0 = time.perf_counter()
            bids = [share, 1.0 - share]
            trace = generate(agents, bids, config.query, key=keys, config=auction)
            ll = np.asarray(log_likelihoods(trace)) / np.asarray(trace.alive.sum(-1))[:, None]
            pay = np.asarray(trace.total_payments)
            wall = time.perf_counter() - t0
            curve["share"].append(share)
            curve["ll"].append(ll.mean(0))
            curve["se"].append(ll.std(0, ddof=1) / np.sqrt(len(ll)) if len(ll) > 1 else 0 * ll[0])
            curve["pay"].append(pay.mean(0))
            label = f"sweep {rule} rule ({payment} payments), modern bid share {share:g}"
            for a, agent in enumerate(AGENTS):
                for what, arr in (("log-likelihood/char", ll[:, a]), ("total payment", pay[:, a])):
                    est = mean_estimate(arr) if len(arr) > 1 else None
                    records.append(
                        make_record(
                            **rec,
                            setting=label,
                            mechanism=f"{agent} agent: {what}",
                            metric="value",
                            value=float(arr.mean()),
                            stderr=est.stderr if est else 0.0,
                            n_samples=len(arr),
                            wall_s=wall,
                        )
                    )
            text = decode(np.asarray(trace.tokens[0]))
            rows.append(
                f"| {rule} | {share:g} | {ll[0, 0]:.3f} | {ll[0, 1]:.3f} | {pay[0, 0]:.3f} | "
                f"{pay[0, 1]:.3f} | `{_escape(config.query + text)}` |"
            )
        for a, agent in enumerate(AGENTS):
            own = np.array([s if a == 0 else 1 - s for s in curve["share"]])
            lls = np.array([x[a] for x in curve["ll"]])
            order = np.argsort(own)
            rising = bool(np.all(np.diff(lls[order]) > -2 * np.array(curve["se"])[order][1:, a]))
            spearman = float(
                np.corrcoef(np.argsort(np.argsort(own)), np.argsort(np.argsort(lls)))[0, 1]
            )
            for metric, value in (("value", float(rising)), ("reference", spearman)):
                records.append(
                    make_record(
                        **rec,
                        setting=f"sweep {rule} rule: log-likelihood rises with own bid share "
                        "(1 = yes; reference: rank correlation)",
                        mechanism=f"{agent} agent",
                        metric=metric,
                        value=value,
                        n_samples=len(own) * config.sweep_samples,
                        wall_s=0.0,
                    )
                )
    table = (
        "| rule | modern share | modern LL/char | folio LL/char | modern pays | folio pays | "
        "generation (sample 0) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for rule, curve in curves.items():
        ll, se = np.array(curve["ll"]), np.array(curve["se"])
        for a, agent in enumerate(AGENTS):
            style = "-" if rule == "linear" else "--"
            axes[0].errorbar(
                curve["share"],
                ll[:, a],
                yerr=2 * se[:, a],
                ls=style,
                marker="o",
                color=f"C{a}",
                label=f"{agent} agent, {rule}",
                capsize=3,
            )
            axes[1].plot(
                curve["share"],
                np.array(curve["pay"])[:, a],
                style,
                marker="o",
                color=f"C{a}",
                label=f"{agent} pays, {rule}",
            )
    axes[0].set_xlabel("modern agent's bid share")
    axes[0].set_ylabel("log-likelihood per character (nats, ± 2 SE)")
    axes[1].set_xlabel("modern agent's bid share")
    axes[1].set_ylabel("total payment per text (bid units)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Bid sweep: '{config.query}' continued by the modern and First Folio agents")
    return records, table, fig


def _escape(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|").replace("`", "'")


def _speed(config, rec, models) -> list[dict[str, Any]]:
    records = []
    wrapper, p_modern = TransformerLM.of(models["modern"][0])
    _, p_folio = TransformerLM.of(models["folio"][0])
    steps = 32 if config.quick else 96
    times: dict[tuple[int, bool], float] = {}
    for n in config.speed_agents:
        params = [p_modern if i % 2 == 0 else p_folio for i in range(n)]
        agents = make_agents(wrapper, params, [""] * n)
        bids = list(np.linspace(1.0, 2.0, n))
        key = jax.random.key(config.seed + 60)
        configs = {
            plain: AuctionConfig(max_new_tokens=steps, end_token=None, plain=plain)
            for plain in (False, True)
        }
        best = {False: np.inf, True: np.inf}
        for auction in configs.values():  # compile
            jax.block_until_ready(generate(agents, bids, "My lord, ", key=key, config=auction))
        for r in range(config.speed_repeats):
            for plain, auction in configs.items():
                t0 = time.perf_counter()
                out = generate(
                    agents, bids, "My lord, ", key=jax.random.fold_in(key, r), config=auction
                )
                jax.block_until_ready(out)
                best[plain] = min(best[plain], time.perf_counter() - t0)
        for plain in (False, True):
            times[(n, plain)] = best[plain]
            records.append(
                make_record(
                    **rec,
                    setting="speed: tokens per second (one text, prefill included)",
                    mechanism=f"{n} agents, "
                    + ("no auction (agent 0 samples)" if plain else "linear rule + race payments"),
                    metric="value",
                    value=steps / best[plain],
                    n_samples=config.speed_repeats,
                    wall_s=best[plain],
                )
            )
        fwd, auc = _component_times(
            agents, bids, steps=64 if config.quick else 1024, repeats=config.speed_repeats
        )
        for what, value in (
            ("per-token cost of the agents' forward passes (microseconds)", fwd * 1e6),
            ("per-token cost of aggregation + sampling + race payments (microseconds)", auc * 1e6),
            ("aggregation + payments cost / forward passes cost, per token", auc / fwd),
        ):
            records.append(
                make_record(
                    **rec,
                    setting=f"speed components: {what}",
                    mechanism=f"{n} agents",
                    metric="value",
                    value=value,
                    n_samples=config.speed_repeats,
                    wall_s=0.0,
                )
            )
    for n in config.speed_agents:
        overhead = (times[(n, False)] - times[(n, True)]) / times[(n, True)]
        records.append(
            make_record(
                **rec,
                setting="speed: aggregation + payments over the forward passes (fraction)",
                mechanism=f"{n} agents",
                metric="value",
                value=overhead,
                n_samples=config.speed_repeats,
                wall_s=times[(n, False)],
            )
        )
        print(
            f"[llm_auction] speed n={n}: {steps / times[(n, False)]:.1f} tok/s, "
            f"overhead {overhead:.3f}"
        )
    return records


def _merge(out: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records of a partial run replace the same records of the existing results file."""
    path = out / "llm_auction.json"
    if not path.is_file():
        return records
    new = {(r["setting"], r["mechanism"], r["metric"]) for r in records}
    old = [r for r in read_json(path) if (r["setting"], r["mechanism"], r["metric"]) not in new]
    return old + records


def _component_times(agents, bids, *, steps: int, repeats: int) -> tuple[float, float]:
    """Seconds per token of the agents' batched forward pass and of the auction step, each
    timed alone in a jitted ``lax.scan`` of ``steps`` steps (fastest of ``repeats``)."""
    model, n = agents.model, agents.n_agents
    forward = jax.vmap(model.forward, in_axes=(0, 0, 0, None, 0))
    caches = jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), model.init_cache())
    zeros = jnp.zeros(n, jnp.int32)
    auction = AuctionConfig()
    b = jnp.asarray(bids, jnp.float32)

    @jax.jit
    def forward_loop(params, caches):
        def body(carry, t):
            caches, token = carry
            logits, caches = forward(
                params, jnp.broadcast_to(token, (n, 1)), caches, t % model.max_len, zeros
            )
            return (caches, jnp.argmax(logits[0, -1]).astype(jnp.int32)), None

        return jax.lax.scan(body, (caches, jnp.int32(1)), jnp.arange(steps))[0][1]

    @jax.jit
    def auction_loop(logits, key):
        def body(logits, t):
            log_p = agent_log_probs(logits)
            draws = draw_race(jax.random.fold_in(key, t), n)
            token, _, _, pays = _auction_step(auction, False, log_p, b, draws, jnp.bool_(True))
            return logits.at[:, token].add(1e-6), pays

        return jax.lax.scan(body, logits, jnp.arange(steps))[1]

    logits = jax.random.normal(jax.random.key(0), (n, model.vocab_size))
    key = jax.random.key(1)
    best = [np.inf, np.inf]
    loops = ((forward_loop, (agents.params, caches)), (auction_loop, (logits, key)))
    for fn, args in loops:  # compile
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for slot, (fn, args) in enumerate(loops):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[slot] = min(best[slot], (time.perf_counter() - t0) / steps)
    return best[0], best[1]


def run(config: LLMAuctionBenchConfig) -> list[dict[str, Any]]:
    """Run the suite; returns the records it wrote."""
    if config.quick:
        config = _quick(config)
    unknown = set(config.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = set(config.parts) != set(PARTS)
    rec: dict[str, Any] = {"suite": SUITE, "seed": config.seed}
    models = _load_agents(config)  # fail early when the checkpoints are missing
    records: list[dict[str, Any]] = []

    def save():
        write_json(_merge(out, records) if partial else records, out / "llm_auction.json")

    if "payments" in config.parts:
        records += _payments(config, rec)
        save()
    if "monotonicity" in config.parts:
        mono_records, mono_table = _monotonicity(config, rec)
        records += mono_records
        (out / "monotonicity.md").write_text(mono_table)
        save()
    if "lm" in config.parts:
        records += _lm_records(config, rec, models)
        save()
    if "sweep" in config.parts:
        sweep_records, generations, fig = _sweep(config, rec, models)
        records += sweep_records
        save_figure(fig, str(out / "sweep.png"))
        (out / "generations.md").write_text(
            f"Bid sweep generations (query `{config.query}`)\n\n" + generations
        )
        save()
    if "speed" in config.parts:
        records += _speed(config, rec, models)
        save()
    if "regret" in config.parts:
        records += _regret(config, rec)
        save()
    everything = _merge(out, records) if partial else records
    (out / "llm_auction.md").write_text(markdown_table(everything, metrics=METRICS))
    print(f"[llm_auction] wrote {len(records)} records to {out}")
    return records


# --------------------------------------------------------------------------------------------------
# The README's summary (the full per-quantity table is ``llm_auction.md``).


def _by(records: list[dict[str, Any]], prefix: str) -> dict[tuple[str, str], dict[str, Any]]:
    """``(setting, mechanism) -> {metric: record}`` for the settings starting with ``prefix``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["setting"].startswith(prefix):
            out.setdefault((r["setting"], r["mechanism"]), {})[r["metric"]] = r
    return out


def _v(r: dict[str, Any], digits: int = 4) -> str:
    return f"{r['value']:.{digits}f}"


def readme_table(records: list[dict[str, Any]]) -> str:
    """A condensed Markdown table of the suite's records: one row per check, not per quantity.

    Race payments: one row per bid vector (every agent's realised mean +- SE, the race's closed
    form, the largest |z|, and the spec's TV formula); monotonicity and payment checks: one row per
    rule; held-out bits per character; the sweep's trend test; regret per payment rule and
    valuation at each agent count; speed per agent count. Rows whose records are absent (a run of
    some parts only) are left out.
    """
    rows: list[tuple[str, str, str]] = []
    race_rows: dict[str, list[dict[str, Any]]] = {}
    for (setting, mech), m in _by(records, "race payment").items():
        race_rows.setdefault(setting, []).append({"mech": mech, **m})
    for setting, items in race_rows.items():
        real = [x for x in items if "realised" in x["mech"]]
        tv = [x for x in items if "TV envelope" in x["mech"]]
        z = max(abs(x["z_score"]["value"]) for x in real) if real else float("nan")
        rows.append(
            (
                setting.replace("race payment, ", "race payments (10^5 races), "),
                ", ".join(fmt(x["value"]["value"], x["value"]["stderr"]) for x in real),
                "race closed form "
                + ", ".join(_v(x["reference"]) for x in real)
                + f" (max abs z {z:.2f}); spec's TV formula "
                + ", ".join(_v(x["value"]) for x in tv),
            )
        )
    mono = _by(records, "payment non-decreasing")
    if mono:
        rows.append(
            (
                "payments non-decreasing in own bid, 0 at 0 (share of cases)",
                ", ".join(f"{mech} {_v(m['value'], 3)}" for (_, mech), m in mono.items()),
                "1",
            )
        )
    by_rule: dict[tuple[str, int], list[str]] = {}
    for (setting, rule), m in _by(records, "monotonicity ").items():
        prop = setting.split()[1].rstrip(":")
        cases = int(m["value"].get("n_samples") or 0)
        by_rule.setdefault((rule, cases), []).append(f"{prop} {_v(m['value'], 3)}")
    for (rule, cases), props in by_rule.items():
        label = f"monotonicity, {rule} rule (share of {cases:,} random cases passing)"
        rows.append((label, ", ".join(props), ""))
    held_out: dict[str, list[str]] = {}
    for (setting, mech), m in _by(records, "held-out bits/char").items():
        held_out.setdefault(setting, []).append(f"{mech} {_v(m['value'], 3)}")
    for setting, cells in held_out.items():
        rows.append((setting, ", ".join(cells), ""))
    for (setting, agent), m in _by(records, "sweep").items():
        if "rises" in setting:
            rule = setting.split()[1]
            rows.append(
                (
                    f"sweep, {rule} rule: {agent}'s log-likelihood rises with its bid share",
                    "yes" if m["value"]["value"] == 1 else "no",
                    f"rank correlation {_v(m['reference'], 2)}",
                )
            )
    regret: dict[str, list[str]] = {}
    for (setting, mech), m in _by(records, "regret_mean").items():
        agents = setting.split(",")[1].strip()
        mx = _by(records, setting.replace("regret_mean", "regret_max")).get(
            (setting.replace("regret_mean", "regret_max"), mech), {}
        )
        cell = f"{agents}: {fmt(m['value']['value'], m['value']['stderr'])}"
        if "value" in mx:
            cell += f" (max {mx['value']['value']:.2g})"
        regret.setdefault(mech, []).append(cell)
    for mech, cells in regret.items():
        rows.append((f"regret of misreported bids, {mech}", "; ".join(cells), ""))
    speed: dict[str, dict[str, float]] = {}
    for (setting, mech), m in _by(records, "speed").items():
        n = mech.split()[0]
        key = "auction tok/s" if "race payments" in mech else "plain tok/s"
        if "fraction" in setting:
            key = "end-to-end overhead"
        elif "cost / forward" in setting:
            key = "component overhead"
        elif "tokens per second" not in setting:
            continue
        speed.setdefault(n, {})[key] = m["value"]["value"]
    nan = float("nan")
    for n, s in speed.items():
        parts = s.get("component overhead", nan), s.get("end-to-end overhead", nan)
        rows.append(
            (
                f"speed, {n} agent(s)",
                f"{s.get('auction tok/s', nan):.0f} tokens/s with the auction, "
                f"{s.get('plain tok/s', nan):.0f} without",
                f"aggregation + payments / forward passes: {parts[0]:.1%} (components timed "
                f"alone), {parts[1]:.1%} (end to end)",
            )
        )
    lines = ["| check | measured | reference |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"
