"""Relevance and market metrics, per user (averaged with standard errors by the caller).

Relevance is leave-one-out full ranking: a ranked list of items against the held-out target,
``Recall@k = 1[target in top k]`` and ``NDCG@k = 1 / log2(rank + 2)`` for a hit at ``rank``
(0-based). GEM-Rec's list is the beam decoded under the committed flag; "organic" and "ad"
metrics are conditional on that flag (the paper's conditional NDCG).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Bool, Float, Int

from diffecon.evaluation import Estimate, mean_estimate

__all__ = ["market_metrics", "ranking_metrics", "summarize"]


def ranking_metrics(
    ranked: Int[np.ndarray, "users k"], targets: Int[np.ndarray, " users"], *, ks=(5, 10)
) -> dict[str, np.ndarray]:
    """Per-user ``recall@k`` and ``ndcg@k`` of ranked lists (``-1`` entries never hit)."""
    ranked, targets = np.asarray(ranked), np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != ranked.shape[:1]:
        raise ValueError(
            f"need ranked [users, k] and targets [users], got {ranked.shape}, {targets.shape}"
        )
    if max(ks) > ranked.shape[1]:
        raise ValueError(f"lists of length {ranked.shape[1]} cannot give metrics @{max(ks)}")
    hits = (ranked == targets[:, None]) & (targets[:, None] >= 0)
    rank = np.where(hits.any(-1), hits.argmax(-1), ranked.shape[1])
    out = {}
    for k in ks:
        hit = rank < k
        out[f"recall{k}"] = hit.astype(np.float64)
        out[f"ndcg{k}"] = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return out


def market_metrics(
    *,
    is_ad: Bool[np.ndarray, " users"],
    shown_ad: Int[np.ndarray, " users"],
    bids: Float[np.ndarray, " items"],
    values: Float[np.ndarray, " items"],
    charge_first_price: Float[np.ndarray, " users"],
    charge_myerson: Float[np.ndarray, " users"],
    high_value: Bool[np.ndarray, " items"] | None = None,
) -> dict[str, np.ndarray]:
    """Per-user ad metrics of the committed decodes.

    ``revenue_*`` is what the shown ad pays (0 without an ad), ``advertiser_welfare`` the shown
    ad's value, ``advertiser_utility_myerson`` its value minus its Myerson charge, and
    ``high_value_share`` (among users shown an ad) whether the ad is one of ``high_value``.
    """
    shown = np.asarray(is_ad, bool) & (np.asarray(shown_ad) >= 0)
    ad = np.where(shown, shown_ad, 0)
    value = np.where(shown, np.asarray(values)[ad], 0.0)
    out = {
        "ad_rate": shown.astype(np.float64),
        "revenue_first_price": np.where(shown, charge_first_price, 0.0),
        "revenue_myerson": np.where(shown, charge_myerson, 0.0),
        "advertiser_welfare": value,
        "advertiser_utility_myerson": np.where(shown, value - charge_myerson, 0.0),
        "shown_bid": np.where(shown, np.asarray(bids)[ad], np.nan),
    }
    if high_value is not None:
        out["high_value_share"] = np.where(shown, np.asarray(high_value)[ad], np.nan)
    return out


def summarize(per_user: dict[str, np.ndarray]) -> dict[str, Estimate]:
    """Mean and standard error of each metric over the users where it is defined (not NaN)."""
    out = {}
    for name, values in per_user.items():
        v = np.asarray(values, np.float64)
        v = v[~np.isnan(v)]
        if v.size:
            out[name] = mean_estimate(v)
    return out
