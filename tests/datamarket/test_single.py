"""Single buyer: the closed forms by Monte Carlo, the LP oracle, and the learned menu."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import datamarket as dm
from diffecon import TrainConfig

UNIFORM = dm.SINGLE_BUYER_SETTINGS["dm_single_uniform"]
MIX = dm.SINGLE_BUYER_SETTINGS["dm_single_mix"]
ENLARGED = dm.SINGLE_BUYER_SETTINGS["dm_single_enlarged_uniform"]
THREE = dm.SINGLE_BUYER_SETTINGS["dm_single_3actions"]


def test_closed_forms_by_monte_carlo():
    key = jax.random.key(0)
    est = dm.evaluate_menu(dm.full_information_menu(0.25), UNIFORM, key=key, n_samples=200_000)
    assert est["revenue"].within(1 / 8)
    assert est["bought_informative"].within(0.5)
    for metric in ("regret", "obedience_violation", "ir_violation"):
        assert est[metric].value < 1e-6
    est = dm.evaluate_menu(dm.full_information_menu(0.14233), ENLARGED, key=key, n_samples=200_000)
    assert est["revenue"].within(0.05091)
    two = dm.evaluate_menu(dm.mix_two_item_menu(), MIX, key=key, n_samples=200_000)["revenue"]
    one = dm.evaluate_menu(dm.full_information_menu(0.2551), MIX, key=key, n_samples=200_000)[
        "revenue"
    ]
    assert two.within(0.16732)
    assert two.value > one.value + 0.01  # the partial item earns its place


def test_a_menu_with_a_dominated_item_has_no_regret_and_the_choice_is_by_utility():
    menu = dm.Menu(experiments=jnp.stack([jnp.eye(2), jnp.eye(2)]), prices=jnp.array([0.2, 0.3]))
    priors = jnp.array([[0.5, 0.5], [0.9, 0.1]])
    choice = np.asarray(menu.choose(priors, jnp.ones(2)))
    np.testing.assert_array_equal(choice, [0, 2])  # cheap full information; opt out
    est = dm.evaluate_menu(menu, UNIFORM, key=jax.random.key(1), n_samples=10_000)
    assert est["revenue"].within(0.2 * 0.6)


def _best_full_information_on_grid(priors, scales, weights, payoff):
    values = scales * (np.max(payoff, 1) @ priors.T - np.max(priors @ payoff, 1))
    return max(p * weights[values >= p - 1e-12].sum() for p in values)


def test_lp_oracle_agrees_with_the_closed_forms_on_its_grid():
    priors, scales, weights = UNIFORM.grid(100)
    lp = dm.optimal_menu_lp(priors, scales=scales, weights=weights)
    assert lp.max_ic_violation <= 1e-7 and lp.max_obedience_violation <= 1e-7
    best = _best_full_information_on_grid(priors, scales, weights, np.eye(2))
    assert lp.revenue == pytest.approx(best, abs=1e-9)  # full information is optimal on the grid
    assert lp.revenue == pytest.approx(1 / 8, abs=0.005)  # grid spacing 0.01
    priors, scales, weights = MIX.grid(100)
    lp = dm.optimal_menu_lp(priors, scales=scales, weights=weights)
    assert lp.revenue == pytest.approx(0.16732, rel=0.02)
    prices = sorted({round(float(p), 2) for p in lp.prices if p > 1e-6})
    assert prices == [0.14, 0.25]  # the spec's two-item structure


def test_lp_with_three_actions_beats_full_information():
    priors, scales, weights = THREE.grid(60)
    lp = dm.optimal_menu_lp(priors, scales=scales, weights=weights, payoff=THREE.payoff_matrix)
    best = _best_full_information_on_grid(priors, scales, weights, THREE.payoff_matrix)
    assert lp.revenue >= best - 1e-9
    assert lp.experiments.shape == (60, 2, 3)
    np.testing.assert_allclose(lp.experiments.sum(-1), 1.0, atol=1e-9)


def test_lp_rejects_bad_types():
    with pytest.raises(ValueError, match="off the simplex"):
        dm.optimal_menu_lp(np.array([[0.2, 0.2], [0.5, 0.5]]))
    with pytest.raises(ValueError, match="weights must"):
        dm.optimal_menu_lp(np.array([[0.2, 0.8], [0.5, 0.5]]), weights=np.array([0.5, 0.6]))


def test_menu_training_finds_full_information(tmp_path):
    config = dm.MenuTrainConfig(n_items=8, batch_size=1024)
    model, result = dm.train_menu(
        UNIFORM, config, TrainConfig(steps=200, progress=False, log_every=100)
    )
    assert result.history[-1]["revenue_hard"] > 0.11
    menu = dm.prune_menu(model, UNIFORM, key=jax.random.key(0), n_samples=50_000)
    est = dm.evaluate_menu(menu, UNIFORM, key=jax.random.key(1), n_samples=100_000)
    assert est["revenue"].value > 0.115
    assert est["regret"].value < 1e-6 and est["ir_violation"].value == 0.0
    dm.save_menu(model, tmp_path / "ck", types=UNIFORM, config=config, step=200)
    loaded, loaded_config, _ = dm.load_menu(tmp_path / "ck", UNIFORM)
    assert loaded_config == config
    np.testing.assert_array_equal(np.asarray(loaded.prices[...]), np.asarray(model.prices[...]))
    with pytest.raises(ValueError, match="holds a menu for"):
        dm.load_menu(tmp_path / "ck", MIX)
    with pytest.raises(ValueError, match="no menu checkpoint"):
        dm.load_menu(tmp_path / "missing", UNIFORM)
