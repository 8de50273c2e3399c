import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffecon.outcome import Outcome, check_bids, utility
from diffecon.regret import deviation_profiles, misreport_utility


def test_utility_and_revenue():
    out = Outcome(alloc=jnp.array([[[1.0, 0.0], [0.0, 0.5]]]), pay=jnp.array([[0.3, 0.1]]))
    v = jnp.array([[[0.8, 0.2], [0.4, 0.6]]])
    np.testing.assert_allclose(utility(v, out), [[0.5, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(out.revenue, [0.4], rtol=1e-6)


@pytest.mark.parametrize(
    ("bids", "match"),
    [
        (np.zeros((3,)), "rank 1"),
        (np.zeros((4, 3, 2)), r"bidders=2, items=2.*\(4, 3, 2\)"),
        (np.full((4, 2, 2), np.nan), "NaN"),
        (-np.ones((4, 2, 2)), "negative"),
        (np.ones((4, 2, 2), dtype=np.int32), "floating"),
    ],
)
def test_check_bids_names_the_problem(bids, match):
    with pytest.raises(ValueError, match=match):
        check_bids(bids, n_bidders=2, n_items=2)


def test_check_bids_is_free_under_jit():
    @jax.jit
    def f(b):
        check_bids(b, n_bidders=2, n_items=2)
        return b.sum()

    assert float(f(jnp.ones((3, 2, 2)))) == 12.0
    with pytest.raises(ValueError, match="shape"):
        f(jnp.ones((3, 2, 3)))


def test_deviation_profiles_replace_one_row():
    v = jnp.arange(8.0).reshape(1, 2, 4)[..., :2].reshape(1, 2, 2)
    mis = v + 100.0
    p = deviation_profiles(v, mis)
    assert p.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(p[0, 0], jnp.stack([mis[0, 0], v[0, 1]]))
    np.testing.assert_array_equal(p[0, 1], jnp.stack([v[0, 0], mis[0, 1]]))


def test_misreport_utility_of_first_price():
    def first_price(b):
        win = (b[..., 0, 0] >= b[..., 1, 0]).astype(b.dtype)
        alloc = jnp.stack([win, 1 - win], -1)[..., None]
        return Outcome(alloc=alloc, pay=alloc[..., 0] * b[..., 0])

    v = jnp.array([[[0.8], [0.3]]])
    mis = jnp.array([[[0.35], [0.9]]])
    # bidder 0 shades to 0.35 and still wins: 0.8 - 0.35; bidder 1 overbids to 0.9: 0.3 - 0.9
    np.testing.assert_allclose(misreport_utility(first_price, v, mis), [[0.45, -0.6]], rtol=1e-6)
