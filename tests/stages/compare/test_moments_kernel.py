"""The chunked rank-k (dsyrk) co-moment kernel against numpy's float64 covariance, across chunk boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages import StageInputError
from repdissect.stages.compare import JointMoments, MultiMoments
from repdissect.stages.compare import _moments


def _reference(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([b.astype(np.float64) for b in blocks], axis=1)
    return x.mean(axis=0), np.cov(x, rowvar=False, ddof=0) * x.shape[0]


CASES = [
    # (rows, block sizes, dtype, chunk elements (None = default), offset)
    (1, [3, 2], np.float64, None, 0.0),
    (7, [1], np.float32, None, 0.0),
    (500, [5, 7], np.float32, 64 * 13, 0.0),       # many full chunks + a ragged last one
    (500, [5, 7], np.float16, 64 * 13, 0.0),
    (301, [4, 0, 6], np.float64, 64 * 11, 0.0),     # an empty block in the middle
    (1000, [8, 8], np.float32, 64 * 17, 1e4),       # mean ≫ spread: no cancellation
    (2000, [16], np.float64, None, -3e6),
]


@pytest.mark.parametrize("rows, sizes, dtype, chunk, offset", CASES)
def test_matches_numpy_covariance(monkeypatch, rows, sizes, dtype, chunk, offset):
    if chunk is not None:
        monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(rows)
    blocks = [(rng.standard_normal((rows, s)) * rng.uniform(0.5, 3, s) + offset).astype(dtype) for s in sizes]
    stat = MultiMoments(sizes)
    stat.update(*blocks)
    mean, m2 = _reference(blocks)
    scale = max(1.0, abs(offset))
    np.testing.assert_allclose(stat.mean, mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(stat.comoment, m2, rtol=1e-9, atol=1e-9 * rows)
    assert np.array_equal(stat.comoment, stat.comoment.T), "the co-moment must be exactly symmetric"


def test_chunking_does_not_change_the_result_beyond_rounding(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = rng.random((777, 9)).astype(np.float32), rng.random((777, 4)).astype(np.float32)
    results = []
    for chunk in (64 * 14, 64 * 100, 1 << 20):
        monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", chunk)
        stat = JointMoments(9, 4)
        stat.update(a, b)
        results.append(stat.covariance())
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad, row, block", [(np.nan, 0, "a"), (np.inf, 450, "b"), (-np.inf, 999, "a")])
def test_non_finite_anywhere_is_refused_and_leaves_the_state(monkeypatch, bad, row, block):
    monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", 64 * 10)  # the bad row sits in a later chunk
    rng = np.random.default_rng(0)
    stat = JointMoments(3, 2)
    stat.update(rng.random((50, 3)), rng.random((50, 2)))
    before = stat.copy()
    a, b = rng.random((1000, 3)), rng.random((1000, 2))
    (a if block == "a" else b)[row, 1] = bad
    with pytest.raises(StageInputError, match=f"block '{block}' contains NaN or inf"):
        stat.update(a, b)
    assert stat.n == before.n and np.array_equal(stat.comoment, before.comoment)


def test_plus_and_minus_inf_in_one_column_is_refused():
    a = np.zeros((4, 2))
    a[0, 0], a[1, 0] = np.inf, -np.inf
    with pytest.raises(StageInputError, match="block '0' contains NaN or inf"):
        MultiMoments([2]).update(a)


MAP_CASES = [
    # (images, channels per block, grid, dtype, chunk elements (None = default), offset)
    (1, [3, 2], (1, 1), np.float64, None, 0.0),
    (9, [4, 6], (5, 3), np.float32, 11 * 15 * 2, 0.0),     # two images per chunk, ragged last chunk
    (9, [4, 6], (5, 3), np.float16, 11 * 15 * 2, 0.0),
    (7, [4, 0, 5], (4, 4), np.float32, 10 * 16, 0.0),        # an empty block, one image per chunk
    (12, [8, 8], (6, 6), np.float32, 17 * 36 * 5, 1e4),     # mean ≫ spread: no cancellation
    (30, [5], (8, 8), np.float64, None, -3e6),
]


@pytest.mark.parametrize("images, sizes, grid, dtype, chunk, offset", MAP_CASES)
def test_update_maps_equals_update_of_position_samples(monkeypatch, images, sizes, grid, dtype, chunk, offset):
    """update_maps (no channels-last copy) = update of samples_from_maps' position samples = numpy's covariance."""
    from repdissect.stages.compare import samples_from_maps

    if chunk is not None:
        monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(images)
    maps = [(rng.standard_normal((images, s) + grid) * rng.uniform(0.5, 3, (1, s, 1, 1)) + offset).astype(dtype)
            for s in sizes]
    fast = MultiMoments(sizes)
    fast.update_maps(*maps)
    samples = [m.transpose(0, 2, 3, 1).reshape(images * grid[0] * grid[1], m.shape[1]) for m in maps]
    mean, m2 = _reference(samples)
    scale = max(1.0, abs(offset))
    assert fast.n == images * grid[0] * grid[1]
    np.testing.assert_allclose(fast.mean, mean, rtol=1e-12, atol=1e-12 * scale)
    np.testing.assert_allclose(fast.comoment, m2, rtol=1e-9, atol=1e-9 * fast.n)
    if len(sizes) == 2:
        slow = JointMoments(*sizes)
        slow.update(*samples_from_maps(maps[0], maps[1]))
        np.testing.assert_allclose(fast.comoment, slow.comoment, rtol=1e-9, atol=1e-9 * fast.n)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("images, sizes, grid, dtype, chunk, offset", MAP_CASES)
def test_update_maps_of_chosen_images_equals_update_maps_of_their_copy(monkeypatch, images, sizes, grid, dtype,
                                                                      chunk, offset, precision):
    """``images=`` gathers a split's images slice by slice: the same bits as the maps indexed by them first, over
    several batches (the first sets the reference shift, the later ones use it), with the drift check armed."""
    if chunk is not None:
        monkeypatch.setattr(_moments, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(images + 100)
    batches = []
    for drift in (0.0, 0.0, 50.0 * max(1.0, abs(offset))):  # the last batch moves far: a new reference
        maps = [(rng.standard_normal((images, s) + grid) * rng.uniform(0.5, 3, (1, s, 1, 1)) + offset + drift)
                .astype(dtype) for s in sizes]
        chosen = np.flatnonzero(rng.random(images) < 0.7)
        batches.append((maps, chosen))
    copied, gathered = MultiMoments(sizes, precision=precision), MultiMoments(sizes, precision=precision)
    for maps, chosen in batches:
        copied.update_maps(*(m[chosen] for m in maps))
        gathered.update_maps(*maps, images=chosen)
    assert gathered.n == copied.n
    np.testing.assert_array_equal(gathered.mean, copied.mean)
    np.testing.assert_array_equal(gathered.comoment, copied.comoment)


def test_update_maps_refuses_bad_image_indexes() -> None:
    stat = JointMoments(2, 3)
    a, b = np.ones((4, 2, 3, 3)), np.ones((4, 3, 3, 3))
    for bad in (np.array([0, 4]), np.array([-1]), np.array([True, False, True, False]), np.zeros((2, 2), int)):
        with pytest.raises(StageInputError, match="images must be a 1-D array of integer indexes in \\[0, 4\\)"):
            stat.update_maps(a, b, images=bad)
    stat.update_maps(a, b, images=np.array([], dtype=np.int64))
    assert stat.n == 0


def test_update_maps_refuses_bad_input() -> None:
    stat = JointMoments(2, 3)
    good_a, good_b = np.ones((4, 2, 3, 3)), np.ones((4, 3, 3, 3))
    with pytest.raises(StageInputError, match="same N, H, W"):
        stat.update_maps(good_a, np.ones((4, 3, 2, 2)))
    with pytest.raises(StageInputError, match="same N, H, W"):
        stat.update_maps(good_a, np.ones((4, 2, 3, 3)))
    bad = good_b.copy()
    bad[2, 1, 0, 0] = np.nan
    with pytest.raises(StageInputError, match="'b' contains NaN"):
        stat.update_maps(good_a, bad)
    assert stat.n == 0  # nothing half-folded in


@pytest.mark.parametrize("maps", [False, True])
def test_a_refused_float32_batch_does_not_leak_into_the_next_ones(maps):
    """A NaN batch leaves NaN in the thread's float32 scratch; the next batches overwrite it, not add to it."""
    rng = np.random.default_rng(4)
    shape = (30, 3, 2, 2) if maps else (60, 3)
    a, b = rng.random(shape).astype(np.float32), rng.random(shape).astype(np.float32)

    def stream(stat: JointMoments) -> JointMoments:
        for start in range(0, shape[0], 10):
            (stat.update_maps if maps else stat.update)(a[start : start + 10], b[start : start + 10])
        return stat

    clean = stream(JointMoments(3, 3, "float32"))
    stat = JointMoments(3, 3, "float32")
    bad = a[:10].copy()
    bad[1, 0] = np.nan
    with pytest.raises(StageInputError, match="contains NaN"):
        (stat.update_maps if maps else stat.update)(bad, b[:10])
    stream(stat)
    assert stat.n == clean.n
    np.testing.assert_array_equal(stat.covariance(), clean.covariance())
