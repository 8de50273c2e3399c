"""Classic auction baselines, each a mechanism under the shared contract.

Every baseline is a frozen pytree dataclass: calling it on ``bids [*batch, bidders, value_dim]``
returns an :class:`~diffecon.outcome.Outcome`, reads no RNG and mutates nothing, so it can be
jitted, vmapped, or fed to the misreport search of :mod:`diffecon.regret` like a learned mechanism.

* :func:`vcg`: welfare-maximising allocation with Clarke pivot payments.
* :func:`itemwise_myerson`: Myerson's optimal single-item auction run separately on each item.
* :func:`bundle_myerson`: a second-price auction for the grand bundle with the best reserve.
* :func:`optimal_menu`: the known revenue-optimal single-bidder mechanisms, as explicit menus.
* :func:`first_price`, :func:`second_price`: pay-your-bid and second-price item auctions.
* :func:`affine_maximizer`, :func:`vvca`, :func:`fit_affine_maximizer`: affine maximiser auctions
  (AMA) and their VVCA subclass, with a gradient search for revenue-maximising parameters.
* :func:`make_baseline`: the registry of all of the above by name.

Mechanisms that need every deterministic allocation (VCG beyond additive bidders, affine maximisers,
first price for unit-demand or combinatorial bidders) share one enumeration,
:func:`enumerate_allocations`.

References:
  Myerson, "Optimal auction design", Mathematics of Operations Research (1981).
  Manelli & Vincent, "Bundling as an optimal selling mechanism for a multiple-good monopolist",
  Journal of Economic Theory (2006).
  Pavlov, "Optimal mechanism for selling two goods", B.E. Journal of Theoretical Economics (2011).
  Daskalakis, Deckelbaum & Tzamos, "Strong duality for a multiple-good monopolist",
  Econometrica (2017).
  Likhodedov & Sandholm, "Approximating revenue-maximizing combinatorial auctions", AAAI (2005).
  Sandholm & Likhodedov, "Automated design of revenue-maximizing combinatorial auctions",
  Operations Research (2015).
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jaxtyping import Array, Float, PRNGKeyArray

from diffecon.distributions import IndependentValues, Marginal, Uniform
from diffecon.outcome import Outcome, check_bids
from diffecon.settings import Setting

__all__ = [
    "AFFINE_KINDS",
    "BASELINE_NAMES",
    "FULL_FIT_CONFIG",
    "LOTTERY_FIT_CONFIG",
    "MAX_ALLOCATIONS",
    "AffineMaximizer",
    "AffineMaximizerFitConfig",
    "BundleSecondPrice",
    "FirstPrice",
    "ItemwiseMyerson",
    "MenuMechanism",
    "SecondPrice",
    "affine_maximizer",
    "bundle_myerson",
    "enumerate_allocations",
    "first_price",
    "fit_affine_maximizer",
    "itemwise_myerson",
    "make_baseline",
    "optimal_menu",
    "second_price",
    "vcg",
    "vvca",
]

# Pytree fields are annotated ``Any`` on purpose: JAX rebuilds these dataclasses with placeholder
# leaves (``None``, ``ShapeDtypeStruct``) and a run-time array check on the constructor would reject
# them. The shapes are documented in each class docstring and checked by the factories.
_Leaf = Any

MAX_ALLOCATIONS = 4096
"""Largest number of deterministic allocations ``(bidders + 1) ** items`` that is enumerated."""


# --------------------------------------------------------------------------------------------------
# Batch helpers.


def _flatten_batch(bids: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    """``[*batch, bidders, dim] -> [B, bidders, dim]`` and the batch shape to restore."""
    batch = tuple(bids.shape[:-2])
    return bids.reshape((math.prod(batch), *bids.shape[-2:])), batch


def _unflatten_outcome(alloc: jax.Array, pay: jax.Array, batch: tuple[int, ...]) -> Outcome:
    return Outcome(
        alloc=alloc.reshape((*batch, *alloc.shape[1:])), pay=pay.reshape((*batch, pay.shape[-1]))
    )


def _second_highest(x: jax.Array, axis: int) -> jax.Array:
    """Second largest entry along ``axis`` (0 when the axis has one entry)."""
    if x.shape[axis] < 2:
        return jnp.zeros_like(jnp.take(x, 0, axis=axis))
    return jnp.take(jnp.sort(x, axis=axis), -2, axis=axis)


def _require(setting: Setting, valuations: tuple[str, ...], baseline: str) -> None:
    if setting.valuation not in valuations:
        raise ValueError(
            f"{baseline} supports {' and '.join(valuations)} settings; setting "
            f"{setting.name!r} is {setting.valuation}"
        )


# --------------------------------------------------------------------------------------------------
# Enumeration of deterministic allocations (shared by VCG, affine maximisers and first price).


def enumerate_allocations(
    setting: Setting, *, max_allocations: int = MAX_ALLOCATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Every deterministic allocation of ``setting``: each item to one bidder or to nobody.

    A bidder's value for an allocation is ``sum(values[i] * alloc_table[a, i])``: the sum of its
    item values (additive), the value of its one item (unit-demand: allocations giving a bidder two
    items are dropped, which loses no welfare because such a bidder values only its best item), or
    the value of the bundle it receives (combinatorial: the last axis indexes ``setting.bundles``).

    Args:
      setting: the auction setting.
      max_allocations: raise rather than enumerate more than this many ``(bidders + 1) ** items``.

    Returns:
      ``(alloc_table, subsets)``: ``alloc_table [allocations, bidders, value_dim]`` float32 0/1, the
      outcome allocation of each candidate; ``subsets [allocations, bidders]`` int32, the bitmask of
      the items each bidder receives (bit ``j`` for item ``j``; 0 means nothing), for VVCA boosts.

    Raises:
      ValueError: if ``(bidders + 1) ** items`` exceeds ``max_allocations``.

    Examples:
      >>> from diffecon.settings import get_setting
      >>> table, subsets = enumerate_allocations(get_setting("additive_2x2_uniform"))
      >>> table.shape, subsets.shape
      ((9, 2, 2), (9, 2))
    """
    n, m = setting.n_bidders, setting.n_items
    total = (n + 1) ** m
    if total > max_allocations:
        raise ValueError(
            f"setting {setting.name!r} has (bidders + 1) ** items = ({n} + 1) ** {m} = {total} "
            f"deterministic allocations, more than max_allocations={max_allocations}"
        )
    owners = np.asarray(list(itertools.product(range(n + 1), repeat=m)), np.int64)  # n = nobody
    assign = owners[:, None, :] == np.arange(n)[None, :, None]  # [A, n, m]
    subsets = (assign * (1 << np.arange(m))).sum(-1)
    if setting.valuation == "additive":
        table = assign
    elif setting.valuation == "unit_demand":
        keep = assign.sum(-1).max(-1) <= 1
        table, subsets = assign[keep], subsets[keep]
    elif setting.valuation == "combinatorial":
        bundle_masks = (setting.bundles.astype(np.int64) * (1 << np.arange(m))).sum(-1)
        table = subsets[:, :, None] == bundle_masks[None, None, :]
    else:  # pragma: no cover - Setting validates its valuation kind
        raise ValueError(f"unknown valuation kind {setting.valuation!r}")
    return table.astype(np.float32), subsets.astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Affine maximisers (VCG is the special case of unit weights and zero boosts).


def _affine_scores(
    bids: jax.Array, weights: jax.Array, boosts: jax.Array, alloc_table: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Weighted values ``[B, A, n]`` of every bidder in every allocation, and ``others [B, A, n]``.

    ``others[b, a, i] = sum_{j != i} w_j v_j(a) + boost(a)``.
    """
    values = jnp.einsum("bnd,and->ban", bids, alloc_table.astype(bids.dtype))
    weighted = values * weights.astype(bids.dtype)[None, None, :]
    score = jnp.sum(weighted, axis=-1) + boosts.astype(bids.dtype)[None, :]
    return weighted, score[:, :, None] - weighted


@struct.dataclass(eq=False)
class AffineMaximizer:
    """Affine maximiser auction (AMA) over the enumerated deterministic allocations.

    Chooses ``a* = argmax_a sum_i w_i v_i(a) + boost(a)`` (ties: lowest allocation index) and
    charges ``p_i = (max_a [sum_{j != i} w_j v_j(a) + boost(a)] - [sum_{j != i} w_j v_j(a*) +
    boost(a*)]) / w_i``. With positive weights it is dominant-strategy incentive compatible and
    individually rational, and payments are non-negative. Unit weights and zero boosts give VCG.

    Attributes:
      weights: ``[bidders]`` positive bidder weights ``w``.
      boosts: ``[allocations]`` additive boosts ``boost(a)``.
      alloc_table: ``[allocations, bidders, value_dim]`` allocations: 0/1 (from
        :func:`enumerate_allocations`), or randomised for a lottery AMA (each item's shares sum to
        at most 1).
    """

    weights: _Leaf
    boosts: _Leaf
    alloc_table: _Leaf

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Run the auction on ``bids [*batch, bidders, value_dim]``."""
        _, n, d = self.alloc_table.shape
        check_bids(bids, n_bidders=n, n_items=d)
        flat, batch = _flatten_batch(jnp.asarray(bids))
        weighted, others = _affine_scores(flat, self.weights, self.boosts, self.alloc_table)
        score = others[:, :, 0] + weighted[:, :, 0]
        chosen = jnp.argmax(score, axis=-1)  # [B]
        others_at_chosen = jnp.take_along_axis(others, chosen[:, None, None], axis=1)[:, 0]
        pay = (jnp.max(others, axis=1) - others_at_chosen) / self.weights.astype(flat.dtype)[None]
        alloc = jnp.take(self.alloc_table.astype(flat.dtype), chosen, axis=0)
        return _unflatten_outcome(alloc, pay, batch)


def _positive_weights(weights, n: int) -> jax.Array:
    w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
    if w.shape != (n,):
        raise ValueError(f"weights must have shape [bidders={n}], got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"weights must be finite and positive (for DSIC and IR), got {w}")
    return jnp.asarray(w)


def affine_maximizer(
    setting: Setting,
    *,
    weights: Float[Array, " bidders"] | np.ndarray | None = None,
    boosts: Float[Array, " allocations"] | np.ndarray | None = None,
    alloc_table: Float[Array, "allocations bidders items"] | np.ndarray | None = None,
) -> AffineMaximizer:
    """An affine maximiser auction on ``setting`` with the given weights and boosts.

    Args:
      setting: the auction setting (any valuation kind with at most ``MAX_ALLOCATIONS``
        deterministic allocations, unless ``alloc_table`` is given).
      weights: ``[bidders]`` positive weights (default: ones).
      boosts: ``[allocations]`` boosts, indexed like the allocations (default: zeros).
      alloc_table: ``[allocations, bidders, items]`` randomised allocations of an additive setting
        (a lottery AMA: shares in ``[0, 1]``, each item's summing to at most 1); default: every
        deterministic allocation (:func:`enumerate_allocations`).

    Returns:
      The mechanism.

    Raises:
      ValueError: on non-positive weights, wrong shapes, too many allocations, or an allocation
        table that is not additive, leaves ``[0, 1]`` or over-allocates an item.
    """
    if alloc_table is None:
        table, _ = enumerate_allocations(setting)
    else:
        _require(setting, ("additive",), "an AMA over given (randomised) allocations")
        table = np.asarray(alloc_table, np.float32)
        n, m = setting.n_bidders, setting.n_items
        if table.ndim != 3 or table.shape[1:] != (n, m) or table.shape[0] < 1:
            raise ValueError(
                f"alloc_table must have shape [allocations, bidders={n}, items={m}], "
                f"got {table.shape}"
            )
        if not np.all(np.isfinite(table)) or table.min() < 0 or table.sum(1).max() > 1 + 1e-6:
            raise ValueError(
                "alloc_table must hold shares in [0, 1] that sum to at most 1 per item "
                f"(largest item total {table.sum(1).max():.6g})"
            )
    w = _positive_weights(weights, setting.n_bidders)
    lam = np.zeros(table.shape[0], np.float32) if boosts is None else np.asarray(boosts, np.float32)
    if lam.shape != (table.shape[0],):
        raise ValueError(f"boosts must have shape [allocations={table.shape[0]}], got {lam.shape}")
    if not np.all(np.isfinite(lam)):
        raise ValueError("boosts must be finite")
    return AffineMaximizer(weights=w, boosts=jnp.asarray(lam), alloc_table=jnp.asarray(table))


def _vvca_boosts(bundle_boosts: jax.Array, subsets: np.ndarray) -> jax.Array:
    """``boost(a) = sum_i bundle_boosts[i, subsets[a, i]]``, ``[allocations]``."""
    n = subsets.shape[1]
    return jnp.sum(bundle_boosts[jnp.arange(n)[None, :], jnp.asarray(subsets)], axis=-1)


def vvca(
    setting: Setting,
    *,
    weights: Float[Array, " bidders"] | np.ndarray | None = None,
    bundle_boosts: Float[Array, "bidders subsets"] | np.ndarray | None = None,
) -> AffineMaximizer:
    """A virtual valuations combinatorial auction (VVCA): an AMA whose boosts are per-bidder.

    ``boost(a) = sum_i bundle_boosts[i, S_i(a)]`` where ``S_i(a)`` is the set of items bidder ``i``
    receives in allocation ``a`` (as a bitmask; ``0`` is the empty set).

    Args:
      setting: the auction setting.
      weights: ``[bidders]`` positive weights (default: ones).
      bundle_boosts: ``[bidders, 2 ** items]`` boosts per bidder and item subset (default: zeros).

    Returns:
      The mechanism, as an :class:`AffineMaximizer`.
    """
    _, subsets = enumerate_allocations(setting)
    n, m = setting.n_bidders, setting.n_items
    lam = (
        np.zeros((n, 2**m), np.float32)
        if bundle_boosts is None
        else np.asarray(bundle_boosts, np.float32)
    )
    if lam.shape != (n, 2**m):
        raise ValueError(
            f"bundle_boosts must have shape [bidders={n}, subsets={2**m}], got {lam.shape}"
        )
    return affine_maximizer(
        setting, weights=weights, boosts=np.asarray(_vvca_boosts(jnp.asarray(lam), subsets))
    )


# --------------------------------------------------------------------------------------------------
# Item auctions: second price (VCG for additive bidders) and first price.


@struct.dataclass(eq=False)
class SecondPrice:
    """Separate second-price auctions with reserves, one per item (additive bidders).

    On each item the highest bid at or above the reserve wins (ties: lowest bidder index) and pays
    the larger of the reserve and the second-highest bid. With zero reserves this is VCG.

    Attributes:
      reserve: ``[items]`` reserve prices.
      n_bidders: number of bidders (static).
    """

    reserve: _Leaf
    n_bidders: int = struct.field(pytree_node=False)

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Run the auctions on ``bids [*batch, bidders, items]``."""
        check_bids(bids, n_bidders=self.n_bidders, n_items=self.reserve.shape[-1])
        flat, batch = _flatten_batch(jnp.asarray(bids))
        reserve = self.reserve.astype(flat.dtype)[None, :]
        top = jnp.max(flat, axis=1)  # [B, m]
        second = _second_highest(flat, axis=1)
        sold = top >= reserve
        winner = jax.nn.one_hot(jnp.argmax(flat, axis=1), self.n_bidders, axis=1, dtype=flat.dtype)
        alloc = winner * sold[:, None, :].astype(flat.dtype)
        price = jnp.maximum(second, reserve)
        pay = jnp.sum(alloc * price[:, None, :], axis=-1)
        return _unflatten_outcome(alloc, pay, batch)


def second_price(
    setting: Setting, *, reserve: float | Float[Array, " items"] | np.ndarray = 0.0
) -> SecondPrice:
    """Item-wise second-price auctions with ``reserve`` (a number or ``[items]``).

    Raises:
      ValueError: for non-additive settings (use :func:`vcg`) or a negative or non-finite reserve.
    """
    _require(setting, ("additive",), "second_price")
    r = np.broadcast_to(np.asarray(reserve, np.float32), (setting.n_items,))
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise ValueError(f"reserve must be finite and >= 0, got {reserve}")
    return SecondPrice(reserve=jnp.asarray(r), n_bidders=setting.n_bidders)


@struct.dataclass(eq=False)
class FirstPrice:
    """Pay-your-bid auction: the bid-maximising allocation; each winner pays its bid for its share.

    For additive bidders this is one first-price auction per item (ties: lowest bidder index); for
    unit-demand and combinatorial bidders the allocation maximises the sum of bids over
    ``alloc_table``. Not incentive compatible: the regret tests use it as a manipulable mechanism.

    Attributes:
      alloc_table: ``[allocations, bidders, value_dim]`` enumerated allocations, or ``None`` for
        item-wise first price (additive bidders).
      n_bidders: number of bidders (static).
      value_dim: size of the last axis of bids (static).
    """

    alloc_table: _Leaf
    n_bidders: int = struct.field(pytree_node=False)
    value_dim: int = struct.field(pytree_node=False)

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Run the auction on ``bids [*batch, bidders, value_dim]``."""
        check_bids(bids, n_bidders=self.n_bidders, n_items=self.value_dim)
        flat, batch = _flatten_batch(jnp.asarray(bids))
        if self.alloc_table is None:
            alloc = jax.nn.one_hot(
                jnp.argmax(flat, axis=1), self.n_bidders, axis=1, dtype=flat.dtype
            )
        else:
            table = self.alloc_table.astype(flat.dtype)
            welfare = jnp.einsum("bnd,and->ba", flat, table)
            alloc = jnp.take(table, jnp.argmax(welfare, axis=-1), axis=0)
        pay = jnp.sum(alloc * flat, axis=-1)
        return _unflatten_outcome(alloc, pay, batch)


def first_price(setting: Setting) -> FirstPrice:
    """First-price (pay-your-bid) auction on ``setting``; see :class:`FirstPrice`."""
    table = None
    if setting.valuation != "additive":
        table = jnp.asarray(enumerate_allocations(setting)[0])
    return FirstPrice(alloc_table=table, n_bidders=setting.n_bidders, value_dim=setting.value_dim)


def vcg(setting: Setting) -> SecondPrice | AffineMaximizer:
    """Vickrey-Clarke-Groves: welfare-maximising allocation with Clarke pivot payments.

    Additive bidders: each item to its highest bidder at the second-highest bid (closed form, any
    size). Unit-demand and combinatorial bidders: an exact search over the enumerated deterministic
    allocations (an :class:`AffineMaximizer` with unit weights and zero boosts).

    Raises:
      ValueError: if a non-additive setting has more than ``MAX_ALLOCATIONS`` allocations.

    Examples:
      >>> import jax.numpy as jnp
      >>> from diffecon.settings import get_setting
      >>> out = vcg(get_setting("additive_2x2_uniform"))(jnp.array([[0.9, 0.2], [0.5, 0.4]]))
      >>> out.alloc.tolist(), out.pay.tolist()
      ([[1.0, 0.0], [0.0, 1.0]], [0.5, 0.20000000298023224])
    """
    if setting.valuation == "additive":
        return second_price(setting, reserve=0.0)
    return affine_maximizer(setting)


# --------------------------------------------------------------------------------------------------
# Item-wise Myerson.


def _is_discrete(marginal: Marginal) -> bool:
    return hasattr(marginal, "discrete_virtual_values") and hasattr(marginal, "points")


@struct.dataclass
class ItemwiseMyerson:
    """Myerson's optimal single-item auction, run separately on every item.

    On item ``j`` a bid ``b_ij`` is eligible when it lies at or above the bottom of the support and
    its virtual value ``phi_ij(b_ij)`` is non-negative; the eligible bid with the highest virtual
    value wins (ties: lowest bidder index) and pays its threshold bid: the smallest bid with which
    it would still win. For a continuous marginal the threshold is
    ``max(low, phi^{-1}(max(0, best competing virtual value)))``; for a discrete marginal it is the
    smallest support point that still wins (Myerson's discrete form, with ironed virtual values).
    For symmetric regular bidders this is second price with the monopoly reserve.

    Attributes:
      marginals: ``marginals[i][j]``, the value distribution of bidder ``i`` for item ``j``.
    """

    marginals: tuple[tuple[Marginal, ...], ...] = struct.field(pytree_node=False)

    def _by_marginal(self, fn: Callable[[Marginal], jax.Array], like: jax.Array) -> jax.Array:
        """Apply ``fn`` once per distinct marginal; pick its result where that marginal applies."""
        distinct = list(dict.fromkeys(mg for row in self.marginals for mg in row))
        which = np.asarray([[distinct.index(mg) for mg in row] for row in self.marginals])
        result = jnp.zeros_like(like)
        for index, marginal in enumerate(distinct):
            mask = jnp.asarray(which == index)[None, :, :]
            result = jnp.where(mask, fn(marginal).astype(like.dtype), result)
        return result

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Run the auctions on ``bids [*batch, bidders, items]``."""
        n, m = len(self.marginals), len(self.marginals[0])
        check_bids(bids, n_bidders=n, n_items=m)
        flat, batch = _flatten_batch(jnp.asarray(bids))
        dtype = flat.dtype
        low = jnp.asarray([[mg.low for mg in row] for row in self.marginals], dtype)
        phi = self._by_marginal(lambda mg: mg.virtual_value(flat), flat)  # [B, n, m]
        eligible = (flat >= low[None]) & (phi >= 0)
        phi = jnp.where(eligible, phi, -jnp.inf)
        winner = jnp.argmax(phi, axis=1)  # [B, m]; lowest index among ties
        sold = jnp.any(eligible, axis=1)[:, None, :].astype(dtype)
        alloc = jax.nn.one_hot(winner, n, axis=1, dtype=dtype) * sold
        # Bidder i must beat (strictly) every lower-index bidder and tie or beat higher-index ones.
        order = np.arange(n)
        lower = jnp.asarray(order[None, :] < order[:, None])[None, :, :, None]  # [1, i, k, 1]
        higher = jnp.asarray(order[None, :] > order[:, None])[None, :, :, None]
        phi_k = phi[:, None, :, :]  # [B, 1(i), n(k), m]
        beat_strictly = jnp.max(jnp.where(lower, phi_k, -jnp.inf), axis=2)  # [B, n, m]
        beat_or_tie = jnp.maximum(jnp.max(jnp.where(higher, phi_k, -jnp.inf), axis=2), 0.0)
        threshold = self._by_marginal(
            lambda mg: _threshold_bid(mg, beat_strictly, beat_or_tie), flat
        )
        pay = jnp.sum(jnp.where(alloc > 0, threshold, 0.0), axis=-1)
        return _unflatten_outcome(alloc, pay, batch)


def _threshold_bid(marginal: Marginal, above: jax.Array, at_least: jax.Array) -> jax.Array:
    """Smallest bid whose virtual value is ``> above`` and ``>= at_least`` (same shapes)."""
    dtype = above.dtype
    if _is_discrete(marginal):
        points = jnp.asarray(marginal.points, dtype)  # type: ignore[attr-defined]
        # The same float32 table as Discrete.virtual_value, so ties compare exactly.
        phis = jnp.asarray(marginal.discrete_virtual_values(), jnp.float32).astype(dtype)  # type: ignore[attr-defined]
        shape = (1,) * above.ndim + (-1,)
        wins = (phis.reshape(shape) > above[..., None]) & (
            phis.reshape(shape) >= at_least[..., None]
        )
        return jnp.min(jnp.where(wins, points.reshape(shape), jnp.inf), axis=-1)
    # Continuous regular marginal: ties have probability zero, so > and >= coincide.
    level = jnp.maximum(above, at_least)
    inverse = marginal.inverse_virtual_value(level).astype(dtype)  # type: ignore[attr-defined]
    return jnp.maximum(inverse, jnp.asarray(marginal.low, dtype))


def itemwise_myerson(setting: Setting) -> ItemwiseMyerson:
    """Myerson's optimal auction on each item separately (additive, independent values).

    On one-item settings this is Myerson's optimal auction (for regular or discrete, ironed values).

    Raises:
      ValueError: for non-additive settings, correlated value models, or marginals with neither an
        ``inverse_virtual_value`` nor a discrete support.

    Examples:
      >>> import jax.numpy as jnp
      >>> from diffecon.settings import get_setting
      >>> mech = itemwise_myerson(get_setting("single_item_2_uniform"))
      >>> mech(jnp.array([[[0.8], [0.3]], [[0.8], [0.6]]])).pay.tolist()
      [[0.5, 0.0], [0.6000000238418579, 0.0]]
    """
    _require(setting, ("additive",), "itemwise_myerson")
    if not isinstance(setting.values, IndependentValues):
        raise ValueError(
            f"itemwise_myerson needs independent values; setting {setting.name!r} has "
            f"{type(setting.values).__name__}"
        )
    for row in setting.values.marginals:
        for mg in row:
            if not (_is_discrete(mg) or hasattr(mg, "inverse_virtual_value")):
                raise ValueError(
                    f"itemwise_myerson needs marginals with inverse_virtual_value or a discrete "
                    f"support; got {mg!r}"
                )
    return ItemwiseMyerson(marginals=setting.values.marginals)


# --------------------------------------------------------------------------------------------------
# Bundle Myerson: second price on the grand bundle with the revenue-optimal reserve.


@struct.dataclass(eq=False)
class BundleSecondPrice:
    """Second-price auction for the grand bundle with a reserve.

    A bidder's bid for the grand bundle is the sum of its item bids (additive) or its bid for the
    entry ``bundle_index`` of the last axis (combinatorial). The highest bundle bid at or above the
    reserve wins everything (ties: lowest index) and pays the larger of the reserve and the
    second-highest bundle bid.

    Attributes:
      reserve: scalar reserve price.
      n_bidders: number of bidders (static).
      value_dim: size of the last axis of bids (static).
      bundle_index: index of the grand bundle on the last axis, or ``-1`` for additive bids
        (static).
    """

    reserve: _Leaf
    n_bidders: int = struct.field(pytree_node=False)
    value_dim: int = struct.field(pytree_node=False)
    bundle_index: int = struct.field(pytree_node=False, default=-1)

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Run the auction on ``bids [*batch, bidders, value_dim]``."""
        check_bids(bids, n_bidders=self.n_bidders, n_items=self.value_dim)
        flat, batch = _flatten_batch(jnp.asarray(bids))
        dtype = flat.dtype
        if self.bundle_index < 0:
            bundle = jnp.sum(flat, axis=-1)
            received = jnp.ones((self.value_dim,), dtype)
        else:
            bundle = flat[:, :, self.bundle_index]
            received = jax.nn.one_hot(self.bundle_index, self.value_dim, dtype=dtype)
        reserve = jnp.asarray(self.reserve, dtype)
        sold = (jnp.max(bundle, axis=-1) >= reserve).astype(dtype)  # [B]
        winner = jax.nn.one_hot(jnp.argmax(bundle, axis=-1), self.n_bidders, dtype=dtype)
        winner = winner * sold[:, None]
        price = jnp.maximum(_second_highest(bundle, axis=-1), reserve)
        alloc = winner[:, :, None] * received[None, None, :]
        return _unflatten_outcome(alloc, winner * price[:, None], batch)


def _uniform_sum_cdf(s: np.ndarray, lows: np.ndarray, highs: np.ndarray) -> np.ndarray:
    """CDF of a sum of independent ``U[low_j, high_j]`` (inclusion-exclusion, float64)."""
    m = len(lows)
    widths = highs - lows
    corners = np.asarray(list(itertools.product((0, 1), repeat=m)), np.float64)  # [2^m, m]
    shifts, signs = corners @ widths, (-1.0) ** corners.sum(-1)
    x = np.asarray(s, np.float64)[..., None] - lows.sum() - shifts
    total = np.sum(signs * np.maximum(x, 0.0) ** m, axis=-1)
    return np.clip(total / (math.factorial(m) * np.prod(widths)), 0.0, 1.0)


def _uniform_sum_monopoly_price(lows: np.ndarray, highs: np.ndarray) -> float:
    """``argmax_r r (1 - F(r))`` for a sum of independent uniforms (log-concave, so unimodal)."""
    grid = np.linspace(lows.sum(), highs.sum(), 4097)
    revenue = grid * (1.0 - _uniform_sum_cdf(grid, lows, highs))
    k = int(np.argmax(revenue))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    golden = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):  # golden-section search on the bracketing cells
        c, d = b - golden * (b - a), a + golden * (b - a)
        fc, fd = np.array([c, d]) * (1.0 - _uniform_sum_cdf(np.array([c, d]), lows, highs))
        a, b = (a, d) if fc >= fd else (c, b)
    return float((a + b) / 2.0)


def _bundle_values(setting: Setting, values: np.ndarray) -> np.ndarray:
    if setting.valuation == "additive":
        return values.sum(-1)
    return values[..., _grand_bundle_index(setting)]


def _grand_bundle_index(setting: Setting) -> int:
    return int(np.flatnonzero(setting.bundles.sum(-1) == setting.n_items)[0])


def _sampled_bundle_reserve(setting: Setting, key: PRNGKeyArray, n_samples: int) -> float:
    """The reserve of highest revenue on sampled profiles (an exact sweep over the samples).

    Between consecutive highest bids the sample revenue ``mean([top >= r] max(second, r))`` grows
    with ``r``, so its maximum is at one of the highest bids.
    """
    bundle = _bundle_values(setting, np.asarray(setting.sample(key, n_samples), np.float64))
    ordered = np.sort(bundle, axis=-1)
    top = np.sort(ordered[:, -1])
    second = np.sort(ordered[:, -2]) if setting.n_bidders > 1 else np.zeros_like(top)
    count = len(top)
    n_top_above = count - np.searchsorted(top, top, side="left")
    first_second = np.searchsorted(second, top, side="left")
    second_tail_sums = np.append(np.cumsum(second[::-1])[::-1], 0.0)
    revenue = second_tail_sums[first_second] + top * (n_top_above - (count - first_second))
    return float(top[int(np.argmax(revenue))])


def bundle_myerson(
    setting: Setting,
    *,
    reserve: float | None = None,
    key: PRNGKeyArray | None = None,
    n_samples: int = 1 << 17,
) -> BundleSecondPrice:
    """Grand-bundle second-price auction with the revenue-optimal reserve.

    The reserve is exact where the bundle value is a sum of independent uniforms identically
    distributed across bidders (the sum is log-concave, hence regular, so the optimal reserve of a
    second-price auction is the monopoly price of the bundle, whatever the number of bidders), and
    for one item with identical bidders (Myerson's reserve). Otherwise it is the best reserve on
    ``n_samples`` sampled profiles. With one bidder this is the optimal posted price for the bundle
    (3.9292, revenue 3.4465, on ``additive_1x10_uniform``).

    Args:
      setting: an additive or combinatorial setting.
      reserve: use this reserve instead of optimising one.
      key: PRNG key for the sampled search (default ``jax.random.key(0)``).
      n_samples: profiles for the sampled search.

    Returns:
      The mechanism.

    Raises:
      ValueError: for unit-demand settings or a negative reserve.
    """
    _require(setting, ("additive", "combinatorial"), "bundle_myerson")
    if reserve is None:
        rows = setting.values.marginals if isinstance(setting.values, IndependentValues) else None
        identical = rows is not None and all(row == rows[0] for row in rows)
        if rows is not None and identical and setting.n_items == 1:
            reserve = float(rows[0][0].myerson_reserve())
        elif (
            rows is not None
            and identical
            and setting.valuation == "additive"
            and all(isinstance(mg, Uniform) for mg in rows[0])
        ):
            lows = np.array([mg.low for mg in rows[0]], np.float64)
            highs = np.array([mg.high for mg in rows[0]], np.float64)
            reserve = _uniform_sum_monopoly_price(lows, highs)
        else:
            key = jax.random.key(0) if key is None else key
            reserve = _sampled_bundle_reserve(setting, key, n_samples)
    if not (math.isfinite(reserve) and reserve >= 0):
        raise ValueError(f"reserve must be finite and >= 0, got {reserve}")
    index = -1 if setting.valuation == "additive" else _grand_bundle_index(setting)
    return BundleSecondPrice(
        reserve=jnp.asarray(reserve, jnp.float32),
        n_bidders=setting.n_bidders,
        value_dim=setting.value_dim,
        bundle_index=index,
    )


# --------------------------------------------------------------------------------------------------
# Single-bidder menus and the known optimal ones.


@struct.dataclass(eq=False)
class MenuMechanism:
    """A single-bidder menu: entries ``(allocs[k], prices[k])`` plus the null entry ``(0, 0)``.

    The bidder takes the entry of highest utility ``bids . allocs[k] - prices[k]`` (ties: the null
    entry, then the lowest index). Any menu is DSIC and IR by construction.

    Attributes:
      allocs: ``[entries, value_dim]`` allocation (lottery) of each entry.
      prices: ``[entries]`` price of each entry.
    """

    allocs: _Leaf
    prices: _Leaf

    def __call__(self, bids: Float[Array, "*batch bidders items"] | np.ndarray) -> Outcome:
        """Let the bidder choose from the menu; ``bids [*batch, 1, value_dim]``."""
        check_bids(bids, n_bidders=1, n_items=self.allocs.shape[-1])
        flat, batch = _flatten_batch(jnp.asarray(bids))
        dtype = flat.dtype
        allocs = jnp.concatenate([jnp.zeros((1, self.allocs.shape[-1]), dtype), self.allocs], 0)
        prices = jnp.concatenate([jnp.zeros((1,), dtype), self.prices.astype(dtype)], 0)
        utilities = flat[:, 0, :] @ allocs.astype(dtype).T - prices[None, :]
        choice = jnp.argmax(utilities, axis=-1)
        alloc = jnp.take(allocs, choice, axis=0)[:, None, :]
        pay = jnp.take(prices, choice, axis=0)[:, None]
        return _unflatten_outcome(alloc, pay, batch)


def _check_menu(setting: Setting, allocs: np.ndarray, prices: np.ndarray) -> MenuMechanism:
    if setting.n_bidders != 1:
        raise ValueError(
            f"a menu serves one bidder; setting {setting.name!r} has {setting.n_bidders}"
        )
    if allocs.ndim != 2 or allocs.shape[1] != setting.value_dim or prices.shape != allocs.shape[:1]:
        raise ValueError(
            f"menu needs allocs [entries, {setting.value_dim}] and prices [entries], got "
            f"{allocs.shape} and {prices.shape}"
        )
    feasible = setting.feasibility_violation(jnp.asarray(allocs[:, None, :], jnp.float32))
    if np.any(np.asarray(feasible) > 1e-6) or np.any(prices < 0):
        raise ValueError("menu entries must be feasible allocations with non-negative prices")
    return MenuMechanism(
        allocs=jnp.asarray(allocs, jnp.float32), prices=jnp.asarray(prices, jnp.float32)
    )


def _manelli_vincent_menu() -> tuple[np.ndarray, np.ndarray]:
    # Manelli & Vincent (2006), additive U[0,1]^2: each item at 2/3, the bundle at (4 - sqrt 2)/3.
    # Revenue 0.549201; checked by exact polygon integration (tests) and Monte Carlo.
    single, bundle = 2.0 / 3.0, (4.0 - math.sqrt(2.0)) / 3.0
    return np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), np.array([single, single, bundle])


def _unit_uniform_menu() -> tuple[np.ndarray, np.ndarray]:
    # Pavlov (2011), unit-demand U[0,1]^2: either item at 1/sqrt 3; revenue (1 - p^2) p = 0.384900.
    p = 1.0 / math.sqrt(3.0)
    return np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([p, p])


def _unit_uniform_23_menu() -> tuple[np.ndarray, np.ndarray]:
    # Pavlov (2011), unit-demand U[2,3]^2: either item alone at p, or the fair lottery (1/2, 1/2)
    # at q. This three-entry structure, fitted by Nelder-Mead on a 600 x 600 type grid, gave
    # 2.1332 against the reference 2.13313; the exact prices then follow in closed form. Writing
    # x = v1 - 2, y = v2 - 2, Q = q - 2, d = p - q, the buyer takes an item when |x - y| >= 2d, the
    # lottery when |x - y| < 2d and x + y >= 2Q, nothing otherwise (when Q <= d), so
    #   R = (2 + Q)(1 - 2Q^2) + d(1 - 2d)^2,
    # maximised at d = 1/6 and 6Q^2 + 8Q - 1 = 0, Q = (sqrt 22 - 4)/6: p = 2.28174, q = 2.11507,
    # R = 2.1331323. Checked by exact polygon integration and Monte Carlo (tests).
    big_q = (math.sqrt(22.0) - 4.0) / 6.0
    lottery_price = 2.0 + big_q
    item_price = lottery_price + 1.0 / 6.0
    allocs = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    return allocs, np.array([item_price, item_price, lottery_price])


def _ddt_menu() -> tuple[np.ndarray, np.ndarray]:
    # Daskalakis, Deckelbaum & Tzamos (2017), additive U[4,16] x U[4,7]. Structure identified with
    # a discretised Rochet LP (all pairwise IC constraints on a 24 x 6 type grid, ortools GLOP): a
    # lottery giving item 2 and item 1 with probability 1/2, and the grand bundle. (A softmax menu
    # search from random menus stalled at the pure-bundle local optimum, 9.6295.) Exact prices by
    # Nelder-Mead on the exact polygon-area revenue of that menu: lottery (1/2, 1) at 8, bundle at
    # 12. The buyer takes the bundle when v1 >= 8 (area 8 x 3) and the lottery when v1 < 8 and
    # v2 >= 8 - v1/2 (area 8), so R = (12 * 24 + 8 * 8) / 36 = 88/9 = 9.77778, the reference.
    return np.array([[0.5, 1.0], [1.0, 1.0]]), np.array([8.0, 12.0])


_OPTIMAL_MENUS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "additive_1x2_uniform": _manelli_vincent_menu,
    "unit_1x2_uniform": _unit_uniform_menu,
    "unit_1x2_uniform_23": _unit_uniform_23_menu,
    "additive_1x2_uniform_416_47": _ddt_menu,
}


def optimal_menu(setting: Setting) -> MenuMechanism:
    """The known revenue-optimal mechanism of a single-bidder setting, as an explicit menu.

    Known menus: ``additive_1x2_uniform`` (Manelli & Vincent 2006), ``unit_1x2_uniform`` and
    ``unit_1x2_uniform_23`` (Pavlov 2011), ``additive_1x2_uniform_416_47`` (Daskalakis, Deckelbaum
    & Tzamos 2017). Each reproduces ``setting.reference("optimal")``.

    Raises:
      ValueError: if no optimal menu is known for ``setting``.

    Examples:
      >>> from diffecon.settings import get_setting
      >>> optimal_menu(get_setting("unit_1x2_uniform")).prices.tolist()
      [0.5773502588272095, 0.5773502588272095]
    """
    try:
        build = _OPTIMAL_MENUS[setting.name]
    except KeyError:
        raise ValueError(
            f"no optimal menu is known for setting {setting.name!r}; known: "
            f"{', '.join(sorted(_OPTIMAL_MENUS))}"
        ) from None
    allocs, prices = build()
    return _check_menu(setting, allocs, prices)


def _optimal(setting: Setting) -> MenuMechanism | ItemwiseMyerson:
    """The known optimal mechanism: a menu, or Myerson's auction for one item."""
    if setting.name in _OPTIMAL_MENUS:
        return optimal_menu(setting)
    if setting.n_items == 1 and setting.valuation == "additive":
        return itemwise_myerson(setting)
    raise ValueError(
        f"no optimal mechanism is known for setting {setting.name!r}; known: single-item "
        f"settings (Myerson) and {', '.join(sorted(_OPTIMAL_MENUS))}"
    )


# --------------------------------------------------------------------------------------------------
# Searching affine maximisers for revenue.


@dataclasses.dataclass(frozen=True)
class AffineMaximizerFitConfig:
    """Hyperparameters of :func:`fit_affine_maximizer` (defaults: about a minute on a CPU core).

    Attributes:
      steps: Adam steps on the relaxed revenue.
      batch_size: fresh value profiles per step.
      learning_rate: Adam step size (boosts are in units of the mean grand-bundle value).
      temperature_start: softmax temperature at the start, relative to the value scale.
      temperature_end: temperature at the end (annealed geometrically).
      eval_every: steps between hard evaluations on the validation profiles.
      eval_samples: validation profiles; the returned mechanism is the best one seen on them.
      n_starts: independent searches run side by side (the first starts from VCG, the others from
        random boosts): the relaxed revenue has several basins, e.g. reserve-like boosts versus
        boosts that penalise the grand bundle.
      init_scale: standard deviation of the random initial boosts (units of the value scale) and,
        divided by 4, of the initial log-weights.
      menu_size: ``kind="lottery"`` only: the number of learned randomised allocations.
      logit_scale: ``kind="lottery"`` only: standard deviation of the initial allocation logits
        (each item's split among the bidders and nobody is a softmax of them).
    """

    steps: int = 2000
    batch_size: int = 512
    learning_rate: float = 0.01
    temperature_start: float = 0.05
    temperature_end: float = 0.002
    eval_every: int = 200
    eval_samples: int = 1 << 14
    n_starts: int = 8
    init_scale: float = 0.3
    menu_size: int = 128
    logit_scale: float = 2.0


AFFINE_KINDS = ("ama", "vvca", "lottery")
"""The kinds :func:`fit_affine_maximizer` searches."""

LOTTERY_FIT_CONFIG = AffineMaximizerFitConfig(
    steps=4000,
    batch_size=1024,
    learning_rate=0.01,
    temperature_start=0.005,
    temperature_end=0.001,
    eval_every=500,
    n_starts=4,
    menu_size=256,
    logit_scale=4.0,
)
"""The default search of ``kind="lottery"`` (a few minutes on a CPU): colder than the others' from
the start. With learned allocations a warm softmax lets the relaxed revenue charge for nothing
(empty lotteries whose boosts differ: each pivot minus its soft average is positive), and the
search collapses. Large initial logits start the lotteries near deterministic
allocations."""

FULL_FIT_CONFIG = AffineMaximizerFitConfig(
    steps=20_000, batch_size=4096, eval_every=1000, eval_samples=1 << 17, n_starts=32
)
"""A longer search, for benchmark runs."""


def fit_affine_maximizer(
    setting: Setting,
    *,
    kind: str = "ama",
    key: PRNGKeyArray,
    config: AffineMaximizerFitConfig | None = None,
    **overrides: Any,
) -> AffineMaximizer:
    """Search the weights and boosts of an AMA (VVCA, lottery AMA) for revenue; return the best.

    Adam ascends a relaxed revenue on fresh samples each step, from ``n_starts`` starting points
    side by side: the chosen allocation is a softmax of the affine scores at a temperature annealed
    geometrically from ``temperature_start`` to ``temperature_end`` (relative to the mean
    grand-bundle value), the pivot term a hard max. Weights are ``exp`` of free parameters, so the
    result is DSIC and IR. Every ``eval_every`` steps the hard mechanisms are scored on fixed
    validation profiles and the best parameters seen are kept.

    ``kind="lottery"`` is the lottery AMA (Curry, Sandholm and Dickerson 2023; AMenuNet's
    mechanism class without its context network): instead of the enumerated deterministic
    allocations the AMA chooses among ``config.menu_size`` randomised allocations that are learned
    with the boosts (each item split among the bidders and nobody by a softmax). The allocations
    do not depend on the bids, so the result is DSIC and IR as any AMA, and it scales to settings
    with too many deterministic allocations to enumerate (e.g. 3 bidders and 10 items).

    Args:
      setting: the auction setting (at most ``MAX_ALLOCATIONS`` deterministic allocations, except
        for ``"lottery"``, which needs additive values).
      kind: ``"ama"`` (one boost per allocation), ``"vvca"`` (one boost per bidder and subset) or
        ``"lottery"`` (learned randomised allocations, one boost each).
      key: PRNG key.
      config: hyperparameters (default :class:`AffineMaximizerFitConfig`, or
        :data:`LOTTERY_FIT_CONFIG` for ``"lottery"``).
      **overrides: fields of the config to override, e.g. ``steps=500``.

    Returns:
      The fitted :class:`AffineMaximizer`.

    Raises:
      ValueError: on an unknown ``kind`` or config field, or a setting the kind does not support.
    """
    if kind not in AFFINE_KINDS:
        raise ValueError(f"kind must be one of {AFFINE_KINDS}, got {kind!r}")
    config = config or (LOTTERY_FIT_CONFIG if kind == "lottery" else AffineMaximizerFitConfig())
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config)}
    if unknown:
        raise ValueError(
            f"unknown fit_affine_maximizer options {sorted(unknown)}; valid: "
            f"{[f.name for f in dataclasses.fields(config)]}"
        )
    config = dataclasses.replace(config, **overrides)
    if min(
        config.batch_size, config.eval_every, config.n_starts, config.eval_samples, config.menu_size
    ) < 1 or (config.steps < 0):
        raise ValueError(f"invalid fit config {config}")

    n, m = setting.n_bidders, setting.n_items
    if kind == "lottery":
        _require(setting, ("additive",), "the lottery AMA")
        table_np, subsets = np.zeros((0, n, m), np.float32), np.zeros((0, n), np.int32)
    else:
        table_np, subsets = enumerate_allocations(setting)
    fixed_table = jnp.asarray(table_np)
    key_val, key_scale, key_train, key_init = jax.random.split(key, 4)
    validation = setting.sample(key_val, config.eval_samples)
    scale = float(
        np.mean(_bundle_values(setting, np.asarray(setting.sample(key_scale, 4096), np.float64)))
    )

    def mechanism_of(params) -> AffineMaximizer:
        weights = jnp.exp(params["log_weights"])
        if kind == "vvca":
            boosts = scale * _vvca_boosts(params["boosts"], subsets)
        else:
            boosts = scale * params["boosts"]
        if kind == "lottery":
            # [K, m, n + 1] -> each item's shares of the n bidders (the last share is nobody's)
            shares = jax.nn.softmax(params["alloc_logits"], axis=-1)[..., :n]
            table = jnp.swapaxes(shares, -1, -2)  # [K, n, m]
        else:
            table = fixed_table
        return AffineMaximizer(weights=weights, boosts=boosts, alloc_table=table)

    def relaxed_revenue(params, values, temperature):
        mech = mechanism_of(params)
        weighted, others = _affine_scores(values, mech.weights, mech.boosts, mech.alloc_table)
        score = others[:, :, 0] + weighted[:, :, 0]
        chosen = jax.nn.softmax(score / (temperature * scale), axis=-1)
        pivots = jnp.max(others, axis=1) - jnp.einsum("ba,ban->bn", chosen, others)
        pay = pivots / mech.weights[None]
        return jnp.mean(jnp.sum(pay, axis=-1))

    if kind == "lottery":
        boost_shape: tuple[int, ...] = (config.menu_size,)
    elif kind == "ama":
        boost_shape = (fixed_table.shape[0],)
    else:
        boost_shape = (n, 2**m)
    key_boosts, key_weights, key_logits = jax.random.split(key_init, 3)
    # start 0 is VCG (for the lottery AMA: unit weights and zero boosts on random lotteries)
    first = jnp.arange(config.n_starts)[:, None] > 0
    params = {
        "log_weights": jnp.where(
            first,
            0.25 * config.init_scale * jax.random.normal(key_weights, (config.n_starts, n)),
            0.0,
        ),
        "boosts": jnp.where(
            first.reshape((-1,) + (1,) * len(boost_shape)),
            config.init_scale * jax.random.normal(key_boosts, (config.n_starts, *boost_shape)),
            0.0,
        ),
    }
    if kind == "lottery":
        params["alloc_logits"] = config.logit_scale * jax.random.normal(
            key_logits, (config.n_starts, config.menu_size, m, n + 1)
        )
    optimizer = optax.adam(config.learning_rate)  # coordinate-wise, so the starts stay independent
    decay = (config.temperature_end / config.temperature_start) ** (1.0 / max(config.steps, 1))
    loss_grad = jax.vmap(
        jax.grad(lambda p, values, temperature: -relaxed_revenue(p, values, temperature)),
        in_axes=(0, None, None),
    )

    @jax.jit
    def train_chunk(params, opt_state, step0, chunk_key):
        def body(carry, step):
            params, opt_state = carry
            values = setting.sample(jax.random.fold_in(chunk_key, step), config.batch_size)
            temperature = config.temperature_start * decay ** step.astype(jnp.float32)
            grads = loss_grad(params, values, temperature)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        steps = step0 + jnp.arange(config.eval_every)
        (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), steps)
        return params, opt_state

    # Validation profiles enter as an argument, not as a closed-over constant for XLA to fold.
    evaluate = jax.jit(
        jax.vmap(
            lambda params, values: jnp.mean(mechanism_of(params)(values).revenue),
            in_axes=(0, None),
        )
    )

    def take(params, start):
        return jax.tree.map(lambda x: x[start], params)

    opt_state = optimizer.init(params)
    revenues = np.asarray(evaluate(params, validation))
    best_params, best_revenue = take(params, int(np.argmax(revenues))), float(np.max(revenues))
    done = 0
    while done < config.steps:
        params, opt_state = train_chunk(
            params, opt_state, jnp.asarray(done), jax.random.fold_in(key_train, done)
        )
        done += config.eval_every
        revenues = np.asarray(evaluate(params, validation))
        if float(np.max(revenues)) > best_revenue:
            best_params = take(params, int(np.argmax(revenues)))
            best_revenue = float(np.max(revenues))
    best = mechanism_of(best_params)
    return affine_maximizer(
        setting,
        weights=np.asarray(best.weights),
        boosts=np.asarray(best.boosts),
        alloc_table=np.asarray(best.alloc_table) if kind == "lottery" else None,
    )


# --------------------------------------------------------------------------------------------------
# Registry.


def _fit(kind: str) -> Callable[..., AffineMaximizer]:
    def fit(setting: Setting, *, key: PRNGKeyArray | None = None, **kwargs: Any) -> AffineMaximizer:
        if key is None:
            raise ValueError(f"baseline {kind!r} searches its parameters and needs key=")
        return fit_affine_maximizer(setting, kind=kind, key=key, **kwargs)

    fit.__doc__ = f"``fit_affine_maximizer(setting, kind={kind!r}, key=key, **kwargs)``."
    return fit


_BASELINES: dict[str, Callable[..., Any]] = {
    "vcg": vcg,
    "itemwise_myerson": itemwise_myerson,
    "bundle_myerson": bundle_myerson,
    "optimal": _optimal,
    "first_price": first_price,
    "second_price": second_price,
    "vvca": _fit("vvca"),
    "ama": _fit("ama"),
    "lottery_ama": _fit("lottery"),
}

BASELINE_NAMES: tuple[str, ...] = tuple(_BASELINES)
"""Names accepted by :func:`make_baseline`."""


def make_baseline(
    name: str, setting: Setting, *, key: PRNGKeyArray | None = None, **kwargs: Any
) -> Any:
    """Build the baseline ``name`` for ``setting``.

    Every baseline accepts ``key``, so callers can build any of them the same way: the searched
    ones (``vvca``, ``ama``, ``lottery_ama``) need it, ``bundle_myerson`` uses it when it samples
    for its reserve, and the deterministic ones ignore it.

    Args:
      name: one of :data:`BASELINE_NAMES`: ``vcg``, ``itemwise_myerson``, ``bundle_myerson``,
        ``optimal`` (a known optimal menu, or Myerson for one item), ``first_price``,
        ``second_price``, ``vvca``, ``ama`` and ``lottery_ama`` (:func:`fit_affine_maximizer`
        with ``kind="lottery"``).
      setting: the auction setting.
      key: PRNG key for baselines that search or sample.
      **kwargs: keyword arguments of the factory (``reserve=...``, ``steps=...``).

    Returns:
      The mechanism.

    Raises:
      ValueError: on an unknown name or option, a missing key, or a setting the baseline does not
        support.

    Examples:
      >>> from diffecon.settings import get_setting
      >>> type(make_baseline("vcg", get_setting("CA_sym_uniform_12"))).__name__
      'AffineMaximizer'
    """
    try:
        factory = _BASELINES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown baseline {name!r}; valid names: {', '.join(BASELINE_NAMES)}"
        ) from None
    parameters = inspect.signature(factory).parameters
    if "key" in parameters:
        kwargs["key"] = key
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        options = [p for p in parameters if p != "setting"]
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise ValueError(f"baseline {name!r} takes options {options}, got unknown {unknown}")
    return factory(setting, **kwargs)
