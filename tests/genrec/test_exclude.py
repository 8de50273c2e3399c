"""Excluding items from the decode (e.g. a user's history): pruned tries, the same guarantees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import genrec
from tests.genrec.conftest import BEAM
from tests.genrec.test_decoding import _reference_beam


def _random_exclude(tiny, n, seed, share=0.3):
    rng = np.random.default_rng(seed)
    return rng.random((n, tiny.interactions.n_items)) < share


def test_live_states_are_the_prefixes_of_allowed_items(tiny):
    exclude = _random_exclude(tiny, 5, seed=0, share=0.5)
    exclude[0] = False
    exclude[1] = True
    live = np.asarray(genrec.live_states(tiny.trie, jnp.asarray(exclude)))
    org = np.asarray(tiny.trie.org_paths)
    ad = np.asarray(tiny.trie.ad_paths)
    for row in range(5):
        expect = np.zeros(tiny.trie.n_states, bool)
        for item in np.flatnonzero(~exclude[row]):
            expect[org[item]] = True
            if tiny.market.sponsored[item]:
                expect[ad[item]] = True
        np.testing.assert_array_equal(live[row], expect)
    assert live[0, 2:].all() and not live[1].any()


def test_excluding_decodes_what_a_plain_search_over_the_allowed_items_decodes(
    tiny, decoders, next_logp, draw
):
    params, *_, plain_forced = decoders
    n = 6
    users, hist, _ = draw(n, seed=30)
    exclude = _random_exclude(tiny, n, seed=31)

    for is_ad in (False, True):
        flag = jnp.full((n,), is_ad)
        out = plain_forced(params, users, hist, jnp.zeros(n), flag, jnp.asarray(exclude))
        for row in range(n):
            items, scores = _reference_beam(
                tiny, next_logp, users[row], hist[row], is_ad, BEAM, exclude=exclude[row]
            )
            got = np.asarray(out.items[row])
            assert got[got >= 0].tolist() == items
            assert not exclude[row, got[got >= 0]].any()
            np.testing.assert_allclose(
                np.asarray(out.scores[row])[: len(scores)], scores, rtol=1e-5, atol=1e-5
            )


def test_lambda_zero_and_organic_integrity_hold_with_exclusion(tiny, decoders, draw):
    params, bid_aware, _, _, plain_forced = decoders
    n = 64
    users, hist, _ = draw(n, seed=32)
    u = jax.random.uniform(jax.random.key(33), (n,))
    exclude = jnp.asarray(_random_exclude(tiny, n, seed=34))
    reference = plain_forced(params, users, hist, u, None, exclude)
    organic = jnp.zeros((n,), bool)
    organic_ref = plain_forced(params, users, hist, u, organic, exclude)
    for seed in range(3):
        bids = draw(n, seed=40 + seed, scale=1.0 + seed)[2]
        out = bid_aware(params, users, hist, bids, u, 0.0, None, exclude)
        np.testing.assert_array_equal(np.asarray(out.items), np.asarray(reference.items))
        np.testing.assert_array_equal(np.asarray(out.is_ad), np.asarray(reference.is_ad))
        forced = bid_aware(params, users, hist, bids, u, 2.0 + seed, organic, exclude)
        np.testing.assert_array_equal(np.asarray(forced.items), np.asarray(organic_ref.items))


def test_allocation_stays_monotone_and_excluded_ads_never_win(tiny, decoders, auction, draw):
    params, bid_aware, *_ = decoders
    n = 512
    ads = np.flatnonzero(tiny.market.sponsored)
    rows = np.arange(n)
    trials = 0
    for seed in range(4):
        rng = np.random.default_rng(50 + seed)
        users, hist, bids = draw(n, seed=50 + seed, scale=1.5)
        exclude = jnp.asarray(_random_exclude(tiny, n, seed=60 + seed))
        lam = float(rng.uniform(0.2, 3.0))
        ad = ads[rng.integers(0, len(ads), n)]
        raised = np.asarray(bids).copy()
        raised[rows, ad] *= rng.uniform(1.0, 10.0, n).astype(np.float32)

        def exposure(b, users=users, hist=hist, lam=lam, exclude=exclude, ad=ad):
            flag = jnp.ones((n,), bool)
            out = bid_aware(params, users, hist, jnp.asarray(b), jnp.zeros(n), lam, flag, exclude)
            return np.asarray(out.p_ad * (out.items[:, 0] == jnp.asarray(ad)))

        before, after = exposure(bids), exposure(raised)
        assert (after >= before).all()
        trials += n
        # an excluded ad is never shown, whatever it bids
        assert (after[np.asarray(exclude)[rows, ad]] == 0).all()
        pay = auction(users, hist, jnp.asarray(raised), lam, exclude)
        won = np.asarray(pay.ad)
        assert not np.asarray(exclude)[rows[won >= 0], won[won >= 0]].any()
        assert (np.asarray(pay.myerson) <= np.asarray(pay.first_price) + 1e-6).all()
    assert trials == 2048


def test_baseline_rankings_skip_excluded_items(tiny):
    split, n_items = tiny.split, tiny.interactions.n_items
    seen = split.seen("test", n_items)
    col = split.target_column("test")
    for u in range(split.n_users):
        before = split.events[u, :col]
        np.testing.assert_array_equal(np.flatnonzero(seen[u]), np.unique(before[before >= 0]))
    popular = genrec.popularity_ranking(split, n_items, k=5)
    ranked = genrec.popularity_ranking(split, n_items, k=5, exclude=seen)
    assert ranked.shape == (split.n_users, 5)
    for u in range(split.n_users):
        allowed = [
            i for i in genrec.popularity_ranking(split, n_items, k=n_items) if not seen[u, i]
        ]
        assert ranked[u].tolist() == (allowed + [-1] * 5)[:5]
    assert (ranked[~seen[:, popular].any(1)] == popular).all()
    with pytest.raises(ValueError, match="exclude must be"):
        genrec.popularity_ranking(split, n_items, exclude=seen[:, :-1])


def test_a_wider_organic_search_returns_its_best_beam(tiny, draw):
    n = 16
    users, hist, bids = draw(n, seed=70)
    exclude = jnp.asarray(_random_exclude(tiny, n, seed=71))
    organic = jnp.zeros((n,), bool)

    def run(beam, width):
        return genrec.bid_aware_beam_search(
            tiny.model,
            users,
            hist,
            bids,
            jnp.zeros(n),
            trie=tiny.trie,
            lam=1.0,
            beam=beam,
            flag=organic,
            exclude=exclude,
            width=width,
        )

    wide = run(BEAM + 3, None)
    narrow_list = run(BEAM, BEAM + 3)
    np.testing.assert_array_equal(np.asarray(narrow_list.items), np.asarray(wide.items)[:, :BEAM])
    np.testing.assert_array_equal(
        np.asarray(run(BEAM, BEAM).items), np.asarray(run(BEAM, None).items)
    )
    with pytest.raises(ValueError, match="search width"):
        run(BEAM, BEAM - 1)
