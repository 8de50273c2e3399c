"""Tests of the exact DSIC linear program: closed-form oracles, DSIC/IR by enumeration, errors."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ortools.linear_solver import pywraplp

import diffecon
from diffecon import baselines
from diffecon.distributions import CombinatorialValues, Discrete, IndependentValues, Uniform
from diffecon.optimal_lp import optimal_dsic_lp
from diffecon.outcome import utility
from diffecon.settings import Setting, get_setting


def discrete_setting(name, marginal, *, n_bidders, n_items, valuation="additive"):
    return Setting(
        name=name,
        n_bidders=n_bidders,
        n_items=n_items,
        valuation=valuation,
        values=IndependentValues.iid(marginal, n_bidders=n_bidders, n_items=n_items),
    )


def all_profiles(marginal, *, n_bidders, n_items):
    """Every value profile ``[P, bidders, items]`` (float32) and its probability ``[P]``."""
    coords = n_bidders * n_items
    points = list(itertools.product(marginal.points, repeat=coords))
    probs = [float(np.prod(p)) for p in itertools.product(marginal.probs, repeat=coords)]
    profiles = np.asarray(points, np.float32).reshape(-1, n_bidders, n_items)
    return jnp.asarray(profiles), np.asarray(probs)


def exact_revenue(mechanism, profiles, probs):
    return float(np.sum(probs * np.asarray(mechanism(profiles).revenue, np.float64)))


# --------------------------------------------------------------------------------------------------
# Closed-form oracles.


def test_one_bidder_one_item_is_the_best_posted_price():
    # Revenue of price x_k is x_k * P(V >= x_k): 1 * 1 = 1, 3 * 0.6 = 1.8, 4 * 0.25 = 1.
    marginal = Discrete((1.0, 3.0, 4.0), (0.4, 0.35, 0.25))
    setting = discrete_setting("lp_test_1x1", marginal, n_bidders=1, n_items=1)
    solution = optimal_dsic_lp(setting)
    assert solution.revenue == pytest.approx(1.8, abs=1e-9)
    assert solution.profiles.shape == (3, 1, 1)
    np.testing.assert_allclose(solution.probs, marginal.probs)
    # The optimal mechanism is the posted price 3 (unique: other prices earn strictly less).
    np.testing.assert_allclose(solution.alloc[:, 0, 0], [0.0, 1.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(solution.pay[:, 0], [0.0, 3.0, 3.0], atol=1e-9)


def test_two_bidders_one_item_is_ironed_myerson():
    # Irregular marginal: virtual values (-8, 0.75, -1, 4) are ironed to (-8, 0.4, 0.4, 4), so
    # values 2 and 3 are pooled. The LP must match Myerson's ironed auction exactly.
    marginal = Discrete((1.0, 2.0, 3.0, 4.0), (0.1, 0.4, 0.1, 0.4))
    np.testing.assert_allclose(marginal.discrete_virtual_values(), [-8.0, 0.4, 0.4, 4.0])
    setting = discrete_setting("lp_test_2x1_ironed", marginal, n_bidders=2, n_items=1)
    profiles, probs = all_profiles(marginal, n_bidders=2, n_items=1)

    myerson = exact_revenue(baselines.itemwise_myerson(setting), profiles, probs)
    phi = dict(zip(marginal.points, marginal.discrete_virtual_values(), strict=True))
    virtual_surplus = sum(
        pr * max(0.0, *(phi[float(v)] for v in prof[:, 0]))
        for prof, pr in zip(np.asarray(profiles), probs, strict=True)
    )
    assert myerson == pytest.approx(virtual_surplus, rel=1e-6)

    solution = optimal_dsic_lp(setting)
    assert solution.revenue == pytest.approx(myerson, rel=1e-6)
    assert exact_revenue(solution.mechanism(), profiles, probs) == pytest.approx(myerson, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# Yao's 2 x 2 setting: the registered optimum, checked independently of the LP's constraints.


@pytest.fixture(scope="module")
def yao():
    setting = get_setting("yao_2x2_discrete_37")
    return setting, optimal_dsic_lp(setting)


def test_yao_matches_reference_and_beats_itemwise_myerson(yao):
    setting, solution = yao
    reference = setting.reference("optimal")
    assert reference is not None and reference.exact
    assert solution.revenue == pytest.approx(reference.value, abs=1e-7)
    assert reference.value == 43 / 4

    profiles, probs = all_profiles(Discrete((3.0, 7.0), (0.5, 0.5)), n_bidders=2, n_items=2)
    np.testing.assert_allclose(solution.profiles, profiles)
    np.testing.assert_allclose(solution.probs, probs)
    lp_revenue = exact_revenue(solution.mechanism(), profiles, probs)
    assert lp_revenue == pytest.approx(reference.value, rel=1e-6)
    myerson = exact_revenue(baselines.itemwise_myerson(setting), profiles, probs)
    assert myerson == pytest.approx(21 / 2)
    assert lp_revenue >= myerson + 0.25 - 1e-5


def test_yao_solution_is_dsic_ir_and_feasible_by_enumeration(yao):
    setting, solution = yao
    mechanism = jax.jit(solution.mechanism())
    types = jnp.asarray(list(itertools.product((3.0, 7.0), repeat=2)), jnp.float32)  # [4, items]
    profiles, _ = all_profiles(Discrete((3.0, 7.0), (0.5, 0.5)), n_bidders=2, n_items=2)
    truthful = mechanism(profiles)
    assert float(jnp.max(setting.feasibility_violation(truthful.alloc))) <= 1e-6
    truthful_utility = utility(profiles, truthful)  # [P, bidders]
    assert float(jnp.min(truthful_utility)) >= -1e-5
    for bidder in range(setting.n_bidders):
        # Every profile with bidder's report replaced by every type: [types, P, bidders, items].
        reports = jnp.broadcast_to(profiles, (len(types), *profiles.shape))
        reports = reports.at[:, :, bidder, :].set(types[:, None, :])
        deviated = mechanism(reports)
        true_values = jnp.broadcast_to(profiles, reports.shape)
        gains = utility(true_values, deviated)[..., bidder] - truthful_utility[None, :, bidder]
        assert float(jnp.max(gains)) <= 1e-5, f"bidder {bidder} gains {float(jnp.max(gains))}"


def test_yao_solution_table_is_dsic_by_direct_enumeration(yao):
    # The same check on the float64 table itself, by a dictionary lookup of every deviation.
    _, solution = yao
    row_of = {tuple(p.ravel().tolist()): k for k, p in enumerate(solution.profiles)}
    n_bidders, n_items = solution.profiles.shape[1:]
    types = list(itertools.product((3.0, 7.0), repeat=n_items))
    for p, values in enumerate(solution.profiles):
        for bidder in range(n_bidders):
            true_type = values[bidder]
            honest = true_type @ solution.alloc[p, bidder] - solution.pay[p, bidder]
            assert honest >= -1e-7
            for report in types:
                lie = values.copy()
                lie[bidder] = report
                q = row_of[tuple(lie.ravel().tolist())]
                deviation = true_type @ solution.alloc[q, bidder] - solution.pay[q, bidder]
                assert honest >= deviation - 1e-7, (values.tolist(), bidder, report)
    assert np.all(solution.alloc >= -1e-9) and np.all(solution.alloc <= 1 + 1e-9)
    assert np.all(solution.alloc.sum(axis=1) <= 1 + 1e-9)


def test_mechanism_rounds_to_nearest_support_point_and_batches(yao):
    _, solution = yao
    mechanism = solution.mechanism()
    exact = jnp.asarray([[[3.0, 7.0], [7.0, 3.0]], [[7.0, 7.0], [3.0, 3.0]]])
    nearby = jnp.asarray([[[0.0, 6.0], [5.5, 4.9]], [[100.0, 5.1], [4.0, 2.0]]])
    want = mechanism(exact)
    got = jax.jit(mechanism)(nearby)
    np.testing.assert_array_equal(got.alloc, want.alloc)
    np.testing.assert_array_equal(got.pay, want.pay)
    # Any batch shape, and vmap over a leading axis.
    batched = jax.vmap(mechanism)(jnp.broadcast_to(exact, (3, *exact.shape)))
    assert batched.alloc.shape == (3, 2, 2, 2) and batched.pay.shape == (3, 2, 2)
    assert mechanism(exact[0]).pay.shape == (2,)
    with pytest.raises(ValueError, match="bidders=2, items=2"):
        mechanism(jnp.zeros((4, 2, 3)))


def test_exported_from_package():
    assert diffecon.optimal_dsic_lp is optimal_dsic_lp
    assert "OptimalLP" in diffecon.__all__ and "optimal_dsic_lp" in diffecon.__all__


# --------------------------------------------------------------------------------------------------
# Errors.


def test_rejects_non_additive_valuations():
    setting = discrete_setting(
        "lp_test_unit",
        Discrete((1.0, 2.0), (0.5, 0.5)),
        n_bidders=1,
        n_items=2,
        valuation="unit_demand",
    )
    with pytest.raises(ValueError, match="additive"):
        optimal_dsic_lp(setting)
    with pytest.raises(ValueError, match="additive"):
        optimal_dsic_lp(get_setting("CA_sym_uniform_12"))


def test_rejects_continuous_or_correlated_values():
    with pytest.raises(ValueError, match="Discrete marginals"):
        optimal_dsic_lp(get_setting("additive_2x2_uniform"))
    mixed = Setting(
        name="lp_test_mixed",
        n_bidders=1,
        n_items=2,
        valuation="additive",
        values=IndependentValues.per_item(
            [Discrete((1.0, 2.0), (0.5, 0.5)), Uniform(0.0, 1.0)], n_bidders=1
        ),
    )
    with pytest.raises(ValueError, match="Uniform"):
        optimal_dsic_lp(mixed)
    correlated = Setting(
        name="lp_test_correlated",
        n_bidders=2,
        n_items=3,
        valuation="additive",
        values=CombinatorialValues((1.0, 1.0), (2.0, 2.0), (-1.0, -1.0), (1.0, 1.0)),
    )
    with pytest.raises(ValueError, match="IndependentValues"):
        optimal_dsic_lp(correlated)


def test_rejects_too_many_profiles_or_constraints():
    five = Discrete((1.0, 2.0, 3.0, 4.0, 5.0), (0.2,) * 5)
    big = discrete_setting("lp_test_big", five, n_bidders=2, n_items=3)  # 5^6 = 15625 profiles
    with pytest.raises(ValueError, match="15625 value profiles, more than max_profiles=4096"):
        optimal_dsic_lp(big)
    small = discrete_setting("lp_test_small", five, n_bidders=1, n_items=2)  # 25 profiles
    with pytest.raises(ValueError, match="max_profiles=10"):
        optimal_dsic_lp(small, max_profiles=10)
    with pytest.raises(ValueError, match="600 DSIC constraints"):  # 25 profiles x 24 reports
        optimal_dsic_lp(small, max_constraints=100)


def test_solver_failure_raises(monkeypatch):
    monkeypatch.setattr(pywraplp.Solver, "Solve", lambda self, *args: pywraplp.Solver.ABNORMAL)
    setting = discrete_setting(
        "lp_test_fail", Discrete((1.0, 2.0), (0.5, 0.5)), n_bidders=1, n_items=1
    )
    with pytest.raises(RuntimeError, match="ABNORMAL"):
        optimal_dsic_lp(setting)
