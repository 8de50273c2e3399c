"""Aggregation rules: closed forms, log-space safety, the reference agent and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_auction import (
    agent_log_probs,
    aggregate,
    check_auction_inputs,
    kl_divergence,
    linear_rule,
    log_linear_rule,
    stack_distributions,
)
from tests.llm_auction.conftest import random_distributions

P = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], np.float32)


def test_linear_rule_is_the_bid_weighted_mixture():
    q = jnp.exp(aggregate(jnp.log(P), jnp.array([3.0, 1.0])))
    np.testing.assert_allclose(q, 0.75 * P[0] + 0.25 * P[1], atol=1e-6)


def test_log_linear_rule_is_the_normalised_geometric_mean():
    q = jnp.exp(aggregate(jnp.log(P), jnp.array([1.0, 3.0]), rule="log_linear"))
    g = P[0] ** 0.25 * P[1] ** 0.75
    np.testing.assert_allclose(q, g / g.sum(), atol=1e-6)


@pytest.mark.parametrize("rule", ["linear", "log_linear"])
def test_rules_depend_only_on_bid_ratios(rule):
    lp = random_distributions(jax.random.key(0), 3, 11)
    a = aggregate(lp, jnp.array([0.5, 2.0, 1.0]), rule=rule)
    b = aggregate(lp, jnp.array([5.0, 20.0, 10.0]), rule=rule)
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "log_linear"])
def test_rules_minimise_their_weighted_kl_objective(rule):
    """Linear minimises sum w KL(p_i || q), log-linear sum w KL(q || p_i): no perturbation wins."""
    lp = random_distributions(jax.random.key(1), 3, 6)
    bids = jnp.array([1.0, 2.0, 0.5])
    w = bids / bids.sum()
    log_q = aggregate(lp, bids, rule=rule)

    def objective(log_q):
        if rule == "linear":
            return jnp.sum(w * kl_divergence(lp, log_q[None]))
        return jnp.sum(w * kl_divergence(log_q[None], lp))

    best = objective(log_q)
    for k in range(20):
        noise = 0.05 * jax.random.normal(jax.random.key(k), log_q.shape)
        assert objective(jax.nn.log_softmax(log_q + noise)) >= best - 1e-6


def test_log_space_is_safe_for_tiny_probabilities():
    lp = jnp.array([[-200.0, -300.0, 0.0], [-400.0, 0.0, -250.0]])
    lp = jax.nn.log_softmax(lp)
    for rule in ("linear", "log_linear"):
        log_q = aggregate(lp, jnp.array([1.0, 1.0]), rule=rule)
        assert np.all(np.isfinite(np.asarray(log_q)))
        assert abs(float(jnp.sum(jnp.exp(log_q))) - 1) < 1e-5


def test_log_linear_zero_probability_vetoes_a_token_and_full_veto_falls_back():
    lp = stack_distributions([np.array([0.5, 0.5, 0.0]), np.array([0.2, 0.3, 0.5])])
    q = jnp.exp(aggregate(lp, jnp.array([1.0, 1.0]), rule="log_linear"))
    assert float(q[2]) == 0.0 and abs(float(q.sum()) - 1) < 1e-6
    disjoint = stack_distributions([np.array([1.0, 0.0]), np.array([0.0, 1.0])])
    q = jnp.exp(log_linear_rule(disjoint, jnp.array([0.5, 0.5])))
    np.testing.assert_allclose(q, [0.5, 0.5], atol=1e-6)  # the linear rule's answer


def test_zero_bid_agent_has_no_influence():
    lp = random_distributions(jax.random.key(2), 3, 5)
    for rule in ("linear", "log_linear"):
        a = aggregate(lp, jnp.array([1.0, 2.0, 0.0]), rule=rule)
        b = aggregate(lp[:2], jnp.array([1.0, 2.0]), rule=rule)
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_reference_agent_gets_its_fixed_weight():
    ref = jnp.log(jnp.array([0.25, 0.25, 0.5]))
    q = jnp.exp(
        aggregate(jnp.log(P), jnp.array([1.0, 1.0]), reference_log_probs=ref, reference_weight=0.2)
    )
    np.testing.assert_allclose(q, 0.2 * np.exp(ref) + 0.4 * P[0] + 0.4 * P[1], atol=1e-6)
    # with a reference agent, all-zero bids are allowed: the reference decides alone
    q0 = aggregate(jnp.log(P), jnp.zeros(2), reference_log_probs=ref, reference_weight=0.2)
    np.testing.assert_allclose(jnp.exp(q0), jnp.exp(ref), atol=1e-6)


def test_user_supplied_rule_and_batching_under_jit():
    def power_mean(log_probs, weights):  # any callable (log_probs, weights) -> log q
        return jax.nn.log_softmax(linear_rule(2 * log_probs, weights) / 2)

    lp = jnp.stack([random_distributions(jax.random.key(k), 2, 7) for k in range(4)])
    bids = jnp.ones((4, 2))
    out = jax.jit(lambda lp, b: aggregate(lp, b, rule=power_mean))(lp, bids)
    assert out.shape == (4, 7)
    np.testing.assert_allclose(jnp.exp(out).sum(-1), 1.0, atol=1e-5)


def test_temperature_and_top_k_act_inside_each_agent():
    logits = jnp.array([2.0, 1.0, 0.0, -1.0])
    lp = agent_log_probs(logits, temperature=0.5, top_k=2)
    p = jnp.exp(lp)
    assert float(p[2]) == 0.0 and float(p[3]) == 0.0
    np.testing.assert_allclose(p[:2], jax.nn.softmax(jnp.array([4.0, 2.0])), atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        agent_log_probs(logits, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        agent_log_probs(logits, top_k=9)


@pytest.mark.parametrize(
    ("bids", "match"),
    [
        ([1.0, -0.5], "non-negative"),
        ([1.0, float("nan")], "finite"),
        ([0.0, 0.0], "all bids are zero"),
    ],
)
def test_bad_bids_are_rejected(bids, match):
    with pytest.raises(ValueError, match=match):
        aggregate(jnp.log(P), jnp.array(bids))


def test_vocabularies_of_different_sizes_are_rejected():
    with pytest.raises(ValueError, match="different sizes"):
        stack_distributions([np.ones(3) / 3, np.ones(4) / 4])
    with pytest.raises(ValueError, match="same vocabulary"):
        check_auction_inputs(
            jnp.log(P),
            jnp.ones(2),
            reference_log_probs=jnp.log(jnp.ones(4) / 4),
            reference_weight=0.1,
        )


def test_distributions_that_do_not_sum_to_one_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        stack_distributions([np.array([0.5, 0.4]), np.array([0.5, 0.5])])
    with pytest.raises(ValueError, match="sum to 1"):
        aggregate(jnp.log(jnp.array([[0.6, 0.6], [0.5, 0.5]])), jnp.ones(2))
    with pytest.raises(ValueError, match="negative"):
        stack_distributions([np.array([1.2, -0.2]), np.array([0.5, 0.5])])
    with pytest.raises(ValueError, match="NaN"):
        aggregate(jnp.array([[jnp.nan, 0.0], [-0.7, -0.7]]), jnp.ones(2))


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="matching bids"):
        check_auction_inputs(jnp.log(P), jnp.ones(3))
