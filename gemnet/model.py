"""GemNet: one menu network per bidder, fed with the other bidders' bids.

Bidder ``i``'s network maps ``b_-i`` (``[(n-1) * m]``; a constant input when ``n = 1``) to ``K``
menu elements, each an allocation ``alpha in [0, 1]^m`` (a sigmoid per item for additive bidders, a
softmax over ``m`` items plus a dummy for unit-demand bidders) and a price ``beta >= 0``. A null
element ``(0, 0)`` is appended as element ``K``. Bidder ``i`` gets its utility-maximising element
(``argmax`` breaks ties towards the lowest index, so a real element beats the null one on a tie).
Because bidder ``i``'s menu does not depend on ``b_i``, truth-telling is dominant whenever the
chosen elements are compatible (no item allocated more than once); with one bidder this is
RochetNet.

The per-bidder networks are one stacked MLP (weights ``[bidders, in, out]``), so a forward pass is a
few batched matrix products and interval bound propagation (:func:`menu_bounds`) is exact layer by
layer arithmetic on the same weights.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jaxtyping import Array, Float

from diffecon.outcome import Outcome, check_bids
from diffecon.settings import Setting

__all__ = [
    "Choice",
    "GemNet",
    "GemNetConfig",
    "Menus",
    "choose",
    "menu_bounds",
    "menu_utilities",
    "others_bids",
]


CLIP_ZERO_MARGIN = 1e-3  # logit margin under which a clipped allocation is exactly 0
TINY_ALLOC = 1e-30  # a positive stand-in for allocation bounds that are not robustly 0


@dataclasses.dataclass(frozen=True)
class GemNetConfig:
    """Network shape of a GemNet (training hyperparameters live in ``GemNetTrainConfig``).

    Attributes:
      menu_size: ``K``, learned menu elements per bidder (the null element comes on top).
      hidden: units per hidden layer of each bidder's network.
      layers: hidden layers (ignored for one bidder: RochetNet's menu is a free parameter table).
      init_logit_scale: spread of the initial allocation logits across elements.
      alloc_clip: additive allocations are ``clip((1 + 2c) sigmoid(z) - c, 0, 1)`` with this ``c``
        (0: a plain sigmoid). With ``c > 0`` an element can allocate an item exactly 0 or 1, which
        lets two bidders split the items exactly (a sigmoid's tails always overlap a little).
    """

    menu_size: int = 128
    hidden: int = 128
    layers: int = 2
    init_logit_scale: float = 2.0
    alloc_clip: float = 0.0


@struct.dataclass
class Menus:
    """Every bidder's menu at a batch of profiles.

    Attributes:
      alloc: ``[*batch, bidders, K + 1, items]`` allocations; element ``K`` is the null element.
      price: ``[*batch, bidders, K + 1]`` prices (``>= 0``; 0 for the null element).
    """

    alloc: Any
    price: Any


def others_bids(
    bids: Float[Array, "*batch bidders items"],
) -> Float[Array, "*batch bidders others"]:
    """``[*batch, bidders, (bidders - 1) * items]``: row ``i`` holds ``b_-i`` (others in order)."""
    n, m = bids.shape[-2:]
    if n == 1:
        return jnp.ones((*bids.shape[:-2], 1, 1), bids.dtype)
    idx = np.array([[j for j in range(n) if j != i] for i in range(n)])  # [n, n-1]
    return bids[..., idx, :].reshape(*bids.shape[:-2], n, (n - 1) * m)


class GemNet(nnx.Module):
    """GemNet menus for additive or unit-demand bidders on a bounded support.

    ``model(bids [*batch, bidders, items]) -> Outcome`` applies the hard choice;
    ``model.menus(bids)`` returns every bidder's menu. Pure: no RNG, no mutation.

    Args:
      n_bidders: number of bidders.
      n_items: number of items.
      valuation: ``additive`` or ``unit_demand``.
      low: ``[bidders, items]`` lower end of the support (inputs are rescaled to ``[0, 1]``).
      high: ``[bidders, items]`` upper end of the support.
      config: network shape.
      rngs: initialisation randomness.
    """

    def __init__(
        self,
        *,
        n_bidders: int,
        n_items: int,
        valuation: str = "additive",
        low: np.ndarray,
        high: np.ndarray,
        config: GemNetConfig = GemNetConfig(),
        rngs: nnx.Rngs,
    ):
        if valuation not in ("additive", "unit_demand"):
            raise ValueError(
                f"GemNet supports additive and unit_demand bidders, got valuation={valuation!r}"
            )
        low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
        if low.shape != (n_bidders, n_items) or high.shape != (n_bidders, n_items):
            raise ValueError(
                f"low/high must have shape (bidders, items) = {(n_bidders, n_items)}, got "
                f"{low.shape} and {high.shape}"
            )
        if not (np.all(np.isfinite(high)) and np.all(high > low)):
            raise ValueError("GemNet needs a bounded support with high > low for every value")
        self.n_bidders, self.n_items, self.valuation = n_bidders, n_items, valuation
        self.menu_size = config.menu_size
        self.alloc_clip = float(config.alloc_clip)
        if not 0.0 <= self.alloc_clip < 1.0:
            raise ValueError(f"alloc_clip must be in [0, 1), got {config.alloc_clip}")
        n, m, k = n_bidders, n_items, config.menu_size
        # Static input scaling (hashable tuples: they belong to the graph, not to the parameters).
        self.low = tuple(map(float, low.ravel()))
        self.high = tuple(map(float, high.ravel()))
        # A price scale of the grand bundle's highest value keeps the raw price outputs O(1).
        self.price_scale = float(np.max(np.sum(high, axis=1)))
        n_in = 1 if n == 1 else (n - 1) * m
        n_alloc = k * (m + 1 if valuation == "unit_demand" else m)
        n_out = n_alloc + k
        sizes = [n_in] + ([] if n == 1 else [config.hidden] * config.layers) + [n_out]
        glorot = nnx.initializers.glorot_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.weights = nnx.List(
            [nnx.Param(glorot(rngs.params(), (n, a, b))) for a, b in itertools.pairwise(sizes)]
        )
        biases = [jnp.zeros((n, b)) for b in sizes[1:]]
        # Spread the initial menu: random allocation logits, prices uniform over the value range.
        k_logit, k_price = jax.random.split(rngs.params())
        logit0 = config.init_logit_scale * jax.random.normal(k_logit, (n, n_alloc))
        price_frac = jax.random.uniform(k_price, (n, k), minval=0.05, maxval=0.95)
        price0 = jnp.log(jnp.expm1(price_frac))  # softplus^-1
        biases[-1] = jnp.concatenate([logit0, price0], axis=-1)
        self.biases = nnx.List([nnx.Param(b) for b in biases])

    @classmethod
    def for_setting(
        cls, setting: Setting, config: GemNetConfig = GemNetConfig(), *, rngs: nnx.Rngs
    ) -> GemNet:
        """A GemNet shaped for ``setting`` (which must have a bounded support)."""
        if setting.valuation not in ("additive", "unit_demand"):
            raise ValueError(
                f"GemNet supports additive and unit_demand settings; {setting.name!r} is "
                f"{setting.valuation}"
            )
        if not setting.bounded:
            raise ValueError(
                f"GemNet needs a bounded value support; {setting.name!r} is unbounded "
                f"(high = {setting.high.tolist()})"
            )
        return cls(
            n_bidders=setting.n_bidders,
            n_items=setting.n_items,
            valuation=setting.valuation,
            low=setting.low,
            high=setting.high,
            config=config,
            rngs=rngs,
        )

    # ------------------------------------------------------------------------------------------
    def input_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """``(shift, scale)``, each ``[bidders, in]``: the input is ``(b_-i - shift) * scale``."""
        n, m = self.n_bidders, self.n_items
        if n == 1:
            return np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32)
        low = np.asarray(self.low).reshape(n, m)
        width = np.asarray(self.high).reshape(n, m) - low
        rows = [[j for j in range(n) if j != i] for i in range(n)]
        shift = np.stack([low[r].ravel() for r in rows]).astype(np.float32)
        scale = np.stack([1.0 / width[r].ravel() for r in rows]).astype(np.float32)
        return shift, scale

    def _head(self, out):
        """Raw network outputs ``[*batch, bidders, n_out]`` to (alloc logits, raw prices)."""
        m, k = self.n_items, self.menu_size
        width = m + 1 if self.valuation == "unit_demand" else m
        logits = out[..., : k * width].reshape(*out.shape[:-1], k, width)
        return logits, out[..., k * width :]

    def _alloc_from_logits(self, logits):
        if self.valuation == "unit_demand":
            return jax.nn.softmax(logits, axis=-1)[..., : self.n_items]
        return self._additive_alloc(logits)

    def _additive_alloc(self, logits):
        # monotone in the logits, so interval bounds map through it endpoint by endpoint
        if self.alloc_clip == 0.0:
            return jax.nn.sigmoid(logits)
        c = self.alloc_clip
        return jnp.clip((1.0 + 2.0 * c) * jax.nn.sigmoid(logits) - c, 0.0, 1.0)

    def raw_outputs(
        self, x: Float[Array, "*batch bidders inputs"]
    ) -> Float[Array, "*batch bidders outputs"]:
        """The stacked networks' outputs on scaled inputs ``[*batch, bidders, in]``."""
        h = x
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = jnp.einsum("...ni,nio->...no", h, w[...]) + b[...]
            if layer < last:
                h = jnp.tanh(h)
        return h

    def menus(self, bids: Float[Array, "*batch bidders items"]) -> Menus:
        """Every bidder's menu (null element last) at ``bids``; ``bids_i`` itself is never read."""
        n, m = self.n_bidders, self.n_items
        check_bids(bids, n_bidders=n, n_items=m)
        shift, scale = self.input_affine()
        x = (others_bids(bids) - shift) * scale
        logits, raw_price = self._head(self.raw_outputs(x))
        alloc = self._alloc_from_logits(logits)  # [*batch, n, K, m]
        price = self.price_scale * jax.nn.softplus(raw_price)  # [*batch, n, K]
        null_alloc = jnp.zeros((*alloc.shape[:-2], 1, m), alloc.dtype)
        null_price = jnp.zeros((*price.shape[:-1], 1), price.dtype)
        return Menus(
            alloc=jnp.concatenate([alloc, null_alloc], axis=-2),
            price=jnp.concatenate([price, null_price], axis=-1),
        )

    def __call__(self, bids: Float[Array, "*batch bidders items"]) -> Outcome:
        return choose(self.menus(bids), bids).outcome

    def soft_outcome(self, bids: Float[Array, "*batch bidders items"], *, kappa) -> Outcome:
        """Training's relaxation: element weights ``softmax(kappa * utility)`` instead of argmax."""
        menus = self.menus(bids)
        u = menu_utilities(menus, bids)
        weights = jax.nn.softmax(kappa * u, axis=-1)  # [*batch, n, K+1]
        alloc = jnp.einsum("...k,...km->...m", weights, menus.alloc)
        pay = jnp.sum(weights * menus.price, axis=-1)
        return Outcome(alloc=alloc, pay=pay)


def menu_utilities(
    menus: Menus, values: Float[Array, "*batch bidders items"]
) -> Float[Array, "*batch bidders elements"]:
    """``[*batch, bidders, K + 1]`` each bidder's utility for each element of its menu."""
    return jnp.einsum("...m,...km->...k", values, menus.alloc) - menus.price


@struct.dataclass
class Choice:
    """Hard choice: ``index [*batch, bidders]`` of the chosen elements and the resulting outcome."""

    index: Any
    outcome: Any


def choose(menus: Menus, values: Float[Array, "*batch bidders items"]) -> Choice:
    """Each bidder's utility-maximising element (ties: lowest index) and the Outcome it implies."""
    index = jnp.argmax(menu_utilities(menus, values), axis=-1)  # [*batch, n]
    alloc = jnp.take_along_axis(menus.alloc, index[..., None, None], axis=-2)[..., 0, :]
    pay = jnp.take_along_axis(menus.price, index[..., None], axis=-1)[..., 0]
    return Choice(index=index, outcome=Outcome(alloc=alloc, pay=pay))


# --------------------------------------------------------------------------------------------------
# Interval bound propagation.


def _interval_softmax(lo, hi):
    """Bounds of ``softmax(z)`` over ``z in [lo, hi]`` (last axis), exact per coordinate."""
    # softmax_j is increasing in z_j and decreasing in z_k (k != j): take the extremes.
    shift = jax.lax.stop_gradient(jnp.max(hi, axis=-1, keepdims=True))
    e_lo, e_hi = jnp.exp(lo - shift), jnp.exp(hi - shift)
    tot_lo, tot_hi = jnp.sum(e_lo, -1, keepdims=True), jnp.sum(e_hi, -1, keepdims=True)
    low = e_lo / (e_lo + (tot_hi - e_hi))
    high = e_hi / (e_hi + (tot_lo - e_lo))
    return low, high


def menu_bounds(
    model: GemNet,
    others_lo: Float[Array, "*batch bidders inputs"],
    others_hi: Float[Array, "*batch bidders inputs"],
) -> Menus:
    """Sound bounds of every bidder's menu while ``b_-i`` ranges over ``[others_lo, others_hi]``.

    ``others_lo[..., i, :]`` and ``others_hi[..., i, :]`` bound bidder ``i``'s input ``b_-i`` (as
    laid out by :func:`others_bids`; ignored for one bidder). Interval bound propagation through
    the stacked network (monotone activations, so each layer's image of a box is bounded by
    centre/radius arithmetic). Returns ``Menus`` whose ``alloc`` and ``price`` have a leading axis
    of 2, ``[0]`` lower and ``[1]`` upper bounds, each ``[*batch, bidders, K + 1, items]`` and
    ``[*batch, bidders, K + 1]``. Bounds are exact real-arithmetic bounds up to floating-point
    rounding; certification adds a tolerance for that.
    """
    n = model.n_bidders
    batch = others_lo.shape[:-2]
    if others_lo.shape != others_hi.shape or others_lo.shape[-2] != n:
        raise ValueError(
            f"others_lo/others_hi must be [*batch, {n}, inputs], got {others_lo.shape} and "
            f"{others_hi.shape}"
        )
    shift, scale = model.input_affine()
    if n == 1:
        lo = hi = jnp.ones((*batch, 1, 1), jnp.float32)
    else:
        lo, hi = (others_lo - shift) * scale, (others_hi - shift) * scale
    last = len(model.weights) - 1
    for layer, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        centre, radius = (lo + hi) / 2, (hi - lo) / 2
        c = jnp.einsum("...ni,nio->...no", centre, w[...]) + b[...]
        r = jnp.einsum("...ni,nio->...no", radius, jnp.abs(w[...]))
        lo, hi = c - r, c + r
        if layer < last:
            lo, hi = jnp.tanh(lo), jnp.tanh(hi)
    logit_lo, price_lo = model._head(lo)
    logit_hi, price_hi = model._head(hi)
    if model.valuation == "unit_demand":
        a_lo, a_hi = _interval_softmax(logit_lo, logit_hi)
        a_lo, a_hi = a_lo[..., : model.n_items], a_hi[..., : model.n_items]
    else:
        a_lo, a_hi = model._additive_alloc(logit_lo), model._additive_alloc(logit_hi)
        # An upper bound is exactly 0 only where the clipped head stays 0 even CLIP_ZERO_MARGIN
        # above the logit bound (robust to float32 rounding); elsewhere it is positive, so that
        # the certificate's allocation tolerance applies to it.
        if model.alloc_clip:
            robust_zero = model._additive_alloc(logit_hi + CLIP_ZERO_MARGIN) == 0.0
            a_hi = jnp.where(robust_zero, 0.0, jnp.maximum(a_hi, TINY_ALLOC))
        else:
            a_hi = jnp.maximum(a_hi, TINY_ALLOC)
    p_lo = model.price_scale * jax.nn.softplus(price_lo)
    p_hi = model.price_scale * jax.nn.softplus(price_hi)
    null_a = jnp.zeros((*a_lo.shape[:-2], 1, model.n_items), a_lo.dtype)
    null_p = jnp.zeros((*p_lo.shape[:-1], 1), p_lo.dtype)
    alloc = jnp.stack([jnp.concatenate([a_lo, null_a], -2), jnp.concatenate([a_hi, null_a], -2)])
    price = jnp.stack([jnp.concatenate([p_lo, null_p], -1), jnp.concatenate([p_hi, null_p], -1)])
    return Menus(alloc=alloc, price=price)
