"""Race payments against their closed form, envelope and Myerson payments, stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffecon import mean_estimate
from llm_auction import (
    draw_race,
    envelope_expected_payments,
    linear_expected_payments,
    myerson_payments,
    race,
    race_expected_payments,
    token_disagreement,
)
from tests.llm_auction.conftest import random_distributions

N_DRAWS = 100_000


def _realised(probs, bids, key, reference_probs=None, reference_weight=0.0):
    def one(k):
        out = race(
            probs,
            bids,
            draw_race(k, bids.shape[0]),
            reference_probs=reference_probs,
            reference_weight=reference_weight,
        )
        return out.payments, out.token

    return jax.jit(jax.vmap(one))(jax.random.split(key, N_DRAWS))


@pytest.mark.parametrize(
    "bids",
    [
        [0.3, 2.0],
        [1.0, 2.0, 3.0],
        pytest.param([1.0, 1.0], marks=pytest.mark.slow),
        pytest.param([0.5, 4.0, 1.0, 2.0], marks=pytest.mark.slow),
        pytest.param([2.0, 0.0, 1.0], marks=pytest.mark.slow),
    ],
)
def test_realised_race_payments_match_their_closed_form_within_3_se(bids):
    bids = jnp.asarray(bids)
    n = bids.shape[0]
    probs = jnp.exp(random_distributions(jax.random.key(n), n, 7))
    pays, tokens = _realised(probs, bids, jax.random.key(10 + n))
    expected = np.asarray(race_expected_payments(probs, bids))
    for i in range(n):
        est = mean_estimate(pays[:, i])
        assert est.within(float(expected[i]), 3.0, atol=1e-7), (i, est, expected[i])
    # the race samples from the linear rule's q
    q = (bids[:, None] * probs).sum(0) / bids.sum()
    freq = np.bincount(np.asarray(tokens), minlength=7) / N_DRAWS
    np.testing.assert_allclose(freq, q, atol=4 * np.sqrt(0.25 / N_DRAWS))


def test_two_agents_race_equals_the_envelope_formula_of_the_linear_rule():
    for seed in range(4):
        lp = random_distributions(jax.random.key(seed), 2, 9)
        bids = jnp.array([0.4 + seed, 1.3])
        race_e = jax.jit(race_expected_payments)(jnp.exp(lp), bids)
        closed = jax.jit(linear_expected_payments)(jnp.exp(lp), bids)
        numeric = jax.jit(envelope_expected_payments)(lp, bids)
        np.testing.assert_allclose(race_e, closed, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(numeric, closed, rtol=1e-3, atol=1e-6)


def test_envelope_quadrature_matches_the_closed_form_for_many_agents():
    lp = random_distributions(jax.random.key(5), 4, 6)
    bids = jnp.array([0.7, 1.0, 2.5, 0.2])
    np.testing.assert_allclose(
        jax.jit(envelope_expected_payments)(lp, bids),
        linear_expected_payments(jnp.exp(lp), bids),
        rtol=1e-3,
        atol=1e-6,
    )


def test_race_pays_more_than_the_tv_envelope_when_the_others_disagree():
    """Three agents: p_1 is the others' mixture, so q does not depend on b_1 and the envelope
    formula charges 0; the race still lets agent 1 change the realised token, and charges."""
    probs = jnp.array([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]])
    bids = jnp.array([1.0, 1.0, 1.0])
    assert float(linear_expected_payments(probs, bids)[0]) == pytest.approx(0.0, abs=1e-7)
    assert float(race_expected_payments(probs, bids)[0]) > 0.05
    d = token_disagreement(probs)
    assert float(d[1, 2]) == pytest.approx(1.0)  # point masses on different tokens
    np.testing.assert_allclose(d, d.T, atol=1e-6)


@pytest.mark.parametrize("kind", ["race", "envelope_linear", "envelope_log_linear", "myerson"])
def test_payments_are_non_decreasing_in_own_bid_and_zero_at_zero(kind):
    lp = random_distributions(jax.random.key(7), 3, 8)
    xs = jnp.concatenate([jnp.zeros(1), jnp.logspace(-3, 2, 40)])

    def pay(x):
        bids = jnp.array([x, 1.0, 0.5])
        if kind == "race":
            return race_expected_payments(jnp.exp(lp), bids)[0]
        if kind == "myerson":
            return myerson_payments(lp, bids)[0]
        rule = "linear" if kind == "envelope_linear" else "log_linear"
        return envelope_expected_payments(lp, bids, rule=rule)[0]

    z = np.asarray(jax.jit(jax.vmap(pay))(xs))
    assert z[0] == 0.0
    assert np.all(np.diff(z) >= -1e-6 * (1 + z[1:])), z
    assert z[-1] > 0


def test_race_is_stable_and_charges_the_critical_bid():
    """With the draws fixed, the token changes at most once as b_0 grows, at theta_0."""
    probs = jnp.exp(random_distributions(jax.random.key(3), 3, 5))
    bids = jnp.array([1.0, 0.8, 1.7])
    xs = jnp.concatenate([jnp.zeros(1), jnp.logspace(-3, 3, 300)])

    @jax.jit
    def sweep(key):
        draws = draw_race(key, 3)
        tokens = jax.vmap(lambda x: race(probs, bids.at[0].set(x), draws).token)(xs)
        return tokens, race(probs, bids, draws)

    all_tokens, outs = jax.vmap(sweep)(jax.random.split(jax.random.key(0), 200))
    for k in range(200):
        tokens = np.asarray(all_tokens[k])
        moved = tokens[1:] != tokens[:-1]
        assert moved.sum() <= 1
        theta = float(outs.thresholds[k, 0])
        if moved.any():
            at = int(np.argmax(moved))
            assert float(xs[at]) <= theta <= float(xs[at + 1])
        won = int(outs.winner[k]) == 0
        changed = int(outs.agent_tokens[k, 0]) != int(tokens[0])
        assert float(outs.payments[k, 0]) == pytest.approx(theta if won and changed else 0.0)


def test_reference_agent_scales_expected_payments():
    probs = jnp.exp(random_distributions(jax.random.key(8), 2, 6))
    ref = jnp.exp(random_distributions(jax.random.key(9), 1, 6))[0]
    bids = jnp.array([1.0, 2.0])
    pays, _ = _realised(probs, bids, jax.random.key(4), reference_probs=ref, reference_weight=0.3)
    expected = race_expected_payments(probs, bids, reference_weight=0.3)
    for i in range(2):
        assert mean_estimate(pays[:, i]).within(float(expected[i]), 3.0)
    numeric = jax.jit(
        lambda lp, b, r: envelope_expected_payments(
            lp, b, reference_log_probs=r, reference_weight=0.3
        )
    )(jnp.log(probs), bids, jnp.log(ref))
    np.testing.assert_allclose(numeric, expected, rtol=1e-3)


def test_single_bidder_pays_nothing():
    lp = random_distributions(jax.random.key(1), 2, 4)
    bids = jnp.array([2.0, 0.0])
    assert float(envelope_expected_payments(lp, bids)[0]) == 0.0
    assert float(race_expected_payments(jnp.exp(lp), bids)[0]) == 0.0
    assert float(myerson_payments(lp, bids)[0]) == 0.0


def test_payment_functions_reject_bad_input():
    lp = random_distributions(jax.random.key(1), 2, 4)
    with pytest.raises(ValueError, match="non-negative"):
        envelope_expected_payments(lp, jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="all bids are zero"):
        myerson_payments(lp, jnp.zeros(2))
