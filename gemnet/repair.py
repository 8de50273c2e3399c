"""Certified repair of a trained GemNet: adaptive boxes, interval bounds, candidate sets, MILPs.

The profile space is cut into boxes (coarse at first; a box that cannot be certified is halved along
its widest coordinate, down to one cell of a ``2^max_level`` grid per coordinate; a discrete
coordinate's cells are its support points). For a box, interval bound propagation bounds every
bidder's menu over the box of the others' bids, hence every element's utility over the box of its
own values; an element can be chosen somewhere in the box only if its upper utility reaches the best
lower utility (its **candidate set**; the others are skipped). The box is certified when, for every
item, the bidders' largest candidate allocations sum to at most 1.

With ``RepairConfig.quantize`` (the default) the repaired mechanism evaluates each bidder's
network at the centre of the finest cell of ``b_-i`` (menus piecewise constant in the others'
bids). The menus over a box are then finitely many, and their exact envelope over the box's cells
(:class:`_CellMenus`) replaces interval propagation: tighter on every box, and exact on the finest
boxes, where both bidders' menus are fixed. ``RepairConfig.pairwise`` also drops an element from
a candidate set when another one beats it on the whole box, by the exact maximum of their utility
difference (linear in the values for fixed menus).

Boxes still uncertified at the finest level are repaired bidder by bidder (stage ``r = 1 .. n-1``
makes bidders ``0..r`` compatible with the offsets of bidders ``< r`` fixed): bidder ``r``'s prices
get non-negative offsets that are constant on each cell of the ``b_-r`` grid, so they depend on
the others' bids only and strategy-proofness is kept. The offsets of one cell are the solution of a
MILP (:mod:`gemnet.milp`) over that cell's uncertified boxes; cells are independent, so their
MILPs run in a process pool. Raising prices can enlarge other boxes' candidate sets, so every box
whose ``b_-r`` projection meets a changed cell is checked again, and new failures join their
cell's MILP in the next round. Quantized menus are bounded with every cell's offsets added to its
prices before the envelope over the box's cells is taken, so a box is split only where it fails;
without quantization a box whose projection meets an offset cell is first refined until its
projection is one cell (interval bounds of the network do not know the offsets). The result is
the trained network plus a lookup table of offsets (:class:`RepairedGemNet`) and a
:class:`Certificate` that :func:`gemnet.verify_certificate` re-checks independently.

Soundness is in real arithmetic up to explicit tolerances for float32 rounding (a utility slack in
candidate sets, a slack on allocation bounds, boxes widened slightly); a solver time limit or an
infeasible MILP raises :class:`RepairError`, never a certificate that does not hold.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import multiprocessing
import os
import time
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, PRNGKeyArray
from tqdm.auto import tqdm

from diffecon.distributions import Discrete, IndependentValues
from diffecon.evaluation import Estimate
from diffecon.outcome import Outcome, check_bids
from diffecon.settings import Setting
from gemnet.certificate import Certificate, params_digest
from gemnet.milp import (
    CellProblem,
    CellSolution,
    discrete_revenue_milp,
    exit_with_parent,
    pairwise_gap,
    solve_cell,
    tighten_prices,
)
from gemnet.model import (
    GemNet,
    Menus,
    choose,
    menu_bounds,
    menu_jacobians,
    others_bids,
    require_learned_menus,
)

__all__ = ["RepairConfig", "RepairError", "RepairedGemNet", "certifiable_share", "repair"]


BUILDER_SLACK = 1.5  # the builder's candidate slack, in units of the certificate's
BUILDER_ALLOC_MARGIN = 1e-5  # the builder certifies totals of two or more bidders up to 1 - this
STUCK_ROUNDS = 3  # a box failing this many rounds with one repairing bidder passes to the next


class RepairError(RuntimeError):
    """The repair could not certify the mechanism (the message says where and why)."""


@dataclasses.dataclass(frozen=True)
class RepairConfig:
    """How the repair partitions, bounds and solves.

    Attributes:
      max_level: finest grid: ``2^max_level`` cells per continuous coordinate.
      start_level: the initial partition has ``2^start_level`` cells per continuous coordinate.
      quantize: the repaired mechanism computes each bidder's menu at the centre of the
        ``max_level`` cell of ``b_-i`` (piecewise constant in the others' bids: still
        strategy-proof). Menus over a box are then a finite set whose envelope is exact (no
        interval propagation through the network; prices with each cell's offsets, so boxes
        are not refined around offset cells), and on the finest boxes both bidders' menus are
        fixed, so what fails there is a real conflict of the quantized mechanism.
      interpolate: with ``quantize``, the repaired mechanism interpolates each bidder's menu
        multilinearly between the network's menus at the corners of the ``max_level`` cell of
        ``b_-i`` instead of taking it at the cell's centre: the menus are continuous in the
        others' bids, so the two bidders' choice boundaries can meet as the network's do, where
        quantized menus step by a cell and the repair must open gaps of about a cell's width
        with price rises. A cell's menus are bounded by the envelope of its corners' (exact for a
        multilinear function), and with two additive bidders a finest box that the interval test
        fails is tried with the relational test on the interpolant's affine bounds (the
        ``relational`` option) before it is repaired. Needs continuous values.
      utility_tolerance: candidate-set slack, a fraction of the price scale (float32 rounding).
      alloc_tolerance: added to allocation upper bounds.
      box_inflation: boxes are widened by this fraction of a cell per side.
      bound_splits: menus are bounded over a box as the union of interval bounds over this many
        parts per coordinate of ``b_-i`` (reduced so that at most 64 parts are used).
      milp_margin: MILP exclusions are strict by this multiple of the utility tolerance.
      floor_slacks: the MILP's utility floors tried in order, as fractions of the price scale
        (``inf``: the null element's 0, always feasible).
      dominators: good elements offered per box as dominators in the MILP.
      pairwise: with ``quantize``, an element is also no candidate in a box when one of this many
        dominators (the elements with the best lower utilities) beats it everywhere in the box,
        by the exact maximum of the utility difference, linear in the values
        (:func:`gemnet.milp.pairwise_gap`; 0: the interval test alone). The MILP then excludes
        elements by the same differences. Helps most on coarse grids, where interval bounds of
        two utilities at opposite corners of a wide box keep many elements as candidates.
      two_sided: a box that stays incompatible is repaired by whichever active bidder needs the
        smaller price rise to drop its conflicting elements there (else always by the bidder
        added last in the staged order, whose rivals' prices stay fixed).
      relational: with two additive bidders, a box that the interval test cannot certify is tried
        with the relational test (:func:`_relational_fn`) before it is split or repaired.
      relational_rounds: MILP rounds (per stage) whose cell problems may also satisfy a box
        through its relational witnesses; later rounds only exclude elements, which does not
        depend on the other bidders' offsets, so the rounds settle.
      time_limit_s: per MILP solve.
      workers: MILP processes (0: one per CPU; 1: solve in this process).
      chunk: boxes per bound-propagation batch.
      max_boxes: give up (RepairError) beyond this many boxes at once.
      max_rounds: give up after this many MILP rounds per stage.
      progress: print a line per round and a bar over its cell MILPs.
      discrete_revenue: when every coordinate is discrete (finitely many profiles), first try one
        MILP over all bidders' rises that maximises the expected revenue subject to compatibility
        at every profile (:func:`gemnet.milp.discrete_revenue_milp`); the staged repair is the
        fallback.
      discrete_max_binaries: skip that MILP beyond this many binaries.
      discrete_signed: in that MILP let prices also fall (never below 0): the menus are re-priced
        optimally for their learned allocations (offsets may then be negative; they still depend
        on ``b_-i`` only, so strategy-proofness is kept).
      tighten_discrete: when every coordinate is discrete, finally raise each cell's prices as far
        as every type's choice allows (a linear program per cell of ``b_-i``): revenue rises,
        choices and so compatibility stay as certified.
    """

    max_level: int = 6
    start_level: int = 1
    quantize: bool = True
    interpolate: bool = False
    utility_tolerance: float = 1e-5
    alloc_tolerance: float = 1e-6
    box_inflation: float = 1e-4
    bound_splits: int = 4
    milp_margin: float = 3.0
    floor_slacks: tuple[float, ...] = (0.05, 0.25, math.inf)
    dominators: int = 4
    pairwise: int = 0
    two_sided: bool = True
    relational: bool = True
    relational_rounds: int = 3
    time_limit_s: float = 30.0
    workers: int = 0
    chunk: int = 8192
    max_boxes: int = 20_000_000
    max_rounds: int = 200
    progress: bool = True
    discrete_revenue: bool = True
    discrete_max_binaries: int = 20_000
    discrete_signed: bool = True
    tighten_discrete: bool = True


# --------------------------------------------------------------------------------------------------
# The grid.


@dataclasses.dataclass(frozen=True)
class _Grid:
    n: int
    m: int
    cell_lo: tuple[np.ndarray, ...]
    cell_hi: tuple[np.ndarray, ...]
    discrete: tuple[bool, ...]
    levels: tuple[int, ...]  # per coordinate: log2(cells) (0 for discrete)

    @property
    def cells(self) -> np.ndarray:
        return np.array([len(c) for c in self.cell_lo], np.int64)

    def others(self, bidder: int) -> list[int]:
        m = self.m
        return [i * m + j for i in range(self.n) if i != bidder for j in range(m)]

    def own(self, bidder: int) -> list[int]:
        return list(range(bidder * self.m, (bidder + 1) * self.m))

    def strides(self, bidder: int) -> np.ndarray:
        sizes = self.cells[self.others(bidder)]
        strides = np.ones(len(sizes), np.int64)
        for t in range(len(sizes) - 2, -1, -1):
            strides[t] = strides[t + 1] * sizes[t + 1]
        return strides

    def representatives(self) -> list[np.ndarray]:
        """Per coordinate, each cell's representative (float32): a continuous cell's centre, a
        discrete cell's point. Quantized menus are computed there."""
        return [
            np.asarray(lo if disc else (lo + hi) / 2.0, np.float32)
            for lo, hi, disc in zip(self.cell_lo, self.cell_hi, self.discrete, strict=True)
        ]

    def nodes(self) -> list[np.ndarray]:
        """Per coordinate, the cells' corners (float32): ``cell_lo`` and the last ``cell_hi``.
        Interpolated menus are computed there."""
        return [
            np.asarray(np.concatenate([lo, hi[-1:]]), np.float32)
            for lo, hi in zip(self.cell_lo, self.cell_hi, strict=True)
        ]

    def bounds(self, lo: np.ndarray, size: np.ndarray, inflation: float):
        """Real ``[boxes, D]`` bounds of boxes, widened by ``inflation`` cells per side."""
        rlo = np.empty(lo.shape, np.float64)
        rhi = np.empty(lo.shape, np.float64)
        for d in range(lo.shape[1]):
            rlo[:, d] = self.cell_lo[d][lo[:, d]]
            rhi[:, d] = self.cell_hi[d][lo[:, d] + size[:, d] - 1]
            if not self.discrete[d]:
                width = self.cell_hi[d][0] - self.cell_lo[d][0]
                rlo[:, d] -= inflation * width
                rhi[:, d] += inflation * width
        return rlo, rhi


def _make_grid(setting: Setting, max_level: int) -> _Grid:
    values = setting.values
    if not isinstance(values, IndependentValues):
        raise ValueError(
            f"repair needs independent values with a known support per coordinate; "
            f"{setting.name!r} has {type(values).__name__}"
        )
    if not setting.bounded:
        raise ValueError(
            f"repair needs a bounded support; {setting.name!r} has high = {setting.high.tolist()}"
        )
    lows, highs, discrete, levels = [], [], [], []
    for i in range(setting.n_bidders):
        for j in range(setting.n_items):
            marginal = values.marginal(i, j)
            if isinstance(marginal, Discrete):
                pts = np.asarray(marginal.points, np.float64)
                lows.append(pts)
                highs.append(pts)
                discrete.append(True)
                levels.append(0)
            else:
                g = 2**max_level
                edges = marginal.low + (marginal.high - marginal.low) * np.arange(g + 1) / g
                lows.append(edges[:-1])
                highs.append(edges[1:])
                discrete.append(False)
                levels.append(max_level)
    return _Grid(
        setting.n_bidders,
        setting.n_items,
        tuple(lows),
        tuple(highs),
        tuple(discrete),
        tuple(levels),
    )


def _initial_boxes(grid: _Grid, start_level: int, max_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    axes, sizes = [], []
    for d in range(len(grid.cell_lo)):
        cells = len(grid.cell_lo[d])
        step = 1 if grid.discrete[d] else cells // 2 ** min(start_level, grid.levels[d])
        axes.append(np.arange(0, cells, step))
        sizes.append(step)
    count = math.prod(len(a) for a in axes)
    if count > max_boxes:
        raise RepairError(
            f"the initial partition has {count:.3g} boxes ({len(axes)} coordinates of the profile "
            f"space, {[len(a) for a in axes]} cells each), above max_boxes = {max_boxes}: the "
            "repair's grid grows as 2^(level * bidders * items); lower start_level or use a "
            "smaller setting"
        )
    lo = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(axes)).astype(np.int64)
    return lo, np.broadcast_to(np.asarray(sizes, np.int64), lo.shape).copy()


def _split(lo: np.ndarray, size: np.ndarray, dims: list[int] | None = None):
    """Halve each box along its widest coordinate (among ``dims``; ties: the first)."""
    if lo.shape[0] == 0:
        return lo, size
    cand = size if dims is None else np.where(np.isin(np.arange(size.shape[1]), dims), size, 0)
    axis = np.argmax(cand, axis=1)
    rows = np.arange(lo.shape[0])
    half = size[rows, axis] // 2
    if np.any(half < 1):
        raise AssertionError("split of a box that is one cell wide")
    size2 = size.copy()
    size2[rows, axis] = half
    lo2 = lo.copy()
    lo2[rows, axis] += half
    return np.concatenate([lo, lo2]), np.concatenate([size2, size2])


# --------------------------------------------------------------------------------------------------
# Offsets of one bidder: a sparse table over the cells of b_-i, with a dense count for box queries.


class _Offsets:
    def __init__(self, grid: _Grid, bidder: int, k1: int):
        self.grid, self.bidder, self.k1 = grid, bidder, k1
        self.dims = grid.others(bidder)
        self.shape = tuple(int(c) for c in grid.cells[self.dims])
        total = math.prod(self.shape) if self.shape else 1  # Python ints: no overflow
        if total > 2**26:
            raise RepairError(
                f"bidder {bidder}'s offset grid would have {float(total):.3g} cells "
                f"({len(self.dims)} coordinates of b_-i); lower max_level (at most 2^26 cells)"
            )
        self.strides = grid.strides(bidder)
        self.table: dict[int, np.ndarray] = {}
        self.version = 0  # bumped on every change (quantized menus cache prices with offsets)
        self._count: np.ndarray | None = None
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def keys_of(self, lo: np.ndarray) -> np.ndarray:
        return lo[:, self.dims] @ self.strides if self.dims else np.zeros(len(lo), np.int64)

    def set(self, key: int, values: np.ndarray) -> None:
        if np.any(values != 0):
            self.table[key] = values
        else:
            self.table.pop(key, None)
        self._changed()

    def restore(self, table: dict[int, np.ndarray]) -> None:
        self.table = dict(table)
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._count = None
        self._arrays = None

    def dense(self) -> np.ndarray:
        """``[*cells of b_-i, K + 1]`` every cell's offsets (0 where the table has none)."""
        out = np.zeros((math.prod(self.shape), self.k1))
        keys, values = self._sorted()
        out[keys] = values
        return out.reshape(*self.shape, self.k1)

    def _prefix(self, keys: list[int]) -> np.ndarray:
        mark = np.zeros(self.shape, np.int32).ravel()
        if keys:
            mark[np.asarray(keys, np.int64)] = 1
        cum = mark.reshape(self.shape)
        for ax in range(cum.ndim):
            cum = np.cumsum(cum, axis=ax)
        return np.pad(cum, [(1, 0)] * cum.ndim)

    def count_in(self, lo: np.ndarray, size: np.ndarray, prefix: np.ndarray | None = None):
        """Number of offset cells inside each box's ``b_-i`` projection."""
        if not self.dims:
            return np.full(len(lo), len(self.table) if prefix is None else 0)
        if prefix is None:
            if self._count is None:
                self._count = self._prefix(list(self.table))
            prefix = self._count
        a, b = lo[:, self.dims], lo[:, self.dims] + size[:, self.dims]
        total = np.zeros(len(lo), np.int64)
        for corner in np.ndindex(*(2,) * len(self.dims)):
            idx = tuple(np.where(np.asarray(corner)[None, :] == 1, b, a).T)
            sign = (-1) ** (len(self.dims) - sum(corner))
            total += sign * prefix[idx]
        return total

    def exact(self, lo: np.ndarray) -> np.ndarray:
        """``[boxes, K + 1]`` offsets of boxes whose projection is one cell."""
        out = np.zeros((len(lo), self.k1))
        if self.table:
            keys, values = self._sorted()
            want = self.keys_of(lo)
            pos = np.clip(np.searchsorted(keys, want), 0, len(keys) - 1)
            hit = keys[pos] == want
            out[hit] = values[pos[hit]]
        return out

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = self.arrays()
        return self._arrays

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(sorted(self.table), np.int64)
        vals = np.stack([self.table[int(k)] for k in keys]) if len(keys) else np.zeros((0, self.k1))
        return keys, vals


# --------------------------------------------------------------------------------------------------
# Bounds and candidate sets (the builder's; gemnet.verify has an independent implementation).


def split_menu_bounds(model: GemNet, others_lo, others_hi, splits: int):
    """Menu bounds over ``[others_lo, others_hi]`` ``[*batch, bidders, in]`` as the union of the
    interval bounds over ``splits`` equal parts per input coordinate (tighter than one box)."""
    d = others_lo.shape[-1]
    if splits <= 1 or model.n_bidders == 1:
        mb = menu_bounds(model, others_lo, others_hi)
        return mb.alloc[0], mb.alloc[1], mb.price[0], mb.price[1]
    parts = np.stack(np.meshgrid(*[np.arange(splits)] * d, indexing="ij"), -1).reshape(-1, d)
    f = jnp.asarray(parts, others_lo.dtype)[:, None, :]  # [S^d, 1, in]
    width = (others_hi - others_lo)[..., None, :, :]
    base = others_lo[..., None, :, :]
    sub_lo = base + width * f / splits
    sub_hi = jnp.where(f + 1 == splits, others_hi[..., None, :, :], base + width * (f + 1) / splits)
    mb = menu_bounds(model, sub_lo, sub_hi)  # [*batch, S^d, n, K+1, ...]
    ax = others_lo.ndim - 2
    return (
        jnp.min(mb.alloc[0], axis=ax),
        jnp.max(mb.alloc[1], axis=ax),
        jnp.min(mb.price[0], axis=ax),
        jnp.max(mb.price[1], axis=ax),
    )


def _utility_bounds(model: GemNet, rlo, rhi, alloc_tol: float, splits: int):
    """Interval bounds over boxes ``rlo/rhi [B, n, m]`` before offsets: ``(a_lo, a_top, u_lo,
    u_hi)``, ``a_top`` the allocation upper bounds plus the float32 slack (capped at 1; the null
    element stays 0)."""
    menu = split_menu_bounds(model, others_bids(rlo), others_bids(rhi), splits)
    return _utilities_from_menus(rlo, rhi, *menu, alloc_tol)


def _alloc_top(a_hi, alloc_tol: float, xp: Any):
    """Allocation upper bounds ``[..., K + 1, m]`` plus the float32 slack, capped at 1; an exact 0
    (a clipped head) and the null element (last) stay 0."""
    top = xp.where(a_hi > 0.0, xp.minimum(a_hi + alloc_tol, 1.0), 0.0)
    learned = xp.arange(a_hi.shape[-2]) < a_hi.shape[-2] - 1
    return xp.where(learned[:, None], top, 0.0)


def _utilities_from_menus(rlo, rhi, a_lo, a_hi, p_lo, p_hi, alloc_tol: float):
    """:func:`_utility_bounds` given the menu bounds ``[B, n, K + 1, (m)]`` over each box."""
    a_top = _alloc_top(a_hi, alloc_tol, jnp)
    # (inflated boxes can reach below a support starting at 0: take the right corner)
    v_hi, v_lo = rhi[..., None, :], rlo[..., None, :]
    u_hi = jnp.sum(jnp.maximum(v_hi * a_top, v_hi * a_lo), -1) - p_lo
    u_lo = jnp.sum(jnp.minimum(v_lo * a_lo, v_lo * a_top), -1) - p_hi
    return a_lo, a_top, u_lo, u_hi


def _bound_fn(model: GemNet, utility_tol: float, alloc_tol: float, splits: int):
    core = _bound_core(utility_tol)

    @jax.jit
    def bounds(rlo, rhi, delta, active):
        """rlo/rhi [B, n, m]; delta [B, n, K+1] exact offsets; active [n] in {0, 1}."""
        return core(_utility_bounds(model, rlo, rhi, alloc_tol, splits), delta, active)

    return bounds


def _quantized_bound_fn(utility_tol: float, alloc_tol: float, pairwise: int = 0):
    """:func:`_bound_fn` for quantized menus: the menu bounds come in (from :class:`_CellMenus`).

    With ``pairwise > 0`` candidate sets are also cut by the pairwise test
    (:func:`gemnet.milp.pairwise_gap`) against that many dominators per box."""
    core = _bound_core(utility_tol, pairwise)

    @jax.jit
    def bounds(rlo, rhi, delta, a_lo, a_hi, p_lo, p_hi, active):
        utilities = _utilities_from_menus(rlo, rhi, a_lo, a_hi, p_lo, p_hi, alloc_tol)
        return core(utilities, delta, active, (rlo, rhi, p_lo, p_hi))

    return bounds


def _bound_core(utility_tol: float, pairwise: int = 0):
    def core(utilities, delta, active, box=None):
        a_lo, a_hi, u_lo0, u_hi0 = utilities
        u_hi, u_lo = u_hi0 - delta, u_lo0 - delta
        best = jnp.max(u_lo, axis=-1, keepdims=True)
        # The builder (float32) is stricter than the certificate's rule, so that the float64
        # verifier never disagrees at the margin: more candidates, and totals below 1 - margin.
        cand = u_hi >= best - BUILDER_SLACK * utility_tol
        if pairwise and box is not None:
            # an element that some dominator beats everywhere in the box is no candidate
            rlo, rhi, p_lo, p_hi = box
            dom = jax.lax.top_k(u_lo, min(pairwise, u_lo.shape[-1]))[1]
            gap = pairwise_gap(rlo, rhi, a_lo, a_hi, p_lo + delta, p_hi + delta, dom, xp=jnp)
            cand = cand & jnp.all(gap >= -BUILDER_SLACK * utility_tol, axis=-1)
        usage = jnp.max(jnp.where(cand[..., None], a_hi, 0.0), axis=-2)  # [B, n, m]
        used = usage * active[None, :, None]
        total = jnp.sum(used, axis=1)
        # One bidder alone never over-allocates (bounds are capped at 1): no margin needed there.
        alone = jnp.sum(used > 0.0, axis=1) <= 1
        ok = jnp.all((total <= 1.0 - BUILDER_ALLOC_MARGIN) | alone, axis=-1)
        return ok, usage, u_hi0, u_lo0, a_hi

    return core


MILP_BATCH = 512  # cell MILPs built and solved at once (memory: every box's utilities)
REL_CANDIDATES = 6  # candidates per bidder the relational test handles (more: the box fails)
REL_CHUNK = 256  # boxes per relational-test batch


def _relational_fn(
    model: GemNet,
    utility_tol: float,
    alloc_tol: float,
    splits: int,
    *,
    interpolate: bool = False,
):
    """Two-bidder relational test of boxes that the interval test cannot certify.

    The interval test lets each bidder's choice range over its whole candidate set independently;
    at a tight boundary (bidder 0 wins an item where bidder 1 does not, and the reverse) both
    bidders' conflicting elements stay candidates however small the box. Here each utility gets
    sound affine bounds over the box (mean-value form: the menu and its Jacobian at the centre,
    the interval Jacobian's spread, and the interval bounds of the allocations), so "bidder ``i``
    picks ``k`` over ``l``" implies a linear inequality in the profile ``v``. A conflicting pair
    ``(k0, k1)`` cannot occur if, for some other elements ``l0``, ``l1`` and ``t >= 0``, the sum
    ``(bidder 0's inequality) + t (bidder 1's)`` is negative everywhere on the box (a two-row
    Farkas certificate; ``t`` ranges over the breakpoints of the convex piecewise-linear
    function it minimises). Returns per box whether every conflicting pair is excluded, and the
    witnesses ``(k0, k1, l0, l1, t)`` of each conflicting pair, the witness's value ``phi`` and
    whether both candidate sets were small enough to be covered.
    """
    margin = BUILDER_SLACK * utility_tol

    def forms_network(rlo, rhi, delta):
        a_lo, a_top, u_lo, u_hi = _utility_bounds(model, rlo, rhi, alloc_tol, splits)
        mj = menu_jacobians(model, others_bids(rlo), others_bids(rhi), splits=splits)
        c, w = (rlo + rhi) / 2, (rhi - rlo) / 2  # [B, n, m]
        ow = others_bids(w)
        affine = jnp.einsum("bnm,bnkm->bnk", c, mj.alloc) - mj.price - delta
        g_own = mj.alloc  # [B, n, K+1, m]
        g_oth = jnp.einsum("bnm,bnkmd->bnkd", c, mj.d_alloc) - mj.d_price
        d_alpha = jnp.maximum(a_top - mj.alloc, mj.alloc - a_lo)
        r_phi = jnp.einsum("bnm,bnkmd->bnkd", jnp.abs(c), mj.r_alloc) + mj.r_price
        rho = jnp.einsum("bnm,bnkm->bnk", w, d_alpha) + jnp.einsum("bnd,bnkd->bnk", ow, r_phi)
        return a_top, u_lo - delta, u_hi - delta, affine, g_own, g_oth, rho

    def forms_interp(rlo, rhi, delta, c_alloc, c_price, cell_w):
        # c_alloc [B, n, 2^d, K+1, m], c_price [B, n, 2^d, K+1]: the menus at the corners of
        # the box's cell of b_-i (one cell); cell_w [B, n, d] its widths
        a_lo, a_hi = jnp.min(c_alloc, 2), jnp.max(c_alloc, 2)
        p_lo, p_hi = jnp.min(c_price, 2), jnp.max(c_price, 2)
        a_lo, a_top, u_lo, u_hi = _utilities_from_menus(rlo, rhi, a_lo, a_hi, p_lo, p_hi, alloc_tol)
        forms = _interp_forms(rlo, rhi, delta, c_alloc, c_price, cell_w, a_lo, a_top, jnp)
        return (a_top, u_lo - delta, u_hi - delta, *forms)

    def farkas(rlo, rhi, a_top, u_lo, u_hi, affine, g_own, g_oth, rho):
        cand = u_hi >= jnp.max(u_lo, axis=-1, keepdims=True) - margin
        w = (rhi - rlo) / 2
        grads = (
            jnp.concatenate([g_own[:, 0], g_oth[:, 0]], -1),  # global coordinates (v_0, v_1)
            jnp.concatenate([g_oth[:, 1], g_own[:, 1]], -1),
        )
        wg = jnp.concatenate([w[:, 0], w[:, 1]], -1)  # [B, 2m]
        null = affine.shape[-1] - 1
        rows = jnp.arange(affine.shape[0])[:, None]
        parts = []
        for i in range(2):
            score = jnp.where(cand[:, i], u_hi[:, i], -jnp.inf)
            val, ks = jax.lax.top_k(score, REL_CANDIDATES)
            valid = jnp.isfinite(val)
            many = jnp.sum(cand[:, i], -1) > REL_CANDIDATES
            ls = jnp.concatenate([ks, jnp.full_like(ks[:, :1], null)], -1)
            a_i, r_i, g_i = affine[:, i], rho[:, i], grads[i]
            const = (
                a_i[rows, ks][:, :, None]
                - a_i[rows, ls][:, None, :]
                + r_i[rows, ks][:, :, None]
                + r_i[rows, ls][:, None, :]
                + utility_tol
            )  # [B, C, C+1]
            slope = g_i[rows, ks][:, :, None, :] - g_i[rows, ls][:, None, :, :]  # [B,C,C+1,D]
            parts.append((ks, ls, valid, many, const, slope, a_top[:, i][rows, ks]))
        (k0, l0, val0, many0, c0, h0, al0), (k1, l1, val1, many1, c1, h1, al1) = parts
        conflict = jnp.any(al0[:, :, None, :] + al1[:, None, :, :] > 1.0 - BUILDER_ALLOC_MARGIN, -1)
        conflict &= jnp.any((al0[:, :, None, :] > 0) & (al1[:, None, :, :] > 0), -1)
        conflict &= val0[:, :, None] & val1[:, None, :]  # [B, C0, C1]
        # phi(t) over [B, k0, l0, k1, l1, T]
        H0 = h0[:, :, :, None, None, :]
        H1 = h1[:, None, None, :, :, :]
        C0 = c0[:, :, :, None, None]
        C1 = c1[:, None, None, :, :]
        safe = jnp.where(H1 != 0.0, H1, 1.0)
        brk = jnp.where((H1 != 0.0) & (-H0 / safe > 0.0), -H0 / safe, 0.0)
        ts = jnp.concatenate([jnp.zeros_like(brk[..., :1]), brk], -1)  # [..., T]
        W = wg[:, None, None, None, None, None, :]
        spread = jnp.sum(jnp.abs(H0[..., None, :] + ts[..., :, None] * H1[..., None, :]) * W, -1)
        phi = C0[..., None] + ts * C1[..., None] + spread  # [B, k0, l0, k1, l1, T]
        shape = phi.shape
        flat = jnp.moveaxis(phi, 3, 2).reshape(shape[0], shape[1], shape[3], -1)  # [B,k0,k1,...]
        best = jnp.argmin(flat, -1)
        best_phi = jnp.min(flat, -1)
        excluded = best_phi < -margin
        ok = jnp.all(~conflict | excluded, axis=(1, 2)) & ~many0 & ~many1
        li0, rem = jnp.divmod(best, shape[4] * shape[5])
        li1, _ = jnp.divmod(rem, shape[5])
        t_best = jnp.take_along_axis(
            jnp.moveaxis(ts, 3, 2).reshape(shape[0], shape[1], shape[3], -1), best[..., None], -1
        )[..., 0]

        def pick(ls, li):
            full = jnp.broadcast_to(ls[:, None, None, :], (*li.shape, ls.shape[-1]))
            return jnp.take_along_axis(full, li[..., None], -1)[..., 0]

        small = ~many0 & ~many1
        return ok, conflict, k0, k1, pick(l0, li0), pick(l1, li1), t_best, best_phi, small

    if interpolate:
        return jax.jit(
            lambda rlo, rhi, delta, *c: farkas(rlo, rhi, *forms_interp(rlo, rhi, delta, *c))
        )
    return jax.jit(lambda rlo, rhi, delta: farkas(rlo, rhi, *forms_network(rlo, rhi, delta)))


def _interp_forms(rlo, rhi, delta, c_alloc, c_price, cell_w, a_lo, a_top, xp):
    """Affine bounds of interpolated utilities over boxes of one cell of ``b_-i`` (mean-value
    form): ``(affine [B, n, K + 1], g_own [B, n, K + 1, m], g_oth [B, n, K + 1, d], rho)`` with
    ``u(v) <= / >= affine + g . (v - c) +/- rho`` on the box (``c`` its centre).

    The interpolant is multilinear in ``b_-i`` over the cell, so at the box's centre (the cell's
    centre: boxes are inflated symmetrically) it is the corners' mean, and each partial
    derivative of ``phi = alloc . c_own - price`` lies between the least and the largest
    difference along the cell's edges in that coordinate (divided by the width). The inflated box
    reaches past the cell, where the mechanism clips the position: ``|g_oth| e`` covers that
    (``e`` the inflation beyond the cell). ``a_lo, a_top`` are the allocations' bounds over the
    cell, ``xp`` the array module (the builder's jax, numpy in tests)."""
    b, n = c_price.shape[:2]
    d = cell_w.shape[-1]
    c, w = (rlo + rhi) / 2, (rhi - rlo) / 2  # [B, n, m]
    ow = w[:, ::-1]  # two bidders: each one's b_-i is the other's values
    alloc = xp.mean(c_alloc, 2)  # [B, n, K+1, m]
    phi = xp.einsum("bnm,bnckm->bnck", c, c_alloc) - c_price  # [B, n, 2^d, K+1]
    affine = xp.mean(phi, 2) - delta
    cube = phi.reshape(b, n, *([2] * d), phi.shape[-1])
    slopes_lo, slopes_hi = [], []
    for t in range(d):
        diff = xp.take(cube, 1, axis=2 + t) - xp.take(cube, 0, axis=2 + t)
        flat = diff.reshape(b, n, -1, phi.shape[-1])
        slopes_lo.append(xp.min(flat, 2) / cell_w[..., t : t + 1])
        slopes_hi.append(xp.max(flat, 2) / cell_w[..., t : t + 1])
    j_lo, j_hi = xp.stack(slopes_lo, -1), xp.stack(slopes_hi, -1)  # [B, n, K+1, d]
    g_oth = (j_lo + j_hi) / 2
    r_phi = (j_hi - j_lo) / 2
    beyond = xp.maximum(ow - cell_w / 2, 0.0)  # [B, n, d]
    d_alpha = xp.maximum(a_top - alloc, alloc - a_lo)
    rho = (
        xp.einsum("bnm,bnkm->bnk", w, d_alpha)
        + xp.einsum("bnd,bnkd->bnk", ow, r_phi)
        + xp.einsum("bnd,bnkd->bnk", beyond, xp.abs(g_oth))
    )
    return affine, alloc, g_oth, rho


def _corner_envelope(table: tuple[np.ndarray, ...], d: int) -> tuple[np.ndarray, ...]:
    """Per cell, the envelope ``(min a_lo, max a_hi, min p_lo, max p_hi)`` of the node tables
    ``[*(cells + 1), ...]`` over the cell's ``2^d`` corners: the exact range of the multilinear
    interpolant over the cell."""
    out = []
    for which, t in enumerate(table):
        views = [
            t[tuple(slice(b, b + t.shape[a] - 1) for a, b in enumerate(bits))]
            for bits in itertools.product((0, 1), repeat=d)
        ]
        out.append(np.minimum.reduce(views) if which % 2 == 0 else np.maximum.reduce(views))
    return tuple(out)


class _CellMenus:
    """Quantized menus: each bidder's menu at the representative of every cell of ``b_-i``
    (interval bounds at that point, so that exact zeros of a clipped head are recognised as in
    :func:`gemnet.menu_bounds`), and their exact lower/upper envelope over the aligned dyadic
    blocks of cells that the partition's boxes project to (cached per block shape).

    With ``interpolate`` the menus are interpolated between the cells' corners: a cell's entry is
    then the envelope of its corners' menus (:func:`_corner_envelope`), and the rest is the same.

    With ``priced`` envelopes the prices are those of the repaired mechanism: each cell's menu
    prices plus that cell's offsets, before the envelope is taken. A box whose projection covers
    cells with different offsets is then bounded as tightly as the menus allow, so boxes need not
    be split down to single cells of ``b_-i`` around offset cells."""

    def __init__(
        self,
        model: GemNet,
        grid: _Grid,
        offsets: list[_Offsets],
        chunk: int = 16384,
        *,
        interpolate: bool = False,
    ):
        self.grid = grid
        self.offsets = offsets
        self.interpolate = interpolate
        n, m = grid.n, grid.m
        point = jax.jit(lambda x: menu_bounds(model, x, x))
        self.tables: list[tuple[np.ndarray, ...]] = []
        # interpolated menus: the menus at the cells' corners (nodes), [*(cells + 1), ...]
        self.nodes: list[tuple[np.ndarray, ...]] = []
        self.cache: dict[tuple[int, tuple[int, ...], bool], tuple[np.ndarray, ...]] = {}
        self._priced: list[tuple[int, tuple[np.ndarray, np.ndarray]] | None] = [None] * n
        coords = grid.nodes() if interpolate else grid.representatives()
        for i in range(n):
            dims = grid.others(i)
            shape = tuple(len(coords[d]) for d in dims)
            idx = np.indices(shape).reshape(len(dims), -1).T
            prof = np.tile(np.asarray([r[0] for r in coords], np.float32), (len(idx), 1))
            for t, d in enumerate(dims):
                prof[:, d] = coords[d][idx[:, t]]
            parts = []
            for s in range(0, len(prof), chunk):
                x = prof[s : s + chunk]
                pad = chunk - len(x) if len(prof) > chunk else 0
                xb = jnp.asarray(np.pad(x, [(0, pad), (0, 0)], mode="edge").reshape(-1, n, m))
                mb = point(others_bids(xb))
                got = (mb.alloc[0], mb.alloc[1], mb.price[0], mb.price[1])
                parts.append([np.asarray(g[: len(x), i]) for g in got])
            table = tuple(
                np.concatenate(col).reshape(*shape, *col[0].shape[1:])
                for col in zip(*parts, strict=True)
            )
            if interpolate:
                self.nodes.append(table)
                table = _corner_envelope(table, len(dims))
            self.tables.append(table)

    def corners(self, bidder: int, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interpolated menus of boxes of one cell of ``b_-i`` (``lo [B, D]``): the menus at the
        cell's ``2^d`` corners, ``alloc [B, 2^d, K + 1, m]`` and ``price [B, 2^d, K + 1]``
        (midpoints of the point bounds; corner bits in ``itertools.product`` order)."""
        dims = self.grid.others(bidder)
        a_lo, a_hi, p_lo, p_hi = self.nodes[bidder]
        q = lo[:, dims]
        bits = np.asarray(list(itertools.product((0, 1), repeat=len(dims))), np.int64)
        idx = tuple(np.moveaxis(q[:, None, :] + bits[None], -1, 0))  # d x [B, 2^d]
        return (a_lo[idx] + a_hi[idx]) * 0.5, (p_lo[idx] + p_hi[idx]) * 0.5

    def _tables(self, bidder: int, priced: bool) -> tuple[np.ndarray, ...]:
        """``(a_lo, a_hi, p_lo, p_hi)`` per cell; ``priced``: prices plus the current offsets,
        rounded outwards to float32 (rebuilt, and the bidder's cached blocks dropped, whenever
        the offsets changed)."""
        a_lo, a_hi, p_lo, p_hi = self.tables[bidder]
        if not priced:
            return a_lo, a_hi, p_lo, p_hi
        off = self.offsets[bidder]
        held = self._priced[bidder]
        if held is None or held[0] != off.version:
            dense = off.dense()
            prices = (
                np.nextafter((p_lo + dense).astype(np.float32), np.float32(-np.inf)),
                np.nextafter((p_hi + dense).astype(np.float32), np.float32(np.inf)),
            )
            held = (off.version, prices)
            self._priced[bidder] = held
            for key in [k for k in self.cache if k[0] == bidder and k[2]]:
                del self.cache[key]
        return a_lo, a_hi, *held[1]

    def _blocks(self, bidder: int, block: tuple[int, ...], priced: bool) -> tuple[np.ndarray, ...]:
        tables = self._tables(bidder, priced)  # (first: it may drop stale blocks)
        key = (bidder, block, priced)
        if key not in self.cache:
            out = []
            for which, table in enumerate(tables):
                shape, d = table.shape, len(block)
                split = [x for c, b in zip(shape[:d], block, strict=True) for x in (c // b, b)]
                t = table.reshape(*split, *shape[d:])
                axes = tuple(range(1, 2 * d, 2))
                out.append(t.min(axis=axes) if which % 2 == 0 else t.max(axis=axes))
            self.cache[key] = tuple(out)
        return self.cache[key]

    def envelope(self, lo: np.ndarray, size: np.ndarray, *, priced: bool = False):
        """``[a_lo, a_hi [B, n, K + 1, m], p_lo, p_hi [B, n, K + 1]]`` over boxes ``lo/size``
        (``priced``: the prices include the offsets)."""
        out = None
        for i in range(self.grid.n):
            dims = self.grid.others(i)
            corner, z = lo[:, dims], size[:, dims]
            if np.any(corner % z):
                raise AssertionError("a box that is not aligned with its dyadic block")
            blocks, inverse = np.unique(z, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            if out is None:
                out = [
                    np.empty((len(lo), self.grid.n, *t.shape[len(dims) :]), t.dtype)
                    for t in self.tables[i]
                ]
            for g, block in enumerate(blocks):
                rows = np.flatnonzero(inverse == g)
                pos = tuple((corner[rows] // block).T)
                for dst, src in zip(
                    out, self._blocks(i, tuple(int(b) for b in block), priced), strict=True
                ):
                    dst[rows, i] = src[pos]
        assert out is not None
        return out


class _Checker:
    def __init__(self, model: GemNet, grid: _Grid, offsets: list[_Offsets], config, scale):
        self.grid, self.offsets, self.config = grid, offsets, config
        self.n, self.m = model.n_bidders, model.n_items
        self.k1 = model.menu_size + 1
        self.scale = scale
        tols = (config.utility_tolerance * scale, config.alloc_tolerance)
        # (one bidder: the menu is a constant, nothing to quantize)
        self.cell_menus = (
            _CellMenus(model, grid, offsets, interpolate=config.interpolate)
            if config.quantize and self.n > 1
            else None
        )
        self.interpolate = self.cell_menus is not None and config.interpolate
        if self.cell_menus is not None:  # exact envelopes of cell menus: no bound splits
            self.fn = _quantized_bound_fn(*tols, config.pairwise)
            self.fast = None
        else:
            splits = effective_splits(config.bound_splits, model)
            self.fn = _bound_fn(model, *tols, splits)
            self.fast = _bound_fn(model, *tols, 1) if splits > 1 else None
        self.rel = None
        if (
            config.relational
            and (self.cell_menus is None or self.interpolate)
            and self.n == 2
            and model.valuation == "additive"
        ):
            self.rel = _relational_fn(
                model,
                config.utility_tolerance * scale,
                config.alloc_tolerance,
                effective_splits(config.bound_splits, model),
                interpolate=self.interpolate,
            )
        self.n_checked = 0
        self.n_relational = 0

    def _relational(self, rlo, rhi, delta, lo, size):
        """Run the relational test on rows (padded to fixed shapes); returns numpy outputs.

        Interpolated menus are bounded from the corners of the box's cell of ``b_-i``: a box
        wider than one cell there is not certified by this test."""
        assert self.rel is not None
        rows, chunk = len(rlo), REL_CHUNK
        arrays = [rlo, rhi, delta]
        single = np.ones(rows, bool)
        if self.interpolate:
            assert self.cell_menus is not None
            single = np.all(size == 1, axis=1)
            corners = [self.cell_menus.corners(i, lo) for i in range(self.n)]
            c_alloc = np.stack([c[0] for c in corners], 1)  # [rows, n, 2^d, K+1, m]
            c_price = np.stack([c[1] for c in corners], 1)
            grid = self.grid
            widths = np.asarray(
                [hi[0] - low[0] for low, hi in zip(grid.cell_lo, grid.cell_hi, strict=True)]
            )
            d = (self.n - 1) * self.m
            cell_w = np.stack(
                [np.broadcast_to(widths[self.grid.others(i)], (rows, d)) for i in range(self.n)], 1
            )
            arrays += [c_alloc, c_price, cell_w]
        outs = []
        for s in range(0, rows, chunk):
            part = [x[s : s + chunk] for x in arrays]
            b = len(part[0])
            pad = chunk - b  # one shape: one compilation
            args = [np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge") for x in part]
            out = jax.device_get(self.rel(*(jnp.asarray(a, jnp.float32) for a in args)))
            outs.append([np.asarray(x)[:b] for x in out])
        out = [np.concatenate(parts) for parts in zip(*outs, strict=True)]
        if not np.all(single):
            out[0] = out[0] & single  # ok
            out[-1] = out[-1] & single  # small: the MILP gets no relational option there
        return out

    def witnesses(self, lo: np.ndarray, size: np.ndarray):
        """``(index [W, 5], t [W])`` relational witnesses of the boxes the interval test fails."""
        index, ts = [np.zeros((0, 5), np.int64)], [np.zeros(0)]
        if self.rel is None:
            return index[0], ts[0]
        ok, _ = self.run(lo, size, np.ones(self.n, np.float32), relational=False)
        rows = np.flatnonzero(~ok)
        if len(rows):
            rlo, rhi = self.grid.bounds(lo[rows], size[rows], self.config.box_inflation)
            delta = self.deltas(lo[rows], size[rows])
            shape = (len(rows), self.n, self.m)
            r_ok, conflict, k0, k1, l0, l1, t, _, _ = self._relational(
                rlo.reshape(shape), rhi.reshape(shape), delta, lo[rows], size[rows]
            )
            if not np.all(r_ok):
                raise RepairError(f"{int((~r_ok).sum())} final boxes lost their certificate")
            b, a, c = np.nonzero(conflict)
            index.append(
                np.stack([rows[b], k0[b, a], k1[b, c], l0[b, a, c], l1[b, a, c]], -1).astype(
                    np.int64
                )
            )
            ts.append(t[b, a, c].astype(np.float64))
        return np.concatenate(index), np.concatenate(ts)

    def deltas(self, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Exact offsets per box and bidder (boxes are resolved: one cell or no offset cell;
        quantized menus resolve only the finest boxes whose details are asked for)."""
        out = np.zeros((len(lo), self.n, self.k1))
        for i, off in enumerate(self.offsets):
            if not off.table:
                continue
            single = np.all(size[:, off.dims] == 1, axis=1)
            if np.any(single):
                out[single, i] = off.exact(lo[single])
        return out

    def _call(self, fn, arrays, active, details):
        rows, chunk = len(arrays[0]), self.config.chunk
        # pad to a power of two so that the bound function compiles for few shapes
        pad = min(chunk, max(256, 1 << (rows - 1).bit_length())) - rows
        args = [np.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), mode="edge") for x in arrays]
        out = fn(*(jnp.asarray(a, jnp.float32) for a in args), jnp.asarray(active))
        return [np.asarray(x)[:rows] for x in jax.device_get(out if details else out[:2])]

    def run(
        self,
        lo: np.ndarray,
        size: np.ndarray,
        active: np.ndarray,
        *,
        details=False,
        relational=True,
    ):
        chunk = self.config.chunk
        results = []
        for s in range(0, len(lo), chunk):
            l_, z_ = lo[s : s + chunk], size[s : s + chunk]
            rows = len(l_)
            rlo, rhi = self.grid.bounds(l_, z_, self.config.box_inflation)
            # Quantized menus carry their offsets in the envelope (any box); otherwise, and for
            # the details of finest boxes (utilities before offsets), offsets are exact per box.
            priced = self.cell_menus is not None and not details
            delta = np.zeros((rows, self.n, self.k1)) if priced else self.deltas(l_, z_)
            arrays = [rlo.reshape(rows, self.n, self.m), rhi.reshape(rows, self.n, self.m), delta]
            if self.cell_menus is not None:
                arrays += self.cell_menus.envelope(l_, z_, priced=priced)
            if details or self.fast is None:
                out = self._call(self.fn, arrays, active, details)
            else:
                # whole-box bounds first (bound_splits^inputs times cheaper); parts only where
                # they fail (parts are at least as tight, so the verdicts are the same)
                out = self._call(self.fast, arrays, active, False)
                fail = np.flatnonzero(~out[0])
                if len(fail):
                    again = self._call(self.fn, [a[fail] for a in arrays], active, False)
                    out = [x.copy() for x in out]
                    out[0][fail], out[1][fail] = again
            if relational and self.rel is not None and np.all(active > 0) and not details:
                fail = np.flatnonzero(~out[0])
                if len(fail):
                    if self.interpolate:  # exact offsets of finest boxes (the test needs them)
                        delta = self.deltas(l_, z_)
                    r_ok = self._relational(
                        rlo.reshape(rows, self.n, self.m)[fail],
                        rhi.reshape(rows, self.n, self.m)[fail],
                        delta[fail],
                        l_[fail],
                        z_[fail],
                    )[0]
                    out[0] = out[0].copy()
                    out[0][fail] = r_ok
                    self.n_relational += int(r_ok.sum())
            results.append(out)
        self.n_checked += len(lo)
        return [np.concatenate(parts) for parts in zip(*results, strict=True)]


def certifiable_share(
    model: GemNet,
    setting: Setting,
    *,
    level: int,
    key: PRNGKeyArray,
    n_boxes: int = 4096,
    config: RepairConfig = RepairConfig(),
) -> Estimate:
    """Share of the boxes of the uniform level-``level`` grid that the interval test certifies
    with the trained prices (no repair), estimated on ``n_boxes`` boxes drawn uniformly. The menus
    are bounded by interval propagation through the network (as with ``quantize=False``), so the
    estimate needs no table of cells and works for any number of coordinates.

    A diagnostic of how fine the repair's partition must become: a uniform grid has
    ``2^(level * bidders * items)`` boxes, and every box of the final partition must be certified
    (by the trained prices or by raised ones). Discrete coordinates are drawn point by point.

    Raises:
      ValueError: a setting the repair cannot handle, or ``level`` / ``n_boxes`` out of range.
    """
    require_learned_menus(model, "certifiable_share")
    if not 0 <= level <= 20:
        raise ValueError(f"level must be in [0, 20], got {level}")
    if n_boxes < 1:
        raise ValueError(f"n_boxes must be positive, got {n_boxes}")
    grid = _make_grid(setting, level)
    cells = jnp.asarray(grid.cells, jnp.int32)
    lo = np.asarray(jax.random.randint(key, (n_boxes, len(grid.cell_lo)), 0, cells), np.int64)
    rlo, rhi = grid.bounds(lo, np.ones_like(lo), config.box_inflation)
    n, m, k1 = model.n_bidders, model.n_items, model.menu_size + 1
    scale = model.price_scale
    fn = _bound_fn(
        model,
        config.utility_tolerance * scale,
        config.alloc_tolerance,
        effective_splits(config.bound_splits, model),
    )
    active = jnp.ones(n, jnp.float32)
    ok = []
    for s in range(0, n_boxes, config.chunk):
        b = min(config.chunk, n_boxes - s)
        args = [jnp.asarray(x[s : s + b].reshape(b, n, m), jnp.float32) for x in (rlo, rhi)]
        out = fn(*args, jnp.zeros((b, n, k1), jnp.float32), active)
        ok.append(np.asarray(jax.device_get(out[0])))
    share = float(np.mean(np.concatenate(ok)))
    return Estimate(share, math.sqrt(share * (1.0 - share) / n_boxes), n_boxes)


def effective_splits(splits: int, model: GemNet) -> int:
    """``splits`` reduced until ``splits ** inputs <= 64`` (``inputs``: coordinates of ``b_-i``)."""
    inputs = max((model.n_bidders - 1) * model.n_items, 1)
    while splits > 1 and splits**inputs > 64:
        splits -= 1
    return max(splits, 1)


def _resolve(lo, size, offsets: list[_Offsets]):
    """Split boxes until each box's ``b_-i`` projection is one cell or holds no offset cell."""
    done_lo, done_size = [lo[:0]], [size[:0]]
    while len(lo):
        need = np.zeros(len(lo), bool)
        split_dims = np.full(len(lo), -1)
        for off in offsets:
            if not off.table:
                continue
            coarse = ~np.all(size[:, off.dims] == 1, axis=1)
            hit = coarse & (off.count_in(lo, size) > 0)
            # widest coordinate of b_-i to split next
            widths = np.where(hit[:, None], size[:, off.dims], 0)
            dim = np.asarray(off.dims)[np.argmax(widths, axis=1)]
            split_dims = np.where(hit & ~need, dim, split_dims)
            need |= hit
        done_lo.append(lo[~need])
        done_size.append(size[~need])
        lo, size, axis = lo[need], size[need], split_dims[need]
        if len(lo):
            rows = np.arange(len(lo))
            half = size[rows, axis] // 2
            size2 = size.copy()
            size2[rows, axis] = half
            lo2 = lo.copy()
            lo2[rows, axis] += half
            lo, size = np.concatenate([lo, lo2]), np.concatenate([size2, size2])
    return np.concatenate(done_lo), np.concatenate(done_size)


# --------------------------------------------------------------------------------------------------
# The repaired mechanism.


class RepairedGemNet(nnx.Module):
    """A trained GemNet plus the repair's price offsets, looked up from the cell of ``b_-i``.

    ``model(bids [*batch, bidders, items]) -> Outcome``; ``model.menus(bids)`` as for GemNet.
    Offsets are non-negative and depend on the others' bids only, so the mechanism stays
    strategy-proof; the certificate says it is also compatible on the whole support. With a
    quantized certificate the network's menus are taken at the centre of the cell of ``b_-i``,
    with an interpolated one interpolated between the cell's corners (:meth:`interpolate`).
    """

    def __init__(self, base: GemNet, certificate: Certificate):
        n, m = base.n_bidders, base.n_items
        if (certificate.n_bidders, certificate.n_items, certificate.menu_size) != (
            n,
            m,
            base.menu_size,
        ):
            raise ValueError(
                "certificate is for "
                f"{(certificate.n_bidders, certificate.n_items, certificate.menu_size)} "
                f"(bidders, items, menu size), the GemNet is {(n, m, base.menu_size)}"
            )
        self.base = base
        coords = []
        for d in range(n * m):
            lo, hi = np.asarray(certificate.cell_lo[d]), np.asarray(certificate.cell_hi[d])
            if certificate.discrete[d]:
                mids = tuple(float(x) for x in (lo[1:] + lo[:-1]) / 2)
                coords.append(("discrete", mids))
            else:
                width = float(hi[0] - lo[0])
                coords.append(("continuous", (float(lo[0]), 1.0 / width, len(lo))))
        self.coords = tuple(coords)
        self.strides = tuple(tuple(int(s) for s in certificate.strides(i)) for i in range(n))
        self.others = tuple(tuple(certificate.others_coordinates(i)) for i in range(n))
        for i in range(n):
            keys = np.asarray(certificate.offset_keys[i], np.int64)
            if len(keys) and keys.max() >= 2**31:
                raise ValueError("offset keys beyond int32: lower the repair's max_level")
        self.offset_keys = nnx.List(
            [nnx.Variable(jnp.asarray(k, jnp.int32)) for k in certificate.offset_keys]
        )
        self.offset_values = nnx.List(
            [nnx.Variable(jnp.asarray(v, jnp.float32)) for v in certificate.offset_values]
        )
        self.n_bidders, self.n_items, self.menu_size = n, m, base.menu_size
        self.quantized = bool(certificate.quantized)
        self.interpolated = bool(certificate.interpolated)
        # interpolated menus: the cells' corners per coordinate, float32 as in the repair
        self.nodes = tuple(
            tuple(
                float(x)
                for x in np.concatenate(
                    [np.asarray(certificate.cell_lo[d]), np.asarray(certificate.cell_hi[d])[-1:]]
                ).astype(np.float32)
            )
            for d in range(n * m)
        )
        # the cells' representatives, exactly as the repair computed the quantized menus there
        self.centres = tuple(
            None
            if certificate.discrete[d]
            else tuple(
                float(x)
                for x in (
                    (np.asarray(certificate.cell_lo[d]) + np.asarray(certificate.cell_hi[d])) / 2.0
                ).astype(np.float32)
            )
            for d in range(n * m)
        )

    def quantize(
        self, bids: Float[Array, "*batch bidders items"]
    ) -> Float[Array, "*batch bidders items"]:
        """Every continuous coordinate moved to its cell's centre (discrete ones unchanged)."""
        n, m = self.n_bidders, self.n_items
        flat = bids.reshape(*bids.shape[:-2], n * m)
        cols = [
            flat[..., d]
            if c is None
            else jnp.asarray(c, bids.dtype)[self._cell_index(flat[..., d], d)]
            for d, c in enumerate(self.centres)
        ]
        return jnp.stack(cols, -1).reshape(bids.shape)

    def _cell_index(self, x, d):
        kind, spec = self.coords[d]
        if kind == "discrete":
            return jnp.sum(x[..., None] > jnp.asarray(spec, x.dtype), axis=-1).astype(jnp.int32)
        low, inv_width, cells = spec
        q = jnp.floor((x - low) * inv_width).astype(jnp.int32)
        return jnp.clip(q, 0, cells - 1)

    def offsets(
        self, bids: Float[Array, "*batch bidders items"]
    ) -> Float[Array, "*batch bidders elements"]:
        """``[*batch, bidders, K + 1]`` price offsets at ``bids`` (from ``b_-i`` only)."""
        n, m = self.n_bidders, self.n_items
        flat = bids.reshape(*bids.shape[:-2], n * m)
        rows = []
        for i in range(n):
            keys, values = self.offset_keys[i][...], self.offset_values[i][...]
            if keys.shape[0] == 0:
                rows.append(jnp.zeros((*bids.shape[:-2], self.menu_size + 1), bids.dtype))
                continue
            key = jnp.zeros(bids.shape[:-2], jnp.int32)
            for d, stride in zip(self.others[i], self.strides[i], strict=True):
                key = key + self._cell_index(flat[..., d], d) * stride
            pos = jnp.clip(jnp.searchsorted(keys, key), 0, keys.shape[0] - 1)
            found = keys[pos] == key
            rows.append(jnp.where(found[..., None], values[pos], 0.0))
        return jnp.stack(rows, axis=-2)

    def interpolate(self, bids: Float[Array, "*batch bidders items"]) -> Menus:
        """Each bidder's menu interpolated multilinearly between the network's menus at the
        corners of its cell of ``b_-i`` (before offsets; the certificate's ``interpolated``)."""
        n, m = self.n_bidders, self.n_items
        flat = bids.reshape(*bids.shape[:-2], n * m)
        lower, upper, frac = [], [], []
        for d in range(n * m):
            nodes = jnp.asarray(self.nodes[d], bids.dtype)
            q = self._cell_index(flat[..., d], d)
            lo, hi = nodes[q], nodes[q + 1]
            lower.append(lo)
            upper.append(hi)
            frac.append(jnp.clip((flat[..., d] - lo) / (hi - lo), 0.0, 1.0))
        allocs, prices = [], []
        for i in range(n):
            dims = self.others[i]
            alloc, price = 0.0, 0.0
            for bits in itertools.product((0, 1), repeat=len(dims)):
                cols = [lower[d] for d in range(n * m)]  # own coordinates: any (unused)
                weight = jnp.ones(bids.shape[:-2], bids.dtype)
                for bit, d in zip(bits, dims, strict=True):
                    cols[d] = upper[d] if bit else lower[d]
                    weight = weight * (frac[d] if bit else 1.0 - frac[d])
                corner = self.base.menus(jnp.stack(cols, -1).reshape(bids.shape))
                alloc = alloc + weight[..., None, None] * corner.alloc[..., i, :, :]
                price = price + weight[..., None] * corner.price[..., i, :]
            # a convex combination of allocations in [0, 1], up to float32 rounding: clip it, so
            # that one bidder never takes more than 1 (the certificate relies on that)
            allocs.append(jnp.clip(alloc, 0.0, 1.0))
            prices.append(price)
        return Menus(alloc=jnp.stack(allocs, -3), price=jnp.stack(prices, -2))

    def menus(self, bids: Float[Array, "*batch bidders items"]) -> Menus:
        check_bids(bids, n_bidders=self.n_bidders, n_items=self.n_items)
        if self.interpolated:
            base = self.interpolate(bids)
        else:
            base = self.base.menus(self.quantize(bids) if self.quantized else bids)
        return Menus(alloc=base.alloc, price=base.price + self.offsets(bids))

    def __call__(self, bids: Float[Array, "*batch bidders items"]) -> Outcome:
        return choose(self.menus(bids), bids).outcome


def model_digest(model: GemNet) -> str:
    """The certificate's digest of a GemNet's parameters."""
    leaves = [np.asarray(w[...]) for w in model.weights] + [
        np.asarray(b[...]) for b in model.biases
    ]
    return params_digest(leaves)


# --------------------------------------------------------------------------------------------------
# The repair loop.


class _MilpPool:
    """Solves cell MILPs in ``workers`` processes, started on first use and kept for the whole
    repair: a spawned worker imports JAX, seconds per start, which a pool per batch of
    ``MILP_BATCH`` problems paid dozens of times."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def solve(self, problems: list[CellProblem]) -> list[CellSolution]:
        if self.workers <= 1 or len(problems) <= 1:
            return [solve_cell(p) for p in problems]
        if self._executor is None:
            ctx = multiprocessing.get_context("spawn")  # JAX is threaded: never fork it
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers,
                mp_context=ctx,
                initializer=exit_with_parent,  # no orphans if the repair is killed
                initargs=(os.getpid(),),
            )
        chunk = max(1, len(problems) // (4 * self.workers))
        return list(self._executor.map(solve_cell, problems, chunksize=chunk))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None


def repair(
    model: GemNet, setting: Setting, config: RepairConfig = RepairConfig()
) -> tuple[RepairedGemNet, Certificate]:
    """Repair ``model`` so that its menus are compatible on the whole support of ``setting``.

    Returns:
      The repaired mechanism and its certificate (check it with ``gemnet.verify_certificate``).

    Raises:
      ValueError: a setting that does not match the model, or that the repair cannot handle
        (correlated or unbounded values).
      RepairError: a MILP failed (infeasible at every floor, or out of time), limits were hit, or
        the GemNet has item-price bundles (``GemNetConfig.item_prices``), which it does not model.
    """
    t0 = time.perf_counter()
    if not isinstance(model, GemNet):
        raise ValueError(f"repair needs a GemNet, got {type(model).__name__}")
    if (setting.n_bidders, setting.n_items, setting.valuation) != (
        model.n_bidders,
        model.n_items,
        model.valuation,
    ):
        raise ValueError(
            f"setting {setting.name!r} is {setting.n_bidders} x {setting.n_items} "
            f"{setting.valuation}; the GemNet is {model.n_bidders} x {model.n_items} "
            f"{model.valuation}"
        )
    grid = _make_grid(setting, config.max_level)
    if config.interpolate and not config.quantize:
        raise ValueError("RepairConfig.interpolate needs quantize=True (it interpolates cells)")
    if config.interpolate and any(grid.discrete):
        raise ValueError(
            f"RepairConfig.interpolate needs continuous values; {setting.name!r} has discrete "
            "coordinates"
        )
    expected = (tuple(map(float, setting.low.ravel())), tuple(map(float, setting.high.ravel())))
    if (model.low, model.high) != expected:
        raise ValueError(f"the GemNet was built for another support than {setting.name!r}'s")
    n, k1 = model.n_bidders, model.menu_size + 1
    scale = model.price_scale
    offsets = [_Offsets(grid, i, k1) for i in range(n)]
    if model.item_prices:  # after the grid checks: a grid too large is the first reason to give
        raise RepairError(
            "the repair does not support GemNets with item_prices=True (their bundles' prices "
            "follow the others' bids through a max that the bounds and certificate do not model)"
            + (
                "; this one has no learned elements and needs no repair: it is compatible by "
                "construction (GemNet.compatible_by_construction)"
                if model.compatible_by_construction
                else ""
            )
        )
    checker = _Checker(model, grid, offsets, config, scale)
    workers = config.workers or os.cpu_count() or 1
    lo, size = _initial_boxes(grid, config.start_level, config.max_boxes)
    stats: dict[str, Any] = {
        "rounds": 0,
        "milps": 0,
        "milp_wall_s": 0.0,
        "statuses": {},
        "floor_slacks": {},
        "repaired_cells": [0] * n,
    }
    stages = range(1, n) if n > 1 else [0]
    if (
        all(grid.discrete)
        and config.discrete_revenue
        and _discrete_revenue_repair(model, setting, grid, offsets, checker, config, scale, stats)
    ):
        stages = []
    pool = _MilpPool(workers)
    try:
        for r in stages:
            active = (np.arange(n) <= r).astype(np.float32)
            lo, size = _certify_stage(
                r, lo, size, active, grid, offsets, checker, config, scale, pool, stats
            )
    finally:
        pool.close()
    if config.tighten_discrete and all(grid.discrete):
        stats["tightened_cells"] = _tighten_discrete(model, setting, grid, offsets, config, scale)
        ok, _ = checker.run(lo, size, np.ones(n, np.float32))
        if not np.all(ok):  # pragma: no cover - the tightening keeps every choice by construction
            raise RepairError(f"price tightening broke {int((~ok).sum())} certified boxes")
    keys, values = zip(*(off.arrays() for off in offsets), strict=True)
    witness_index, witness_t = checker.witnesses(lo, size)
    stats.update(
        relational_boxes=len(np.unique(witness_index[:, 0])),
        witnesses=len(witness_t),
        n_boxes=len(lo),
        boxes_checked=checker.n_checked,
        offset_cells=[len(k) for k in keys],
        wall_s=round(time.perf_counter() - t0, 3),
        max_level=config.max_level,
        pairwise=config.pairwise,
        interpolate=checker.interpolate,
    )
    cert = Certificate(
        setting=setting.name,
        n_bidders=n,
        n_items=model.n_items,
        menu_size=model.menu_size,
        params_digest=model_digest(model),
        cell_lo=grid.cell_lo,
        cell_hi=grid.cell_hi,
        discrete=grid.discrete,
        box_lo=lo,
        box_size=size,
        offset_keys=tuple(keys),
        offset_values=tuple(values),
        utility_tolerance=config.utility_tolerance * scale,
        alloc_tolerance=config.alloc_tolerance,
        box_inflation=config.box_inflation,
        bound_splits=effective_splits(config.bound_splits, model),
        quantized=checker.cell_menus is not None,
        interpolated=checker.interpolate,
        activation=model.activation,
        witness_index=witness_index,
        witness_t=witness_t,
        stats=stats,
    )
    return RepairedGemNet(model, cert), cert


def _certify_stage(r, lo, size, active, grid, offsets, checker, config, scale, pool, stats):
    """Certify ``sum_{i <= r}`` compatibility, giving active bidders offsets where needed.

    Each finest box that fails is assigned to one active bidder whose prices change there: bidder
    ``r`` alone, or (``config.two_sided``) the one that can exclude its conflicting elements
    from the box with the smaller price rise (:func:`_assign`).
    """
    constraints: dict[tuple[int, int], set[tuple[int, ...]]] = defaultdict(set)
    owners: dict[tuple[int, ...], int] = {}
    fails: dict[tuple[int, ...], int] = defaultdict(int)
    bidders_on = [int(i) for i in np.flatnonzero(active > 0)]
    certified: list[tuple[np.ndarray, np.ndarray]] = []
    pending = (lo, size)

    def resolve(lo, size):
        # quantized menus bound offsets with the prices, over any box (_CellMenus)
        return (lo, size) if checker.cell_menus is not None else _resolve(lo, size, offsets)

    for round_ in range(config.max_rounds + 1):
        failed_lo = [pending[0][:0]]
        p_lo, p_size = resolve(*pending)
        while len(p_lo):
            if len(p_lo) > config.max_boxes:
                raise RepairError(
                    f"{len(p_lo)} boxes pending (limit {config.max_boxes}): the menus are too "
                    "incompatible to certify at this resolution"
                )
            ok, _ = checker.run(p_lo, p_size, active)
            if config.progress:
                print(
                    f"[repair]   checked {len(p_lo)} boxes, {int(ok.sum())} certified", flush=True
                )
            certified.append((p_lo[ok], p_size[ok]))
            f_lo, f_size = p_lo[~ok], p_size[~ok]
            finest = np.all(f_size == 1, axis=1)
            failed_lo.append(f_lo[finest])
            p_lo, p_size = resolve(*_split(f_lo[~finest], f_size[~finest]))
        f_lo = np.concatenate(failed_lo)
        if config.progress:
            n_cert = sum(len(c[0]) for c in certified)
            n_off = sum(len(off.table) for off in offsets)
            print(
                f"[repair] stage {r} round {round_}: {n_cert} boxes certified, {len(f_lo)} "
                f"finest boxes to repair, {n_off} offset cells",
                flush=True,
            )
        if not len(f_lo):
            break
        if round_ == config.max_rounds:
            raise RepairError(f"stage {r}: still {len(f_lo)} boxes after {round_} MILP rounds")
        owner = _assign(f_lo, r, active, checker) if config.two_sided else np.full(len(f_lo), r)
        # A box keeps the bidder it was first given (no ping-pong between the two sides), unless
        # it keeps failing with it: a rival's element can sit at the edge of the candidate
        # tolerance, in or out by float32 rounding that differs between batches of boxes, where
        # the owner's MILP sees nothing to exclude; the rival's MILP excludes it with a margin.
        for b, row in enumerate(map(tuple, f_lo.tolist())):
            fails[row] += 1
            if row in owners and fails[row] % STUCK_ROUNDS == 0:
                owners[row] = bidders_on[(bidders_on.index(owners[row]) + 1) % len(bidders_on)]
            owner[b] = owners.setdefault(row, int(owner[b]))
        use_rel = round_ < config.relational_rounds
        jobs: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        changed: dict[int, list[int]] = {}
        for i in sorted(set(owner.tolist())):
            rows_i = f_lo[owner == i]
            keys = offsets[i].keys_of(rows_i)
            own = grid.own(i)
            for key, row in zip(keys, rows_i, strict=True):
                constraints[(i, int(key))].add(tuple(int(x) for x in row[own]))
            changed[i] = sorted(set(int(k) for k in keys))
            jobs.extend((i, key, rows_i, keys) for key in changed[i])
        # Built and solved a batch at a time (a problem holds utilities of all its boxes), all
        # against the offsets as they were at the start of the round.
        bidders: list[int] = []
        solutions: list[CellSolution] = []
        bar = tqdm(
            total=len(jobs),
            desc=f"[repair] stage {r} round {round_} cell MILPs",
            disable=not config.progress,
            leave=False,
        )
        for s in range(0, len(jobs), MILP_BATCH):
            problems = [
                _cell_problem(
                    i,
                    key,
                    constraints[(i, key)],
                    rows_i,
                    keys,
                    grid,
                    checker,
                    active,
                    config,
                    relational=use_rel,
                )
                for i, key, rows_i, keys in jobs[s : s + MILP_BATCH]
            ]
            t_milp = time.perf_counter()
            solutions.extend(pool.solve(problems))
            stats["milp_wall_s"] += time.perf_counter() - t_milp
            bidders.extend(job[0] for job in jobs[s : s + MILP_BATCH])
            bar.update(len(problems))
        bar.close()
        stats["milps"] += len(jobs)
        stats["rounds"] += 1
        for i, sol in zip(bidders, solutions, strict=True):
            stats["statuses"][sol.status] = stats["statuses"].get(sol.status, 0) + 1
            if sol.offsets is None:
                raise RepairError(
                    f"stage {r}: the MILP of bidder {i}'s cell {sol.cell} found no offsets "
                    f"(last status {sol.status} at floor slack {sol.floor_slack}); the menus "
                    "cannot be made compatible there by raising prices within the limits"
                )
            # which utility floor each cell's MILP solved at, as a fraction of the price scale
            # (RepairConfig.floor_slacks; "inf": the null element's 0, where bidders may be
            # priced out of every bad element)
            slack = str(round(sol.floor_slack / scale, 6))
            stats["floor_slacks"][slack] = stats["floor_slacks"].get(slack, 0) + 1
            stats["repaired_cells"][i] += 1
            offsets[i].set(sol.cell, sol.offsets)
        # Every box whose b_-i projection meets a changed cell of bidder i is checked again.
        c_lo = np.concatenate([c[0] for c in certified])
        c_size = np.concatenate([c[1] for c in certified])
        touched = np.zeros(len(c_lo), bool)
        for i, keys_i in changed.items():
            prefix = offsets[i]._prefix(keys_i)
            touched |= offsets[i].count_in(c_lo, c_size, prefix) > 0
        certified = [(c_lo[~touched], c_size[~touched])]
        # ...and so is every failed box (now constrained by its cell's MILP).
        pending = (
            np.concatenate([c_lo[touched], f_lo]),
            np.concatenate([c_size[touched], np.ones_like(f_lo)]),
        )
    c_lo = np.concatenate([c[0] for c in certified])
    c_size = np.concatenate([c[1] for c in certified])
    return c_lo, c_size


def _bad_elements(i, usage, a_hi, active):
    """``[boxes, K + 1]``: bidder ``i``'s elements that over-allocate with the other active
    bidders' largest candidate allocations (``usage [boxes, n, m]``; null never bad)."""
    others_active = active.copy()
    others_active[i] = 0.0
    taken = np.sum(usage * others_active[None, :, None], axis=1)  # [boxes, m]
    over = a_hi[:, i] + taken[:, None, :] > 1.0 - BUILDER_ALLOC_MARGIN
    bad = np.any(over & (taken[:, None, :] > 0.0) & (a_hi[:, i] > 0.0), axis=-1)
    bad[:, -1] = False
    return bad


def _assign(f_lo, r, active, checker) -> np.ndarray:
    """``[boxes]``: the active bidder that repairs each failed finest box.

    A bidder's cost is the largest utility margin by which one of its conflicting candidates
    must fall to lose to its best non-conflicting element (the null element's 0 at least): the
    price rise the box asks of it. When one bidder would have to be priced out of everything
    while the other need only switch between elements, the second is far cheaper. Boxes are
    taken ``checker.config.chunk`` at a time (their utilities would not fit in memory at once).
    """
    chunk = checker.config.chunk
    if len(f_lo) > chunk:
        return np.concatenate(
            [_assign(f_lo[s : s + chunk], r, active, checker) for s in range(0, len(f_lo), chunk)]
        )
    size = np.ones_like(f_lo)
    _, usage, u_hi0, u_lo0, a_hi = checker.run(f_lo, size, active, details=True)
    delta = checker.deltas(f_lo, size)
    u_hi, u_lo = u_hi0 - delta, u_lo0 - delta
    cost = np.full((len(f_lo), checker.n), np.inf)
    for i in np.flatnonzero(active > 0):
        bad = _bad_elements(i, usage, a_hi, active)
        best = np.max(u_lo[:, i], axis=-1, keepdims=True)
        cand = u_hi[:, i] >= best - BUILDER_SLACK * checker.config.utility_tolerance * checker.scale
        floor = np.maximum(np.max(np.where(bad, -np.inf, u_lo[:, i]), axis=-1), 0.0)
        need = np.where(bad & cand, u_hi[:, i] - floor[:, None], -np.inf)
        worst = np.max(need, axis=-1)
        cost[:, i] = np.where(np.isfinite(worst), np.maximum(worst, 0.0), np.inf)
    owner = np.argmin(cost, axis=1)
    # a box no bidder can fix by itself (should not happen) goes to bidder r as before
    return np.where(np.isfinite(np.min(cost, axis=1)), owner, r)


def _support_table(grid: _Grid, dims: list[int]) -> np.ndarray:
    """``[combos, len(dims)]`` every combination of the cells of ``dims``, row-major."""
    axes = [np.arange(len(grid.cell_lo[d])) for d in dims]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(dims))


def _type_probs(setting: Setting, grid: _Grid, bidder: int, cells: np.ndarray) -> np.ndarray:
    values = setting.values
    assert isinstance(values, IndependentValues)  # checked by _make_grid
    probs = np.ones(len(cells))
    for t, d in enumerate(grid.own(bidder)):
        marginal = values.marginal(bidder, d - bidder * grid.m)
        assert isinstance(marginal, Discrete)
        probs = probs * np.asarray(marginal.probs)[cells[:, t]]
    return probs


def _cell_menus(model: GemNet, grid: _Grid, bidder: int, offsets: list[_Offsets]):
    """Bidder's exact menu at every cell of ``b_-i`` of a discrete grid (float64, with offsets)."""
    n, m = grid.n, grid.m
    others = grid.others(bidder)
    cells = _support_table(grid, others)
    lo_idx = np.zeros((len(cells), n * m), np.int64)
    lo_idx[:, others] = cells
    profiles = np.stack([grid.cell_lo[d][lo_idx[:, d]] for d in range(n * m)], -1)
    bids = jnp.asarray(profiles.reshape(-1, n, m), jnp.float32)
    menus = model.menus(bids)
    alloc = np.asarray(menus.alloc[:, bidder], np.float64)  # [cells, K+1, m]
    price = np.asarray(menus.price[:, bidder], np.float64) + offsets[bidder].exact(lo_idx)
    # the checker's allocation bounds at the point (exact zeros of a clipped head stay 0)
    others = others_bids(bids)
    bound = np.asarray(menu_bounds(model, others, others).alloc[1][:, bidder], np.float64)
    return lo_idx, alloc, price, bound


def _discrete_revenue_repair(model, setting, grid, offsets, checker, config, scale, stats) -> bool:
    """The joint revenue MILP of a discrete setting; ``True`` if its rises certify every box."""
    n, m, k1 = grid.n, grid.m, model.menu_size + 1
    own_tables = [_support_table(grid, grid.own(i)) for i in range(n)]
    cell_tables = [_support_table(grid, grid.others(i)) for i in range(n)]
    n_cells = max(len(t) for t in cell_tables)
    n_types = max(len(t) for t in own_tables)
    if n * n_cells * n_types * k1 > config.discrete_max_binaries:
        return False
    utilities = np.zeros((n, n_cells, n_types, k1))
    prices = np.zeros((n, n_cells, k1))
    alloc_hi = np.zeros((n, n_cells, k1, m))
    for i in range(n):
        _, alloc, price, bound = _cell_menus(model, grid, i, offsets)
        values = np.stack(
            [grid.cell_lo[d][own_tables[i][:, t]] for t, d in enumerate(grid.own(i))], -1
        )
        c = len(cell_tables[i])
        utilities[i, :c, : len(values)] = np.einsum("tm,ckm->ctk", values, alloc) - price[:, None]
        prices[i, :c] = price
        alloc_hi[i, :c] = np.where(bound > 0, np.minimum(bound + config.alloc_tolerance, 1.0), 0.0)
        alloc_hi[i, :c, -1] = 0.0
    profiles = _support_table(grid, list(range(n * m)))
    probs = np.ones(len(profiles))
    cell_of = np.zeros((len(profiles), n), np.int64)
    type_of = np.zeros((len(profiles), n), np.int64)
    for i in range(n):
        cell_of[:, i] = profiles[:, grid.others(i)] @ grid.strides(i)
        own = profiles[:, grid.own(i)]
        type_of[:, i] = np.ravel_multi_index(own.T, [len(grid.cell_lo[d]) for d in grid.own(i)])
        probs = probs * _type_probs(setting, grid, i, own)
    t0 = time.perf_counter()
    rises, status, objective = discrete_revenue_milp(
        utilities,
        prices,
        alloc_hi,
        cell_of,
        type_of,
        probs,
        eps=config.milp_margin * config.utility_tolerance * scale,
        alloc_margin=2 * BUILDER_ALLOC_MARGIN,
        time_limit_s=config.time_limit_s,
        signed=config.discrete_signed,
    )
    stats["milps"] += 1
    stats["milp_wall_s"] += time.perf_counter() - t0
    stats["statuses"][status] = stats["statuses"].get(status, 0) + 1
    stats["discrete_revenue_milp"] = {"status": status, "objective": objective}
    if rises is None:
        return False
    saved = [dict(off.table) for off in offsets]
    for i, off in enumerate(offsets):
        lo_idx = np.zeros((len(cell_tables[i]), n * m), np.int64)
        lo_idx[:, grid.others(i)] = cell_tables[i]
        base = off.exact(lo_idx)
        for c, key in enumerate(off.keys_of(lo_idx)):
            off.set(int(key), base[c] + rises[i, c])
    lo, size = _initial_boxes(grid, config.start_level, config.max_boxes)
    ok, _ = checker.run(lo, size, np.ones(n, np.float32))
    if np.all(ok):
        return True
    for off, table in zip(offsets, saved, strict=True):  # fall back to the staged repair
        off.restore(table)
    stats["discrete_revenue_milp"]["certified"] = False
    return False


def _tighten_discrete(model, setting, grid, offsets, config, scale) -> int:
    """Raise prices cell by cell as far as every type's choice allows (discrete settings)."""
    margin = 2.0 * config.milp_margin * config.utility_tolerance * scale
    tightened = 0
    for i, off in enumerate(offsets):
        own = _support_table(grid, grid.own(i))
        values = np.stack([grid.cell_lo[d][own[:, t]] for t, d in enumerate(grid.own(i))], -1)
        probs = _type_probs(setting, grid, i, own)
        lo_idx, alloc, price, _ = _cell_menus(model, grid, i, offsets)
        for c, key in enumerate(off.keys_of(lo_idx)):
            utilities = values @ alloc[c].T - price[c][None, :]  # [types, K+1]
            rises = tighten_prices(utilities, probs, margin=margin, limit=10.0 * scale)
            if rises is not None and np.any(rises > 0):
                off.set(int(key), off.exact(lo_idx[c : c + 1])[0] + rises)
                tightened += 1
    return tightened


def _cell_problem(
    i, key, own_rows, f_lo, keys, grid, checker, active, config, *, relational=True
) -> CellProblem:
    """The MILP data of bidder ``i``'s cell ``key`` over its constrained boxes."""
    template = f_lo[np.flatnonzero(keys == key)[0]]
    own = grid.own(i)
    rows = np.array(sorted(own_rows), np.int64)
    lo = np.repeat(template[None, :], len(rows), axis=0)
    lo[:, own] = rows
    size = np.ones_like(lo)
    _, usage, u_hi0, u_lo0, a_hi = checker.run(lo, size, active, details=True)
    rel: dict[str, Any] = {}
    if relational and checker.rel is not None and np.all(active > 0):
        rel = _relational_rows(i, lo, size, checker)
    if checker.cell_menus is not None and config.pairwise:
        # every box lies in this one cell of b_-i: one menu (exact), the boxes' own values
        m_lo, m_hi, p_lo, p_hi = (
            x[0, i].astype(np.float64) for x in checker.cell_menus.envelope(lo[:1], size[:1])
        )
        a_top = _alloc_top(m_hi, config.alloc_tolerance, np)
        rlo, rhi = checker.grid.bounds(lo, size, config.box_inflation)
        shape = (len(lo), checker.n, checker.m)
        rel.update(
            menu=(m_lo, a_top, p_lo, p_hi),
            v_lo=rlo.reshape(shape)[:, i].astype(np.float64),
            v_hi=rhi.reshape(shape)[:, i].astype(np.float64),
        )
    return CellProblem(
        cell=int(key),
        u_hi=u_hi0[:, i].astype(np.float64),
        u_lo=u_lo0[:, i].astype(np.float64),
        bad=_bad_elements(i, usage, a_hi, active),
        eps=config.milp_margin * config.utility_tolerance * checker.scale,
        floor_slacks=tuple(s * checker.scale for s in config.floor_slacks),
        dominators=config.dominators,
        time_limit_s=config.time_limit_s,
        **rel,
    )


def _relational_rows(i, lo, size, checker) -> dict[str, Any]:
    """The relational option of each box of bidder ``i``'s cell, linear in its offsets.

    The witness of every conflicting pair is found with bidder ``i``'s offsets of this cell at 0
    (the MILP sets them afresh) and the other bidder's as they are; with that witness's ``l`` and
    ``t``, raising ``Delta[k] - Delta[l]`` lowers the witness by ``coef`` times as much (``coef``
    = 1 for bidder 0, ``t`` for bidder 1), so it excludes the pair once the rise reaches
    ``(phi + margin) / coef``.
    """
    rlo, rhi = checker.grid.bounds(lo, size, checker.config.box_inflation)
    delta = checker.deltas(lo, size)
    delta[:, i] = 0.0
    shape = (len(lo), checker.n, checker.m)
    _, conflict, k0, k1, l0, l1, t, phi, small = checker._relational(
        rlo.reshape(shape), rhi.reshape(shape), delta, lo, size
    )
    margin = 2 * BUILDER_SLACK * checker.config.utility_tolerance * checker.scale
    b, a, c = np.nonzero(conflict)
    ks = (k0[b, a], k1[b, c])[i]
    ls = (l0[b, a, c], l1[b, a, c])[i]
    coef = np.ones(len(b)) if i == 0 else t[b, a, c].astype(np.float64)
    need = phi[b, a, c].astype(np.float64) + margin
    satisfied = need < 0.0
    usable = satisfied | (coef > 1e-6)
    # a box has the option when its candidate sets are small enough and every pair can be met
    ok = small.copy()
    np.logical_and.at(ok, b, usable)
    keep = ~satisfied & usable
    return {
        "rel_ok": ok,
        "rel_box": b[keep],
        "rel_k": ks[keep].astype(np.int64),
        "rel_l": ls[keep].astype(np.int64),
        "rel_coef": coef[keep],
        "rel_need": need[keep],
    }
