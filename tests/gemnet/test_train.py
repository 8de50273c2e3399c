import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffecon import TrainConfig, evaluate, get_setting, itemwise_myerson
from gemnet import (
    GemNetConfig,
    GemNetTrainConfig,
    Menus,
    choose,
    incompatibility,
    load_gemnet,
    over_allocation,
    quantize_bids,
    save_gemnet,
    train_gemnet,
)
from gemnet.model import soft_choice
from gemnet.train import (
    _config_dict,
    _config_from_dict,
    _discrete_mask,
    box_incompatibility,
    gemnet_step_fn,
    init_gemnet_state,
)
from tests.gemnet.conftest import TINY


def test_incompatibility_and_over_allocation_by_hand():
    alloc = jnp.array([[[0.7, 0.2], [0.6, 0.9]], [[0.5, 0.5], [0.5, 0.5]]])
    np.testing.assert_allclose(np.asarray(incompatibility(alloc)), [0.3 + 0.1, 0.0], atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(incompatibility(alloc, margin=0.1)), [0.4 + 0.2, 0.1 + 0.1], atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(over_allocation(alloc)), [0.3, 0.0], atol=1e-6)


def test_box_incompatibility_sees_conflicts_anywhere_in_the_cells():
    # One item, two bidders; each menu: the item at price 0.5, or nothing. At values (0.49, 0.49)
    # nobody buys (no conflict at the profile), but the cells [0.48, 0.52] reach 0.5 for both:
    # both may buy there, so the box is incompatible. Far from the price the box is fine.
    menus = Menus(
        alloc=jnp.array([[[1.0], [0.0]], [[1.0], [0.0]]]), price=jnp.array([[0.5, 0.0]] * 2)
    )
    at, lo, hi = (jnp.full((2, 1), x) for x in (0.49, 0.48, 0.52))
    kappa = 1e4
    point = soft_choice(menus, at, kappa=kappa).alloc
    assert float(incompatibility(point)) < 1e-6
    assert float(box_incompatibility(menus, lo, hi, kappa=kappa)) == pytest.approx(1.0, abs=1e-3)
    # bidder 1's cell below the price: only bidder 0 may buy
    lo1, hi1 = lo.at[1].set(0.2), hi.at[1].set(0.24)
    assert float(box_incompatibility(menus, lo1, hi1, kappa=kappa)) < 1e-6
    # batched like the training step: [*batch, bidders, items]
    batched = Menus(alloc=menus.alloc[None].repeat(3, 0), price=menus.price[None].repeat(3, 0))
    got = box_incompatibility(
        batched, jnp.stack([lo, lo1, lo]), jnp.stack([hi, hi1, hi]), kappa=kappa
    )
    np.testing.assert_allclose(np.asarray(got), [1.0, 0.0, 1.0], atol=1e-3)


def test_box_penalty_needs_the_quantized_grid():
    with pytest.raises(ValueError, match="quantize_level"):
        GemNetTrainConfig(penalty="box")
    with pytest.raises(ValueError, match="penalty must be"):
        GemNetTrainConfig(penalty="boxes", quantize_level=3)


def test_box_penalty_trains_and_shrinks_the_repairs_work():
    # The box penalty is the repair's finest-box test: a network trained against it leaves
    # fewer finest boxes of its level for the repair to fix than one trained on profiles.
    setting = get_setting("additive_2x2_uniform")
    base = dataclasses.replace(TINY, quantize_level=3, lagrange_init=5.0, rho=30.0)
    counts = {}
    for penalty in ("point", "box"):
        model, result = train_gemnet(
            setting,
            dataclasses.replace(base, penalty=penalty),
            TrainConfig(steps=300, log_every=100, progress=False),
        )
        assert np.isfinite(result.history[-1]["loss"])
        counts[penalty] = _failing_finest_boxes(model, setting, level=3)
    assert counts["box"] < counts["point"]


def test_training_raises_revenue_and_tracks_over_allocation():
    setting = get_setting("additive_1x2_uniform")
    config = GemNetTrainConfig(network=GemNetConfig(menu_size=32), batch_size=1024)
    _, result = train_gemnet(setting, config, TrainConfig(steps=400, log_every=50, progress=False))
    first, last = result.history[0], result.history[-1]
    assert {"revenue", "revenue_hard", "over_allocation_rate", "kappa"} <= set(last)
    assert last["revenue_hard"] > max(first["revenue_hard"] + 0.05, 0.45)
    assert last["kappa"] > first["kappa"]
    assert last["over_allocation_rate"] == 0.0  # one bidder can never over-allocate


def test_a_second_stage_continues_from_the_first():
    setting = get_setting("additive_2x2_uniform")
    first = dataclasses.replace(TINY, lagrange_init=1.0, rho=10.0)
    _, r1 = train_gemnet(setting, first, TrainConfig(steps=60, progress=False))
    assert float(r1.state.lagrange) > 1.0  # the multiplier moved in stage 1
    second = dataclasses.replace(first, learning_rate=1e-4, lagrange_init=20.0)
    # zero steps: the stage returns exactly the state it was given
    _, r0 = train_gemnet(setting, second, TrainConfig(steps=0, progress=False), init_state=r1.state)
    for a, b in zip(
        jax.tree.leaves(r0.state.params), jax.tree.leaves(r1.state.params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(r0.state.lagrange) == float(r1.state.lagrange)
    _, r2 = train_gemnet(
        setting,
        second,
        TrainConfig(steps=20, log_every=10, progress=False),
        init_state=r1.state,
        reset_multipliers=True,
    )
    assert r2.history[0]["lagrange"] == pytest.approx(20.0)  # restarted, not carried
    assert int(r2.state.step) == 20  # this stage's own schedules
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(r2.state.params), jax.tree.leaves(r1.state.params), strict=True
        )
    ]
    assert any(moved)
    other = dataclasses.replace(first, network=dataclasses.replace(TINY.network, hidden=8))
    with pytest.raises(ValueError, match=r"do not match config\.network"):
        train_gemnet(setting, other, TrainConfig(steps=10, progress=False), init_state=r1.state)


def test_save_load_roundtrip(tmp_path, tiny_2x2):
    setting, model = tiny_2x2
    config = GemNetTrainConfig(network=GemNetConfig(menu_size=8, hidden=16))
    save_gemnet(model, tmp_path / "ck", setting=setting, config=config, step=300)
    loaded, loaded_config, _ = load_gemnet(tmp_path / "ck", setting)
    assert loaded_config == config
    bids = setting.sample(jax.random.key(0), (32,))
    np.testing.assert_array_equal(np.asarray(loaded(bids).pay), np.asarray(model(bids).pay))
    with pytest.raises(ValueError, match="holds a GemNet for"):
        load_gemnet(tmp_path / "ck", get_setting("additive_1x2_uniform"))
    with pytest.raises(ValueError, match="no GemNet checkpoint"):
        load_gemnet(tmp_path / "missing", setting)
    meta_path = next((tmp_path / "ck").glob("step_*/meta.json"))
    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_gemnet(tmp_path / "ck", setting)


def test_tiny_model_over_allocates_before_repair(tiny_2x2):
    setting, model = tiny_2x2
    est = evaluate(model, setting, n_samples=20_000, key=jax.random.key(1))
    assert est["over_allocation_rate"].value > 0.0


def test_quantize_bids_matches_the_quantized_repair(repaired_2x2):
    setting, _, repaired, cert = repaired_2x2
    assert cert.quantized
    level = cert.stats["max_level"]
    bids = setting.sample(jax.random.key(4), (4096,))
    corners = [jnp.full_like(bids[:1], x) for x in (0.0, 0.5, 1.0)]
    bids = jnp.concatenate([bids, *corners])  # the support's corners and a cell edge
    q = quantize_bids(bids, low=setting.low, high=setting.high, level=level)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(repaired.quantize(bids)))
    np.testing.assert_allclose(
        np.asarray(
            quantize_bids(jnp.array([[[0.0, 0.49]], [[0.5, 1.0]]]), low=0.0, high=1.0, level=1)
        ),
        [[[0.25, 0.25]], [[0.75, 0.75]]],
    )
    with pytest.raises(ValueError, match="level"):
        quantize_bids(bids, low=setting.low, high=setting.high, level=-1)


def test_quantized_training_tracks_the_quantized_mechanism(tiny_2x2):
    setting, model = tiny_2x2
    config = dataclasses.replace(TINY, quantize_level=2)
    graphdef, state = init_gemnet_state(setting, config, jax.random.key(0), steps=10)
    state = state.replace(params=nnx.split(model)[1])
    values = setting.sample(jax.random.key(2), (2048,))
    _, metrics = gemnet_step_fn(graphdef, setting, config, steps=10)(state, values, None)
    at = quantize_bids(values, low=setting.low, high=setting.high, level=2)
    quantized = choose(model.menus(at), values).outcome
    plain = model(values)
    np.testing.assert_allclose(
        float(metrics["revenue_hard"]), float(jnp.mean(quantized.revenue)), rtol=1e-6
    )
    assert abs(float(jnp.mean(quantized.revenue)) - float(jnp.mean(plain.revenue))) > 1e-6
    loaded = _config_from_dict(_config_dict(config))
    assert loaded.quantize_level == 2
    # discrete coordinates are not quantized (the repair leaves them as they are)
    assert _discrete_mask(get_setting("yao_2x2_discrete_37")).all()
    assert not _discrete_mask(setting).any()


def _failing_finest_boxes(model, setting, *, level: int) -> int:
    """How many boxes of the uniform level-``level`` grid fail the candidate test with the
    menus quantized at the cells' centres (the quantized repair's finest boxes, before repair)."""
    n, m = setting.n_bidders, setting.n_items
    cells = 2**level
    idx = np.stack(np.meshgrid(*[np.arange(cells)] * (n * m), indexing="ij"), -1).reshape(-1, n, m)
    width = (setting.high - setting.low) / cells
    lo = setting.low + idx * width
    hi, centre = lo + width, lo + width / 2
    menus = model.menus(jnp.asarray(centre, jnp.float32))
    alloc, price = np.asarray(menus.alloc, np.float64), np.asarray(menus.price, np.float64)
    u_hi = np.einsum("bnm,bnkm->bnk", hi, alloc) - price
    u_lo = np.einsum("bnm,bnkm->bnk", lo, alloc) - price
    candidate = u_hi >= u_lo.max(-1, keepdims=True) - 1e-6
    top = np.max(np.where(candidate[..., None], alloc, 0.0), axis=-2)  # [boxes, n, m]
    return int(np.sum(np.any(top.sum(-2) > 1 + 1e-6, axis=-1)))


def test_an_imitation_stage_fits_the_teachers_outcome():
    # Imitating item-wise Myerson (a compatible menu mechanism) moves the hard outcome towards
    # the teacher's: the tiny network's allocations and revenue end near Myerson's.
    setting = get_setting("additive_2x2_uniform")
    teacher = itemwise_myerson(setting)
    config = dataclasses.replace(
        TINY, imitate="ama", kappa_init=200.0, kappa_final=200.0, learning_rate=3e-3
    )
    values = setting.sample(jax.random.key(3), (20_000,))
    want = teacher(values)

    def alloc_error(model):
        return float(jnp.mean(jnp.abs(model(values).alloc - want.alloc)))

    untrained, _ = train_gemnet(
        setting, config, TrainConfig(steps=0, progress=False), teacher=teacher
    )
    model, result = train_gemnet(
        setting, config, TrainConfig(steps=400, log_every=10, progress=False), teacher=teacher
    )
    first, last = result.history[0], result.history[-1]
    assert last["loss"] < 0.25 * first["loss"]
    assert last["lagrange"] == first["lagrange"]  # no multiplier updates while imitating
    assert alloc_error(model) < min(0.15, 0.5 * alloc_error(untrained))
    revenue = float(jnp.mean(model(values).revenue))
    assert abs(revenue - float(jnp.mean(want.revenue))) < 0.07


def test_imitation_needs_a_known_teacher():
    setting = get_setting("additive_2x2_uniform")
    with pytest.raises(ValueError, match="imitate must be one of"):
        GemNetTrainConfig(imitate="regretnet")
    with pytest.raises(ValueError, match="only used by an imitation stage"):
        train_gemnet(
            setting,
            TINY,
            TrainConfig(steps=1, progress=False),
            teacher=itemwise_myerson(setting),
        )
    with pytest.raises(ValueError, match="needs the teacher"):
        graphdef, _ = init_gemnet_state(
            setting, dataclasses.replace(TINY, imitate="ama"), jax.random.key(0), steps=1
        )
        gemnet_step_fn(graphdef, setting, dataclasses.replace(TINY, imitate="ama"), steps=1)
