"""The benchmark suites' smoke runs, and the README tables against the committed results."""

import json
import math

import pytest

from benchmarks import readme
from benchmarks.__main__ import main
from benchmarks.common import RECORD_KEYS
from diffecon.settings import get_setting


def _records(path):
    records = json.loads(path.read_text())
    for r in records:
        assert set(RECORD_KEYS) <= set(r), f"record lacks {set(RECORD_KEYS) - set(r)}"
    return records


def test_revenue_quick_smoke_run(tmp_path):
    out = tmp_path / "revenue"
    code = main(
        [
            "revenue",
            "--quick",
            "--settings",
            "single_item_2_uniform",
            "additive_1x2_uniform",
            "--out",
            str(out),
            "--runs-dir",
            str(tmp_path / "runs"),
        ]
    )
    assert code == 0
    records = _records(out / "revenue.json")
    by = {(r["setting"], r["mechanism"], r["metric"]): r for r in records}
    myerson = by[("single_item_2_uniform", "itemwise_myerson", "revenue")]
    assert myerson["n_samples"] == 20_000
    assert abs(myerson["value"] - 5 / 12) <= 4 * myerson["stderr"]
    assert by[("single_item_2_uniform", "vcg", "regret_max")]["value"] < 1e-4
    assert by[("single_item_2_uniform", "first_price", "regret_mean")]["value"] > 0.1
    assert ("additive_1x2_uniform", "regretnet", "train_wall_s") in by
    assert (out / "revenue.md").read_text().startswith("| setting | mechanism |")
    assert (out / "revenue_additive_1x2_uniform.png").stat().st_size > 1000
    assert (out / "alloc_optimal_additive_1x2_uniform.png").is_file()
    assert all(r["command"].startswith("python -m benchmarks") for r in records)


def test_gemnet_quick_smoke_run(tmp_path):
    out = tmp_path / "gemnet"
    code = main(
        [
            "gemnet",
            "--quick",
            "--settings",
            "additive_1x2_uniform",
            "additive_2x2_uniform",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    records = _records(out / "gemnet.json")
    by = {(r["setting"], r["mechanism"], r["metric"]): r for r in records}
    assert by[("additive_1x2_uniform", "rochetnet", "over_allocation_rate")]["value"] == 0.0
    assert by[("additive_2x2_uniform", "gemnet_repaired", "certified")]["value"] == 1.0
    assert by[("additive_2x2_uniform", "gemnet_repaired", "over_allocation_rate")]["value"] == 0.0
    adversarial = by[("additive_2x2_uniform", "gemnet_repaired", "adversarial_over_allocation")]
    assert adversarial["value"] <= 1e-6
    assert by[("additive_2x2_uniform", "gemnet_repaired", "regret_max")]["value"] <= 1e-5
    assert ("additive_2x2_uniform", "gemnet_unrepaired", "revenue") in by
    assert (out / "menu_additive_2x2_uniform_after_repair.png").stat().st_size > 1000
    assert (out / "checkpoints" / "gemnet_additive_2x2_uniform" / "certificate").is_dir()


def test_unknown_setting_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown setting"):
        main(["revenue", "--quick", "--settings", "additive_2x2_unifrm", "--out", str(tmp_path)])


def test_unknown_suite_prints_usage(capsys):
    assert main(["nope"]) == 2
    assert "suites: revenue, speed, readme, merge, gemnet" in capsys.readouterr().err


def test_speed_quick_smoke_run(tmp_path):
    code = main(["speed", "--quick", "--settings", "additive_2x2_uniform", "--out", str(tmp_path)])
    assert code == 0
    records = _records(tmp_path / "speed.json")
    its = [r for r in records if r["metric"] == "iters_per_s"]
    assert {r["mechanism"] for r in its} == {"regretnet_fused", "regretnet_per_op_dispatch"}
    assert all(r["value"] > 0 and math.isfinite(r["value"]) for r in its)


def test_readme_tables_match_the_committed_results():
    assert readme.run(readme.ReadmeConfig(check=True)), (
        "README.md tables differ from benchmarks/results; run `python -m benchmarks readme`"
    )


def _optimum(name):
    return get_setting(name).reference("optimal").value


def test_committed_revenue_results_meet_the_spec():
    """The committed reference run: exact baselines within 3 SE, RegretNet at its targets."""
    records = _records(readme.RESULTS_DIR / "revenue" / "revenue.json")
    by = {(r["setting"], r["mechanism"], r["metric"]): r for r in records}
    exact = [
        ("single_item_2_uniform", "itemwise_myerson", 5 / 12),
        ("additive_2x2_uniform", "itemwise_myerson", 5 / 6),
        ("additive_2x2_uniform", "vcg", 2 / 3),
        ("additive_1x2_uniform", "optimal", _optimum("additive_1x2_uniform")),
        ("unit_1x2_uniform", "optimal", _optimum("unit_1x2_uniform")),
        ("unit_1x2_uniform_23", "optimal", 2.13313),
        ("additive_1x2_uniform_416_47", "optimal", 88 / 9),
    ]
    for setting, mech, target in exact:
        r = by[(setting, mech, "revenue")]
        assert r["n_samples"] >= 1_000_000
        assert abs(r["value"] - target) <= 3 * r["stderr"], (setting, mech, r["value"], target)
    for mech in ("vcg", "itemwise_myerson"):
        assert by[("additive_2x2_uniform", mech, "regret_max")]["value"] < 1e-5
    fp = by[("single_item_2_uniform", "first_price", "regret_mean")]
    assert fp["n_samples"] >= 10_000 and abs(fp["value"] - 1 / 6) <= 0.02 / 6
    rn = by[("additive_2x2_uniform", "regretnet", "revenue")]
    assert rn["value"] >= 0.86
    assert by[("additive_2x2_uniform", "regretnet", "regret_mean")]["value"] < 1e-3
    assert by[("additive_2x2_uniform", "regretnet", "regret_mean")]["n_samples"] >= 10_000
    rn1 = by[("additive_1x2_uniform", "regretnet", "revenue")]
    assert abs(rn1["value"] - 0.549201) <= 0.01
    assert by[("additive_1x2_uniform", "regretnet", "regret_mean")]["value"] < 1e-3
