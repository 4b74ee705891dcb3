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
from repdissect.stages._activations import read_activations, table_to_arrays
from repdissect.stages._errors import StageInputError
from repdissect.stages._extraction import (
    Extractor,
    UnitMeans,
    cached_model,
    clear_model_cache,
    extract_shard,
    read_summaries,
    resolve_device,
    summaries_table,
    write_table,
)
from repdissect.stages._models import ModelSpec, NormalizedModel, build_model


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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded torch: results here do not depend on it, and a loaded machine slows threads badly."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    "shards, batch_size, layers",
    [
        # Convolutions are batch-size independent on the CPU: any split gives identical bits.
        ([range(0, 7), range(7, 20), range(20, 33)], 5, ["conv1", "conv2.bn", "conv3"]),
        ([range(0, 1), range(1, 33)], 4, ["conv1", "conv3"]),
        # Matrix products may block differently per batch size, so the head is compared on aligned batches.
        ([range(0, 8), range(8, 24), range(24, 33)], 8, CNN_LAYERS),
    ],
)
def test_sharded_extraction_equals_one_shard(cnn, data, shards, batch_size, layers):
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


def test_batch_size_does_not_change_conv_activations(cnn, data):
    a = extract_shard(cnn, ["conv2"], data, np.arange(20), batch_size=20, device="cpu")["conv2"]
    b = extract_shard(cnn, ["conv2"], data, np.arange(20), batch_size=3, device="cpu")["conv2"]
    np.testing.assert_array_equal(table_to_arrays(a.activations)[1], table_to_arrays(b.activations)[1])


def test_shard_keeps_the_given_order_and_matches_plain_forward(cnn, data):
    order = np.array([30, 2, 17, 5, 11])
    out = extract_shard(cnn, CNN_LAYERS, data, order, batch_size=16, device="cpu")
    expected = plain_forward(cnn, CNN_LAYERS, data.load(order).images)
    for name in CNN_LAYERS:
        ids, acts = table_to_arrays(out[name].activations)
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_array_equal(acts, expected[name])


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
