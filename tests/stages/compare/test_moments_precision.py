"""The float32-product path of the moment statistics: its error against the exact float64 accumulation on
adversarial inputs, the drift guard of the fixed reference shift, and the rules that keep precisions apart."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages import StageInputError
from repdissect.stages.compare import JointMoments, MultiMoments, PRECISIONS
from repdissect.stages.compare import _moments

#: worst observed float32-path error on the fixtures below is ~5e-6 of σᵢσⱼ (the README's measurements agree);
#: the bound leaves a margin for other BLAS builds' summation orders
FLOAT32_BOUND = 3e-5


def _adversarial(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 channels with offsets up to 1e4, spreads down to 1e-2 (σ/μ ~ 1e-6), ReLU zeros, correlations."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((rows, 4))
    a = latent @ rng.standard_normal((4, 6)) + 0.3 * rng.standard_normal((rows, 6))
    b = latent @ rng.standard_normal((4, 5)) + 0.3 * rng.standard_normal((rows, 5))
    a = a * np.array([1e-2, 1e-1, 1, 10, 1e2, 1]) + np.array([1e4, -3e3, 0, 50, 0, 2])
    b = b * np.array([1e-2, 1, 1e3, 1, 0.5]) + np.array([1e3, 0, 0, -7, 0])
    a[:, 2], b[:, 4] = np.maximum(a[:, 2], 0), np.maximum(b[:, 4], 0)  # ReLU units, mostly off / half off
    return a.astype(np.float32), b.astype(np.float32)


def _exact(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([a, b], axis=1).astype(np.float64)  # the float32 inputs, exactly
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1)


def _errors(stat: MultiMoments, mean: np.ndarray, cov: np.ndarray) -> tuple[float, float]:
    """(max covariance error in units of σᵢσⱼ, max mean error in units of σᵢ)."""
    sd = np.sqrt(np.diag(cov))
    return (float((np.abs(stat.covariance() - cov) / np.outer(sd, sd)).max()),
            float((np.abs(stat.mean - mean) / sd).max()))


@pytest.mark.parametrize("batch", [997, 8192])
def test_float32_products_stay_within_the_bound_of_the_exact_moments(batch):
    a, b = _adversarial(20_000)
    mean, cov = _exact(a, b)
    errors = {}
    for precision in PRECISIONS:
        stat = JointMoments(6, 5, precision)
        for start in range(0, len(a), batch):
            stat.update(a[start:start + batch], b[start:start + batch])
        assert stat.n == len(a)
        errors[precision] = _errors(stat, mean, cov)
    assert errors["float64"][0] < 1e-11 and errors["float64"][1] < 1e-11
    assert errors["float32"][0] < FLOAT32_BOUND and errors["float32"][1] < 1e-6
    assert errors["float32"][0] > errors["float64"][0]  # the float32 path is really taken


def test_float32_maps_path_stays_within_the_bound():
    rng = np.random.default_rng(5)
    maps_a = (rng.standard_normal((40, 3, 6, 6)) * [[[[1e-2]], [[1.0]], [[30.0]]]] + [[[[5e3]], [[0.0]], [[-2.0]]]])
    maps_b = np.maximum(rng.standard_normal((40, 2, 6, 6)) + 0.5 * maps_a[:, 1:], 0)
    maps_a, maps_b = maps_a.astype(np.float32), maps_b.astype(np.float32)
    stat = JointMoments(3, 2, "float32")
    for start in range(0, 40, 16):
        stat.update_maps(maps_a[start:start + 16], maps_b[start:start + 16])
    samples = [m.transpose(0, 2, 3, 1).reshape(-1, m.shape[1]) for m in (maps_a, maps_b)]
    mean, cov = _exact(*samples)
    cov_error, mean_error = _errors(stat, mean, cov)
    assert stat.n == 40 * 36 and cov_error < FLOAT32_BOUND and mean_error < 1e-6


def _drifting_batches() -> list[np.ndarray]:
    """The first batch sits at 1 with a tiny spread (its mean is the reference, not 0), every later one at
    3e3 ± 1: far from the first reference."""
    rng = np.random.default_rng(0)
    batches = [1 + 1e-3 * rng.standard_normal((4096, 8))]
    batches += [rng.standard_normal((4096, 8)) + 3e3 for _ in range(6)]
    return [x.astype(np.float32) for x in batches]


# float64: guarded ~1e-15, never re-referenced ~3e-14 (float32 values square almost exactly in float64)
@pytest.mark.parametrize("precision, bound", [("float64", 1e-14), ("float32", 1e-9)])
def test_a_batch_far_from_the_reference_gets_its_own(monkeypatch, precision, bound):
    batches = _drifting_batches()
    x = np.concatenate(batches).astype(np.float64)
    cov = np.cov(x, rowvar=False)
    sd = np.sqrt(np.diag(cov))

    def error() -> float:
        stat = MultiMoments([8], precision=precision)
        for batch in batches:
            stat.update(batch)
        return float((np.abs(stat.covariance() - cov) / np.outer(sd, sd)).max())

    guarded = error()
    # never re-reference: the offset eats the products' bits
    monkeypatch.setattr(_moments, "_DRIFT", dict.fromkeys(PRECISIONS, np.inf))
    unguarded = error()
    assert guarded < bound < unguarded


def test_statistics_of_different_precisions_refuse_to_merge():
    rng = np.random.default_rng(1)
    a, b = rng.random((50, 3)), rng.random((50, 2))
    exact, fast = JointMoments(3, 2), JointMoments(3, 2, "float32")
    exact.update(a, b)
    fast.update(a, b)
    for into, other in ((exact, fast), (fast, exact)):
        with pytest.raises(StageInputError, match=f"cannot merge a {other.precision}-precision JointMoments"):
            into.copy().merge(other)
    with pytest.raises(StageInputError, match="unknown moment precision 'float16'"):
        MultiMoments([3], precision="float16")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_survives_the_table_and_sharded_equals_whole(precision):
    a, b = _adversarial(6_000, seed=2)
    whole = JointMoments(6, 5, precision)
    for start in range(0, 6_000, 1_000):
        whole.update(a[start:start + 1_000], b[start:start + 1_000])
    shards = []
    for lo, hi in ((0, 2_500), (2_500, 2_600), (2_600, 6_000)):
        shard = JointMoments(6, 5, precision)
        for start in range(lo, hi, 1_000):
            shard.update(a[start:min(start + 1_000, hi)], b[start:min(start + 1_000, hi)])
        shards.append(JointMoments.from_table(shard.to_table()))
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged.precision == precision and merged.n == whole.n
    scale = np.sqrt(np.outer(whole.variance(), whole.variance()))
    tolerance = 1e-10 if precision == "float64" else FLOAT32_BOUND  # offsets of 1e6 σ cost float64 digits too
    assert (np.abs(merged.covariance() - whole.covariance()) / scale).max() < tolerance
    swapped = merged.swapped()
    assert swapped.precision == precision and np.array_equal(swapped.cov_ab(), merged.cov_ab().T)


def test_pending_sums_about_one_reference_merge_exactly():
    rng = np.random.default_rng(3)
    first, second = rng.random((300, 4)) + 5, rng.random((200, 4)) + 5
    sequential = MultiMoments([4])
    sequential.update(first)
    shard = sequential.copy()  # same reference shift as `sequential`
    sequential.update(second)
    other = MultiMoments([4])
    other._ref = shard._ref.copy()
    other.update(second)
    shard.merge(other)
    assert shard.n == sequential.n == 500
    assert np.array_equal(shard.comoment, sequential.comoment) and np.array_equal(shard.mean, sequential.mean)


def test_float32_squares_that_overflow_are_refused_and_leave_the_state():
    stat = MultiMoments([2], names=["conv5"], precision="float32")
    stat.update(np.ones((10, 2)))
    huge = np.full((10, 2), 1e20)
    huge[:, 1] = 1.0
    with pytest.raises(StageInputError, match="block 'conv5' has values whose squares overflow float32"):
        stat.update(huge)
    assert stat.n == 10 and np.array_equal(stat.comoment, np.zeros((2, 2)))


def test_float32_torch_tensors_agree_with_float64():
    torch = pytest.importorskip("torch")
    a, b = _adversarial(3_000, seed=4)
    mean, cov = _exact(a, b)
    stat = JointMoments(6, 5, "float32")
    stat.update(torch.from_numpy(a), torch.from_numpy(b))
    cov_error, mean_error = _errors(stat, mean, cov)
    assert cov_error < FLOAT32_BOUND and mean_error < 1e-6


def test_float32_tensor_path_does_not_depend_on_the_input_dtype():
    """The float32 products round every value to float32 first, so float32 values handed in as float64 tensors
    (or mixed with numpy blocks) give the same bits as float32 tensors."""
    torch = pytest.importorskip("torch")
    a, b = (x.astype(np.float32) for x in _adversarial(2_000, seed=5))
    runs = []
    for blocks in ((torch.from_numpy(a), torch.from_numpy(b)),
                   (torch.from_numpy(a.astype(np.float64)), torch.from_numpy(b.astype(np.float64))),
                   (a, torch.from_numpy(b))):
        stat = JointMoments(6, 5, "float32")
        stat.update(*blocks)
        runs.append((stat.mean.copy(), stat.comoment.copy()))
    for mean, comoment in runs[1:]:
        assert np.array_equal(mean, runs[0][0]) and np.array_equal(comoment, runs[0][1])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_float16_inputs_convert_identically_with_and_without_torch(monkeypatch, precision):
    """float16 → float32 is exact, so torch's fast conversion (used when torch is loaded) changes nothing."""
    pytest.importorskip("torch")
    import sys

    rng = np.random.default_rng(6)
    values = np.maximum(rng.standard_normal((300, 7)), 0) * np.array([1, 1e-5, 1e-7, 10, 100, 1e3, 1])
    rows = [values[:, :4].astype(np.float16), values[:, 4:].astype(np.float16)]
    maps = [np.ascontiguousarray(r[:200].reshape(8, 5, 5, -1).transpose(0, 3, 1, 2)) for r in rows]
    bad = rows[1].copy()
    bad[123, 2] = np.nan

    def run() -> tuple[JointMoments, JointMoments]:
        stat, from_maps = JointMoments(4, 3, precision), JointMoments(4, 3, precision)
        stat.update(*rows)
        from_maps.update_maps(*maps)
        with pytest.raises(StageInputError, match="block 'b' contains NaN"):
            stat.update(rows[0], bad)
        return stat, from_maps

    with_torch = run()
    monkeypatch.delitem(sys.modules, "torch")
    without = run()
    for fast, slow in zip(with_torch, without):
        assert np.array_equal(fast.comoment, slow.comoment) and np.array_equal(fast.mean, slow.mean)


SHIFT_CASES = [
    # (name, pre-activation means, offsets added after the ReLU, zero reference expected)
    ("relu maps", 0.0, 0.0, True),        # mean ≈ 0.7 σ
    ("active relu", 1.0, 0.0, True),      # mean ≈ 1.2 σ
    ("offset channels", 0.0, 10.0, False),  # mean ≈ 17 σ: the first batch's mean
]


@pytest.mark.parametrize("name, centre, offset, zero", SHIFT_CASES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_reference_shift_is_zero_only_near_zero_means_and_stays_accurate(name, centre, offset, zero, precision):
    rng = np.random.default_rng(7)
    latent = rng.standard_normal((12_000, 3))
    x = np.maximum(latent @ rng.standard_normal((3, 9)) + 0.5 * rng.standard_normal((12_000, 9)) + centre, 0)
    x = (x + offset * x.std(axis=0)).astype(np.float32)
    stat = JointMoments(5, 4, precision)
    for start in range(0, len(x), 5_000):
        stat.update(x[start:start + 5_000, :5], x[start:start + 5_000, 5:])
    assert (not np.any(stat._ref)) == zero
    mean, cov = _exact(x[:, :5], x[:, 5:])
    cov_error, mean_error = _errors(stat, mean, cov)
    assert cov_error < (1e-12 if precision == "float64" else FLOAT32_BOUND)
    assert mean_error < (1e-12 if precision == "float64" else 1e-6)


def test_a_constant_nonzero_channel_never_gets_the_zero_reference():
    x = np.random.default_rng(8).standard_normal((500, 3)).astype(np.float32)
    x[:, 1] = 3.5  # constant: |mean| > 2·0
    stat = MultiMoments([3], precision="float32")
    stat.update(x)
    assert stat._ref[1] == np.float32(3.5) and stat.variance()[1] == 0.0


def test_float32_sums_flushed_into_float64_across_spans_stay_within_the_bound(monkeypatch):
    """A batch longer than the float32 span (several flushes into float64) and batches that fit it agree."""
    monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", 64 * 12)
    monkeypatch.setattr(_moments, "_F32_SPAN_ELEMENTS", 12 * 300)  # 300 rows per float32 sum: several flushes
    a, b = _adversarial(5_000, seed=9)
    mean, cov = _exact(a, b)
    whole, batched = JointMoments(6, 5, "float32"), JointMoments(6, 5, "float32")
    whole.update(a, b)
    for start in range(0, 5_000, 250):
        batched.update(a[start:start + 250], b[start:start + 250])
    for stat in (whole, batched):
        cov_error, mean_error = _errors(stat, mean, cov)
        assert stat.n == 5_000 and cov_error < FLOAT32_BOUND and mean_error < 1e-6
        assert np.array_equal(stat.comoment, stat.comoment.T)


def test_statistics_sharing_a_thread_and_statistics_in_other_threads_do_not_share_results():
    """The kernels' scratch is per thread and a batch's float32 result is copied out before the next batch."""
    import threading

    rng = np.random.default_rng(10)
    data = [rng.random((3_000, 7)).astype(np.float32) + k for k in range(4)]

    def alone(x: np.ndarray) -> np.ndarray:
        stat = MultiMoments([4, 3], precision="float32")
        for start in range(0, len(x), 700):
            stat.update(x[start:start + 700, :4], x[start:start + 700, 4:])
        return stat.comoment.copy()

    expected = [alone(x) for x in data]
    interleaved = [MultiMoments([4, 3], precision="float32") for _ in data]
    for start in range(0, 3_000, 700):
        for stat, x in zip(interleaved, data):
            stat.update(x[start:start + 700, :4], x[start:start + 700, 4:])
    assert all(np.array_equal(s.comoment, e) for s, e in zip(interleaved, expected))
    results: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, alone(data[k]))) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(results[k], expected[k]) for k in range(4))
