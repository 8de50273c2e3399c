"""First-price and Myerson payments of the ad slot."""

import jax.numpy as jnp
import numpy as np


def _inputs(draw, n, seed):
    users, hist, bids = draw(n, seed)
    return users, hist, np.asarray(bids)


def test_lambda_zero_charges_nothing_under_myerson(auction, draw):
    run = auction
    users, hist, bids = _inputs(draw, 32, seed=0)
    pay = run(users, hist, jnp.asarray(bids), 0.0)
    np.testing.assert_allclose(np.asarray(pay.myerson), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pay.critical_bid), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pay.first_price), np.asarray(pay.bid * pay.p_ad))


def test_myerson_is_individually_rational_and_below_first_price(auction, draw):
    run = auction
    users, hist, bids = _inputs(draw, 64, seed=1)
    pay = run(users, hist, jnp.asarray(bids), 1.5)
    myerson, first = np.asarray(pay.myerson), np.asarray(pay.first_price)
    assert (myerson >= 0).all() and (myerson <= first + 1e-6).all()
    assert (np.asarray(pay.critical_bid) <= np.asarray(pay.bid) + 1e-6).all()
    assert (myerson > 0).mean() > 0.5  # bids matter at lambda = 1.5
    charge = np.asarray(pay.myerson_charge)
    assert (charge <= np.asarray(pay.bid) + 1e-5).all()


def test_critical_bid_is_where_the_ad_starts_winning(auction, forced_ad, draw):
    run, exposure = auction, forced_ad
    users, hist, bids = _inputs(draw, 32, seed=2)
    lam = 2.0
    pay = run(users, hist, jnp.asarray(bids), lam)
    ad, crit = np.asarray(pay.ad), np.asarray(pay.critical_bid)
    rows = np.arange(32)
    at = bids.copy()
    at[rows, ad] = crit
    below = bids.copy()
    below[rows, ad] = np.maximum(crit * 0.98 - 1e-3, 0.0)
    _, top_at = exposure(users, hist, jnp.asarray(at), lam)
    _, top_below = exposure(users, hist, jnp.asarray(below), lam)
    assert (np.asarray(top_at) == ad).all()
    positive = crit > 1e-3
    assert positive.sum() > 3
    assert (np.asarray(top_below)[positive] != ad[positive]).all()


def test_myerson_payment_matches_brute_force_integration(auction, forced_ad, draw):
    """p = b x(b) - int_0^b x(z) dz, with x(z) evaluated by re-decoding on a fine grid."""
    run, exposure = auction, forced_ad
    n, lam, grid = 8, 1.5, 401
    users, hist, bids = _inputs(draw, n, seed=3)
    pay = run(users, hist, jnp.asarray(bids), lam)
    ad, own = np.asarray(pay.ad), np.asarray(pay.bid)
    rows = np.arange(n)
    zs = np.linspace(0.0, 1.0, grid)
    xs = []
    for t in zs:
        b = bids.copy()
        b[rows, ad] = own * t
        p_ad, top = exposure(users, hist, jnp.asarray(b), lam)
        xs.append(np.asarray(p_ad) * (np.asarray(top) == ad))
    xs = np.stack(xs, axis=1)  # [n, grid]
    integral = np.trapezoid(xs, zs, axis=1) * own
    expected = own * xs[:, -1] - integral
    np.testing.assert_allclose(np.asarray(pay.myerson), expected, atol=4e-3 * own.max())
