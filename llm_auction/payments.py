"""Payments: the race (a stable sampler with realised second-price payments) and expected payments.

**Race** (linear rule). Draw ``E_j ~ Exp(1)`` per agent; the winner is ``argmin_j E_j / b_j``, so
agent ``j`` wins with probability ``lambda_j``, and the token is the winner's token. The agents'
tokens are coupled through shared uniforms: with probability ``alpha = sum_t min_j p_j(t)`` every
agent's token is drawn (by inverse CDF) from the common part ``min_j p_j / alpha``; otherwise each
draws from its residual ``(p_j - min_j p_j) / (1 - alpha)`` with one shared uniform. Each token is
distributed as ``p_j``, and for two agents the coupling is maximal (their tokens differ with
probability ``TV(p_1, p_2)``). As ``b_i`` grows with the draws fixed, the token changes at most
once, at the critical bid ``theta_i = E_i * min_{j != i} b_j / E_j``: agent ``i`` pays ``theta_i``
when it wins and its token differs from the one the others' winner would have produced.

**Expected payments** (any monotone rule), by the envelope formula ``E[z_i] = int_0^{b_i} x
dF_i(x) = b_i F_i(b_i) - int_0^{b_i} F_i(x) dx`` with ``F_i(x) = TV(q(b_i = x), q(b_i = 0))``:
closed form for the linear rule, ``TV(p_i, q_-i) (b_i^2 / (b_i + B) - b_i + B ln((b_i + B) /
B))`` with ``B = sum_{j != i} b_j``; Gauss-Legendre quadrature for any rule. The race's own
expected payment has the same form with ``TV(p_i, q_-i)`` replaced by the probability ``D_i`` that
its coupled tokens differ; ``D_i = TV(p_i, q_-i)`` for two agents, ``D_i >= TV(p_i, q_-i)`` for
more (:func:`race_expected_payments`, exact).

**Myerson payments** for KL valuations ``w_i * a_i(b)`` with ``a_i(x) = L_i(q(0)) - L_i(q(x))``,
``L_i`` agent ``i``'s KL loss: ``z_i = b_i a_i(b_i) - int_0^{b_i} a_i(x) dx``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from llm_auction.aggregation import (
    AggregationRule,
    aggregate,
    check_auction_inputs,
    kl_divergence,
    total_variation,
)

__all__ = [
    "RaceDraws",
    "RaceOutcome",
    "draw_race",
    "envelope_expected_payments",
    "kl_allocation",
    "linear_expected_payments",
    "myerson_payments",
    "race",
    "race_expected_payments",
    "token_disagreement",
    "tv_allocation",
]

KLLoss = Literal["forward", "reverse"]


class RaceDraws(NamedTuple):
    """The randomness of one race (one position).

    Attributes:
      exponentials: ``[agents]`` the agents' ``Exp(1)`` clocks.
      uniforms: ``[3]`` shared uniforms: common part or residual, token, reference coin.
    """

    exponentials: Float[Array, " agents"]
    uniforms: Float[Array, " 3"]


class RaceOutcome(NamedTuple):
    """What one race decided.

    Attributes:
      token: the sampled token.
      winner: the winning agent (``-1`` when the reference agent's coin came up).
      payments: ``[agents]`` realised payments.
      thresholds: ``[agents]`` critical bids ``theta_i`` (0 without another positive bidder).
      agent_tokens: ``[agents]`` each agent's coupled token.
      changed: ``[agents]`` whether agent ``i`` winning changed the token.
    """

    token: Int[Array, ""]
    winner: Int[Array, ""]
    payments: Float[Array, " agents"]
    thresholds: Float[Array, " agents"]
    agent_tokens: Int[Array, " agents"]
    changed: Bool[Array, " agents"]


def draw_race(key: PRNGKeyArray, n_agents: int) -> RaceDraws:
    """Fresh draws for one race."""
    k_exp, k_unif = jax.random.split(key)
    return RaceDraws(
        jax.random.exponential(k_exp, (n_agents,), jnp.float32),
        jax.random.uniform(k_unif, (3,), jnp.float32),
    )


def _inverse_cdf(probs: Float[Array, " vocab"], u: Float[Array, ""]) -> Int[Array, ""]:
    cdf = jnp.cumsum(probs)
    cdf = cdf / jnp.maximum(cdf[-1], 1e-30)
    return jnp.minimum(jnp.sum(cdf <= u), probs.shape[-1] - 1)


def _coupling_parts(probs: Float[Array, "agents vocab"]):
    common = jnp.min(probs, axis=0)
    alpha = jnp.clip(jnp.sum(common), 0.0, 1.0)
    residual = jnp.maximum(probs - common, 0.0)
    return common, alpha, residual


def _coupled_tokens(probs: Float[Array, "agents vocab"], u_part, u_token) -> jax.Array:
    common, alpha, residual = _coupling_parts(probs)
    shared = _inverse_cdf(common, u_token)
    own = jax.vmap(_inverse_cdf, in_axes=(0, None))(residual, u_token)
    use_common = (u_part < alpha) | (jnp.sum(residual, axis=-1) <= 0)
    return jnp.where(use_common, shared, own)


def race(
    probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    draws: RaceDraws,
    *,
    reference_probs: Float[Array, " vocab"] | None = None,
    reference_weight: float = 0.0,
) -> RaceOutcome:
    """One position of the race: token, winner and realised second-price payments.

    With a reference agent of fixed weight ``w_ref``, its token is taken when the coin
    ``uniforms[2] < w_ref`` (no bid can change that, so nobody pays); otherwise the agents race.
    """
    n = bids.shape[-1]
    tokens = _coupled_tokens(probs, draws.uniforms[0], draws.uniforms[1])
    arrival = jnp.where(bids > 0, draws.exponentials / jnp.where(bids > 0, bids, 1.0), jnp.inf)
    winner = jnp.argmin(arrival)
    others = jnp.where(jnp.eye(n, dtype=bool), jnp.inf, arrival[None, :])  # [i, j]: j != i
    runner_up = jnp.argmin(others, axis=1)
    best_other = jnp.min(others, axis=1)  # min_{j != i} E_j / b_j
    has_other = jnp.isfinite(best_other)
    thresholds = jnp.where(has_other, draws.exponentials / jnp.where(has_other, best_other, 1.0), 0)
    changed = has_other & (tokens != tokens[runner_up])
    wins = jnp.arange(n) == winner
    agents_race = True
    token = tokens[winner]
    if reference_probs is not None and reference_weight > 0:
        agents_race = draws.uniforms[2] >= reference_weight
        token = jnp.where(agents_race, token, _inverse_cdf(reference_probs, draws.uniforms[1]))
        winner = jnp.where(agents_race, winner, -1)
    payments = jnp.where(wins & changed & agents_race, thresholds, 0.0)
    return RaceOutcome(token, winner, payments, thresholds, tokens, changed)


def _different_token_probability(p, q):
    """``P(F_p^{-1}(u) != F_q^{-1}(u))`` for one shared uniform ``u`` (inverse CDFs)."""
    cp, cq = jnp.cumsum(p), jnp.cumsum(q)
    cp, cq = cp / jnp.maximum(cp[-1], 1e-30), cq / jnp.maximum(cq[-1], 1e-30)
    lp, lq = cp - p / jnp.maximum(jnp.sum(p), 1e-30), cq - q / jnp.maximum(jnp.sum(q), 1e-30)
    same = jnp.sum(jnp.maximum(jnp.minimum(cp, cq) - jnp.maximum(lp, lq), 0.0))
    return jnp.clip(1.0 - same, 0.0, 1.0)


def token_disagreement(probs: Float[Array, "agents vocab"]) -> Float[Array, "agents agents"]:
    """``[i, j]``: probability that agents ``i`` and ``j``'s coupled race tokens differ."""
    _, alpha, residual = _coupling_parts(probs)
    pair = jax.vmap(jax.vmap(_different_token_probability, (None, 0)), (0, None))
    differ = (1.0 - alpha) * pair(residual, residual)
    return differ * (1.0 - jnp.eye(probs.shape[0]))


def _price_of_share(b, others):
    """``int_0^b x d[x / (x + B)] = b^2 / (b + B) - b + B ln((b + B) / B)`` (0 when B = 0)."""
    safe = jnp.where(others > 0, others, 1.0)
    val = b**2 / (b + safe) - b + safe * jnp.log1p(b / safe)
    return jnp.where(others > 0, jnp.maximum(val, 0.0), 0.0)


def _bids_without_self(bids):
    return jnp.sum(bids, axis=-1, keepdims=True) - bids


def race_expected_payments(
    probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    *,
    reference_weight: float = 0.0,
) -> Float[Array, " agents"]:
    """The race's exact expected payments: ``(1 - w_ref) D_i * price_of_share(b_i, B_i)``.

    ``D_i = sum_{j != i} (b_j / B_i) P(token_i != token_j)`` under the race's coupling.
    """
    others = _bids_without_self(bids)
    share = jnp.where(
        others[:, None] > 0, bids[None, :] / jnp.where(others > 0, others, 1)[:, None], 0
    )
    d = jnp.sum(share * token_disagreement(probs), axis=1)
    return (1.0 - reference_weight) * d * _price_of_share(bids, others)


def linear_expected_payments(
    probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    *,
    reference_weight: float = 0.0,
) -> Float[Array, " agents"]:
    """Envelope expected payments of the linear rule in closed form (with ``TV(p_i, q_-i)``)."""
    others = _bids_without_self(bids)
    n = bids.shape[-1]
    off = 1.0 - jnp.eye(n)
    mix = (off * bids[None, :]) @ probs / jnp.where(others > 0, others, 1.0)[:, None]
    tv = 0.5 * jnp.sum(jnp.abs(probs - mix), axis=-1)
    return (1.0 - reference_weight) * tv * _price_of_share(bids, others)


def _gauss_legendre(n: int):
    x, w = np.polynomial.legendre.leggauss(n)
    return jnp.asarray((x + 1) / 2, jnp.float32), jnp.asarray(w / 2, jnp.float32)


def _q_along(rule, log_probs, bids, agent, xs, reference_log_probs, reference_weight):
    """``log q`` with agent ``agent``'s bid replaced by each of ``xs [k]``: ``[k, vocab]``."""
    b = jnp.broadcast_to(bids, (xs.shape[0], bids.shape[-1])).at[:, agent].set(xs)
    lp = jnp.broadcast_to(log_probs, (xs.shape[0], *log_probs.shape))
    ref = None
    if reference_log_probs is not None:
        ref = jnp.broadcast_to(reference_log_probs, (xs.shape[0], log_probs.shape[-1]))
    return aggregate(lp, b, rule=rule, reference_log_probs=ref, reference_weight=reference_weight)


def tv_allocation(log_q_x, log_q_0, log_p_i):
    """``F_i(x) = TV(q(x), q(0))``: how far agent ``i``'s bid moved the distribution."""
    del log_p_i
    return total_variation(log_q_x, log_q_0)


def kl_allocation(loss: KLLoss = "forward"):
    """``a_i(x) = L_i(q(0)) - L_i(q(x))``: how much agent ``i``'s KL loss fell."""

    def alloc(log_q_x, log_q_0, log_p_i):
        if loss == "forward":
            return kl_divergence(log_p_i, log_q_0) - kl_divergence(log_p_i, log_q_x)
        return kl_divergence(log_q_0, log_p_i) - kl_divergence(log_q_x, log_p_i)

    return alloc


def _envelope(
    alloc,
    log_probs,
    bids,
    *,
    rule,
    nodes,
    reference_log_probs,
    reference_weight,
    has_ref,
):
    n = bids.shape[-1]
    t, w = _gauss_legendre(nodes)

    def one(i):
        b = bids[i]
        xs = jnp.concatenate([jnp.zeros(1), b * t, b[None]])
        lq = _q_along(rule, log_probs, bids, i, xs, reference_log_probs, reference_weight)
        a = jax.vmap(alloc, (0, None, None))(lq, lq[0], log_probs[i])
        pay = b * a[-1] - b * jnp.sum(w * a[1:-1])
        # nobody else bids: agent i's bid cannot lose to anyone, it pays nothing
        alone = jnp.sum(bids) - b <= 0
        return jnp.where(alone & ~has_ref, 0.0, jnp.maximum(pay, 0.0))

    return jax.vmap(one)(jnp.arange(n))


def _checked_envelope(alloc, log_probs, bids, rule, nodes, reference_log_probs, reference_weight):
    """The public boundary of the quadrature payments: validate, then integrate."""
    check_auction_inputs(
        log_probs, bids, reference_log_probs=reference_log_probs, reference_weight=reference_weight
    )
    return _envelope(
        alloc,
        log_probs,
        bids,
        rule=rule,
        nodes=nodes,
        reference_log_probs=reference_log_probs,
        reference_weight=reference_weight,
        has_ref=reference_log_probs is not None and reference_weight > 0,
    )


def envelope_expected_payments(
    log_probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    *,
    rule: AggregationRule | str = "linear",
    nodes: int = 96,
    reference_log_probs: Float[Array, " vocab"] | None = None,
    reference_weight: float = 0.0,
) -> Float[Array, " agents"]:
    """Envelope expected payments of any rule, ``b F(b) - int_0^b F``, by quadrature.

    ``F_i(x) = TV(q(b_i = x), q(b_i = 0))``; ``nodes`` Gauss-Legendre points on ``[0, b_i]``.
    """
    return _checked_envelope(
        tv_allocation, log_probs, bids, rule, nodes, reference_log_probs, reference_weight
    )


def myerson_payments(
    log_probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    *,
    rule: AggregationRule | str = "linear",
    loss: KLLoss = "forward",
    nodes: int = 96,
    reference_log_probs: Float[Array, " vocab"] | None = None,
    reference_weight: float = 0.0,
) -> Float[Array, " agents"]:
    """Myerson payments for KL valuations: ``b a(b) - int_0^b a``, ``a`` the KL-loss reduction.

    ``loss="forward"`` uses ``KL(p_i || q)`` (the linear rule's objective), ``"reverse"``
    ``KL(q || p_i)`` (the log-linear rule's).
    """
    if loss not in ("forward", "reverse"):
        raise ValueError(f"loss must be 'forward' or 'reverse', got {loss!r}")
    return _checked_envelope(
        kl_allocation(loss), log_probs, bids, rule, nodes, reference_log_probs, reference_weight
    )
