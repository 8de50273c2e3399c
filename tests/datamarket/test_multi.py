"""Several buyers: gains by hand, closed-form optima by Monte Carlo, the conformance checker,
joint misreport-and-disobey deviations, and a training smoke test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

import datamarket as dm
from diffecon import TrainConfig, check_mechanism, evaluate
from diffecon.regret import RegretConfig

U_EXPOST = dm.MARKET_SETTINGS["dm_2_uniform_theta0.5_alpha0.5_expost"]
U_BIC = dm.MARKET_SETTINGS["dm_2_uniform_theta0.5_alpha0.5_bic"]


def test_gains_by_hand():
    experiments = jnp.stack([jnp.eye(2), jnp.array([[1.0, 0.0], [1.0, 0.0]])])
    gains = dm.market_gains(experiments, U_EXPOST)
    np.testing.assert_allclose(np.asarray(gains["x"]), [1.0, 0.5])
    # buyer 0: 1 - 0.5 * 0.5 - (0.5 - 0.5); buyer 1: 0.5 - 0.5 * 1 - 0
    np.testing.assert_allclose(np.asarray(gains["gain_obedient"]), [0.75, 0.0])
    assert U_EXPOST.outside_coefficient == 0.0 and U_EXPOST.gain_cap == 1.0


@pytest.mark.parametrize(
    "name",
    [
        "dm_2_uniform_theta0.5_alpha0.5_expost",
        "dm_2_uniform_theta0.75_alpha2_expost",
        "dm_2_asym_theta0.5_alpha2_expost",
        "dm_2_uniform_theta0.5_alpha0.5_bic",
        pytest.param("dm_2_irr_theta0.5_alpha0.5_bic", marks=pytest.mark.slow),
    ],
)
def test_closed_form_optima_by_monte_carlo(name):
    setting = dm.MARKET_SETTINGS[name]
    mech = dm.ExPostOptimal(setting) if setting.incentive == "expost" else dm.BICOptimal(setting)
    n = 100_000 if setting.incentive == "expost" else 40_000  # the BIC payments bisect: slower
    est = evaluate(mech, setting, key=jax.random.key(0), n_samples=n)
    assert est["revenue"].within(setting.optimum, n_se=3.0, atol=1e-4)


def test_three_buyer_optimum_matches_its_virtual_value_formula():
    setting = dm.MARKET_SETTINGS["dm_3_uniform_theta0.5_alpha0.5_expost"]
    values = np.random.default_rng(0).random((400_000, 3))
    phi = 2 * values - 1
    rest = phi.sum(-1, keepdims=True) - phi
    formula = float(0.5 * np.maximum(phi - 0.5 * rest, 0).sum(-1).mean())
    est = evaluate(dm.ExPostOptimal(setting), setting, key=jax.random.key(1), n_samples=200_000)
    assert est["revenue"].within(formula, n_se=4.0)


def test_irregular_distribution_is_ironed():
    irr = dm.PiecewiseUniform((0.0, 0.3, 0.8), (0.75, 0.25))
    v = jnp.linspace(0.0, 0.8, 801)
    phi = np.asarray(irr.virtual_value(v))
    assert np.all(np.diff(phi) >= -1e-6)  # non-decreasing after ironing
    flat = phi[(np.asarray(v) > 0.245) & (np.asarray(v) < 0.43)]
    np.testing.assert_allclose(flat, 0.07639, atol=2e-4)  # the ironed interval's value
    assert float(irr.virtual_value(jnp.array(0.1))) == pytest.approx(2 * 0.1 - 0.4, abs=1e-4)


def test_conformance_checker_on_closed_forms_and_networks():
    check_mechanism(dm.ExPostOptimal(U_EXPOST), U_EXPOST)
    # BIC payments are interim: a profile may be ex post below the outside option
    check_mechanism(dm.BICOptimal(U_BIC), U_BIC, require_ir=False)
    from flax import nnx

    check_mechanism(dm.MarketNet(U_EXPOST, hidden=8, rngs=nnx.Rngs(0)), U_EXPOST)
    check_mechanism(dm.MarketNet(U_BIC, hidden=8, rngs=nnx.Rngs(0)), U_BIC, require_ir=False)


def test_optimal_mechanisms_have_no_regret_obedience_or_ir_violation():
    est = dm.evaluate_market(
        dm.ExPostOptimal(U_EXPOST),
        U_EXPOST,
        key=jax.random.key(0),
        n_samples=20_000,
        regret_profiles=40,
        regret_config=RegretConfig.quick(),
    )
    assert est["regret"].value < 1e-5
    assert est["obedience_violation"].value < 1e-6 and est["ir_violation"].value < 1e-6
    interim = dm.interim_metrics(
        dm.BICOptimal(U_BIC), U_BIC, key=jax.random.key(1), n_types=200, n_others=400, n_reports=200
    )
    assert interim["regret"].value < 1e-3
    assert interim["obedience_violation"].value < 1e-5
    assert interim["ir_violation"].value < 1e-5


@struct.dataclass
class _WrongAdvice:
    """Full information with the labels swapped, for free: obeying is always wrong."""

    setting: dm.MarketSetting = struct.field(pytree_node=False)

    def market_outcome(self, bids):
        flip = jnp.array([[0.0, 1.0], [1.0, 0.0]])
        ex = jnp.broadcast_to(flip, (*bids.shape[:-1], 2, 2))
        return dm.MarketOutcome(experiments=ex, pay=jnp.zeros(bids.shape[:-1]))

    def __call__(self, bids):
        out = self.market_outcome(bids)
        gains = dm.market_gains(out.experiments, self.setting)
        from diffecon import Outcome

        return Outcome(alloc=gains["gain_deviate"][..., None], pay=out.pay)


def test_disobedience_is_found_as_obedience_violation_and_joint_regret():
    est = dm.evaluate_market(
        _WrongAdvice(U_EXPOST),
        U_EXPOST,
        key=jax.random.key(0),
        n_samples=20_000,
        regret_profiles=40,
        regret_config=RegretConfig.quick(),
    )
    assert est["obedience_violation"].within(1.0, atol=1e-6)
    # disobeying turns x = 0 into 1: a gain of v_i, 1/2 on average
    assert est["regret"].within(0.5, n_se=4.0)


def test_market_settings_reject_bad_priors():
    import dataclasses

    with pytest.raises(ValueError, match="off the simplex"):
        dataclasses.replace(U_EXPOST, prior=(0.5, 0.6))
    with pytest.raises(ValueError, match="unknown data-market setting"):
        dm.get_setting("dm_2_uniform_theta0.5_alpha0.5_expst")


@pytest.mark.parametrize("name", [U_EXPOST.name, U_BIC.name])
def test_training_smoke_and_checkpoint_roundtrip(name, tmp_path):
    setting = dm.MARKET_SETTINGS[name]
    config = dm.MarketTrainConfig(hidden=16, batch_size=32, misreport_grid=8, bic_types=16)
    model, result = dm.train_market(
        setting, config, TrainConfig(steps=40, progress=False, log_every=20)
    )
    last = result.history[-1]
    assert all(np.isfinite(last[k]) for k in ("revenue", "regret", "obedience", "ir"))
    assert last["revenue"] > 0
    dm.save_market(model, tmp_path / "ck", config=config, step=40)
    loaded, loaded_config, _ = dm.load_market(tmp_path / "ck", setting)
    assert loaded_config == config
    bids = setting.sample(jax.random.key(0), (8,))
    np.testing.assert_array_equal(np.asarray(loaded(bids).pay), np.asarray(model(bids).pay))
    other = U_BIC if name == U_EXPOST.name else U_EXPOST
    with pytest.raises(ValueError, match="holds a market for"):
        dm.load_market(tmp_path / "ck", other)
