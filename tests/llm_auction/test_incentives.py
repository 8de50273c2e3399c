"""One position's auction as a mechanism of the core: conformance and regret."""

import jax
import numpy as np
import pytest

import llm_auction as la
from diffecon import check_mechanism
from diffecon.regret import RegretConfig, regret_search

from .conftest import random_distributions

# (rule, payment, valuation, allocation measures sum to at most 1 over the agents)
CASES = [
    ("linear", "race", "token_change", True),
    ("linear", "envelope", "tv", True),
    ("linear", "myerson", "kl", False),
    ("log_linear", "envelope", "tv", False),
    ("log_linear", "myerson", "kl", False),
    ("linear", "first_price", "tv", True),
]


def _auction(rule, payment, valuation, n_agents=3):
    log_probs = random_distributions(jax.random.key(7), n_agents, 8)
    return la.PositionAuction(log_probs, rule=rule, payment=payment, valuation=valuation)


@pytest.mark.parametrize(("rule", "payment", "valuation", "unit"), CASES)
def test_conformance_checker_passes(rule, payment, valuation, unit):
    # An agent's allocation is a measure of how far its bid moved the distribution; under the
    # linear rule's TV and token-change measures they share one unit, under KL and the log-linear
    # rule they need not, so the checker's single-good feasibility applies only there.
    check_mechanism(
        _auction(rule, payment, valuation),
        la.bid_setting(3),
        feasibility_tol=1e-5 if unit else float("inf"),
    )


@pytest.mark.parametrize(
    ("rule", "payment", "valuation", "truthful"),
    [
        ("linear", "race", "token_change", True),
        ("linear", "envelope", "tv", True),
        ("log_linear", "myerson", "kl", True),
        ("linear", "first_price", "tv", False),
    ],
)
def test_regret_search_separates_truthful_payments_from_first_price(
    rule, payment, valuation, truthful
):
    setting = la.bid_setting(2)
    values = setting.sample(jax.random.key(1), (16,))
    config = RegretConfig(
        grid_points=41, n_starts=4, n_grid_starts=2, n_noise_starts=1, steps=30, learning_rate=0.02
    )
    found = regret_search(
        _auction(rule, payment, valuation, n_agents=2),
        values,
        key=jax.random.key(2),
        setting=setting,
        config=config,
    )
    worst = float(np.max(found.regret))
    if truthful:
        assert worst < 1e-4
    else:
        assert worst > 1e-2  # shading the bid pays under first price
