"""MovieLens-100k from the recbole wheel, the synthetic catalogue, the ad market and the split."""

import numpy as np
import pytest

import genrec


@pytest.fixture(scope="module")
def ml100k():
    return genrec.load_movielens_100k()


def test_movielens_100k_loads_from_the_wheel(ml100k):
    assert (ml100k.n_users, ml100k.n_items, ml100k.n_interactions) == (943, 1682, 100_000)
    assert ml100k.texts[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert min(len(s) for s in ml100k.sequences) >= 20  # ML-100k keeps users with >= 20 ratings
    assert all(s.min() >= 0 and s.max() < 1682 for s in ml100k.sequences)


def test_movielens_sequences_are_in_time_order(ml100k):
    # user 1 (the first user id) rated item 168 ("Monty Python and the Holy Grail") first in time;
    # checked against the raw file: its earliest timestamp is 874965478 for items 168, 172, 165...
    from genrec.data import ML100K_FILES, _wheel_file

    rows = [
        r.split("\t")
        for r in _wheel_file(f"{ML100K_FILES}/ml-100k.inter").read_text().splitlines()[1:]
    ]
    mine = sorted((float(t), i) for u, i, _, t in rows if u == "1")
    first_items = [int(i) - 1 for _, i in mine[:3]]  # ML item ids are 1-based and dense
    assert set(ml100k.sequences[0][:3].tolist()) == set(first_items)
    assert len(ml100k.sequences[0]) == len(mine)


def test_synthetic_interactions_are_deterministic_and_clustered():
    a = genrec.synthetic_interactions(seed=3)
    b = genrec.synthetic_interactions(seed=3)
    c = genrec.synthetic_interactions(seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.sequences, b.sequences, strict=True))
    assert not all(
        len(x) == len(y) and np.array_equal(x, y)
        for x, y in zip(a.sequences, c.sequences, strict=True)
    )
    seq = np.concatenate(a.sequences)
    clusters = seq % 4
    stays = np.mean(np.concatenate([np.diff(s % 4) == 0 for s in a.sequences]))
    assert stays > 0.7 and len(np.unique(clusters)) == 4
    with pytest.raises(ValueError, match="n_items"):
        genrec.synthetic_interactions(n_items=4, n_clusters=4)


def _codes(n_items, seed=0):
    rng = np.random.default_rng(seed)
    return genrec.add_collision_token(rng.integers(0, 4, (n_items, 3)))


def test_ad_market_is_deterministic_given_the_seed():
    data = genrec.synthetic_interactions(seed=0, n_users=64)
    codes = _codes(data.n_items)
    config = genrec.AdMarketConfig(sponsored_fraction=0.3, prefix_depth=1, seed=5)
    m1, l1 = genrec.simulate_ad_market(data, codes, config)
    m2, l2 = genrec.simulate_ad_market(data, codes, config)
    np.testing.assert_array_equal(m1.bids, m2.bids)
    assert all(np.array_equal(a, b) for a, b in zip(l1.items, l2.items, strict=True))
    m3, _ = genrec.simulate_ad_market(
        data, codes, genrec.AdMarketConfig(sponsored_fraction=0.3, prefix_depth=1, seed=6)
    )
    assert not np.array_equal(m1.bids, m3.bids)


def test_ad_market_follows_the_protocol():
    data = genrec.synthetic_interactions(seed=0, n_users=200, min_length=30, max_length=40)
    codes = _codes(data.n_items)
    config = genrec.AdMarketConfig(sponsored_fraction=0.25, prefix_depth=1, seed=1)
    market, log = genrec.simulate_ad_market(data, codes, config)
    assert market.sponsored.sum() == 10
    assert (market.bids[~market.sponsored] == 0).all() and (market.bids[market.sponsored] > 0).all()
    for organic, items, ads in zip(data.sequences, log.items, log.is_ad, strict=True):
        assert len(items) == len(organic)
        np.testing.assert_array_equal(items[~ads], organic[~ads])  # organic slots unchanged
        assert market.sponsored[items[ads]].all()
        # relevance filter: the ad shares the first code with the organic item it replaced
        assert (codes[items[ads], 0] == codes[organic[ads], 0]).all()
        # frequency cap: P(show) = p * min(1, dt * r) is 0 right after an ad and in slot 0
        assert not ads[0] and not (ads[1:] & ads[:-1]).any()
    assert 0.02 < log.ad_share < 0.4
    _, none = genrec.simulate_ad_market(
        data, codes, genrec.AdMarketConfig(show_probability=0.0, prefix_depth=1)
    )
    assert none.ad_share == 0.0


def test_the_winner_follows_the_softmax_over_bids():
    # one cluster of codes: every sponsored item is eligible everywhere
    data = genrec.synthetic_interactions(seed=0, n_users=300, min_length=40, max_length=40)
    codes = genrec.add_collision_token(np.zeros((data.n_items, 3), np.int64))
    codes[:, -1] = np.arange(data.n_items)
    config = genrec.AdMarketConfig(sponsored_fraction=0.1, prefix_depth=1, temperature=0.1)
    market, log = genrec.simulate_ad_market(data, codes, config)
    shown = np.concatenate([i[a] for i, a in zip(log.items, log.is_ad, strict=True)])
    ads = np.flatnonzero(market.sponsored)
    p = np.exp((market.bids[ads] - market.bids[ads].max()) / 0.1)
    p /= p.sum()
    freq = np.array([(shown == a).mean() for a in ads])
    assert np.abs(freq - p).max() < 4 * np.sqrt(p.max() / len(shown)) + 0.01


def test_leave_one_out_split():
    log = genrec.EventLog(
        items=(np.array([5, 6, 7, 8]), np.array([1, 2, 3])),
        is_ad=(np.array([False, True, False, False]), np.array([False, False, True])),
        n_items=10,
    )
    split = genrec.split_leave_one_out(log)
    items, ads = split.targets("test")
    np.testing.assert_array_equal(items, [8, 3])
    np.testing.assert_array_equal(ads, [False, True])
    np.testing.assert_array_equal(split.targets("valid")[0], [7, 2])
    hist, flags = split.histories("test", 3)
    np.testing.assert_array_equal(hist, [[5, 6, 7], [-1, 1, 2]])
    np.testing.assert_array_equal(flags, [[False, True, False], [False, False, False]])
    # training targets: from the second impression up to the one before validation
    cols = {(int(u), int(split.events[u, c])) for u, c in split.train_positions}
    assert cols == {(0, 6)}
    with pytest.raises(ValueError, match="impressions"):
        genrec.split_leave_one_out(
            genrec.EventLog((np.array([1, 2]),), (np.array([False, False]),), 3)
        )
