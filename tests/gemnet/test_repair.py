import dataclasses
import importlib
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffecon import (
    Exponential,
    IndependentValues,
    RegretConfig,
    Setting,
    check_mechanism,
    evaluate,
    get_setting,
    regret_search,
)
from gemnet import (
    GemNet,
    GemNetConfig,
    RepairConfig,
    RepairError,
    certifiable_share,
    load_certificate,
    repair,
    save_certificate,
)
from gemnet.milp import (
    CellProblem,
    discrete_revenue_milp,
    pairwise_gap,
    solve_cell,
    tighten_prices,
)
from gemnet.model import choose
from gemnet.verify import verify_certificate

FAST = RepairConfig(max_level=3, workers=1, progress=False)


def test_repaired_mechanism_never_over_allocates(repaired_2x2):
    setting, _, repaired, cert = repaired_2x2
    assert cert.stats["milps"] > 0 and sum(cert.stats["offset_cells"]) > 0
    # every cell MILP solved at one of the configured utility floors
    assert sum(cert.stats["floor_slacks"].values()) == cert.stats["milps"]
    assert set(cert.stats["floor_slacks"]) <= {str(s) for s in RepairConfig().floor_slacks}
    est = evaluate(repaired, setting, n_samples=50_000, key=jax.random.key(7))
    assert est["over_allocation_rate"].value == 0.0
    # prices only rise: repaired payments are never below... the base offsets are >= 0
    assert all(np.all(v >= 0) for v in cert.offset_values)
    check_mechanism(repaired, setting)


def test_milp_process_pool_gives_the_same_certificate(tiny_2x2, repaired_2x2):
    """Cell MILPs solved in two spawned processes (one pool for the whole repair) give the same
    offsets, boxes and MILP count as solving them in this process."""
    setting, model = tiny_2x2
    reference = repaired_2x2[3]
    _, cert = repair(model, setting, dataclasses.replace(FAST, workers=2))
    assert cert.stats["milps"] == reference.stats["milps"] > 1
    np.testing.assert_array_equal(cert.box_lo, reference.box_lo)
    np.testing.assert_array_equal(cert.box_size, reference.box_size)
    for got, want in zip(cert.offset_values, reference.offset_values, strict=True):
        np.testing.assert_array_equal(got, want)


def test_repaired_menu_is_bit_identical_when_own_bid_changes(repaired_2x2):
    setting, _, repaired, _ = repaired_2x2
    bids = setting.sample(jax.random.key(1), (256,))
    menus = jax.jit(lambda b: repaired.menus(b))
    base = menus(bids)
    for i in range(setting.n_bidders):
        moved = bids.at[:, i].set(setting.sample(jax.random.key(9 + i), (256,))[:, i])
        other = menus(moved)
        np.testing.assert_array_equal(np.asarray(other.price[:, i]), np.asarray(base.price[:, i]))
        np.testing.assert_array_equal(np.asarray(other.alloc[:, i]), np.asarray(base.alloc[:, i]))


def test_regret_search_finds_no_regret_on_a_repaired_gemnet(repaired_2x2):
    setting, _, repaired, _ = repaired_2x2
    profiles = setting.sample(jax.random.key(3), (40,))
    result = regret_search(
        repaired,
        profiles,
        key=jax.random.key(4),
        setting=setting,
        config=RegretConfig.quick(),
        progress=False,
    )
    assert float(jnp.max(result.regret)) <= 1e-5


def test_certificate_roundtrip(tmp_path, repaired_2x2):
    _, _, _, cert = repaired_2x2
    save_certificate(cert, tmp_path / "cert")
    loaded = load_certificate(tmp_path / "cert")
    # boxes come back sorted, the same set
    order = np.lexsort(cert.box_lo.T[::-1])
    np.testing.assert_array_equal(loaded.box_lo, cert.box_lo[order])
    np.testing.assert_array_equal(loaded.box_size, cert.box_size[order])
    assert loaded.box_lo.dtype == np.int64 and loaded.box_size.dtype == np.int64
    for a, b in zip(loaded.offset_values, cert.offset_values, strict=True):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "cert" / "certificate.npz").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_certificate(tmp_path / "cert")


def test_certificate_files_store_boxes_compactly_and_keep_witnesses(
    tmp_path, repaired_2x2_continuous
):
    setting, model, _, cert = repaired_2x2_continuous
    assert len(cert.witness_t) > 0
    save_certificate(cert, tmp_path / "cert")
    with np.load(tmp_path / "cert" / "certificate.npz") as z:
        assert "box_lo_delta" in z.files and z["box_lo_delta"].dtype == np.int8
    loaded = load_certificate(tmp_path / "cert")

    # witnesses follow their boxes through the reordering
    def named(c):
        return {(tuple(c.box_lo[w[0]].tolist()), *w[1:]) for w in c.witness_index.tolist()}

    before, after = named(cert), named(loaded)
    assert before == after
    assert verify_certificate(model, setting, loaded).ok
    # a size that is not a power of two (a claim the verifier must see) is stored as it is
    odd = dataclasses.replace(cert, box_size=cert.box_size * 3)
    save_certificate(odd, tmp_path / "odd")
    reloaded = load_certificate(tmp_path / "odd")
    assert sorted(map(tuple, reloaded.box_size.tolist())) == sorted(
        map(tuple, odd.box_size.tolist())
    )


def test_repair_rejects_bad_input(tiny_2x2):
    setting, model = tiny_2x2
    with pytest.raises(ValueError, match="is 1 x 2"):
        repair(model, get_setting("additive_1x2_uniform"), FAST)
    unbounded = Setting(
        name="exp_2x2",
        n_bidders=2,
        n_items=2,
        valuation="additive",
        values=IndependentValues.iid(Exponential(1.0), n_bidders=2, n_items=2),
    )
    with pytest.raises(ValueError, match="bounded"):
        repair(model, unbounded, FAST)
    # Under pytest jaxtyping rejects the type first; outside tests repair's own ValueError does.
    with pytest.raises((ValueError, TypeError)):
        repair(object(), setting, FAST)  # type: ignore[arg-type]


def test_repair_and_verify_refuse_item_price_menus(repaired_2x2):
    """Item-price bundles are priced through a max of the others' bids that no bound models."""
    setting, _, _, cert = repaired_2x2
    model = GemNet.for_setting(
        setting, GemNetConfig(menu_size=4, hidden=8, item_prices=True), rngs=nnx.Rngs(0)
    )
    with pytest.raises(RepairError, match="item_prices"):
        repair(model, setting, FAST)
    with pytest.raises(NotImplementedError, match="item_prices"):
        certifiable_share(model, setting, level=1, key=jax.random.key(0), n_boxes=8)
    with pytest.raises(NotImplementedError, match="item_prices"):
        verify_certificate(model, setting, cert)


def test_repair_gives_up_clearly_when_rounds_run_out(tiny_2x2):
    setting, model = tiny_2x2
    with pytest.raises(RepairError, match="MILP rounds"):
        repair(model, setting, dataclasses.replace(FAST, max_rounds=0))


def test_repair_refuses_a_profile_space_too_large_for_its_grid(tiny_2x2):
    setting, model = tiny_2x2
    with pytest.raises(RepairError, match="initial partition has 16 boxes"):
        repair(model, setting, dataclasses.replace(FAST, max_boxes=10))
    big = get_setting("additive_3x10_uniform")
    net = GemNet.for_setting(big, GemNetConfig(menu_size=4, hidden=8), rngs=nnx.Rngs(0))
    # 30 coordinates: a grid of 2^30 boxes at level 1, 2^40 offset cells per bidder at level 2
    with pytest.raises(RepairError, match="initial partition"):
        repair(net, big, dataclasses.replace(FAST, max_level=1))
    for level in (3, 5):  # 2^100 cells at level 5: counted without int64 overflow
        with pytest.raises(RepairError, match="offset grid"):
            repair(net, big, dataclasses.replace(FAST, max_level=level))


def test_certifiable_share_grows_as_boxes_shrink(tiny_2x2, repaired_2x2):
    setting, model = tiny_2x2
    key = jax.random.key(0)
    shares = [
        certifiable_share(model, setting, level=level, key=key, n_boxes=512).value
        for level in (0, 2, 5)
    ]
    # the whole space holds the profiles where the tiny network over-allocates
    assert shares[0] == 0.0
    assert shares[1] < shares[2] <= 1.0
    one = get_setting("additive_1x2_uniform")
    rochet = GemNet.for_setting(one, GemNetConfig(menu_size=4), rngs=nnx.Rngs(0))
    assert certifiable_share(rochet, one, level=0, key=key, n_boxes=8).value == 1.0
    with pytest.raises(ValueError, match="level"):
        certifiable_share(model, setting, level=-1, key=key)


def test_cell_milp_prices_a_bad_element_out():
    # Element 0 is bad and best for the bidder; element 1 is good; element 2 is the null one.
    problem = CellProblem(
        cell=7,
        u_hi=np.array([[0.5, 0.3, 0.0]]),
        u_lo=np.array([[0.4, 0.2, 0.0]]),
        bad=np.array([[True, False, False]]),
        eps=1e-4,
        floor_slacks=(0.05, math.inf),
        dominators=2,
        time_limit_s=10.0,
    )
    sol = solve_cell(problem)
    assert sol.offsets is not None and sol.cell == 7
    # Cheapest fix: dominated by element 1 (u_lo 0.2) -> offset >= 0.5 - 0.2 + eps.
    assert sol.offsets[0] == pytest.approx(0.3 + 1e-4, abs=1e-6)
    assert sol.offsets[2] == 0.0
    # With the floor at 0.4 - 0.05 = 0.35, element 1 cannot dominate: the floor was relaxed.
    assert sol.floor_slack == math.inf


def test_pairwise_gap_bounds_the_utility_difference_and_is_attained_at_a_corner():
    rng = np.random.default_rng(3)
    batch, k1, m, t = 64, 6, 3, 4
    v_lo = rng.uniform(-0.01, 0.8, size=(batch, m))
    v_hi = v_lo + rng.uniform(0.0, 0.2, size=(batch, m))
    alloc = rng.uniform(size=(batch, k1, m)) * (rng.uniform(size=(batch, k1, 1)) < 0.8)
    price = rng.uniform(0.0, 1.0, size=(batch, k1))
    dom = rng.integers(0, k1, size=(batch, t))
    # exact menus: the bound is the maximum over the box, attained at one of its corners
    gap = pairwise_gap(v_lo, v_hi, alloc, alloc, price, price, dom)
    corners = np.array(list(itertools.product([0, 1], repeat=m)))
    v = np.where(corners[None], v_hi[:, None], v_lo[:, None])  # [batch, corners, m]
    u = np.einsum("bcm,bkm->bck", v, alloc) - price[:, None]  # [batch, corners, K + 1]
    u_dom = np.take_along_axis(u, np.broadcast_to(dom[:, None], (batch, len(corners), t)), 2)
    exact = np.max(u[..., :, None] - u_dom[..., None, :], axis=1)
    np.testing.assert_allclose(gap, exact, atol=1e-12)
    # interval menus: every menu inside the bounds, anywhere in the box, stays below the bound
    lo_a, top_a = alloc * 0.9, np.minimum(alloc * 1.1, 1.0)
    lo_p, hi_p = price - 0.01, price + 0.01
    gap = pairwise_gap(v_lo, v_hi, lo_a, top_a, lo_p, hi_p, dom)
    for _ in range(20):
        vv = rng.uniform(v_lo, v_hi)
        a = rng.uniform(lo_a, top_a)
        p = rng.uniform(lo_p, hi_p)
        uu = np.einsum("bm,bkm->bk", vv, a) - p
        diff = uu[:, :, None] - np.take_along_axis(uu, dom, 1)[:, None, :]
        assert np.all(diff <= gap + 1e-12)
    # and it is never looser than the two utilities' own interval bounds
    vh, vl = v_hi[:, None], v_lo[:, None]
    u_hi = np.sum(np.maximum(vh * top_a, vh * lo_a), -1) - lo_p
    u_lo = np.sum(np.minimum(vl * top_a, vl * lo_a), -1) - hi_p
    assert np.all(gap <= u_hi[:, :, None] - np.take_along_axis(u_lo, dom, 1)[:, None, :] + 1e-12)


def test_cell_milp_excludes_by_the_pairwise_gap_when_the_menu_is_given():
    # One item of a box v in [0.5, 0.6]: element 0 sells it at 0.10 (bad), element 1 at 0.12.
    # Their utilities differ by exactly 0.02 everywhere, so a rise of 0.02 + eps excludes
    # element 0; the utilities' interval bounds alone ask for 0.6 - 0.1 - (0.5 - 0.12) = 0.12.
    eps = 1e-4
    menu = (np.array([[1.0], [1.0], [0.0]]),) * 2 + (np.array([0.10, 0.12, 0.0]),) * 2
    v_lo, v_hi = np.array([[0.5]]), np.array([[0.6]])
    u_hi = v_hi[:, :1] * menu[0][:, 0] - menu[2]
    u_lo = v_lo[:, :1] * menu[0][:, 0] - menu[2]
    common = dict(
        cell=0,
        u_hi=u_hi,
        u_lo=u_lo,
        bad=np.array([[True, False, False]]),
        eps=eps,
        floor_slacks=(0.05, math.inf),
        dominators=2,
        time_limit_s=10.0,
    )
    interval = solve_cell(CellProblem(**common))
    pairwise = solve_cell(CellProblem(**common, menu=menu, v_lo=v_lo, v_hi=v_hi))
    assert interval.offsets is not None and pairwise.offsets is not None
    assert interval.offsets[0] == pytest.approx(0.12 + eps, abs=1e-6)
    assert pairwise.offsets[0] == pytest.approx(0.02 + eps, abs=1e-6)
    assert pairwise.offsets[1] == 0.0 and pairwise.floor_slack == 0.05


def test_cell_milp_without_bad_elements_changes_nothing():
    problem = CellProblem(
        cell=0,
        u_hi=np.array([[0.5, 0.0]]),
        u_lo=np.array([[0.4, 0.0]]),
        bad=np.array([[False, False]]),
        eps=1e-4,
        floor_slacks=(math.inf,),
        dominators=2,
        time_limit_s=10.0,
    )
    sol = solve_cell(problem)
    np.testing.assert_array_equal(sol.offsets, 0.0)


def _two_bidders_one_item(price: float):
    """Two bidders, one item, values {1, 2} w.p. 1/2: each bidder's menu at either cell offers
    the item at ``price`` (element 0) or nothing (the null element, 1)."""
    values = np.array([1.0, 2.0])
    utilities = np.zeros((2, 2, 2, 2))  # [bidders, cells (other's value), types, K + 1]
    utilities[..., 0] = values[None, None, :] - price
    prices = np.zeros((2, 2, 2))
    prices[..., 0] = price
    alloc = np.zeros((2, 2, 2, 1))
    alloc[:, :, 0, 0] = 1.0
    profiles = np.array([(a, b) for a in range(2) for b in range(2)])  # value indices
    cell_of = profiles[:, ::-1]  # bidder 0's cell is bidder 1's value and vice versa
    return utilities, prices, alloc, cell_of, profiles, np.full(4, 0.25)


def _solve(price: float, signed: bool = False):
    problem = _two_bidders_one_item(price)
    result = discrete_revenue_milp(
        *problem, eps=1e-4, alloc_margin=1e-5, time_limit_s=30.0, signed=signed
    )
    return problem, result


def test_discrete_revenue_milp_finds_myersons_revenue():
    # Both bidders buy at price 0.5: over-allocation. The best price-only repair is Myerson's
    # auction for values {1, 2}: virtual values 0 and 2, revenue 2 * P(some bidder is high) = 1.5.
    (utilities, prices, alloc, cell_of, type_of, probs), (rises, status, objective) = _solve(0.5)
    assert status == "OPTIMAL" and rises is not None
    assert objective == pytest.approx(1.5, abs=1e-3)
    assert np.all(rises >= 0) and np.all(rises[..., -1] == 0)
    # Replay the choices: compatible at every profile, revenue as claimed.
    revenue = 0.0
    for p in range(4):
        taken = 0.0
        for i in range(2):
            c, t = cell_of[p, i], type_of[p, i]
            u = utilities[i, c, t] - rises[i, c]
            k = int(np.argmax(u))
            taken += alloc[i, c, k, 0]
            revenue += probs[p] * (prices[i, c, k] + rises[i, c, k])
        assert taken <= 1.0
    assert revenue == pytest.approx(objective, abs=1e-6)


def test_discrete_revenue_milp_keeps_compatible_menus_and_raises_prices():
    # At price 2.5 nobody buys: compatible already; the MILP may only raise revenue (here: keep
    # the null choices, since rises cannot lower the price to 2).
    _, (_, status, objective) = _solve(2.5)
    assert status == "OPTIMAL" and objective == pytest.approx(0.0, abs=1e-9)
    # With signed offsets (discrete settings) the menu is re-priced: Myerson's 1.5 again, and no
    # price falls below 0.
    (_, prices, *_), (rises, status, objective) = _solve(2.5, signed=True)
    assert status == "OPTIMAL" and objective == pytest.approx(1.5, abs=1e-3)
    assert rises is not None and np.all(prices + rises >= 0)


def test_tighten_prices_keeps_choices_and_extracts_the_surplus():
    # One bidder type (value 1) buys element 0 at 0.2 over the null element; the price can rise to
    # 1 - margin. Type 2 (value 0.5) buys nothing and must keep doing so.
    utilities = np.array([[0.8, 0.0], [-0.3, 0.0]])
    rises = tighten_prices(utilities, np.array([0.5, 0.5]), margin=1e-3, limit=10.0)
    assert rises is not None
    assert rises[0] == pytest.approx(0.8 - 1e-3, abs=1e-9) and rises[1] == 0.0
    assert np.array_equal(np.argmax(utilities - rises, axis=1), [0, 1])
    # A choice tied with the null element cannot keep a margin: no rises.
    assert tighten_prices(np.array([[0.0, 0.0]]), np.ones(1), margin=1e-3, limit=1.0) is None


def test_discrete_setting_is_repaired_on_its_support():
    from diffecon import TrainConfig
    from gemnet import GemNetConfig, GemNetTrainConfig, train_gemnet

    setting = get_setting("yao_2x2_discrete_37")
    config = GemNetTrainConfig(network=GemNetConfig(menu_size=8, hidden=16), batch_size=256)
    model, _ = train_gemnet(setting, config, TrainConfig(steps=100, progress=False))
    repaired, cert = repair(model, setting, FAST)
    assert cert.n_boxes == 16 and np.all(cert.box_size == 1)
    from gemnet import verify_certificate

    assert verify_certificate(model, setting, cert).ok
    profiles = np.array(np.meshgrid(*[[3.0, 7.0]] * 4, indexing="ij")).reshape(4, -1).T
    bids = jnp.asarray(profiles.reshape(16, 2, 2), jnp.float32)
    out = repaired(bids)
    assert float(jnp.max(jnp.sum(out.alloc, axis=-2))) <= 1.0 + 1e-6
    # The joint revenue MILP ran and its objective is the repaired mechanism's exact revenue.
    milp = cert.stats["discrete_revenue_milp"]
    assert milp["status"] in ("OPTIMAL", "FEASIBLE")  # FEASIBLE: out of time on a busy machine
    assert float(jnp.mean(jnp.sum(out.pay, -1))) == pytest.approx(milp["objective"], abs=1e-3)
    # The staged repair (minimal non-negative offsets, then tightening) certifies as well.
    staged, staged_cert = repair(model, setting, dataclasses.replace(FAST, discrete_revenue=False))
    assert verify_certificate(model, setting, staged_cert).ok
    assert "discrete_revenue_milp" not in staged_cert.stats
    assert np.all(np.concatenate([v.ravel() for v in staged_cert.offset_values]) >= 0)
    assert float(jnp.max(jnp.sum(staged(bids).alloc, axis=-2))) <= 1.0 + 1e-6


def test_adversarial_search_finds_over_allocation_only_before_repair(repaired_2x2):
    from gemnet import adversarial_over_allocation

    setting, model, repaired, _ = repaired_2x2
    before = adversarial_over_allocation(
        model, setting, key=jax.random.key(0), n_starts=256, steps=50
    )
    assert before.max_over_allocation > 0.05 and before.rate > 0.0
    after = adversarial_over_allocation(
        repaired, setting, key=jax.random.key(0), n_starts=256, steps=50
    )
    assert after.max_over_allocation <= 1e-6 and after.rate == 0.0


@pytest.mark.slow
def test_yao_repaired_revenue_equals_the_optimal_auction():
    # The benchmark's recipe (minutes on a CPU): training, then the exact discrete repair; the
    # optimum comes from an independent LP over the 16 profiles.
    from benchmarks.gemnet import RECIPES, train_recipe
    from diffecon import optimal_dsic_lp
    from gemnet import verify_certificate

    setting = get_setting("yao_2x2_discrete_37")
    model, _, _ = train_recipe(
        setting, RECIPES[setting.name], seed=0, runs_dir=None, progress=False
    )
    repaired, cert = repair(model, setting, dataclasses.replace(FAST, time_limit_s=300.0))
    assert verify_certificate(model, setting, cert).ok
    lp = optimal_dsic_lp(setting)
    out = repaired(jnp.asarray(lp.profiles, jnp.float32))
    assert float(jnp.max(jnp.sum(out.alloc, axis=-2))) <= 1.0
    revenue = float(np.sum(lp.probs * np.asarray(out.pay, np.float64).sum(-1)))
    assert revenue == pytest.approx(lp.revenue, rel=1e-3)


def test_repair_breakdown_accounts_for_the_whole_revenue_change(repaired_2x2):
    from gemnet import repair_breakdown

    setting, model, repaired, _ = repaired_2x2
    key = jax.random.key(11)
    parts = repair_breakdown(model, repaired, setting, key=key, n_samples=4096, chunk_size=1024)
    # the same profiles, revenue by the plain evaluation of both mechanisms
    bids = jnp.concatenate(
        [setting.sample(jax.random.fold_in(key, c), (1024,)) for c in range(4)], axis=0
    )
    change = np.mean(np.sum(np.asarray(repaired(bids).pay) - np.asarray(model(bids).pay), axis=-1))
    total = parts["revenue_change_kept"].value + parts["revenue_change_switched"].value
    assert total == pytest.approx(change, abs=1e-5)
    assert 0.0 <= parts["share_switched_to_null"].value <= parts["share_switched"].value <= 1.0
    assert parts["offset_on_chosen"].value >= 0.0
    # switches at profiles the trained menus over-allocate, counted directly
    before, after = model(bids), repaired(bids)
    conflict = np.any(np.sum(np.asarray(before.alloc), axis=-2) > 1.0 + 1e-6, axis=-1)
    moved = np.asarray(
        choose(model.menus(bids), bids).index != choose(repaired.menus(bids), bids).index
    )  # [B, n]
    assert conflict.any() and (moved & ~conflict[:, None]).any()  # both kinds occur here
    at = parts["share_switched_at_conflicts"].value
    assert at <= parts["share_switched"].value
    assert at == pytest.approx(np.mean(moved & conflict[:, None]), abs=1e-6)
    switched_pay = np.asarray(after.pay) - np.asarray(before.pay)
    assert parts["revenue_change_switched_at_conflicts"].value == pytest.approx(
        np.mean(np.sum(np.where(moved & conflict[:, None], switched_pay, 0.0), -1)), abs=1e-5
    )


def test_repair_with_the_pairwise_test_is_certified_and_never_over_allocates(tiny_2x2):
    setting, model = tiny_2x2
    config = RepairConfig(max_level=3, workers=1, progress=False, pairwise=4)
    repaired, cert = repair(model, setting, config)
    assert cert.stats["pairwise"] == 4
    report = verify_certificate(model, setting, cert)
    assert report.ok, report.failures
    bids = setting.sample(jax.random.key(5), (50_000,))
    alloc = repaired(bids).alloc
    assert float(jnp.max(jnp.sum(alloc, axis=-2))) <= 1.0 + 1e-6


def test_progress_reports_rounds_and_milps_and_changes_nothing(repaired_2x2, capsys):
    setting, model, _, cert = repaired_2x2
    _, loud = repair(model, setting, RepairConfig(max_level=3, workers=1, progress=True))
    out = capsys.readouterr()
    assert "[repair] stage 1 round 0" in out.out
    assert "cell MILPs" in out.err  # the tqdm bar over each round's cell problems
    assert loud.stats["milps"] == cert.stats["milps"]
    for a, b in zip(loud.offset_values, cert.offset_values, strict=True):
        np.testing.assert_array_equal(a, b)


def test_quantized_boxes_may_span_cells_with_different_offsets(repaired_2x2):
    # Quantized menus are bounded with each cell's offsets in its prices, so the partition keeps
    # boxes wider than one cell of b_-i around offset cells (no forced refinement) and still
    # verifies; the mechanism never over-allocates there.
    setting, model, repaired, cert = repaired_2x2
    assert cert.quantized
    lo, size = np.asarray(cert.box_lo), np.asarray(cert.box_size)
    spanning = np.zeros(len(lo), bool)
    for i in range(cert.n_bidders):
        dims = list(cert.others_coordinates(i))
        keys = np.asarray(cert.offset_keys[i], np.int64)
        strides = np.asarray(cert.strides(i), np.int64)
        cells = np.asarray([len(cert.cell_lo[d]) for d in dims], np.int64)
        q = (keys[:, None] // strides[None, :]) % cells[None, :]  # [C, d] offset cells
        a, b = lo[:, dims][:, None, :], (lo[:, dims] + size[:, dims])[:, None, :]
        covers = np.all((q[None] >= a) & (q[None] < b), axis=-1).any(axis=1)
        spanning |= covers & np.any(size[:, dims] > 1, axis=1)
    assert spanning.any()
    assert verify_certificate(model, setting, cert).ok
    rlo = np.asarray([cert.cell_lo[d][lo[spanning, d]] for d in range(lo.shape[1])]).T
    rhi = np.asarray(
        [cert.cell_hi[d][lo[spanning, d] + size[spanning, d] - 1] for d in range(lo.shape[1])]
    ).T
    u = jax.random.uniform(jax.random.key(3), (64, len(rlo), lo.shape[1]))
    bids = jnp.asarray(rlo + (rhi - rlo) * np.asarray(u), jnp.float32).reshape(
        -1, cert.n_bidders, cert.n_items
    )
    alloc = repaired(bids).alloc
    assert float(jnp.max(jnp.sum(alloc, axis=-2))) <= 1.0 + 1e-6


def test_interpolated_repair_is_certified_and_never_over_allocates(repaired_2x2_interpolated):
    setting, model, repaired, cert = repaired_2x2_interpolated
    assert cert.quantized and cert.interpolated and repaired.interpolated
    report = verify_certificate(model, setting, cert)
    assert report.ok, report.failures
    est = evaluate(repaired, setting, n_samples=50_000, key=jax.random.key(11))
    assert est["over_allocation_rate"].value == 0.0
    bids = setting.sample(jax.random.key(12), (50_000,))
    assert float(jnp.max(jnp.sum(repaired(bids).alloc, axis=-2))) <= 1.0 + 1e-6
    # interpolated allocations never leave [0, 1], not even by float32 rounding
    alloc = repaired.interpolate(bids).alloc
    assert float(jnp.max(alloc)) <= 1.0 and float(jnp.min(alloc)) >= 0.0
    check_mechanism(repaired, setting)


def test_interpolated_menus_meet_the_network_at_nodes_and_are_continuous(
    repaired_2x2_interpolated,
):
    _, model, repaired, cert = repaired_2x2_interpolated
    cells = len(cert.cell_lo[0])
    rng = np.random.default_rng(0)
    # at the corners of the cells the interpolant is the network's menu
    nodes = jnp.asarray(rng.integers(0, cells + 1, (256, 2, 2)) / cells, jnp.float32)
    got, want = repaired.interpolate(nodes), model.menus(nodes)
    np.testing.assert_allclose(got.alloc, want.alloc, atol=1e-6)
    np.testing.assert_allclose(got.price, want.price, atol=1e-6)
    # across an inner cell boundary the menus do not jump (quantized menus would)
    edge = rng.integers(1, cells, 256) / cells
    bids = jnp.asarray(rng.uniform(size=(256, 2, 2)), jnp.float32)
    below = bids.at[:, 1, 0].set(jnp.asarray(edge - 1e-6, jnp.float32))
    above = bids.at[:, 1, 0].set(jnp.asarray(edge + 1e-6, jnp.float32))
    a, b = repaired.interpolate(below), repaired.interpolate(above)
    np.testing.assert_allclose(a.price[:, 0], b.price[:, 0], atol=1e-3)
    # strategy-proof: bidder 0's menu (offsets included) ignores its own bid, bit for bit
    moved = bids.at[:, 0].set(jnp.asarray(rng.uniform(size=(256, 2)), jnp.float32))
    m1, m2 = repaired.menus(bids), repaired.menus(moved)
    np.testing.assert_array_equal(m1.alloc[:, 0], m2.alloc[:, 0])
    np.testing.assert_array_equal(m1.price[:, 0], m2.price[:, 0])


def test_interpolated_affine_bounds_contain_sampled_utilities(repaired_2x2_interpolated):
    # The relational test's bounds of every utility over a finest box: the value at the centre,
    # the slopes, and the remainder rho (which covers the clipping to the cell) hold for sampled
    # profiles of the inflated box, computed by the mechanism itself.
    setting, model, repaired, _ = repaired_2x2_interpolated

    rep = importlib.import_module("gemnet.repair")
    grid = rep._make_grid(setting, 3)
    offsets = [rep._Offsets(grid, i, model.menu_size + 1) for i in range(2)]
    config = RepairConfig(max_level=3, progress=False, interpolate=True)
    menus = rep._CellMenus(model, grid, offsets, interpolate=True)
    rng = np.random.default_rng(1)
    lo = rng.integers(0, 8, (32, 4))
    size = np.ones_like(lo)
    inflation = 0.01  # wider than the repair's, so that clipping matters
    rlo, rhi = grid.bounds(lo, size, inflation)
    rlo, rhi = rlo.reshape(-1, 2, 2), rhi.reshape(-1, 2, 2)
    corners = [menus.corners(i, lo) for i in range(2)]
    c_alloc = np.stack([c[0] for c in corners], 1).astype(np.float64)
    c_price = np.stack([c[1] for c in corners], 1).astype(np.float64)
    cell_w = np.full((len(lo), 2, 2), 1 / 8)
    a_lo, a_hi = c_alloc.min(2), c_alloc.max(2)
    a_top = rep._alloc_top(a_hi, config.alloc_tolerance, np)
    delta = np.zeros((len(lo), 2, model.menu_size + 1))
    affine, g_own, g_oth, rho = rep._interp_forms(
        rlo, rhi, delta, c_alloc, c_price, cell_w, a_lo, a_top, np
    )
    u = rng.uniform(size=(64, *rlo.shape))
    v = rlo + (rhi - rlo) * u  # [S, B, 2, 2]
    m = repaired.interpolate(jnp.asarray(v.reshape(-1, 2, 2), jnp.float32))
    alloc = np.asarray(m.alloc, np.float64).reshape(*v.shape[:2], 2, -1, 2)
    price = np.asarray(m.price, np.float64).reshape(*v.shape[:2], 2, -1)
    util = np.einsum("sbnm,sbnkm->sbnk", v, alloc) - price
    c = (rlo + rhi) / 2
    dv = v - c  # [S, B, n, m]
    pred = (
        affine
        + np.einsum("sbnm,bnkm->sbnk", dv, g_own)
        + np.einsum("sbnd,bnkd->sbnk", dv[:, :, ::-1], g_oth)
    )
    assert np.all(np.abs(util - pred) <= rho + 1e-5)


def test_interpolation_needs_quantized_menus_and_continuous_values(tiny_2x2):
    setting, model = tiny_2x2
    with pytest.raises(ValueError, match="quantize=True"):
        repair(model, setting, dataclasses.replace(FAST, interpolate=True, quantize=False))
    yao = get_setting("yao_2x2_discrete_37")
    net = GemNet.for_setting(yao, GemNetConfig(menu_size=4, hidden=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="discrete"):
        repair(net, yao, dataclasses.replace(FAST, interpolate=True))


_ORPHAN_SCRIPT = """
import concurrent.futures, multiprocessing, os
from gemnet.milp import exit_with_parent
if __name__ == "__main__":
    pool = concurrent.futures.ProcessPoolExecutor(
        1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=exit_with_parent,
        initargs=(os.getpid(), 0.1),
    )
    print(pool.submit(os.getpid).result(), flush=True)
    os._exit(0)  # gone without shutting the pool down, like a killed repair
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_milp_workers_exit_with_their_parent(tmp_path):
    """A repair killed from outside leaves no MILP worker running (the pool's initializer)."""
    script = tmp_path / "pool.py"
    script.write_text(_ORPHAN_SCRIPT)
    root = str(Path(__file__).resolve().parents[2])  # the repository: spawned workers import gemnet
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env=env,
    )
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = _alive(pid)
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the MILP worker outlived its parent"
