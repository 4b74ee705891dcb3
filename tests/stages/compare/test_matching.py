"""Correlation with dead units, and the unit matchings against brute force and known permutations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    JointMoments,
    bottleneck_matching,
    correlation_arrays,
    correlation_from_covariance,
    dead_units,
    hungarian_matching,
    matched_counts,
    semi_matching,
    within_net_max_correlation,
)


def _brute_max_sum(corr: np.ndarray) -> float:
    """Best total correlation over all one-to-one matchings of the smaller side (rows ≤ cols assumed)."""
    rows, cols = corr.shape
    return max(sum(corr[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows))


def _brute_bottleneck(corr: np.ndarray) -> float:
    rows, cols = corr.shape
    return max(min(corr[i, p[i]] for i in range(rows)) for p in itertools.permutations(range(cols), rows))


def _brute_max_matching(edges: np.ndarray) -> int:
    """Maximum matching size by exhaustive recursion over the rows."""
    rows, cols = edges.shape

    def best(row: int, used: frozenset) -> int:
        if row == rows:
            return 0
        result = best(row + 1, used)  # leave this row unmatched
        for col in range(cols):
            if edges[row, col] and col not in used:
                result = max(result, 1 + best(row + 1, used | {col}))
        return result

    return best(0, frozenset())


def _permuted_pair(seed: int = 0, n: int = 2000, units: int = 12):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    a = z @ rng.standard_normal((4, units)) + 0.7 * rng.standard_normal((n, units))
    perm = rng.permutation(units)
    scale = rng.uniform(0.1, 10.0, units)
    b = a[:, perm] * scale + rng.uniform(-5, 5, units)
    return a, b, perm


def test_correlation_matches_numpy_and_flags_dead_units():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 4))
    a[:, 2] = 3.5  # constant channel
    b = rng.standard_normal((500, 3))
    m = JointMoments(4, 3)
    m.update(a, b)
    corr = m.correlation()
    assert np.isfinite(corr).all()
    np.testing.assert_array_equal(corr[2], 0.0)
    np.testing.assert_array_equal(corr[:, 2], 0.0)
    alive = [0, 1, 3, 4, 5, 6]
    x = np.concatenate([a, b], axis=1)[:, alive]
    np.testing.assert_allclose(corr[np.ix_(alive, alive)], np.corrcoef(x, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(corr[:4, 4:], correlation_arrays(a, b), atol=1e-12)
    dead = dead_units(np.diag(m.covariance()), m.mean)
    assert dead.tolist() == [False, False, True, False, False, False, False]


def test_float32_constant_channel_is_dead_not_noise():
    a = np.full((1000, 2), 0.1, dtype=np.float32)
    a[:, 0] = np.random.default_rng(0).standard_normal(1000)
    m = JointMoments(2, 0)
    for lo in range(0, 1000, 128):
        m.update(a[lo : lo + 128], np.zeros((len(a[lo : lo + 128]), 0)))
    assert dead_units(m.variance(), m.mean).tolist() == [False, True]


def test_within_net_baseline_on_known_matrix():
    corr = np.array(
        [
            [1.0, 0.9, 0.1, 0.0],
            [0.9, 1.0, 0.3, 0.0],
            [0.1, 0.3, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
        ]
    )
    best, partner = within_net_max_correlation(corr, np.array([False, False, False, True]))
    np.testing.assert_allclose(best, [0.9, 0.9, 0.3, 0.0])
    assert partner.tolist() == [1, 0, 1, -1]


@pytest.mark.parametrize("seed", range(3))
def test_every_method_recovers_a_permutation(seed):
    a, b, perm = _permuted_pair(seed)
    m = JointMoments(a.shape[1], b.shape[1])
    m.update(a, b)
    corr_ab = m.correlation()[: a.shape[1], a.shape[1] :]
    # b[:, j] = a[:, perm[j]] * scale, so unit i of A matches unit inverse[i] of B.
    inverse = np.argsort(perm)
    for matching in (
        semi_matching(corr_ab),
        hungarian_matching(corr_ab),
        bottleneck_matching(corr_ab)[1],
    ):
        np.testing.assert_array_equal(matching.unit_b[np.argsort(matching.unit_a)], inverse)
        np.testing.assert_allclose(matching.corr, 1.0, atol=1e-9)
    back = semi_matching(corr_ab.T)
    np.testing.assert_array_equal(back.unit_b[np.argsort(back.unit_a)], perm)
    threshold, _ = bottleneck_matching(corr_ab)
    assert threshold == pytest.approx(1.0, abs=1e-9)
    assert matched_counts(corr_ab, [0.999])[0] == a.shape[1]


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (6, 4), (1, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_hungarian_equals_brute_force(shape, seed):
    corr = np.random.default_rng(seed).uniform(-1, 1, shape)
    matching = hungarian_matching(corr)
    oriented = corr if shape[0] <= shape[1] else corr.T
    assert len(matching) == min(shape)
    assert matching.corr.sum() == pytest.approx(_brute_max_sum(oriented), abs=1e-12)
    assert len(set(matching.unit_a.tolist())) == len(set(matching.unit_b.tolist())) == min(shape)


@pytest.mark.parametrize("shape", [(5, 5), (4, 6), (6, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_bottleneck_equals_brute_force(shape, seed):
    corr = np.random.default_rng(10 + seed).uniform(-1, 1, shape)
    threshold, matching = bottleneck_matching(corr)
    oriented = corr if shape[0] <= shape[1] else corr.T
    assert threshold == pytest.approx(_brute_bottleneck(oriented), abs=1e-12)
    assert len(matching) == min(shape)
    assert matching.corr.min() >= threshold - 1e-12
    # Among bottleneck-feasible matchings, the reported one has the largest total correlation.
    feasible = np.where(oriented >= threshold, oriented, -1e9)
    assert matching.corr.sum() == pytest.approx(_brute_max_sum(feasible), abs=1e-9)


@pytest.mark.parametrize("shape", [(5, 5), (3, 6), (6, 4)])
@pytest.mark.parametrize("seed", range(5))
def test_hopcroft_karp_counts_equal_brute_force(shape, seed):
    corr = np.random.default_rng(20 + seed).uniform(-1, 1, shape)
    thresholds = [-1.0, 0.0, 0.3, 0.6, 0.9, 1.01]
    counts = matched_counts(corr, thresholds)
    expected = [_brute_max_matching(corr >= t) for t in thresholds]
    assert counts.tolist() == expected


def test_semi_matching_dominates_hungarian():
    corr = np.random.default_rng(3).uniform(-1, 1, (30, 30))
    assert semi_matching(corr).mean >= hungarian_matching(corr).mean


def test_dead_units_are_excluded_from_matchings():
    corr = np.random.default_rng(4).uniform(-1, 1, (5, 5))
    corr[1] = 0.0
    corr[:, 3] = 0.0
    alive_a = np.array([True, False, True, True, True])
    alive_b = np.array([True, True, True, False, True])
    for matching in (
        semi_matching(corr, alive_a, alive_b),
        hungarian_matching(corr, alive_a, alive_b),
        bottleneck_matching(corr, alive_a, alive_b)[1],
    ):
        assert 1 not in matching.unit_a.tolist() and 3 not in matching.unit_b.tolist()
        assert len(matching) == 4
    assert matched_counts(corr, [-1.0], alive_a, alive_b).tolist() == [4]
    all_dead = np.zeros(5, dtype=bool)
    assert hungarian_matching(corr, all_dead, alive_b).mean == 0.0
    assert bottleneck_matching(corr, alive_a, all_dead)[0] == 0.0


def test_bad_correlation_matrix_is_rejected():
    with pytest.raises(StageInputError, match="NaN"):
        hungarian_matching(np.array([[np.nan, 0.0], [0.0, 1.0]]))
    with pytest.raises(StageInputError, match="2-D"):
        semi_matching(np.zeros(3))


def test_correlation_from_covariance_is_bounded():
    # Rounding can push |cov_ij| slightly above σ_iσ_j for duplicated channels; values stay in [−1, 1].
    x = np.random.default_rng(5).standard_normal((100, 1)) * 1e3
    data = np.concatenate([x, x, -x], axis=1)
    corr = correlation_from_covariance(np.cov(data, rowvar=False), data.mean(axis=0))
    assert np.abs(corr).max() <= 1.0
    np.testing.assert_allclose(corr, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-12)
