"""The shared loop: exact resume, data parallelism, and checkpoints that fail safely."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffecon.regretnet import (
    RegretNetConfig,
    init_regretnet_state,
    regretnet_sample_fn,
    regretnet_step_fn,
)
from diffecon.settings import get_setting
from diffecon.training import (
    TrainConfig,
    latest_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    train,
)

SETTING = get_setting("additive_2x2_uniform")
SMALL = RegretNetConfig(
    hidden=16, layers=1, batch_size=16, train_set_size=256, misreport_steps=3, rho_every=10
)


def _run(tmp_path, steps, *, name="a", on_log=None, n_devices=None, seed=0, config=SMALL):
    graphdef, state = init_regretnet_state(SETTING, config, jax.random.key(seed))
    cfg = TrainConfig(
        steps=steps,
        seed=seed,
        steps_per_call=5,
        log_every=5,
        checkpoint_every=10,
        checkpoint_dir=str(tmp_path / name) if tmp_path else None,
        progress=False,
        n_devices=n_devices,
    )
    return train(
        state,
        regretnet_step_fn(graphdef, SETTING, config),
        regretnet_sample_fn(SETTING, config),
        cfg,
        fingerprint={"hidden": config.hidden},
        on_log=on_log,
    )


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(state)]


class _KilledError(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(tmp_path):
    whole = _run(tmp_path, 40, name="whole")

    def kill_at_25(step, _row):
        if step == 25:
            raise _KilledError

    with pytest.raises(_KilledError):
        _run(tmp_path, 40, name="killed", on_log=kill_at_25)
    assert latest_checkpoint(tmp_path / "killed") == 20
    resumed = _run(tmp_path, 40, name="killed")
    assert resumed.start_step == 20
    for a, b in zip(_leaves(whole.state), _leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(a, b)
    # metrics of the lost steps 21-25 are dropped and rewritten by the resumed run
    lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r["revenue"] for r in whole.history] == [json.loads(x)["revenue"] for x in lines]


def test_eight_devices_match_one_device():
    assert len(jax.devices()) == 8, "conftest must fake 8 CPU devices"
    one = _run(None, 10, n_devices=1)
    eight = _run(None, 10, n_devices=8)
    for a, b in zip(_leaves(one.state), _leaves(eight.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    assert one.history[-1]["revenue"] == pytest.approx(eight.history[-1]["revenue"], rel=1e-4)


def test_mismatched_checkpoint_is_refused(tmp_path):
    _run(tmp_path, 10, name="ck")
    bigger = RegretNetConfig(**{**SMALL.__dict__, "hidden": 32})
    with pytest.raises(ValueError, match="does not match the model"):
        _run(tmp_path, 20, name="ck", config=bigger)
    with pytest.raises(ValueError, match="seed"):
        _run(tmp_path, 20, name="ck", seed=1)


def test_corrupt_checkpoint_is_refused(tmp_path):
    _run(tmp_path, 10, name="ck")
    step_dir = tmp_path / "ck" / "step_000000010"
    like = init_regretnet_state(SETTING, SMALL, jax.random.key(0))[1]
    for root, _dirs, files in os.walk(step_dir / "state"):
        for f in files:
            with open(os.path.join(root, f), "wb") as fh:
                fh.write(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        restore_checkpoint(tmp_path / "ck", like)
    (step_dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        restore_checkpoint(tmp_path / "ck", like)


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    state = {"w": np.arange(4.0, dtype=np.float32)}
    save_checkpoint(tmp_path, 1, state)
    real_save = ocp.StandardCheckpointer.save

    def half_save(self, path, tree, *a, **k):
        real_save(self, path, tree, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(ocp.StandardCheckpointer, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"w": np.zeros(4, np.float32)})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000000001"]
    restored, meta = restore_checkpoint(tmp_path, state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert meta["step"] == 1


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        restore_checkpoint(tmp_path, {"w": np.zeros(2)})


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of"):
        TrainConfig(steps=10, steps_per_call=4, log_every=10)
