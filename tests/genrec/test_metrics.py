"""Ranking and market metrics on hand-computed cases."""

import numpy as np
import pytest

import genrec


def test_ranking_metrics_by_hand():
    ranked = np.array([[3, 1, 2, 4, 5, 6, 7, 8, 9, 10], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    targets = np.array([1, 99])
    m = genrec.ranking_metrics(ranked, targets)
    np.testing.assert_allclose(m["recall5"], [1, 0])
    np.testing.assert_allclose(m["ndcg10"], [1 / np.log2(3), 0])
    ranked[0, :6] = [-1, -1, -1, -1, -1, 1]
    m = genrec.ranking_metrics(ranked, targets)
    assert m["recall5"][0] == 0 and m["recall10"][0] == 1
    np.testing.assert_allclose(m["ndcg10"][0], 1 / np.log2(7))
    with pytest.raises(ValueError, match="@10"):
        genrec.ranking_metrics(ranked[:, :5], targets)


def test_market_metrics_by_hand():
    bids = np.array([0.0, 2.0, 3.0])
    out = genrec.market_metrics(
        is_ad=np.array([True, False, True]),
        shown_ad=np.array([1, 2, 2]),
        bids=bids,
        values=bids,
        charge_first_price=np.array([2.0, 3.0, 3.0]),
        charge_myerson=np.array([1.5, 3.0, 1.0]),
        high_value=np.array([False, False, True]),
    )
    np.testing.assert_allclose(out["ad_rate"], [1, 0, 1])
    np.testing.assert_allclose(out["revenue_first_price"], [2, 0, 3])
    np.testing.assert_allclose(out["revenue_myerson"], [1.5, 0, 1])
    np.testing.assert_allclose(out["advertiser_utility_myerson"], [0.5, 0, 2])
    np.testing.assert_allclose(out["high_value_share"], [0, np.nan, 1])
    s = genrec.summarize(out)
    assert s["high_value_share"].value == 0.5 and s["high_value_share"].n_samples == 2
