"""The encoder-decoder, its training, the SASRec and popularity baselines, save and load."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import genrec
from diffecon import TrainConfig
from genrec.model import AD, FIRST_CODE, ORG, PAD


def test_event_tokens_layout():
    codes = np.array([[1, 2, 0], [3, 0, 1]])
    tokens = genrec.event_tokens(
        codes, np.array([[1, -1, 0]]), np.array([[True, False, False]]), codebook_size=4
    )
    np.testing.assert_array_equal(
        tokens[0],
        [
            [AD, FIRST_CODE + 3, FIRST_CODE + 4 + 0, FIRST_CODE + 8 + 1],
            [PAD] * 4,
            [ORG, FIRST_CODE + 1, FIRST_CODE + 4 + 2, FIRST_CODE + 8 + 0],
        ],
    )
    with pytest.raises(ValueError, match="codes must lie"):
        genrec.event_tokens(codes, np.array([0]), np.array([False]), codebook_size=3)


def test_decoder_is_causal_and_padding_is_ignored(tiny):
    model = tiny.model
    h = tiny.config.history
    hist = jnp.asarray(tiny.inputs[:2, -h - 1 : -1])
    users = jnp.arange(2)
    memory, valid = model.encode(users, hist)
    kv = model.cross_kv(memory)
    tokens = jnp.asarray([[1, ORG, FIRST_CODE, FIRST_CODE + 8, FIRST_CODE + 16]] * 2)
    changed = tokens.at[:, 3:].set(FIRST_CODE + 1)
    a = model.decode(kv, valid, tokens)
    b = model.decode(kv, valid, changed)
    np.testing.assert_allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not np.allclose(a[:, 4], b[:, 4])
    # changing a padded impression of the history changes nothing
    padded = np.asarray(hist).copy()
    padded[:, 0] = PAD
    other = padded.copy()
    other[:, 0, 1:] = FIRST_CODE + 5  # codes under a PAD flag stay padding
    m1, v1 = model.encode(users, jnp.asarray(padded))
    m2, v2 = model.encode(users, jnp.asarray(other))
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    np.testing.assert_allclose(np.asarray(m1)[:, 2:], np.asarray(m2)[:, 2:], atol=1e-5)


def test_training_learns_the_next_impression(tiny):
    """The tiny model beats popularity on the synthetic clusters (test targets)."""
    ranked_pop = np.broadcast_to(
        genrec.popularity_ranking(tiny.split, tiny.interactions.n_items, k=4),
        (tiny.split.n_users, 4),
    )
    targets, _ = tiny.split.targets("test")
    col = tiny.split.target_column("test")
    h = tiny.config.history
    decode = jax.jit(
        lambda model, users, hist, u: genrec.constrained_beam_search(
            model, users, hist, u, trie=tiny.trie, beam=4
        )
    )
    out = decode(
        tiny.model,
        jnp.arange(tiny.split.n_users),
        jnp.asarray(tiny.inputs[:, col : col + h]),
        jnp.ones(tiny.split.n_users),  # u = 1: always <ORG>
    )
    model_hits = genrec.ranking_metrics(np.asarray(out.items), targets, ks=(4,))["recall4"]
    pop_hits = genrec.ranking_metrics(ranked_pop, targets, ks=(4,))["recall4"]
    assert model_hits.mean() > pop_hits.mean()


def test_save_and_load_roundtrip(tiny, tmp_path):
    genrec.save_model(tiny.model, tmp_path / "m", meta={"note": "tiny"})
    like = genrec.GemRec(tiny.config, rngs=nnx.Rngs(5))
    loaded, meta = genrec.load_model(like, tmp_path / "m")
    assert meta == {"note": "tiny"}
    h = tiny.config.history
    args = (jnp.arange(3), jnp.asarray(tiny.inputs[:3, :h]), jnp.asarray(tiny.inputs[:3, h]))
    forward = jax.jit(lambda model, *a: model(*a))
    np.testing.assert_array_equal(
        np.asarray(forward(loaded, *args)), np.asarray(forward(tiny.model, *args))
    )
    with pytest.raises(ValueError, match="no checkpoint"):
        genrec.load_model(like, tmp_path / "missing")


def test_sasrec_trains_and_ranks(tiny):
    config = genrec.SASRecConfig(d_model=16, mlp=32, layers=1, history=8)
    model, run = genrec.train_sasrec(
        tiny.split,
        tiny.interactions.n_items,
        config,
        genrec.SeqTrainConfig(batch_size=64, learning_rate=3e-3, warmup_steps=10),
        TrainConfig(steps=100, steps_per_call=50, log_every=50, progress=False),
    )
    assert run.history[-1]["loss"] < run.history[0]["loss"]
    ranked = genrec.sasrec_ranking(model, tiny.split, "test", k=5)
    assert ranked.shape == (tiny.split.n_users, 5)
    # causal: a later item never changes an earlier position's logits
    items = jnp.asarray(tiny.split.events[:2, -8:])
    forward = jax.jit(lambda model, x: model(x))
    a = forward(model, items)
    b = forward(model, items.at[:, -1].set(0))
    np.testing.assert_allclose(np.asarray(a[:, :-1]), np.asarray(b[:, :-1]), atol=1e-5)


def test_popularity_counts_only_training_impressions():
    log = genrec.EventLog(
        items=(np.array([1, 1, 2, 9, 9]), np.array([2, 3, 9, 9])),
        is_ad=(np.zeros(5, bool), np.zeros(4, bool)),
        n_items=10,
    )
    split = genrec.split_leave_one_out(log)
    np.testing.assert_array_equal(genrec.popularity_ranking(split, 10, k=3), [1, 2, 3])
