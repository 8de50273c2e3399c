"""Value distributions: samplers with known supports, CDFs and virtual values.

A value model samples ``values [*batch, bidders, items]`` from a typed PRNG key. Independent models
are built from one-dimensional *marginals* (one per bidder and item), each of which knows its
support, CDF, inverse CDF and Myerson virtual value, so classic baselines (Myerson reserves) and
exact revenues are computed from the same objects that generate the data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

__all__ = [
    "CombinatorialValues",
    "Discrete",
    "Exponential",
    "IndependentValues",
    "Lomax",
    "Marginal",
    "Uniform",
    "ValueModel",
]


@runtime_checkable
class Marginal(Protocol):
    """A one-dimensional value distribution."""

    @property
    def low(self) -> float: ...

    @property
    def high(self) -> float: ...

    def icdf(self, u: jax.Array) -> jax.Array:
        """Inverse CDF applied to ``u ~ U[0, 1)`` (any shape)."""
        ...

    def virtual_value(self, v: jax.Array) -> jax.Array:
        """Myerson virtual value ``v - (1 - F(v)) / f(v)`` (ironed where needed)."""
        ...

    def myerson_reserve(self) -> float:
        """The optimal reserve price for a single bidder: the zero of the virtual value."""
        ...


@dataclasses.dataclass(frozen=True)
class Uniform:
    """``U[low, high]``."""

    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.high > self.low):
            raise ValueError(f"Uniform needs finite low < high, got [{self.low}, {self.high}]")
        if self.low < 0:
            raise ValueError(f"values must be non-negative, got Uniform low={self.low}")

    def icdf(self, u):
        return self.low + (self.high - self.low) * u

    def cdf(self, v):
        return jnp.clip((v - self.low) / (self.high - self.low), 0.0, 1.0)

    def virtual_value(self, v):
        return 2.0 * v - self.high

    def inverse_virtual_value(self, phi):
        return (phi + self.high) / 2.0

    def myerson_reserve(self) -> float:
        return max(self.low, self.high / 2.0)


@dataclasses.dataclass(frozen=True)
class Exponential:
    """Exponential with the given mean (support ``[0, inf)``)."""

    mean: float = 1.0

    def __post_init__(self):
        if not self.mean > 0:
            raise ValueError(f"Exponential needs mean > 0, got {self.mean}")

    @property
    def low(self) -> float:
        return 0.0

    @property
    def high(self) -> float:
        return math.inf

    def icdf(self, u):
        return -self.mean * jnp.log1p(-u)

    def cdf(self, v):
        return 1.0 - jnp.exp(-jnp.maximum(v, 0.0) / self.mean)

    def virtual_value(self, v):
        return v - self.mean

    def inverse_virtual_value(self, phi):
        return phi + self.mean

    def myerson_reserve(self) -> float:
        return self.mean


@dataclasses.dataclass(frozen=True)
class Lomax:
    """Lomax (Pareto II, scale 1): ``v = (1 - u) ** (-1 / shape) - 1``, support ``[0, inf)``."""

    shape: float = 5.0

    def __post_init__(self):
        if not self.shape > 1:
            raise ValueError(f"Lomax needs shape > 1 (finite mean, regular), got {self.shape}")

    @property
    def low(self) -> float:
        return 0.0

    @property
    def high(self) -> float:
        return math.inf

    def icdf(self, u):
        return (1.0 - u) ** (-1.0 / self.shape) - 1.0

    def cdf(self, v):
        return 1.0 - (1.0 + jnp.maximum(v, 0.0)) ** (-self.shape)

    def virtual_value(self, v):
        # (1 - F) / f = (1 + v) / shape
        return v - (1.0 + v) / self.shape

    def inverse_virtual_value(self, phi):
        return (phi + 1.0 / self.shape) / (1.0 - 1.0 / self.shape)

    def myerson_reserve(self) -> float:
        return 1.0 / (self.shape - 1.0)


@dataclasses.dataclass(frozen=True)
class Discrete:
    """A finite distribution on ``points`` (strictly increasing) with probabilities ``probs``."""

    points: tuple[float, ...]
    probs: tuple[float, ...]

    def __post_init__(self):
        pts, prs = np.asarray(self.points, float), np.asarray(self.probs, float)
        if pts.ndim != 1 or pts.shape != prs.shape or pts.size == 0:
            raise ValueError(
                f"Discrete needs equally long 1-d points and probs, got {pts.shape}, {prs.shape}"
            )
        if np.any(np.diff(pts) <= 0) or pts[0] < 0:
            raise ValueError(f"Discrete points must be non-negative and increasing, got {pts}")
        if np.any(prs < 0) or not np.isclose(prs.sum(), 1.0, atol=1e-9):
            raise ValueError(f"Discrete probs must be >= 0 and sum to 1, got {prs} ({prs.sum()})")

    @property
    def low(self) -> float:
        return float(self.points[0])

    @property
    def high(self) -> float:
        return float(self.points[-1])

    def icdf(self, u):
        cum = jnp.asarray(np.cumsum(self.probs)[:-1], jnp.float32)
        idx = jnp.searchsorted(cum, u, side="right")
        return jnp.asarray(self.points, jnp.float32)[idx]

    def cdf(self, v):
        pts, prs = jnp.asarray(self.points), jnp.asarray(self.probs)
        return jnp.sum(jnp.where(pts[None, :] <= jnp.reshape(v, (-1, 1)), prs, 0.0), -1).reshape(
            jnp.shape(v)
        )

    def discrete_virtual_values(self) -> np.ndarray:
        """Ironed virtual values of the support points (Myerson's discrete form)."""
        pts, prs = np.asarray(self.points, float), np.asarray(self.probs, float)
        tail = 1.0 - np.cumsum(prs)  # P(V > x_k)
        gaps = np.append(np.diff(pts), 0.0)
        phi = pts - gaps * tail / prs
        # Ironing: make phi non-decreasing by pooling adjacent violators, weighted by probability.
        blocks = [[phi[k], prs[k], 1] for k in range(len(phi))]
        k = 0
        while k < len(blocks) - 1:
            if blocks[k][0] > blocks[k + 1][0]:
                w = blocks[k][1] + blocks[k + 1][1]
                blocks[k] = [
                    (blocks[k][0] * blocks[k][1] + blocks[k + 1][0] * blocks[k + 1][1]) / w,
                    w,
                    blocks[k][2] + blocks[k + 1][2],
                ]
                del blocks[k + 1]
                k = max(k - 1, 0)
            else:
                k += 1
        return np.concatenate([[b[0]] * b[2] for b in blocks])

    def virtual_value(self, v):
        pts = jnp.asarray(self.points, jnp.float32)
        phi = jnp.asarray(self.discrete_virtual_values(), jnp.float32)
        idx = jnp.clip(jnp.searchsorted(pts, v, side="right") - 1, 0, len(self.points) - 1)
        return phi[idx]

    def myerson_reserve(self) -> float:
        phi = self.discrete_virtual_values()
        nonneg = np.nonzero(phi >= 0)[0]
        return float(self.points[nonneg[0]]) if nonneg.size else math.inf


@runtime_checkable
class ValueModel(Protocol):
    """A joint distribution of ``values [*batch, bidders, dim]``."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(bidders, dim)``: dim is items, or bundles for combinatorial models."""
        ...

    @property
    def low(self) -> np.ndarray:
        """``[bidders, dim]`` lower end of the support (for projecting misreports)."""
        ...

    @property
    def high(self) -> np.ndarray:
        """``[bidders, dim]`` upper end of the support (may be ``inf``)."""
        ...

    def sample(self, key: PRNGKeyArray, batch_shape: Sequence[int] = ()) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class IndependentValues:
    """Independent values, one marginal per (bidder, item): ``marginals[i][j]``."""

    marginals: tuple[tuple[Marginal, ...], ...]

    def __post_init__(self):
        widths = {len(row) for row in self.marginals}
        if len(self.marginals) == 0 or len(widths) != 1 or 0 in widths:
            raise ValueError("IndependentValues needs a non-empty rectangular table of marginals")

    @classmethod
    def iid(cls, marginal: Marginal, *, n_bidders: int, n_items: int) -> IndependentValues:
        """Every bidder's value for every item drawn i.i.d. from ``marginal``."""
        return cls(tuple(tuple(marginal for _ in range(n_items)) for _ in range(n_bidders)))

    @classmethod
    def per_item(cls, marginals: Sequence[Marginal], *, n_bidders: int) -> IndependentValues:
        """Item ``j`` drawn from ``marginals[j]`` for every bidder."""
        return cls(tuple(tuple(marginals) for _ in range(n_bidders)))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.marginals), len(self.marginals[0])

    @property
    def low(self) -> np.ndarray:
        return np.array([[m.low for m in row] for row in self.marginals], np.float32)

    @property
    def high(self) -> np.ndarray:
        return np.array([[m.high for m in row] for row in self.marginals], np.float32)

    def marginal(self, bidder: int, item: int) -> Marginal:
        return self.marginals[bidder][item]

    def sample(
        self, key: PRNGKeyArray, batch_shape: Sequence[int] = ()
    ) -> Float[Array, "*batch bidders items"]:
        n, m = self.shape
        u = jax.random.uniform(key, (*batch_shape, n, m), jnp.float32)
        flat = [mg for row in self.marginals for mg in row]
        if all(mg == flat[0] for mg in flat):
            return flat[0].icdf(u).astype(jnp.float32)
        cols = [
            self.marginals[i][j].icdf(u[..., i, j]).astype(jnp.float32)
            for i in range(n)
            for j in range(m)
        ]
        return jnp.stack(cols, axis=-1).reshape(*batch_shape, n, m)


@dataclasses.dataclass(frozen=True)
class CombinatorialValues:
    """Two-item combinatorial values over bundles ``({1}, {2}, {1,2})``.

    Bidder ``i`` draws item values ``v_i1, v_i2 ~ U[item_low_i, item_high_i]`` and a
    complementarity ``C_i ~ U[comp_low_i, comp_high_i]``; its bundle value is
    ``v_i1 + v_i2 + C_i`` (the convention of RegretNet's CA settings and their reference code).
    """

    item_low: tuple[float, ...]
    item_high: tuple[float, ...]
    comp_low: tuple[float, ...]
    comp_high: tuple[float, ...]

    def __post_init__(self):
        n = len(self.item_low)
        if not (len(self.item_high) == len(self.comp_low) == len(self.comp_high) == n) or n == 0:
            raise ValueError("CombinatorialValues needs one bound per bidder in every tuple")
        for lo, hi, clo in zip(self.item_low, self.item_high, self.comp_low, strict=True):
            if not 0 <= lo < hi or 2 * lo + clo < 0:
                raise ValueError("CombinatorialValues needs 0 <= item_low < item_high, bundle >= 0")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.item_low), 3

    @property
    def low(self) -> np.ndarray:
        lo, clo = np.asarray(self.item_low), np.asarray(self.comp_low)
        return np.stack([lo, lo, 2 * lo + clo], -1).astype(np.float32)

    @property
    def high(self) -> np.ndarray:
        hi, chi = np.asarray(self.item_high), np.asarray(self.comp_high)
        return np.stack([hi, hi, 2 * hi + chi], -1).astype(np.float32)

    def sample(
        self, key: PRNGKeyArray, batch_shape: Sequence[int] = ()
    ) -> Float[Array, "*batch bidders bundles"]:
        n = len(self.item_low)
        k_items, k_comp = jax.random.split(key)
        lo, hi = jnp.asarray(self.item_low)[:, None], jnp.asarray(self.item_high)[:, None]
        items = lo + (hi - lo) * jax.random.uniform(k_items, (*batch_shape, n, 2))
        clo, chi = jnp.asarray(self.comp_low), jnp.asarray(self.comp_high)
        comp = clo + (chi - clo) * jax.random.uniform(k_comp, (*batch_shape, n))
        bundle = items.sum(-1) + comp
        return jnp.concatenate([items, bundle[..., None]], axis=-1).astype(jnp.float32)
