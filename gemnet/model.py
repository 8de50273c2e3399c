"""GemNet: one menu network per bidder, fed with the other bidders' bids.

Bidder ``i``'s network maps ``b_-i`` (``[(n-1) * m]``; a constant input when ``n = 1``) to ``K``
menu elements, each an allocation ``alpha in [0, 1]^m`` (a sigmoid per item for additive bidders, a
softmax over ``m`` items plus a dummy for unit-demand bidders) and a price ``beta >= 0``. A null
element ``(0, 0)`` is appended last (after the optional item-price bundles, see
``GemNetConfig.item_prices``). Bidder ``i`` gets its utility-maximising element
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
    "grid_cells",
    "menu_bounds",
    "menu_utilities",
    "others_bids",
    "quantize_bids",
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
      item_prices: also append the deterministic bundles priced additively at per-item prices
        ``q_ij = max(r_ij(b_-i), max_{k != i} b_kj + eps_j)`` (after the ``K`` learned
        elements, before the null element): every nonempty bundle for additive bidders
        (``2^m - 1``), every single item for unit-demand ones (``m``); ``r_ij`` is a learned
        reserve in ``[0, high_j]`` and ``eps_j`` is ``TIE_MARGIN`` times ``high_j``. A menu of
        ``K`` learned elements alone cannot post item prices on many items (it would need
        ``2^m`` elements); these bundles hold second-price auctions with learned reserves
        (item-wise Myerson at ``r = 1/2`` on U[0, 1], up to ``eps``), and two bidders never both
        buy an item through them, ties included: only the learned elements can conflict. The
        repair does not support these menus.
      fees: surcharges on the item-price bundles (needs ``item_prices``), learned functions of
        ``b_-i``: ``""`` none; ``"entry"`` one entry fee ``f_i(b_-i) >= 0`` on every bundle
        (bidder ``i`` enters when its surplus ``sum_j (v_ij - q_ij)^+`` at the item prices covers
        the fee, then buys the items it values above their prices: a second-price auction with
        reserves and bidder-specific entry fees, Yao 2015, Cai, Devanur and Weinberg 2016; with
        many items a bidder's surplus concentrates and the fee collects much of it); ``"bundle"``
        a fee ``f_i(S) >= 0`` per bundle, made monotone in ``S`` (``f(S) >= f(S - {j})``, by a
        running maximum over subsets; one bidder's Manelli-Vincent menu is item prices plus such
        fees). A monotone fee never lowers the price of adding an item to a bundle below its item
        price, so an item is still bought only above the highest other bid and the bundles stay
        compatible (``GemNet.compatible_by_construction``).
      activation: hidden-layer nonlinearity, ``"tanh"`` or ``"relu"``. A ReLU network is
        piecewise linear in ``b_-i``, like the prices of an affine maximiser (a difference of
        maxima of affine functions of the others' bids), whose choice boundaries for two bidders
        coincide; on ``additive_2x2_uniform`` it trains to a higher revenue than tanh at the same
        size and steps (see the README's GemNet section).
    """

    menu_size: int = 128
    hidden: int = 128
    layers: int = 2
    init_logit_scale: float = 2.0
    alloc_clip: float = 0.0
    item_prices: bool = False
    fees: str = ""
    activation: str = "tanh"


ACTIVATIONS = ("tanh", "relu")
FEES = ("", "entry", "bundle")


def hidden_activation(name: str):
    """The hidden-layer nonlinearity called ``name`` (one of :data:`ACTIVATIONS`)."""
    if name == "tanh":
        return jnp.tanh
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


MAX_ITEM_PRICE_ITEMS = 12  # 2^12 - 1 bundle elements at most
# Item prices sit this share of the item's top value above the highest other bid, so two bidders
# never both buy an item through them, ties and float32 rounding of the utilities included.
TIE_MARGIN = 1e-4


def bundle_matrix(n_items: int, valuation: str) -> np.ndarray:
    """``[bundles, items]`` 0/1 rows of the item-price elements (see ``GemNetConfig``)."""
    if valuation == "unit_demand":
        return np.eye(n_items, dtype=np.float32)
    codes = np.arange(1, 2**n_items)
    return ((codes[:, None] >> np.arange(n_items)) & 1).astype(np.float32)


def _monotone_over_subsets(fee, n_items: int):
    """``[..., 2^m - 1]`` bundle fees (row ``c - 1`` is the bundle with bit code ``c``) raised to
    their running maximum over subsets, ``f(S) = max_{T subset of S} f(T)``: monotone in ``S``."""
    g = jnp.concatenate([jnp.zeros_like(fee[..., :1]), fee], axis=-1)  # the empty bundle: 0
    codes = np.arange(2**n_items)
    for j in range(n_items):
        has_j = (codes >> j) & 1 == 1
        g = jnp.where(has_j, jnp.maximum(g, g[..., codes ^ (1 << j)]), g)
    return g[..., 1:]


@struct.dataclass
class Menus:
    """Every bidder's menu at a batch of profiles.

    Attributes:
      alloc: ``[*batch, bidders, elements, items]`` allocations: the ``K`` learned elements,
        the item-price bundles if ``GemNetConfig.item_prices``, and the null element last
        (``elements = K + 1`` without item prices).
      price: ``[*batch, bidders, elements]`` prices (``>= 0``; 0 for the null element).
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
        hidden_activation(config.activation)  # validates the name
        self.activation = str(config.activation)
        if not 0.0 <= self.alloc_clip < 1.0:
            raise ValueError(f"alloc_clip must be in [0, 1), got {config.alloc_clip}")
        n, m, k = n_bidders, n_items, config.menu_size
        # Static input scaling (hashable tuples: they belong to the graph, not to the parameters).
        self.low = tuple(map(float, low.ravel()))
        self.high = tuple(map(float, high.ravel()))
        # A price scale of the grand bundle's highest value keeps the raw price outputs O(1).
        self.price_scale = float(np.max(np.sum(high, axis=1)))
        self.item_prices = bool(config.item_prices)
        if config.fees not in FEES:
            raise ValueError(f"fees must be one of {FEES}, got {config.fees!r}")
        self.fees = str(config.fees)
        if self.fees and not self.item_prices:
            raise ValueError(
                f"fees={self.fees!r} prices the item-price bundles; it needs item_prices"
            )
        if config.menu_size < 0 or (config.menu_size == 0 and not self.item_prices):
            raise ValueError(
                f"menu_size must be >= 1 (>= 0 with item_prices), got {config.menu_size}"
            )
        if self.item_prices and valuation == "additive" and m > MAX_ITEM_PRICE_ITEMS:
            raise ValueError(
                f"item_prices appends 2^m - 1 bundles; m = {m} items is more than "
                f"{MAX_ITEM_PRICE_ITEMS}"
            )
        # posted item prices are scaled by the item's highest value
        self.item_scale = tuple(float(x) for x in np.max(high, axis=0))
        n_in = 1 if n == 1 else (n - 1) * m
        n_alloc = k * (m + 1 if valuation == "unit_demand" else m)
        n_fees = {"": 0, "entry": 1, "bundle": len(bundle_matrix(m, valuation))}[self.fees]
        n_item_out = (m if self.item_prices else 0) + n_fees
        n_out = n_alloc + k + n_item_out
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
        # posted item prices (in [0, highest value]) start at half the item's highest value
        item0 = jnp.zeros((n, m if self.item_prices else 0))
        if n_fees:  # fees start at 1% of the grand bundle's highest value
            fee0 = jnp.full((n, n_fees), float(np.log(np.expm1(0.01))))
            item0 = jnp.concatenate([item0, fee0], axis=-1)
        biases[-1] = jnp.concatenate([logit0, price0, item0], axis=-1)
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

    @property
    def n_elements(self) -> int:
        """Menu length: ``K`` learned elements, the item-price bundles if any, the null element."""
        extra = len(bundle_matrix(self.n_items, self.valuation)) if self.item_prices else 0
        return self.menu_size + extra + 1

    @property
    def compatible_by_construction(self) -> bool:
        """Whether no profile can over-allocate, whatever the weights: one bidder, or a menu of
        item-price bundles only (``menu_size == 0`` with ``item_prices``).

        Proof for the bundles: bidder ``i``'s utility for bundle ``S`` plus item ``j`` minus its
        utility for ``S`` is ``v_ij - q_ij`` minus a fee difference ``>= 0`` (fees are monotone),
        so a utility-maximising bidder buys ``j`` only if ``v_ij >= q_ij > max_{k != i} b_kj +
        eps_j``. Two bidders ``i, k`` buying ``j`` would need ``v_ij > v_kj + eps_j`` and
        ``v_kj > v_ij + eps_j``. Float32 rounding of the utilities (``~1e-6`` of the value
        scale) stays below ``eps_j = TIE_MARGIN * high_j``.
        """
        return self.n_bidders == 1 or (self.item_prices and self.menu_size == 0)

    def _head(self, out):
        """Raw network outputs ``[*batch, bidders, n_out]`` to (alloc logits, raw prices)."""
        m, k = self.n_items, self.menu_size
        width = m + 1 if self.valuation == "unit_demand" else m
        logits = out[..., : k * width].reshape(*out.shape[:-1], k, width)
        return logits, out[..., k * width : k * width + k]

    def _bundle_elements(self, out, bids):
        """The item-price elements (alloc ``[*batch, n, B, m]``, price ``[*batch, n, B]``)."""
        n, m = self.n_bidders, self.n_items
        fee = None
        if self.fees:  # the fees' outputs come last, after the item prices'
            n_fees = 1 if self.fees == "entry" else len(bundle_matrix(m, self.valuation))
            fee = self.price_scale * jax.nn.softplus(out[..., -n_fees:])  # [*batch, n, 1 or B]
            if self.fees == "bundle" and self.valuation == "additive":
                fee = _monotone_over_subsets(fee, m)
            out = out[..., :-n_fees]
        raw = out[..., -m:]  # [*batch, n, m]: the item-price outputs come last
        q = jnp.asarray(self.item_scale, out.dtype) * jax.nn.sigmoid(raw)  # learned reserves
        if n > 1:  # just above the highest other bid on each item: ties are not sold twice
            others = others_bids(bids).reshape(*bids.shape[:-2], n, n - 1, m)
            margin = TIE_MARGIN * jnp.asarray(self.item_scale, out.dtype)
            q = jnp.maximum(q, jnp.max(others, axis=-2) + margin)
        bundles = jnp.asarray(bundle_matrix(m, self.valuation), out.dtype)  # [B, m]
        alloc = jnp.broadcast_to(bundles, (*out.shape[:-1], *bundles.shape))
        price = q @ bundles.T
        return alloc, price if fee is None else price + fee

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
        act = hidden_activation(self.activation)
        last = len(self.weights) - 1
        for layer, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = stacked_affine(h, w[...], b[...])
            if layer < last:
                h = act(h)
        return h

    def menus(self, bids: Float[Array, "*batch bidders items"]) -> Menus:
        """Every bidder's menu (null element last) at ``bids``; ``bids_i`` itself is never read."""
        n, m = self.n_bidders, self.n_items
        check_bids(bids, n_bidders=n, n_items=m)
        shift, scale = self.input_affine()
        x = (others_bids(bids) - shift) * scale
        out = self.raw_outputs(x)
        logits, raw_price = self._head(out)
        alloc = self._alloc_from_logits(logits)  # [*batch, n, K, m]
        price = self.price_scale * jax.nn.softplus(raw_price)  # [*batch, n, K]
        if self.item_prices:
            b_alloc, b_price = self._bundle_elements(out, bids)
            alloc = jnp.concatenate([alloc, b_alloc], axis=-2)
            price = jnp.concatenate([price, b_price], axis=-1)
        null_alloc = jnp.zeros((*alloc.shape[:-2], 1, m), alloc.dtype)
        null_price = jnp.zeros((*price.shape[:-1], 1), price.dtype)
        return Menus(
            alloc=jnp.concatenate([alloc, null_alloc], axis=-2),
            price=jnp.concatenate([price, null_price], axis=-1),
        )

    def __call__(self, bids: Float[Array, "*batch bidders items"]) -> Outcome:
        return choose(self.menus(bids), bids).outcome

    def soft_outcome(
        self,
        bids: Float[Array, "*batch bidders items"],
        *,
        kappa,
        menu_bids: Float[Array, "*batch bidders items"] | None = None,
    ) -> Outcome:
        """Training's relaxation: element weights ``softmax(kappa * utility)`` instead of argmax.

        ``menu_bids`` (default ``bids``): the bids the menus are computed at (e.g. the cell
        centres of :func:`quantize_bids`); utilities always use ``bids``.
        """
        return soft_choice(self.menus(bids if menu_bids is None else menu_bids), bids, kappa=kappa)


def quantize_bids(
    bids: Float[Array, "*batch bidders items"], *, low, high, level: int
) -> Float[Array, "*batch bidders items"]:
    """Every coordinate moved to the centre of its cell of a uniform grid on ``[low, high]``.

    ``low``/``high`` are ``[bidders, items]``; the grid has ``2^level`` cells per coordinate
    (the quantized repair's grid at ``max_level = level``). A GemNet whose menus are computed at
    the quantized bids is piecewise constant in ``b_-i``, still strategy-proof.
    """
    index, low, width = _grid_index(bids, low=low, high=high, level=level)
    return low + (index + 0.5) * width


def grid_cells(
    bids: Float[Array, "*batch bidders items"], *, low, high, level: int
) -> tuple[Float[Array, "*batch bidders items"], Float[Array, "*batch bidders items"]]:
    """``(lo, hi)``: every coordinate's cell on the grid of :func:`quantize_bids`."""
    index, low, width = _grid_index(bids, low=low, high=high, level=level)
    return low + index * width, low + (index + 1) * width


def _grid_index(bids, *, low, high, level: int):
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    low = jnp.asarray(low, bids.dtype)
    span = jnp.asarray(high, bids.dtype) - low
    cells = 2**level
    index = jnp.clip(jnp.floor((bids - low) * (cells / span)), 0, cells - 1)
    return index, low, span / cells


def menu_utilities(
    menus: Menus, values: Float[Array, "*batch bidders items"]
) -> Float[Array, "*batch bidders elements"]:
    """``[*batch, bidders, elements]`` each bidder's utility for each element of its menu."""
    return jnp.einsum("...m,...km->...k", values, menus.alloc) - menus.price


def soft_choice(menus: Menus, values: Float[Array, "*batch bidders items"], *, kappa) -> Outcome:
    """Each bidder's menu elements weighted by ``softmax(kappa * utility)`` (training's choice)."""
    weights = jax.nn.softmax(kappa * menu_utilities(menus, values), axis=-1)  # [*batch, n, K+1]
    alloc = jnp.einsum("...k,...km->...m", weights, menus.alloc)
    pay = jnp.sum(weights * menus.price, axis=-1)
    return Outcome(alloc=alloc, pay=pay)


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


def require_learned_menus(model: GemNet, what: str) -> None:
    """Reject a GemNet with item-price bundles where only learned menus are modelled."""
    if getattr(model, "item_prices", False):
        raise NotImplementedError(
            f"{what} does not support GemNets with item_prices=True (their bundles' prices "
            "follow the others' bids through a max that the interval bounds and the certificate "
            "do not model); train without item_prices to repair and certify"
        )


def _interval_softmax(lo, hi):
    """Bounds of ``softmax(z)`` over ``z in [lo, hi]`` (last axis), exact per coordinate."""
    # softmax_j is increasing in z_j and decreasing in z_k (k != j): take the extremes.
    shift = jax.lax.stop_gradient(jnp.max(hi, axis=-1, keepdims=True))
    e_lo, e_hi = jnp.exp(lo - shift), jnp.exp(hi - shift)
    tot_lo, tot_hi = jnp.sum(e_lo, -1, keepdims=True), jnp.sum(e_hi, -1, keepdims=True)
    low = e_lo / (e_lo + (tot_hi - e_hi))
    high = e_hi / (e_hi + (tot_lo - e_lo))
    return low, high


def stacked_affine(x, w, b=None):
    """``x @ w + b`` per bidder: ``x [*batch, n, in]``, ``w [n, in, out]``, ``b [n, out]``.

    Computed bidder-major (``[n, batch, in]``: one batched matmul over contiguous rows; on the
    CPU its gradient is faster than with the bidders in the middle). The network and
    its interval bounds share it, so a degenerate box's bounds are the point's outputs exactly.
    """
    batch = x.shape[:-2]
    h = jnp.moveaxis(x.reshape(-1, *x.shape[-2:]), 1, 0)
    h = jnp.einsum("nbi,nio->nbo", h, w)
    if b is not None:
        h = h + b[:, None, :]
    return jnp.moveaxis(h, 0, 1).reshape(*batch, *h.shape[::2])


def _affine_interval(lo, hi, w, b):
    """Bounds of ``x @ w + b`` per bidder (``w [n, in, out]``) over ``x in [lo, hi]``."""
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    c = stacked_affine(centre, w, b)
    r = stacked_affine(radius, jnp.abs(w))
    return c - r, c + r


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
    require_learned_menus(model, "menu_bounds")
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
    act = hidden_activation(model.activation)  # monotone: bounds map endpoint by endpoint
    last = len(model.weights) - 1
    for layer, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        lo, hi = _affine_interval(lo, hi, w[...], b[...])
        if layer < last:
            lo, hi = act(lo), act(hi)
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


@struct.dataclass
class MenuJacobians:
    """First-order enclosure of every bidder's menu over a box of ``b_-i``.

    At the box's centre ``c`` the menu is ``alloc`` / ``price`` with Jacobians ``d_alloc`` /
    ``d_price`` with respect to ``b_-i``; anywhere in the box every Jacobian entry lies within
    ``r_alloc`` / ``r_price`` of the centre's. Shapes: ``alloc [*batch, bidders, K + 1, items]``,
    ``price [*batch, bidders, K + 1]``, ``d_alloc``/``r_alloc [*batch, bidders, K + 1, items,
    inputs]``, ``d_price``/``r_price [*batch, bidders, K + 1, inputs]`` (null element: zeros).
    """

    alloc: Any
    price: Any
    d_alloc: Any
    r_alloc: Any
    d_price: Any
    r_price: Any


def _scale_interval(d_lo, d_hi, c, r):
    """Centre/radius of ``{d * j : d in [d_lo, d_hi], j in [c - r, c + r]}`` for ``d_lo >= 0``."""
    lo = jnp.minimum(d_lo * (c - r), d_hi * (c - r))
    hi = jnp.maximum(d_lo * (c + r), d_hi * (c + r))
    return (lo + hi) / 2, (hi - lo) / 2


def _interval_jacobian(model: GemNet, lo, hi):
    """Interval Jacobian (centre, radius) of the raw outputs w.r.t. ``b_-i`` over a box, with the
    interval bounds of the raw outputs. ``lo``/``hi``: ``[*batch, bidders, in]`` (raw bids)."""
    shift, scale = model.input_affine()
    n_in = lo.shape[-1]
    x_lo, x_hi = (lo - shift) * scale, (hi - shift) * scale
    jc = jnp.broadcast_to(
        jnp.eye(n_in, dtype=lo.dtype) * jnp.asarray(scale)[..., None, :], (*lo.shape, n_in)
    )  # [*batch, n, in (wrt), units]
    jr = jnp.zeros_like(jc)
    act = hidden_activation(model.activation)
    last = len(model.weights) - 1
    for layer, (w, b) in enumerate(zip(model.weights, model.biases, strict=True)):
        z_lo, z_hi = _affine_interval(x_lo, x_hi, w[...], b[...])
        jc = jnp.einsum("...nji,nio->...njo", jc, w[...])
        jr = jnp.einsum("...nji,nio->...njo", jr, jnp.abs(w[...]))
        if layer < last:
            if model.activation == "relu":
                # slope 1 above 0, 0 below; [0, 1] (the generalised gradient) where the
                # pre-activation interval reaches 0, which keeps the mean-value form sound
                d_hi = (z_hi >= 0.0).astype(z_hi.dtype)
                d_lo = (z_lo > 0.0).astype(z_lo.dtype)
            else:
                t_near = jnp.tanh(jnp.clip(0.0, z_lo, z_hi))
                t_far = jnp.maximum(jnp.tanh(z_lo) ** 2, jnp.tanh(z_hi) ** 2)
                d_hi, d_lo = 1.0 - t_near**2, 1.0 - t_far
            jc, jr = _scale_interval(d_lo[..., None, :], d_hi[..., None, :], jc, jr)
            x_lo, x_hi = act(z_lo), act(z_hi)
        else:
            x_lo, x_hi = z_lo, z_hi
    return x_lo, x_hi, jc, jr


def _sigmoid_slope(lo, hi):
    """Bounds of ``sigmoid'`` over ``[lo, hi]`` (largest at the point nearest 0)."""
    s = jax.nn.sigmoid
    near = s(jnp.clip(0.0, lo, hi))
    d_lo = jnp.minimum(s(lo) * (1 - s(lo)), s(hi) * (1 - s(hi)))
    return d_lo, near * (1 - near)


def menu_jacobians(
    model: GemNet,
    others_lo: Float[Array, "*batch bidders inputs"],
    others_hi: Float[Array, "*batch bidders inputs"],
    *,
    splits: int = 1,
) -> MenuJacobians:
    """Menus and Jacobians at the centre of ``[others_lo, others_hi]`` and how far the Jacobians
    move over the box (interval Jacobian by centre/radius arithmetic through the stacked MLP and
    the heads; additive bidders only). With the interval bounds of :func:`menu_bounds` this gives
    sound affine bounds of every utility over a box (mean-value form).

    ``splits``: the spread is the largest over ``splits`` equal parts per input coordinate (the
    interval Jacobian's looseness shrinks with the part's width; the true spread does not).
    """
    require_learned_menus(model, "menu_jacobians")
    if model.valuation != "additive":
        raise NotImplementedError("menu_jacobians supports additive bidders only")
    if model.n_bidders == 1:
        raise ValueError("menu_jacobians needs two or more bidders (the menu has no input)")
    k, m = model.menu_size, model.n_items

    def heads(lo, hi):
        out_lo, out_hi, jc, jr = _interval_jacobian(model, lo, hi)
        lg_lo, rp_lo = model._head(out_lo)
        lg_hi, rp_hi = model._head(out_hi)
        jc_l, jc_p = jc[..., : k * m], jc[..., k * m :]
        jr_l, jr_p = jr[..., : k * m], jr[..., k * m :]
        # prices: S * softplus(raw); slope S * sigmoid(raw) is increasing in raw
        s = model.price_scale
        pc, pr = _scale_interval(
            s * jax.nn.sigmoid(rp_lo)[..., None, :],
            s * jax.nn.sigmoid(rp_hi)[..., None, :],
            jc_p,
            jr_p,
        )
        # allocations: clip((1 + 2c) sigmoid(z) - c, 0, 1); slope 0 where clipped
        c = model.alloc_clip
        ll, lh = lg_lo.reshape(*lg_lo.shape[:-2], k * m), lg_hi.reshape(*lg_hi.shape[:-2], k * m)
        if c > 0.0:
            z0 = float(np.log(c / (1.0 + c)))  # logit of c / (1 + 2c): below it the head is 0
            a, b = jnp.maximum(ll, z0), jnp.minimum(lh, -z0)
            inside = a <= b
            d_lo, d_hi = _sigmoid_slope(a, jnp.where(inside, b, a))
            clipped = (ll <= z0) | (lh >= -z0)
            d_lo = jnp.where(inside & ~clipped, d_lo, 0.0) * (1 + 2 * c)
            d_hi = jnp.where(inside, d_hi, 0.0) * (1 + 2 * c)
        else:
            d_lo, d_hi = _sigmoid_slope(ll, lh)
        ac, ar = _scale_interval(d_lo[..., None, :], d_hi[..., None, :], jc_l, jr_l)
        # [*batch, n, in, K*m] -> [*batch, n, K, m, in]
        ac = jnp.moveaxis(ac.reshape(*ac.shape[:-1], k, m), -3, -1)
        ar = jnp.moveaxis(ar.reshape(*ar.shape[:-1], k, m), -3, -1)
        return ac, ar, jnp.moveaxis(pc, -2, -1), jnp.moveaxis(pr, -2, -1)

    centre = (others_lo + others_hi) / 2
    ac, _, pc, _ = heads(centre, centre)
    d = others_lo.shape[-1]
    parts = np.stack(np.meshgrid(*[np.arange(splits)] * d, indexing="ij"), -1).reshape(-1, d)
    r_alloc = r_price = None
    for f in parts:  # a static loop: splits ** inputs parts
        sub_lo = others_lo + (others_hi - others_lo) * (f / splits)
        sub_hi = jnp.where(
            f + 1 == splits, others_hi, others_lo + (others_hi - others_lo) * ((f + 1) / splits)
        )
        a_c, a_r, p_c, p_r = heads(sub_lo, sub_hi)
        ra, rp = jnp.abs(a_c - ac) + a_r, jnp.abs(p_c - pc) + p_r
        r_alloc = ra if r_alloc is None else jnp.maximum(r_alloc, ra)
        r_price = rp if r_price is None else jnp.maximum(r_price, rp)
    assert r_alloc is not None and r_price is not None
    shift, scale = model.input_affine()
    logits, raw_price = model._head(model.raw_outputs((centre - shift) * scale))
    alloc = model._alloc_from_logits(logits)
    price = model.price_scale * jax.nn.softplus(raw_price)

    def pad(x, axis):  # append the null element (zeros) along the element axis
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, 1)
        return jnp.pad(x, widths)

    return MenuJacobians(
        alloc=pad(alloc, -2),
        price=pad(price, -1),
        d_alloc=pad(ac, -3),
        r_alloc=pad(r_alloc, -3),
        d_price=pad(pc, -2),
        r_price=pad(r_price, -2),
    )
