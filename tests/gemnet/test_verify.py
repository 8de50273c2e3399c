"""gemnet.verify: the independent certificate checker, on hand-built certificates."""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffecon import get_setting
from gemnet.certificate import Certificate, load_certificate, params_digest, save_certificate
from gemnet.model import GemNet, GemNetConfig, choose
from gemnet.verify import (
    _boxes_outside,
    _Compatibility,
    _MenuBounds,
    _OffsetTable,
    _tiling_failures,
    assert_certified,
    verify_certificate,
)

TINY = GemNetConfig(menu_size=4, hidden=8)


def _model(name: str, seed: int = 0) -> GemNet:
    return GemNet.for_setting(get_setting(name), TINY, rngs=nnx.Rngs(seed))


def _digest(model: GemNet) -> str:
    leaves = [np.asarray(w[...]) for w in model.weights]
    return params_digest(leaves + [np.asarray(b[...]) for b in model.biases])


def _set_head(model: GemNet, *, logits=None, raw_price=None) -> None:
    """Overwrite the last-layer biases: ``logits [K, width]`` and ``raw_price`` (scalar)."""
    k, m = model.menu_size, model.n_items
    width = m + 1 if model.valuation == "unit_demand" else m
    bias = np.array(model.biases[-1][...])
    if logits is not None:
        bias[:, : k * width] = np.broadcast_to(np.asarray(logits, np.float32), (k, width)).ravel()
    if raw_price is not None:
        bias[:, k * width :] = raw_price
    model.biases[-1][...] = jnp.asarray(bias)


def _grid(setting, level: int):
    cell_lo, cell_hi, discrete = [], [], []
    for i in range(setting.n_bidders):
        for j in range(setting.n_items):
            marginal = setting.values.marginal(i, j)
            if hasattr(marginal, "points"):
                pts = np.asarray(marginal.points, np.float64)
                cell_lo.append(pts)
                cell_hi.append(pts.copy())
                discrete.append(True)
            else:
                frac = np.arange(2**level + 1) / 2**level
                edges = marginal.low + (marginal.high - marginal.low) * frac
                cell_lo.append(edges[:-1])
                cell_hi.append(edges[1:])
                discrete.append(False)
    return tuple(cell_lo), tuple(cell_hi), tuple(discrete)


def _certificate(model, setting, *, level=0, single_cells=False, **changes) -> Certificate:
    """One box over the whole grid (or one box per cell), no offsets."""
    cell_lo, cell_hi, discrete = _grid(setting, level)
    cells = [len(c) for c in cell_lo]
    if single_cells:
        box_lo = np.array(list(itertools.product(*(range(c) for c in cells))), np.int64)
        box_size = np.ones_like(box_lo)
    else:
        box_lo = np.zeros((1, len(cells)), np.int64)
        box_size = np.array([cells], np.int64)
    n, k1 = setting.n_bidders, model.menu_size + 1
    cert = Certificate(
        setting=setting.name,
        n_bidders=n,
        n_items=setting.n_items,
        menu_size=model.menu_size,
        params_digest=_digest(model),
        cell_lo=cell_lo,
        cell_hi=cell_hi,
        discrete=discrete,
        box_lo=box_lo,
        box_size=box_size,
        offset_keys=tuple(np.zeros(0, np.int64) for _ in range(n)),
        offset_values=tuple(np.zeros((0, k1)) for _ in range(n)),
        utility_tolerance=1e-5,
        alloc_tolerance=1e-6,
        box_inflation=1e-4,
    )
    return dataclasses.replace(cert, **changes)


def _failed(report) -> set[str]:
    return {name for name, passed in report.checks.items() if not passed}


def _expensive(name="additive_2x2_uniform"):
    """Every learned element costs far more than any bundle is worth: only the null is bought."""
    setting, model = get_setting(name), _model(name)
    _set_head(model, raw_price=50.0)
    return setting, model


def _item_1_cheap(name="additive_2x2_uniform"):
    """Every element gives item 1 (almost surely) for (almost) nothing: incompatible."""
    setting, model = get_setting(name), _model(name)
    logits = [-8.0, 8.0] if setting.valuation == "additive" else [-8.0, 8.0, -8.0]
    _set_head(model, logits=logits, raw_price=-20.0)
    return setting, model


# --------------------------------------------------------------------------------------------------
# Certificates that verify.


@pytest.mark.parametrize("name", ["additive_2x2_uniform", "unit_2x2_uniform"])
@pytest.mark.parametrize("single_cells", [False, True])
def test_expensive_menus_are_certified(single_cells, name):
    setting, model = _expensive(name)
    cert = _certificate(model, setting, level=1, single_cells=single_cells)
    report = verify_certificate(model, setting, cert, chunk=5)
    assert report.ok, report.failures
    assert report.failures == [] and all(report.checks.values())
    assert report.n_boxes == (16 if single_cells else 1) and report.n_uncertified == 0
    assert set(report.checks) == {
        "setting",
        "params_digest",
        "tolerances",
        "grid",
        "tiling",
        "offsets",
        "compatibility",
    }
    assert assert_certified(model, setting, cert).ok


@pytest.mark.parametrize("name", ["additive_1x2_uniform", "unit_1x2_uniform"])
def test_one_bidder_is_always_compatible(name):
    setting, model = get_setting(name), _model(name)
    report = verify_certificate(model, setting, _certificate(model, setting))
    assert report.ok, report.failures


def test_certificate_survives_a_save_load_roundtrip(tmp_path):
    setting, model = _expensive()
    cert = _certificate(model, setting, level=1, single_cells=True)
    loaded = load_certificate(save_certificate(cert, tmp_path / "cert"))
    assert verify_certificate(model, setting, loaded).ok


def test_discrete_setting_cells_are_the_support_points():
    setting, model = _expensive("yao_2x2_discrete_37")
    cert = _certificate(model, setting)
    assert [c.tolist() for c in cert.cell_lo] == [[3.0, 7.0]] * 4
    for c in (cert, _certificate(model, setting, single_cells=True)):
        report = verify_certificate(model, setting, c)
        assert report.ok, report.failures
    # Points that are not the support, or a discrete coordinate cut into continuous cells.
    moved = (*cert.cell_lo[:3], np.array([3.0, 6.0]))
    report = verify_certificate(model, setting, dataclasses.replace(cert, cell_lo=moved))
    assert _failed(report) == {"grid"}
    assert "coordinate 3 (bidder 1, item 1)" in report.failures[0]
    continuous = dataclasses.replace(
        cert,
        cell_lo=(np.array([3.0, 5.0]), *cert.cell_lo[1:]),
        cell_hi=(np.array([5.0, 7.0]), *cert.cell_hi[1:]),
        discrete=(False, *cert.discrete[1:]),
    )
    assert "grid" in _failed(verify_certificate(model, setting, continuous))


def _bundle_at(name: str, price: float):
    """A constant menu: every element is (almost) the grand bundle at ``price``."""
    setting, model = get_setting(name), _model(name)
    model.weights[-1][...] = jnp.zeros_like(model.weights[-1][...])
    _set_head(model, logits=[8.0, 8.0], raw_price=np.log(np.expm1(price / model.price_scale)))
    return setting, model


@pytest.mark.parametrize(
    ("name", "price", "level", "inflation", "uncertified"),
    [
        # Bidder i can buy unless both its values lie in the lower cells; boxes where both can buy
        # (3 x 3 of 16) are uncertified. Inflating the lower cell [0, 0.5] by 0.4 of a cell lifts
        # its bundle value to 1.4 > 1: then all 16 are.
        ("additive_2x2_uniform", 1.0, 1, 1e-4, 9),
        ("additive_2x2_uniform", 1.0, 1, 0.4, 16),
        # Discrete values are points: (3, 3) is worth 6 < 8 however large the inflation.
        ("yao_2x2_discrete_37", 8.0, 0, 1e-4, 9),
        ("yao_2x2_discrete_37", 8.0, 0, 0.9, 9),
    ],
)
def test_box_inflation_widens_continuous_cells_only(name, price, level, inflation, uncertified):
    setting, model = _bundle_at(name, price)
    cert = _certificate(model, setting, level=level, single_cells=True, box_inflation=inflation)
    report = verify_certificate(model, setting, cert, max_failures=100)
    assert report.n_uncertified == uncertified
    low_cells = {
        b for b in range(16) for i in range(2) if not cert.box_lo[b, 2 * i : 2 * i + 2].any()
    }
    named = {int(f.split()[2]) for f in report.failures}
    assert named == (set(range(16)) - low_cells if uncertified == 9 else set(range(16)))


# --------------------------------------------------------------------------------------------------
# Incompatible menus and offsets.


@pytest.mark.parametrize("name", ["additive_2x2_uniform", "unit_2x2_uniform"])
def test_incompatible_menu_is_uncertified_and_the_box_is_named(name):
    setting, model = _item_1_cheap(name)
    report = verify_certificate(model, setting, _certificate(model, setting))
    assert not report.ok
    assert _failed(report) == {"compatibility"}
    assert report.n_uncertified == 1
    (message,) = report.failures
    assert message.startswith("[compatibility] box 0 ")
    assert "item 1 total" in message and "bidder 0:" in message and "bidder 1:" in message
    with pytest.raises(ValueError, match="item 1 total"):
        assert_certified(model, setting, _certificate(model, setting))
    fine = verify_certificate(
        model, setting, _certificate(model, setting, level=1, single_cells=True)
    )
    assert fine.n_uncertified == 16 and len(fine.failures) == 16


def _price_out_bidder_1(model, keys):
    k1 = model.menu_size + 1
    values = np.full((len(keys), k1), 100.0)
    values[:, -1] = 0.0
    return (np.zeros(0, np.int64), np.asarray(keys, np.int64)), (np.zeros((0, k1)), values)


@pytest.mark.parametrize("single_cells", [False, True])
def test_offsets_price_out_the_incompatible_elements(single_cells):
    setting, model = _item_1_cheap()
    keys, values = _price_out_bidder_1(model, [0, 1, 2, 3])  # every cell of b_-1 = (b_00, b_01)
    cert = _certificate(
        model, setting, level=1, single_cells=single_cells, offset_keys=keys, offset_values=values
    )
    report = verify_certificate(model, setting, cert)
    assert report.ok, report.failures
    # Without the offset on b_-1's cell 3 (= cells (1, 1) of bidder 0), the four boxes with
    # bidder 0 in that cell are uncertified (one box over everything: that box).
    keys, values = _price_out_bidder_1(model, [0, 1, 2])
    holed = dataclasses.replace(cert, offset_keys=keys, offset_values=values)
    report = verify_certificate(model, setting, holed, chunk=3)
    assert _failed(report) == {"compatibility"}
    if single_cells:
        assert report.n_uncertified == 4
        named = sorted(int(f.split()[2]) for f in report.failures)
        expected = [b for b in range(16) if cert.box_lo[b, 0] == 1 and cert.box_lo[b, 1] == 1]
        assert named == expected
    else:
        assert report.n_uncertified == 1


# --------------------------------------------------------------------------------------------------
# Tampering.


def _tampered(kind: str, setting, model, cert: Certificate):
    k1 = model.menu_size + 1
    if kind == "gap":
        return model, dataclasses.replace(cert, box_lo=cert.box_lo[1:], box_size=cert.box_size[1:])
    if kind == "overlap":
        return model, dataclasses.replace(
            cert,
            box_lo=np.concatenate([cert.box_lo, [[0, 0, 0, 0]]]),
            box_size=np.concatenate([cert.box_size, [[1, 2, 1, 1]]]),
        )
    if kind == "outside":
        size = cert.box_size.copy()
        size[-1, 0] = 2
        return model, dataclasses.replace(cert, box_size=size)
    if kind == "weight":
        w = model.weights[0]
        w[...] = w[...].at[0, 0, 0].add(1e-3)
        return model, cert
    if kind in ("negative offset", "null offset", "unsorted keys", "key out of range"):
        values = np.zeros((2, k1))
        keys = np.array([1, 2])
        if kind == "negative offset":
            values[1, 2] = -0.5
        elif kind == "null offset":
            values[0, -1] = 0.1
        elif kind == "unsorted keys":
            keys = np.array([2, 1])
        else:
            keys = np.array([1, 4])
        return model, dataclasses.replace(
            cert, offset_keys=(keys, np.zeros(0, np.int64)), offset_values=(values, values[:0])
        )
    if kind == "setting":
        return model, dataclasses.replace(cert, setting="unit_2x2_uniform")
    if kind == "grid short":
        hi = cert.cell_hi[0].copy()
        hi[-1] = 0.9
        return model, dataclasses.replace(cert, cell_hi=(hi, *cert.cell_hi[1:]))
    if kind == "grid unequal":
        lo, hi = cert.cell_lo[2].copy(), cert.cell_hi[2].copy()
        lo[1], hi[0] = 0.4, 0.4
        return model, dataclasses.replace(
            cert,
            cell_lo=(*cert.cell_lo[:2], lo, cert.cell_lo[3]),
            cell_hi=(*cert.cell_hi[:2], hi, cert.cell_hi[3]),
        )
    if kind == "tolerance":
        return model, dataclasses.replace(cert, utility_tolerance=float("nan"))
    if kind == "splits":
        return model, dataclasses.replace(cert, bound_splits=0)
    if kind == "many splits":
        return model, dataclasses.replace(cert, bound_splits=100)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "check", "words"),
    [
        ("gap", "tiling", "lo=[0, 0, 0, 0] size=[1, 1, 1, 1] are covered by no box (gap)"),
        ("overlap", "tiling", "both cover cells"),
        ("outside", "tiling", "outside the grid"),
        ("weight", "params_digest", "hash to"),
        ("negative offset", "offsets", "element 2: negative offset -0.5"),
        ("null offset", "offsets", "null element"),
        ("unsorted keys", "offsets", "not strictly increasing"),
        ("key out of range", "offsets", "key 4 (#1) outside [0, 4)"),
        ("setting", "setting", "'unit_2x2_uniform'"),
        ("grid short", "grid", "coordinate 0 (bidder 0, item 0): cell 1 of 2"),
        ("grid unequal", "grid", "coordinate 2 (bidder 1, item 0): cell 0 of 2 is [0.0, 0.4]"),
        ("tolerance", "tolerances", "utility_tolerance = nan"),
        ("splits", "tolerances", "bound_splits = 0 is not an integer >= 1"),
        ("many splits", "tolerances", "bound_splits = 100 gives 100^2 parts per box"),
    ],
)
def test_tampering_is_rejected(kind, check, words):
    setting, model = _expensive()
    cert = _certificate(model, setting, level=1, single_cells=True)
    assert verify_certificate(model, setting, cert).ok
    model, bad = _tampered(kind, setting, model, cert)
    report = verify_certificate(model, setting, bad)
    assert not report.ok
    failed = _failed(report)
    assert check in failed
    # Structural damage stops the compatibility check; otherwise only the named check fails.
    assert failed <= {check, "compatibility"}
    if kind not in ("outside", "unsorted keys", "key out of range"):
        assert failed == {check}
    assert any(words in f for f in report.failures), report.failures
    with pytest.raises(ValueError, match=check):
        assert_certified(model, setting, bad)


def _two_bidder_item0(half_gap: float):
    """Both bidders' only affordable element takes item 0 with probability 1/2 - half_gap."""
    setting, model = get_setting("additive_2x2_uniform"), _model("additive_2x2_uniform")
    model.weights[-1][...] = jnp.zeros_like(model.weights[-1][...])
    p = 0.5 - half_gap
    bias = np.array(model.biases[-1][...])
    bias[:, :8] = np.tile([np.log(p / (1 - p)), -30.0], 4)
    bias[:, 8:] = -20.0  # free
    model.biases[-1][...] = jnp.asarray(bias)
    return setting, model


def test_zero_tolerances_do_not_switch_the_slack_off():
    # Allocations sum to 1 - 4e-7: fine with no slack, over 1 with the minimum 1e-6 per bidder.
    setting, model = _two_bidder_item0(2e-7)
    cert = _certificate(model, setting, alloc_tolerance=0.0, utility_tolerance=0.0)
    report = verify_certificate(model, setting, cert)
    assert _failed(report) == {"compatibility"}
    assert "item 0" in report.failures[0]
    setting, model = _two_bidder_item0(2e-6)  # enough room for the slack
    assert verify_certificate(model, setting, _certificate(model, setting)).ok


@pytest.mark.parametrize("gap", [1e-7, 1.5e-6, 1e-3])
def test_saturated_allocation_next_to_the_null_element_is_certified(gap):
    # Bidder 0 buys item 0 with probability 1 - gap; bidder 1 can only take the null element,
    # which allocates exactly 0; the slack on bidder 0's bound stops at 1.
    setting, model = get_setting("additive_2x2_uniform"), _model("additive_2x2_uniform")
    model.weights[-1][...] = jnp.zeros_like(model.weights[-1][...])
    bias = np.array(model.biases[-1][...])
    bias[0, :8] = np.tile([np.log((1 - gap) / gap), -20.0], 4)
    bias[0, 8:] = -20.0  # free
    bias[1, 8:] = 50.0  # out of reach
    model.biases[-1][...] = jnp.asarray(bias)
    report = verify_certificate(model, setting, _certificate(model, setting))
    assert report.ok, report.failures


# --------------------------------------------------------------------------------------------------
# The interval bounds against the real module.


@pytest.mark.parametrize(
    "name",
    [
        "additive_2x2_uniform",
        "unit_2x2_uniform",
        "unit_1x2_uniform",
        "additive_1x2_uniform",
        "yao_2x2_discrete_37",
    ],
)
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_interval_bounds_contain_sampled_menus_and_are_tight(name, activation):
    setting = get_setting(name)
    config = GemNetConfig(menu_size=6, hidden=16, activation=activation)
    model = GemNet.for_setting(setting, config, rngs=nnx.Rngs(3))
    net = _MenuBounds(model, setting)
    n, m = setting.n_bidders, setting.n_items
    low, high = np.asarray(setting.low, np.float64), np.asarray(setting.high, np.float64)
    rng = np.random.default_rng(0)
    boxes = 24
    corner_a = low + (high - low) * rng.uniform(size=(boxes, n, m))
    corner_b = np.clip(corner_a + 0.15 * (high - low) * rng.uniform(size=(boxes, n, m)), low, high)
    for i in range(n):
        others = [b for b in range(n) if b != i]
        box_lo = corner_a[:, others].reshape(boxes, -1)
        box_hi = corner_b[:, others].reshape(boxes, -1)
        a_lo, a_hi, p_lo, p_hi = net.bounds(i, box_lo, box_hi)
        assert a_lo.shape == (boxes, 6, m) and p_lo.shape == (boxes, 6)
        for _ in range(6):
            bids = corner_a + (corner_b - corner_a) * rng.uniform(size=corner_a.shape)
            menus = model.menus(jnp.asarray(bids, jnp.float32))
            alloc = np.asarray(menus.alloc[:, i, :-1], np.float64)
            price = np.asarray(menus.price[:, i, :-1], np.float64)
            assert np.all(a_lo <= alloc + 1e-6) and np.all(alloc <= a_hi + 1e-6)
            assert np.all(p_lo <= price + 1e-5) and np.all(price <= p_hi + 1e-5)
        # Splitting the box into parts only tightens the bounds, and still contains the samples.
        split = net.split_bounds(i, box_lo, box_hi, 3)
        for whole, part, sign in zip((a_lo, a_hi, p_lo, p_hi), split, (1, -1, 1, -1), strict=True):
            assert np.all(sign * (part - whole) >= -1e-12)
        if n > 1:
            assert np.mean(split[1] - split[0]) < np.mean(a_hi - a_lo)
        for _ in range(3):
            bids = corner_a + (corner_b - corner_a) * rng.uniform(size=corner_a.shape)
            menus = model.menus(jnp.asarray(bids, jnp.float32))
            alloc = np.asarray(menus.alloc[:, i, :-1], np.float64)
            assert np.all(split[0] <= alloc + 1e-6) and np.all(alloc <= split[1] + 1e-6)
        # Not vacuous: on a point the bounds collapse onto the forward pass.
        point = jnp.asarray(corner_a, jnp.float32)
        menus = model.menus(point)
        flat = np.asarray(point, np.float64)[:, others].reshape(boxes, -1)
        a_lo, a_hi, p_lo, p_hi = net.bounds(i, flat, flat)
        for bound in (a_lo, a_hi):
            np.testing.assert_allclose(bound, np.asarray(menus.alloc[:, i, :-1]), atol=2e-6)
        for bound in (p_lo, p_hi):
            np.testing.assert_allclose(bound, np.asarray(menus.price[:, i, :-1]), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Tiling and offset ranges against brute force.


def _dense_tiled(box_lo, box_size, cells) -> bool:
    count = np.zeros(cells, np.int64)
    for lo, size in zip(box_lo, box_size, strict=True):
        count[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] += 1
    return bool(np.all(count == 1))


def _random_tiling(rng, cells):
    """Recursive guillotine cuts at random positions (boxes of any size, not dyadic)."""
    out, todo = [], [(np.zeros(len(cells), np.int64), np.asarray(cells, np.int64))]
    while todo:
        lo, size = todo.pop()
        if rng.uniform() < 0.25 or np.all(size == 1):
            out.append((lo, size))
            continue
        d = rng.choice(np.flatnonzero(size > 1))
        cut = rng.integers(1, size[d])
        left, right = size.copy(), size.copy()
        left[d], right[d] = cut, size[d] - cut
        lo2 = lo.copy()
        lo2[d] += cut
        todo += [(lo, left), (lo2, right)]
    return np.array([b[0] for b in out]), np.array([b[1] for b in out])


def test_tiling_check_agrees_with_dense_counting():
    rng = np.random.default_rng(1)
    cells = [5, 4, 3]
    verdicts = set()
    for _ in range(60):
        lo, size = _random_tiling(rng, cells)
        assert _tiling_failures(lo, size, cells, 5) == []
        # Damage: drop, grow, shift or duplicate a box (staying inside the grid).
        b = rng.integers(len(lo))
        kind = rng.integers(4)
        lo2, size2 = lo.copy(), size.copy()
        if kind == 0:
            lo2, size2 = np.delete(lo2, b, 0), np.delete(size2, b, 0)
        elif kind == 1:
            d = rng.integers(3)
            size2[b, d] = min(size2[b, d] + 1, cells[d] - lo2[b, d])
        elif kind == 2:
            d = rng.integers(3)
            lo2[b, d] = max(lo2[b, d] - 1, 0)
        else:
            lo2, size2 = np.concatenate([lo2, lo2[b : b + 1]]), np.concatenate([size2, [[1] * 3]])
        if _boxes_outside(lo2, size2, cells, 5):
            continue
        expected = _dense_tiled(lo2, size2, cells)
        verdicts.add(expected)
        assert (_tiling_failures(lo2, size2, cells, 5) == []) == expected
    assert verdicts == {True, False}


def test_tiling_check_handles_a_pinwheel_and_a_huge_grid():
    # Five boxes of a 3 x 3 grid that no straight cut separates.
    lo = np.array([[0, 0], [2, 0], [1, 2], [0, 1], [1, 1]])
    size = np.array([[2, 1], [1, 2], [2, 1], [1, 2], [1, 1]])
    assert _tiling_failures(lo, size, [3, 3], 5) == []
    assert "gap" in _tiling_failures(lo[:4], size[:4], [3, 3], 5)[0]
    # 2^36 cells: eight octants tile it; shrinking one leaves a named gap.
    cells = [2**12] * 3
    half = 2**11
    lo = np.array(list(itertools.product([0, half], repeat=3)), np.int64)
    size = np.full_like(lo, half)
    assert _tiling_failures(lo, size, cells, 5) == []
    size[7, 2] -= 1
    (message,) = _tiling_failures(lo, size, cells, 5)
    assert message == "cells lo=[2048, 2048, 4095] size=[2048, 2048, 1] are covered by no box (gap)"


@pytest.mark.parametrize("dense", [True, False])
def test_offset_ranges_agree_with_brute_force(dense, monkeypatch):
    if not dense:
        monkeypatch.setattr("gemnet.verify._DENSE_OFFSET_ENTRIES", 0)
    rng = np.random.default_rng(2)
    cells = [4, 3, 5]
    total = 60
    keys = np.sort(rng.choice(total, 25, replace=False))
    values = rng.uniform(0.5, 2.0, (25, 3))
    table = _OffsetTable(keys, values, cells)
    assert (table.prefix is not None) == dense
    lo = np.stack([rng.integers(0, c, 300) for c in cells], 1)
    size = np.stack([rng.integers(1, c - lo[:, t] + 1) for t, c in enumerate(cells)], 1)
    off_lo, off_hi = table.ranges(lo, size)
    lookup = {int(k): v for k, v in zip(keys, values, strict=True)}
    for b in range(len(lo)):
        covered = [
            lookup.get(int(np.ravel_multi_index(q, cells)), np.zeros(3))
            for q in itertools.product(
                *(range(a, a + s) for a, s in zip(lo[b], size[b], strict=True))
            )
        ]
        np.testing.assert_array_equal(off_lo[b], np.min(covered, 0))
        np.testing.assert_array_equal(off_hi[b], np.max(covered, 0))
    # A box exactly over two keyed cells has no zero in its range.
    full = _OffsetTable(np.array([0, 1]), np.array([[1.0, 0.0], [3.0, 0.0]]), [2, 2])
    got_lo, got_hi = full.ranges(np.array([[0, 0]]), np.array([[1, 2]]))
    assert got_lo.tolist() == [[1.0, 0.0]] and got_hi.tolist() == [[3.0, 0.0]]


def test_builder_certificate_verifies_and_needs_its_offsets(repaired_2x2):
    setting, model, _, cert = repaired_2x2  # the default repair: quantized menus
    assert cert.quantized
    report = verify_certificate(model, setting, cert)
    assert report.ok, report.failures
    assert report.n_boxes == cert.n_boxes and sum(len(k) for k in cert.offset_keys) > 0
    # The trained menus over-allocate somewhere: without the repair's offsets some box fails.
    bare = dataclasses.replace(
        cert,
        offset_keys=tuple(k[:0] for k in cert.offset_keys),
        offset_values=tuple(v[:0] for v in cert.offset_values),
    )
    report = verify_certificate(model, setting, bare)
    assert _failed(report) == {"compatibility"} and report.n_uncertified > 0


# --------------------------------------------------------------------------------------------------
# Relational certificates (two bidders): the Jacobian enclosure and the witnesses.


@pytest.mark.parametrize("clip, activation", [(0.0, "tanh"), (0.1, "tanh"), (0.1, "relu")])
def test_verifier_jacobian_encloses_sampled_jacobians_and_matches_the_builder(clip, activation):
    import jax

    from gemnet.model import menu_jacobians, others_bids

    setting = get_setting("additive_2x2_uniform")
    config = GemNetConfig(
        menu_size=6, hidden=16, alloc_clip=clip, init_logit_scale=4.0, activation=activation
    )
    model = GemNet.for_setting(setting, config, rngs=nnx.Rngs(7))
    net = _MenuBounds(model, setting)
    rng = np.random.default_rng(1)
    lo = rng.uniform(0.0, 0.8, (24, 2, 2))
    hi = lo + rng.uniform(0.0, 0.2, (24, 2, 2))

    def menus(b):
        out = model.menus(b)
        return out.alloc, out.price

    builder = menu_jacobians(model, others_bids(jnp.asarray(lo)), others_bids(jnp.asarray(hi)))
    for i in range(2):
        other = 1 - i
        alloc, price, d_a, d_p, r_a, r_p = net.jacobian(i, lo[:, other], hi[:, other], 2)
        np.testing.assert_allclose(alloc, builder.alloc[:, i, :-1], atol=1e-6)
        np.testing.assert_allclose(price, builder.price[:, i, :-1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(d_p, builder.d_price[:, i, :-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(d_a, builder.d_alloc[:, i, :-1], rtol=1e-4, atol=1e-5)
        for _ in range(5):
            bids = jnp.asarray(lo + (hi - lo) * rng.uniform(size=lo.shape), jnp.float32)
            ja, jp = jax.vmap(jax.jacfwd(menus))(bids)
            assert np.all(np.abs(ja[:, i, :-1, :, other] - d_a) <= r_a + 1e-5)
            assert np.all(np.abs(jp[:, i, :-1, other] - d_p) <= r_p + 1e-5)


def test_relational_witnesses_are_checked(repaired_2x2_continuous):
    setting, model, _, cert = repaired_2x2_continuous
    boxes = np.unique(cert.witness_index[:, 0])
    assert len(boxes) > 0 and cert.stats["relational_boxes"] == len(boxes)
    assert verify_certificate(model, setting, cert).ok
    # without its witnesses each relational box is uncertified (its candidate sets conflict)
    bare = dataclasses.replace(
        cert, witness_index=cert.witness_index[:0], witness_t=cert.witness_t[:0]
    )
    report = verify_certificate(model, setting, bare)
    assert _failed(report) == {"compatibility"} and report.n_uncertified == len(boxes)
    # a witness whose other element is the conflicting one itself proves nothing
    same = cert.witness_index.copy()
    same[:, 3] = same[:, 1]
    same[:, 4] = same[:, 2]
    report = verify_certificate(model, setting, dataclasses.replace(cert, witness_index=same))
    assert not report.ok and report.n_uncertified > 0
    # nor does a negative or non-finite multiplier
    for t in (-1.0, np.nan):
        bad_t = np.full_like(cert.witness_t, t)
        report = verify_certificate(model, setting, dataclasses.replace(cert, witness_t=bad_t))
        assert not report.ok


def test_repair_without_the_relational_test_certifies_box_by_box(tiny_2x2):
    from gemnet import RepairConfig, repair

    setting, model = tiny_2x2
    _, cert = repair(
        model,
        setting,
        RepairConfig(max_level=3, workers=1, progress=False, relational=False, quantize=False),
    )
    assert len(cert.witness_t) == 0 and cert.stats["relational_boxes"] == 0
    assert verify_certificate(model, setting, cert).ok


# --------------------------------------------------------------------------------------------------
# Quantized menus (the default repair): menus at cell centres, envelopes over a box's cells.


def test_quantized_menus_depend_on_the_cell_of_the_others_bids_only(repaired_2x2):
    _, _, repaired, cert = repaired_2x2
    assert cert.quantized and repaired.quantized
    cells = len(cert.cell_lo[0])
    rng = np.random.default_rng(0)
    bids = rng.uniform(size=(256, 2, 2))
    # move every bid within its own cell: the menus (offsets included) do not change at all
    cell = np.floor(bids * cells)
    moved = (cell + rng.uniform(0.01, 0.99, size=bids.shape)) / cells
    a = repaired.menus(jnp.asarray(bids, jnp.float32))
    b = repaired.menus(jnp.asarray(moved, jnp.float32))
    np.testing.assert_array_equal(np.asarray(a.alloc), np.asarray(b.alloc))
    np.testing.assert_array_equal(np.asarray(a.price), np.asarray(b.price))


def test_quantized_certificate_roundtrips_its_flag(tmp_path, repaired_2x2):
    from gemnet import load_certificate, save_certificate

    setting, model, _, cert = repaired_2x2
    loaded = load_certificate(save_certificate(cert, tmp_path / "cert"))
    assert loaded.quantized and verify_certificate(model, setting, loaded).ok


def test_pairwise_candidates_hold_every_sampled_choice_and_are_fewer(tiny_2x2):
    """The pairwise test drops elements, never one that a profile in the box picks."""
    setting, model = tiny_2x2
    level, n, m = 2, setting.n_bidders, setting.n_items
    cert = _certificate(model, setting, level=level, single_cells=True, quantized=True)
    comp = _Compatibility(
        model,
        setting,
        cert,
        utility_tolerance=1e-5,
        alloc_tolerance=1e-6,
        box_inflation=1e-4,
        bound_splits=1,
    )
    lo, size = np.asarray(cert.box_lo), np.asarray(cert.box_size)
    rng = np.random.default_rng(0)
    values = (lo[None] + rng.uniform(size=(64, *lo.shape))) / 2**level  # [samples, boxes, D]
    centres = np.broadcast_to((lo + 0.5) / 2**level, values.shape)
    menus = model.menus(jnp.asarray(centres.reshape(-1, n, m), jnp.float32))
    picked = np.asarray(choose(menus, jnp.asarray(values.reshape(-1, n, m), jnp.float32)).index)
    picked = picked.reshape(64, len(lo), n)
    fewer = 0
    for i in range(n):
        own = list(range(i * m, (i + 1) * m))
        v_lo, v_hi = comp.extent(lo[:, own], size[:, own], own)
        interval = comp.usage(i, lo, size, v_lo, v_hi)
        pairwise = comp.usage(i, lo, size, v_lo, v_hi, pairwise=True)
        assert np.all(interval.cand | ~pairwise.cand) and np.all(interval.use >= pairwise.use)
        cand = np.concatenate([pairwise.cand, pairwise.cand_null[:, None]], 1)
        assert np.all(np.take_along_axis(cand, picked[:, :, i].T, 1))
        fewer += int(interval.cand.sum() - pairwise.cand.sum())
    assert fewer > 0


# --------------------------------------------------------------------------------------------------
# Interpolated menus: multilinear between the cells' corners, relational witnesses per cell.


def test_interpolated_certificate_roundtrips_and_its_witnesses_are_checked(
    tmp_path, repaired_2x2_interpolated
):
    setting, model, _, cert = repaired_2x2_interpolated
    loaded = load_certificate(save_certificate(cert, tmp_path / "cert"))
    assert loaded.interpolated and verify_certificate(model, setting, loaded).ok
    boxes = np.unique(cert.witness_index[:, 0])
    assert len(boxes) > 0 and cert.stats["relational_boxes"] == len(boxes)
    # without its witnesses each relational box is uncertified
    bare = dataclasses.replace(
        cert, witness_index=cert.witness_index[:0], witness_t=cert.witness_t[:0]
    )
    report = verify_certificate(model, setting, bare)
    assert _failed(report) == {"compatibility"} and report.n_uncertified == len(boxes)
    # the same witnesses say nothing about menus taken at the cells' centres
    centres = dataclasses.replace(cert, interpolated=False)
    assert not verify_certificate(model, setting, centres).ok
    # interpolation is only defined for quantized menus
    report = verify_certificate(model, setting, dataclasses.replace(cert, quantized=False))
    assert "compatibility" in _failed(report)


def test_interpolated_offsets_are_needed(repaired_2x2_interpolated):
    setting, model, _, cert = repaired_2x2_interpolated
    assert sum(len(k) for k in cert.offset_keys) > 0
    zero = tuple(np.zeros_like(v) for v in cert.offset_values)
    report = verify_certificate(model, setting, dataclasses.replace(cert, offset_values=zero))
    assert not report.ok and report.n_uncertified > 0
