"""Evaluation over many samples, in chunks, with standard errors.

Every number reported by the project is an :class:`Estimate`: a mean with its standard error and
sample size. ``evaluate`` draws profiles from a setting chunk by chunk (chunk ``c`` uses
``fold_in(key, c)``, so results do not depend on the chunk size's effect on memory) and merges the
per-chunk moments in float64.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray
from tqdm.auto import tqdm

from diffecon.outcome import Outcome, utility
from diffecon.settings import Setting

__all__ = ["Estimate", "evaluate", "mean_estimate", "outcome_metrics"]

FEASIBILITY_TOL = 1e-6


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A sample mean with its standard error.

    Attributes:
      value: the mean.
      stderr: standard error of the mean (0 for exact or max-type numbers).
      n_samples: how many samples it averages.
    """

    value: float
    stderr: float
    n_samples: int

    def within(self, target: float, n_se: float = 3.0, atol: float = 0.0) -> bool:
        """True if ``target`` lies within ``n_se`` standard errors (plus ``atol``) of the mean."""
        return bool(abs(self.value - target) <= n_se * self.stderr + atol)

    def __str__(self) -> str:
        return f"{self.value:.6g} ± {self.stderr:.2g} (n={self.n_samples})"


def mean_estimate(samples: Float[Array, " n"] | np.ndarray) -> Estimate:
    """Mean and standard error of a 1-d sample."""
    x = np.asarray(samples, np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("cannot estimate a mean from zero samples")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return Estimate(float(x.mean()), se, int(x.size))


def outcome_metrics(
    setting: Setting, values: Float[Array, "batch bidders items"], outcome: Outcome
) -> dict[str, Float[Array, " batch"]]:
    """Per-profile metrics shared by every package: revenue, welfare, IR and feasibility.

    Returns ``[batch]`` arrays: ``revenue`` (sum of payments), ``welfare`` (sum of allocated
    value), ``ir_violation`` (sum over bidders of ``max(0, -utility)``), ``over_allocation_rate``
    (1 where the allocation is infeasible beyond a 1e-6 tolerance).
    """
    u = utility(values, outcome)
    return {
        "revenue": outcome.revenue,
        "welfare": jnp.sum(values * outcome.alloc, axis=(-2, -1)),
        "ir_violation": jnp.sum(jax.nn.relu(-u), axis=-1),
        "over_allocation_rate": (
            setting.feasibility_violation(outcome.alloc) > FEASIBILITY_TOL
        ).astype(jnp.float32),
    }


MetricFn = Callable[[Setting, jax.Array, Outcome], Mapping[str, jax.Array]]


def evaluate(
    mechanism: Callable[[jax.Array], Outcome],
    setting: Setting,
    *,
    key: PRNGKeyArray,
    n_samples: int = 1_000_000,
    chunk_size: int = 100_000,
    metrics: MetricFn = outcome_metrics,
    progress: bool = False,
) -> dict[str, Estimate]:
    """Estimate a mechanism's metrics on ``n_samples`` profiles drawn from ``setting``.

    This is a public boundary: it jits the per-chunk computation once and loops over chunks.

    Args:
      mechanism: ``bids [B, bidders, items] -> Outcome``.
      setting: where values come from.
      key: the evaluation seed; chunk ``c`` samples with ``fold_in(key, c)``.
      n_samples: total profiles.
      chunk_size: profiles per chunk (memory bound).
      metrics: ``(setting, values, outcome) -> {name: [batch] array}``.
      progress: show a tqdm bar over chunks.

    Returns:
      ``{metric name: Estimate}``.
    """
    if n_samples < 2 or chunk_size < 1:
        raise ValueError(f"need n_samples >= 2 and chunk_size >= 1, got {n_samples}, {chunk_size}")

    @jax.jit
    def chunk_moments(k, size_mask):
        values = setting.sample(k, (chunk_size,))
        per = metrics(setting, values, mechanism(values))
        w = size_mask.astype(jnp.float32)
        cnt = jnp.sum(w)
        out = {}
        for name, x in per.items():
            x = x.astype(jnp.float32)
            mean = jnp.sum(x * w) / cnt
            m2 = jnp.sum(w * (x - mean) ** 2)
            out[name] = (mean, m2)
        return out

    n_chunks = -(-n_samples // chunk_size)
    total: dict[str, list[float]] = {}
    count = 0
    for c in tqdm(range(n_chunks), disable=not progress, desc=f"evaluate {setting.name}"):
        size = min(chunk_size, n_samples - c * chunk_size)
        mask = jnp.arange(chunk_size) < size
        moments = jax.device_get(chunk_moments(jax.random.fold_in(key, c), mask))
        for name, (mean, m2) in moments.items():
            mean, m2 = float(mean), float(m2)
            if name not in total:
                total[name] = [mean, m2]
                continue
            mu, s2 = total[name]
            delta = mean - mu
            new_n = count + size
            total[name] = [mu + delta * size / new_n, s2 + m2 + delta**2 * count * size / new_n]
        count += size
    return {
        name: Estimate(mu, math.sqrt(s2 / (count - 1) / count), count)
        for name, (mu, s2) in total.items()
    }
