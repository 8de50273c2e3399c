"""Monotonicity: the linear rule passes both readings; the spec's log-linear counterexample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_auction import aggregate, check_monotonicity, format_report, monotonicity_report


def test_linear_rule_passes_both_monotonicity_checks_on_10000_random_cases():
    report = monotonicity_report({"linear": "linear"}, key=jax.random.key(0), n_cases=10_000)
    for prop in ("coordinatewise", "segment", "kl_forward"):
        assert report["linear"][prop]["pass_rate"] == 1.0, (prop, report["linear"][prop])
        assert report["linear"][prop]["n_cases"] == 10_000
    assert "| linear |" in format_report(report)


def test_spec_log_linear_counterexample():
    """q_-i = (.98, .01, .01), p_i = (.01, .01, .98): the middle token rises, then falls."""
    lp = jnp.log(jnp.array([[0.98, 0.01, 0.01], [0.01, 0.01, 0.98]]))
    xs = jnp.concatenate([jnp.zeros(1), jnp.logspace(-2, 2, 81)])
    bids = jnp.stack([jnp.ones_like(xs), xs], axis=1)
    q_mid = np.asarray(
        jnp.exp(aggregate(jnp.broadcast_to(lp, (81 + 1, 2, 3)), bids, rule="log_linear"))[:, 1]
    )
    peak = int(np.argmax(q_mid))
    assert q_mid[peak] > 0.04 > 0.0101 > q_mid[0] - 1e-6 and q_mid[-1] < 0.02
    assert np.all(np.diff(q_mid[: peak + 1]) >= -1e-7) and np.all(np.diff(q_mid[peak:]) <= 1e-7)
    check = check_monotonicity(lp, jnp.ones(2), agent=1, rule="log_linear")
    assert not check.holds["coordinatewise"] and not check.holds["segment"]
    assert check.holds["kl_reverse"]  # it still lowers agent i's own KL(q || p_i)
    assert check.violation["coordinatewise"] > 1e-3
    linear = check_monotonicity(lp, jnp.ones(2), agent=1, rule="linear")
    assert all(linear.holds.values())


def test_report_says_log_linear_fails_coordinatewise_on_random_cases():
    report = monotonicity_report(key=jax.random.key(1), n_cases=500)
    assert report["log_linear"]["coordinatewise"]["pass_rate"] < 0.5
    assert report["log_linear"]["kl_reverse"]["pass_rate"] == 1.0


def test_checker_rejects_bad_arguments():
    lp = jnp.log(jnp.array([[0.5, 0.5], [0.2, 0.8]]))
    with pytest.raises(ValueError, match="agent"):
        check_monotonicity(lp, jnp.ones(2), agent=2)
    with pytest.raises(ValueError, match="increasing"):
        check_monotonicity(lp, jnp.ones(2), agent=0, xs=jnp.array([1.0, 0.5]))
