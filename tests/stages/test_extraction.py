"""Extraction: hooked activations equal a plain forward pass, sharding is invisible, tables round-trip."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from repdissect.datasets import Batch, ConceptDataset
from repdissect.core import AtomicParquetWriter
from repdissect.stages import _extraction
from repdissect.core import open_part_writer, parquet_engine
from repdissect.stages._activations import (
    activation_dtype,
    activations_table,
    activation_shape,
    iter_activation_parts,
    read_activation_part,
    read_activations,
    table_to_arrays,
)
from repdissect.stages._errors import StageInputError
from repdissect.stages import UnitMeans, cached_model, clear_model_cache, read_summaries, resolve_device, summaries_table
from repdissect.stages._extraction import (
    PARQUET_OPTIONS,
    BatchActivations,
    Extractor,
    extract_shard,
    forward_batches,
    write_table,
)
from repdissect.stages._models import ModelSpec, NormalizedModel, build_model

from helpers import one_torch_thread  # noqa: F401 - an autouse fixture: torch runs single-threaded here


class NoiseImages(ConceptDataset):
    """Deterministic random uint8 images; counts how often it is loaded."""

    kind = "test-noise"

    def __init__(self, images: int = 33, size: int = 24) -> None:
        self.n, self.size, self.loads = images, size, 0

    def __len__(self) -> int:
        return self.n

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.size, self.size)

    @property
    def seg_size(self) -> tuple[int, int]:
        return self.image_size

    @property
    def concepts(self):
        return []

    def digest(self) -> str:
        return f"noise-{self.n}-{self.size}"

    def load(self, indices: np.ndarray) -> Batch:
        self.loads += 1
        indices = np.asarray(indices, dtype=np.int64)
        images = np.stack([np.random.default_rng(int(i)).integers(0, 256, (3, self.size, self.size), dtype=np.uint8) for i in indices])
        return Batch(index=indices, images=images)


CNN_LAYERS = ["conv1", "conv2.bn", "conv3", "fc"]


@pytest.fixture(scope="module")
def cnn() -> NormalizedModel:
    return build_model(ModelSpec("builtin:cnn", {"depth": 3, "width": 6}), seed=0, num_classes=4)


@pytest.fixture(scope="module")
def data() -> NoiseImages:
    return NoiseImages()


def plain_forward(model: NormalizedModel, layers: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Reference: a plain forward pass with clone-on-hook, no early stop, no buffers."""
    modules = dict(model.net.named_modules())
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module, _inputs, output) -> None:  # returning None keeps the output unchanged
            seen.setdefault(name, output.clone())
        return hook

    handles = [modules[name].register_forward_hook(hook_for(name)) for name in layers]
    try:
        with torch.no_grad():
            model(torch.from_numpy(images))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (t[:, :, None, None] if t.ndim == 2 else t).numpy() for name, t in seen.items()}


# --------------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize(
    "spec, layers, size",
    [
        (ModelSpec("builtin:cnn", {"depth": 3, "width": 6}), CNN_LAYERS, 24),
        (ModelSpec("torchvision:resnet18", num_classes=3), ["conv1", "layer1.0", "layer3", "avgpool", "fc"], 32),
        # features.0 is a conv followed by an in-place ReLU: the stored values must stay pre-ReLU.
        (ModelSpec("torchvision:alexnet", num_classes=3), ["features.0", "features.1", "features.10"], 67),
    ],
    ids=["builtin", "resnet18", "alexnet"],
)
def test_extracted_activations_equal_a_plain_forward_pass(spec, layers, size):
    model = build_model(spec, seed=0)
    images = np.random.default_rng(1).integers(0, 256, (5, 3, size, size), dtype=np.uint8)
    expected = plain_forward(model, layers, images)
    with Extractor(model, layers, device="cpu") as extractor:
        got = extractor(images)
        again = extractor(images)  # second call runs with early stopping
    assert list(got) == layers
    for name in layers:
        np.testing.assert_array_equal(got[name].activations, expected[name])
        np.testing.assert_array_equal(again[name].activations, expected[name])
    if "features.0" in layers:
        assert (got["features.0"].activations < 0).any()


def test_summaries_match_numpy(cnn):
    images = np.random.default_rng(2).integers(0, 256, (6, 3, 24, 24), dtype=np.uint8)
    with Extractor(cnn, CNN_LAYERS, device="cpu") as extractor:
        out = extractor(images)
    for name, result in out.items():
        flat = result.activations.reshape(*result.activations.shape[:2], -1)
        np.testing.assert_array_equal(result.max, flat.max(2))
        np.testing.assert_array_equal(result.argmax, flat.argmax(2))  # first maximum, like numpy
        np.testing.assert_allclose(result.mean, flat.mean(2, dtype=np.float64), rtol=1e-5, atol=1e-6)


def test_argmax_of_ties_is_the_first_position():
    class Constant(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2, 3, 3)
            out[:, 1, 2, 1] = 5.0
            return out

    wrapper = nn.Sequential()
    wrapper.add_module("const", Constant())
    with Extractor(wrapper, ["const"], device="cpu") as extractor:
        out = extractor(np.zeros((2, 3, 4, 4), np.uint8))["const"]
    np.testing.assert_array_equal(out.argmax, [[0, 7], [0, 7]])
    np.testing.assert_array_equal(out.max, [[0, 5], [0, 5]])


def test_early_stop_skips_the_rest_of_the_network(cnn):
    calls = []
    handle = cnn.net.fc.register_forward_hook(lambda *a: calls.append(1))
    try:
        with Extractor(cnn, ["conv1"], device="cpu") as extractor:
            for _ in range(3):
                extractor(np.zeros((2, 3, 24, 24), np.uint8))
    finally:
        handle.remove()
    assert len(calls) == 1  # only the verifying first pass ran to the end


# --------------------------------------------------------------------------------------------- shards


@pytest.mark.parametrize(
    "shards, batch_size",
    [
        # Shards cut at multiples of the batch grid (as the extract stage cuts them): every image meets the
        # same batch companions as in one whole pass, so every layer, the head included, is bit-identical.
        ([range(0, 10), range(10, 25), range(25, 33)], 5),
        ([range(0, 4), range(4, 32), range(32, 33)], 4),
        ([range(0, 8), range(8, 24), range(24, 33)], 8),
        ([range(0, 33)], 64),
    ],
)
def test_sharded_extraction_equals_one_shard(cnn, data, shards, batch_size):
    layers = CNN_LAYERS
    whole = extract_shard(cnn, layers, data, np.arange(len(data)), batch_size=batch_size, device="cpu")
    parts = [extract_shard(cnn, layers, data, np.asarray(s), batch_size=batch_size, device="cpu") for s in shards]
    for name in layers:
        ids, acts = table_to_arrays(whole[name].activations)
        merged = pa.concat_tables([p[name].activations for p in parts])
        ids_m, acts_m = table_to_arrays(merged)
        np.testing.assert_array_equal(ids, np.arange(len(data)))
        np.testing.assert_array_equal(ids_m, ids)
        np.testing.assert_array_equal(acts_m, acts)
        summaries = read_summaries(pa.concat_tables([p[name].summaries for p in parts]))
        reference = read_summaries(whole[name].summaries)
        for field in ("image", "max", "argmax", "mean"):
            np.testing.assert_array_equal(getattr(summaries, field), getattr(reference, field))


@pytest.mark.parametrize(
    "ids, batch_size, expected",
    [
        (range(0, 10), 4, [(0, 4), (4, 8), (8, 10)]),
        (range(6, 13), 4, [(0, 2), (2, 6), (6, 7)]),  # a shard starting mid-cell keeps the grid, not its own
        ([30, 2, 17, 5, 11], 16, [(0, 1), (1, 2), (2, 3), (3, 5)]),  # same cell but not adjacent: separate
        ([3, 3, 3, 3, 3], 2, [(0, 2), (2, 4), (4, 5)]),  # repeated ids never exceed batch_size rows
        ([], 8, []),
    ],
)
def test_forward_batches_follow_the_dataset_grid(ids, batch_size, expected):
    assert forward_batches(np.asarray(list(ids), np.int64), batch_size) == expected


def test_extraction_of_any_aligned_shard_layout_equals_per_batch_forward(cnn, data):
    """What the grid guarantees, stated exactly: each grid cell is one forward pass of exactly its images."""
    batch = 6
    out = extract_shard(cnn, CNN_LAYERS, data, np.arange(12, 33), batch_size=batch, device="cpu")
    for name in CNN_LAYERS:
        _, acts = table_to_arrays(out[name].activations)
        for start in range(12, 33, batch):
            cell = np.arange(start, min(start + batch, 33))
            np.testing.assert_array_equal(acts[cell - 12], plain_forward(cnn, [name], data.load(cell).images)[name])


def test_shard_keeps_the_given_order_and_matches_plain_forward(cnn, data):
    order = np.array([30, 2, 17, 5, 11])
    out = extract_shard(cnn, CNN_LAYERS, data, order, batch_size=16, device="cpu")
    expected = plain_forward(cnn, CNN_LAYERS, data.load(order).images)
    for name in CNN_LAYERS:
        ids, acts = table_to_arrays(out[name].activations)
        np.testing.assert_array_equal(ids, order)
        # Batches of a different composition than one plain pass: equal to rounding, not to the bit.
        np.testing.assert_allclose(acts, expected[name], rtol=1e-5, atol=1e-6)


def test_float16_storage_is_the_rounded_float32(cnn, data):
    full = extract_shard(cnn, ["conv2", "fc"], data, np.arange(10), device="cpu")
    half = extract_shard(cnn, ["conv2", "fc"], data, np.arange(10), device="cpu", dtype="float16")
    for name in ("conv2", "fc"):
        acts32 = table_to_arrays(full[name].activations)[1]
        acts16 = table_to_arrays(half[name].activations)[1]
        assert acts16.dtype == np.float16
        np.testing.assert_array_equal(acts16, acts32.astype(np.float16))
        # Summaries come from the float32 values before the cast.
        np.testing.assert_array_equal(read_summaries(half[name].summaries).max, read_summaries(full[name].summaries).max)


def test_float16_overflow_is_refused():
    class Huge(nn.Module):
        def forward(self, x):
            return x * 1e6

    wrapper = nn.Sequential()
    wrapper.add_module("huge", Huge())
    with Extractor(wrapper, ["huge"], device="cpu", dtype="float16") as extractor:
        with pytest.raises(StageInputError, match="float16"):
            extractor(np.full((1, 3, 2, 2), 255, np.uint8))


@pytest.mark.parametrize("value, refused", [(65519.0, False), (65520.0, True), (-65520.0, True), (-1e9, True)])
def test_float16_overflow_is_judged_by_the_cast_of_each_extreme(value, refused):
    """Overflow is detected from the per-unit max and min: negative and borderline values count too."""

    class Spike(nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2, 3, 3)
            out[:, 1, 1, 2] = value
            return out

    wrapper = nn.Sequential()
    wrapper.add_module("spike", Spike())
    with Extractor(wrapper, ["spike"], device="cpu", dtype="float16") as extractor:
        if refused:
            with pytest.raises(StageInputError, match="beyond float16's range"):
                extractor(np.zeros((2, 3, 4, 4), np.uint8))
        else:
            out = extractor(np.zeros((2, 3, 4, 4), np.uint8))["spike"]
            assert np.isfinite(out.activations).all() and out.activations.max() == np.float16(value)


def test_float16_summaries_equal_the_float32_ones_bit_for_bit(cnn, data):
    """Summaries are computed from the float32 values in C×H×W order whatever the storage dtype."""
    full = extract_shard(cnn, CNN_LAYERS, data, np.arange(12), batch_size=5, device="cpu")
    half = extract_shard(cnn, CNN_LAYERS, data, np.arange(12), batch_size=5, device="cpu", dtype="float16")
    for name in CNN_LAYERS:
        a, b = read_summaries(full[name].summaries), read_summaries(half[name].summaries)
        for field in ("max", "argmax", "mean"):
            np.testing.assert_array_equal(getattr(b, field), getattr(a, field), err_msg=f"{name} {field}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_and_device_summaries_agree(channels_last):
    """The numpy summaries of the CPU path equal the torch reductions used on accelerators (ties included)."""
    rng = np.random.default_rng(5)
    values = rng.integers(-3, 4, (6, 5, 7, 3)).astype(np.float32)  # small integers: many tied maxima
    values[:, 2] = 0.0
    t = torch.from_numpy(values)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape

    def empty() -> BatchActivations:
        return BatchActivations(np.empty(0), np.empty((n, c), np.float32), np.empty((n, c), np.int32),
                                np.empty((n, c), np.float32))

    cpu, device = empty(), empty()
    low_cpu = _extraction._summarise_cpu(t.contiguous().view(n, c, h * w), cpu, want_min=True)
    low_device = _extraction._summarise_device(t.reshape(n, c, h * w), device, want_min=True)
    flat = values.reshape(n, c, h * w)
    np.testing.assert_array_equal(cpu.argmax, flat.argmax(2))
    np.testing.assert_array_equal(cpu.max, flat.max(2))
    np.testing.assert_array_equal(low_cpu, flat.min(2))
    for field in ("max", "argmax", "mean"):
        np.testing.assert_array_equal(getattr(device, field), getattr(cpu, field), err_msg=field)
    np.testing.assert_array_equal(low_device, low_cpu)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_accelerator_code_path_matches_the_cpu_one(cnn, dtype):
    """The non-CPU branch of the hook (torch reductions, cast before the copy), run here on CPU tensors."""
    images = np.random.default_rng(4).integers(0, 256, (5, 3, 24, 24), dtype=np.uint8)
    with Extractor(cnn, CNN_LAYERS, device="cpu", dtype=dtype) as extractor:
        host = extractor(images)
        extractor._host = False
        device = extractor(images)
    for name in CNN_LAYERS:
        np.testing.assert_array_equal(device[name].activations, host[name].activations)
        np.testing.assert_array_equal(device[name].max, host[name].max)
        np.testing.assert_array_equal(device[name].argmax, host[name].argmax)
        np.testing.assert_allclose(device[name].mean, host[name].mean, rtol=1e-6, atol=1e-7)
    wrapper = nn.Sequential()
    wrapper.add_module("neg", _Scaled(-1e6))
    with Extractor(wrapper, ["neg"], device="cpu", dtype="float16") as extractor:
        extractor._host = False
        with pytest.raises(StageInputError, match="float16"):
            extractor(np.full((1, 3, 2, 2), 255, np.uint8))


class _Scaled(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_non_finite_activations_are_refused():
    class Broken(nn.Module):
        def forward(self, x):
            out = x.clone()
            out[:, 1] = float("nan")
            return out

    wrapper = nn.Sequential()
    wrapper.add_module("broken", Broken())
    with Extractor(wrapper, ["broken"], device="cpu") as extractor:
        with pytest.raises(StageInputError, match=r"NaN/inf activations in 1 of 3 units \(e\.g\. units \[1\]\)"):
            extractor(np.zeros((2, 3, 2, 2), np.uint8))


# --------------------------------------------------------------------------------------------- tables


def test_parquet_round_trip(tmp_path, cnn, data):
    out = extract_shard(cnn, ["conv2", "fc"], data, np.arange(9), batch_size=4, device="cpu")
    for name, layer in out.items():
        acts_path = write_table(layer.activations, tmp_path / f"{name}.parquet")
        summary_path = write_table(layer.summaries, tmp_path / f"{name}-summaries.parquet")
        ids, acts = read_activations(acts_path)
        np.testing.assert_array_equal(acts, table_to_arrays(layer.activations)[1])
        np.testing.assert_array_equal(ids, np.arange(9))
        back = read_summaries(pq.read_table(summary_path))
        reference = read_summaries(layer.summaries)
        assert back.shape == reference.shape
        for field in ("image", "max", "argmax", "mean"):
            np.testing.assert_array_equal(getattr(back, field), getattr(reference, field))


def _parquet_parts(directory, engine="pyarrow"):
    def open_part(layer, schema, *, row_group_size):
        return open_part_writer(directory / f"{layer}.parquet", schema, engine=engine, row_group_size=row_group_size,
                                **PARQUET_OPTIONS)
    return open_part


#: both encoders of streamed parts must give the same tables back
ENGINES = ["pyarrow", pytest.param("polars", marks=pytest.mark.skipif(
    parquet_engine("auto") != "polars", reason="polars (>= 2.1) is not installed"))]


def _row_groups(path) -> list[int]:
    meta = pq.ParquetFile(path).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def _writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("extract-writer-", "parquet-sink-"))]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_streamed_parts_hold_one_row_group_per_batch_and_read_back_equal(tmp_path, cnn, data, monkeypatch, dtype,
                                                                         engine):
    monkeypatch.setattr(_extraction, "ROW_GROUP_MIN_BYTES", 1)  # every batch its own row group
    layers = ["conv1", "conv3", "fc"]
    out = extract_shard(cnn, layers, data, np.arange(3, 33), batch_size=7, device="cpu", dtype=dtype,
                        write_parts=_parquet_parts(tmp_path, engine), overlap=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.parquet" for name in layers)  # no temp left
    assert not _writer_threads()
    for name in layers:
        path = tmp_path / f"{name}.parquet"
        assert pq.ParquetFile(path).metadata.num_row_groups == 5  # 7 + 7 + 7 + 7 + 2 rows
        table = pq.read_table(path)
        assert table.column("activations").num_chunks == 5
        assert table.schema.field("activations").type.value_type == (pa.float16() if dtype == "float16" else pa.float32())
        written = out[name].activations.schema
        assert table.schema.equals(written, check_metadata=False)  # types and non-null flags
        assert table.schema.field("activations").metadata == written.field("activations").metadata
        assert activation_shape(table.schema) == activation_shape(written)
        assert activation_dtype(table.schema) == dtype
        ids, acts = table_to_arrays(table)
        expected_ids, expected = table_to_arrays(out[name].activations)
        assert acts.dtype == np.dtype(dtype) and acts.flags.c_contiguous
        np.testing.assert_array_equal(ids, np.arange(3, 33))
        np.testing.assert_array_equal(ids, expected_ids)
        np.testing.assert_array_equal(acts, expected)
        (streamed_ids, streamed), = iter_activation_parts([path])  # row group by row group into one array
        np.testing.assert_array_equal(streamed_ids, expected_ids)
        np.testing.assert_array_equal(streamed, expected)
        assert streamed.dtype == np.dtype(dtype) and streamed.flags.c_contiguous and streamed.flags.owndata
    if dtype == "float16":  # and the stored values are the rounded float32 activations
        full = extract_shard(cnn, ["conv3"], data, np.arange(3, 33), batch_size=7, device="cpu")
        np.testing.assert_array_equal(read_activations(tmp_path / "conv3.parquet")[1],
                                      table_to_arrays(full["conv3"].activations)[1].astype(np.float16))


@pytest.mark.parametrize("engine", ENGINES)
def test_parts_written_after_extraction_are_the_same(tmp_path, cnn, data, monkeypatch, engine):
    """Without overlap (no spare core) every layer is written at the end, in row groups of ≥ 1 batch (pyarrow:
    even ones; polars: cut every batch)."""
    monkeypatch.setattr(_extraction, "ROW_GROUP_MIN_BYTES", 1)
    out = extract_shard(cnn, ["conv2.bn", "fc"], data, np.arange(30), batch_size=7, device="cpu",
                        write_parts=_parquet_parts(tmp_path, engine), overlap=False)
    assert not _writer_threads()
    for name in ("conv2.bn", "fc"):
        assert _row_groups(tmp_path / f"{name}.parquet") == ([7, 8, 7, 8] if engine == "pyarrow" else [7, 7, 7, 7, 2])
        np.testing.assert_array_equal(read_activations(tmp_path / f"{name}.parquet")[1],
                                      table_to_arrays(out[name].activations)[1])


def test_overlap_needs_a_spare_core(monkeypatch):
    monkeypatch.setattr(_extraction.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert not _extraction._spare_core(torch.device("cpu"))
    assert _extraction._spare_core(torch.device("cuda", 0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert _extraction._spare_core(torch.device("cpu"))


@pytest.mark.parametrize("engine", ENGINES)
def test_row_groups_gather_small_batches(tmp_path, cnn, data, monkeypatch, engine):
    monkeypatch.setattr(_extraction, "ROW_GROUP_MIN_BYTES", 10 * 4 * 4)  # ten fc rows (4 float32 units each)
    extract_shard(cnn, ["fc"], data, np.arange(33), batch_size=4, device="cpu",
                  write_parts=_parquet_parts(tmp_path, engine), overlap=True)
    # pyarrow: hand-overs at 12 and 24 rows, the rest at the end; polars: every 10 rows (the aim)
    assert _row_groups(tmp_path / "fc.parquet") == ([12, 12, 9] if engine == "pyarrow" else [10, 10, 10, 3])


class _FailingPart:
    """Wraps a real part writer; its ``fail_at``-th write raises."""

    def __init__(self, inner, fail_at):
        self.inner, self.fail_at, self.writes = inner, fail_at, 0

    def write(self, table):
        self.writes += 1
        if self.writes == self.fail_at:
            raise OSError(28, "No space left on device")
        self.inner.write(table)

    def close(self):
        return self.inner.close()

    def abort(self):
        self.inner.abort()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_writer_thread_fails_the_shard_and_leaves_no_part(tmp_path, cnn, data, monkeypatch, overlap, engine):
    monkeypatch.setattr(_extraction, "ROW_GROUP_MIN_BYTES", 1)
    real = _parquet_parts(tmp_path, engine)
    calls = []

    def open_part(layer, schema, *, row_group_size):
        calls.append(layer)
        part = real(layer, schema, row_group_size=row_group_size)
        return _FailingPart(part, fail_at=2) if layer == "conv3" else part

    with pytest.raises(OSError, match="No space left"):
        extract_shard(cnn, ["conv1", "conv3"], data, np.arange(33), batch_size=4, device="cpu", write_parts=open_part,
                      overlap=overlap)
    assert sorted(calls) == ["conv1", "conv3"]
    assert not _writer_threads()
    # conv3's part was never completed, so conv1's is not published either (the writers meet before any
    # part is published), whatever the threads' timing; no temp file is left
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("engine", ENGINES)
def test_an_extraction_error_aborts_the_parts_being_written(tmp_path, cnn, monkeypatch, engine):
    monkeypatch.setattr(_extraction, "ROW_GROUP_MIN_BYTES", 1)

    class BreaksLater(NoiseImages):
        def load(self, indices):
            if self.loads == 2:
                raise RuntimeError("image 9 is unreadable")
            return super().load(indices)

    with pytest.raises(RuntimeError, match="unreadable"):
        extract_shard(cnn, ["conv1", "conv2"], BreaksLater(), np.arange(20), batch_size=4, device="cpu",
                      write_parts=_parquet_parts(tmp_path, engine), overlap=True)
    assert not _writer_threads()
    assert list(tmp_path.iterdir()) == []


def test_atomic_parquet_writer_publishes_on_close_only(tmp_path):
    table = pa.table({"x": pa.array([1, 2, 3], pa.int64())})
    path = tmp_path / "sub" / "part-00000.parquet"
    with AtomicParquetWriter(path, table.schema) as writer:
        writer.write(table)
        writer.write(table.slice(1))
        assert not path.exists()
        assert len(list(path.parent.iterdir())) == 1  # the hidden temp file
        assert not list(path.parent.glob("part-*.parquet"))  # invisible to the staged-part glob
    assert pq.read_table(path).column("x").to_pylist() == [1, 2, 3, 2, 3]
    assert pq.ParquetFile(path).metadata.num_row_groups == 2
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(ValueError, match="after close"):
        writer.write(table)
    writer.abort()  # a no-op after close
    assert path.exists()

    other = tmp_path / "other.parquet"
    with pytest.raises(KeyError):
        with AtomicParquetWriter(other, table.schema) as writer:
            writer.write(table)
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == [tmp_path / "sub"]


def test_summary_table_schema_and_row_col():
    table = summaries_table(np.array([4, 9]), np.ones((2, 3)), np.array([[0, 5, 11], [3, 4, 7]]), np.zeros((2, 3)), (3, 3, 4))
    assert table.schema.field("max").type == pa.list_(pa.float32(), 3)
    assert table.schema.field("argmax").type == pa.list_(pa.int32(), 3)
    rows, cols = read_summaries(table).argmax_rowcol()
    np.testing.assert_array_equal(rows, [[0, 1, 2], [0, 1, 1]])
    np.testing.assert_array_equal(cols, [[0, 1, 3], [3, 0, 3]])
    with pytest.raises(StageInputError, match="expected"):
        summaries_table(np.array([1]), np.ones((1, 2)), np.zeros((1, 3)), np.zeros((1, 3)), (3, 1, 1))
    with pytest.raises(StageInputError, match="not a unit-summary table"):
        read_summaries(pa.table({"image": [1]}))


# --------------------------------------------------------------------------------------------- UnitMeans


@pytest.mark.parametrize("splits", [[10], [3, 7], [1, 1, 8], [0, 10]])
def test_unit_means_merged_equals_single(splits):
    rng = np.random.default_rng(3)
    mean, peak = rng.normal(size=(10, 4)), rng.normal(size=(10, 4)) + 1
    peak[:, 2] = -1.0  # a unit that never fires
    single = UnitMeans()
    single.update(mean, peak)
    merged, start = UnitMeans(4), 0
    for size in splits:
        part = UnitMeans(4)
        part.update(mean[start : start + size], peak[start : start + size])
        merged.merge(UnitMeans.from_table(part.to_table()))
        start += size
    for name in ("mean", "mean_max", "max", "dead"):
        np.testing.assert_allclose(getattr(merged, name), getattr(single, name), rtol=1e-12)
    np.testing.assert_allclose(single.mean, mean.mean(0))
    np.testing.assert_array_equal(single.max, peak.max(0))
    np.testing.assert_array_equal(single.dead, [False, False, True, False])
    assert merged.count == 10


def test_unit_means_empty_states_are_finite():
    empty = UnitMeans(3)
    assert np.isfinite(empty.mean).all() and np.isfinite(empty.max).all()
    assert UnitMeans.from_table(UnitMeans().to_table()).count == 0
    assert UnitMeans().merge(UnitMeans()).mean.shape == (0,)
    with pytest.raises(StageInputError, match="units"):
        UnitMeans(3).update(np.zeros((1, 2)), np.zeros((1, 2)))


def test_unit_means_from_extracted_summaries(cnn, data):
    layer = extract_shard(cnn, ["conv3"], data, np.arange(12), device="cpu")["conv3"]
    _, acts = table_to_arrays(layer.activations)
    stat = UnitMeans.from_summaries(layer.summaries)
    np.testing.assert_allclose(stat.mean, acts.mean(axis=(0, 2, 3), dtype=np.float64), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(stat.max, acts.max(axis=(0, 2, 3)))


# --------------------------------------------------------------------------------------------- errors


def test_unknown_layer_lists_available_layers(cnn):
    with pytest.raises(StageInputError, match=r"unknown layer\(s\) 'conv9'.*available layers: conv1, conv1\.conv"):
        Extractor(cnn, ["conv9"], device="cpu")


def test_shared_module_is_rejected():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.conv(self.act(x)))

    with Extractor(Shared(), ["act"], device="cpu") as extractor:
        with pytest.raises(StageInputError, match="several times"):
            extractor(np.zeros((1, 3, 4, 4), np.uint8))


def test_non_tensor_and_unused_layers_are_rejected():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = nn.Identity()
            self.unused = nn.Identity()

        def forward(self, x):
            return self.pair(x.flatten(2))  # (N, C, H·W): neither a feature map nor a vector

    with Extractor(Odd(), ["pair"], device="cpu") as extractor:
        with pytest.raises(StageInputError, match=r"outputs \(1, 3, 16\)"):
            extractor(np.zeros((1, 3, 4, 4), np.uint8))
    with Extractor(Odd(), ["unused"], device="cpu") as extractor:
        with pytest.raises(StageInputError, match="did not run"):
            extractor(np.zeros((1, 3, 4, 4), np.uint8))


def test_bad_images_and_settings(cnn, data):
    with Extractor(cnn, ["conv1"], device="cpu") as extractor:
        with pytest.raises(StageInputError, match="uint8"):
            extractor(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(StageInputError, match="dtype"):
        Extractor(cnn, ["conv1"], device="cpu", dtype="bfloat16")
    with pytest.raises(StageInputError, match="empty shard"):
        extract_shard(cnn, ["conv1"], data, [], device="cpu")


def test_hooks_are_removed_after_use(cnn):
    before = sum(len(m._forward_hooks) for m in cnn.modules())
    with Extractor(cnn, CNN_LAYERS, device="cpu"):
        assert sum(len(m._forward_hooks) for m in cnn.modules()) == before + len(CNN_LAYERS)
    assert sum(len(m._forward_hooks) for m in cnn.modules()) == before


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(StageInputError, match="unknown device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(StageInputError, match="CUDA is not available"):
            resolve_device("cuda")


# --------------------------------------------------------------------------------------------- concurrency, cache


def test_threads_sharing_one_model_get_their_own_layers(cnn, data):
    images = data.load(np.arange(6)).images
    expected = plain_forward(cnn, ["conv1", "conv3"], images)
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(layer: str) -> None:
        try:
            with Extractor(cnn, [layer], device="cpu") as extractor:
                barrier.wait()
                for _ in range(5):
                    results[layer] = extractor(images)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(layer,)) for layer in ("conv1", "conv3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for layer in ("conv1", "conv3"):
        assert list(results[layer]) == [layer]
        np.testing.assert_array_equal(results[layer][layer].activations, expected[layer])


def test_cached_model_builds_once_per_key_and_evicts_lru():
    clear_model_cache()
    builds = []

    def builder(tag):
        def build():
            builds.append(tag)
            return nn.Identity()
        return build

    first = cached_model("a", builder("a"), maxsize=2)
    assert cached_model("a", builder("a"), maxsize=2) is first
    cached_model("b", builder("b"), maxsize=2)
    cached_model("a", builder("a"), maxsize=2)  # refresh a
    cached_model("c", builder("c"), maxsize=2)  # evicts b
    cached_model("b", builder("b"), maxsize=2)
    assert builds == ["a", "b", "c", "b"]
    clear_model_cache()


def test_cached_model_builds_once_under_concurrency():
    clear_model_cache()
    builds = []
    gate = threading.Event()

    def build():
        builds.append(1)
        gate.wait(1.0)
        return nn.Identity()

    got = []
    threads = [threading.Thread(target=lambda: got.append(cached_model("shared", build))) for _ in range(4)]
    for thread in threads:
        thread.start()
    gate.set()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len({id(m) for m in got}) == 1
    clear_model_cache()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_single_row_group_part_is_read_without_a_copy(tmp_path, dtype):
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((6, 3, 2, 2)).astype(dtype)
    path = tmp_path / "part.parquet"
    pq.write_table(activations_table(np.arange(10, 16), acts, dtype), path)
    ids, got = read_activation_part(path)
    np.testing.assert_array_equal(ids, np.arange(10, 16))
    np.testing.assert_array_equal(got, acts)
    assert got.dtype == np.dtype(dtype) and not got.flags.owndata  # a view of the column's one buffer
