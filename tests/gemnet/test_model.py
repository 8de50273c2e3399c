import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffecon import check_mechanism, get_setting
from diffecon.baselines import itemwise_myerson
from gemnet import GemNet, GemNetConfig, choose, menu_bounds, menu_utilities
from gemnet.model import TIE_MARGIN, _monotone_over_subsets, menu_jacobians, others_bids

SMALL = GemNetConfig(menu_size=6, hidden=16)
RELU = GemNetConfig(menu_size=6, hidden=16, alloc_clip=0.1, activation="relu")


def _model(name, seed=0, config=SMALL):
    return GemNet.for_setting(get_setting(name), config, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize(
    "name", ["additive_2x2_uniform", "unit_2x2_uniform", "additive_3x3_uniform"]
)
def test_menu_is_bit_identical_when_own_bid_changes(name):
    setting = get_setting(name)
    model = _model(name)
    bids = setting.sample(jax.random.key(1), (64,))
    menus = jax.jit(lambda b: model.menus(b))
    base = menus(bids)
    for i in range(setting.n_bidders):
        moved = bids.at[:, i].set(setting.sample(jax.random.key(2 + i), (64,))[:, i])
        other = menus(moved)
        np.testing.assert_array_equal(np.asarray(other.alloc[:, i]), np.asarray(base.alloc[:, i]))
        np.testing.assert_array_equal(np.asarray(other.price[:, i]), np.asarray(base.price[:, i]))
        # ...while the others' menus do react to bidder i's bid.
        j = (i + 1) % setting.n_bidders
        assert not np.array_equal(np.asarray(other.price[:, j]), np.asarray(base.price[:, j]))


def test_one_bidder_is_rochetnet_with_a_constant_menu():
    setting = get_setting("additive_1x2_uniform")
    model = _model("additive_1x2_uniform")
    menus = model.menus(setting.sample(jax.random.key(0), (5,)))
    np.testing.assert_array_equal(np.asarray(menus.price[0]), np.asarray(menus.price[4]))
    check_mechanism(model, setting)  # raises on failure; one bidder never over-allocates


def test_null_element_and_individual_rationality():
    setting = get_setting("additive_2x2_uniform")
    model = _model("additive_2x2_uniform")
    bids = setting.sample(jax.random.key(3), (256,))
    menus = model.menus(bids)
    assert menus.alloc.shape == (256, 2, 7, 2) and menus.price.shape == (256, 2, 7)
    np.testing.assert_array_equal(np.asarray(menus.alloc[..., -1, :]), 0.0)
    np.testing.assert_array_equal(np.asarray(menus.price[..., -1]), 0.0)
    assert float(jnp.min(menus.price)) >= 0.0
    out = model(bids)
    utility = jnp.sum(bids * out.alloc, -1) - out.pay
    assert float(jnp.min(utility)) >= -1e-6
    chosen = choose(menus, bids).index
    best = jnp.max(menu_utilities(menus, bids), -1)
    picked = jnp.take_along_axis(menu_utilities(menus, bids), chosen[..., None], -1)[..., 0]
    np.testing.assert_array_equal(np.asarray(best), np.asarray(picked))


def test_soft_choice_tends_to_the_hard_choice():
    setting = get_setting("additive_2x2_uniform")
    model = _model("additive_2x2_uniform")
    bids = setting.sample(jax.random.key(4), (128,))
    hard = model(bids)
    soft = model.soft_outcome(bids, kappa=1e6)
    np.testing.assert_allclose(np.asarray(soft.pay), np.asarray(hard.pay), atol=1e-3)
    cool = model.soft_outcome(bids, kappa=1.0)
    assert not np.allclose(np.asarray(cool.pay), np.asarray(hard.pay), atol=1e-3)


CLIPPED = GemNetConfig(menu_size=6, hidden=16, alloc_clip=0.2, init_logit_scale=4.0)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("additive_2x2_uniform", SMALL),
        ("unit_2x2_uniform", SMALL),
        ("unit_1x2_uniform", SMALL),
        ("additive_2x2_uniform", CLIPPED),
        ("additive_2x2_uniform", RELU),
        ("unit_2x2_uniform", RELU),
    ],
)
def test_interval_bounds_contain_sampled_menus(name, config):
    setting = get_setting(name)
    model = _model(name, seed=5, config=config)
    n = setting.n_bidders
    key = jax.random.key(6)
    centre = setting.sample(key, (32,))
    width = 0.1
    lo = jnp.clip(centre - width, 0.0, 1.0)
    hi = jnp.clip(centre + width, 0.0, 1.0)
    bounds = menu_bounds(model, others_bids(lo), others_bids(hi))
    for i in range(n):
        for s in range(20):
            u = jax.random.uniform(jax.random.key(100 + s), centre.shape)
            menus = model.menus(lo + u * (hi - lo))
            assert bool(jnp.all(bounds.alloc[0][:, i] <= menus.alloc[:, i] + 1e-6))
            assert bool(jnp.all(bounds.alloc[1][:, i] >= menus.alloc[:, i] - 1e-6))
            assert bool(jnp.all(bounds.price[0][:, i] <= menus.price[:, i] + 1e-5))
            assert bool(jnp.all(bounds.price[1][:, i] >= menus.price[:, i] - 1e-5))
        # Bounds are not vacuous: the allocation interval is narrower than [0, 1].
        assert float(jnp.mean(bounds.alloc[1] - bounds.alloc[0])) < 0.5


def test_bad_settings_and_bids_are_rejected():
    with pytest.raises(ValueError, match="bounded"):
        GemNet.for_setting(get_setting("exponential_3x1"), SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="combinatorial"):
        GemNet.for_setting(get_setting("CA_sym_uniform_12"), SMALL, rngs=nnx.Rngs(0))
    model = _model("additive_2x2_uniform")
    with pytest.raises(ValueError):
        model(jnp.ones((4, 3, 2)))
    with pytest.raises(ValueError, match="NaN"):
        model(jnp.full((4, 2, 2), jnp.nan))


def test_clipped_allocations_reach_exact_zero_and_one():
    model = _model("additive_2x2_uniform", seed=3, config=CLIPPED)
    bids = get_setting("additive_2x2_uniform").sample(jax.random.key(0), (256,))
    alloc = np.asarray(model.menus(bids).alloc[..., :-1, :])
    assert alloc.min() == 0.0 and alloc.max() == 1.0  # the sigmoid alone never gets there
    assert np.all((alloc >= 0.0) & (alloc <= 1.0))
    # Upper bounds are exactly 0 only with a margin; the rest are positive (they take the slack).
    others = others_bids(bids)
    upper = np.asarray(menu_bounds(model, others, others).alloc[1][..., :-1, :])
    assert np.all(upper >= alloc) and np.any(upper == 0.0) and np.all(upper[alloc > 0] > 0)
    with pytest.raises(ValueError, match="alloc_clip"):
        _model("additive_2x2_uniform", config=GemNetConfig(alloc_clip=1.5))


def test_relu_menus_are_piecewise_linear_in_the_others_bids():
    model = _model("additive_2x2_uniform", seed=2, config=RELU)
    with pytest.raises(ValueError, match="activation"):
        _model("additive_2x2_uniform", config=GemNetConfig(activation="sigmoid"))
    # Raw outputs along a segment of b_-i: second differences vanish except at a few kinks.
    t = jnp.linspace(0.0, 1.0, 2001)[:, None, None]
    start, end = jnp.array([-1.0, 0.5]), jnp.array([1.0, -0.5])  # crosses every unit's kink
    x = jnp.broadcast_to(start + t * (end - start), (2001, 2, 2))
    out = np.asarray(model.raw_outputs(x), np.float64)
    second = np.abs(out[2:] - 2 * out[1:-1] + out[:-2]).max(axis=(1, 2))
    assert np.mean(second < 1e-5) > 0.95 and second.max() > 1e-4  # linear pieces, real kinks


def _sampled_jacobians(model, bids):
    """``(d_alloc [B, n, K+1, m, in], d_price [B, n, K+1, in])`` of each bidder's menu w.r.t.
    its own input ``b_-i`` (two bidders), by forward-mode autodiff of ``model.menus``."""

    def menus(b):
        out = model.menus(b)
        return out.alloc, out.price

    ja, jp = jax.vmap(jax.jacfwd(menus))(bids)  # [B, n, K+1, m, n, m], [B, n, K+1, n, m]
    d_alloc = jnp.stack([ja[:, 0, :, :, 1], ja[:, 1, :, :, 0]], 1)
    d_price = jnp.stack([jp[:, 0, :, 1], jp[:, 1, :, 0]], 1)
    return d_alloc, d_price


@pytest.mark.parametrize(
    "clip, splits, activation",
    [(0.0, 1, "tanh"), (0.1, 1, "tanh"), (0.1, 3, "tanh"), (0.1, 1, "relu"), (0.1, 3, "relu")],
)
def test_menu_jacobians_enclose_sampled_jacobians(clip, splits, activation):
    setting = get_setting("additive_2x2_uniform")
    config = GemNetConfig(
        menu_size=6, hidden=16, alloc_clip=clip, init_logit_scale=4.0, activation=activation
    )
    model = GemNet.for_setting(setting, config, rngs=nnx.Rngs(5))
    lo = jax.random.uniform(jax.random.key(0), (32, 2, 2)) * 0.8
    hi = lo + jax.random.uniform(jax.random.key(1), (32, 2, 2)) * 0.2
    mj = menu_jacobians(model, others_bids(lo), others_bids(hi), splits=splits)
    assert mj.d_alloc.shape == (32, 2, 7, 2, 2) and mj.r_price.shape == (32, 2, 7, 2)
    # the centre's menu is the forward pass there
    centre = model.menus((lo + hi) / 2)
    np.testing.assert_allclose(mj.alloc, centre.alloc, atol=1e-6)
    np.testing.assert_allclose(mj.price, centre.price, rtol=1e-6, atol=1e-6)
    for t in range(6):
        u = jax.random.uniform(jax.random.key(10 + t), lo.shape)
        d_alloc, d_price = _sampled_jacobians(model, lo + (hi - lo) * u)
        assert np.all(np.abs(d_alloc - mj.d_alloc) <= mj.r_alloc + 1e-5)
        assert np.all(np.abs(d_price - mj.d_price) <= mj.r_price + 1e-5)
    # not vacuous: at a point the enclosure is the exact Jacobian
    point = menu_jacobians(model, others_bids(lo), others_bids(lo))
    d_alloc, d_price = _sampled_jacobians(model, lo)
    np.testing.assert_allclose(point.d_price, d_price, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(point.d_alloc, d_alloc, rtol=1e-4, atol=1e-5)
    assert float(jnp.max(point.r_price)) < 1e-5
    assert float(jnp.mean(mj.r_price)) > 0.0
    if splits > 1:  # parts only tighten the enclosure
        whole = menu_jacobians(model, others_bids(lo), others_bids(hi))
        assert np.all(mj.r_price <= whole.r_price + 1e-6)
        assert float(jnp.mean(mj.r_price)) < float(jnp.mean(whole.r_price))


def test_menu_jacobians_reject_what_they_do_not_cover():
    unit = GemNet.for_setting(get_setting("unit_2x2_uniform"), rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 2, 2))
    with pytest.raises(NotImplementedError, match="additive"):
        menu_jacobians(unit, x, x)
    one = GemNet.for_setting(get_setting("additive_1x2_uniform"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="two or more bidders"):
        menu_jacobians(one, jnp.ones((1, 1, 1)), jnp.ones((1, 1, 1)))


ITEM_PRICES = GemNetConfig(menu_size=6, hidden=16, item_prices=True)


def _as_itemwise_myerson(model: GemNet) -> GemNet:
    """The model with its learned elements priced out and every reserve at half the item's top
    value: item-wise Myerson on U[0, 1] values."""
    k, m = model.menu_size, model.n_items
    w, b = model.weights[-1][...], model.biases[-1][...]
    n_alloc = k * m
    b = b.at[:, n_alloc : n_alloc + k].set(100.0)  # learned prices ~ 100 * price scale
    b = b.at[:, n_alloc + k :].set(0.0)  # sigmoid(0) = 1/2 of the item's top value
    model.weights[-1][...] = w.at[..., n_alloc + k :].set(0.0)
    model.biases[-1][...] = b
    return model


@pytest.mark.parametrize("name", ["additive_2x3_uniform", "additive_3x3_uniform"])
def test_item_price_bundles_at_half_are_itemwise_myerson(name):
    setting = get_setting(name)
    model = _as_itemwise_myerson(_model(name, config=ITEM_PRICES))
    assert model.n_elements == 6 + 2**setting.n_items - 1 + 1
    bids = setting.sample(jax.random.key(3), (4096,))
    got, want = model(bids), itemwise_myerson(setting)(bids)
    # the same outcome except where the top two bids are within the tie margin of each other
    top2 = jnp.sort(bids, axis=-2)[..., -2:, :]
    clear = (top2[..., 1, :] - top2[..., 0, :] > 2 * TIE_MARGIN)[..., None, :]  # [B, 1, m]
    assert float(jnp.mean(clear)) > 0.99
    np.testing.assert_array_equal(
        np.asarray(jnp.where(clear, got.alloc, 0)), np.asarray(jnp.where(clear, want.alloc, 0))
    )
    pay_gap = jnp.abs(got.pay - want.pay)
    assert float(jnp.max(jnp.where(jnp.all(clear, -1), pay_gap, 0.0))) < 1e-6 + 3 * TIE_MARGIN


def test_item_price_bundles_are_priced_at_the_highest_other_bid_or_the_reserve():
    setting = get_setting("additive_3x3_uniform")
    model = _model("additive_3x3_uniform", seed=2, config=ITEM_PRICES)
    bids = setting.sample(jax.random.key(4), (256,))
    menus = model.menus(bids)
    n, m, k = setting.n_bidders, setting.n_items, model.menu_size
    # single-item bundles sit at K + 2^j - 1; their price is q_ij
    q = menus.price[..., [k + 2**j - 1 for j in range(m)]]  # [B, n, m]
    highest_other = jnp.max(others_bids(bids).reshape(-1, n, n - 1, m), axis=-2)
    assert bool(jnp.all(q >= highest_other))
    # where the highest other bid is not the price, a reserve in (0, 1) is
    reserve = q < highest_other + 1e-7
    assert bool(jnp.any(~reserve)) and bool(jnp.all((q > 0) & (q < 1)))
    # bundles are priced additively
    grand = menus.price[..., k + 2**m - 2]
    np.testing.assert_allclose(np.asarray(grand), np.asarray(jnp.sum(q, -1)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(menus.alloc[..., k + 2**m - 2, :]), 1.0)


@pytest.mark.parametrize("name", ["additive_3x3_uniform", "unit_2x2_uniform"])
def test_item_price_bundles_never_over_allocate(name):
    """Learned elements priced out: bidders buy through the item prices only, and two bidders
    never both beat each other's bid on an item."""
    setting = get_setting(name)
    model = _model(name, seed=1, config=ITEM_PRICES)
    k, width = model.menu_size, setting.n_items + (setting.valuation == "unit_demand")
    model.biases[-1][...] = model.biases[-1][...].at[:, k * width : k * width + k].set(100.0)
    bids = setting.sample(jax.random.key(5), (4096,))
    # ties on the support's edge, and within float32 rounding of each other
    bids = bids.at[:64].set(1.0).at[64:128, :, 0].set(0.75)
    bids = bids.at[128:192, 0, 0].set(jnp.nextafter(bids[128:192, 1, 0], 2.0))
    out = model(bids)
    assert float(jnp.max(jnp.sum(out.alloc, axis=-2))) <= 1.0
    assert float(jnp.mean(jnp.sum(out.alloc, axis=(-2, -1)))) > 0.2  # items are sold
    check_mechanism(model, setting)


def test_item_price_menus_are_strategy_proof_and_checked():
    setting = get_setting("additive_3x3_uniform")
    model = _model("additive_3x3_uniform", config=ITEM_PRICES)
    bids = setting.sample(jax.random.key(1), (64,))
    base = model.menus(bids)
    moved = bids.at[:, 0].set(setting.sample(jax.random.key(9), (64,))[:, 0])
    other = model.menus(moved)
    np.testing.assert_array_equal(np.asarray(other.price[:, 0]), np.asarray(base.price[:, 0]))
    assert not np.array_equal(np.asarray(other.price[:, 1]), np.asarray(base.price[:, 1]))
    lo = others_bids(bids)
    with pytest.raises(NotImplementedError, match="item_prices"):
        menu_bounds(model, lo, lo)
    with pytest.raises(NotImplementedError, match="item_prices"):
        menu_jacobians(model, lo, lo)
    with pytest.raises(ValueError, match="more than 12"):
        GemNet(
            n_bidders=2,
            n_items=13,
            low=np.zeros((2, 13)),
            high=np.ones((2, 13)),
            config=ITEM_PRICES,
            rngs=nnx.Rngs(0),
        )


ENTRY_FEE = GemNetConfig(menu_size=0, hidden=16, item_prices=True, fees="entry")


def _spread_item_outputs(model: GemNet, scale: float) -> GemNet:
    """Larger last-layer weights: reserves and fees that vary widely with ``b_-i``."""
    model.weights[-1][...] = scale * model.weights[-1][...]
    return model


def test_monotone_over_subsets_is_the_running_maximum():
    fee = jax.random.uniform(jax.random.key(0), (5, 15))  # 4 items
    got = np.asarray(_monotone_over_subsets(fee, 4))
    f = np.concatenate([np.zeros((5, 1)), np.asarray(fee)], axis=-1)
    for c in range(1, 16):
        subsets = [t for t in range(1, 16) if t & c == t]
        np.testing.assert_array_equal(got[:, c - 1], f[:, subsets].max(-1))


@pytest.mark.parametrize(
    ("name", "fees"),
    [("additive_3x3_uniform", "entry"), ("additive_2x3_uniform", "bundle")],
)
def test_fees_keep_item_prices_marginal_and_never_over_allocate(name, fees):
    setting = get_setting(name)
    config = dataclasses.replace(ENTRY_FEE, fees=fees)
    model = _spread_item_outputs(_model(name, seed=3, config=config), 4.0)
    n, m = setting.n_bidders, setting.n_items
    assert model.compatible_by_construction and model.n_elements == 2**m
    bids = setting.sample(jax.random.key(6), (4096,))
    bids = bids.at[:64].set(1.0).at[64:128, :, 0].set(0.5)  # ties
    bids = bids.at[128:192, 0, 0].set(jnp.nextafter(bids[128:192, 1, 0], 2.0))
    menus = model.menus(bids)
    # bundle code c sits at row c - 1 (the null element, code 0, is last); adding item j to a
    # bundle costs at least the highest other bid on j
    price = jnp.concatenate([menus.price[..., -1:], menus.price[..., :-1]], axis=-1)
    highest_other = jnp.max(others_bids(bids).reshape(-1, n, n - 1, m), axis=-2)
    for c in range(1, 2**m):
        for j in range(m):
            if c >> j & 1:
                marginal = price[..., c] - price[..., c ^ (1 << j)]
                assert bool(jnp.all(marginal >= highest_other[..., j] - 1e-6))
    assert bool(jnp.all(menus.price[..., :-1] > 0))
    if fees == "entry":  # one fee: the grand bundle costs the items' prices plus the same fee
        single = price[..., [1 << j for j in range(m)]]
        f = (jnp.sum(single, -1) - price[..., 2**m - 1]) / (m - 1)
        assert bool(jnp.all(f > 0)) and float(jnp.std(f)) > 1e-3
    out = model(bids)
    assert float(jnp.max(jnp.sum(out.alloc, axis=-2))) <= 1.0
    assert float(jnp.mean(jnp.sum(out.alloc, axis=(-2, -1)))) > 0.05  # items are sold
    if fees == "bundle":  # the conformance checker once (it is the slow part)
        check_mechanism(model, setting)


def test_entry_fee_binds():
    """A bidder who enters buys exactly the items it values above their prices, and some bidders
    with positive surplus at the item prices stay out."""
    setting = get_setting("additive_3x3_uniform")
    model = _spread_item_outputs(_model(setting.name, seed=3, config=ENTRY_FEE), 4.0)
    bids = setting.sample(jax.random.key(6), (4096,))
    menus, m = model.menus(bids), setting.n_items
    single = menus.price[..., [2**j - 1 for j in range(m)]]
    fee = (jnp.sum(single, -1) - menus.price[..., 2**m - 2]) / (m - 1)
    q = single - fee[..., None]
    out = model(bids)
    entered = jnp.any(out.alloc > 0, axis=-1, keepdims=True)
    clear = jnp.abs(bids - q) > 1e-5
    above = (bids > q).astype(out.alloc.dtype)
    np.testing.assert_array_equal(
        np.asarray(jnp.where(entered & clear, out.alloc, 0)),
        np.asarray(jnp.where(entered & clear, above, 0)),
    )
    surplus = jnp.sum(jnp.maximum(bids - q, 0.0), -1)
    assert bool(jnp.any((surplus > 0) & ~entered[..., 0]))


def test_entry_fee_menus_are_strategy_proof():
    setting = get_setting("additive_3x3_uniform")
    model = _model("additive_3x3_uniform", seed=4, config=ENTRY_FEE)
    bids = setting.sample(jax.random.key(1), (64,))
    moved = bids.at[:, 2].set(setting.sample(jax.random.key(9), (64,))[:, 2])
    base, other = model.menus(bids), model.menus(moved)
    np.testing.assert_array_equal(np.asarray(other.price[:, 2]), np.asarray(base.price[:, 2]))
    assert not np.array_equal(np.asarray(other.price[:, 0]), np.asarray(base.price[:, 0]))


def test_compatible_by_construction_only_without_learned_elements():
    assert _model("additive_1x2_uniform").compatible_by_construction
    assert not _model("additive_2x2_uniform").compatible_by_construction
    assert not _model("additive_2x3_uniform", config=ITEM_PRICES).compatible_by_construction
    no_fee = GemNetConfig(menu_size=0, hidden=16, item_prices=True)
    assert _model("unit_2x2_uniform", config=no_fee).compatible_by_construction


def test_entry_fee_and_empty_menus_are_rejected_without_item_prices():
    with pytest.raises(ValueError, match="needs item_prices"):
        _model("additive_2x2_uniform", config=GemNetConfig(fees="entry"))
    with pytest.raises(ValueError, match="menu_size must be >= 1"):
        _model("additive_2x2_uniform", config=GemNetConfig(menu_size=0))
    with pytest.raises(ValueError, match="menu_size must be >= 1"):
        _model("additive_2x2_uniform", config=GemNetConfig(menu_size=-1, item_prices=True))
