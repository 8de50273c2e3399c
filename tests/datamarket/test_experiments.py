"""Experiments, values and obedience on hand-computed cases; bad input rejected clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datamarket as dm

PRIOR = jnp.array([0.3, 0.7])
# joint P(w, s) = [[0.24, 0.06], [0.28, 0.42]]
NOISY = jnp.array([[0.8, 0.2], [0.4, 0.6]])


def test_values_and_obedience_by_hand():
    assert float(dm.decision_value(NOISY, PRIOR)) == pytest.approx(0.28 + 0.42)
    assert float(dm.obedient_value(NOISY, PRIOR)) == pytest.approx(0.24 + 0.42)
    assert float(dm.obedience_violation(NOISY, PRIOR)) == pytest.approx(0.04)
    assert float(dm.prior_value(PRIOR)) == pytest.approx(0.7)
    full, none = jnp.eye(2), jnp.array([[0.0, 1.0], [0.0, 1.0]])
    assert float(dm.decision_value(full, PRIOR)) == pytest.approx(1.0)
    assert float(dm.decision_value(none, PRIOR)) == pytest.approx(0.7)
    assert float(dm.obedience_violation(full, PRIOR)) == 0.0
    # recommending the wrong action: obeying is always wrong, flipping always right
    flip = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    assert float(dm.obedient_value(flip, PRIOR)) == 0.0
    assert float(dm.obedience_violation(flip, PRIOR)) == pytest.approx(1.0)


def test_general_payoff_with_a_safe_action_by_hand():
    payoff = jnp.array([[1.0, 0.0, 0.8], [0.0, 1.0, 0.8]])
    prior = jnp.array([0.5, 0.5])
    assert float(dm.prior_value(prior, payoff)) == pytest.approx(0.8)
    full = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(dm.decision_value(full, prior, payoff)) == pytest.approx(1.0)
    # recommending the safe action in state 0 half the time: obedient 0.5*(0.5*1 + 0.5*0.8) + 0.5
    half = jnp.array([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    assert float(dm.obedient_value(half, prior, payoff)) == pytest.approx(0.25 + 0.2 + 0.5)
    # on signal 2 (only in state 0) the buyer would rather take action 0: gain 0.25 * 0.2
    assert float(dm.obedience_violation(half, prior, payoff)) == pytest.approx(0.05)


def test_deviation_plans_for_two_signals_and_their_values():
    plans = dm.deviation_plans(2, 2)
    # follow first, then always-0, flip, always-1
    np.testing.assert_array_equal(plans, [[0, 1], [0, 0], [1, 0], [1, 1]])
    values = np.asarray(dm.plan_values(NOISY, PRIOR))
    np.testing.assert_allclose(values, [0.66, 0.3, 0.34, 0.7], atol=1e-6)
    assert values.max() == pytest.approx(float(dm.decision_value(NOISY, PRIOR)))
    assert dm.deviation_plans(3, 3).shape == (27, 3)


def test_batched_jit_and_vmap_agree():
    key = jax.random.key(0)
    logits = jax.random.normal(key, (5, 3, 2, 2))
    ex = dm.softmax_experiment(logits, temperature=0.5)
    np.testing.assert_allclose(np.asarray(ex.sum(-1)), 1.0, atol=1e-6)
    prior = jnp.array([0.6, 0.4])
    direct = dm.decision_value(ex, prior)
    vmapped = jax.jit(jax.vmap(jax.vmap(lambda e: dm.decision_value(e, prior))))(ex)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(vmapped), atol=1e-6)
    assert direct.shape == (5, 3)


def test_non_stochastic_experiments_are_rejected():
    dm.check_experiment(np.asarray(NOISY))
    with pytest.raises(ValueError, match=r"not row-stochastic.*sums to 1\.1"):
        dm.check_experiment(np.array([[0.9, 0.2], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="negative entry"):
        dm.check_experiment(np.array([[1.2, -0.2], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="NaN"):
        dm.check_experiment(np.array([[np.nan, 1.0], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="3 states"):
        dm.check_experiment(np.eye(2), n_states=3)


def test_priors_off_the_simplex_are_rejected():
    dm.check_prior(np.array([0.25, 0.75]))
    with pytest.raises(ValueError, match=r"off the simplex.*sum to 0\.8"):
        dm.check_prior(np.array([0.3, 0.5]))
    with pytest.raises(ValueError, match="negative"):
        dm.check_prior(np.array([1.5, -0.5]))
    with pytest.raises(ValueError, match="states >= 2"):
        dm.check_prior(np.array([1.0]))
