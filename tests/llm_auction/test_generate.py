"""The generation loop on tiny random transformers: traces, replay, audit, bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_auction import (
    AuctionConfig,
    audit,
    generate,
    log_likelihoods,
    make_agents,
    replay,
)

CONFIG = AuctionConfig(max_new_tokens=12, end_token=None)


@pytest.fixture(scope="module")
def agents(tiny_lm):
    model, params = tiny_lm
    return make_agents(model, params, ["Of love: ", "War! "])


def test_trace_shapes_replay_and_audit(agents):
    trace = generate(agents, [1.0, 2.0], "Hi", key=jax.random.key(0), config=CONFIG)
    assert trace.tokens.shape == (12,) and trace.log_p.shape == (12, 2, 128)
    assert trace.payments.shape == (12, 2) and bool(jnp.all(trace.alive))
    np.testing.assert_allclose(jnp.exp(trace.log_q).sum(-1), 1.0, atol=1e-5)
    again = replay(trace, CONFIG)
    np.testing.assert_array_equal(again.tokens, trace.tokens)
    np.testing.assert_allclose(again.payments, trace.payments, atol=1e-6)
    report = audit(trace, CONFIG)
    assert report["critical_bid_failures"] == 0
    assert report["max_token_mismatch"] == 0 and report["max_payment_error"] < 1e-5
    # the linear rule's q is the bid-weighted mixture of the stored distributions
    mix = (jnp.exp(trace.log_p) * jnp.array([1 / 3, 2 / 3])[:, None]).sum(1)
    np.testing.assert_allclose(jnp.exp(trace.log_q), mix, atol=1e-5)


def test_tampered_trace_fails_replay(agents):
    trace = generate(agents, [1.0, 2.0], "Hi", key=jax.random.key(1), config=CONFIG)
    with pytest.raises(ValueError, match="altered"):
        replay(trace.replace(uniforms=trace.uniforms.at[0, 1].set(0.5)), CONFIG)


def test_only_bid_ratios_matter_and_payments_scale_with_bids(agents):
    a = generate(agents, [1.0, 3.0], "Hi", key=jax.random.key(2), config=CONFIG)
    b = generate(agents, [2.0, 6.0], "Hi", key=jax.random.key(2), config=CONFIG)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(2 * a.payments, b.payments, rtol=1e-5, atol=1e-7)


def test_zero_bid_agent_never_wins_or_pays(agents):
    trace = generate(agents, [0.0, 1.0], "Hi", key=jax.random.key(3), config=CONFIG)
    assert bool(jnp.all(trace.winner == 1)) and float(jnp.abs(trace.payments).sum()) == 0.0


def test_identical_agents_pay_nothing(tiny_lm):
    model, params = tiny_lm
    same = make_agents(model, params[0], ["Hi", "Hi"], shared=True)
    trace = generate(same, [1.0, 1.0], "x", key=jax.random.key(4), config=CONFIG)
    assert float(jnp.abs(trace.payments).sum()) == 0.0


def test_batched_keys_and_log_likelihoods(agents):
    traces = generate(
        agents, [1.0, 1.0], "Hi", key=jax.random.split(jax.random.key(5), 3), config=CONFIG
    )
    assert traces.tokens.shape == (3, 12)
    ll = log_likelihoods(traces)
    assert ll.shape == (3, 2) and bool(jnp.all(ll <= 0))
    one = generate(
        agents, [1.0, 1.0], "Hi", key=jax.random.split(jax.random.key(5), 3)[1], config=CONFIG
    )
    np.testing.assert_array_equal(one.tokens, traces.tokens[1])


@pytest.mark.slow
def test_end_token_stops_the_text(agents):
    config = dataclasses.replace(CONFIG, end_token=int(jnp.argmax(jnp.zeros(128))))  # token 0
    trace = generate(agents, [1.0, 1.0], "Hi", key=jax.random.key(6), config=config)
    ended = np.asarray(trace.tokens) == 0
    if ended.any():
        first = int(np.argmax(ended))
        assert not np.asarray(trace.alive)[first + 1 :].any()
        assert float(jnp.abs(trace.payments[first + 1 :]).sum()) == 0.0


@pytest.mark.parametrize(
    ("rule", "payment"),
    [
        ("log_linear", "envelope"),
        pytest.param("linear", "envelope", marks=pytest.mark.slow),
        pytest.param("linear", "myerson", marks=pytest.mark.slow),
        pytest.param("log_linear", "myerson", marks=pytest.mark.slow),
        pytest.param("log_linear", "none", marks=pytest.mark.slow),
    ],
)
def test_other_payment_rules_run(agents, rule, payment):
    config = dataclasses.replace(CONFIG, rule=rule, payment=payment, max_new_tokens=4)
    trace = generate(agents, [1.0, 2.0], "Hi", key=jax.random.key(7), config=config)
    assert bool(jnp.all(trace.payments >= 0)) and bool(jnp.all(jnp.isfinite(trace.payments)))


@pytest.mark.slow
def test_reference_agent_and_plain_sampling(tiny_lm):
    model, params = tiny_lm
    agents = make_agents(model, [params[1]], ["A"], reference_params=params[0])
    config = dataclasses.replace(CONFIG, reference_weight=0.5)
    trace = generate(agents, [1.0], "Hi", key=jax.random.key(8), config=config)
    assert trace.log_p.shape[1] == 2
    assert audit(trace, config, has_reference=True)["critical_bid_failures"] == 0
    plain = dataclasses.replace(CONFIG, plain=True)
    trace = generate(
        make_agents(model, params, ["A", "B"]),
        [1.0, 1.0],
        "Hi",
        key=jax.random.key(9),
        config=plain,
    )
    np.testing.assert_allclose(trace.log_q, trace.log_p[:, 0], atol=1e-6)


@pytest.mark.parametrize(
    ("bids", "match"),
    [
        ([1.0, -1.0], "non-negative"),
        ([float("nan"), 1.0], "finite"),
        ([0.0, 0.0], "all bids are zero"),
        ([1.0], "shape"),
    ],
)
def test_bad_bids_are_rejected(agents, bids, match):
    with pytest.raises(ValueError, match=match):
        generate(agents, bids, "Hi", key=jax.random.key(0), config=CONFIG)


def test_bad_queries_and_configs_are_rejected(agents, tiny_lm):
    with pytest.raises(ValueError, match="max_len"):
        generate(agents, [1.0, 1.0], "x" * 40, key=jax.random.key(0), config=CONFIG)
    with pytest.raises(ValueError, match="token ids"):
        generate(agents, [1.0, 1.0], [300], key=jax.random.key(0), config=CONFIG)
    with pytest.raises(ValueError, match="linear rule"):
        AuctionConfig(rule="log_linear", payment="race")
    with pytest.raises(ValueError, match="unknown rule"):
        AuctionConfig(rule="median")
    model, params = tiny_lm
    with pytest.raises(ValueError, match="sets of params"):
        make_agents(model, params, ["a", "b", "c"])
