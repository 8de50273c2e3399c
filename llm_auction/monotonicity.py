"""Monotonicity checkers: does raising ``b_i`` move ``q`` towards ``p_i``?

The paper's incentive properties (payment monotonicity and consistent aggregation) are
equivalent to a monotonicity condition: raising ``b_i`` moves ``q`` weakly towards ``p_i`` in
agent ``i``'s robust preference order. Two readings of that order are checked along a sweep of
``b_i`` (everything else fixed), between consecutive points ``q_k -> q_{k+1}``:

* ``coordinatewise``: every ``q(t)`` moves towards ``p_i(t)`` and never overshoots it
  (``q_{k+1}(t)`` lies between ``q_k(t)`` and ``p_i(t)``);
* ``segment``: ``q_{k+1}`` lies on the segment from ``q_k`` to ``p_i``.

Also checked: agent ``i``'s KL losses, ``KL(p_i || q)`` (``kl_forward``) and ``KL(q || p_i)``
(``kl_reverse``), never increase. :func:`monotonicity_report` runs all four over many random
cases and reports, not hides, which rule satisfies which property.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from llm_auction.aggregation import (
    RULES,
    AggregationRule,
    aggregate,
    check_auction_inputs,
    kl_divergence,
)

__all__ = [
    "PROPERTIES",
    "MonotonicityCheck",
    "bid_sweep",
    "check_monotonicity",
    "format_report",
    "monotonicity_report",
    "monotonicity_violations",
]

PROPERTIES = ("coordinatewise", "segment", "kl_forward", "kl_reverse")


def bid_sweep(others_total: Float[Array, ""] | float, *, points: int = 64) -> jax.Array:
    """``[points]`` bids for one agent: 0, then geometric from ``1e-3 B`` to ``1e3 B``."""
    scale = jnp.maximum(jnp.asarray(others_total, jnp.float32), 1e-6)
    return jnp.concatenate([jnp.zeros(1), scale * jnp.logspace(-3, 3, points - 1)])


def monotonicity_violations(
    log_probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    xs: Float[Array, " points"],
    *,
    agent: int | jax.Array,
    rule: AggregationRule | str = "linear",
) -> dict[str, jax.Array]:
    """The largest violation of each property along agent ``agent``'s bids ``xs`` (increasing).

    Violations are in probability units (``coordinatewise``, ``segment``) or relative KL units
    (``kl_*``); 0 means the property holds. Pure and jittable.
    """
    b = jnp.broadcast_to(bids, (xs.shape[0], bids.shape[-1])).at[:, agent].set(xs)
    lp = jnp.broadcast_to(log_probs, (xs.shape[0], *log_probs.shape))
    log_q = aggregate(lp, b, rule=rule)
    q = jnp.exp(log_q)
    p = jnp.exp(log_probs[agent])
    q0, q1 = q[:-1], q[1:]
    lo, hi = jnp.minimum(q0, p), jnp.maximum(q0, p)
    coord = jnp.max(jnp.maximum(lo - q1, q1 - hi))
    direction = p - q0  # [k, vocab]
    step = q1 - q0
    norm2 = jnp.sum(direction**2, axis=-1, keepdims=True)
    alpha = jnp.sum(step * direction, axis=-1, keepdims=True) / jnp.maximum(norm2, 1e-30)
    alpha = jnp.where(norm2 > 1e-20, alpha, 0.0)
    off_line = jnp.max(jnp.abs(step - alpha * direction))
    outside = jnp.max(jnp.maximum(-alpha, alpha - 1.0))
    forward = kl_divergence(log_probs[agent][None], log_q)
    reverse = kl_divergence(log_q, log_probs[agent][None])

    def rise(loss):
        finite = jnp.isfinite(loss[:-1]) & jnp.isfinite(loss[1:])
        up = (loss[1:] - loss[:-1]) / (1.0 + jnp.abs(loss[:-1]))
        # a loss that becomes infinite after being finite is a violation
        jump = jnp.isfinite(loss[:-1]) & ~jnp.isfinite(loss[1:])
        return jnp.max(jnp.where(finite, up, jnp.where(jump, jnp.inf, 0.0)))

    return {
        "coordinatewise": jnp.maximum(coord, 0.0),
        "segment": jnp.maximum(jnp.maximum(off_line, outside), 0.0),
        "kl_forward": jnp.maximum(rise(forward), 0.0),
        "kl_reverse": jnp.maximum(rise(reverse), 0.0),
    }


@dataclasses.dataclass(frozen=True)
class MonotonicityCheck:
    """Which properties hold along one sweep, and by how much each fails.

    Attributes:
      holds: property name -> whether its violation is within ``tol``.
      violation: property name -> the largest violation found.
    """

    holds: Mapping[str, bool]
    violation: Mapping[str, float]


def check_monotonicity(
    log_probs: Float[Array, "agents vocab"],
    bids: Float[Array, " agents"],
    *,
    agent: int,
    rule: AggregationRule | str = "linear",
    xs: Float[Array, " points"] | None = None,
    tol: float = 1e-5,
) -> MonotonicityCheck:
    """Check the four properties for one case as agent ``agent``'s bid sweeps ``xs``.

    Args:
      log_probs: the agents' next-token log-probabilities.
      bids: the bids; agent ``agent``'s entry is replaced by each of ``xs``.
      agent: whose bid moves.
      rule: the aggregation rule.
      xs: increasing bids (default :func:`bid_sweep` of the others' total).
      tol: violations up to this count as float noise.

    Examples:
      >>> import jax.numpy as jnp
      >>> others = jnp.log(jnp.array([0.98, 0.01, 0.01]))
      >>> mine = jnp.log(jnp.array([0.01, 0.01, 0.98]))
      >>> lp, bids = jnp.stack([others, mine]), jnp.array([1.0, 1.0])
      >>> check_monotonicity(lp, bids, agent=1, rule="log_linear").holds["coordinatewise"]
      False
      >>> check_monotonicity(lp, bids, agent=1, rule="linear").holds["coordinatewise"]
      True
    """
    n = np.shape(bids)[-1]
    if not 0 <= agent < n:
        raise ValueError(f"agent must be in [0, {n}), got {agent}")
    check_auction_inputs(log_probs, bids)
    others = float(np.sum(np.asarray(bids)) - np.asarray(bids)[agent])
    xs = bid_sweep(others) if xs is None else jnp.asarray(xs, jnp.float32)
    if np.any(np.diff(np.asarray(xs)) < 0) or np.any(np.asarray(xs) < 0):
        raise ValueError("xs must be non-negative and increasing")
    viol = monotonicity_violations(
        jnp.asarray(log_probs), jnp.asarray(bids, jnp.float32), xs, agent=agent, rule=rule
    )
    violation = {k: float(v) for k, v in viol.items()}
    return MonotonicityCheck({k: v <= tol for k, v in violation.items()}, violation)


def _random_cases(key, n_cases, n_agents, vocab):
    k_conc, k_p, k_b = jax.random.split(key, 3)
    # mixtures of peaked and flat distributions, as next-token distributions are
    conc = jnp.exp(jax.random.uniform(k_conc, (n_cases, n_agents, 1), minval=-3.0, maxval=1.0))
    probs = jax.random.dirichlet(k_p, jnp.broadcast_to(conc, (n_cases, n_agents, vocab)))
    probs = jnp.maximum(probs, 1e-12)
    probs = probs / probs.sum(-1, keepdims=True)
    bids = jnp.exp(jax.random.normal(k_b, (n_cases, n_agents)))
    return jnp.log(probs), bids


def monotonicity_report(
    rules: Mapping[str, AggregationRule | str] | None = None,
    *,
    key: PRNGKeyArray,
    n_cases: int = 10_000,
    n_agents: int = 3,
    vocab: int = 8,
    points: int = 64,
    tol: float = 1e-5,
) -> dict[str, dict[str, dict[str, float]]]:
    """Run every check on ``n_cases`` random cases for each rule (jits here, a public boundary).

    Cases: Dirichlet distributions of random concentration, log-normal bids, agent 0's bid swept
    by :func:`bid_sweep`.

    Returns:
      ``{rule: {property: {"pass_rate", "worst", "n_cases"}}}``.
    """
    rules = dict(RULES) if rules is None else dict(rules)
    if n_cases < 1 or n_agents < 2:
        raise ValueError(f"need n_cases >= 1 and n_agents >= 2, got {n_cases}, {n_agents}")
    log_probs, bids = _random_cases(key, n_cases, n_agents, vocab)
    report = {}
    for name, rule in rules.items():

        def one(lp, b, rule=rule):
            xs = bid_sweep(jnp.sum(b[1:]), points=points)
            return monotonicity_violations(lp, b, xs, agent=0, rule=rule)

        viol = jax.device_get(jax.jit(jax.vmap(one))(log_probs, bids))
        report[name] = {
            prop: {
                "pass_rate": float(np.mean(np.asarray(v) <= tol)),
                "worst": float(np.max(v)),
                "n_cases": n_cases,
            }
            for prop, v in viol.items()
        }
    return report


def format_report(report: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """The report as a Markdown table: share of cases passing each property per rule."""
    head = "| rule | " + " | ".join(PROPERTIES) + " |"
    rows = [head, "|" + "---|" * (len(PROPERTIES) + 1)]
    for rule, props in report.items():
        cells = [f"{props[p]['pass_rate']:.4f} (worst {props[p]['worst']:.2g})" for p in PROPERTIES]
        rows.append(f"| {rule} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
