"""Pooling the paired organic comparison of independent GEM-Rec runs."""

import math

import pytest

from benchmarks.genrec import pooled_comparison


def _run(seed, ours, sasrec, popularity, se=0.01, setting="ml-100k"):
    records = []

    def add(mechanism, metric, value, stderr=0.0, n=100):
        records.append(
            {
                "setting": setting,
                "seed": seed,
                "mechanism": mechanism,
                "metric": metric,
                "value": value,
                "stderr": stderr,
                "n_samples": n,
            }
        )

    for suffix in ("", "_valid"):
        add(f"gemrec_organic{suffix}", "ndcg10_organic", ours)
        for name, theirs in (("sasrec", sasrec), ("popularity", popularity)):
            add(f"{name}{suffix}", "ndcg10_organic", theirs)
            add(f"gemrec_organic_vs_{name}{suffix}", "ndcg10_difference", ours - theirs, se)
    return records


def test_pooling_averages_differences_and_sums_means():
    pooled = pooled_comparison([_run(0, 0.08, 0.10, 0.04), _run(1, 0.07, 0.06, 0.03, se=0.02)])
    by = {(r["mechanism"], r["metric"]): r for r in pooled}
    diff = by[("pooled_gemrec_organic_vs_sasrec", "ndcg10_difference")]
    assert diff["value"] == pytest.approx(((0.08 - 0.10) + (0.07 - 0.06)) / 2)
    assert diff["stderr"] == pytest.approx(math.sqrt(0.01**2 + 0.02**2) / 2)
    assert diff["n_samples"] == 200 and diff["runs"] == [0, 1]
    ratio = by[("pooled_gemrec_organic_vs_popularity_valid", "ndcg10_ratio")]
    assert ratio["value"] == pytest.approx(0.15 / 0.07)
    assert len(pooled) == 8


def test_pooling_rejects_runs_that_are_not_independent_replicates():
    with pytest.raises(ValueError, match="at least two"):
        pooled_comparison([_run(0, 0.1, 0.1, 0.1)])
    with pytest.raises(ValueError, match="share a seed"):
        pooled_comparison([_run(0, 0.1, 0.1, 0.1), _run(0, 0.1, 0.1, 0.1)])
    with pytest.raises(ValueError, match="different settings"):
        pooled_comparison([_run(0, 0.1, 0.1, 0.1), _run(1, 0.1, 0.1, 0.1, setting="synthetic")])
    partial = [r for r in _run(1, 0.1, 0.1, 0.1) if r["mechanism"] != "sasrec_valid"]
    with pytest.raises(ValueError, match="lacks"):
        pooled_comparison([_run(0, 0.1, 0.1, 0.1), partial])
