"""Payments for the ad slot: first price (GEM-Rec's) and Myerson's.

The exposure of ad ``i`` is ``x_i(b) = P(AD; b) * 1[top-1 ad decode = i]``, non-decreasing in
``b_i`` (GEM-Rec's Proposition 1), and advertisers are single-parameter, so Myerson's payment
``p_i = b_i x_i(b_i) - int_0^{b_i} x_i(z) dz`` makes truthful bidding optimal. The item part is a
step at the critical bid ``c_i`` (found by bisection on the decode, valid because it is monotone);
the slot part is smooth in ``z`` above the best rival bid and constant below it, so
``p_i = b_i P(b_i) - int_{c_i}^{b_i} P(z) dz`` is computed with the constant piece exactly and the
smooth piece by Gauss-Legendre quadrature.

Both functions return *expected* payments per auction (over the flag draw) and the per-impression
charge (expected payment over exposure), which is what an ad pays when it is actually shown.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jaxtyping import Array, Bool, Float, Int

from genrec.decoding import (
    ItemTrie,
    _ad_log_probs,
    _ad_scores,
    _encode,
    _exclusion,
    _flag_logits,
    bid_bonus,
    prefix_max_bid,
)
from genrec.model import GemRec

__all__ = ["AdPayments", "ad_auction"]


@struct.dataclass
class AdPayments:
    """The ad auction of each user, decoded under ``<AD>``.

    Attributes:
      ad: ``[batch]`` the top-1 ad.
      bid: ``[batch]`` its bid.
      p_ad: ``[batch]`` P(AD) at the submitted bids.
      critical_bid: ``[batch]`` the smallest bid at which the ad stays top-1.
      first_price: ``[batch]`` expected first-price payment ``bid * P(AD)``.
      myerson: ``[batch]`` expected Myerson payment.
    """

    ad: Int[Array, " batch"]
    bid: Float[Array, " batch"]
    p_ad: Float[Array, " batch"]
    critical_bid: Float[Array, " batch"]
    first_price: Float[Array, " batch"]
    myerson: Float[Array, " batch"]

    @property
    def myerson_charge(self) -> Float[Array, " batch"]:
        """What the ad pays per impression under Myerson (expected payment / exposure)."""
        return jnp.where(self.p_ad > 0, self.myerson / jnp.maximum(self.p_ad, 1e-30), 0.0)


def ad_auction(
    model: GemRec,
    users: Int[Array, " batch"],
    history: Int[Array, "batch history tokens"],
    bids: Float[Array, "batch items"],
    *,
    trie: ItemTrie,
    lam: Float[Array, ""] | float,
    bisection_steps: int = 30,
    quadrature_nodes: int = 16,
    exclude: Bool[Array, "batch items"] | None = None,
) -> AdPayments:
    """Each user's winning ad under ``<AD>`` (the exact top-1 of the bid-aware decode), its
    critical bid and its payments.

    ``bisection_steps`` halvings of ``[0, bid]`` locate the critical bid to ``bid / 2^steps``
    (the reported critical bid is the upper end, at which the ad is still top-1). ``exclude``
    is :func:`genrec.bid_aware_beam_search`'s (excluded ads bid nothing and never win).
    """
    bids, live = _exclusion(trie, bids, exclude)
    cross_kv, valid = _encode(model, users, history)
    z_org, z_ad = _flag_logits(model, cross_kv, valid)
    batch = bids.shape[0]
    rows = jnp.arange(batch)
    # the network's part of every ad's score does not depend on bids: computed once
    ad_logp = _ad_log_probs(model, cross_kv, valid, trie)

    def top1(b):
        score = _ad_scores(ad_logp, trie, bid_bonus(prefix_max_bid(trie, b), lam), live)
        best = jnp.argmax(score, axis=-1)  # the first maximum: ties to the lower ad index
        found = jnp.isfinite(jnp.take_along_axis(score, best[:, None], axis=-1)[:, 0])
        return jnp.where(found, trie.ad_items[best], -1)

    ad = top1(bids)
    own = bids[rows, jnp.maximum(ad, 0)]
    rival = jnp.max(bids.at[rows, jnp.maximum(ad, 0)].set(0.0), axis=-1)

    def p_ad_at(z):
        return jax.nn.sigmoid(z_ad + bid_bonus(jnp.maximum(z, rival), lam) - z_org)

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        wins = top1(bids.at[rows, jnp.maximum(ad, 0)].set(mid)) == ad
        return jnp.where(wins, lo, mid), jnp.where(wins, mid, hi)

    wins_at_zero = top1(bids.at[rows, jnp.maximum(ad, 0)].set(0.0)) == ad
    _, critical = jax.lax.fori_loop(0, bisection_steps, halve, (jnp.zeros_like(own), own))
    critical = jnp.where(wins_at_zero, 0.0, critical)

    # int_c^b P(z) dz: constant below the best rival bid, smooth above it
    flat_end = jnp.clip(rival, critical, own)
    integral = p_ad_at(critical) * (flat_end - critical)
    nodes, weights = np.polynomial.legendre.leggauss(quadrature_nodes)
    half = 0.5 * (own - flat_end)
    z = flat_end[:, None] + half[:, None] * (jnp.asarray(nodes, jnp.float32) + 1.0)
    smooth = jax.vmap(p_ad_at, in_axes=1, out_axes=1)(z)
    integral = integral + half * jnp.sum(smooth * jnp.asarray(weights, jnp.float32), axis=-1)
    p_ad = p_ad_at(own)
    first = own * p_ad
    myerson = jnp.clip(first - integral, 0.0, first)
    valid_ad = ad >= 0
    zero = jnp.zeros_like(own)
    return AdPayments(
        ad=ad,
        bid=jnp.where(valid_ad, own, zero),
        p_ad=p_ad,
        critical_bid=jnp.where(valid_ad, critical, zero),
        first_price=jnp.where(valid_ad, first, zero),
        myerson=jnp.where(valid_ad, myerson, zero),
    )
