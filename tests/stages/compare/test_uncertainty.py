"""Jackknife from per-group states, permutation nulls, the metric registry and the similarity table."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    REGISTRY,
    GroupedMoments,
    SubsetRows,
    group_of,
    jackknife,
    permutation_pvalue,
    permuted_states,
    resolve_metrics,
    similarity_table,
)


def test_jackknife_of_a_mean_with_one_sample_per_group_is_s2_over_n():
    x = np.random.default_rng(0).standard_normal(25)
    reps = np.array([np.delete(x, g).mean() for g in range(x.size)])
    result = jackknife(x.mean(), reps, np.ones(x.size))
    assert result.se == pytest.approx(x.std(ddof=1) / np.sqrt(x.size), rel=1e-12)
    assert result.bias_corrected == pytest.approx(x.mean(), rel=1e-12)
    assert np.isnan(jackknife(float("nan"), reps, np.ones(x.size)).se)


def _blocks(n=240, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    x = np.maximum(z @ rng.standard_normal((3, 5)) + 0.5 * rng.standard_normal((n, 5)), 0)
    y = z @ rng.standard_normal((3, 4)) + rng.standard_normal((n, 4))
    return x, y


def _fill(x, y, groups, ids):
    g = GroupedMoments([x.shape[1], y.shape[1]], ["x", "y"], groups)
    for rows in np.array_split(np.arange(x.shape[0]), 4):
        g.update(x[rows], y[rows], group=group_of(ids[rows], groups))
    return g


@pytest.mark.parametrize("metric", [m for m in REGISTRY if m != "rsa"])
def test_jackknife_se_equals_brute_force_leave_one_group_out(metric):
    x, y = _blocks()
    ids = np.arange(x.shape[0])
    groups = 6
    table = similarity_table(_fill(x, y, groups, ids), [("x", "y")], [metric], permutations=0)
    row = table.iloc[0]
    assignment = group_of(ids, groups)
    spec = REGISTRY[metric]

    def direct(rows):  # fresh one-group statistic on the kept rows only
        g = GroupedMoments([x.shape[1], y.shape[1]], ["x", "y"], 2)
        g.update(x[rows], y[rows], group=np.zeros(rows.sum(), np.int64))
        return float(spec.moments(g.states(jackknife=False), "x", "y")[0])

    full = direct(np.ones(x.shape[0], bool))
    reps = np.array([direct(assignment != g) for g in range(groups)])
    expected = jackknife(full, reps, np.bincount(assignment, minlength=groups))
    if np.isnan(full):
        assert np.isnan(row["value"])
        return
    assert row["value"] == pytest.approx(full, abs=1e-9)
    assert row["se"] == pytest.approx(expected.se, rel=1e-6, abs=1e-10)
    assert row["ci_low"] < row["value"] < row["ci_high"] or row["se"] == 0


def test_permutation_pvalues_are_uniform_under_the_null():
    rng = np.random.default_rng(3)
    pvalues = {name: [] for name in ("linear_cka", "debiased_cka", "procrustes", "shape_alpha0.5")}
    for _ in range(300):
        x, y = rng.standard_normal((16, 3)), rng.standard_normal((16, 2))
        perms = np.stack([rng.permutation(16) for _ in range(39)])
        observed = permuted_states(x, y, np.arange(16)[None])
        null = permuted_states(x, y, perms)
        for name in pvalues:
            spec = REGISTRY[name]
            pvalues[name].append(
                permutation_pvalue(spec.moments(observed, "x", "y")[0], spec.moments(null, "x", "y"), spec.kind)
            )
    for name, values in pvalues.items():
        assert stats.kstest(values, "uniform").pvalue > 0.001, name
        assert 0.4 < np.mean(values) < 0.6


def test_permutation_null_detects_shared_structure_and_table_columns():
    x, y = _blocks(n=300, seed=4)
    ids = np.arange(300)
    grouped = _fill(x, y, 10, ids)
    subset = SubsetRows([5, 4], ["x", "y"], size=80, seed=1)
    for rows in np.array_split(ids, 3):
        subset.update(x[rows], y[rows], ids=ids[rows])
    subset = SubsetRows.from_table(subset.to_table())
    assert subset.ids.size == 80
    table = similarity_table(grouped, [("x", "y"), ("x", "x")], None, subset=subset.rows(), subset_ids=subset.ids,
                             permutations=49)
    assert set(table.metric) == set(REGISTRY)
    assert list(table.columns[:5]) == ["layer_a", "layer_b", "metric", "metric_kind", "value"]
    real = table[(table.layer_b == "y") & table.metric.isin(["linear_cka", "debiased_cka", "procrustes", "rsa"])]
    assert (real.p_value <= 0.02).all(), real
    assert (real.se > 0).all()
    same = table[(table.layer_b == "x") & (table.metric == "procrustes")]
    assert same.value.iloc[0] == pytest.approx(0.0, abs=1e-9)


def test_subset_is_independent_of_sharding():
    x, y = _blocks(n=100)
    ids = np.arange(100) * 7 + 3
    a, b = SubsetRows([5, 4], ["x", "y"], size=10, seed=2), SubsetRows([5, 4], ["x", "y"], size=10, seed=2)
    a.update(x, y, ids=ids)
    for rows in np.array_split(np.arange(100)[::-1], 5):
        part = SubsetRows([5, 4], ["x", "y"], size=10, seed=2)
        part.update(x[rows], y[rows], ids=ids[rows])
        b.merge(part)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.rows()["x"], b.rows()["x"])


def test_registry_rejects_unknown_metrics():
    assert [m.name for m in resolve_metrics("procrustes, rsa")] == ["procrustes", "rsa"]
    with pytest.raises(StageInputError, match="unknown metric"):
        resolve_metrics(["cka2"])
    with pytest.raises(StageInputError, match="subset"):
        x, y = _blocks()
        similarity_table(_fill(x, y, 3, np.arange(x.shape[0])), [("x", "y")], ["rsa"])


@pytest.mark.parametrize("seed", range(3))
def test_batched_cca_family_equals_the_covariance_functions(seed):
    from repdissect.stages.compare import cca_from_covariance, pwcca_from_covariance, svcca_from_covariance

    rng = np.random.default_rng(seed)
    x, y = _blocks(n=150, seed=seed)
    x[:, 1] = 0.0  # a dead unit
    if seed == 2:
        x, y = y, x
    y = np.c_[y, y[:, 0] + y[:, 1]]  # rank deficiency
    grouped = _fill(x, y, 5, rng.permutation(150))
    states = grouped.states(jackknife=True)
    sx, sy = states.block("x"), states.block("y")
    for r in range(states.n.size):
        m = states.m2[r]
        blocks = (m[sx, sx], m[sy, sy], m[sx, sy])
        assert REGISTRY["cca_mean"].moments(states, "x", "y")[r] == pytest.approx(cca_from_covariance(*blocks).mean, abs=1e-9)
        assert REGISTRY["svcca"].moments(states, "x", "y")[r] == pytest.approx(svcca_from_covariance(*blocks).mean, abs=1e-9)
        assert REGISTRY["pwcca_morcos"].moments(states, "x", "y")[r] == pytest.approx(
            pwcca_from_covariance(*blocks).value, abs=1e-9)


def test_rsa_jackknife_equals_brute_force_recomputation_on_the_kept_rows():
    from repdissect.stages.compare import rsa_arrays

    x, y = _blocks(n=60, seed=4)
    ids = np.arange(100, 160)
    groups = 5
    table = similarity_table(_fill(x, y, groups, ids), [("x", "y")], ["rsa"], subset={"x": x, "y": y},
                             subset_ids=ids, permutations=0, group_seed=3)
    row = table.iloc[0]
    assignment = group_of(ids, groups, 3)
    present = [g for g in range(groups) if (assignment == g).any()]
    reps = np.array([rsa_arrays(x[assignment != g], y[assignment != g]) for g in present])
    sizes = np.array([(assignment == g).sum() for g in present])
    assert row["value"] == pytest.approx(rsa_arrays(x, y), abs=1e-12)
    assert row["se"] == pytest.approx(jackknife(rsa_arrays(x, y), reps, sizes).se, rel=1e-9, abs=1e-12)


def test_an_rdm_restricted_to_some_rows_equals_the_rdm_of_those_rows_bit_for_bit():
    # the RSA jackknife reuses the full RDMs; a BLAS Gram product would round differently per matrix size
    # and break exact ties between distances
    from repdissect.stages.compare import rdm_correlation

    x = np.random.default_rng(5).normal(size=(97, 13))
    x[10] = x[11] * 2.0 + 1.0  # a correlation tie: rows 10 and 11 are at distance 0, and equidistant to the rest
    full = np.zeros((97, 97))
    i, j = np.triu_indices(97, k=1)
    full[i, j] = rdm_correlation(x)
    for keep in (np.arange(0, 97, 3), np.r_[5:40], np.flatnonzero(np.arange(97) % 5 != 2)):
        a, b = np.triu_indices(keep.size, k=1)
        assert np.array_equal(full[keep[a], keep[b]], rdm_correlation(x[keep]))
