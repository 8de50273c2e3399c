"""Independent re-check of a repaired GemNet's compatibility certificate.

:func:`verify_certificate` re-derives every claim of a :class:`~gemnet.certificate.Certificate`
from the network's raw weights and the setting's support, in numpy float64, with code that shares
nothing with the builder (``gemnet.repair``) or with ``gemnet.model.menu_bounds``: its own interval
bound propagation through the stacked tanh or ReLU MLP and the output heads (sigmoid per entry;
exact per-coordinate bounds of the unit-demand softmax; softplus prices), its own input scaling and
price scale (recomputed from ``setting.low`` / ``setting.high``), its own tiling check and its own
offset look-up. Only :func:`gemnet.certificate.params_digest` is shared (it defines the digest),
and the guard :func:`gemnet.model.require_learned_menus` that turns away item-price menus.

Checks, each a key of :attr:`VerificationReport.checks`:

- ``setting``: the certificate names this setting; bidders, items and menu size agree with the
  setting and the model; the model is a GemNet of the expected shape for this support.
- ``params_digest``: the digest of the model's parameters equals the certificate's.
- ``tolerances``: the certificate's tolerances are finite (the verifier then uses
  ``max(certificate value, minimum)``, so a certificate cannot switch the slack off) and its
  ``bound_splits`` is an integer >= 1 with at most :data:`MAX_BOUND_PARTS` parts per box.
- ``grid``: continuous coordinates have equal cells covering ``[low, high]``; discrete ones one
  cell per support point.
- ``tiling``: every cell tuple lies in exactly one box (found by recursive splitting, without
  allocating the grid).
- ``offsets``: keys sorted, unique and in range; values finite, ``>= 0`` unless every coordinate
  is discrete, null column 0.
- ``compatibility``: every box's candidate sets are compatible (see the certificate module).

Exact rule per box (``tol_u``, ``tol_a``, ``inflation``: the effective tolerances): every
continuous coordinate's range is widened by ``inflation`` times its cell width per side, for the
network's input ``b_-i`` and for the bidder's own values alike; discrete coordinates are points.
Menu bounds over a box are the union of the interval bounds over ``bound_splits`` equal parts of
each coordinate of its (inflated) ``b_-i`` range. For each learned element ``k`` of bidder ``i``,
with ``a_top = min(a_hi + tol_a, 1)``, ``u_hi = max <v, a> - p_lo - off_lo`` and
``u_lo = min <v, a> - p_hi - off_hi`` over ``v`` in the own range and ``a`` in
``[a_lo, a_top]``; the null element's utility is exactly ``-offset`` (its allocation is exactly
0). ``L = max u_lo`` over all ``K + 1`` elements; candidates are the elements with
``u_hi >= L - tol_u``; bidder ``i`` uses ``max_{k in candidates} a_top[k, j]`` of item ``j``
(0 for the null element), and the box is certified iff the uses sum to at most 1 for every
item. The offset range over a box is the min/max over the cells of ``b_-i`` it covers, with 0
included when a covered cell has no key.

Rounding: the network is evaluated in float64 from its float32 weights, and every interval is
widened by a bound on float64 rounding, so the float64 bounds contain the real-arithmetic ones.
What the certificate's tolerances must cover (float32 rounding of the deployed mechanism) is the
certificate's semantics, checked as stated.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import numpy as np

from diffecon.distributions import Discrete
from diffecon.settings import Setting
from gemnet.certificate import Certificate, params_digest
from gemnet.model import GemNet, require_learned_menus

__all__ = [
    "MAX_BOUND_PARTS",
    "MIN_ALLOC_TOLERANCE",
    "MIN_BOX_INFLATION",
    "MIN_UTILITY_TOLERANCE",
    "VerificationReport",
    "assert_certified",
    "verify_certificate",
]

MIN_UTILITY_TOLERANCE = 1e-5
"""Smallest candidate-set slack the verifier uses, as a fraction of the price scale."""
MIN_ALLOC_TOLERANCE = 1e-6
"""Smallest slack the verifier adds to allocation upper bounds."""
MIN_BOX_INFLATION = 1e-6
"""Smallest widening of continuous box sides, as a fraction of a cell's width per side."""

CHECKS = ("setting", "params_digest", "tolerances", "grid", "tiling", "offsets", "compatibility")

_EPS = float(np.finfo(np.float64).eps)
# A clipped allocation head's upper bound counts as exactly 0 (no tolerance) only if the head is
# still 0 this far above the logit's upper bound (float32 rounding of the logits is far smaller).
CLIP_ZERO_MARGIN = 1e-3
# Grid edges must match the support to this fraction of a cell (the builder's float64 edges are
# exact to ~1e-16); bounds then use the union of the certificate's and the ideal cells anyway.
_GRID_RTOL = 1e-9
# A dense prefix-count table of offset keys is used up to this many entries per bidder.
_DENSE_OFFSET_ENTRIES = 2**24
# Candidate (projection, key) pairs examined at once when looking up offset ranges.
_OFFSET_PAIRS = 2**21
# Rows (projections x parts) of one interval-propagation call when bounds are split.
_IBP_ROWS = 8192
# Largest number of parts (bound_splits ** inputs) the verifier evaluates per projection.
MAX_BOUND_PARTS = 4096
# Float64 rounding allowance of the Jacobian enclosures (relative, absolute) and of the
# relational witnesses' values (absolute, in value units).
_JAC_RTOL, _JAC_ATOL, _WITNESS_ATOL = 1e-9, 1e-12, 1e-9
# Entries of the [rows, K, width, width] array of the softmax bounds per block.
_SOFTMAX_ENTRIES = 2**22
# Elements (best lower utilities first) each candidate is compared with by the pairwise test.
PAIRWISE_DOMINATORS = 8


@dataclasses.dataclass(frozen=True)
class VerificationReport:
    """Outcome of :func:`verify_certificate`.

    Attributes:
      ok: every check passed.
      failures: the first failures, human readable, each prefixed with its check's name.
      n_boxes: boxes in the certificate.
      n_uncertified: boxes whose compatibility check failed (all boxes when it could not run).
      checks: check name -> passed (keys: ``setting``, ``params_digest``, ``tolerances``,
        ``grid``, ``tiling``, ``offsets``, ``compatibility``).
      wall_s: seconds spent verifying.
    """

    ok: bool
    failures: list[str]
    n_boxes: int
    n_uncertified: int
    checks: dict[str, bool]
    wall_s: float

    def summary(self) -> str:
        """One line: verdict, boxes, failed checks."""
        failed = [k for k, v in self.checks.items() if not v]
        verdict = "verified" if self.ok else f"REJECTED (failed: {', '.join(failed)})"
        return (
            f"certificate {verdict}: {self.n_boxes} boxes, {self.n_uncertified} uncertified, "
            f"{self.wall_s:.1f} s"
        )


class _Failures:
    """Collects failure messages (the first ``limit``) and which checks failed."""

    def __init__(self, limit: int):
        self.limit = limit
        self.messages: list[str] = []
        self.failed: set[str] = set()
        self.dropped = 0

    def add(self, check: str, message: str) -> None:
        self.failed.add(check)
        if len(self.messages) < self.limit:
            self.messages.append(f"[{check}] {message}")
        else:
            self.dropped += 1


# --------------------------------------------------------------------------------------------------
# The support of the setting, per coordinate d = i * m + j.


@dataclasses.dataclass(frozen=True)
class _Coordinate:
    discrete: bool
    low: float
    high: float
    points: np.ndarray | None  # discrete support points (float64)


def _support(setting: Setting) -> list[_Coordinate]:
    n, m = setting.n_bidders, setting.n_items
    low = np.asarray(setting.low, np.float64).reshape(n, m)
    high = np.asarray(setting.high, np.float64).reshape(n, m)
    marginal_of = getattr(setting.values, "marginal", None)
    coords = []
    for i in range(n):
        for j in range(m):
            marginal = marginal_of(i, j) if callable(marginal_of) else None
            if isinstance(marginal, Discrete):
                pts = np.asarray(marginal.points, np.float64)
                coords.append(_Coordinate(True, float(pts[0]), float(pts[-1]), pts))
            elif marginal is not None:
                low_m, high_m = (
                    getattr(marginal, "low", low[i, j]),
                    getattr(marginal, "high", high[i, j]),
                )
                coords.append(_Coordinate(False, float(low_m), float(high_m), None))
            else:
                coords.append(_Coordinate(False, float(low[i, j]), float(high[i, j]), None))
    return coords


def _others(n: int, m: int, bidder: int) -> list[int]:
    """Coordinates of ``b_-bidder`` (others in order, items in order)."""
    return [i * m + j for i in range(n) if i != bidder for j in range(m)]


def _row_major_strides(sizes: list[int]) -> np.ndarray:
    strides = np.ones(len(sizes), np.int64)
    for t in range(len(sizes) - 2, -1, -1):
        strides[t] = strides[t + 1] * sizes[t + 1]
    return strides


# --------------------------------------------------------------------------------------------------
# Interval bounds of the menus, from the raw weights.


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def _logsumexp_others(z: np.ndarray) -> np.ndarray:
    """``out[..., j] = log sum_{k != j} exp(z[..., k])`` (last axis of width >= 2)."""
    w = z.shape[-1]
    others = np.where(np.eye(w, dtype=bool), -np.inf, z[..., None, :])  # [..., j, k]
    top = np.max(others, axis=-1, keepdims=True)  # finite: width >= 2
    return top[..., 0] + np.log(np.sum(np.exp(others - top), axis=-1))


def _softmax_bounds(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-coordinate bounds of ``softmax(z)`` over ``z in [lo, hi]`` (last axis).

    ``softmax_j(z) = sigmoid(z_j - log sum_{k != j} exp z_k)`` rises with ``z_j`` and falls with
    every other ``z_k``: the lowest value takes ``z_j = lo_j`` and ``z_k = hi_k``, the highest the
    reverse.
    """
    rows = lo.shape[0]
    per_row = int(np.prod(lo.shape[1:])) * lo.shape[-1]
    block = max(1, _SOFTMAX_ENTRIES // max(per_row, 1))
    low, high = np.empty_like(lo), np.empty_like(hi)
    for s in range(0, rows, block):
        sl = slice(s, s + block)
        low[sl] = _sigmoid(lo[sl] - _logsumexp_others(hi[sl]))
        high[sl] = _sigmoid(hi[sl] - _logsumexp_others(lo[sl]))
    return low, high


class _MenuBounds:
    """Float64 interval bound propagation through each bidder's network and its menu heads."""

    def __init__(self, model: GemNet, setting: Setting):
        n, m = setting.n_bidders, setting.n_items
        self.n, self.m, self.k = n, m, int(model.menu_size)
        self.unit_demand = setting.valuation == "unit_demand"
        self.width = m + 1 if self.unit_demand else m
        self.alloc_clip = float(getattr(model, "alloc_clip", 0.0))
        self.relu = getattr(model, "activation", "tanh") == "relu"
        self.weights = [np.asarray(w[...], np.float64) for w in model.weights]
        self.biases = [np.asarray(b[...], np.float64) for b in model.biases]
        self.abs_weights = [np.abs(w) for w in self.weights]
        self.abs_colsum = [np.sum(a, axis=1) for a in self.abs_weights]  # [n, out]
        low = np.asarray(setting.low, np.float64).reshape(n, m)
        high = np.asarray(setting.high, np.float64).reshape(n, m)
        # The network sees (b_-i - low) / (high - low) per coordinate; prices are scaled by the
        # largest grand-bundle value. Both from the setting, not from the model's attributes.
        self.price_scale = float(np.max(np.sum(high, axis=1)))
        self.shift = [low.ravel()[_others(n, m, i)] for i in range(n)]
        self.span = [(high - low).ravel()[_others(n, m, i)] for i in range(n)]

    def split_bounds(
        self, bidder: int, others_lo: np.ndarray, others_hi: np.ndarray, splits: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`bounds` as the union over ``splits`` equal parts of every input coordinate.

        Parts share their computed edges (``edge[0] = lo``, ``edge[splits] = hi``), so they cover
        the box exactly; interval bounds are inclusion-monotone, so the union is at least as
        tight as one box's bounds.
        """
        rows, dims = others_lo.shape
        if splits <= 1 or self.n == 1 or rows == 0:
            return self.bounds(bidder, others_lo, others_hi)
        frac = np.arange(splits + 1) / splits
        edges = others_lo[:, :, None] + (others_hi - others_lo)[:, :, None] * frac  # [rows, d, s+1]
        edges[:, :, 0], edges[:, :, -1] = others_lo, others_hi
        parts = np.array(list(np.ndindex(*(splits,) * dims)), np.int64)  # [S, d]
        n_parts = len(parts)
        out = None
        block = max(1, _IBP_ROWS // n_parts)
        for s in range(0, rows, block):
            e = edges[s : s + block]
            sub_lo = np.take_along_axis(e[:, None, :, :], parts[None, :, :, None], axis=3)[..., 0]
            sub_hi = np.take_along_axis(e[:, None, :, :], parts[None, :, :, None] + 1, axis=3)[
                ..., 0
            ]
            got = self.bounds(bidder, sub_lo.reshape(-1, dims), sub_hi.reshape(-1, dims))
            got = [g.reshape(len(e), n_parts, *g.shape[1:]) for g in got]
            merged = (
                got[0].min(axis=1),
                got[1].max(axis=1),
                got[2].min(axis=1),
                got[3].max(axis=1),
            )
            if out is None:
                out = tuple(np.empty((rows, *x.shape[1:])) for x in merged)
            for dst, src in zip(out, merged, strict=True):
                dst[s : s + block] = src
        assert out is not None
        return out[0], out[1], out[2], out[3]

    def bounds(
        self, bidder: int, others_lo: np.ndarray, others_hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Bounds of bidder ``bidder``'s ``K`` learned elements over boxes of ``b_-bidder``.

        Args:
          bidder: which bidder.
          others_lo: ``[rows, (n - 1) * m]`` lower corner of the box of ``b_-bidder`` (values).
          others_hi: ``[rows, (n - 1) * m]`` upper corner.

        Returns:
          ``(alloc_lo, alloc_hi)`` each ``[rows, K, items]`` and ``(price_lo, price_hi)`` each
          ``[rows, K]`` (the null element is not included).
        """
        rows = others_lo.shape[0]
        if self.n == 1:
            lo = hi = np.ones((rows, 1))
        else:
            lo = (others_lo - self.shift[bidder]) / self.span[bidder]
            hi = (others_hi - self.shift[bidder]) / self.span[bidder]
        last = len(self.weights) - 1
        for layer in range(last + 1):
            w, aw = self.weights[layer][bidder], self.abs_weights[layer][bidder]
            b = self.biases[layer][bidder]
            centre, radius = (lo + hi) * 0.5, (hi - lo) * 0.5
            mid = centre @ w + b
            rad = radius @ aw
            # Float64 rounding of centre/radius and of both products, bounded generously:
            # (|centre| + radius) @ |w| <= max_row(|centre| + radius) * colsum(|w|).
            size = np.max(np.abs(centre) + radius, axis=1, keepdims=True)
            slack = (w.shape[0] + 4) * _EPS * (size * self.abs_colsum[layer][bidder] + np.abs(b))
            lo, hi = mid - rad - slack, mid + rad + slack
            if layer < last and self.relu:  # max(z, 0) is exact in floating point
                lo, hi = np.maximum(lo, 0.0), np.maximum(hi, 0.0)
            elif layer < last:
                lo = np.maximum(np.tanh(lo) - 4 * _EPS, -1.0)
                hi = np.minimum(np.tanh(hi) + 4 * _EPS, 1.0)
        k, wd, m = self.k, self.width, self.m
        logit_lo, logit_hi = (
            lo[:, : k * wd].reshape(rows, k, wd),
            hi[:, : k * wd].reshape(rows, k, wd),
        )
        raw_lo, raw_hi = lo[:, k * wd :], hi[:, k * wd :]
        robust_zero = None
        if self.unit_demand:
            a_lo, a_hi = _softmax_bounds(logit_lo, logit_hi)
            a_lo, a_hi = a_lo[..., :m], a_hi[..., :m]  # the last entry is the dummy
            pad = 16 * _EPS
        else:
            a_lo, a_hi = _sigmoid(logit_lo), _sigmoid(logit_hi)
            pad = 4 * _EPS
            if self.alloc_clip:  # clip((1 + 2c) s - c, 0, 1): monotone, endpoint by endpoint
                c = self.alloc_clip
                a_lo = np.clip((1 + 2 * c) * a_lo - c, 0.0, 1.0)
                a_hi = np.clip((1 + 2 * c) * a_hi - c, 0.0, 1.0)
                # exactly 0 (no tolerance) only with a logit margin against float32 rounding
                robust_zero = (1 + 2 * c) * _sigmoid(logit_hi + CLIP_ZERO_MARGIN) - c <= 0.0
                pad = 8 * _EPS
        a_lo = np.maximum(a_lo - pad, 0.0)
        a_hi = np.minimum(a_hi + pad, 1.0)
        if robust_zero is not None:
            a_hi = np.where(robust_zero, 0.0, a_hi)
        p_lo = self.price_scale * _softplus(raw_lo) * (1.0 - 8 * _EPS)
        p_hi = self.price_scale * _softplus(raw_hi) * (1.0 + 8 * _EPS)
        return a_lo, a_hi, p_lo, p_hi

    def jacobian(self, bidder: int, x_lo: np.ndarray, x_hi: np.ndarray, splits: int = 1):
        """Menu of ``bidder`` at the centre of boxes of ``b_-bidder`` with its Jacobian there, and
        how far the Jacobian can move over the box (additive bidders).

        The box is taken as the union of ``splits`` equal parts per coordinate; the enclosure of
        each part is interval arithmetic in lower/upper form (``[JL, JH] @ W`` as ``JL @ W+ +
        JH @ W-`` and back; slopes of tanh, sigmoid and softplus bounded over each pre-activation
        interval), independent of the builder's centre/radius form.

        Returns:
          ``(alloc [rows, K, m], price [rows, K], d_alloc [rows, K, m, in], d_price [rows, K, in],
          r_alloc, r_price)`` where every Jacobian entry over the box lies within ``r_*`` of
          ``d_*``.
        """
        centre = (x_lo + x_hi) * 0.5
        a_c, p_c, ja_c, _, jp_c, _ = self._jacobian_intervals(bidder, centre, centre)
        assert a_c is not None and p_c is not None  # a point box evaluates the menu
        r_a, r_p = np.zeros_like(ja_c), np.zeros_like(jp_c)
        dims = x_lo.shape[1]
        edges = [x_lo + (x_hi - x_lo) * (q / splits) for q in range(splits)] + [x_hi]
        for part in np.ndindex(*(splits,) * dims):  # the box as the union of its parts
            idx = np.arange(dims)
            p_lo = np.stack([edges[q][:, d] for d, q in zip(idx, part, strict=True)], 1)
            p_hi = np.stack([edges[q + 1][:, d] for d, q in zip(idx, part, strict=True)], 1)
            _, _, ja_l, ja_h, jp_l, jp_h = self._jacobian_intervals(bidder, p_lo, p_hi)
            r_a = np.maximum(r_a, np.maximum(ja_h - ja_c, ja_c - ja_l))
            r_p = np.maximum(r_p, np.maximum(jp_h - jp_c, jp_c - jp_l))
        # float64 rounding of these few hundred operations, bounded generously
        r_a = r_a + _JAC_RTOL * (np.abs(ja_c) + r_a) + _JAC_ATOL
        r_p = r_p + _JAC_RTOL * (np.abs(jp_c) + r_p) + _JAC_ATOL
        return a_c, p_c, ja_c, jp_c, r_a, r_p

    def _jacobian_intervals(self, bidder: int, x_lo: np.ndarray, x_hi: np.ndarray):
        rows, n_in = x_lo.shape
        span = self.span[bidder]
        lo, hi = (x_lo - self.shift[bidder]) / span, (x_hi - self.shift[bidder]) / span
        jl = np.broadcast_to(np.diag(1.0 / span), (rows, n_in, n_in)).copy()
        jh = jl.copy()
        last = len(self.weights) - 1
        for layer in range(last + 1):
            w, b = self.weights[layer][bidder], self.biases[layer][bidder]
            wp, wn = np.maximum(w, 0.0), np.minimum(w, 0.0)
            z_lo = lo @ wp + hi @ wn + b
            z_hi = hi @ wp + lo @ wn + b
            jl, jh = jl @ wp + jh @ wn, jh @ wp + jl @ wn
            if layer < last and self.relu:
                # slope 0 below 0, 1 above, anything in [0, 1] at 0 (the generalised gradient);
                # the sign test allows for float64 rounding of the pre-activation bounds
                size = np.maximum(np.abs(lo), np.abs(hi)) @ np.abs(w) + np.abs(b)
                slack = (w.shape[0] + 4) * _EPS * size
                s_lo = (z_lo > slack).astype(np.float64)
                s_hi = (z_hi >= -slack).astype(np.float64)
                jl, jh = _times_slope(s_lo[:, None], s_hi[:, None], jl, jh)
                lo, hi = np.maximum(z_lo, 0.0), np.maximum(z_hi, 0.0)
            elif layer < last:
                near = np.tanh(np.clip(0.0, z_lo, z_hi))
                far = np.maximum(np.tanh(z_lo) ** 2, np.tanh(z_hi) ** 2)
                jl, jh = _times_slope((1.0 - far)[:, None], (1.0 - near**2)[:, None], jl, jh)
                lo, hi = np.tanh(z_lo), np.tanh(z_hi)
            else:
                lo, hi = z_lo, z_hi
        k, m = self.k, self.m
        point = bool(np.all(x_lo == x_hi))
        # prices: scale * softplus(raw); slope scale * sigmoid(raw), increasing
        raw_lo, raw_hi = lo[:, k * m :], hi[:, k * m :]
        s = self.price_scale
        jp_l, jp_h = _times_slope(
            s * _sigmoid(raw_lo)[:, None, :],
            s * _sigmoid(raw_hi)[:, None, :],
            jl[:, :, k * m :],
            jh[:, :, k * m :],
        )
        # allocations: clip((1 + 2c) sigmoid(z) - c, 0, 1) (c = 0: a plain sigmoid)
        z_lo, z_hi = lo[:, : k * m], hi[:, : k * m]
        c = self.alloc_clip
        cut = math.log(c / (1.0 + c)) if c > 0 else -np.inf  # the head is 0 below, 1 above -cut
        a, b_ = np.maximum(z_lo, cut), np.minimum(z_hi, -cut)
        live = a <= b_
        sa, sb = _sigmoid(a), _sigmoid(np.where(live, b_, a))
        nearest = _sigmoid(np.clip(0.0, a, np.where(live, b_, a)))
        d_hi = np.where(live, nearest * (1 - nearest), 0.0) * (1 + 2 * c)
        flat = live & (z_lo > cut) & (z_hi < -cut)
        d_lo = np.where(flat, np.minimum(sa * (1 - sa), sb * (1 - sb)), 0.0) * (1 + 2 * c)
        ja_l, ja_h = _times_slope(
            d_lo[:, None, :], d_hi[:, None, :], jl[:, :, : k * m], jh[:, :, : k * m]
        )
        # [rows, in, K*m] -> [rows, K, m, in]; [rows, in, K] -> [rows, K, in]
        ja_l = np.moveaxis(ja_l.reshape(rows, n_in, k, m), 1, -1)
        ja_h = np.moveaxis(ja_h.reshape(rows, n_in, k, m), 1, -1)
        jp_l, jp_h = np.moveaxis(jp_l, 1, -1), np.moveaxis(jp_h, 1, -1)
        alloc = price = None
        if point:
            zc = z_lo
            alloc = _sigmoid(zc).reshape(rows, k, m)
            if c > 0:
                alloc = np.clip((1 + 2 * c) * alloc - c, 0.0, 1.0)
            price = s * _softplus(raw_lo)
        return alloc, price, ja_l, ja_h, jp_l, jp_h


def _times_slope(d_lo, d_hi, j_lo, j_hi):
    """``{d * j}`` over ``d in [d_lo, d_hi]`` (``d_lo >= 0``) and ``j in [j_lo, j_hi]``."""
    return np.minimum(d_lo * j_lo, d_hi * j_lo), np.maximum(d_lo * j_hi, d_hi * j_hi)


# --------------------------------------------------------------------------------------------------
# Offsets: range of one bidder's offsets over boxes of the grid of b_-i.


class _OffsetTable:
    def __init__(self, keys: np.ndarray, values: np.ndarray, cells: list[int]):
        self.keys = np.asarray(keys, np.int64)
        self.values = np.asarray(values, np.float64)
        self.cells = np.asarray(cells, np.int64)
        self.q_dims = len(cells)
        self.strides = _row_major_strides(list(cells))
        if self.q_dims:
            self.q = (self.keys[:, None] // self.strides[None, :]) % self.cells[None, :]
        else:
            self.q = np.zeros((len(self.keys), 0), np.int64)
        self.prefix: np.ndarray | None = None
        padded = math.prod(c + 1 for c in cells)
        if self.q_dims and len(self.keys) and padded <= _DENSE_OFFSET_ENTRIES:
            mark = np.zeros(math.prod(cells), np.int32)
            mark[self.keys] = 1
            cum = mark.reshape(tuple(cells))
            for ax in range(cum.ndim):
                cum = np.cumsum(cum, axis=ax, dtype=np.int32)
            self.prefix = np.pad(cum, [(1, 0)] * cum.ndim).ravel()
            self.prefix_strides = _row_major_strides([c + 1 for c in cells])

    def _count(self, lo: np.ndarray, size: np.ndarray) -> np.ndarray:
        """Keys inside each box (inclusion-exclusion on the dense prefix table)."""
        assert self.prefix is not None
        total = np.zeros(len(lo), np.int64)
        for corner in np.ndindex(*(2,) * self.q_dims):
            bits = np.asarray(corner, np.int64)
            flat = (lo + bits[None, :] * size) @ self.prefix_strides
            sign = -1 if (self.q_dims - int(bits.sum())) % 2 else 1
            total += sign * self.prefix[flat].astype(np.int64)
        return total

    def ranges(self, lo: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[rows, K + 1]`` lowest and highest offsets over the cells of each box.

        A covered cell without a key has offset 0, so 0 joins the range unless every covered cell
        has a key.
        """
        rows, k1 = lo.shape[0], self.values.shape[1]
        off_lo, off_hi = np.zeros((rows, k1)), np.zeros((rows, k1))
        n_keys = len(self.keys)
        if n_keys == 0 or rows == 0:
            return off_lo, off_hi
        if self.q_dims == 0:  # one bidder: the grid of b_-i is a single cell, key 0
            if self.keys[0] == 0:
                off_lo[:] = self.values[0]
                off_hi[:] = self.values[0]
            return off_lo, off_hi
        # Keys are row-major: with coordinates 0..t-1 fixed (one cell wide) and coordinate t a run
        # of cells, the covered keys lie in one interval of key values. Take t as the first
        # coordinate more than one cell wide and filter the interval's keys exactly.
        wide = size > 1
        t = np.where(wide.any(axis=1), np.argmax(wide, axis=1), self.q_dims - 1)
        idx = np.arange(rows)
        before = np.arange(self.q_dims)[None, :] < t[:, None]
        base = np.sum(np.where(before, lo * self.strides[None, :], 0), axis=1)
        stride_t = self.strides[t]
        start = base + lo[idx, t] * stride_t
        stop = base + (lo[idx, t] + size[idx, t]) * stride_t
        first = np.searchsorted(self.keys, start, side="left")
        n_cand = np.searchsorted(self.keys, stop, side="left") - first
        if self.prefix is not None:
            n_cand = np.where(self._count(lo, size) > 0, n_cand, 0)
        todo = np.flatnonzero(n_cand > 0)
        cells_in_box = np.prod(size.astype(np.float64), axis=1)
        s = 0
        while s < len(todo):
            # A group of boxes whose candidate pairs fit the budget (at least one box).
            cum = np.cumsum(n_cand[todo[s:]])
            e = s + max(1, int(np.searchsorted(cum, _OFFSET_PAIRS, side="right")))
            group = todo[s:e]
            s = e
            reps = n_cand[group]
            owner = np.repeat(np.arange(len(group)), reps)
            starts = np.cumsum(reps) - reps
            key_idx = first[group][owner] + (np.arange(int(reps.sum())) - starts[owner])
            q = self.q[key_idx]
            g_lo, g_hi = lo[group][owner], (lo + size)[group][owner]
            inside = np.all((q >= g_lo) & (q < g_hi), axis=1)
            owner, key_idx = owner[inside], key_idx[inside]
            if len(owner) == 0:
                continue
            found = np.bincount(owner, minlength=len(group))
            seg = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
            vals = self.values[key_idx]
            v_min = np.minimum.reduceat(vals, seg, axis=0)
            v_max = np.maximum.reduceat(vals, seg, axis=0)
            has = np.flatnonzero(found > 0)  # ascending, as the segments
            target = group[has]
            complete = (found[has].astype(np.float64) == cells_in_box[target])[:, None]
            off_lo[target] = np.where(complete, v_min, np.minimum(v_min, 0.0))
            off_hi[target] = np.where(complete, v_max, np.maximum(v_max, 0.0))
        return off_lo, off_hi


# --------------------------------------------------------------------------------------------------
# Tiling.


def _fmt_cells(lo: np.ndarray, hi: np.ndarray) -> str:
    return f"lo={lo.tolist()} size={(hi - lo).tolist()}"


def _boxes_outside(box_lo: np.ndarray, box_size: np.ndarray, cells: list[int], limit: int):
    """Messages for boxes that are empty or reach outside the grid."""
    grid = np.asarray(cells, np.int64)
    # Compare lo and size with the grid first, so that lo + size cannot overflow.
    bad = np.any((box_lo < 0) | (box_size < 1) | (box_lo >= grid) | (box_size > grid), axis=1)
    bad |= np.any(box_lo + np.minimum(box_size, grid) > grid, axis=1)
    rows = np.flatnonzero(bad)
    out = [
        f"box {b}: cells lo={box_lo[b].tolist()} size={box_size[b].tolist()} is empty or "
        f"outside the grid of {grid.tolist()} cells"
        for b in rows[:limit]
    ]
    if len(rows) > limit:
        out.append(f"... {len(rows) - limit} more boxes outside the grid")
    return out


def _tiling_failures(
    box_lo: np.ndarray, box_size: np.ndarray, cells: list[int], limit: int
) -> list[str]:
    """Messages describing gaps and overlaps (empty when the boxes tile the grid exactly).

    Boxes must be inside the grid (:func:`_boxes_outside`). Region splitting: a region is tiled
    iff exactly one (clipped) box equals it, or, cut at an interior box boundary, both sides are
    tiled. All regions of one depth are handled at once.
    """
    n_box, dims = box_lo.shape
    grid = np.asarray(cells, np.int64)
    box_hi = box_lo + box_size
    reg_lo, reg_hi = np.zeros((1, dims), np.int64), grid[None, :].copy()
    p_lo, p_hi = box_lo.astype(np.int64), box_hi.astype(np.int64)
    p_box, p_reg = np.arange(n_box), np.zeros(n_box, np.int64)
    max_pieces = max(10**7, 20 * n_box)
    big = np.iinfo(np.int64).max
    while len(reg_lo):
        n_reg = len(reg_lo)
        count = np.bincount(p_reg, minlength=n_reg)
        equal = np.all(p_lo == reg_lo[p_reg], axis=1) & np.all(p_hi == reg_hi[p_reg], axis=1)
        n_equal = np.bincount(p_reg[equal], minlength=n_reg)
        gap = np.flatnonzero(count == 0)
        overlap = np.flatnonzero((n_equal > 0) & (count > 1))
        if len(gap) or len(overlap):
            out = [
                f"cells {_fmt_cells(reg_lo[r], reg_hi[r])} are covered by no box (gap)"
                for r in gap[:limit]
            ]
            for r in overlap[: max(0, limit - len(out))]:
                members = np.flatnonzero(p_reg == r)
                whole = members[equal[members]][0]
                other = members[members != whole][0]
                out.append(
                    f"boxes {p_box[whole]} and {p_box[other]} both cover cells "
                    f"{_fmt_cells(p_lo[other], p_hi[other])} (overlap)"
                )
            return out
        split = ~((n_equal == 1) & (count == 1))
        if not split.any():
            return []
        keep = split[p_reg]
        renumber = np.cumsum(split) - 1
        p_lo, p_hi, p_box, p_reg = p_lo[keep], p_hi[keep], p_box[keep], renumber[p_reg[keep]]
        rl, rh = reg_lo[split], reg_hi[split]
        n_split, n_piece = len(rl), len(p_lo)
        if n_piece > max_pieces:
            return [f"gave up: the boxes were cut into more than {max_pieces} pieces"]
        starts = np.searchsorted(p_reg, np.arange(n_split))  # pieces are sorted by region
        mid = (rl + rh) // 2
        # Cut at the piece boundary strictly inside the region closest to its middle, on the
        # widest coordinate that has one (a region without any such boundary is resolved above).
        code = np.full((n_piece, dims), big, np.int64)
        for bound in (p_lo, p_hi):
            inner = (bound > rl[p_reg]) & (bound < rh[p_reg])
            dist = bound - mid[p_reg]
            code = np.minimum(code, np.where(inner, 2 * np.abs(dist) + (dist > 0), big))
        best = np.minimum.reduceat(code, starts, axis=0)
        score = np.where(best < big, rh - rl, -1)
        axis = np.argmax(score, axis=1)
        at = np.arange(n_split)
        chosen = best[at, axis]
        if np.any(chosen == big):  # impossible: a region not resolved has an inner boundary
            raise AssertionError("tiling check: a region has no interior box boundary")
        cut = mid[at, axis] + np.where(chosen % 2 == 1, chosen // 2, -(chosen // 2))
        left_hi, right_lo = rh.copy(), rl.copy()
        left_hi[at, axis] = cut
        right_lo[at, axis] = cut
        reg_lo = np.stack([rl, right_lo], axis=1).reshape(2 * n_split, dims)
        reg_hi = np.stack([left_hi, rh], axis=1).reshape(2 * n_split, dims)
        p_axis, p_cut = axis[p_reg], cut[p_reg]
        rows = np.arange(n_piece)
        left = p_lo[rows, p_axis] < p_cut
        right = p_hi[rows, p_axis] > p_cut
        l_hi = p_hi[left].copy()
        l_hi[np.arange(left.sum()), p_axis[left]] = np.minimum(
            p_hi[rows, p_axis][left], p_cut[left]
        )
        r_lo = p_lo[right].copy()
        r_lo[np.arange(right.sum()), p_axis[right]] = np.maximum(
            p_lo[rows, p_axis][right], p_cut[right]
        )
        p_lo = np.concatenate([p_lo[left], r_lo])
        p_hi = np.concatenate([l_hi, p_hi[right]])
        p_box = np.concatenate([p_box[left], p_box[right]])
        p_reg = np.concatenate([2 * p_reg[left], 2 * p_reg[right] + 1])
        order = np.argsort(p_reg, kind="stable")
        p_lo, p_hi, p_box, p_reg = p_lo[order], p_hi[order], p_box[order], p_reg[order]
    return []


# --------------------------------------------------------------------------------------------------
# The individual checks.


def _check_setting(model: GemNet, setting: Setting, cert: Certificate, fail: _Failures) -> bool:
    """Identity and shapes; False when the rest cannot be checked meaningfully."""
    ok = True
    n, m = setting.n_bidders, setting.n_items
    if cert.setting != setting.name:
        fail.add("setting", f"certificate is for setting {cert.setting!r}, not {setting.name!r}")
    shapes = {
        "bidders": (cert.n_bidders, n, model.n_bidders),
        "items": (cert.n_items, m, model.n_items),
        "menu size": (cert.menu_size, model.menu_size, model.menu_size),
    }
    for what, (c, s, mod) in shapes.items():
        if not c == s == mod:
            fail.add("setting", f"{what}: certificate {c}, setting {s}, model {mod}")
            ok = False
    if setting.valuation not in ("additive", "unit_demand") or setting.valuation != getattr(
        model, "valuation", None
    ):
        fail.add(
            "setting",
            f"valuation: setting {setting.valuation!r}, model {getattr(model, 'valuation', None)!r}"
            " (GemNet certificates cover additive and unit_demand bidders)",
        )
        ok = False
    if not setting.bounded:
        fail.add("setting", f"setting {setting.name!r} has an unbounded support")
        return False
    activation = getattr(model, "activation", "tanh")
    if activation not in ("tanh", "relu") or activation != cert.activation:
        fail.add(
            "setting",
            f"hidden activation: certificate {cert.activation!r}, model {activation!r} "
            "(tanh or relu)",
        )
        ok = False
    if not ok:
        return False
    low = np.asarray(setting.low, np.float64).ravel()
    high = np.asarray(setting.high, np.float64).ravel()
    if not (
        np.allclose(np.asarray(model.low), low, rtol=1e-6, atol=0)
        and np.allclose(np.asarray(model.high), high, rtol=1e-6, atol=0)
    ):
        fail.add(
            "setting",
            f"the model was built for the support low={list(model.low)} high={list(model.high)}, "
            f"the setting's is low={low.tolist()} high={high.tolist()}",
        )
        ok = False
    k, width = model.menu_size, (m + 1 if setting.valuation == "unit_demand" else m)
    n_in, n_out = (1 if n == 1 else (n - 1) * m), k * width + k
    weights = [np.asarray(w[...]) for w in model.weights]
    biases = [np.asarray(b[...]) for b in model.biases]
    if len(weights) != len(biases) or not weights:
        fail.add("setting", f"model has {len(weights)} weight and {len(biases)} bias arrays")
        return False
    fan_in = n_in
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.ndim != 3 or w.shape[:2] != (n, fan_in) or b.shape != (n, w.shape[2]):
            fail.add(
                "setting",
                f"layer {layer}: weights {w.shape}, biases {b.shape}, expected "
                f"({n}, {fan_in}, out) and ({n}, out)",
            )
            return False
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            fail.add("setting", f"layer {layer} has non-finite parameters")
            return False
        fan_in = w.shape[2]
    if fan_in != n_out:
        fail.add("setting", f"the network has {fan_in} outputs, expected {n_out} (K={k})")
        return False
    return ok


def _check_grid(setting: Setting, cert: Certificate, fail: _Failures) -> tuple[bool, bool]:
    """``(well_formed, ok)``: well formed means the arrays can be indexed."""
    support = _support(setting)
    dims = len(support)
    if not (len(cert.cell_lo) == len(cert.cell_hi) == len(cert.discrete) == dims):
        fail.add(
            "grid",
            f"grid has {len(cert.cell_lo)}/{len(cert.cell_hi)}/{len(cert.discrete)} coordinates "
            f"(cell_lo/cell_hi/discrete), expected {dims}",
        )
        return False, False
    ok = True
    for d, coord in enumerate(support):
        lo, hi = np.asarray(cert.cell_lo[d]), np.asarray(cert.cell_hi[d])
        where = f"coordinate {d} (bidder {d // setting.n_items}, item {d % setting.n_items})"
        if lo.ndim != 1 or lo.shape != hi.shape or len(lo) == 0:
            fail.add("grid", f"{where}: cell arrays have shapes {lo.shape} and {hi.shape}")
            return False, False
        lo, hi = lo.astype(np.float64), hi.astype(np.float64)
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            fail.add("grid", f"{where}: non-finite cell ends")
            return False, False
        if bool(cert.discrete[d]) != coord.discrete:
            kind = "discrete" if coord.discrete else "continuous"
            fail.add("grid", f"{where}: marked discrete={cert.discrete[d]}, the support is {kind}")
            ok = False
            continue
        if coord.discrete:
            assert coord.points is not None
            if not (np.array_equal(lo, coord.points) and np.array_equal(hi, coord.points)):
                fail.add(
                    "grid",
                    f"{where}: cells lo={lo.tolist()} hi={hi.tolist()}, expected the support "
                    f"points {coord.points.tolist()}",
                )
                ok = False
            continue
        ideal_lo, ideal_hi = _ideal_cells(coord, len(lo))
        tol = _GRID_RTOL * (coord.high - coord.low) / len(lo) + 4 * _EPS * max(
            abs(coord.low), abs(coord.high)
        )
        off = np.maximum(np.abs(lo - ideal_lo), np.abs(hi - ideal_hi))
        if np.any(off > tol):
            c = int(np.argmax(off > tol))
            fail.add(
                "grid",
                f"{where}: cell {c} of {len(lo)} is [{float(lo[c])!r}, {float(hi[c])!r}], expected "
                f"[{float(ideal_lo[c])!r}, {float(ideal_hi[c])!r}] ({len(lo)} equal cells of "
                f"[{coord.low}, {coord.high}])",
            )
            ok = False
    return True, ok


def _ideal_cells(coord: _Coordinate, cells: int) -> tuple[np.ndarray, np.ndarray]:
    edges = coord.low + (coord.high - coord.low) * np.arange(cells + 1) / cells
    edges[-1] = coord.high
    return edges[:-1], edges[1:]


def _check_boxes(cert: Certificate, dims: int, fail: _Failures) -> bool:
    lo, size = np.asarray(cert.box_lo), np.asarray(cert.box_size)
    if lo.ndim != 2 or lo.shape != size.shape or lo.shape[1] != dims:
        fail.add(
            "tiling", f"boxes have shapes {lo.shape} and {size.shape}, expected [boxes, {dims}]"
        )
        return False
    if not (np.issubdtype(lo.dtype, np.integer) and np.issubdtype(size.dtype, np.integer)):
        fail.add("tiling", f"box arrays must be integers, got {lo.dtype} and {size.dtype}")
        return False
    return True


def _check_offsets(
    cert: Certificate, cells: list[int], n: int, m: int, k1: int, fail: _Failures
) -> tuple[bool, bool]:
    """``(usable, ok)``: usable means shapes and finiteness allow computing with them."""
    if len(cert.offset_keys) != n or len(cert.offset_values) != n:
        fail.add(
            "offsets",
            f"{len(cert.offset_keys)} key and {len(cert.offset_values)} value arrays for {n} "
            "bidders",
        )
        return False, False
    usable = ok = True
    for i in range(n):
        keys, vals = np.asarray(cert.offset_keys[i]), np.asarray(cert.offset_values[i])
        total = math.prod(cells[d] for d in _others(n, m, i))
        if keys.ndim != 1 or not (np.issubdtype(keys.dtype, np.integer) or keys.size == 0):
            fail.add("offsets", f"bidder {i}: keys must be a 1-d integer array, got {keys.dtype}")
            usable = ok = False
            continue
        if vals.shape != (keys.shape[0], k1):
            fail.add("offsets", f"bidder {i}: values {vals.shape}, expected ({len(keys)}, {k1})")
            usable = ok = False
            continue
        if total >= 2**62:
            fail.add("offsets", f"bidder {i}: the grid of b_-i has {total} cells (over int64)")
            usable = ok = False
            continue
        keys = keys.astype(np.int64)
        vals = vals.astype(np.float64)
        if len(keys) and (keys.min() < 0 or keys.max() >= total):
            b = int(np.argmax((keys < 0) | (keys >= total)))
            fail.add("offsets", f"bidder {i}: key {keys[b]} (#{b}) outside [0, {total})")
            usable = ok = False
        if np.any(np.diff(keys) <= 0):
            b = int(np.argmax(np.diff(keys) <= 0))
            fail.add(
                "offsets",
                f"bidder {i}: keys not strictly increasing at #{b}: {keys[b]}, {keys[b + 1]}",
            )
            usable = ok = False
        finite = np.isfinite(vals)
        if not finite.all():
            r, c = np.argwhere(~finite)[0]
            fail.add(
                "offsets",
                f"bidder {i}: key {keys[r]} element {c}: non-finite offset {float(vals[r, c])}",
            )
            usable = ok = False
            continue
        # Signed offsets re-price a discrete setting's menus (any sign keeps strategy-proofness,
        # since offsets depend on b_-i only); continuous repairs only ever raise prices.
        if np.any(vals < 0) and not all(bool(x) for x in cert.discrete):
            r, c = np.argwhere(vals < 0)[0]
            fail.add(
                "offsets",
                f"bidder {i}: key {keys[r]} element {c}: negative offset {float(vals[r, c])!r}",
            )
            ok = False
        if len(vals) and np.any(vals[:, -1] != 0):
            r = int(np.argmax(vals[:, -1] != 0))
            fail.add(
                "offsets",
                f"bidder {i}: key {keys[r]} offsets the null element by {float(vals[r, -1])!r} "
                "(must be 0)",
            )
            ok = False
    return usable, ok


def _effective(value: float, floor: float, name: str, fail: _Failures) -> float:
    value = float(value)
    if not math.isfinite(value):
        fail.add("tolerances", f"{name} = {value} is not finite")
        return floor
    return max(value, floor)


def _bound_splits(value: object, n: int, m: int, fail: _Failures) -> int:
    """The certificate's ``bound_splits`` (any count is sound; more is tighter and slower)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or int(value) < 1:
        fail.add("tolerances", f"bound_splits = {value!r} is not an integer >= 1")
        return 1
    splits, inputs = int(value), (n - 1) * m
    if inputs and splits**inputs > MAX_BOUND_PARTS:
        fail.add(
            "tolerances",
            f"bound_splits = {splits} gives {splits}^{inputs} parts per box, over the verifier's "
            f"limit of {MAX_BOUND_PARTS}",
        )
        while splits > 1 and splits**inputs > MAX_BOUND_PARTS:
            splits -= 1
    return splits


# --------------------------------------------------------------------------------------------------
# Compatibility of every box.


@dataclasses.dataclass(frozen=True)
class _Usage:
    """One bidder's candidate sets over a chunk of boxes.

    Attributes:
      use: ``[boxes, items]`` largest allocation upper bound (plus tolerance) among candidates.
      cand: ``[boxes, K]`` learned elements in the candidate set.
      cand_null: ``[boxes]`` whether the null element is a candidate.
      inv: ``[boxes]`` row of each box in ``a_top``.
      a_top: ``[projections, K, items]`` allocation upper bounds plus tolerance.
    """

    use: np.ndarray
    cand: np.ndarray
    cand_null: np.ndarray
    inv: np.ndarray
    a_top: np.ndarray

    def describe(self, row: int, item: int, null: int) -> str:
        """Which element attains ``use[row, item]`` and how many candidates there are."""
        tops = np.where(self.cand[row], self.a_top[self.inv[row], :, item], -np.inf)
        element = f"element {int(np.argmax(tops))}" if np.max(tops) >= self.use[row, item] else ""
        if not element:
            element = f"null element {null}"
        count = int(self.cand[row].sum()) + int(self.cand_null[row])
        return f"{self.use[row, item]:.6g} from {element} ({count} candidates)"


class _Compatibility:
    def __init__(
        self,
        model: GemNet,
        setting: Setting,
        cert: Certificate,
        *,
        utility_tolerance: float,
        alloc_tolerance: float,
        box_inflation: float,
        bound_splits: int,
    ):
        self.n, self.m, self.k = setting.n_bidders, setting.n_items, int(model.menu_size)
        self.bound_splits = bound_splits
        self.net = _MenuBounds(model, setting)
        self.utility_tolerance, self.alloc_tolerance = utility_tolerance, alloc_tolerance
        support = _support(setting)
        self.cells = [len(c) for c in cert.cell_lo]
        # Real extent of each cell: the union of the certificate's and the ideal cell, widened by
        # the inflation for continuous coordinates (discrete cells are points).
        self.edge_lo, self.edge_hi, self.pad = [], [], []
        for d, coord in enumerate(support):
            lo = np.asarray(cert.cell_lo[d], np.float64)
            hi = np.asarray(cert.cell_hi[d], np.float64)
            if coord.discrete:
                self.pad.append(0.0)
            else:
                ideal_lo, ideal_hi = _ideal_cells(coord, len(lo))
                lo, hi = np.minimum(lo, ideal_lo), np.maximum(hi, ideal_hi)
                self.pad.append(box_inflation * (coord.high - coord.low) / len(lo))
            self.edge_lo.append(lo)
            self.edge_hi.append(hi)
        self.others = [_others(self.n, self.m, i) for i in range(self.n)]
        # Quantized menus: the mechanism evaluates bidder i's network at the representative of
        # each cell of b_-i, float32((cell_lo + cell_hi) / 2) of the certificate's cells (the
        # point of a discrete cell). The menus over a box are then the finite set of those.
        self.quantized = bool(getattr(cert, "quantized", False))
        self.reps = [
            np.asarray(cert.cell_lo[d], np.float64)
            if support[d].discrete
            else np.asarray(
                ((np.asarray(cert.cell_lo[d]) + np.asarray(cert.cell_hi[d])) / 2.0).astype(
                    np.float32
                ),
                np.float64,
            )
            for d in range(len(support))
        ]
        self._points: dict[int, tuple[np.ndarray, ...]] = {}
        # Interpolated menus: multilinear between the menus at the cells' corners (nodes),
        # float32(cell_lo) and float32(cell_hi[-1]) of the certificate's cells.
        self.interpolated = self.quantized and bool(getattr(cert, "interpolated", False))
        self.nodes = [
            np.concatenate([np.asarray(lo), np.asarray(hi)[-1:]]).astype(np.float32).astype(float)
            for lo, hi in zip(cert.cell_lo, cert.cell_hi, strict=True)
        ]
        self._corner_menus: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.witness_index = np.asarray(
            getattr(cert, "witness_index", np.zeros((0, 5))), np.int64
        ).reshape(-1, 5)
        self.witness_t = np.asarray(getattr(cert, "witness_t", np.zeros(0)), np.float64).reshape(-1)
        if len(self.witness_t) != len(self.witness_index):
            self.witness_index = self.witness_index[:0]
            self.witness_t = self.witness_t[:0]
        self.tables = [
            _OffsetTable(
                np.asarray(cert.offset_keys[i]),
                np.asarray(cert.offset_values[i]),
                [self.cells[d] for d in self.others[i]],
            )
            for i in range(self.n)
        ]

    def relational(self, rows: np.ndarray, box_lo, box_size, chunk: int) -> np.ndarray:
        """Whether each box of ``rows`` is certified by its relational witnesses.

        Every pair of candidates ``(k0, k1)`` of the two bidders whose allocation bounds sum to
        more than 1 on an item needs a witness ``(l0, l1, t)`` with
        ``max_box [U_0(k0, l0) + t U_1(k1, l1)] < 0`` (module docstring of the certificate),
        computed here from this module's own bounds and Jacobian enclosures.
        """
        k, m = self.k, self.m
        out = np.zeros(len(rows), bool)
        if self.n != 2 or self.net.unit_demand:
            return out
        order = np.argsort(self.witness_index[:, 0], kind="stable")
        w_box = self.witness_index[order, 0]
        step = max(1, min(chunk, 512))
        for s in range(0, len(rows), step):
            part = rows[s : s + step]
            lo, size = box_lo[part], box_size[part]
            first = np.searchsorted(w_box, part, "left")
            last = np.searchsorted(w_box, part, "right")
            spans = [order[a:b] for a, b in zip(first, last, strict=True)]
            sel = np.concatenate([np.zeros(0, np.int64), *spans]).astype(np.int64)
            local = np.searchsorted(part, self.witness_index[sel, 0])  # rows are sorted
            affine, cand, a_top = [], [], []
            one_cell = np.ones(len(part), bool)  # interpolated menus: boxes of one cell only
            v_lo, v_hi = self.extent(lo, size, list(range(2 * m)))
            half = (v_hi - v_lo) * 0.5
            for i in range(2):
                own = slice(i * m, (i + 1) * m)
                dims = self.others[i]
                usage = self.usage(i, lo, size, v_lo[:, own], v_hi[:, own])
                inv, a_lo, a_hi, _, _, o_lo, o_hi = self._bidder_bounds(i, lo, size)
                top = np.where(a_hi > 0.0, np.minimum(a_hi + self.alloc_tolerance, 1.0), 0.0)
                x_lo, x_hi = self.extent(lo[:, dims], size[:, dims], dims)
                c_own = (v_lo[:, own] + v_hi[:, own]) * 0.5
                w_own, w_oth = half[:, own], (x_hi - x_lo) * 0.5
                if self.interpolated:
                    # the corners' prices come without offsets: add the box's cell's own
                    o_lo, o_hi = self.tables[i].ranges(lo[:, dims], size[:, dims])
                    inv_o = np.arange(len(part))
                    alloc, base, g_oth, r_phi, beyond, single = self._interpolated_jacobian(
                        i, lo, size, c_own, x_lo, x_hi
                    )
                    extra = np.einsum("bd,bkd->bk", beyond, np.abs(g_oth))
                    one_cell &= single
                else:
                    inv_o = inv
                    alloc, price, d_a, d_p, r_a, r_p = self.net.jacobian(
                        i, x_lo, x_hi, self.bound_splits
                    )
                    base = np.einsum("bm,bkm->bk", c_own, alloc) - price
                    g_oth = np.einsum("bm,bkmd->bkd", c_own, d_a) - d_p
                    r_phi = np.einsum("bm,bkmd->bkd", np.abs(c_own), r_a) + r_p
                    extra = 0.0
                g_own = alloc
                d_alpha = np.maximum(top[inv] - alloc, alloc - a_lo[inv])
                rho = (
                    np.einsum("bm,bkm->bk", w_own, d_alpha)
                    + np.einsum("bd,bkd->bk", w_oth, r_phi)
                    + extra
                )
                zeros = np.zeros((len(part), 1))
                # element K (null): utility exactly -offset, no slope, no remainder
                upper = np.concatenate([base - o_lo[inv_o, :k], -o_lo[inv_o, k:]], 1)
                lower = np.concatenate([base - o_hi[inv_o, :k], -o_hi[inv_o, k:]], 1)
                rho = np.concatenate([rho, zeros], 1)
                # slopes in the global coordinates (v_0, v_1)
                grad = np.concatenate([g_own, g_oth] if i == 0 else [g_oth, g_own], -1)
                grad = np.concatenate([grad, np.zeros((len(part), 1, 2 * m))], 1)
                affine.append((upper, lower, rho, grad))
                cand.append(usage.cand)
                a_top.append(top[inv])
            w_glob = half  # the box's half-widths (inflated), global coordinates
            # required pairs: candidates whose allocation bounds overflow an item together
            t0, t1 = a_top
            over = np.any(
                (t0[:, :, None, :] > 0)
                & (t1[:, None, :, :] > 0)
                & (t0[:, :, None, :] + t1[:, None, :, :] > 1.0),
                axis=-1,
            )
            need = over & cand[0][:, :, None] & cand[1][:, None, :]
            # each witness's value
            wi = self.witness_index[sel]
            t = self.witness_t[sel]
            valid = np.isfinite(t) & (t >= 0) & np.all((wi[:, 1:] >= 0) & (wi[:, 1:] <= k), axis=1)
            valid &= (wi[:, 1] < k) & (wi[:, 2] < k)
            wi = np.where(valid[:, None], wi, 0)
            t = np.where(valid, t, 0.0)
            b = local
            phi = np.zeros(len(sel))
            slope = np.zeros((len(sel), 2 * m))
            for i, (kk, ll) in enumerate(((wi[:, 1], wi[:, 3]), (wi[:, 2], wi[:, 4]))):
                upper, lower, rho, grad = affine[i]
                weight = 1.0 if i == 0 else t
                const = upper[b, kk] - lower[b, ll] + rho[b, kk] + rho[b, ll]
                const = const + self.utility_tolerance
                phi = phi + weight * const
                slope = slope + (weight if i == 0 else t[:, None]) * (grad[b, kk] - grad[b, ll])
            phi = phi + np.sum(np.abs(slope) * w_glob[b], axis=1) + _WITNESS_ATOL * (1 + t)
            good = valid & (phi < 0.0)
            k1 = k + 1
            have = (b[good] * k1 + wi[good, 1]) * k1 + wi[good, 2]
            rb, r0, r1 = np.nonzero(need)
            required = (rb * k1 + r0) * k1 + r1
            missing = ~np.isin(required, have)
            ok = one_cell.copy()
            ok[rb[missing]] = False
            out[s : s + step] = ok
        return out

    def extent(
        self, lo: np.ndarray, size: np.ndarray, dims: list[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Real (inflated) lower and upper corners of boxes over the coordinates ``dims``."""
        rlo, rhi = np.empty(lo.shape), np.empty(lo.shape)
        for t, d in enumerate(dims):
            rlo[:, t] = self.edge_lo[d][lo[:, t]] - self.pad[d]
            rhi[:, t] = self.edge_hi[d][lo[:, t] + size[:, t] - 1] + self.pad[d]
        return rlo, rhi

    def _bidder_bounds(self, bidder: int, lo: np.ndarray, size: np.ndarray):
        """Menu and offset bounds of ``bidder`` per box, computed once per distinct projection."""
        dims = self.others[bidder]
        if not dims:
            inverse = np.zeros(len(lo), np.int64)
            p_lo, p_size = np.zeros((1, 0), np.int64), np.zeros((1, 0), np.int64)
        else:
            proj = np.concatenate([lo[:, dims], size[:, dims]], axis=1)
            uniq, inverse = np.unique(proj, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            p_lo, p_size = uniq[:, : len(dims)], uniq[:, len(dims) :]
        o_lo, o_hi = self.tables[bidder].ranges(p_lo, p_size)
        if self.quantized and dims:
            # each cell's prices carry that cell's offsets before the envelope over the cells
            a_lo, a_hi, pr_lo, pr_hi = self._cell_envelope(bidder, p_lo, p_size)
            o_lo[:, : self.k] = 0.0
            o_hi[:, : self.k] = 0.0
        else:
            x_lo, x_hi = self.extent(p_lo, p_size, dims)
            a_lo, a_hi, pr_lo, pr_hi = self.net.split_bounds(bidder, x_lo, x_hi, self.bound_splits)
        return inverse, a_lo, a_hi, pr_lo, pr_hi, o_lo, o_hi

    def _point_menus(self, bidder: int) -> tuple[np.ndarray, ...]:
        """Bounds of ``bidder``'s menu at the representative of every cell of ``b_-i`` (rows in
        row-major cell order), each a degenerate box, with the cell's offsets added to the
        prices of the learned elements. Interpolated menus: the envelope of the menus at the
        cell's corners instead (a multilinear function's extremes over a cell are at corners)."""
        if bidder not in self._points:
            dims = self.others[bidder]
            n_cells = math.prod(self.cells[d] for d in dims)
            if self.interpolated:
                a_lo, a_hi, pr_lo, pr_hi = self._corner_envelope(bidder)
            else:
                idx = np.indices([self.cells[d] for d in dims]).reshape(len(dims), -1).T
                x = np.stack([self.reps[d][idx[:, t]] for t, d in enumerate(dims)], axis=1)
                a_lo, a_hi, pr_lo, pr_hi = self._menus_at(bidder, x)
            table = self.tables[bidder]
            offsets = np.zeros((n_cells, table.values.shape[1]))
            offsets[table.keys] = table.values  # keys are row-major cell indices
            k = pr_lo.shape[1]
            self._points[bidder] = (a_lo, a_hi, pr_lo + offsets[:, :k], pr_hi + offsets[:, :k])
        return self._points[bidder]

    def _menus_at(self, bidder: int, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Point bounds of ``bidder``'s learned elements at the rows of ``x`` (``b_-i``)."""
        got = [
            self.net.bounds(bidder, x[s : s + 8192], x[s : s + 8192])
            for s in range(0, len(x), 8192)
        ]
        return tuple(np.concatenate(c) for c in zip(*got, strict=True))

    def _node_menus(self, bidder: int) -> tuple[np.ndarray, ...]:
        """Point bounds at every node of ``b_-i``, ``[*(cells + 1), ...]``."""
        dims = self.others[bidder]
        shape = [self.cells[d] + 1 for d in dims]
        idx = np.indices(shape).reshape(len(dims), -1).T
        x = np.stack([self.nodes[d][idx[:, t]] for t, d in enumerate(dims)], axis=1)
        return tuple(t.reshape(*shape, *t.shape[1:]) for t in self._menus_at(bidder, x))

    def _corner_envelope(self, bidder: int) -> tuple[np.ndarray, ...]:
        """Per cell (row-major), the envelope of the node menus over the cell's corners; keeps
        the corners' menus (midpoints of the point bounds) for the relational check."""
        dims = self.others[bidder]
        tables = self._node_menus(bidder)
        a_lo, a_hi, pr_lo, pr_hi = tables
        self._corner_menus[bidder] = ((a_lo + a_hi) * 0.5, (pr_lo + pr_hi) * 0.5)
        cuts = [
            tuple(slice(b, b + self.cells[d]) for b, d in zip(bits, dims, strict=True))
            for bits in itertools.product((0, 1), repeat=len(dims))
        ]
        out = []
        for which, t in enumerate(tables):
            reduce = np.minimum.reduce if which % 2 == 0 else np.maximum.reduce
            out.append(reduce([t[cut] for cut in cuts]).reshape(-1, *t.shape[len(dims) :]))
        return tuple(out)

    def _interpolated_jacobian(self, bidder: int, lo, size, c_own, x_lo, x_hi):
        """For boxes of one cell of ``b_-i``: the interpolated menu's allocations at the box's
        centre, ``phi = c_own . alloc - price`` there, and the slope ``g`` of ``phi`` in ``b_-i``
        with its radius ``r`` over the cell (from the differences along the cell's edges) and
        the clipping term ``beyond``: ``phi(x) - phi(c)`` lies within ``g (x - c) +/- (r |x - c|
        + |g| beyond)`` on the box. Returns ``(alloc, phi, g, r, beyond, single)``; ``single``
        marks the boxes of one cell (the others are not certified this way)."""
        dims = self.others[bidder]
        self._point_menus(bidder)  # fills the corner menus
        c_alloc, c_price = self._corner_menus[bidder]
        q = lo[:, dims]
        single = np.all(size[:, dims] == 1, axis=1)
        node_lo = np.stack([self.nodes[d][q[:, t]] for t, d in enumerate(dims)], 1)
        node_hi = np.stack([self.nodes[d][q[:, t] + 1] for t, d in enumerate(dims)], 1)
        width = node_hi - node_lo
        centre = (x_lo + x_hi) * 0.5
        single &= np.all((centre >= node_lo) & (centre <= node_hi), axis=1)
        pos = np.clip((centre - node_lo) / width, 0.0, 1.0)
        bits = np.asarray(list(itertools.product((0, 1), repeat=len(dims))), np.int64)
        corner = tuple(np.moveaxis(q[:, None, :] + bits[None], -1, 0))
        ca, cp = c_alloc[corner], c_price[corner]  # [B, 2^d, K, m], [B, 2^d, K]
        weight = np.prod(np.where(bits[None] == 1, pos[:, None, :], 1.0 - pos[:, None, :]), -1)
        alloc = np.einsum("bc,bckm->bkm", weight, ca)
        phi_c = np.einsum("bm,bckm->bck", c_own, ca) - cp
        phi = np.einsum("bc,bck->bk", weight, phi_c)
        g = np.empty((*phi.shape, len(dims)))
        r = np.empty_like(g)
        for t in range(len(dims)):
            up = np.flatnonzero(bits[:, t] == 1)
            down = up - (1 << (len(dims) - 1 - t))  # the same corner with bit t cleared
            diff = (phi_c[:, up] - phi_c[:, down]) / width[:, t][:, None, None]
            lo_t, hi_t = diff.min(axis=1), diff.max(axis=1)
            g[..., t] = (lo_t + hi_t) * 0.5
            r[..., t] = (hi_t - lo_t) * 0.5
        beyond = np.maximum(np.maximum(node_lo - x_lo, x_hi - node_hi), 0.0)
        return alloc, phi, g, r, beyond, single

    def _cell_envelope(self, bidder: int, p_lo: np.ndarray, p_size: np.ndarray):
        """Lower/upper envelopes of the quantized menus (prices with offsets) over the cells of
        each projection."""
        a_lo, a_hi, pr_lo, pr_hi = self._point_menus(bidder)
        dims = self.others[bidder]
        strides = _row_major_strides([self.cells[d] for d in dims])
        rows = len(p_lo)
        out = (
            np.empty((rows, *a_lo.shape[1:])),
            np.empty((rows, *a_hi.shape[1:])),
            np.empty((rows, *pr_lo.shape[1:])),
            np.empty((rows, *pr_hi.shape[1:])),
        )
        sizes, group = np.unique(p_size, axis=0, return_inverse=True)
        group = group.reshape(-1)
        for g, size in enumerate(sizes):
            members = np.flatnonzero(group == g)
            within = np.indices(size).reshape(len(dims), -1).T  # [P, d] cells inside a block
            block = max(1, 32768 // len(within))
            for s in range(0, len(members), block):
                r = members[s : s + block]
                flat = ((p_lo[r][:, None, :] + within[None]) * strides).sum(-1)  # [R, P]
                out[0][r] = a_lo[flat].min(axis=1)
                out[1][r] = a_hi[flat].max(axis=1)
                out[2][r] = pr_lo[flat].min(axis=1)
                out[3][r] = pr_hi[flat].max(axis=1)
        return out

    def usage(
        self,
        bidder: int,
        lo: np.ndarray,
        size: np.ndarray,
        v_lo: np.ndarray,
        v_hi: np.ndarray,
        *,
        pairwise: bool = False,
    ) -> _Usage:
        """Bidder ``bidder``'s candidate sets and their largest allocations over boxes.

        With ``pairwise`` an element is also dropped when one of the ``PAIRWISE_DOMINATORS``
        elements with the best lower utilities beats it on the whole box (:meth:`_beaten`).
        """
        inv, a_lo, a_hi, pr_lo, pr_hi, o_lo, o_hi = self._bidder_bounds(bidder, lo, size)
        k, tol_a = self.k, self.alloc_tolerance
        # Allocations never exceed 1 (sigmoid, softmax; also in float32), so the slack stops there.
        # An exact 0 (a clipped head, robustly) takes no slack.
        a_top = np.where(a_hi > 0.0, np.minimum(a_hi + tol_a, 1.0), 0.0)  # [U, K, m]
        boxes = len(lo)
        # Utility bounds: sum_j v_j a_j over v in [v_lo, v_hi], a in [a_lo, a_top] (a >= 0).
        gain_hi, gain_lo = np.zeros((boxes, k)), np.zeros((boxes, k))
        for j in range(self.m):
            top_j, low_j = np.ascontiguousarray(a_top[:, :, j]), np.ascontiguousarray(a_lo[:, :, j])
            gain_hi += top_j[inv] * np.maximum(v_hi[:, j], 0.0)[:, None]
            gain_lo += low_j[inv] * np.maximum(v_lo[:, j], 0.0)[:, None]
            # Inflation can reach below a support starting at 0.
            neg = np.flatnonzero(v_hi[:, j] < 0)
            gain_hi[neg] += low_j[inv[neg]] * v_hi[neg, j][:, None]
            neg = np.flatnonzero(v_lo[:, j] < 0)
            gain_lo[neg] += top_j[inv[neg]] * v_lo[neg, j][:, None]
        u_hi = gain_hi - (pr_lo + o_lo[:, :k])[inv]
        u_lo = gain_lo - (pr_hi + o_hi[:, :k])[inv]
        null_hi, null_lo = -o_lo[inv, k], -o_hi[inv, k]  # the null element allocates exactly 0
        floor = np.maximum(np.max(u_lo, axis=1), null_lo) - self.utility_tolerance
        cand = u_hi >= floor[:, None]
        cand_null = null_hi >= floor
        if pairwise:
            beaten = self._beaten(
                inv, a_lo, a_top, pr_lo, pr_hi, o_lo, o_hi, u_lo, null_lo, v_lo, v_hi
            )
            cand &= ~beaten[:, :k]
            cand_null &= ~beaten[:, k]
        use = np.full((boxes, self.m), -np.inf)
        rows, elems = np.nonzero(cand)  # row-major: grouped by box
        if len(rows):
            seg = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
            use[rows[seg]] = np.maximum.reduceat(a_top[inv[rows], elems], seg, axis=0)
        use = np.maximum(use, np.where(cand_null, 0.0, -np.inf)[:, None])
        return _Usage(use, cand, cand_null, inv, a_top)

    def _beaten(self, inv, a_lo, a_top, pr_lo, pr_hi, o_lo, o_hi, u_lo, null_lo, v_lo, v_hi):
        """``[boxes, K + 1]`` elements that some strong element out-earns on the whole box.

        For fixed menus ``u_k - u_d`` is linear in the values; over the box it is at most
        ``sum_j max(c v_j)`` over ``c`` in the interval of ``alpha_kj - alpha_dj`` and ``v_j`` in
        ``[v_lo_j, v_hi_j]`` (a product's extremes are at its corners), minus the least price
        difference. Below ``-utility_tolerance``, bidder ``bidder`` never picks ``k`` in the box.
        The comparison elements ``d`` are those with the best lower utilities (any choice is sound).
        """
        k, m = self.k, self.m
        zero = np.zeros((a_lo.shape[0], 1, m))
        # per projection, with the null element (allocates 0, priced at its offset) appended
        al = np.concatenate([a_lo, zero], 1)[inv]  # [boxes, K + 1, m]
        at = np.concatenate([a_top, zero], 1)[inv]
        price_lo = np.concatenate([pr_lo + o_lo[:, :k], o_lo[:, k:]], 1)[inv]
        price_hi = np.concatenate([pr_hi + o_hi[:, :k], o_hi[:, k:]], 1)[inv]
        lower = np.concatenate([u_lo, null_lo[:, None]], 1)
        count = min(PAIRWISE_DOMINATORS, k + 1)
        strong = np.argsort(-lower, axis=1, kind="stable")[:, :count]
        rows = np.arange(len(inv))
        beaten = np.zeros(lower.shape, bool)
        for t in range(count):
            d = strong[:, t]
            most = -price_lo + price_hi[rows, d][:, None]
            for j in range(m):
                c_hi = at[:, :, j] - al[rows, d, j][:, None]
                c_lo = al[:, :, j] - at[rows, d, j][:, None]
                lo_j, hi_j = v_lo[:, j][:, None], v_hi[:, j][:, None]
                most = most + np.maximum.reduce(
                    [c_hi * hi_j, c_hi * lo_j, c_lo * hi_j, c_lo * lo_j]
                )
            beaten |= most < -self.utility_tolerance
        return beaten

    def _fill_use(self, use, box_lo, box_size, orders, chunk: int, *, pairwise: bool = False):
        """``use[i, rows]``: bidder ``i``'s per-item use on the boxes ``orders[i]``, a chunk at a
        time in that order (``pairwise``: with the pairwise test, :meth:`usage`)."""
        m = self.m
        for i, order in enumerate(orders):
            own = list(range(i * m, (i + 1) * m))
            for s in range(0, len(order), chunk):
                rows = order[s : s + chunk]
                lo, size = box_lo[rows], box_size[rows]
                v_lo, v_hi = self.extent(lo[:, own], size[:, own], own)
                use[i, rows] = self.usage(i, lo, size, v_lo, v_hi, pairwise=pairwise).use

    def run(self, box_lo: np.ndarray, box_size: np.ndarray, chunk: int, fail: _Failures) -> int:
        """Check every box; returns the number of uncertified boxes.

        One pass per bidder, with the boxes sorted by that bidder's projection, so that each
        distinct projection of ``b_-i`` is bounded about once; the passes only keep each box's
        per-item use, and failing boxes are re-evaluated alone for the report.
        """
        n, m = self.n, self.m
        n_box = len(box_lo)
        use = np.zeros((n, n_box, m))
        orders = []
        for i in range(n):
            dims = self.others[i]
            if dims:
                cols = np.concatenate([box_lo[:, dims], box_size[:, dims]], axis=1)
                orders.append(np.lexsort(cols.T[::-1]))
            else:
                orders.append(np.arange(n_box))
        self._fill_use(use, box_lo, box_size, orders, chunk)
        total = use.sum(axis=0)  # [boxes, m]
        bad = np.flatnonzero(np.any(total > 1.0, axis=1))
        # The pairwise test only shrinks candidate sets: run it where the interval test fails.
        if len(bad) and self.quantized:
            self._fill_use(use, box_lo, box_size, [bad] * n, chunk, pairwise=True)
            total = use.sum(axis=0)
            bad = np.flatnonzero(np.any(total > 1.0, axis=1))
        # (witnesses bound the network between cells: they say nothing about quantized menus,
        # except interpolated ones)
        if len(bad) and len(self.witness_t) and (self.interpolated or not self.quantized):
            bad = bad[~self.relational(bad, box_lo, box_size, chunk)]
        all_dims = list(range(n * m))
        for r in bad.tolist():
            if len(fail.messages) >= fail.limit:
                fail.add("compatibility", "")
                continue
            lo, size = box_lo[r : r + 1], box_size[r : r + 1]
            v_lo, v_hi = self.extent(lo, size, all_dims)
            j = int(np.argmax(total[r]))
            parts = []
            for i in range(n):
                own = slice(i * m, (i + 1) * m)
                usage = self.usage(i, lo, size, v_lo[:, own], v_hi[:, own], pairwise=self.quantized)
                parts.append(f"bidder {i}: {usage.describe(0, j, self.k)}")
            fail.add(
                "compatibility",
                f"box {r} (cells lo={lo[0].tolist()} size={size[0].tolist()}; values "
                f"[{np.round(v_lo[0], 6).tolist()}, {np.round(v_hi[0], 6).tolist()}]) is not "
                f"certified: item {j} total {total[r, j]:.6g} > 1 ({', '.join(parts)})",
            )
        return len(bad)


# --------------------------------------------------------------------------------------------------
# Public API.


def verify_certificate(
    model: GemNet,
    setting: Setting,
    certificate: Certificate,
    *,
    chunk: int = 4096,
    max_failures: int = 20,
) -> VerificationReport:
    """Re-check a repaired GemNet's certificate from scratch.

    Everything is recomputed in numpy float64 from the model's raw weights and the setting's
    support; nothing from the builder is trusted except the certificate's claims themselves. The
    tolerances used are ``max(certificate value, minimum)`` with the minimums
    :data:`MIN_UTILITY_TOLERANCE` (times the price scale), :data:`MIN_ALLOC_TOLERANCE` and
    :data:`MIN_BOX_INFLATION`.

    Args:
      model: the trained (unrepaired) GemNet whose weights the certificate names.
      setting: the setting the certificate claims to cover.
      certificate: the certificate to check.
      chunk: boxes bounded at once (memory grows with ``chunk * menu_size * items``).
      max_failures: failure messages kept in the report.

    Returns:
      A :class:`VerificationReport`; ``ok`` is True only when every check passed.

    Raises:
      ValueError: ``chunk`` or ``max_failures`` below 1.
      NotImplementedError: a GemNet with item-price bundles (no certificate models them).

    Examples:
      >>> from flax import nnx
      >>> from diffecon import get_setting
      >>> from gemnet.certificate import Certificate, params_digest
      >>> from gemnet.model import GemNet, GemNetConfig
      >>> setting = get_setting("additive_1x2_uniform")
      >>> model = GemNet.for_setting(setting, GemNetConfig(menu_size=4), rngs=nnx.Rngs(0))
      >>> leaves = [w[...] for w in model.weights] + [b[...] for b in model.biases]
      >>> cert = Certificate(
      ...     setting=setting.name, n_bidders=1, n_items=2, menu_size=4,
      ...     params_digest=params_digest([np.asarray(x) for x in leaves]),
      ...     cell_lo=(np.zeros(1), np.zeros(1)), cell_hi=(np.ones(1), np.ones(1)),
      ...     discrete=(False, False), box_lo=np.zeros((1, 2), np.int64),
      ...     box_size=np.ones((1, 2), np.int64), offset_keys=(np.zeros(0, np.int64),),
      ...     offset_values=(np.zeros((0, 5)),), utility_tolerance=1e-5, alloc_tolerance=1e-6,
      ...     box_inflation=1e-4)
      >>> verify_certificate(model, setting, cert).ok
      True
    """
    if chunk < 1 or max_failures < 1:
        raise ValueError(f"chunk and max_failures must be >= 1, got {chunk} and {max_failures}")
    require_learned_menus(model, "verify_certificate")
    start = time.perf_counter()
    fail = _Failures(max_failures)
    n_box = int(np.shape(certificate.box_lo)[0]) if np.ndim(certificate.box_lo) >= 1 else 0
    n_uncertified = n_box
    ran: set[str] = set()

    def finish() -> VerificationReport:
        checks = {name: name in ran and name not in fail.failed for name in CHECKS}
        failures = list(fail.messages)
        if fail.dropped:
            failures.append(f"... and {fail.dropped} more failures")
        return VerificationReport(
            ok=all(checks.values()),
            failures=failures,
            n_boxes=n_box,
            n_uncertified=n_uncertified,
            checks=checks,
            wall_s=time.perf_counter() - start,
        )

    ran.add("setting")
    structure_ok = _check_setting(model, setting, certificate, fail)

    ran.add("params_digest")
    leaves = [np.asarray(w[...]) for w in model.weights] + [
        np.asarray(b[...]) for b in model.biases
    ]
    digest = params_digest(leaves)
    if digest != certificate.params_digest:
        fail.add(
            "params_digest",
            f"the model's parameters hash to {digest[:16]}..., the certificate names "
            f"{str(certificate.params_digest)[:16]}...",
        )

    ran.add("tolerances")
    n, m = setting.n_bidders, setting.n_items
    scale = float(np.max(np.sum(np.asarray(setting.high, np.float64), axis=1)))
    utility_tolerance = _effective(
        certificate.utility_tolerance, MIN_UTILITY_TOLERANCE * scale, "utility_tolerance", fail
    )
    alloc_tolerance = _effective(
        certificate.alloc_tolerance, MIN_ALLOC_TOLERANCE, "alloc_tolerance", fail
    )
    box_inflation = _effective(certificate.box_inflation, MIN_BOX_INFLATION, "box_inflation", fail)
    bound_splits = _bound_splits(getattr(certificate, "bound_splits", 1), n, m, fail)
    if not structure_ok:
        for name in ("grid", "tiling", "offsets", "compatibility"):
            fail.add(name, "not checked: the model does not match the setting")
        return finish()
    k1 = int(model.menu_size) + 1

    ran.add("grid")
    grid_usable, _ = _check_grid(setting, certificate, fail)
    cells = [len(c) for c in certificate.cell_lo]

    ran.add("tiling")
    boxes_usable = _check_boxes(certificate, n * m, fail)
    box_lo = box_size = np.zeros((0, n * m), np.int64)
    in_range = False
    if boxes_usable:
        box_lo = np.asarray(certificate.box_lo, np.int64)
        box_size = np.asarray(certificate.box_size, np.int64)
    if not grid_usable:
        fail.add("tiling", "not checked: the grid is malformed")
    elif boxes_usable:
        outside = _boxes_outside(box_lo, box_size, cells, max_failures)
        in_range = not outside
        messages = outside or _tiling_failures(box_lo, box_size, cells, max_failures)
        for message in messages:
            fail.add("tiling", message)

    ran.add("offsets")
    offsets_usable = False
    if grid_usable:
        offsets_usable, _ = _check_offsets(certificate, cells, n, m, k1, fail)
    else:
        fail.add("offsets", "not checked: the grid is malformed")

    ran.add("compatibility")
    if not (grid_usable and boxes_usable and in_range and offsets_usable):
        fail.add("compatibility", "not checked: malformed grid, boxes or offsets")
        return finish()
    if getattr(certificate, "interpolated", False) and (
        not getattr(certificate, "quantized", False) or any(certificate.discrete)
    ):
        fail.add(
            "compatibility",
            "interpolated menus need quantized menus and continuous coordinates only",
        )
        return finish()
    checker = _Compatibility(
        model,
        setting,
        certificate,
        utility_tolerance=utility_tolerance,
        alloc_tolerance=alloc_tolerance,
        box_inflation=box_inflation,
        bound_splits=bound_splits,
    )
    n_uncertified = checker.run(box_lo, box_size, chunk, fail)
    return finish()


def assert_certified(
    model: GemNet,
    setting: Setting,
    certificate: Certificate,
    *,
    chunk: int = 4096,
    max_failures: int = 20,
) -> VerificationReport:
    """:func:`verify_certificate`, raising when the certificate does not verify.

    Returns:
      The report (``ok`` is True).

    Raises:
      ValueError: the certificate failed a check; the message lists the report's failures.
    """
    report = verify_certificate(model, setting, certificate, chunk=chunk, max_failures=max_failures)
    if not report.ok:
        raise ValueError(report.summary() + "\n" + "\n".join(report.failures))
    return report
