"""Tests of the shared regret search (``diffecon.regret``).

The mechanisms are tiny local functions ``bids [B, n, m] -> Outcome`` so that these tests depend on
nothing but the kernel. Closed-form oracles: truthful mechanisms (VCG, second price, item-wise
second price with reserve) have zero regret; in first price with two U[0,1] bidders bidder ``i``'s
ex post regret is ``max(v_i - v_j, 0)`` (bid just above the other), whose expectation is 1/6.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffecon.outcome import Outcome
from diffecon.regret import (
    RegretConfig,
    RegretResult,
    ascend_misreports,
    misreport_utility,
    regret_search,
    regret_stats,
)
from diffecon.settings import get_setting

# --------------------------------------------------------------------------------------------------
# Local mechanisms.


def itemwise_second_price(bids, reserve=0.0):
    """Each item to the highest bid if it meets ``reserve``, at max(second bid, reserve)."""
    n = bids.shape[-2]
    top = jnp.argmax(bids, axis=-2)  # [B, items]; ties go to the lowest index
    highest = jnp.max(bids, axis=-2)
    second = jnp.sort(bids, axis=-2)[..., -2, :] if n > 1 else jnp.zeros_like(highest)
    sold = highest >= reserve
    alloc = jax.nn.one_hot(top, n, axis=-2) * sold[..., None, :].astype(bids.dtype)
    price = jnp.maximum(second, reserve)
    return Outcome(alloc=alloc, pay=jnp.sum(alloc * price[..., None, :], axis=-1))


def vcg(bids):
    """VCG for additive bidders: item-wise second price."""
    return itemwise_second_price(bids)


def itemwise_myerson(bids):
    """Item-wise second price with the U[0,1] Myerson reserve 1/2."""
    return itemwise_second_price(bids, reserve=0.5)


def first_price(bids):
    """Each item to the highest bid, who pays its bid."""
    n = bids.shape[-2]
    alloc = jax.nn.one_hot(jnp.argmax(bids, axis=-2), n, axis=-2)
    return Outcome(alloc=alloc, pay=jnp.sum(alloc * bids, axis=-1))


def second_price_with_entry_fee(bids):
    """Second price that also charges every bidder 0.1: as truthful as VCG, but not IR."""
    out = vcg(bids)
    return Outcome(alloc=out.alloc, pay=out.pay + 0.1)


def combinatorial_vcg(bids):
    """VCG over bundles ({1}, {2}, {1,2}) for two bidders and two items.

    Enumerates the 9 ways to give each item to bidder 0, bidder 1 or nobody.
    """
    bundle_of = {(1, 0): 0, (0, 1): 1, (1, 1): 2}  # items held -> bundle index
    assignments = list(itertools.product((None, 0, 1), repeat=2))
    alloc_table = np.zeros((len(assignments), 2, 3), np.float32)
    for a, owners in enumerate(assignments):
        for bidder in (0, 1):
            held = tuple(int(owner == bidder) for owner in owners)
            if held in bundle_of:
                alloc_table[a, bidder, bundle_of[held]] = 1.0
    table = jnp.asarray(alloc_table)  # [assignments, bidders, bundles]
    bidder_welfare = jnp.einsum("bnk,ank->ban", bids, table)  # [B, assignments, bidders]
    best = jnp.argmax(jnp.sum(bidder_welfare, -1), axis=-1)
    alloc = table[best]
    chosen = jnp.take_along_axis(bidder_welfare, best[:, None, None], axis=1)[:, 0]  # [B, n]
    others_alone = jnp.max(bids, axis=-1)[:, ::-1]  # best welfare of the other bidder without i
    pay = others_alone - chosen[:, ::-1]
    return Outcome(alloc=alloc, pay=pay)


class TinyMechanism(nnx.Module):
    """An NNX module mechanism: softmax allocation over bidders + dummy, pay a fraction of value."""

    def __init__(self, n: int, m: int, *, rngs: nnx.Rngs):
        self.n, self.m = n, m
        self.hidden = nnx.Linear(n * m, 16, rngs=rngs)
        self.alloc_head = nnx.Linear(16, (n + 1) * m, rngs=rngs)
        self.pay_head = nnx.Linear(16, n, rngs=rngs)

    def __call__(self, bids):
        batch = bids.shape[0]
        h = jnp.tanh(self.hidden(bids.reshape(batch, self.n * self.m)))
        logits = self.alloc_head(h).reshape(batch, self.n + 1, self.m)
        alloc = jax.nn.softmax(logits, axis=1)[:, : self.n]
        pay = jax.nn.sigmoid(self.pay_head(h)) * jnp.sum(alloc * bids, axis=-1)
        return Outcome(alloc=alloc, pay=pay)


# One batch size for the quick searches, so that tests share compilations (they are cached per
# mechanism, setting, config and chunk shape); compiling is most of these tests' time.
N_QUICK = 48


@functools.cache
def _profiles(setting_name, n_profiles=256):
    """Value profiles of a setting (one sampler compilation per setting and size)."""
    return get_setting(setting_name).sample(jax.random.key(0), n_profiles)


def _search(mechanism, setting_name, n_profiles=N_QUICK, *, config=None, progress=False):
    setting = get_setting(setting_name)
    values = _profiles(setting_name, max(n_profiles, 256))[:n_profiles]
    result = regret_search(
        mechanism,
        values,
        key=jax.random.key(1),
        setting=setting,
        config=RegretConfig.quick() if config is None else config,
        progress=progress,
    )
    return np.asarray(values), result


def _first_price_regret(values):
    """Exact ex post regret in single-item first price: own value minus the best other value."""
    v = values[..., 0]  # [B, n]
    others = np.stack([np.delete(v, i, axis=-1).max(-1) for i in range(v.shape[-1])], -1)
    return np.maximum(v - others, 0.0)


# --------------------------------------------------------------------------------------------------
# Truthful mechanisms, IR.


@pytest.mark.parametrize(
    ("mechanism", "setting_name"),
    [
        (vcg, "additive_2x2_uniform"),
        (vcg, "single_item_2_uniform"),
        (itemwise_myerson, "additive_2x2_uniform"),
        (combinatorial_vcg, "CA_sym_uniform_12"),
        (vcg, "exponential_3x1"),
    ],
)
def test_truthful_mechanisms_have_no_regret(mechanism, setting_name):
    values, result = _search(mechanism, setting_name)
    assert result.regret.shape == values.shape[:2]
    assert result.best_misreport.shape == values.shape
    assert float(jnp.max(result.regret)) < 1e-5
    assert np.all(np.isfinite(np.asarray(result.best_misreport)))


def test_ir_violation_zero_for_vcg_and_positive_when_overcharging():
    setting = get_setting("additive_2x2_uniform")
    values = _profiles("additive_2x2_uniform")[:N_QUICK]
    kwargs = dict(key=jax.random.key(1), setting=setting, config=RegretConfig.quick())
    fair = regret_search(vcg, values, progress=False, **kwargs)
    greedy = regret_search(second_price_with_entry_fee, values, progress=False, **kwargs)
    assert float(jnp.max(fair.ir_violation)) == 0.0
    assert regret_stats(fair)["ir_violation"] == (0.0, 0.0)
    # The fee is charged whatever the bids: incentives are unchanged, every loser is out 0.1.
    assert float(jnp.max(greedy.regret)) < 1e-5
    np.testing.assert_allclose(greedy.truthful_utility, fair.truthful_utility - 0.1, atol=1e-6)
    np.testing.assert_array_equal(greedy.ir_violation, jnp.maximum(-greedy.truthful_utility, 0.0))
    assert regret_stats(greedy)["ir_violation"][0] > 0.01


# --------------------------------------------------------------------------------------------------
# First price: the search finds the analytic regret.


def test_first_price_regret_near_one_sixth():
    values, result = _search(first_price, "single_item_2_uniform", 256, config=RegretConfig())
    exact = _first_price_regret(values)
    np.testing.assert_allclose(result.regret, exact, atol=0.02)
    mean, stderr = regret_stats(result)["regret_mean"]
    assert 0.005 < stderr < 0.01  # sd of |v1 - v2| / 2 is 0.118, over 16 = sqrt(256)
    assert abs(mean - 1 / 6) < 4 * stderr
    assert abs(mean - exact.mean()) < 2e-3


def test_first_price_best_misreport_is_the_other_value():
    values, result = _search(first_price, "single_item_2_uniform", 128, config=RegretConfig())
    v = values[..., 0]
    other = v[:, ::-1]
    best = np.asarray(result.best_misreport)[..., 0]
    winning = v > other + 0.02
    # Bid just above the other's value (or at it, where the tie goes your way).
    assert np.all(np.abs(best[winning] - other[winning]) < 0.02)
    assert np.all(best[winning] >= other[winning] - 1e-6)
    # Losing bidders cannot gain; the best report is then the truthful one.
    losing = v < other
    np.testing.assert_array_equal(np.asarray(result.regret)[losing], 0.0)
    np.testing.assert_array_equal(best[losing], v[losing])


def test_itemwise_first_price_two_items_found_by_grid_and_adam():
    """Two-dimensional misreports: regret is the sum of the per-item first-price regrets."""
    config = RegretConfig.quick(grid_points=41, steps=60)
    values, result = _search(first_price, "additive_2x2_uniform", config=config)
    exact = np.maximum(values - values[:, ::-1], 0.0).sum(-1)
    regret = np.asarray(result.regret)
    assert np.all(regret <= exact + 1e-5)  # no misreport beats the closed form
    np.testing.assert_allclose(regret, exact, atol=0.06)
    assert abs(regret.mean() - exact.mean()) < 0.01


def test_first_price_on_unbounded_support():
    """Exp(mean 3) values: the search box is finite, projection only enforces the lower bound."""
    config = RegretConfig.quick(grid_points=51, steps=60)
    values, result = _search(first_price, "exponential_3x1", config=config)
    exact = _first_price_regret(values)
    regret = np.asarray(result.regret)
    best = np.asarray(result.best_misreport)
    assert np.all(np.isfinite(best))
    assert np.all(best >= 0.0)
    assert np.all(regret <= exact + 1e-4)
    np.testing.assert_allclose(regret, exact, atol=0.45)  # grid spacing ~0.41 on a ~20 wide box
    assert abs(regret.mean() - exact.mean()) < 0.05


@pytest.mark.slow
def test_first_price_regret_one_sixth_strong_protocol():
    values, result = _search(first_price, "single_item_2_uniform", 10_000, config=RegretConfig())
    mean, stderr = regret_stats(result)["regret_mean"]
    assert abs(mean - 1 / 6) < 0.02 * (1 / 6)
    assert stderr < 0.002
    assert abs(mean - _first_price_regret(values).mean()) < 1e-3


# --------------------------------------------------------------------------------------------------
# Mechanism kinds, determinism, compilation.


def test_nnx_module_and_jitted_function_mechanisms():
    module = TinyMechanism(2, 2, rngs=nnx.Rngs(0))
    _, from_module = _search(module, "additive_2x2_uniform")
    assert from_module.regret.shape == (N_QUICK, 2)
    assert np.all(np.isfinite(np.asarray(from_module.regret)))
    assert float(jnp.max(from_module.regret)) > 1e-3  # an untrained network is manipulable
    assert float(jnp.max(from_module.ir_violation)) == 0.0  # pays a fraction of its value
    _, from_jitted = _search(jax.jit(first_price), "single_item_2_uniform")
    _, from_plain = _search(first_price, "single_item_2_uniform")
    np.testing.assert_allclose(from_jitted.regret, from_plain.regret, atol=1e-6)


def test_same_key_same_result_and_chunking_does_not_matter():
    setting = get_setting("single_item_2_uniform")
    values = _profiles("single_item_2_uniform")[:N_QUICK]

    def run(key, chunk):
        config = RegretConfig.quick(profile_chunk=chunk)
        result = regret_search(
            first_price, values, key=key, setting=setting, config=config, progress=False
        )
        return result

    a, b = run(jax.random.key(7), 16), run(jax.random.key(7), 16)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Each profile's starts come from its own key, so cutting the batch differently changes
    # nothing beyond float rounding.
    c = run(jax.random.key(7), RegretConfig.quick().profile_chunk)  # one chunk
    np.testing.assert_allclose(c.regret, a.regret, atol=1e-5)
    d = run(jax.random.key(8), 16)
    assert not np.array_equal(np.asarray(d.best_misreport), np.asarray(a.best_misreport))


def test_one_compilation_for_all_chunks_and_calls():
    setting = get_setting("single_item_2_uniform")
    config = RegretConfig.quick(profile_chunk=16)
    traces = []

    def counting(mechanism):
        def counted(bids):
            traces.append(bids.shape)
            return mechanism(bids)

        return counted

    def count(mechanism, n_profiles):
        traces.clear()
        values = _profiles("single_item_2_uniform")[:n_profiles]
        kwargs = dict(key=jax.random.key(1), setting=setting, config=config, progress=False)
        regret_search(mechanism, values, **kwargs)
        return len(traces)

    counted_first_price = counting(first_price)
    once = count(counted_first_price, 16)
    assert once > 0
    assert count(counting(first_price), 40) == once  # 3 chunks, the last one padded
    assert count(counted_first_price, 40) == 0  # the same mechanism again: cached

    # Modules of one structure share the compilation: their parameters are arguments.
    class CountedMechanism(TinyMechanism):
        def __call__(self, bids):
            traces.append(bids.shape)
            return super().__call__(bids)

    assert count(CountedMechanism(2, 1, rngs=nnx.Rngs(0)), 16) > 0
    assert count(CountedMechanism(2, 1, rngs=nnx.Rngs(1)), 16) == 0


def test_progress_bar_runs(capsys):
    _search(vcg, "single_item_2_uniform", progress=True)
    assert "regret search" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The kernel under jit and vmap, as users apply them.


def test_kernel_under_jit_and_vmap():
    setting = get_setting("additive_2x2_uniform")
    values = _profiles("additive_2x2_uniform")[:15].reshape(3, 5, 2, 2)  # [outer, batch, n, m]
    misreports = _profiles("additive_2x2_uniform")[15:30].reshape(3, 5, 2, 2)
    eager = misreport_utility(first_price, values, misreports)
    jitted = jax.jit(misreport_utility, static_argnums=0)(first_price, values, misreports)
    mapped = jax.vmap(lambda v, r: misreport_utility(first_price, v, r))(values, misreports)
    np.testing.assert_allclose(jitted, eager, atol=1e-6)
    np.testing.assert_allclose(mapped, eager, atol=1e-6)

    def ascend(v, r):
        return ascend_misreports(
            itemwise_myerson, v, r, steps=5, learning_rate=0.05, project=setting.project
        )

    np.testing.assert_allclose(jax.jit(ascend)(values, misreports), ascend(values, misreports))
    np.testing.assert_allclose(
        jax.vmap(ascend)(values, misreports), ascend(values, misreports), atol=1e-6
    )


# --------------------------------------------------------------------------------------------------
# Input validation, configs, statistics.


@pytest.mark.parametrize(
    ("values", "match"),
    [
        (np.full((4, 3, 2), 0.5, np.float32), "shape"),  # three bidders in a 2-bidder setting
        (np.full((4, 2), 0.5, np.float32), "shape"),  # no batch axis
        (np.full((2, 4, 2, 2), 0.5, np.float32), "shape"),  # two batch axes
        (np.full((0, 2, 2), 0.5, np.float32), "no profiles"),
        (np.array([[[0.5, np.nan], [0.1, 0.2]]], np.float32), "NaN"),
        (np.array([[[0.5, -0.1], [0.1, 0.2]]], np.float32), "negative"),
        (np.full((4, 2, 2), 1, np.int32), "floating"),
    ],
)
def test_bad_values_raise(values, match):
    setting = get_setting("additive_2x2_uniform")
    with pytest.raises(ValueError, match=match):
        regret_search(vcg, values, key=jax.random.key(0), setting=setting, progress=False)


def test_bad_key_and_bad_mechanism_raise():
    setting = get_setting("additive_2x2_uniform")
    values = np.full((4, 2, 2), 0.5, np.float32)
    with pytest.raises(ValueError, match="typed key"):
        regret_search(vcg, values, key=jax.random.PRNGKey(0), setting=setting, progress=False)

    def missing_bidder(bids):
        return Outcome(alloc=bids[:, :1], pay=bids[:, :1, 0])

    with pytest.raises(ValueError, match="alloc"):
        regret_search(
            missing_bidder, values, key=jax.random.key(0), setting=setting, progress=False
        )


def test_configs():
    default, quick, full = RegretConfig(), RegretConfig.quick(), RegretConfig.full()
    assert default.grid_points >= 101 and default.n_starts >= 100 and default.steps >= 200
    assert quick.n_starts < default.n_starts and quick.steps < default.steps
    assert (full.grid_points, full.n_starts, full.steps) == (0, 1000, 2000)
    assert (full.learning_rate, full.final_lr_fraction) == (0.1, 1.0)
    assert RegretConfig.quick(steps=3).steps == 3
    with pytest.raises(ValueError, match="n_starts"):
        RegretConfig(n_starts=5, n_grid_starts=4, n_noise_starts=4)
    with pytest.raises(ValueError, match="grid_points"):
        RegretConfig(grid_points=1)
    with pytest.raises(TypeError):
        RegretConfig(101)  # hyperparameters are keyword-only


def test_regret_stats_by_hand():
    regret = jnp.asarray([[0.0, 0.002], [0.5, 0.0], [0.0, 0.0]], jnp.float32)
    utility = jnp.asarray([[0.1, -0.2], [0.0, 0.3], [0.0, 0.0]], jnp.float32)
    result = RegretResult(
        regret=regret,
        best_misreport=jnp.zeros((3, 2, 1), jnp.float32),
        truthful_utility=utility,
        ir_violation=jnp.maximum(-utility, 0.0),
    )
    stats = regret_stats(result)
    assert set(stats) == {"regret_mean", "regret_max", "regret_share_above_1e-3", "ir_violation"}
    per_profile = np.array([0.001, 0.25, 0.0])
    np.testing.assert_allclose(
        stats["regret_mean"], (per_profile.mean(), per_profile.std(ddof=1) / np.sqrt(3)), rtol=1e-6
    )
    assert stats["regret_max"] == pytest.approx((0.5, 0.0))
    share = np.array([0.5, 0.5, 0.0])
    np.testing.assert_allclose(
        stats["regret_share_above_1e-3"], (share.mean(), share.std(ddof=1) / np.sqrt(3))
    )
    ir = np.array([0.1, 0.0, 0.0])
    np.testing.assert_allclose(stats["ir_violation"], (ir.mean(), ir.std(ddof=1) / np.sqrt(3)))
    assert "regret_share_above_5e-4" in regret_stats(result, threshold=5e-4)
