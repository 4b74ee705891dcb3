"""Exact top-quantile thresholds: equal to numpy's quantile on the concatenated values, whatever the sharding."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from repdissect.stages._activations import activations_table, table_to_arrays
from repdissect.stages._errors import StageInputError
from repdissect.stages._thresholds import (
    RadixQuantile,
    TopQuantile,
    quantile_ranks,
    threshold_method,
    unit_thresholds,
)

QUANTILES = [0.005, 0.1, 0.5, 1 / 3, 0.0, 1.0]
DTYPES = [np.float16, np.float32, np.float64]
SPLITS = [[37], [10, 1, 19, 7], [1] * 5 + [32], [18, 19]]


def tied_activations(rng, n=37, dtype=np.float32):
    """(n, 5, 3, 4) with heavy ties, a constant unit, an all-zero unit, negatives and a −0.0."""
    acts = (np.round(rng.standard_normal((n, 5, 3, 4)) * 4) / 4).astype(dtype)
    acts[:, 1] = 0
    acts[:, 3] = dtype(2.5)
    acts[3, 2, 0, 0] = -0.0
    acts[:, 4] = np.abs(acts[:, 4])  # ReLU-like: many exact zeros
    return acts


def numpy_reference(acts, quantile):
    """Per unit ``numpy.quantile(values, 1 - q)`` (scalar q, as the convention says) and the count above it."""
    per_unit = [acts[:, u].reshape(-1) for u in range(acts.shape[1])]
    thresholds = np.array([np.quantile(v, 1 - quantile) for v in per_unit])
    counts = np.array([(v > t).sum() for v, t in zip(per_unit, thresholds)])
    return thresholds, counts


def shards_of(acts, sizes):
    bounds = np.cumsum([0, *sizes])
    return [acts[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def run_topk(shards, num_images, quantile):
    stat = TopQuantile(num_images, quantile)
    for shard in shards:
        stat.update(shard)
    return stat.result()


def run_radix(shards, num_images, quantile, budget_bytes=4096):
    stat = RadixQuantile(num_images, quantile, budget_bytes)
    for shard in shards:
        stat.update(shard)
    while not (stat := stat.next_pass()).done:
        for shard in shards:
            stat.update(shard)
    return stat.result()


METHODS = {"topk": run_topk, "radix": run_radix}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("quantile", QUANTILES)
def test_equals_numpy_quantile_with_ties(method, dtype, quantile):
    acts = tied_activations(np.random.default_rng(0), dtype=dtype)
    expected, counts = numpy_reference(acts, quantile)
    table = METHODS[method](shards_of(acts, [10, 1, 19, 7]), len(acts), quantile)
    assert list(table.columns) == ["unit", "threshold", "count"]
    np.testing.assert_array_equal(table["unit"], np.arange(5))
    # Bit-identical, in the activation dtype.
    assert np.array_equal(table["threshold"].to_numpy(), expected.astype(np.float64))
    assert np.array_equal(table["threshold"].to_numpy().astype(dtype).astype(np.float64), table["threshold"].to_numpy())
    np.testing.assert_array_equal(table["count"], counts)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_continuous_data_count_is_about_q_n(method):
    rng = np.random.default_rng(1)
    acts = rng.standard_normal((200, 3, 5, 5)).astype(np.float32)
    expected, _ = numpy_reference(acts, 0.005)
    table = METHODS[method](shards_of(acts, [64, 64, 72]), 200, 0.005)
    assert np.array_equal(table["threshold"], expected.astype(np.float64))
    n = 200 * 25
    lo, _, _ = quantile_ranks(n, 0.005)
    np.testing.assert_array_equal(table["count"], n - 1 - lo)  # distinct values: everything above v[lo]


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("sizes", SPLITS, ids=str)
def test_sharded_equals_whole(method, sizes):
    acts = tied_activations(np.random.default_rng(2))
    whole = METHODS[method]([acts], len(acts), 0.1)
    sharded = METHODS[method](shards_of(acts, sizes), len(acts), 0.1)
    assert whole.equals(sharded)


@pytest.mark.parametrize("cls", [TopQuantile, RadixQuantile])
def test_merge_tree_equals_sequential(cls):
    acts = tied_activations(np.random.default_rng(3), n=40)
    states = []
    for shard in shards_of(acts, [9, 11, 1, 19]):
        state = cls(40, 0.05, budget_bytes=4096) if cls is RadixQuantile else cls(40, 0.05)
        state.update(shard)
        states.append(cls.from_table(state.to_table()))  # travel as tables, as between workers
    left = states[0].merge(states[1])
    right = states[3].merge(states[2])
    merged = right.merge(left)
    if cls is RadixQuantile:
        shards = shards_of(acts, [9, 11, 1, 19])
        while not (merged := merged.next_pass()).done:
            parts = []
            for shard in shards:
                part = RadixQuantile.from_table(merged.to_table())  # each worker gets the empty pass state
                part.update(shard)
                parts.append(part)
            merged = parts[2].merge(parts[0]).merge(parts[3].merge(parts[1]))
    expected, counts = numpy_reference(acts, 0.05)
    result = merged.result()
    assert np.array_equal(result["threshold"], expected.astype(np.float64))
    np.testing.assert_array_equal(result["count"], counts)


def test_state_round_trips_through_parquet(tmp_path):
    acts = tied_activations(np.random.default_rng(4))
    stat = TopQuantile(len(acts), 0.1)
    stat.update(acts[:20])
    pq.write_table(stat.to_table(), tmp_path / "state.parquet")
    resumed = TopQuantile.from_table(pq.read_table(tmp_path / "state.parquet"))
    resumed.update(acts[20:])
    assert resumed.result().equals(run_topk([acts], len(acts), 0.1))


def test_empty_states_merge_both_ways():
    acts = tied_activations(np.random.default_rng(5))
    full = TopQuantile(len(acts), 0.2)
    full.update(acts)
    assert TopQuantile(len(acts), 0.2).merge(full).result().equals(full.result())
    assert full.merge(TopQuantile(len(acts), 0.2)).result().equals(run_topk([acts], len(acts), 0.2))


@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_extracted_activations(storage):
    """ReLU conv features, stored in the activation Parquet format, read back and thresholded per part."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.ReLU())
    images = torch.rand(24, 3, 17, 17)
    with torch.no_grad():
        features = net(images).numpy()
    parts = [activations_table(np.arange(i, i + 8), features[i : i + 8], storage) for i in range(0, 24, 8)]
    shards = [table_to_arrays(t)[1] for t in parts]
    concatenated = np.concatenate(shards)
    assert concatenated.dtype == np.dtype(storage)
    expected, counts = numpy_reference(concatenated, 0.005)
    for table in (run_topk(shards, 24, 0.005), run_radix(shards, 24, 0.005, budget_bytes=2**20)):
        assert np.array_equal(table["threshold"], expected.astype(np.float64))
        np.testing.assert_array_equal(table["count"], counts)


def test_fully_connected_activations_are_one_position():
    acts = np.random.default_rng(6).standard_normal((50, 4)).astype(np.float32)
    table = run_topk([acts[:20], acts[20:]], 50, 0.1)
    expected = [np.quantile(acts[:, u], 0.9) for u in range(4)]
    assert np.array_equal(table["threshold"], np.array(expected, dtype=np.float64))


def test_method_choice_and_driver():
    acts = tied_activations(np.random.default_rng(7), n=30)
    assert threshold_method(30, (5, 3, 4), "float32", 0.1) == "topk"
    # k ≈ 37 values × 5 units × 4 bytes ≈ 740 bytes
    assert threshold_method(30, (5, 3, 4), "float32", 0.1, budget_bytes=500) == "radix"
    shards = shards_of(acts, [7, 23])
    small = unit_thresholds(lambda: iter(shards), 30, 0.1, budget_bytes=500)
    big = unit_thresholds(lambda: iter(shards), 30, 0.1)
    forced = unit_thresholds(lambda: iter(shards), 30, 0.1, method="radix")
    assert small.equals(big) and big.equals(forced)


@pytest.mark.parametrize(
    "dtype, budget, passes",
    [(np.float16, 2**23, 1), (np.float32, 2**23, 2), (np.float32, 2 * 8 * 5 * 2**11, 3), (np.float64, 2**23, 4)],
)
def test_radix_pass_count_follows_budget(dtype, budget, passes):
    stat = RadixQuantile(10, 0.1, budget)
    stat.update(tied_activations(np.random.default_rng(8), n=10, dtype=dtype))
    assert stat.passes == passes


def test_topk_refuses_over_budget_and_names_the_fix():
    stat = TopQuantile(1000, 0.5, budget_bytes=1000)
    with pytest.raises(StageInputError, match="RadixQuantile"):
        stat.update(np.zeros((10, 4, 2, 2), np.float32))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda a: a.astype(np.int32), "float16/float32/float64"),
        (lambda a: np.where(a > 1, np.nan, a).astype(np.float32), "NaN"),
        (lambda a: a[:, :, :, 0], r"\(N, C, H, W\)"),
    ],
)
def test_bad_activations_raise(make, message):
    acts = tied_activations(np.random.default_rng(9))
    with pytest.raises(StageInputError, match=message):
        TopQuantile(len(acts)).update(make(acts))


def test_shape_change_between_shards_raises():
    stat = TopQuantile(20)
    stat.update(np.zeros((10, 3, 2, 2), np.float32))
    with pytest.raises(StageInputError, match="same shape"):
        stat.update(np.zeros((10, 4, 2, 2), np.float32))


@pytest.mark.parametrize("cls", [TopQuantile, RadixQuantile])
def test_missing_images_are_detected(cls):
    acts = tied_activations(np.random.default_rng(10))
    stat = cls(len(acts) + 1, 0.1)
    stat.update(acts)
    with pytest.raises(StageInputError, match="num_images|every shard"):
        stat.result() if cls is TopQuantile else stat.next_pass()


def test_radix_result_before_done_and_bad_quantile_raise():
    stat = RadixQuantile(5, 0.1)
    stat.update(np.ones((5, 2, 1, 1), np.float32))
    with pytest.raises(StageInputError, match="passes"):
        stat.result()
    with pytest.raises(StageInputError, match="quantile"):
        TopQuantile(5, quantile=1.5)


def test_merge_of_different_settings_raises():
    with pytest.raises(StageInputError, match="cannot be merged"):
        TopQuantile(10, 0.1).merge(TopQuantile(10, 0.2))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("quantile", [0.08, 0.1])  # interpolation weight 0.92 and 0.4 on 27 values
def test_interpolation_rounds_like_numpy(method, quantile):
    """Few, widely spaced float32 values per unit: numpy's two-sided lerp rounding must be reproduced exactly."""
    acts = np.random.default_rng(11).standard_normal((3, 512, 3, 3)).astype(np.float32)
    expected, counts = numpy_reference(acts, quantile)
    extra = {"budget_bytes": 2**22} if method == "radix" else {}
    table = METHODS[method](shards_of(acts, [1, 2]), 3, quantile, **extra)
    assert np.array_equal(table["threshold"], expected.astype(np.float64))
    np.testing.assert_array_equal(table["count"], counts)
