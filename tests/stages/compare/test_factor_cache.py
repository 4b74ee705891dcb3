"""Reused factorisations give exactly what factorising every replicate gives (numpy.linalg as the reference)."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages.compare import _factor_cache as fc


def _spd(rng: np.random.Generator, p: int) -> np.ndarray:
    x = rng.normal(size=(3 * p, p))
    return x.T @ x


@pytest.fixture(autouse=True)
def _fresh_cache():
    fc.clear_factor_cache()
    yield
    fc.clear_factor_cache()


@pytest.mark.parametrize("layout", ["all_same", "all_distinct", "mixed", "single"])
def test_sym_eigh_equals_numpy_bit_for_bit(layout: str) -> None:
    rng = np.random.default_rng(0)
    a, b, c = (_spd(rng, 7) for _ in range(3))
    stack = {"all_same": [a] * 5, "all_distinct": [a, b, c], "mixed": [a, b, a, c, b, a], "single": [c]}[layout]
    stack = np.stack(stack)
    lam, vec = fc.sym_eigh(stack)
    ref_lam, ref_vec = np.linalg.eigh(stack)
    assert np.array_equal(lam, ref_lam) and np.array_equal(vec, ref_vec)
    # a second call is served from the table, still exactly equal, and returns arrays the caller may modify
    lam2, vec2 = fc.sym_eigh(stack)
    assert np.array_equal(lam2, ref_lam) and np.array_equal(vec2, ref_vec)
    lam2[:] = 0.0
    assert np.array_equal(fc.sym_eigh(stack)[0], ref_lam)


def test_sym_eigh_with_a_nan_replicate_fails_like_numpy() -> None:
    rng = np.random.default_rng(1)
    good = _spd(rng, 4)
    bad = good.copy()
    bad[0, 0] = np.nan
    stack = np.stack([good, bad, good])
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.eigh(stack)
    with pytest.raises(np.linalg.LinAlgError):  # the NaN replicate is not taken for a copy of another one
        fc.sym_eigh(stack)


def test_memoised_computes_once_per_distinct_matrix() -> None:
    rng = np.random.default_rng(2)
    a, b = _spd(rng, 5), _spd(rng, 5)
    calls = []

    def inverse(m: np.ndarray) -> np.ndarray:
        calls.append(1)
        return np.linalg.inv(m)

    for m in (a, a.copy(), b, a):
        assert np.array_equal(fc.memoised("inv", m, inverse), np.linalg.inv(m))
    assert len(calls) == 2
    fc.memoised("other-tag", a, inverse)  # a different function of the same matrix is computed anew
    assert len(calls) == 3


def test_cache_is_bounded_by_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fc, "_CAPACITY_BYTES", 4 * 8 * 10 * 10)  # room for four 10 × 10 float64 results
    rng = np.random.default_rng(3)
    for _ in range(20):
        fc.memoised("inv", _spd(rng, 10), np.linalg.inv)
    assert fc._held <= fc._CAPACITY_BYTES and len(fc._CACHE) == 4
