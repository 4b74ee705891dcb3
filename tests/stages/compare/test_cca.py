"""CCA, SVCCA, PWCCA and linear CKA from moments vs in-memory implementations, invariances, degenerate inputs."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import (
    JointMoments,
    MultiMoments,
    cca_arrays,
    cca_family,
    cca_from_covariance,
    cka_matrix,
    linear_cka_arrays,
    linear_cka_from_covariance,
    linear_cka_gram,
    pwcca_arrays,
    pwcca_from_covariance,
    svcca_arrays,
    svcca_dims,
    svcca_from_covariance,
)


def _blocks(a: np.ndarray, b: np.ndarray, shards: int = 3):
    m = JointMoments(a.shape[1], b.shape[1])
    for part_a, part_b in zip(np.array_split(a, shards), np.array_split(b, shards)):
        m.update(part_a, part_b)
    return m.cov_aa(), m.cov_bb(), m.cov_ab()


def _pair(seed: int, n: int = 800, ca: int = 9, cb: int = 6, shared: int = 4):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, shared))
    a = z @ rng.standard_normal((shared, ca)) + 0.8 * rng.standard_normal((n, ca)) @ np.diag(rng.uniform(0.1, 3, ca))
    b = z @ rng.standard_normal((shared, cb)) + 0.8 * rng.standard_normal((n, cb)) + 5.0
    return a, b


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("swap", [False, True], ids=["a-wider", "b-wider"])
def test_moment_metrics_equal_in_memory_metrics(seed, swap):
    a, b = _pair(seed)
    if swap:
        a, b = b, a
    blocks = _blocks(a, b)
    cca_m, cca_r = cca_from_covariance(*blocks), cca_arrays(a, b)
    np.testing.assert_allclose(cca_m.corrs, cca_r.corrs, atol=1e-10)
    for convention in ("singular_values", "variance"):
        for keep in (0.5, 0.9, 0.99):
            sv_m = svcca_from_covariance(*blocks, keep=keep, convention=convention)
            sv_r = svcca_arrays(a, b, keep=keep, convention=convention)
            assert (sv_m.dims_a, sv_m.dims_b) == (sv_r.dims_a, sv_r.dims_b)
            np.testing.assert_allclose(sv_m.corrs, sv_r.corrs, atol=1e-10)
    pw_m, pw_r = pwcca_from_covariance(*blocks), pwcca_arrays(a, b)
    assert pw_m.side == pw_r.side == ("a" if a.shape[1] <= b.shape[1] else "b")
    np.testing.assert_allclose(pw_m.weights, pw_r.weights, atol=1e-10)
    assert pw_m.value == pytest.approx(pw_r.value, abs=1e-10)
    family = cca_family(*blocks, keep=0.9)
    np.testing.assert_allclose(family[0].corrs, cca_m.corrs)
    np.testing.assert_allclose(family[1].corrs, svcca_from_covariance(*blocks, keep=0.9).corrs)
    assert family[2].value == pw_m.value


def test_linear_cka_from_moments_equals_gram_formulation():
    a, b = _pair(4, n=300)
    value = linear_cka_from_covariance(*_blocks(a, b))
    assert value == pytest.approx(linear_cka_gram(a, b), abs=1e-12)
    assert value == pytest.approx(linear_cka_arrays(a, b), abs=1e-12)
    assert 0.0 < value < 1.0


def test_cka_invariant_to_rotation_and_isotropic_scale_but_not_general_maps():
    a, b = _pair(5, n=300)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((b.shape[1],) * 2))
    base = linear_cka_from_covariance(*_blocks(a, b))
    assert linear_cka_from_covariance(*_blocks(a, 3.0 * b @ rotation + 1.0)) == pytest.approx(base, abs=1e-12)
    stretch = np.diag(np.linspace(0.1, 10, b.shape[1]))
    assert abs(linear_cka_from_covariance(*_blocks(a, b @ stretch)) - base) > 1e-3
    assert linear_cka_from_covariance(*_blocks(a, a)) == pytest.approx(1.0)


def test_cca_and_svcca_are_one_under_an_invertible_map():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8))
    mixing = rng.standard_normal((8, 8)) + 3 * np.eye(8)
    b = a @ mixing + 2.0
    blocks = _blocks(a, b)
    np.testing.assert_allclose(cca_from_covariance(*blocks).corrs, 1.0, atol=1e-8)
    # All directions kept: SVCCA is CCA.
    np.testing.assert_allclose(svcca_from_covariance(*blocks, keep=1.0).corrs, 1.0, atol=1e-8)
    # The paper's 99% rule keeps the same subspace when the map is a rotation with isotropic scaling.
    rotation, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    sv = svcca_from_covariance(*_blocks(a, 0.5 * a @ rotation), keep=0.99)
    np.testing.assert_allclose(sv.corrs, 1.0, atol=1e-8)
    # Low-rank data (exactly 3 directions): keep=0.99 keeps exactly those, whatever the invertible map.
    low = rng.standard_normal((2000, 3)) @ rng.standard_normal((3, 8))
    sv_low = svcca_from_covariance(*_blocks(low, low @ mixing), keep=0.99)
    assert (sv_low.dims_a, sv_low.dims_b) == (3, 3)
    np.testing.assert_allclose(sv_low.corrs, 1.0, atol=1e-8)


def test_cca_family_near_zero_for_independent_data():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((40000, 8)), rng.standard_normal((40000, 6)) * 3 + 1
    blocks = _blocks(a, b)
    assert cca_from_covariance(*blocks).mean < 0.03
    assert svcca_from_covariance(*blocks).mean < 0.03
    assert pwcca_from_covariance(*blocks).value < 0.03
    assert linear_cka_from_covariance(*blocks) < 0.01


DEGENERATE = {
    # name: builder(rng) -> (a, b)
    "dead-units": lambda rng: (
        np.c_[rng.standard_normal((200, 4)), np.zeros((200, 2)), np.full((200, 1), 3.0)],
        rng.standard_normal((200, 5)),
    ),
    "duplicated-units": lambda rng: (
        np.repeat(rng.standard_normal((200, 3)), 3, axis=1),
        rng.standard_normal((200, 4)),
    ),
    "units-exceed-samples": lambda rng: (rng.standard_normal((20, 50)), rng.standard_normal((20, 40))),
    "all-dead": lambda rng: (np.zeros((50, 3)), rng.standard_normal((50, 3))),
    "huge-scale": lambda rng: (rng.standard_normal((200, 4)) * 1e150, rng.standard_normal((200, 3))),
}


@pytest.mark.parametrize("name", list(DEGENERATE))
def test_degenerate_inputs_give_finite_results(name):
    a, b = DEGENERATE[name](np.random.default_rng(8))
    blocks = _blocks(a, b, shards=2)
    results = [
        cca_from_covariance(*blocks).mean,
        svcca_from_covariance(*blocks).mean,
        pwcca_from_covariance(*blocks).value,
        linear_cka_from_covariance(*blocks),
    ]
    assert all(np.isfinite(r) and 0.0 <= r <= 1.0 for r in results), results
    for corrs in (cca_from_covariance(*blocks).corrs, svcca_from_covariance(*blocks).corrs):
        assert np.isfinite(corrs).all() and ((corrs >= 0) & (corrs <= 1)).all()
    if name == "huge-scale":
        assert results[3] == pytest.approx(linear_cka_gram(a / 1e150, b), rel=1e-9)
    if name == "all-dead":
        assert results == [0.0, 0.0, 0.0, 0.0]
    if name == "units-exceed-samples":
        # Kornblith et al. Theorem 1: with more units than samples CCA is trivially 1 — finite, not informative.
        assert results[0] == pytest.approx(1.0, abs=1e-6)
    if name == "duplicated-units":
        assert cca_from_covariance(*blocks).dims_a == 3


def test_svcca_dims_conventions_on_known_spectrum():
    eigenvalues = np.array([81.0, 9.0, 1.0, 0.0])  # singular values ∝ 9, 3, 1, 0
    assert svcca_dims(eigenvalues, 0.99, "singular_values") == 3  # 12/13 < 0.99 ≤ 13/13
    assert svcca_dims(eigenvalues, 0.9, "singular_values") == 2  # 12/13 = 0.923
    assert svcca_dims(eigenvalues, 0.9, "variance") == 2  # 81/91 = 0.89, 90/91 = 0.989
    assert svcca_dims(eigenvalues, 0.85, "variance") == 1
    assert svcca_dims(eigenvalues, 1.0, "singular_values") == 3
    assert svcca_dims(np.zeros(3), 0.99) == 0
    with pytest.raises(StageInputError, match="keep"):
        svcca_dims(eigenvalues, 0.0)
    with pytest.raises(StageInputError, match="convention"):
        svcca_dims(eigenvalues, 0.9, "energy")


def test_cka_matrix_from_multimoments_matches_pairwise_and_has_unit_diagonal():
    rng = np.random.default_rng(9)
    z = rng.standard_normal((400, 5))
    layers = {
        "a.conv1": z @ rng.standard_normal((5, 3)),
        "a.conv2": np.tanh(z @ rng.standard_normal((5, 6))),
        "b.conv1": z @ rng.standard_normal((5, 4)) + rng.standard_normal((400, 4)),
        "b.fc": rng.standard_normal((400, 2)),
    }
    mm = MultiMoments([x.shape[1] for x in layers.values()], list(layers))
    for lo in range(0, 400, 100):
        mm.update(*(x[lo : lo + 100] for x in layers.values()))
    table = cka_matrix(mm, ["a.conv1", "a.conv2"], ["b.conv1", "b.fc", "a.conv1"])
    assert list(table.columns) == ["layer_a", "layer_b", "linear_cka"] and len(table) == 6
    for row in table.itertuples():
        assert row.linear_cka == pytest.approx(linear_cka_gram(layers[row.layer_a], layers[row.layer_b]), abs=1e-10)
    assert table.query("layer_a == 'a.conv1' and layer_b == 'a.conv1'").linear_cka.item() == pytest.approx(1.0)


def test_bad_blocks_are_rejected():
    with pytest.raises(StageInputError, match="covariance blocks"):
        cca_from_covariance(np.eye(3), np.eye(2), np.zeros((2, 3)))
    with pytest.raises(StageInputError, match="NaN"):
        linear_cka_from_covariance(np.eye(2) * np.nan, np.eye(2), np.zeros((2, 2)))
    with pytest.raises(StageInputError, match="same samples|rows must be"):
        cca_arrays(np.zeros((5, 2)), np.zeros((6, 2)))
