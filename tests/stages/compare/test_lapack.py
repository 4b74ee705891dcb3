"""The comparison metrics' SVD / eigh / pinv: numpy's result where LAPACK's fast driver converges, the robust
driver's where it does not, and a metric that survives a non-converging ``gesdd``."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages.compare import _lapack, pwcca_google_from_moments
from repdissect.stages.compare._factor_cache import clear_factor_cache


def _fail(*args, **kwargs):
    raise np.linalg.LinAlgError("SVD did not converge")


@pytest.fixture
def gesdd_fails(monkeypatch):
    """numpy's SVD-based calls raise as LAPACK's gesdd does on its rare failures."""
    monkeypatch.setattr(np.linalg, "svd", _fail)
    monkeypatch.setattr(np.linalg, "pinv", _fail)
    monkeypatch.setattr(np.linalg, "eigh", _fail)
    clear_factor_cache()
    yield
    clear_factor_cache()


def _matrix(shape, seed=0, rank=None):
    rng = np.random.default_rng(seed)
    m = rng.standard_normal(shape)
    if rank is not None:  # rank-deficient, like the whitened blocks of a component-deleted layer
        m = m[..., :, :rank] @ rng.standard_normal(shape[:-2] + (rank, shape[-1]))
    return m


SVD_CASES = {
    "tall": ((7, 4), {}),
    "wide": ((4, 7), {}),
    "square, rank 3": ((6, 6), {"rank": 3}),
    "stack of squares": ((3, 5, 5), {}),
    "stack, rank 2": ((2, 5, 4), {"rank": 2}),
}


@pytest.mark.parametrize("full_matrices", [True, False])
@pytest.mark.parametrize("name", list(SVD_CASES))
def test_svd_fallback_matches_numpys_decomposition(name, full_matrices):
    shape, kw = SVD_CASES[name]
    m = _matrix(shape, **kw)
    u0, s0, vt0 = np.linalg.svd(m, full_matrices=full_matrices)
    fast = _lapack.svd(m, full_matrices=full_matrices)
    assert all(np.array_equal(x, y) for x, y in zip(fast, (u0, s0, vt0)))  # the normal path is numpy's call
    u, s, vt = _lapack._svd_gesvd(m, full_matrices, True)
    assert (u.shape, s.shape, vt.shape) == (u0.shape, s0.shape, vt0.shape)
    np.testing.assert_allclose(s, s0, rtol=0, atol=1e-12)
    k = s.shape[-1]
    rebuilt = (u[..., :, :k] * s[..., None, :]) @ vt[..., :k, :]
    np.testing.assert_allclose(rebuilt, m, rtol=0, atol=1e-12)
    eye = np.broadcast_to(np.eye(u.shape[-1]), u.shape[:-2] + (u.shape[-1],) * 2)
    if full_matrices:
        np.testing.assert_allclose(np.swapaxes(u, -1, -2) @ u, eye, atol=1e-12)
    np.testing.assert_allclose(_lapack._svd_gesvd(m, full_matrices, False), s0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(SVD_CASES))
def test_wrappers_fall_back_when_numpy_raises(name, gesdd_fails):
    shape, kw = SVD_CASES[name]
    m = _matrix(shape, **kw)
    s = _lapack.svd(m, compute_uv=False)
    assert s.shape == shape[:-2] + (min(shape[-2:]),)
    sym = m @ np.swapaxes(m, -1, -2)
    lam, vec = _lapack.eigh(sym)
    assert np.all(np.diff(lam, axis=-1) >= 0)  # ascending, as numpy returns them
    np.testing.assert_allclose((vec * lam[..., None, :]) @ np.swapaxes(vec, -1, -2), sym, atol=1e-10)
    np.testing.assert_allclose(np.sort(lam, axis=-1)[..., ::-1][..., : s.shape[-1]], s**2, atol=1e-10)


def test_pinv_fallback_equals_numpys_pinv(monkeypatch):
    m = _matrix((6, 6), rank=3)
    expected = np.linalg.pinv(m)
    monkeypatch.setattr(np.linalg, "pinv", _fail)
    np.testing.assert_allclose(_lapack.pinv(m), expected, rtol=0, atol=1e-10)


def test_non_finite_input_still_raises(gesdd_fails):
    m = _matrix((4, 4))
    m[1, 2] = np.nan
    for call in (_lapack.svd, _lapack.eigh, _lapack.pinv):
        with pytest.raises(np.linalg.LinAlgError, match="NaN or inf"):
            call(m)


def _moments(seed=3, n=400, p=6, q=9):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    a = np.maximum(z @ rng.standard_normal((4, p)) + rng.standard_normal((n, p)), 0)
    b = np.maximum(z @ rng.standard_normal((4, q)) + rng.standard_normal((n, q)), 0)
    ca, cb = a - a.mean(0), b - b.mean(0)
    return n, a.mean(0), b.mean(0), ca.T @ ca, cb.T @ cb, ca.T @ cb


def test_pwcca_survives_a_gesdd_failure(monkeypatch):
    """google's PWCCA on sign-independent settings: the same value whether or not gesdd gives up."""
    args = _moments()
    clear_factor_cache()
    expected = pwcca_google_from_moments(*args, signs="canonical")
    monkeypatch.setattr(np.linalg, "svd", _fail)
    monkeypatch.setattr(np.linalg, "pinv", _fail)
    clear_factor_cache()
    survived = pwcca_google_from_moments(*args, signs="canonical")
    clear_factor_cache()
    assert np.isfinite(survived.value)
    assert survived.value == pytest.approx(expected.value, abs=1e-10)
    np.testing.assert_allclose(survived.corrs, expected.corrs, atol=1e-10)
    np.testing.assert_allclose(survived.weights, expected.weights, atol=1e-10)
