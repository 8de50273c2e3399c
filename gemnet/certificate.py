"""The compatibility certificate of a repaired GemNet and its on-disk format (JSON + npz).

The profile space of ``n`` bidders and ``m`` items has ``D = n * m`` coordinates, coordinate
``d = i * m + j`` being bidder ``i``'s value for item ``j``. Each coordinate has a **grid** of
``cells[d]`` cells: cell ``c`` covers the closed interval ``[cell_lo[d][c], cell_hi[d][c]]``.
Continuous marginals on ``[low, high]`` get ``2^level`` equal cells (``cell_hi[c] = cell_lo[c+1]``);
a discrete marginal gets one degenerate cell per support point (``cell_lo = cell_hi = point``).

A **box** is a product of runs of cells: integer ``box_lo [boxes, D]`` and ``box_size [boxes, D]``
(cells ``box_lo .. box_lo + box_size - 1`` of each coordinate). The boxes must tile the grid: every
cell tuple lies in exactly one box.

**Offsets** raise bidder ``i``'s menu prices as a function of ``b_-i`` alone: for bidder ``i``,
``offset_keys[i]`` (``[C_i]``, sorted, int64) name cells of the grid of ``b_-i``, and
``offset_values[i]`` (``[C_i, K + 1]``, float64, ``>= 0`` unless every coordinate is discrete,
last column 0 for the null element) the
amounts added to the ``K + 1`` prices while ``b_-i`` lies in that cell (0 elsewhere). The key of
the cell with per-coordinate indices ``q`` over the other bidders' coordinates (bidders in order,
skipping ``i``; items in order) is ``sum_t q[t] * stride[t]`` with ``stride[t] = prod_{u > t}
cells[u]`` (row-major). At run time a bid is mapped to its cell by ``floor((x - low) / width)``
(clipped to the last cell) for continuous coordinates and to the nearest support point for
discrete ones.

With ``quantized`` the mechanism evaluates bidder ``i``'s network at the representative of the
cell of ``b_-i`` (``float32((cell_lo + cell_hi) / 2)`` for a continuous coordinate, the point of a
discrete one), so its menus over a box are the finitely many menus of the box's cells, and the
bounds below are their lower and upper envelopes, each cell's prices taken with that cell's
offsets (a box may then cover cells with different offsets).

With ``interpolated`` (and ``quantized``) the mechanism instead interpolates bidder ``i``'s menu
multilinearly between the network's menus at the ``2^d`` corners (nodes) of the cell of ``b_-i``
(``d`` coordinates; node ``q`` of a coordinate is ``float32(cell_lo[q])``, the last one
``float32(cell_hi[-1])``; the weights use the position in the cell clipped to ``[0, 1]``), so its
menus are continuous and piecewise multilinear in ``b_-i``. A multilinear function takes its
extremes over a cell at the cell's corners, so each cell's bounds are the lower and upper
envelopes of its corners' menus (prices with the cell's offsets), and a box's bounds the
envelopes over its cells. Relational witnesses (below) then bound each utility affinely over a
box of one cell in ``b_-i`` by the interpolant's value at the box's centre, the enclosure of its
Jacobian by the differences along the cell's edges, and a term for the clipping of the inflated
box to the cell.

On disk the boxes are sorted (lexicographically by ``box_lo``) and, when every size is a power of
two, stored as row differences of ``box_lo`` in the smallest integer type and ``log2(box_size)``
(the committed level-7 2x2 certificate, 3.6 million boxes with their offsets, takes 1.2 MB);
witness rows are renumbered with the boxes. Loading restores ``box_lo`` and ``box_size`` as int64.

The certificate claims: for every box, with interval bounds of every bidder's menu over the box
(inflated by ``box_inflation`` times the cell width on each side, to cover float32 rounding of the
cell lookup), every bidder's **candidate set** (elements whose largest utility over the box, after
offsets, reaches the best smallest utility minus ``utility_tolerance``) is compatible: for every
item ``j``, ``sum_i max_{k in candidates_i} min(alloc_ij^k (upper bound) + alloc_tolerance, 1)``
is at most 1 (the null element allocates exactly 0). For quantized menus an element is also
outside the candidate set when another element ``d`` beats it on the whole box by more than
``utility_tolerance``: ``max_{v in box} (u_k(v) - u_d(v))``, linear in ``v`` for fixed menus, is
bounded with the interval of ``alloc^k - alloc^d`` per item and the least price difference (the
pairwise test; the verifier compares each element with the eight best by lower utility).

With two additive bidders a box may instead be certified **relationally** (the candidate sets
themselves conflict, but no profile in the box makes both conflicting choices): for every pair of
candidates ``(k0, k1)`` of bidders 0 and 1 whose allocation bounds sum to more than 1 on some item,
``witness_index`` holds a row ``(box, k0, k1, l0, l1)`` and ``witness_t`` a ``t >= 0`` such that
``max_{v in box} [U_0(k0, l0)(v) + t U_1(k1, l1)(v)] < 0``, where ``U_i(k, l)`` is a sound affine
upper bound of ``u_ik - u_il + utility_tolerance`` over the box (mean-value form: the menu and its
Jacobian in ``b_-i`` at the box's centre, an interval enclosure of the Jacobian over the box as
the union over ``bound_splits`` parts per coordinate of ``b_-i``, and interval bounds of the
allocations). Bidder ``i`` can pick ``k`` over ``l`` only where
``U_i(k, l) >= 0``, so the two picks never happen together. ``verify_certificate`` re-derives all
of that from the network's weights and this file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Certificate", "load_certificate", "params_digest", "save_certificate"]

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Certificate:
    """A repaired GemNet's certificate (see the module docstring for the exact semantics).

    Attributes:
      setting: the setting's registry name.
      n_bidders: bidders.
      n_items: items.
      menu_size: ``K`` (the null element is ``K``).
      params_digest: SHA-256 of the network's parameters (:func:`params_digest`).
      cell_lo: per coordinate, ``[cells[d]]`` lower ends of the cells.
      cell_hi: per coordinate, ``[cells[d]]`` upper ends of the cells.
      discrete: per coordinate, whether its cells are support points.
      box_lo: ``[boxes, D]`` first cell of each box per coordinate.
      box_size: ``[boxes, D]`` cells per coordinate.
      offset_keys: per bidder, ``[C_i]`` sorted keys of the cells of ``b_-i`` with offsets.
      offset_values: per bidder, ``[C_i, K + 1]`` price offsets.
      utility_tolerance: slack of candidate sets (absolute, in value units).
      alloc_tolerance: added to every allocation upper bound.
      box_inflation: relative widening of each box per side (a fraction of its cells' width).
      bound_splits: menu bounds over a box may be taken as the union of interval bounds over
        ``bound_splits`` equal parts of each coordinate of the (inflated) ``b_-i`` projection.
      quantized: the mechanism computes each bidder's menu at the representative of the cell of
        ``b_-i`` (centre of a continuous cell, the point of a discrete one) instead of at
        ``b_-i`` itself; menus over a box are then bounded by their values at the box's cells.
      interpolated: with ``quantized``, the menus are interpolated multilinearly between the
        cell's corners instead of taken at its representative (module docstring).
      activation: the network's hidden nonlinearity (``GemNetConfig.activation``); the verifier
        refuses a model with another one.
      witness_index: ``[W, 5]`` int64 rows ``(box, k0, k1, l0, l1)`` of relational certificates.
      witness_t: ``[W]`` the multipliers ``t >= 0`` of those rows.
      stats: how the certificate was built (boxes, MILPs, time...), informational only.
    """

    setting: str
    n_bidders: int
    n_items: int
    menu_size: int
    params_digest: str
    cell_lo: tuple[np.ndarray, ...]
    cell_hi: tuple[np.ndarray, ...]
    discrete: tuple[bool, ...]
    box_lo: np.ndarray
    box_size: np.ndarray
    offset_keys: tuple[np.ndarray, ...]
    offset_values: tuple[np.ndarray, ...]
    utility_tolerance: float
    alloc_tolerance: float
    box_inflation: float
    bound_splits: int = 1
    quantized: bool = False
    interpolated: bool = False
    activation: str = "tanh"
    witness_index: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros((0, 5), np.int64)
    )
    witness_t: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.float64))
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def cells(self) -> tuple[int, ...]:
        """Cells per coordinate."""
        return tuple(len(c) for c in self.cell_lo)

    @property
    def n_boxes(self) -> int:
        return int(self.box_lo.shape[0])

    def others_coordinates(self, bidder: int) -> list[int]:
        """Coordinates of ``b_-bidder`` in key order."""
        m = self.n_items
        return [i * m + j for i in range(self.n_bidders) if i != bidder for j in range(m)]

    def strides(self, bidder: int) -> np.ndarray:
        """Row-major strides of bidder ``bidder``'s offset keys over ``others_coordinates``."""
        sizes = [self.cells[d] for d in self.others_coordinates(bidder)]
        strides = np.ones(len(sizes), np.int64)
        for t in range(len(sizes) - 2, -1, -1):
            strides[t] = strides[t + 1] * sizes[t + 1]
        return strides


def params_digest(params_leaves: list[np.ndarray]) -> str:
    """SHA-256 over the parameter arrays (float32, C order, in the given order, with shapes)."""
    h = hashlib.sha256()
    for leaf in params_leaves:
        arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_certificate(certificate: Certificate, directory: str | Path) -> Path:
    """Write ``certificate.json`` and ``certificate.npz`` into ``directory`` (atomically)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    c = certificate
    arrays: dict[str, Any] = {
        **_encode_boxes(c),
        "witness_t": np.asarray(c.witness_t, np.float64).reshape(-1),
    }
    for d in range(len(c.cell_lo)):
        arrays[f"cell_lo_{d}"] = np.asarray(c.cell_lo[d], np.float64)
        arrays[f"cell_hi_{d}"] = np.asarray(c.cell_hi[d], np.float64)
    for i in range(c.n_bidders):
        arrays[f"offset_keys_{i}"] = np.asarray(c.offset_keys[i], np.int64)
        arrays[f"offset_values_{i}"] = np.asarray(c.offset_values[i], np.float64)
    meta = {
        "format_version": FORMAT_VERSION,
        "setting": c.setting,
        "n_bidders": c.n_bidders,
        "n_items": c.n_items,
        "menu_size": c.menu_size,
        "params_digest": c.params_digest,
        "discrete": list(c.discrete),
        "utility_tolerance": c.utility_tolerance,
        "alloc_tolerance": c.alloc_tolerance,
        "box_inflation": c.box_inflation,
        "bound_splits": c.bound_splits,
        "quantized": c.quantized,
        "interpolated": c.interpolated,
        "activation": c.activation,
        "stats": c.stats,
    }
    tmp_npz = directory / "certificate.npz.tmp"
    with tmp_npz.open("wb") as f:
        np.savez_compressed(f, **arrays)
    tmp_json = directory / "certificate.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=1))
    tmp_npz.replace(directory / "certificate.npz")
    tmp_json.replace(directory / "certificate.json")
    return directory


def _encode_boxes(c: Certificate) -> dict[str, np.ndarray]:
    """Boxes (sorted; compact when every size is a power of two) and the renumbered witnesses."""
    lo = np.asarray(c.box_lo, np.int64)
    size = np.asarray(c.box_size, np.int64)
    witness = np.asarray(c.witness_index, np.int64).reshape(-1, 5).copy()
    if lo.ndim != 2 or lo.shape != size.shape or len(lo) == 0:
        return {"box_lo": lo, "box_size": size, "witness_index": witness}
    order = np.lexsort(lo.T[::-1])
    lo, size = lo[order], size[order]
    if len(witness):
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        valid = (witness[:, 0] >= 0) & (witness[:, 0] < len(order))
        witness[valid, 0] = position[witness[valid, 0]]
    log2 = np.zeros(size.shape, np.int64)
    positive = size > 0
    log2[positive] = np.round(np.log2(size[positive])).astype(np.int64)
    if not (np.all(positive) and np.array_equal(np.left_shift(1, log2), size)):
        return {"box_lo": lo, "box_size": size, "witness_index": witness}
    delta = np.diff(lo, axis=0, prepend=np.zeros((1, lo.shape[1]), np.int64))
    dtype = next(t for t in (np.int8, np.int16, np.int32, np.int64) if _fits(delta, t))
    return {
        "box_lo_delta": delta.astype(dtype),
        "box_log2_size": log2.astype(np.uint8),
        "witness_index": witness,
    }


def _fits(x: np.ndarray, dtype) -> bool:
    info = np.iinfo(dtype)
    return bool(x.size == 0 or (x.min() >= info.min and x.max() <= info.max))


def _decode_boxes(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "box_lo_delta" in arrays:
        log2 = np.asarray(arrays["box_log2_size"], np.int64)
        if log2.size and (log2.min() < 0 or log2.max() > 62):
            raise ValueError("box_log2_size out of range")
        lo = np.cumsum(np.asarray(arrays["box_lo_delta"], np.int64), axis=0)
        return {"box_lo": lo, "box_size": np.left_shift(1, log2)}
    return {
        "box_lo": np.asarray(arrays["box_lo"], np.int64),
        "box_size": np.asarray(arrays["box_size"], np.int64),
    }


def load_certificate(directory: str | Path) -> Certificate:
    """Read a certificate written by :func:`save_certificate`.

    Raises:
      ValueError: missing, corrupt or inconsistent files.
    """
    directory = Path(directory)
    try:
        meta = json.loads((directory / "certificate.json").read_text())
        with np.load(directory / "certificate.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unknown format_version {meta.get('format_version')!r}")
        n, m = int(meta["n_bidders"]), int(meta["n_items"])
        cert = Certificate(
            setting=meta["setting"],
            n_bidders=n,
            n_items=m,
            menu_size=int(meta["menu_size"]),
            params_digest=meta["params_digest"],
            cell_lo=tuple(arrays[f"cell_lo_{d}"] for d in range(n * m)),
            cell_hi=tuple(arrays[f"cell_hi_{d}"] for d in range(n * m)),
            discrete=tuple(bool(x) for x in meta["discrete"]),
            **_decode_boxes(arrays),
            offset_keys=tuple(arrays[f"offset_keys_{i}"] for i in range(n)),
            offset_values=tuple(arrays[f"offset_values_{i}"] for i in range(n)),
            utility_tolerance=float(meta["utility_tolerance"]),
            alloc_tolerance=float(meta["alloc_tolerance"]),
            box_inflation=float(meta["box_inflation"]),
            bound_splits=int(meta.get("bound_splits", 1)),
            quantized=bool(meta.get("quantized", False)),
            interpolated=bool(meta.get("interpolated", False)),
            activation=str(meta.get("activation", "tanh")),
            witness_index=arrays.get("witness_index", np.zeros((0, 5), np.int64)),
            witness_t=arrays.get("witness_t", np.zeros((0,), np.float64)),
            stats=dict(meta.get("stats", {})),
        )
    except (OSError, KeyError, TypeError, ValueError, EOFError) as err:
        raise ValueError(f"corrupt or missing certificate in {str(directory)!r}: {err}") from err
    if cert.interpolated and not cert.quantized:
        raise ValueError(f"certificate in {str(directory)!r}: interpolated but not quantized")
    k1 = cert.menu_size + 1
    for i in range(n):
        keys, vals = cert.offset_keys[i], cert.offset_values[i]
        if keys.ndim != 1 or vals.shape != (keys.shape[0], k1):
            raise ValueError(
                f"certificate in {str(directory)!r}: bidder {i}'s offsets have shapes "
                f"{keys.shape} and {vals.shape}, expected [C] and [C, {k1}]"
            )
    if (
        cert.witness_index.ndim != 2
        or cert.witness_index.shape[1:] != (5,)
        or (cert.witness_t.shape != cert.witness_index.shape[:1])
    ):
        raise ValueError(
            f"certificate in {str(directory)!r}: witnesses have shapes "
            f"{cert.witness_index.shape} and {cert.witness_t.shape}, expected [W, 5] and [W]"
        )
    if cert.box_lo.shape != cert.box_size.shape or cert.box_lo.shape[1:] != (n * m,):
        raise ValueError(
            f"certificate in {str(directory)!r}: boxes have shapes {cert.box_lo.shape} and "
            f"{cert.box_size.shape}, expected [boxes, {n * m}]"
        )
    return cert
