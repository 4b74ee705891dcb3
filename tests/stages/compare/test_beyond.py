"""Metrics beyond CKA: debiased CKA, Procrustes/shape, Fréchet, RSA from per-group sums vs direct references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import linalg, stats
from scipy.spatial.distance import pdist

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    GroupedMoments,
    debiased_cka_arrays,
    debiased_cka_moments,
    frechet_arrays,
    frechet_moments,
    group_of,
    linear_cka_arrays,
    linear_cka_moments,
    procrustes_arrays,
    procrustes_moments,
    rsa_arrays,
    shape_metric_arrays,
    shape_metric_moments,
)


def _grouped(blocks: dict[str, np.ndarray], groups: int = 5, shards: int = 3) -> GroupedMoments:
    names = list(blocks)
    n = next(iter(blocks.values())).shape[0]
    ids = np.arange(n)
    parts = []
    for rows in np.array_split(np.arange(n), shards):
        g = GroupedMoments([blocks[k].shape[1] for k in names], names, groups)
        g.update(*(blocks[k][rows] for k in names), group=group_of(ids[rows], groups))
        parts.append(GroupedMoments.from_table(g.to_table()))
    out = parts[0]
    for part in parts[1:]:
        out.merge(part)
    return out


def _pair(seed: int, n: int = 300, p: int = 7, q: int = 11, offset: float = 3.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    x = np.maximum(z @ rng.standard_normal((4, p)) + rng.standard_normal((n, p)), 0) + offset
    y = z @ rng.standard_normal((4, q)) + 0.7 * rng.standard_normal((n, q)) - offset
    return x, y


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("widths", [(7, 11), (11, 7), (6, 6)])
def test_moment_metrics_equal_direct_formulas(seed, widths):
    x, y = _pair(seed, p=widths[0], q=widths[1])
    state = _grouped({"x": x, "y": y}).states(jackknife=False)
    cases = [
        (debiased_cka_moments, debiased_cka_arrays, 1e-10),
        (linear_cka_moments, linear_cka_arrays, 1e-10),
        (procrustes_moments, procrustes_arrays, 1e-10),
        (lambda s, a, b: shape_metric_moments(s, a, b, 1.0), lambda u, v: shape_metric_arrays(u, v, 1.0), 1e-8),
        (lambda s, a, b: shape_metric_moments(s, a, b, 0.5), lambda u, v: shape_metric_arrays(u, v, 0.5), 1e-8),
        (lambda s, a, b: shape_metric_moments(s, a, b, 0.0), lambda u, v: shape_metric_arrays(u, v, 0.0), 1e-8),
    ]
    for from_moments, direct, tol in cases:
        assert from_moments(state, "x", "y")[0] == pytest.approx(direct(x, y), abs=tol)
    if widths[0] == widths[1]:
        assert frechet_moments(state, "x", "y")[0] == pytest.approx(frechet_arrays(x, y), rel=1e-8, abs=1e-8)
    else:
        assert np.isnan(frechet_moments(state, "x", "y")[0])


def test_leave_one_group_out_states_equal_recomputation():
    x, y = _pair(5, n=200)
    grouped = _grouped({"x": x, "y": y}, groups=4)
    state = grouped.states(jackknife=True)
    groups = group_of(np.arange(200), 4)
    for g in range(4):
        keep = groups != g
        assert debiased_cka_moments(state, "x", "y")[g + 1] == pytest.approx(
            debiased_cka_arrays(x[keep], y[keep]), abs=1e-10
        )
        assert procrustes_moments(state, "x", "y")[g + 1] == pytest.approx(procrustes_arrays(x[keep], y[keep]), abs=1e-10)


def test_debiased_cka_is_near_zero_on_independent_data_where_biased_is_not():
    rng = np.random.default_rng(0)
    biased, debiased = {}, {}
    for n in (32, 64, 128, 256):
        values_b, values_d = [], []
        for _ in range(20):
            x, y = rng.standard_normal((n, 64)), rng.standard_normal((n, 64))
            state = _grouped({"x": x, "y": y}, groups=2, shards=1).states(jackknife=False)
            values_b.append(linear_cka_moments(state, "x", "y")[0])
            values_d.append(debiased_cka_moments(state, "x", "y")[0])
        biased[n], debiased[n] = np.mean(values_b), np.array(values_d)
        assert abs(debiased[n].mean()) < 3 * debiased[n].std(ddof=1) / np.sqrt(20) + 1e-3
    # the note's numbers for p = q = 64: 0.67 / 0.50 / 0.33 / 0.20
    assert [round(biased[n], 1) for n in (32, 64, 128, 256)] == [0.7, 0.5, 0.3, 0.2]


def test_procrustes_invariances_and_shape_alpha0_invariance():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 6)) @ np.diag([3, 2, 1, 1, 0.5, 0.2])
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    m = rng.standard_normal((6, 6)) + 3 * np.eye(6)
    state = _grouped({"x": x, "r": 2.5 * x @ q + 1.0, "m": x @ m}).states(jackknife=False)
    assert procrustes_moments(state, "x", "r")[0] == pytest.approx(0.0, abs=1e-10)
    assert shape_metric_moments(state, "x", "r", 1.0)[0] == pytest.approx(0.0, abs=1e-6)
    assert shape_metric_moments(state, "x", "m", 0.0)[0] == pytest.approx(0.0, abs=1e-6)
    assert shape_metric_moments(state, "x", "m", 1.0)[0] > 0.05
    # Ding's procrustes and the angular α = 1 form: cos θ = 1 − d/2
    y = rng.standard_normal((400, 6)) + x[:, ::-1]
    state = _grouped({"x": x, "y": y}).states(jackknife=False)
    d = procrustes_moments(state, "x", "y")[0]
    assert np.cos(shape_metric_moments(state, "x", "y", 1.0)[0]) == pytest.approx(1 - d / 2, abs=1e-10)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_shape_metrics_obey_the_triangle_inequality(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    for trial in range(30):
        n, p = 60, int(rng.integers(3, 8))
        z = rng.standard_normal((n, p))
        blocks = {k: z @ rng.standard_normal((p, p)) * rng.uniform(0.2, 2) + rng.standard_normal((n, p)) * rng.uniform(0.1, 2)
                  for k in "abc"}
        state = _grouped(blocks, groups=2, shards=1).states(jackknife=False)
        d = {pair: shape_metric_moments(state, *pair, alpha)[0] for pair in (("a", "b"), ("b", "c"), ("a", "c"))}
        assert d[("a", "c")] <= d[("a", "b")] + d[("b", "c")] + 1e-9


def test_rsa_equals_scipy():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 9))
    y = x @ rng.standard_normal((9, 5)) + rng.standard_normal((60, 5))
    expected = stats.spearmanr(pdist(x, "correlation"), pdist(y, "correlation")).statistic
    assert rsa_arrays(x, y) == pytest.approx(expected, abs=1e-12)


def test_frechet_against_scipy_sqrtm_and_zero_for_same_distribution():
    x, _ = _pair(3, n=500, p=5, q=5)
    state = _grouped({"x": x, "z": x.copy()}).states(jackknife=False)
    assert frechet_moments(state, "x", "z")[0] == pytest.approx(0.0, abs=1e-8)
    cov = np.cov(x, rowvar=False)
    assert np.trace(linalg.sqrtm(cov @ cov)).real == pytest.approx(np.trace(cov), rel=1e-8)


def test_grouped_moments_reject_bad_input():
    g = GroupedMoments([3, 2], ["a", "b"], 4)
    with pytest.raises(StageInputError, match="group ids"):
        g.update(np.zeros((2, 3)), np.zeros((2, 2)), group=np.array([0, 4]))
    with pytest.raises(StageInputError, match="NaN"):
        g.update(np.full((2, 3), np.nan), np.zeros((2, 2)), group=np.array([0, 1]))
    with pytest.raises(StageInputError, match="at least 2 groups"):
        GroupedMoments([3], ["a"], 1)
