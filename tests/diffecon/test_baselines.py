"""Tests of the classic baselines: exact revenues, feasibility, IR, DSIC, transforms and errors."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffecon import baselines
from diffecon.outcome import utility
from diffecon.regret import misreport_utility
from diffecon.settings import get_setting
from diffecon.testing import check_mechanism

# --------------------------------------------------------------------------------------------------
# Oracles and helpers.


def monte_carlo_revenue(mechanism, setting, n_samples, *, seed=0, chunk=50_000):
    """Mean revenue and its standard error over ``n_samples`` profiles, in jitted chunks.

    Every sampled outcome is also checked: feasible, payments >= 0, IR on truthful bids.
    """

    def stats(values):
        out = mechanism(values)
        return (
            out.revenue,
            jnp.max(setting.feasibility_violation(out.alloc)),
            jnp.min(out.pay),
            jnp.min(utility(values, out)) / (1.0 + jnp.max(values)),
        )

    apply = jax.jit(stats)
    key = jax.random.key(seed)
    revenues = []
    for start in range(0, n_samples, chunk):
        values = setting.sample(jax.random.fold_in(key, start), min(chunk, n_samples - start))
        revenue, infeasible, min_pay, min_utility = apply(values)
        assert float(infeasible) == 0.0, f"infeasible allocation (violation {infeasible})"
        assert float(min_pay) >= 0.0, f"negative payment {min_pay}"
        assert float(min_utility) >= -1e-6, f"IR violated on truthful bids ({min_utility})"
        revenues.append(np.asarray(revenue, np.float64))
    revenue = np.concatenate(revenues)
    return revenue.mean(), revenue.std(ddof=1) / math.sqrt(len(revenue))


def reference_value(setting, mechanism):
    reference = setting.reference(mechanism)
    assert reference is not None, f"{setting.name} has no {mechanism} reference"
    return reference.value


def assert_within_se(estimate, stderr, reference, *, k=3.0, slack=0.0):
    assert abs(estimate - reference) <= k * stderr + slack, (
        f"estimate {estimate:.6f} +- {stderr:.6f} is more than {k} SE from {reference:.6f}"
    )


def _clip_polygon(polygon, normal, offset):
    """Part of a convex polygon (list of 2-d points) where ``normal . x <= offset``."""
    kept = []
    for p, q in zip(polygon, polygon[1:] + polygon[:1], strict=True):
        fp, fq = normal @ p - offset, normal @ q - offset
        if fp <= 0:
            kept.append(p)
        if (fp < 0 < fq) or (fq < 0 < fp):
            kept.append(p + fp / (fp - fq) * (q - p))
    return kept


def _polygon_area(polygon):
    if len(polygon) < 3:
        return 0.0
    x, y = np.asarray(polygon).T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def exact_menu_revenue(allocs, prices, low, high):
    """Exact expected revenue of a two-item menu for one bidder with values uniform on a box.

    The types choosing entry ``k`` form a convex polygon (the box cut by the half-planes where
    ``k`` beats every other entry, the null entry included), so the revenue is a sum of polygon
    areas times prices: exact up to float64 rounding.
    """
    allocs = np.vstack([np.zeros((1, 2)), np.asarray(allocs, np.float64)])
    prices = np.concatenate([[0.0], np.asarray(prices, np.float64)])
    (x0, y0), (x1, y1) = low, high
    box = [np.array(p, np.float64) for p in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))]
    revenue = 0.0
    for k in range(len(prices)):
        region = box
        for other in range(len(prices)):
            if other != k and len(region) >= 3:
                region = _clip_polygon(region, allocs[other] - allocs[k], prices[other] - prices[k])
        revenue += prices[k] * _polygon_area(region)
    return revenue / ((x1 - x0) * (y1 - y0))


def grid_misreport_regret(mechanism, setting, values, *, points_per_dim):
    """Largest gain of any single bidder from any report on a grid over ``[0, high]``.

    Args:
      values: ``[P, bidders, dim]`` true profiles.

    Returns:
      ``max over profiles, bidders and grid reports of u(report) - u(truth)``.
    """
    n, d = setting.shape
    assert setting.bounded
    axes = [np.linspace(0.0, float(setting.high.max(0)[j]), points_per_dim) for j in range(d)]
    grid = jnp.asarray(np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, d), jnp.float32)
    n_profiles, n_grid = values.shape[0], grid.shape[0]
    tiled = jnp.broadcast_to(values[:, None], (n_profiles, n_grid, n, d))
    reports = jnp.broadcast_to(grid[None, :, None, :], (n_profiles, n_grid, n, d))
    deviating = jax.jit(lambda v, r: misreport_utility(mechanism, v, r))(tiled, reports)
    truthful = utility(values, jax.jit(mechanism)(values))
    return float(jnp.max(deviating - truthful[:, None, :]))


def random_ama(setting, seed):
    """An affine maximiser with random positive weights and random boosts."""
    table, _ = baselines.enumerate_allocations(setting)
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.5, 2.0, setting.n_bidders)
    boosts = rng.normal(0.0, 0.5, table.shape[0])
    return baselines.affine_maximizer(setting, weights=weights, boosts=boosts)


# --------------------------------------------------------------------------------------------------
# Exact revenues.


@pytest.mark.parametrize("n", [2, 3, 5])
def test_myerson_single_item_revenue(n):
    setting = get_setting(f"single_item_{n}_uniform")
    reference = {2: 5 / 12, 3: 0.53125, 5: 0.671875}[n]
    assert reference_value(setting, "myerson") == pytest.approx(reference)
    mechanism = baselines.make_baseline("itemwise_myerson", setting)
    assert_within_se(*monte_carlo_revenue(mechanism, setting, 200_000, seed=n), reference)
    optimal = baselines.make_baseline("optimal", setting)
    assert_within_se(*monte_carlo_revenue(optimal, setting, 200_000, seed=n + 10), reference)


def test_itemwise_myerson_and_vcg_on_additive_2x2():
    setting = get_setting("additive_2x2_uniform")
    myerson = baselines.itemwise_myerson(setting)
    assert_within_se(*monte_carlo_revenue(myerson, setting, 200_000, seed=1), 5 / 6)
    assert_within_se(*monte_carlo_revenue(baselines.vcg(setting), setting, 200_000, seed=2), 2 / 3)


def test_itemwise_myerson_is_second_price_with_reserve_half_on_uniform():
    setting = get_setting("additive_3x3_uniform")
    values = setting.sample(jax.random.key(3), 4096)
    myerson = jax.jit(baselines.itemwise_myerson(setting))(values)
    second = jax.jit(baselines.second_price(setting, reserve=0.5))(values)
    np.testing.assert_array_equal(myerson.alloc, second.alloc)
    np.testing.assert_allclose(myerson.pay, second.pay, atol=1e-6)


def test_itemwise_myerson_uses_support_and_per_item_marginals():
    # U[4,16] x U[4,7], one bidder: item 1 at 8 (= 16/2), item 2 at its bottom 4 (16/2 > 7/2).
    setting = get_setting("additive_1x2_uniform_416_47")
    out = jax.jit(baselines.itemwise_myerson(setting))(jnp.array([[[7.9, 4.0]], [[8.1, 6.0]]]))
    np.testing.assert_array_equal(out.alloc, [[[0.0, 1.0]], [[1.0, 1.0]]])
    np.testing.assert_allclose(out.pay, [[4.0], [12.0]])


def test_itemwise_myerson_discrete_exact():
    # Each value 3 or 7: the ironed virtual value of 3 is 3 - 4 * (1/2) / (1/2) = -1, so only
    # 7s are served, at the smallest winning support point, 7. Exact over all 16 profiles.
    setting = get_setting("yao_2x2_discrete_37")
    mechanism = jax.jit(baselines.itemwise_myerson(setting))
    profiles = jnp.asarray(list(itertools.product((3.0, 7.0), repeat=4))).reshape(16, 2, 2)
    out = mechanism(profiles)
    assert float(jnp.mean(out.revenue)) == pytest.approx(2 * 7 * 3 / 4)
    # A tie at 7 on item 1 goes to the lower index at the threshold 7; bidder 1 takes item 2.
    tie = mechanism(profiles.at[0].set(jnp.array([[7.0, 3.0], [7.0, 7.0]])))
    np.testing.assert_array_equal(tie.alloc[0], [[1.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(tie.pay[0], [7.0, 7.0])


def test_myerson_exponential():
    # E[revenue] of second price with reserve 3 for three Exp(mean 3) bidders, by quadrature:
    # n * int_r^inf phi(v) f(v) F(v)^(n-1) dv with phi(v) = v - 3.
    from scipy import integrate

    def integrand(v):
        f, cdf = math.exp(-v / 3) / 3, 1 - math.exp(-v / 3)
        return 3 * (v - 3) * f * cdf**2

    exact = integrate.quad(integrand, 3.0, math.inf)[0]
    setting = get_setting("exponential_3x1")
    assert exact == pytest.approx(reference_value(setting, "myerson"), abs=1e-4)
    assert_within_se(
        *monte_carlo_revenue(baselines.itemwise_myerson(setting), setting, 200_000), exact
    )


def test_bundle_myerson_reserves_and_revenue():
    one_bidder = get_setting("additive_1x10_uniform")
    mechanism = baselines.bundle_myerson(one_bidder)
    assert float(mechanism.reserve) == pytest.approx(3.9292, abs=1e-4)
    assert_within_se(*monte_carlo_revenue(mechanism, one_bidder, 200_000), 3.4465, slack=5e-5)
    # Sum of two U[0,1]: F(r) = r^2 / 2 on [0, 1], monopoly price sqrt(2/3) whatever n.
    assert float(baselines.bundle_myerson(get_setting("additive_2x2_uniform")).reserve) == (
        pytest.approx(math.sqrt(2 / 3), abs=1e-5)
    )
    assert float(baselines.bundle_myerson(get_setting("exponential_3x1")).reserve) == 3.0
    sampled = baselines.bundle_myerson(get_setting("CA_sym_uniform_12"), n_samples=1 << 14)
    assert 2.0 < float(sampled.reserve) < 3.0


def test_bundle_second_price_outcome():
    setting = get_setting("CA_sym_uniform_12")
    mechanism = baselines.bundle_myerson(setting, reserve=2.5)
    bids = jnp.array([[[1.0, 1.0, 3.0], [2.0, 2.0, 2.8]], [[1.0, 1.0, 2.0], [1.0, 1.0, 2.4]]])
    out = mechanism(bids)
    np.testing.assert_array_equal(out.alloc, [[[0, 0, 1], [0, 0, 0]], [[0, 0, 0], [0, 0, 0]]])
    np.testing.assert_allclose(out.pay, [[2.8, 0.0], [0.0, 0.0]], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Optimal menus.

OPTIMAL_MENU_SETTINGS = [
    "additive_1x2_uniform",
    "unit_1x2_uniform",
    "unit_1x2_uniform_23",
    "additive_1x2_uniform_416_47",
]


@pytest.mark.parametrize("name", OPTIMAL_MENU_SETTINGS)
def test_optimal_menu_exact_revenue(name):
    setting = get_setting(name)
    menu = baselines.optimal_menu(setting)
    reference = reference_value(setting, "optimal")
    exact = exact_menu_revenue(
        np.asarray(menu.allocs, np.float64),
        np.asarray(menu.prices, np.float64),
        setting.low[0],
        setting.high[0],
    )
    assert exact == pytest.approx(reference, abs=1e-4)
    assert_within_se(*monte_carlo_revenue(menu, setting, 200_000, seed=7), exact)


def test_exact_menu_oracle_closed_forms():
    # The oracle itself, on closed forms: Manelli-Vincent in float64, Pavlov's U[2,3] formula
    # (2 + Q)(1 - 2Q^2) + 2/27 with Q = (sqrt 22 - 4)/6, and 88/9 for U[4,16] x U[4,7].
    s2 = math.sqrt(2.0)
    mv = exact_menu_revenue([[1, 0], [0, 1], [1, 1]], [2 / 3, 2 / 3, (4 - s2) / 3], (0, 0), (1, 1))
    assert mv == pytest.approx(0.549201, abs=1e-6)
    q = (math.sqrt(22.0) - 4.0) / 6.0
    pavlov = exact_menu_revenue(
        [[1, 0], [0, 1], [0.5, 0.5]], [2 + q + 1 / 6, 2 + q + 1 / 6, 2 + q], (2, 2), (3, 3)
    )
    assert pavlov == pytest.approx((2 + q) * (1 - 2 * q * q) + 2 / 27, abs=1e-12)
    assert pavlov == pytest.approx(2.13313, abs=1e-5)
    ddt = exact_menu_revenue([[0.5, 1], [1, 1]], [8, 12], (4, 4), (16, 7))
    assert ddt == pytest.approx(88 / 9, abs=1e-12)


@pytest.mark.parametrize("name", OPTIMAL_MENU_SETTINGS)
def test_optimal_menus_are_locally_optimal(name):
    # Moving any single price by +-1% lowers the exact revenue: the prices are not off by a slip.
    setting = get_setting(name)
    menu = baselines.optimal_menu(setting)
    allocs, prices = np.asarray(menu.allocs, np.float64), np.asarray(menu.prices, np.float64)
    prices = np.array(
        {
            "additive_1x2_uniform": [2 / 3, 2 / 3, (4 - math.sqrt(2)) / 3],
            "unit_1x2_uniform": [1 / math.sqrt(3)] * 2,
            "unit_1x2_uniform_23": [
                2 + (math.sqrt(22) - 3) / 6,
                2 + (math.sqrt(22) - 3) / 6,
                2 + (math.sqrt(22) - 4) / 6,
            ],
            "additive_1x2_uniform_416_47": [8.0, 12.0],
        }[name]
    )
    np.testing.assert_allclose(np.asarray(menu.prices), prices, rtol=1e-6)
    low, high = setting.low[0], setting.high[0]
    best = exact_menu_revenue(allocs, prices, low, high)
    for k, sign in itertools.product(range(len(prices)), (-1, 1)):
        moved = prices.copy()
        moved[k] *= 1 + sign * 0.01
        assert exact_menu_revenue(allocs, moved, low, high) < best + 1e-12


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMAL_MENU_SETTINGS)
def test_optimal_menu_revenue_million_samples(name):
    setting = get_setting(name)
    menu = baselines.optimal_menu(setting)
    reference = reference_value(setting, "optimal")
    assert_within_se(*monte_carlo_revenue(menu, setting, 1_000_000, seed=11), reference)


@pytest.mark.slow
def test_exact_revenues_million_samples():
    for n, reference in ((2, 5 / 12), (3, 0.53125), (5, 0.671875)):
        setting = get_setting(f"single_item_{n}_uniform")
        mechanism = baselines.itemwise_myerson(setting)
        assert_within_se(*monte_carlo_revenue(mechanism, setting, 1_000_000, seed=n), reference)
    setting = get_setting("additive_2x2_uniform")
    assert_within_se(
        *monte_carlo_revenue(baselines.itemwise_myerson(setting), setting, 1_000_000), 5 / 6
    )
    assert_within_se(*monte_carlo_revenue(baselines.vcg(setting), setting, 1_000_000), 2 / 3)
    setting = get_setting("additive_3x10_uniform")
    mechanism = baselines.itemwise_myerson(setting)
    assert_within_se(*monte_carlo_revenue(mechanism, setting, 1_000_000), 5.3125)


def test_menu_choice():
    menu = baselines.optimal_menu(get_setting("additive_1x2_uniform"))
    out = menu(jnp.array([[[0.1, 0.2]], [[0.9, 0.1]], [[0.1, 0.9]], [[0.8, 0.8]]]))
    np.testing.assert_array_equal(out.alloc[:, 0], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(
        out.pay[:, 0], [0.0, 2 / 3, 2 / 3, (4 - math.sqrt(2)) / 3], rtol=1e-6
    )


# --------------------------------------------------------------------------------------------------
# Feasibility, payments and IR for every baseline.

# --------------------------------------------------------------------------------------------------
# DSIC spot checks on misreport grids.

DSIC_CASES = [
    ("vcg", "additive_2x2_uniform", 21),
    ("vcg", "unit_2x2_uniform", 21),
    ("vcg", "CA_sym_uniform_12", 9),
    ("itemwise_myerson", "single_item_3_uniform", 101),
    ("itemwise_myerson", "additive_1x2_uniform_416_47", 25),
    ("itemwise_myerson", "yao_2x2_discrete_37", 15),
    ("bundle_myerson", "additive_2x2_uniform", 21),
    ("optimal", "additive_1x2_uniform_416_47", 31),
]


@pytest.mark.parametrize(("name", "setting_name", "points"), DSIC_CASES)
def test_dsic_on_misreport_grid(name, setting_name, points):
    setting = get_setting(setting_name)
    mechanism = baselines.make_baseline(name, setting)
    values = setting.sample(jax.random.key(8), 24)
    regret = grid_misreport_regret(mechanism, setting, values, points_per_dim=points)
    assert regret <= 1e-5 * max(1.0, float(np.max(setting.high)))


@pytest.mark.parametrize(
    "setting_name", ["additive_2x2_uniform", "unit_2x2_uniform", "CA_asym_uniform_12_15"]
)
def test_ama_dsic_on_misreport_grid(setting_name):
    setting = get_setting(setting_name)
    values = setting.sample(jax.random.key(9), 24)
    mechanism = random_ama(setting, len(setting_name))
    points = 9 if setting.valuation == "combinatorial" else 21
    assert grid_misreport_regret(mechanism, setting, values, points_per_dim=points) <= 1e-5


def test_first_price_is_manipulable():
    setting = get_setting("additive_2x2_uniform")
    values = setting.sample(jax.random.key(10), 24)
    mechanism = baselines.first_price(setting)
    assert grid_misreport_regret(mechanism, setting, values, points_per_dim=21) > 0.05


# --------------------------------------------------------------------------------------------------
# Affine maximisers.


def test_enumerate_allocations():
    table, subsets = baselines.enumerate_allocations(get_setting("additive_2x2_uniform"))
    assert table.shape == (9, 2, 2) and subsets.shape == (9, 2)
    assert np.all(table.sum(1) <= 1) and np.all((table * [1, 2]).sum(-1) == subsets)
    unit, _ = baselines.enumerate_allocations(get_setting("unit_2x2_uniform"))
    assert unit.shape == (7, 2, 2) and np.all(unit.sum(-1) <= 1)
    setting = get_setting("CA_sym_uniform_12")
    combinatorial, subsets = baselines.enumerate_allocations(setting)
    assert combinatorial.shape == (9, 2, 3)
    usage = combinatorial @ setting.bundles  # [A, n, items]
    assert np.all(usage.sum(1) <= 1) and np.all(combinatorial.sum(-1) <= 1)
    np.testing.assert_array_equal((usage * [1, 2]).sum(-1), subsets)
    assert len({tuple(row) for row in subsets.tolist()}) == 9


def test_vcg_enumerated_matches_closed_form_on_additive():
    setting = get_setting("additive_2x3_uniform")
    values = setting.sample(jax.random.key(12), 1024)
    closed = jax.jit(baselines.vcg(setting))(values)
    enumerated = jax.jit(baselines.affine_maximizer(setting))(values)
    np.testing.assert_array_equal(closed.alloc, enumerated.alloc)
    np.testing.assert_allclose(closed.pay, enumerated.pay, atol=1e-5)


def test_vcg_combinatorial_example():
    setting = get_setting("CA_sym_uniform_12")
    mechanism = baselines.vcg(setting)
    # Bidder 0 values the bundle at 3.0; without it, bidder 1 would take the bundle (2.0 > 1.2).
    out = mechanism(jnp.array([[1.0, 1.0, 3.0], [1.2, 1.1, 2.0]]))
    np.testing.assert_array_equal(out.alloc, [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(out.pay, [2.0, 0.0], atol=1e-6)
    # Split: welfare 1.5 + 1.4; each bidder pays its externality 1.6 - 1.5 and 1.5 - 1.4.
    out = mechanism(jnp.array([[1.5, 0.2, 1.6], [0.3, 1.4, 1.5]]))
    np.testing.assert_array_equal(out.alloc, [[1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(out.pay, [0.1, 0.1], atol=1e-6)


def test_vvca_boosts_sum_per_bidder():
    setting = get_setting("CA_sym_uniform_12")
    bundle_boosts = np.array([[0.5, 0.1, 0.2, -0.3], [0.4, 0.0, 0.3, -0.1]], np.float32)
    mechanism = baselines.vvca(setting, bundle_boosts=bundle_boosts)
    _, subsets = baselines.enumerate_allocations(setting)
    expected = bundle_boosts[0, subsets[:, 0]] + bundle_boosts[1, subsets[:, 1]]
    np.testing.assert_allclose(mechanism.boosts, expected, rtol=1e-6)


def test_fit_affine_maximizer_quick():
    setting = get_setting("additive_2x2_uniform")
    quick = {"steps": 60, "eval_every": 30, "n_starts": 2, "eval_samples": 4096}
    mechanism = baselines.make_baseline("ama", setting, key=jax.random.key(0), **quick)
    # DSIC of affine maximisers: random ones above, fitted ones in the slow tests.
    revenue, stderr = monte_carlo_revenue(mechanism, setting, 20_000, seed=3)
    assert revenue > 2 / 3 + 5 * stderr  # beats VCG, its starting point
    assert float(jnp.min(mechanism.weights)) > 0
    quick.update(steps=20, eval_every=20, n_starts=1)
    vvca = baselines.make_baseline("vvca", setting, key=jax.random.key(1), **quick)
    assert vvca.boosts.shape == (9,) and float(jnp.min(vvca.weights)) > 0


def test_fit_lottery_ama_quick():
    """The lottery AMA learns randomised allocations that never over-allocate, beats VCG, and is
    DSIC (grid misreports) like any AMA; its search does not need the allocations enumerated."""
    setting = get_setting("additive_2x2_uniform")
    quick = {"steps": 400, "eval_every": 200, "menu_size": 16, "n_starts": 2, "eval_samples": 4096}
    mechanism = baselines.make_baseline("lottery_ama", setting, key=jax.random.key(0), **quick)
    table = np.asarray(mechanism.alloc_table)
    assert table.shape == (16, 2, 2) and table.min() >= 0 and table.sum(1).max() <= 1 + 1e-6
    assert np.any((table > 0.05) & (table < 0.95))  # lotteries, not only 0/1 allocations
    revenue, stderr = monte_carlo_revenue(mechanism, setting, 20_000, seed=3)
    assert revenue > 2 / 3 + 5 * stderr
    values = setting.sample(jax.random.key(22), 8)
    assert grid_misreport_regret(mechanism, setting, values, points_per_dim=21) <= 1e-5
    report = check_mechanism(mechanism, setting)  # raises on a broken contract
    assert report.min_payment >= 0.0
    # 4^10 deterministic allocations are too many to enumerate; a lottery menu is not
    big = get_setting("additive_3x10_uniform")
    lottery = baselines.fit_affine_maximizer(
        big,
        kind="lottery",
        key=jax.random.key(1),
        steps=20,
        eval_every=20,
        menu_size=16,
        n_starts=1,
        eval_samples=256,
    )
    assert lottery.alloc_table.shape == (16, 3, 10)


# Floors: item-wise Myerson on the additive settings (5/6, 1.25, 1.59375), a little under the
# published VVCA / AMA revenues (2.741 / 2.765 and 4.209 / 4.212) on the combinatorial ones.
FIT_CASES = [
    ("ama", "additive_2x2_uniform", 0.85),
    ("vvca", "additive_2x2_uniform", 0.85),
    ("ama", "additive_2x3_uniform", 1.25),
    ("vvca", "additive_2x3_uniform", 1.25),
    ("ama", "additive_3x3_uniform", 1.59375),
    ("vvca", "additive_3x3_uniform", 1.59375),
    ("vvca", "CA_sym_uniform_12", 2.73),
    ("ama", "CA_sym_uniform_12", 2.73),
    ("vvca", "CA_asym_uniform_12_15", 4.19),
    ("ama", "CA_asym_uniform_12_15", 4.19),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "setting_name", "floor"), FIT_CASES)
def test_fit_affine_maximizer_revenue(kind, setting_name, floor):
    setting = get_setting(setting_name)
    mechanism = baselines.fit_affine_maximizer(setting, kind=kind, key=jax.random.key(0))
    revenue, _ = monte_carlo_revenue(mechanism, setting, 1_000_000, seed=21)
    assert revenue > floor
    values = setting.sample(jax.random.key(22), 16)
    points = 9 if setting.value_dim == 3 else (21 if setting.value_dim == 2 else 7)
    assert grid_misreport_regret(mechanism, setting, values, points_per_dim=points) <= 1e-5


# --------------------------------------------------------------------------------------------------
# Transforms: jit, vmap, batch shapes, strict promotion.

TRANSFORM_CASES = [
    ("vcg", "CA_sym_uniform_12"),
    ("itemwise_myerson", "additive_1x2_uniform_416_47"),
    ("itemwise_myerson", "yao_2x2_discrete_37"),
    ("bundle_myerson", "additive_2x2_uniform"),
    ("optimal", "unit_1x2_uniform_23"),
    ("second_price", "additive_2x2_uniform"),
]


@pytest.mark.parametrize(("name", "setting_name"), TRANSFORM_CASES)
def test_transforms(name, setting_name):
    """jit with the mechanism as a pytree argument, nested vmap down to one profile, several batch
    axes, an empty batch, strict rank and dtype promotion, and finite misreport gradients."""
    setting = get_setting(setting_name)
    mechanism = baselines.make_baseline(name, setting)
    values = setting.sample(jax.random.key(13), (3, 4))
    apply = jax.jit(lambda m, v: m(v))
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        batched = apply(mechanism, values)
        mapped = jax.jit(jax.vmap(jax.vmap(mechanism)))(values)
        empty = apply(mechanism, values[0, :0])
    assert batched.alloc.shape == values.shape and batched.pay.shape == values.shape[:-1]
    assert batched.alloc.dtype == jnp.float32 and batched.pay.dtype == jnp.float32
    np.testing.assert_allclose(mapped.alloc, batched.alloc, atol=1e-6)
    np.testing.assert_allclose(mapped.pay, batched.pay, atol=1e-5)
    assert empty.pay.shape == (0, setting.n_bidders)
    # The shared regret search ascends misreport utilities by gradient: no NaN may leak out of the
    # masked (-inf / inf) branches of the mechanisms.
    misreports = setting.sample(jax.random.key(18), 16)
    grads = jax.jit(
        jax.grad(lambda mis: jnp.sum(misreport_utility(mechanism, values[0], mis[:4])))
    )(misreports)
    assert bool(jnp.all(jnp.isfinite(grads)))


def test_vmap_over_mechanism_parameters():
    setting = get_setting("additive_1x2_uniform")
    menu = baselines.optimal_menu(setting)
    menus = jax.tree.map(lambda x: jnp.stack([x, x]), menu)
    menus = menus.replace(prices=menus.prices.at[1].add(0.1))
    bids = jnp.array([[[0.9, 0.9]]])
    pay = jax.vmap(lambda m: m(bids).pay)(menus)
    np.testing.assert_allclose(pay[:, 0, 0], [(4 - math.sqrt(2)) / 3, (4.3 - math.sqrt(2)) / 3])
    setting = get_setting("CA_sym_uniform_12")
    ama = random_ama(setting, 1)
    amas = jax.tree.map(lambda x: jnp.stack([x, x]), ama)
    values = setting.sample(jax.random.key(15), 4)
    revenue = jax.jit(jax.vmap(lambda m: m(values).revenue))(amas)
    np.testing.assert_allclose(revenue[0], ama(values).revenue, atol=1e-5)


def test_grad_through_menu_prices():
    setting = get_setting("unit_1x2_uniform")
    menu = baselines.optimal_menu(setting)
    values = setting.sample(jax.random.key(16), 1024)
    grads = jax.grad(lambda m: jnp.mean(m(values).revenue))(menu)
    np.testing.assert_allclose(grads.prices.sum(), np.mean(np.asarray(menu(values).pay) > 0), 1e-5)


CONFORMANCE_CASES = [  # one per mechanism class and code path
    ("vcg", "additive_3x10_uniform"),
    ("vcg", "CA_asym_uniform_12_15"),
    ("itemwise_myerson", "yao_2x2_discrete_37"),
    ("bundle_myerson", "CA_sym_uniform_12"),
    ("optimal", "additive_1x2_uniform_416_47"),
    ("first_price", "unit_2x2_uniform"),
]


@pytest.mark.parametrize(("name", "setting_name"), CONFORMANCE_CASES)
def test_conformance(name, setting_name):
    setting = get_setting(setting_name)
    mechanism = baselines.make_baseline(name, setting, key=jax.random.key(0))
    report = check_mechanism(mechanism, setting)
    assert report.max_feasibility_violation == 0.0 and report.min_payment >= 0.0


def test_random_ama_conformance():
    setting = get_setting("unit_2x2_uniform")
    check_mechanism(random_ama(setting, 3), setting)


# --------------------------------------------------------------------------------------------------
# Errors.


def test_bad_bids_raise_value_error():
    setting = get_setting("additive_2x2_uniform")
    mechanism = baselines.vcg(setting)
    with pytest.raises(ValueError, match="shape"):
        mechanism(jnp.ones((4, 3, 2)))
    with pytest.raises(ValueError, match="shape"):
        mechanism(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        mechanism(jnp.array([[0.1, jnp.nan], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="negative"):
        mechanism(jnp.array([[0.1, -0.2], [0.2, 0.3]]))
    with pytest.raises(ValueError, match="floating"):
        mechanism(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match="shape"):
        jax.jit(mechanism)(jnp.ones((4, 2, 3)))
    for name, name_setting in (
        ("itemwise_myerson", "additive_2x2_uniform"),
        ("optimal", "unit_1x2_uniform"),
        ("bundle_myerson", "CA_sym_uniform_12"),
        ("vcg", "unit_2x2_uniform"),
    ):
        m = baselines.make_baseline(name, get_setting(name_setting))
        with pytest.raises(ValueError, match="shape"):
            m(jnp.ones((5, 3, 7)))


def test_unsupported_settings_raise_value_error():
    with pytest.raises(ValueError, match="additive"):
        baselines.itemwise_myerson(get_setting("unit_1x2_uniform"))
    with pytest.raises(ValueError, match="additive"):
        baselines.itemwise_myerson(get_setting("CA_sym_uniform_12"))
    with pytest.raises(ValueError, match=r"vcg|additive"):
        baselines.second_price(get_setting("CA_sym_uniform_12"))
    with pytest.raises(ValueError, match="unit_demand"):
        baselines.bundle_myerson(get_setting("unit_2x2_uniform"))
    with pytest.raises(ValueError, match="no optimal menu"):
        baselines.optimal_menu(get_setting("additive_2x2_uniform"))
    with pytest.raises(ValueError, match="no optimal mechanism"):
        baselines.make_baseline("optimal", get_setting("CA_sym_uniform_12"))
    with pytest.raises(ValueError, match="max_allocations"):
        baselines.affine_maximizer(get_setting("additive_3x10_uniform"))
    with pytest.raises(ValueError, match="max_allocations"):
        baselines.fit_affine_maximizer(get_setting("additive_5x10_uniform"), key=jax.random.key(0))
    assert isinstance(baselines.vcg(get_setting("additive_3x10_uniform")), baselines.SecondPrice)


def test_bad_parameters_raise_value_error():
    setting = get_setting("additive_2x2_uniform")
    with pytest.raises(ValueError, match="positive"):
        baselines.affine_maximizer(setting, weights=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="boosts"):
        baselines.affine_maximizer(setting, boosts=np.zeros(4))
    with pytest.raises(ValueError, match="bundle_boosts"):
        baselines.vvca(setting, bundle_boosts=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="reserve"):
        baselines.second_price(setting, reserve=-1.0)
    with pytest.raises(ValueError, match="kind"):
        baselines.fit_affine_maximizer(setting, kind="lotto", key=jax.random.key(0))
    with pytest.raises(ValueError, match="lottery AMA supports additive"):
        baselines.fit_affine_maximizer(
            get_setting("unit_1x2_uniform"), kind="lottery", key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match="invalid fit config"):
        baselines.fit_affine_maximizer(setting, kind="lottery", key=jax.random.key(0), menu_size=0)
    with pytest.raises(ValueError, match="alloc_table must have shape"):
        baselines.affine_maximizer(setting, alloc_table=np.zeros((4, 2, 3)))
    with pytest.raises(ValueError, match="sum to at most 1 per item"):
        baselines.affine_maximizer(setting, alloc_table=np.full((4, 2, 2), 0.6))
    with pytest.raises(ValueError, match="supports additive"):
        baselines.affine_maximizer(get_setting("unit_1x2_uniform"), alloc_table=np.zeros((4, 1, 2)))
    with pytest.raises(ValueError, match="unknown fit_affine_maximizer options"):
        baselines.fit_affine_maximizer(setting, key=jax.random.key(0), stepz=3)


def test_registry():
    assert set(baselines.BASELINE_NAMES) == {
        "vcg",
        "itemwise_myerson",
        "bundle_myerson",
        "optimal",
        "first_price",
        "second_price",
        "vvca",
        "ama",
        "lottery_ama",
    }
    with pytest.raises(ValueError, match="valid names: vcg"):
        baselines.make_baseline("vickrey", get_setting("additive_2x2_uniform"))
    setting = get_setting("additive_2x2_uniform")
    mechanism = baselines.make_baseline("second_price", setting, reserve=0.25)
    np.testing.assert_allclose(mechanism.reserve, [0.25, 0.25])
    # Every baseline takes (and may ignore) a key, so callers can build them uniformly.
    for name in ("vcg", "itemwise_myerson", "bundle_myerson", "first_price", "second_price"):
        assert callable(baselines.make_baseline(name, setting, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="needs key"):
        baselines.make_baseline("ama", setting)
    with pytest.raises(ValueError, match="unknown"):
        baselines.make_baseline("vcg", setting, reserve=0.5)
