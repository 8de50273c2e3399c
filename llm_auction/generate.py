"""The token auction: per position, every agent's forward pass, aggregation, sampling, payments.

:func:`generate` runs the whole generation as one jitted ``lax.scan``. The agents' prompts (each
its own, left-padded) followed by the shared query are prefilled into per-agent key/value caches;
then at each position all agents' forward passes run as one ``vmap``-ed call (one batched pass
when agents share weights, stacked weights otherwise), their next-token distributions are
aggregated, the token is sampled and payments are charged. Generation stops at the end token or
after ``max_new_tokens``.

The :class:`Trace` keeps, per step, every agent's distribution, ``q``, the draws, the token, the
winner and the payments, so :func:`replay` can recompute tokens and payments without the LMs and
:func:`audit` can check that every race payment is the critical bid at which the token changes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int, Key

from llm_auction.aggregation import (
    RULES,
    AggregationRule,
    agent_log_probs,
    bid_weights,
    check_auction_inputs,
)
from llm_auction.lm import END_TOKEN, LanguageModel, encode
from llm_auction.payments import (
    RaceDraws,
    _envelope,
    _inverse_cdf,
    draw_race,
    kl_allocation,
    race,
    tv_allocation,
)

__all__ = [
    "Agents",
    "AuctionConfig",
    "Trace",
    "audit",
    "generate",
    "log_likelihoods",
    "make_agents",
    "replay",
]

Payment = Literal["race", "envelope", "myerson", "none"]


@dataclasses.dataclass(frozen=True)
class AuctionConfig:
    """How the auction generates and charges.

    Attributes:
      rule: a name in :data:`~llm_auction.aggregation.RULES` or an aggregation rule (hashable).
      payment: ``race`` (realised second-price payments; linear rule only), ``envelope``
        (expected payments, any rule), ``myerson`` (KL valuations) or ``none``.
      max_new_tokens: length limit.
      temperature: applied to each agent's logits before aggregation.
      top_k: applied to each agent's distribution before aggregation (``None``: off).
      end_token: generation stops after it (``None``: only the length limit).
      reference_weight: fixed weight of the reference agent, if the agents have one.
      myerson_loss: the KL loss of Myerson payments (``forward``: ``KL(p_i || q)``).
      quadrature_nodes: Gauss-Legendre nodes of expected payments.
      plain: the baseline without an auction: sample agent 0's own distribution, no aggregation
        and no payments (every agent's forward pass still runs).
    """

    rule: str | AggregationRule = "linear"
    payment: Payment = "race"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    end_token: int | None = END_TOKEN
    reference_weight: float = 0.0
    myerson_loss: Literal["forward", "reverse"] = "forward"
    quadrature_nodes: int = 32
    plain: bool = False

    def __post_init__(self):
        if isinstance(self.rule, str) and self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {list(RULES)}")
        if self.payment not in ("race", "envelope", "myerson", "none"):
            raise ValueError(f"unknown payment {self.payment!r}")
        if self.payment == "race" and self.rule != "linear" and not self.plain:
            raise ValueError(
                "race payments need the linear rule (the race samples from the mixture); use "
                "payment='envelope' or 'myerson' for other rules"
            )
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError(
                f"need max_new_tokens >= 1 and temperature > 0, got {self.max_new_tokens}, "
                f"{self.temperature}"
            )
        if not 0 <= self.reference_weight < 1:
            raise ValueError(f"reference_weight must be in [0, 1), got {self.reference_weight}")


@struct.dataclass
class Agents:
    """The bidding agents (and an optional reference agent, row 0) as one batched LM.

    Attributes:
      model: the shared :class:`~llm_auction.lm.LanguageModel`.
      params: ``[rows, ...]`` stacked params, or one set shared by every row.
      prompts: ``[rows, prompt_len]`` each row's own prompt, left-padded.
      prompt_lengths: ``[rows]`` unpadded prompt lengths.
      shared: whether ``params`` is one set for all rows.
      has_reference: whether row 0 is a reference agent (it does not bid).
    """

    model: Any = struct.field(pytree_node=False)
    params: Any
    prompts: Int[Array, "rows prompt_len"]
    prompt_lengths: Int[Array, " rows"]
    shared: bool = struct.field(pytree_node=False, default=False)
    has_reference: bool = struct.field(pytree_node=False, default=False)

    @property
    def n_rows(self) -> int:
        return int(self.prompts.shape[0])

    @property
    def n_agents(self) -> int:
        """Bidding agents (rows less the reference)."""
        return self.n_rows - int(self.has_reference)


def make_agents(
    model: LanguageModel,
    params: Sequence[Any] | Any,
    prompts: Sequence[str | Sequence[int]],
    *,
    shared: bool = False,
    reference_params: Any = None,
    reference_prompt: str | Sequence[int] = "",
) -> Agents:
    """Build :class:`Agents`: one prompt per agent and per-agent params (or ``shared`` ones).

    With ``reference_params`` the reference agent becomes row 0 (it needs stacked params, so
    ``shared`` must be off).
    """
    if not isinstance(model, LanguageModel):
        raise ValueError(f"model must implement LanguageModel, got {type(model).__name__}")
    ids = [encode(p) if isinstance(p, str) else np.asarray(p, np.int32) for p in prompts]
    if reference_params is not None:
        if shared:
            raise ValueError("a reference agent needs per-agent params (shared=False)")
        ref = reference_prompt
        ids = [encode(ref) if isinstance(ref, str) else np.asarray(ref, np.int32), *ids]
        params = [reference_params, *params]
    if not shared and len(params) != len(ids):
        raise ValueError(f"got {len(params)} sets of params for {len(ids)} prompts")
    if len(ids) == 0:
        raise ValueError("need at least one agent")
    longest = max(1, *(len(x) for x in ids))
    for x in ids:
        if np.any((x < 0) | (x >= model.vocab_size)):
            raise ValueError(f"prompt token ids must lie in [0, {model.vocab_size})")
    padded = np.stack([np.pad(x, (longest - len(x), 0)) for x in ids]).astype(np.int32)
    stacked = params if shared else jax.tree.map(lambda *xs: jnp.stack(xs), *params)
    return Agents(
        model=model,
        params=stacked,
        prompts=jnp.asarray(padded),
        prompt_lengths=jnp.asarray([len(x) for x in ids], jnp.int32),
        shared=shared,
        has_reference=reference_params is not None,
    )


@struct.dataclass
class Trace:
    """Everything one auction decided, step by step (``steps`` = ``max_new_tokens``).

    Generations from ``[samples]`` keys carry a leading ``samples`` axis on every field.

    Attributes:
      bids: ``[agents]`` the bids.
      key_data: the key's raw data (``jax.random.key_data``); step ``t`` uses ``fold_in(key, t)``.
      tokens: ``[steps]`` sampled tokens (the end token after the end).
      alive: ``[steps]`` whether the step belongs to the text (up to and including the end token).
      log_p: ``[steps, rows, vocab]`` every row's next-token log-distribution (reference first).
      log_q: ``[steps, vocab]`` the aggregated log-distribution.
      exponentials: ``[steps, agents]`` race clocks.
      uniforms: ``[steps, 3]`` shared uniforms.
      winner: ``[steps]`` the race winner (``-1``: reference agent or no race).
      payments: ``[steps, agents]`` charges (realised or expected, per the config).
    """

    bids: Float[Array, "*samples agents"]
    key_data: Any
    tokens: Int[Array, "*samples steps"]
    alive: Bool[Array, "*samples steps"]
    log_p: Float[Array, "*samples steps rows vocab"]
    log_q: Float[Array, "*samples steps vocab"]
    exponentials: Float[Array, "*samples steps agents"]
    uniforms: Float[Array, "*samples steps 3"]
    winner: Int[Array, "*samples steps"]
    payments: Float[Array, "*samples steps agents"]

    @property
    def total_payments(self) -> Float[Array, "*samples agents"]:
        return jnp.sum(self.payments, axis=-2)


def _rule_fn(config: AuctionConfig) -> AggregationRule:
    return RULES[config.rule] if isinstance(config.rule, str) else config.rule


def _auction_step(config: AuctionConfig, has_ref: bool, log_p, bids, draws, alive):
    """Aggregate, sample and charge at one position (also used by :func:`replay`)."""
    n = bids.shape[-1]
    agent_lp = log_p[int(has_ref) :]
    ref_lp = log_p[0] if has_ref else None
    ref_w = config.reference_weight if has_ref else 0.0
    zero = jnp.zeros(n, jnp.float32)
    if config.plain:
        log_q = log_p[0]
        token = _inverse_cdf(jnp.exp(log_q), draws.uniforms[1])
        winner, pays = jnp.asarray(0), zero
    else:
        weights = bid_weights(bids, reference_weight=ref_w)
        rows = agent_lp if ref_lp is None or ref_w <= 0 else log_p
        log_q = _rule_fn(config)(rows, weights)
        if config.payment == "race":
            out = race(
                jnp.exp(agent_lp),
                bids,
                draws,
                reference_probs=None if ref_lp is None else jnp.exp(ref_lp),
                reference_weight=ref_w,
            )
            token, winner, pays = out.token, out.winner, out.payments
        else:
            token = _inverse_cdf(jnp.exp(log_q), draws.uniforms[1])
            winner = jnp.asarray(-1)
            if config.payment == "none":
                pays = zero
            else:
                alloc = (
                    tv_allocation
                    if config.payment == "envelope"
                    else kl_allocation(config.myerson_loss)
                )
                pays = _envelope(
                    alloc,
                    agent_lp,
                    bids,
                    rule=_rule_fn(config),
                    nodes=config.quadrature_nodes,
                    reference_log_probs=ref_lp,
                    reference_weight=ref_w,
                    has_ref=ref_w > 0,
                )
    end = END_TOKEN if config.end_token is None else config.end_token
    token = jnp.where(alive, token, end).astype(jnp.int32)
    pays = jnp.where(alive, pays, 0.0)
    return token, log_q, jnp.asarray(winner, jnp.int32), pays


def _generate(agents: Agents, bids, query, key, config: AuctionConfig) -> Trace:
    model = agents.model
    rows = agents.n_rows
    has_ref = agents.has_reference
    params_axis = None if agents.shared else 0
    forward = jax.vmap(model.forward, in_axes=(params_axis, 0, 0, None, 0))
    cache0 = model.init_cache()
    caches = jax.tree.map(lambda x: jnp.broadcast_to(x, (rows, *x.shape)), cache0)
    p_len = agents.prompts.shape[1]
    valid_from = p_len - agents.prompt_lengths
    context = jnp.concatenate([agents.prompts, jnp.broadcast_to(query, (rows, query.shape[0]))], 1)
    logits, caches = forward(agents.params, context, caches, 0, valid_from)
    start = context.shape[1]

    def step(carry, t):
        caches, last, alive = carry
        draws = draw_race(jax.random.fold_in(key, t), agents.n_agents)
        log_p = agent_log_probs(last, temperature=config.temperature, top_k=config.top_k)
        token, log_q, winner, pays = _auction_step(config, has_ref, log_p, bids, draws, alive)
        logits, caches = forward(
            agents.params, jnp.broadcast_to(token, (rows, 1)), caches, start + t, valid_from
        )
        next_alive = alive
        if config.end_token is not None:
            next_alive = alive & (token != config.end_token)
        record = (token, alive, log_p, log_q, draws.exponentials, draws.uniforms, winner, pays)
        return (caches, logits[:, -1], next_alive), record

    init = (caches, logits[:, -1], jnp.asarray(True))
    _, rec = jax.lax.scan(step, init, jnp.arange(config.max_new_tokens))
    tokens, alive, log_p, log_q, exps, unifs, winner, pays = rec
    return Trace(
        bids=bids,
        key_data=jax.random.key_data(key),
        tokens=tokens,
        alive=alive,
        log_p=log_p,
        log_q=log_q,
        exponentials=exps,
        uniforms=unifs,
        winner=winner,
        payments=pays,
    )


@functools.partial(jax.jit, static_argnames=("config",))
def _generate_jit(agents, bids, query, keys, config):
    run = functools.partial(_generate, config=config)
    if keys.ndim == 0:
        return run(agents, bids, query, keys)
    return jax.vmap(run, in_axes=(None, None, None, 0))(agents, bids, query, keys)


def generate(
    agents: Agents,
    bids: Float[Array, " agents"] | Sequence[float],
    query: str | Sequence[int] | Int[Array, " query"],
    *,
    key: Key[Array, "*samples"],
    config: AuctionConfig = AuctionConfig(),
) -> Trace:
    """Run the token auction (jitted here: a public boundary; inputs validated first).

    Args:
      agents: from :func:`make_agents`.
      bids: ``[agents]`` one bid per bidding agent.
      query: the shared text (or token ids) after each agent's prompt.
      key: a typed key, or ``[samples]`` keys for as many independent generations (the trace
        then has a leading ``samples`` axis).
      config: rule, payments and sampling.

    Returns:
      The :class:`Trace`.

    Raises:
      ValueError: bad bids (wrong count, negative, NaN, all zero without a reference agent),
        token ids outside the vocabulary, or a prompt, query and length limit that do not fit
        the model's context.
    """
    ids = encode(query) if isinstance(query, str) else np.asarray(query, np.int32)
    b = np.asarray(bids, np.float32)
    n = agents.n_agents
    if b.shape != (n,):
        raise ValueError(f"bids must have shape [agents={n}], got {b.shape}")
    v = agents.model.vocab_size
    uniform = jnp.full((v,), -np.log(v), jnp.float32)
    check_auction_inputs(
        jnp.broadcast_to(uniform, (n, v)),
        jnp.asarray(b),
        reference_log_probs=uniform if agents.has_reference else None,
        reference_weight=config.reference_weight if agents.has_reference else 0.0,
    )
    if ids.ndim != 1 or ids.size == 0 or np.any((ids < 0) | (ids >= v)):
        raise ValueError(f"query must be a non-empty sequence of token ids in [0, {v})")
    need = agents.prompts.shape[1] + ids.size + config.max_new_tokens
    if need > agents.model.max_len:
        raise ValueError(
            f"prompt ({agents.prompts.shape[1]}) + query ({ids.size}) + max_new_tokens "
            f"({config.max_new_tokens}) = {need} exceeds the model's max_len "
            f"{agents.model.max_len}"
        )
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise ValueError("key must be a typed key from jax.random.key(seed)")
    return _generate_jit(agents, jnp.asarray(b), jnp.asarray(ids, jnp.int32), key, config)


def log_likelihoods(trace: Trace) -> Float[Array, "*samples rows"]:
    """Each row's log-likelihood (nats) of the generated text (steps up to the end token)."""
    lp = jnp.take_along_axis(trace.log_p, trace.tokens[..., None, None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(trace.alive[..., None], lp, 0.0), axis=-2)


@functools.partial(jax.jit, static_argnames=("config", "has_reference"))
def _recompute(trace: Trace, config: AuctionConfig, has_reference: bool):
    def one(log_p, exps, unifs, alive):
        return _auction_step(
            config, has_reference, log_p, trace.bids, RaceDraws(exps, unifs), alive
        )

    return jax.vmap(one)(trace.log_p, trace.exponentials, trace.uniforms, trace.alive)


def replay(trace: Trace, config: AuctionConfig, *, has_reference: bool = False) -> Trace:
    """Recompute tokens, ``q``, winners and payments from the stored distributions and draws.

    Needs no LM. For a single (unbatched) trace; the draws are also re-derived from the stored
    key and must match.
    """
    if trace.tokens.ndim != 1:
        raise ValueError("replay takes one trace; index a batched trace first")
    key = jax.random.wrap_key_data(trace.key_data)
    n = trace.bids.shape[-1]
    draws = jax.vmap(lambda t: draw_race(jax.random.fold_in(key, t), n))(
        jnp.arange(trace.tokens.shape[0])
    )
    if not (
        np.array_equal(np.asarray(draws.exponentials), np.asarray(trace.exponentials))
        and np.array_equal(np.asarray(draws.uniforms), np.asarray(trace.uniforms))
    ):
        raise ValueError("the trace's draws do not follow from its key: it was altered")
    tokens, log_q, winner, pays = _recompute(trace, config, has_reference)
    return dataclasses.replace(trace, tokens=tokens, log_q=log_q, winner=winner, payments=pays)


def audit(
    trace: Trace, config: AuctionConfig, *, has_reference: bool = False, eps: float = 1e-3
) -> dict[str, float]:
    """Check a race trace: replay matches, and every payment is a critical bid.

    For each step and agent ``i`` with a critical bid ``theta_i``, re-runs the race with ``b_i =
    theta_i (1 - eps)`` (the token must be the one without agent ``i``, as at ``b_i = 0``) and
    ``theta_i (1 + eps)`` (agent ``i`` must win with its own token); the payment must be
    ``theta_i`` exactly when agent ``i`` won and changed the token, else 0.

    Returns:
      ``max_token_mismatch`` (0/1), ``max_payment_error``, ``critical_bid_failures`` (count).
    """
    if config.payment != "race" or config.plain:
        raise ValueError("audit checks race payments; the config does not use the race")
    again = replay(trace, config, has_reference=has_reference)

    probs = jnp.exp(trace.log_p[:, int(has_reference) :])
    n = trace.bids.shape[-1]

    def check(p, exps, unifs, alive, token, paid):
        draws = RaceDraws(exps, unifs)
        base = race(p, trace.bids, draws)

        def per_agent(i):
            theta = base.thresholds[i]
            low = race(p, trace.bids.at[i].set(theta * (1 - eps)), draws).token
            high = race(p, trace.bids.at[i].set(theta * (1 + eps)), draws)
            zero = race(p, trace.bids.at[i].set(0.0), draws).token
            ok = (low == zero) & (high.token == base.agent_tokens[i]) & (high.winner == i)
            has_other = jnp.sum(trace.bids) - trace.bids[i] > 0
            ok = ok | ~has_other | (trace.bids[i] == 0)
            expected = jnp.where(base.winner == i, jnp.where(zero != base.token, theta, 0.0), 0.0)
            if has_reference and config.reference_weight > 0:
                expected = jnp.where(unifs[2] < config.reference_weight, 0.0, expected)
            return ok, jnp.abs(jnp.where(alive, expected, 0.0) - paid[i])

        ok, err = jax.vmap(per_agent)(jnp.arange(n))
        return jnp.sum(~ok & alive), jnp.max(err)

    fails, errs = jax.jit(jax.vmap(check))(
        probs, trace.exponentials, trace.uniforms, trace.alive, trace.tokens, trace.payments
    )
    return {
        "max_token_mismatch": float(jnp.max((again.tokens != trace.tokens).astype(jnp.float32))),
        "max_payment_error": float(
            jnp.maximum(jnp.max(jnp.abs(again.payments - trace.payments)), jnp.max(errs))
        ),
        "critical_bid_failures": float(jnp.sum(fails)),
    }
