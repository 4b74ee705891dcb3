"""JointMoments / MultiMoments: sharded == whole, merge-tree invariance, serialisation, accuracy, validation."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import JointMoments, MultiMoments


def _data(seed: int = 0, n: int = 600, ca: int = 5, cb: int = 3, offset: float = 0.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 4))
    a = z @ rng.standard_normal((4, ca)) + rng.standard_normal((n, ca)) + offset
    b = z @ rng.standard_normal((4, cb)) + rng.standard_normal((n, cb)) + offset
    return a, b


def _whole(a, b) -> JointMoments:
    m = JointMoments(a.shape[1], b.shape[1])
    m.update(a, b)
    return m


def _assert_same(m1: JointMoments, m2: JointMoments, rtol: float = 1e-10) -> None:
    assert m1.n == m2.n
    np.testing.assert_allclose(m1.mean, m2.mean, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(m1.comoment, m2.comoment, rtol=rtol, atol=1e-9)


# Table of shardings: (name, list of shard boundaries as fractions of n).
SHARDINGS = [
    ("two-halves", [0.5]),
    ("uneven", [0.01, 0.3, 0.31, 0.9]),
    ("single-rows", [1 / 600, 2 / 600, 3 / 600]),
    ("many", list(np.linspace(0.05, 0.95, 19))),
]


@pytest.mark.parametrize("name,cuts", SHARDINGS, ids=[s[0] for s in SHARDINGS])
@pytest.mark.parametrize("tree", ["sequential", "pairwise", "reversed"])
def test_sharded_equals_whole(name, cuts, tree):
    a, b = _data()
    bounds = [0, *sorted({int(round(c * len(a))) for c in cuts}), len(a)]
    shards = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        m = JointMoments(a.shape[1], b.shape[1])
        m.update(a[lo:hi], b[lo:hi])
        shards.append(m)
    if tree == "reversed":
        shards = shards[::-1]
    if tree == "pairwise":
        while len(shards) > 1:
            shards = [
                shards[i].merge(shards[i + 1]) if i + 1 < len(shards) else shards[i]
                for i in range(0, len(shards), 2)
            ]
        merged = shards[0]
    else:
        merged = shards[0]
        for s in shards[1:]:
            merged.merge(s)
    _assert_same(merged, _whole(a, b))


def test_batched_updates_equal_one_update():
    a, b = _data(seed=1)
    m = JointMoments(a.shape[1], b.shape[1])
    for lo in range(0, len(a), 77):
        m.update(a[lo : lo + 77], b[lo : lo + 77])
    _assert_same(m, _whole(a, b))


def test_moments_match_numpy():
    a, b = _data(seed=2)
    m = _whole(a, b)
    x = np.concatenate([a, b], axis=1)
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance(ddof=1), np.cov(x, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(m.covariance(ddof=0), np.cov(x, rowvar=False, ddof=0), rtol=1e-10)
    np.testing.assert_allclose(m.correlation(), np.corrcoef(x, rowvar=False), atol=1e-12)
    np.testing.assert_allclose(m.cov_ab(), np.cov(x, rowvar=False)[:5, 5:], rtol=1e-10)
    np.testing.assert_allclose(m.cov_aa(), np.cov(a, rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(m.cov_bb(), np.cov(b, rowvar=False), rtol=1e-10)


def test_large_offset_is_stable():
    # float32 ReLU-like maps: mean ≫ std. A raw Σxxᵀ − nμμᵀ would lose all digits here.
    a, b = _data(seed=3, n=4000, offset=1e4)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    m = JointMoments(a.shape[1], b.shape[1])
    for lo in range(0, len(a), 500):
        m.update(a32[lo : lo + 500], b32[lo : lo + 500])
    x = np.concatenate([a32, b32], axis=1).astype(np.float64)
    reference = np.cov(x - x.mean(axis=0), rowvar=False)
    np.testing.assert_allclose(m.covariance(), reference, rtol=1e-8, atol=1e-8)


def test_float32_and_torch_inputs_agree_with_float64():
    a, b = _data(seed=4)
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    whole = _whole(a32.astype(np.float64), b32.astype(np.float64))
    m_np = _whole(a32, b32)
    m_torch = JointMoments(a.shape[1], b.shape[1])
    m_torch.update(torch.from_numpy(a32), torch.from_numpy(b32))
    _assert_same(m_np, whole)
    _assert_same(m_torch, whole, rtol=1e-9)


def test_round_trip_through_parquet():
    a, b = _data(seed=5)
    m = _whole(a, b)
    buffer = io.BytesIO()
    pq.write_table(m.to_table(), buffer)
    buffer.seek(0)
    back = JointMoments.from_table(pq.read_table(buffer))
    assert (back.ca, back.cb) == (m.ca, m.cb)
    _assert_same(back, m, rtol=0)
    # A restored state keeps merging exactly like the original.
    a2, b2 = _data(seed=6)
    extra = _whole(a2, b2)
    _assert_same(back.merge(extra), m.copy().merge(extra))


def test_from_table_rejects_other_kind():
    mm = MultiMoments([2, 3])
    with pytest.raises(StageInputError, match="MultiMoments"):
        JointMoments.from_table(mm.to_table())


def test_empty_statistics_merge_to_identity():
    a, b = _data(seed=7)
    m = _whole(a, b)
    empty = JointMoments(a.shape[1], b.shape[1])
    _assert_same(empty.copy().merge(m), m, rtol=0)
    _assert_same(m.copy().merge(empty), m, rtol=0)
    empty.update(a[:0], b[:0])
    assert empty.n == 0


def test_copy_is_independent():
    a, b = _data(seed=8)
    m = _whole(a, b)
    before = m.comoment.copy()
    m.copy().merge(_whole(*_data(seed=9)))
    np.testing.assert_array_equal(m.comoment, before)


def test_swapped_exchanges_blocks():
    a, b = _data(seed=10)
    m = _whole(a, b)
    s = m.swapped()
    _assert_same(s, _whole(b, a), rtol=1e-12)


def test_multimoments_blocks_match_numpy():
    rng = np.random.default_rng(11)
    layers = [rng.standard_normal((300, c)) for c in (2, 4, 3)]
    mm = MultiMoments([2, 4, 3], ["conv1", "conv2", "fc"])
    for lo in range(0, 300, 64):
        mm.update(*(x[lo : lo + 64] for x in layers))
    full = np.cov(np.concatenate(layers, axis=1), rowvar=False)
    np.testing.assert_allclose(mm.block("conv2", "fc"), full[2:6, 6:9], rtol=1e-10)
    np.testing.assert_allclose(mm.block_mean("fc"), layers[2].mean(axis=0), rtol=1e-12)
    back = MultiMoments.from_table(mm.to_table())
    assert back.names == ["conv1", "conv2", "fc"]
    np.testing.assert_array_equal(back.comoment, mm.comoment)


@pytest.mark.parametrize(
    "a_shape,b_shape,match",
    [
        ((10, 4), (10, 3), "block 'a' must be"),  # wrong channel count for a
        ((10, 5), (9, 3), "same samples"),
        ((10, 5, 1), (10, 3), "block 'a' must be"),
    ],
)
def test_update_rejects_bad_shapes(a_shape, b_shape, match):
    m = JointMoments(5, 3)
    with pytest.raises(StageInputError, match=match):
        m.update(np.zeros(a_shape), np.zeros(b_shape))


def test_update_rejects_nan_and_bad_merges():
    m = JointMoments(2, 2)
    a = np.ones((4, 2))
    a[1, 1] = np.nan
    with pytest.raises(StageInputError, match="NaN"):
        m.update(a, np.ones((4, 2)))
    with pytest.raises(StageInputError, match="cannot merge"):
        m.merge(JointMoments(2, 3))
    with pytest.raises(StageInputError, match="samples"):
        m.covariance()


@pytest.mark.parametrize("n", [10, 5000])
def test_state_size_is_independent_of_sample_count(n):
    a, b = _data(seed=12, n=n)
    table = _whole(a, b).to_table()
    arrays = {name: len(table.column(name)[0]) for name in ("n", "mean", "m2")}
    assert arrays == {"n": 1, "mean": 8, "m2": 64}
