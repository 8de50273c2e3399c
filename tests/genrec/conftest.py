"""A tiny GEM-Rec pipeline on synthetic data, built once per session (seconds)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import genrec
from benchmarks.genrec import QUICK
from diffecon import TrainConfig

K = QUICK.gemrec.codebook_size  # codes per level
BEAM = 4


@dataclasses.dataclass(frozen=True)
class Tiny:
    interactions: genrec.Interactions
    codes: np.ndarray  # [items, 4], collision token included
    market: genrec.AdMarket
    split: genrec.Split
    trie: genrec.ItemTrie
    model: genrec.GemRec
    config: genrec.GemRecConfig
    inputs: np.ndarray  # gemrec_inputs of the split


@pytest.fixture(scope="session")
def tiny() -> Tiny:
    data = genrec.synthetic_interactions(seed=0, n_users=48, n_items=40)
    emb = genrec.synthetic_embeddings(data, dim=16, seed=0)
    _, codes, _ = genrec.train_rqvae(
        emb, QUICK.rqvae, TrainConfig(steps=100, steps_per_call=50, log_every=0, progress=False)
    )
    codes = genrec.add_collision_token(codes)
    market, log = genrec.simulate_ad_market(
        data, codes, genrec.AdMarketConfig(sponsored_fraction=0.4, prefix_depth=1, seed=0)
    )
    split = genrec.split_leave_one_out(log)
    trie = genrec.build_trie(codes, market.sponsored, codebook_size=K)
    config = QUICK.gemrec
    model, _ = genrec.train_gemrec(
        split,
        codes,
        config,
        QUICK.optim,
        TrainConfig(steps=100, steps_per_call=50, log_every=0, progress=False),
    )
    inputs = genrec.gemrec_inputs(split, codes, history=config.history, codebook_size=K)
    return Tiny(data, codes, market, split, trie, model, config, inputs)


@pytest.fixture(scope="session")
def draw(tiny):
    """``draw(n, seed, scale) -> (users, histories, bids)``: random training-target histories
    of the tiny split and log-normal bids (``[n, items]``, 0 for items that do not advertise)."""

    def sample(n, seed, scale=1.0):
        rng = np.random.default_rng(seed)
        pick = tiny.split.train_positions[rng.integers(0, len(tiny.split.train_positions), n)]
        h = tiny.config.history
        hist = np.stack([tiny.inputs[u, c : c + h] for u, c in pick])
        bids = rng.lognormal(0.0, scale, (n, tiny.interactions.n_items)).astype(np.float32)
        bids = np.where(tiny.market.sponsored, bids, 0.0).astype(np.float32)
        return jnp.asarray(pick[:, 0]), jnp.asarray(hist), jnp.asarray(bids)

    return sample


@pytest.fixture(scope="session")
def forced_ad(tiny):
    """``(users, histories, bids, lam) -> (P(AD), top-1 ad)``, the <AD> decode, jitted."""
    graphdef, params = nnx.split(tiny.model)

    @jax.jit
    def decode(users, hist, bids, lam):
        out = genrec.bid_aware_beam_search(
            nnx.merge(graphdef, params),
            users,
            hist,
            bids,
            jnp.zeros(users.shape),
            trie=tiny.trie,
            lam=lam,
            beam=BEAM,
            flag=jnp.ones(users.shape, bool),
        )
        return out.p_ad, out.items[:, 0]

    return decode


@pytest.fixture(scope="session")
def decoders(tiny):
    """``(params, bid_aware, bid_aware_sampled, plain, plain_forced)``, jitted; the forced-flag
    ones take an optional ``exclude [n, items]``."""
    graphdef, params = nnx.split(tiny.model)

    @jax.jit
    def bid_aware(params, users, hist, bids, u, lam, flag, exclude=None):
        return genrec.bid_aware_beam_search(
            nnx.merge(graphdef, params),
            users,
            hist,
            bids,
            u,
            trie=tiny.trie,
            lam=lam,
            beam=BEAM,
            flag=flag,
            exclude=exclude,
        )

    @jax.jit
    def bid_aware_sampled(params, users, hist, bids, u, lam):
        return genrec.bid_aware_beam_search(
            nnx.merge(graphdef, params), users, hist, bids, u, trie=tiny.trie, lam=lam, beam=BEAM
        )

    @jax.jit
    def plain(params, users, hist, u):
        return genrec.constrained_beam_search(
            nnx.merge(graphdef, params), users, hist, u, trie=tiny.trie, beam=BEAM
        )

    @jax.jit
    def plain_forced(params, users, hist, u, flag, exclude=None):
        return genrec.constrained_beam_search(
            nnx.merge(graphdef, params),
            users,
            hist,
            u,
            trie=tiny.trie,
            beam=BEAM,
            flag=flag,
            exclude=exclude,
        )

    return params, bid_aware, bid_aware_sampled, plain, plain_forced


@pytest.fixture(scope="session")
def auction(tiny):
    """``(users, hist, bids, lam, exclude=None) -> AdPayments``, jitted."""
    graphdef, params = nnx.split(tiny.model)

    @jax.jit
    def run(users, hist, bids, lam, exclude=None):
        return genrec.ad_auction(
            nnx.merge(graphdef, params),
            users,
            hist,
            bids,
            trie=tiny.trie,
            lam=lam,
            exclude=exclude,
        )

    return run


@pytest.fixture(scope="session")
def next_logp(tiny):
    """``(user, history, decoder tokens) -> log-probabilities of the next token``, one user."""

    @jax.jit
    def decode(user, hist, tokens):
        memory, valid = tiny.model.encode(user[None], hist[None])
        logits = tiny.model.decode(tiny.model.cross_kv(memory), valid, tokens[None])[0, -1]
        return jax.nn.log_softmax(logits)

    return decode
