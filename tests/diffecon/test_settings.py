import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffecon
from diffecon.distributions import Discrete, Exponential, Lomax, Uniform
from diffecon.evaluation import mean_estimate


def test_every_spec_setting_is_registered():
    names = set(diffecon.list_settings())
    spec = {
        "single_item_2_uniform", "single_item_3_uniform", "single_item_5_uniform",
        "additive_1x2_uniform", "unit_1x2_uniform", "unit_1x2_uniform_23",
        "additive_1x2_uniform_416_47", "additive_1x10_uniform", "additive_2x2_uniform",
        "additive_2x3_uniform", "additive_3x3_uniform", "additive_2x5_uniform",
        "additive_3x10_uniform", "additive_5x10_uniform", "yao_2x2_discrete_37",
        "exponential_3x1", "lomax_1x2", "CA_sym_uniform_12", "CA_asym_uniform_12_15",
    }  # fmt: skip
    assert spec <= names


@pytest.mark.parametrize("name", diffecon.list_settings())
def test_samples_have_the_setting_shape_and_support(name, key):
    s = diffecon.get_setting(name)
    v = s.sample(key, (4096,))
    assert v.shape == (4096, *s.shape) and v.dtype == jnp.float32
    assert np.all(np.asarray(v) >= s.low - 1e-6)
    assert np.all(np.asarray(v) <= s.high + 1e-5)
    np.testing.assert_array_equal(v, s.sample(key, (4096,)))  # same key, same draws


def test_unknown_setting_names_close_matches():
    with pytest.raises(ValueError, match=r"unknown setting 'additive_2x2_unifrm'.*additive_2x2"):
        diffecon.get_setting("additive_2x2_unifrm")


def test_itemwise_reference_values_match_the_spec():
    assert diffecon.get_setting("single_item_2_uniform").reference("myerson").value == 5 / 12
    assert diffecon.get_setting("single_item_3_uniform").reference("myerson").value == 0.53125
    assert diffecon.get_setting("single_item_5_uniform").reference("myerson").value == 0.671875
    ref = diffecon.get_setting("additive_3x10_uniform").reference("itemwise_myerson")
    assert ref.value == pytest.approx(5.3125)
    ref = diffecon.get_setting("additive_5x10_uniform").reference("itemwise_myerson")
    assert ref.value == pytest.approx(6.71875)


@pytest.mark.parametrize(
    ("marginal", "mean"),
    [(Uniform(2.0, 3.0), 2.5), (Exponential(3.0), 3.0), (Lomax(5.0), 0.25), (Lomax(6.0), 0.2)],
)
def test_marginal_means_by_monte_carlo(marginal, mean, key):
    x = marginal.icdf(jax.random.uniform(key, (200_000,)))
    assert mean_estimate(x).within(mean, n_se=4.0)


def test_virtual_values_vanish_at_the_myerson_reserve():
    for m in (Uniform(0.0, 1.0), Uniform(2.0, 3.0), Exponential(3.0), Lomax(5.0)):
        r = m.myerson_reserve()
        if r > m.low:
            assert float(m.virtual_value(jnp.asarray(r))) == pytest.approx(0.0, abs=1e-6)


def test_discrete_virtual_values_and_sampling(key):
    d = Discrete((3.0, 7.0), (0.5, 0.5))
    np.testing.assert_allclose(d.discrete_virtual_values(), [-1.0, 7.0])
    assert d.myerson_reserve() == 7.0
    x = np.asarray(d.icdf(jax.random.uniform(key, (100_000,))))
    assert set(np.unique(x)) == {3.0, 7.0}
    assert mean_estimate(x == 7.0).within(0.5, n_se=4.0)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Uniform(1.0, 0.0),
        lambda: Uniform(-1.0, 1.0),
        lambda: Discrete((1.0, 2.0), (0.3, 0.3)),
        lambda: Discrete((2.0, 1.0), (0.5, 0.5)),
        lambda: Exponential(-1.0),
    ],
)
def test_bad_distributions_are_rejected(bad):
    with pytest.raises(ValueError):
        bad()


def test_combinatorial_bundle_value_is_sum_plus_complementarity(key):
    s = diffecon.get_setting("CA_sym_uniform_12")
    v = np.asarray(s.sample(key, (50_000,)))
    c = v[..., 2] - v[..., 0] - v[..., 1]
    assert c.min() >= -1 - 1e-5 and c.max() <= 1 + 1e-5
    assert abs(c.mean()) < 0.02
    np.testing.assert_array_equal(s.bundles, [[1, 0], [0, 1], [1, 1]])


def test_feasibility_violation():
    add = diffecon.get_setting("additive_2x2_uniform")
    ok = jnp.array([[0.5, 1.0], [0.5, 0.0]])
    over = jnp.array([[0.7, 1.0], [0.5, 0.0]])
    assert float(add.feasibility_violation(ok)) == 0.0
    assert float(add.feasibility_violation(over)) == pytest.approx(0.2)
    unit = diffecon.get_setting("unit_2x2_uniform")
    assert float(unit.feasibility_violation(jnp.array([[1.0, 1.0], [0.0, 0.0]]))) == 1.0
    ca = diffecon.get_setting("CA_sym_uniform_12")
    # bidder 0 gets {1,2} and bidder 1 gets {1}: item 1 is used twice
    assert float(ca.feasibility_violation(jnp.array([[0, 0, 1.0], [1.0, 0, 0]]))) == 1.0
    assert float(ca.feasibility_violation(jnp.array([[1.0, 0, 0], [0, 1.0, 0]]))) == 0.0
