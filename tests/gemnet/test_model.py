import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffecon import check_mechanism, get_setting
from gemnet import GemNet, GemNetConfig, choose, menu_bounds, menu_utilities
from gemnet.model import menu_jacobians, others_bids

SMALL = GemNetConfig(menu_size=6, hidden=16)


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


@pytest.mark.parametrize("clip, splits", [(0.0, 1), (0.1, 1), (0.1, 3)])
def test_menu_jacobians_enclose_sampled_jacobians(clip, splits):
    setting = get_setting("additive_2x2_uniform")
    config = GemNetConfig(menu_size=6, hidden=16, alloc_clip=clip, init_logit_scale=4.0)
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
