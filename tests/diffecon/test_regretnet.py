import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffecon.outcome import utility
from diffecon.regretnet import RegretNet, RegretNetConfig, train_regretnet
from diffecon.settings import get_setting
from diffecon.testing import check_mechanism
from diffecon.training import TrainConfig


@pytest.mark.parametrize(
    "name",
    ["additive_2x2_uniform", "unit_2x2_uniform", "additive_1x2_uniform", "additive_3x10_uniform"],
)
def test_regretnet_passes_the_conformance_checker(name):
    s = get_setting(name)
    model = RegretNet(
        n_bidders=s.n_bidders, n_items=s.n_items, valuation=s.valuation, rngs=nnx.Rngs(0)
    )
    check_mechanism(model, s)


def test_unit_demand_allocations_respect_unit_demand(key):
    s = get_setting("unit_2x2_uniform")
    model = RegretNet(n_bidders=2, n_items=2, valuation="unit_demand", rngs=nnx.Rngs(1))
    out = model(s.sample(key, (512,)))
    assert float(jnp.max(jnp.sum(out.alloc, -1))) <= 1 + 1e-6
    assert float(jnp.max(jnp.sum(out.alloc, -2))) <= 1 + 1e-6


def test_ir_holds_by_construction_for_any_weights(key):
    s = get_setting("additive_2x2_uniform")
    model = RegretNet(n_bidders=2, n_items=2, rngs=nnx.Rngs(3))
    v = s.sample(key, (1024,))
    assert float(jnp.min(utility(v, model(v)))) >= -1e-6


def test_combinatorial_settings_are_rejected():
    with pytest.raises(ValueError, match="additive and unit_demand"):
        RegretNet(n_bidders=2, n_items=2, valuation="combinatorial", rngs=nnx.Rngs(0))


def test_short_training_raises_revenue_and_logs_metrics():
    s = get_setting("additive_1x2_uniform")
    cfg = RegretNetConfig(hidden=32, batch_size=64, train_set_size=4096, misreport_steps=5)
    model, result = train_regretnet(
        s, cfg, TrainConfig(steps=300, steps_per_call=50, log_every=50, progress=False)
    )
    revs = [row["revenue"] for row in result.history]
    assert len(revs) == 6 and revs[-1] > revs[0]
    assert {"revenue", "regret", "loss", "lagrange", "rho", "step", "wall_s"} <= set(
        result.history[-1]
    )
    assert isinstance(model, RegretNet)
    check_mechanism(model, s)


def test_save_and_load_round_trip(tmp_path, key):
    s = get_setting("additive_2x2_uniform")
    cfg = RegretNetConfig(hidden=8)
    model = RegretNet(n_bidders=2, n_items=2, hidden=8, rngs=nnx.Rngs(5))
    from diffecon.regretnet import load_regretnet, save_regretnet

    save_regretnet(model, tmp_path / "rn", setting=s, config=cfg, step=7)
    loaded, meta = load_regretnet(tmp_path / "rn", s)
    v = s.sample(key, (16,))
    np.testing.assert_array_equal(model(v).pay, loaded(v).pay)
    assert meta["step"] == 7
    with pytest.raises(ValueError, match="not 'additive_1x2_uniform'"):
        load_regretnet(tmp_path / "rn", get_setting("additive_1x2_uniform"))
    with pytest.raises(ValueError, match="no RegretNet checkpoint"):
        load_regretnet(tmp_path / "nothing", s)


_UNIT_NET = RegretNet(n_bidders=2, n_items=3, valuation="unit_demand", rngs=nnx.Rngs(11))
_UNIT_SETTING_SHAPE = (2, 3)


@settings(max_examples=40, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        (4, *_UNIT_SETTING_SHAPE),
        elements=st.floats(0.0, 10.0, width=32, allow_nan=False),
    )
)
def test_feasible_ir_and_nonnegative_for_any_bids(bids):
    out = _UNIT_NET(jnp.asarray(bids))
    alloc = np.asarray(out.alloc)
    assert alloc.min() >= 0 and alloc.sum(-2).max() <= 1 + 1e-5 and alloc.sum(-1).max() <= 1 + 1e-5
    assert np.asarray(out.pay).min() >= 0
    assert float(jnp.min(utility(jnp.asarray(bids), out))) >= -1e-4
