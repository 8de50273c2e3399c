"""Aggregation rules: from bids and the agents' next-token distributions to one distribution.

Everything is in log space. A rule is an :data:`AggregationRule`, ``(log_probs [agents, vocab],
weights [agents]) -> log_q [vocab]``, written for one position (``aggregate`` lifts it over batch
axes); ``weights`` lie on the simplex. :func:`bid_weights` turns bids into weights
``lambda_i = b_i / sum_j b_j``, optionally giving a reference agent (a base LM) a fixed weight:
``q = rule((p_ref, p_1, ..., p_n), (w_ref, (1 - w_ref) * lambda))``.

* :func:`linear_rule`: ``q = sum_i lambda_i p_i``, the minimiser of ``sum_i lambda_i KL(p_i || q)``.
* :func:`log_linear_rule`: ``q ~ prod_i p_i^lambda_i``, the minimiser of ``sum_i lambda_i KL(q ||
  p_i)``; a zero probability of an agent with positive weight vetoes the token (where the vetoes
  exclude every token, the position falls back to the linear rule).

Temperature and top-k belong inside each agent's distribution (:func:`agent_log_probs`), before
aggregation: applied after it, they can break monotonicity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from diffecon.outcome import is_concrete

__all__ = [
    "RULES",
    "AggregationRule",
    "agent_log_probs",
    "aggregate",
    "bid_weights",
    "check_auction_inputs",
    "kl_divergence",
    "linear_rule",
    "log_linear_rule",
    "stack_distributions",
    "total_variation",
]

AggregationRule = Callable[[Float[Array, "agents vocab"], Float[Array, " agents"]], jax.Array]

SUM_TOL = 1e-3  # how far from 1 a float32 distribution's sum may be


def _safe_log(x):
    return jnp.where(x > 0, jnp.log(jnp.where(x > 0, x, 1.0)), -jnp.inf)


def linear_rule(
    log_probs: Float[Array, "agents vocab"], weights: Float[Array, " agents"]
) -> Float[Array, " vocab"]:
    """``log sum_i w_i p_i``: the mixture of the agents' distributions."""
    return jax.nn.logsumexp(log_probs + _safe_log(weights)[:, None], axis=0)


def log_linear_rule(
    log_probs: Float[Array, "agents vocab"], weights: Float[Array, " agents"]
) -> Float[Array, " vocab"]:
    """``log softmax(sum_i w_i log p_i)``: the weighted geometric mean, renormalised.

    A token to which an agent of positive weight gives probability 0 gets probability 0; if that
    excludes every token, the linear rule is used instead.
    """
    active = (weights > 0)[:, None]
    scores = jnp.sum(jnp.where(active, weights[:, None] * log_probs, 0.0), axis=0)
    log_q = jax.nn.log_softmax(scores)
    vetoed_all = ~jnp.any(jnp.isfinite(scores))
    return jnp.where(vetoed_all, linear_rule(log_probs, weights), log_q)


RULES: dict[str, AggregationRule] = {"linear": linear_rule, "log_linear": log_linear_rule}


def bid_weights(
    bids: Float[Array, "*batch agents"], *, reference_weight: float = 0.0
) -> Float[Array, "*batch weights"]:
    """``lambda = b / sum(b)``; with a reference agent, ``(w_ref, (1 - w_ref) * lambda)``.

    All-zero bids (rejected at the public boundary unless there is a reference agent) give the
    reference agent the whole weight, or without one equal weights.
    """
    total = jnp.sum(bids, axis=-1, keepdims=True)
    n = bids.shape[-1]
    safe = jnp.where(total > 0, total, 1.0)
    if reference_weight > 0:
        lam = jnp.where(total > 0, bids / safe, 0.0)
        ref = jnp.where(total > 0, reference_weight, 1.0)
        return jnp.concatenate([ref, (1 - ref) * lam], axis=-1)
    return jnp.where(total > 0, bids / safe, 1.0 / n)


def agent_log_probs(
    logits: Float[Array, "*batch vocab"], *, temperature: float = 1.0, top_k: int | None = None
) -> Float[Array, "*batch vocab"]:
    """An agent's next-token log-distribution: temperature and top-k applied to its own logits."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        if not 1 <= top_k <= z.shape[-1]:
            raise ValueError(f"top_k must be in [1, vocab={z.shape[-1]}], got {top_k}")
        kth = jax.lax.top_k(z, top_k)[0][..., -1:]
        z = jnp.where(z >= kth, z, -jnp.inf)
    return jax.nn.log_softmax(z, axis=-1)


def aggregate(
    log_probs: Float[Array, "*batch agents vocab"],
    bids: Float[Array, "*batch agents"],
    *,
    rule: AggregationRule | str = "linear",
    reference_log_probs: Float[Array, "*batch vocab"] | None = None,
    reference_weight: float = 0.0,
) -> Float[Array, "*batch vocab"]:
    """The aggregated next-token log-distribution ``log q``.

    Concrete inputs are validated (:func:`check_auction_inputs`); inside ``jit`` only shapes are.

    Args:
      log_probs: the agents' next-token log-probabilities.
      bids: the agents' bids (non-negative, not all zero without a reference agent).
      rule: an :data:`AggregationRule` or a name in :data:`RULES`.
      reference_log_probs: the reference agent's log-distribution (optional).
      reference_weight: its fixed weight in ``[0, 1)``.

    Returns:
      ``log q`` with the batch shape of ``bids``.

    Examples:
      >>> import jax.numpy as jnp
      >>> p = jnp.log(jnp.array([[0.9, 0.1], [0.1, 0.9]]))
      >>> jnp.exp(aggregate(p, jnp.array([3.0, 1.0]))).round(3).tolist()
      [0.7, 0.3]
    """
    rule_fn = RULES[rule] if isinstance(rule, str) else rule
    has_ref = reference_log_probs is not None
    check_auction_inputs(
        log_probs, bids, reference_log_probs=reference_log_probs, reference_weight=reference_weight
    )
    weights = bid_weights(bids, reference_weight=reference_weight if has_ref else 0.0)
    if has_ref and reference_weight > 0:
        log_probs = jnp.concatenate([reference_log_probs[..., None, :], log_probs], axis=-2)
    batch = bids.shape[:-1]
    flat_lp = log_probs.reshape(-1, *log_probs.shape[-2:])
    flat_w = weights.reshape(-1, weights.shape[-1])
    out = jax.vmap(rule_fn)(flat_lp, flat_w)
    return out.reshape(*batch, log_probs.shape[-1])


def kl_divergence(
    log_p: Float[Array, "*#batch vocab"], log_q: Float[Array, "*#batch vocab"]
) -> Float[Array, ...]:
    """``KL(p || q)`` in nats (``inf`` where ``q`` misses mass of ``p``; terms with p = 0 are 0)."""
    p = jnp.exp(log_p)
    terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return jnp.sum(terms, axis=-1)


def total_variation(
    log_p: Float[Array, "*#batch vocab"], log_q: Float[Array, "*#batch vocab"]
) -> Float[Array, ...]:
    """``TV(p, q) = sum |p - q| / 2``."""
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def stack_distributions(
    distributions: Sequence[Float[Array, " vocab"] | np.ndarray], *, log: bool = False
) -> Float[Array, "agents vocab"]:
    """The agents' distributions (probabilities, or log-probabilities with ``log``) as one array
    of log-probabilities, after checking that they share one vocabulary and sum to 1.

    Raises:
      ValueError: no agents, vocabularies of different sizes, or a bad distribution.
    """
    if len(distributions) == 0:
        raise ValueError("need at least one agent's distribution, got none")
    sizes = [int(np.shape(d)[-1]) if np.ndim(d) else 0 for d in distributions]
    if len(set(sizes)) != 1:
        raise ValueError(
            f"the agents' vocabularies have different sizes {sizes}; every agent must give "
            "a distribution over the same shared vocabulary"
        )
    arr = jnp.stack([jnp.asarray(d, jnp.float32) for d in distributions])
    log_probs = arr if log else _safe_log(arr)
    if not log and is_concrete(arr) and np.any(np.asarray(arr) < 0):
        raise ValueError("a distribution has negative probabilities")
    _check_log_probs(log_probs, "distributions")
    return log_probs


def _check_log_probs(log_probs, name: str) -> None:
    if np.ndim(log_probs) < 1:
        raise ValueError(f"{name} must have a vocab axis, got a scalar")
    if not is_concrete(log_probs):
        return
    arr = np.asarray(log_probs, np.float64)
    if np.any(np.isnan(arr)) or np.any(arr == np.inf):
        raise ValueError(f"{name} contains NaN or +inf log-probabilities")
    sums = np.exp(arr).sum(-1)
    bad = np.abs(sums - 1) > SUM_TOL
    if np.any(bad):
        idx = tuple(np.argwhere(bad)[0].tolist())
        raise ValueError(
            f"{name} must be distributions that sum to 1 over the vocabulary; entry {idx} "
            f"sums to {sums[idx]:.6g} (tolerance {SUM_TOL})"
        )


def check_auction_inputs(
    log_probs: jax.Array | np.ndarray,
    bids: jax.Array | np.ndarray,
    *,
    reference_log_probs: jax.Array | np.ndarray | None = None,
    reference_weight: float = 0.0,
) -> None:
    """Validate an auction's inputs at a public boundary; raise ``ValueError`` naming the problem.

    Expects ``log_probs [*batch, agents, vocab]``, ``bids [*batch, agents]`` and
    ``reference_log_probs [*batch, vocab]`` (annotated loosely: checking shapes is its job).
    Shapes are always checked; values only when concrete: bids must be finite, non-negative and,
    without a reference agent of positive weight, not all zero; distributions must be free of NaN
    and sum to 1.
    """
    lp_shape, b_shape = tuple(np.shape(log_probs)), tuple(np.shape(bids))
    if len(lp_shape) < 2 or lp_shape[:-1] != b_shape:
        raise ValueError(
            f"log_probs must have shape [*batch, agents, vocab] matching bids [*batch, agents]; "
            f"got log_probs {lp_shape} and bids {b_shape}"
        )
    if not 0 <= reference_weight < 1:
        raise ValueError(f"reference_weight must be in [0, 1), got {reference_weight}")
    has_ref = reference_log_probs is not None and reference_weight > 0
    if reference_log_probs is not None:
        want = (*b_shape[:-1], lp_shape[-1])
        if tuple(np.shape(reference_log_probs)) != want:
            raise ValueError(
                f"reference_log_probs must have shape {want} (same vocabulary as the agents), "
                f"got {tuple(np.shape(reference_log_probs))}"
            )
        _check_log_probs(reference_log_probs, "reference_log_probs")
    _check_log_probs(log_probs, "log_probs")
    if not is_concrete(bids):
        return
    b = np.asarray(bids, np.float64)
    if np.any(~np.isfinite(b)):
        raise ValueError(f"bids must be finite numbers, got {b.tolist()}")
    if np.any(b < 0):
        raise ValueError(f"bids must be non-negative, got {b.tolist()}")
    if not has_ref and np.any(b.sum(-1) == 0):
        raise ValueError(
            "all bids are zero: the weights b_i / sum(b) are undefined; bid a positive amount or "
            "add a reference agent with a positive reference_weight"
        )
