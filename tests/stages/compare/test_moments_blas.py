"""The float32 kernels' direct ``ssyrk`` (numpy's own OpenBLAS through ctypes) against numpy, and against the
kernels' ``matmul`` fallback, which runs where numpy bundles no OpenBLAS."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages import StageInputError
from repdissect.stages.compare import JointMoments
from repdissect.stages.compare import _moments

SSYRK = _moments._numpy_ssyrk()
needs_ssyrk = pytest.mark.skipif(SSYRK is None, reason="numpy bundles no OpenBLAS here: the matmul path runs")


def _upper(m: np.ndarray) -> np.ndarray:
    return m[np.triu_indices(m.shape[0])]


@needs_ssyrk
@pytest.mark.parametrize("shape, samples_first, lead", [
    ((300, 17), True, 17),    # (k, N) samples by rows, C = AᵀA
    ((300, 17), True, 40),    # a view of a wider buffer: the leading dimension is the row stride
    ((17, 300), False, 300),  # (N, k) channel-major, C = AAᵀ
    ((17, 300), False, 333),
    ((1, 9), True, 9),        # one sample
    ((9, 1), False, 1),
])
def test_ssyrk_update_matches_numpy(shape, samples_first, lead):
    rng = np.random.default_rng(lead)
    wide = rng.standard_normal((shape[0], lead)).astype(np.float32)
    a = wide[:, : shape[1]]
    n = shape[1] if samples_first else shape[0]
    a64 = a.astype(np.float64)
    want = a64.T @ a64 if samples_first else a64 @ a64.T
    c = np.full((n, n), np.nan, dtype=np.float32)  # β = 0 must overwrite even NaN
    _moments._ssyrk_update(SSYRK, c, a, samples_first, 0.0)
    np.testing.assert_allclose(_upper(c), _upper(want), rtol=1e-5, atol=1e-4)
    assert np.isnan(c[np.tril_indices(n, -1)]).all(), "the lower triangle is never written"
    _moments._ssyrk_update(SSYRK, c, a, samples_first, 1.0)  # β = 1 adds
    np.testing.assert_allclose(_upper(c), _upper(2 * want), rtol=1e-5, atol=1e-4)


@needs_ssyrk
def test_ssyrk_update_refuses_operands_it_cannot_pass():
    c = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="float32"):
        _moments._ssyrk_update(SSYRK, c, np.ones((4, 3)), True, 0.0)  # float64
    with pytest.raises(ValueError, match="unit stride"):
        _moments._ssyrk_update(SSYRK, c, np.ones((3, 4), dtype=np.float32).T, True, 0.0)


def test_a_binding_that_computes_wrong_or_is_missing_is_not_used():
    calls = []

    def wrong(*args):  # a "BLAS" that ignores its operands
        calls.append(args)

    assert not _moments._checked(wrong)
    assert calls, "the probe must call the function"
    assert _moments._bind_ssyrk(_moments.Path("/nonexistent/libopenblas.so")) is None


@needs_ssyrk
def test_the_bundled_library_passes_its_probe():
    assert _moments._checked(SSYRK)


def _stream(stat: JointMoments, a: np.ndarray, b: np.ndarray, batch: int, maps: bool) -> JointMoments:
    for start in range(0, a.shape[0], batch):
        if maps:
            stat.update_maps(a[start : start + batch], b[start : start + batch])
        else:
            stat.update(a[start : start + batch], b[start : start + batch])
    return stat


CASES = [
    # (samples or images, channels, batch, dtype, maps, offset, span elements)
    (3000, (7, 5), 700, np.float32, False, 0.0, None),
    (3000, (7, 5), 3000, np.float32, False, 5.0, 13 * 500),   # span flushes inside a batch
    (2000, (6, 3), 512, np.float16, False, 0.0, None),
    (40, (4, 6), 9, np.float32, True, 0.0, None),
    (40, (4, 6), 40, np.float32, True, 3.0, 11 * 100),
]


@pytest.mark.parametrize("rows, sizes, batch, dtype, maps, offset, span", CASES)
def test_ssyrk_and_matmul_paths_agree_and_match_float64(monkeypatch, rows, sizes, batch, dtype, maps, offset, span):
    """Both float32 paths are within float32 rounding of the float64 statistic and of each other."""
    monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", 1 << 9)  # several chunks per batch
    if span is not None:
        monkeypatch.setattr(_moments, "_F32_SPAN_ELEMENTS", span)
    rng = np.random.default_rng(rows)
    shape = (lambda c: (rows, c, 3, 4)) if maps else (lambda c: (rows, c))
    a, b = (np.maximum(rng.standard_normal(shape(c)) + offset, 0).astype(dtype) for c in sizes)
    exact = _stream(JointMoments(*sizes), a, b, batch, maps)
    results = {}
    for path in ("ssyrk", "matmul"):
        if path == "ssyrk" and SSYRK is None:
            continue
        monkeypatch.setattr(_moments, "_SSYRK", SSYRK if path == "ssyrk" else None)
        results[path] = _stream(JointMoments(*sizes, "float32"), a, b, batch, maps)
    sd = np.sqrt(exact.variance())
    for stat in results.values():
        assert stat.n == exact.n
        np.testing.assert_allclose(stat.mean, exact.mean, rtol=0, atol=1e-6 * sd.max())
        assert np.abs(stat.covariance() - exact.covariance()).max() <= 2e-6 * np.outer(sd, sd).max()
        assert np.array_equal(stat.comoment, stat.comoment.T)
    if len(results) == 2:
        np.testing.assert_allclose(results["ssyrk"].covariance(), results["matmul"].covariance(),
                                   rtol=0, atol=2e-6 * np.outer(sd, sd).max())


@pytest.mark.parametrize("maps", [False, True])
def test_a_refused_batch_does_not_leak_into_the_next_ones(maps):
    """A NaN batch poisons the thread's float32 accumulator; the next batch overwrites it (β = 0)."""
    rng = np.random.default_rng(4)
    shape = (30, 3, 2, 2) if maps else (60, 3)
    a, b = rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32)
    clean = _stream(JointMoments(3, 3, "float32"), a, b, 10, maps)
    stat = JointMoments(3, 3, "float32")
    bad = a[:10].copy()
    bad[1, 0] = np.nan
    with pytest.raises(StageInputError, match="contains NaN"):
        (stat.update_maps if maps else stat.update)(bad, b[:10])
    _stream(stat, a, b, 10, maps)
    assert stat.n == clean.n
    np.testing.assert_array_equal(stat.covariance(), clean.covariance())
