"""Activation extraction: forward hooks on named layers, per-unit summaries on the fly, Arrow tables per shard.

Public names: :func:`resolve_device`, :class:`Extractor`, :func:`extract_shard`, :class:`LayerOutput`,
:func:`summaries_table`, :class:`UnitSummaries`, :func:`read_summaries`, :class:`UnitMeans`,
:func:`cached_model`, :func:`clear_model_cache`, :func:`write_table`.

The constraint that shaped it: extraction is the only stage that touches the network, and everything
downstream streams over what it writes, so it must add as little as possible to a bare forward pass. Hence
one forward pass feeds every requested layer; each hook copies its layer's output exactly once, straight into a
preallocated shard buffer of the storage dtype (the copy is also what protects the values from later
in-place ReLUs), and computes the per-unit summaries (spatial max, its flat index, spatial mean) in float32
on the device while the data is hot; the forward pass stops as soon as the last hooked layer has fired; and
the Arrow tables wrap those buffers without another copy. Hooks only record calls from the thread that
registered them, so one cached model can serve several Dask worker threads. What remains is memory traffic
proportional to the stored volume: negligible for ResNet-18 at 224 px (+1–2 % over the bare forward pass),
but for the demo CNN (≈1 MB of activations per 64×64 image) copying and summarising cost ~70 % of its cheap
forward pass, and Parquet's encoding of the long list column costs more again
(``benchmarks/bench_extraction.py``).

Summary table (one per shard and layer), columns:
``image`` int64; ``max`` fixed_size_list<float32>[C] (spatial max per unit); ``argmax``
fixed_size_list<int32>[C] (flat index ``row · W + col`` of the first maximum at the layer's H×W);
``mean`` fixed_size_list<float32>[C] (spatial mean). Schema metadata: ``repdissect.shape`` = ``[C, H, W]``,
``repdissect.summaries`` = ``"1"``.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ._activations import UnitSummaries, activations_table, read_summaries, summaries_table
from ._errors import StageInputError
from ._models import NormalizedModel, resolve_layers
from ._streaming import StreamingStatistic, pack_arrays, unpack_arrays

__all__ = [
    "resolve_device",
    "Extractor",
    "BatchActivations",
    "extract_shard",
    "LayerOutput",
    "summaries_table",
    "UnitSummaries",
    "read_summaries",
    "UnitMeans",
    "cached_model",
    "clear_model_cache",
    "write_table",
    "PARQUET_OPTIONS",
]

_STORAGE = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16)}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_SHAPE_KEY = b"repdissect.shape"

#: Parquet writer options for activation parts. Uncompressed: float activations shrink only to ~2/3 with
#: lz4/snappy (post-ReLU zeros) at more than twice the write CPU time, and the write already costs more than
#: a small CNN's forward pass (``benchmarks/bench_extraction.py``). Dictionaries and statistics are useless
#: for dense floats. float16 storage halves the bytes on disk but pyarrow writes it more slowly than float32.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → the first CUDA device when available, else the CPU; other names are checked.

    Raises:
        StageInputError: for an unparseable name or a CUDA device this process cannot see.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StageInputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise StageInputError(f"device {device!r} requested but CUDA is not available here; use 'auto' or 'cpu'")
        count = torch.cuda.device_count()
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= count:
            raise StageInputError(f"device {device!r} requested but only {count} CUDA device(s) are visible")
    return resolved


class _StopForward(Exception):
    """Raised by the last hook of a forward pass: nothing after the deepest requested layer needs computing."""


@dataclass
class BatchActivations:
    """One layer's output for a batch: activations ``(N, C, H, W)`` in the storage dtype, summaries ``(N, C)``."""

    activations: np.ndarray
    max: np.ndarray  # float32
    argmax: np.ndarray  # int32, flat spatial index
    mean: np.ndarray  # float32


Sink = Callable[[str, tuple[int, int, int, int]], BatchActivations]


class Extractor:
    """Forward hooks on named layers of a model; ``extractor(images)`` returns each layer's activations.

    Use as a context manager (or call :meth:`close`) so the hooks are removed from the model afterwards.

    Args:
        model: a :class:`~repdissect.stages._models.NormalizedModel` (a plain module is wrapped so that it
            receives ``images / 255``). It is moved to ``device`` and put in eval mode.
        layers: dotted module names of the unwrapped network (see ``layer_shapes``).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: storage dtype of the activations, ``"float32"`` or ``"float16"``; summaries are float32 either
            way and computed before the cast.

    Layer outputs must be ``(N, C, H, W)`` or ``(N, C)`` (stored as ``C×1×1``); a module that runs more than
    once per forward pass (a shared ReLU) is rejected, because which call is "the layer" is ambiguous.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        *,
        device: str | torch.device = "auto",
        dtype: str = "float32",
    ) -> None:
        if dtype not in _STORAGE:
            raise StageInputError(f"activation storage dtype {dtype!r} is not supported; use 'float32' or 'float16'")
        self.device = resolve_device(device)
        self.dtype = dtype
        if not isinstance(model, NormalizedModel):
            model = NormalizedModel(model, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.model = model.to(self.device).eval()
        self.layers = list(resolve_layers(self.model, layers))
        self._owner = threading.get_ident()
        self._sink: Sink | None = None
        self._calls: dict[str, int] = {}
        self._verified = False  # becomes True after one forward pass showed every layer runs exactly once
        self._handles = [
            module.register_forward_hook(self._make_hook(name))
            for name, module in resolve_layers(self.model, self.layers).items()
        ]

    def __enter__(self) -> Extractor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _make_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._sink is None or threading.get_ident() != self._owner:
                return
            self._calls[name] += 1
            if self._calls[name] == 1:
                self._record(name, output)
            if self._verified and all(self._calls.values()):
                raise _StopForward
        return hook

    def _record(self, name: str, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim not in (2, 4):
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise StageInputError(
                f"layer {name!r} outputs {shape}; extraction needs (N, C, H, W) or (N, C) tensors — pick a conv "
                "block or linear layer (see `repdissect layers`)"
            )
        t = output.detach()
        if t.ndim == 2:
            t = t[:, :, None, None]
        n, c, h, w = t.shape
        assert self._sink is not None
        out = self._sink(name, (n, c, h, w))
        dest = torch.from_numpy(out.activations)
        if self.device.type == "cpu" and self.dtype == "float32" and t.dtype == torch.float32:
            # One pass: layout conversion into the shard buffer; summaries then read the contiguous copy.
            dest.copy_(t)
            flat = dest.view(n, c, h * w)
        else:
            flat = t.to(torch.float32).reshape(n, c, h * w)
            dest.copy_(flat.view(n, c, h, w))
            if self.dtype == "float16" and bool(torch.isinf(dest).any()):
                peak = float(flat.abs().max())
                raise StageInputError(
                    f"layer {name!r} has activations up to {peak:.4g}, beyond float16's range (±{_FLOAT16_MAX:.0f}); "
                    "store this model's activations as float32"
                )
        values, index = flat.max(dim=2)
        torch.from_numpy(out.max).copy_(values)
        torch.from_numpy(out.argmax).copy_(index)
        torch.from_numpy(out.mean).copy_(flat.mean(dim=2))
        # Any NaN/inf in a map makes its mean NaN/±inf, so the small (N, C) summaries suffice to refuse
        # non-finite activations here, before they reach the cache and every downstream statistic.
        if not (np.isfinite(out.mean).all() and np.isfinite(out.max).all()):
            bad_units = np.flatnonzero(~(np.isfinite(out.mean) & np.isfinite(out.max)).all(axis=0))
            raise StageInputError(
                f"layer {name!r} produced NaN/inf activations in {bad_units.size} of {c} units "
                f"(e.g. units {bad_units[:5].tolist()}); check the weights (NaN/inf or overflowing parameters) "
                "and the input normalisation (input_mean/input_std)"
            )

    def run(self, images: np.ndarray | torch.Tensor, sink: Sink) -> None:
        """Forward one batch, handing each layer's output to ``sink(name, shape)``'s preallocated arrays."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise StageInputError(f"images must be a uint8 (N, 3, H, W) batch; got {x.dtype} {tuple(x.shape)}")
        x = x.to(self.device, non_blocking=True)
        self._calls = {name: 0 for name in self.layers}
        self._sink = sink
        try:
            with torch.inference_mode():
                self.model(x)
        except _StopForward:
            pass
        finally:
            self._sink = None
        silent = [name for name, calls in self._calls.items() if calls == 0]
        if silent:
            raise StageInputError(f"layer(s) {silent} did not run in the forward pass; choose layers the model uses")
        repeated = {name: calls for name, calls in self._calls.items() if calls > 1}
        if repeated:
            raise StageInputError(
                f"layer(s) {repeated} run several times per forward pass (shared modules); hook their parent block instead"
            )
        self._verified = True

    def __call__(self, images: np.ndarray | torch.Tensor) -> dict[str, BatchActivations]:
        """Activations and summaries of every layer for one uint8 ``(N, 3, H, W)`` batch (fresh arrays)."""
        results: dict[str, BatchActivations] = {}
        storage = _STORAGE[self.dtype][0]

        def sink(name: str, shape: tuple[int, int, int, int]) -> BatchActivations:
            n, c = shape[:2]
            results[name] = BatchActivations(
                np.empty(shape, storage), np.empty((n, c), np.float32), np.empty((n, c), np.int32), np.empty((n, c), np.float32)
            )
            return results[name]

        self.run(images, sink)
        return {name: results[name] for name in self.layers}


# --------------------------------------------------------------------------------------------- shards


@dataclass
class LayerOutput:
    """One shard of one layer: the activation table (``stages._activations`` format) and the summary table."""

    activations: pa.Table
    summaries: pa.Table


class _ShardBuffers:
    """Whole-shard arrays per layer, allocated when the first batch reveals each layer's shape."""

    def __init__(self, total: int, dtype: str) -> None:
        self.total, self.storage, self.start = total, _STORAGE[dtype][0], 0
        self.arrays: dict[str, BatchActivations] = {}

    def sink(self, name: str, shape: tuple[int, int, int, int]) -> BatchActivations:
        n, c, h, w = shape
        if name not in self.arrays:
            self.arrays[name] = BatchActivations(
                np.empty((self.total, c, h, w), self.storage),
                np.empty((self.total, c), np.float32),
                np.empty((self.total, c), np.int32),
                np.empty((self.total, c), np.float32),
            )
        full = self.arrays[name]
        if full.activations.shape[1:] != (c, h, w):
            raise StageInputError(
                f"layer {name!r} changed shape within a shard ({full.activations.shape[1:]} → {(c, h, w)}); "
                "all images of a dataset must have the same size"
            )
        stop = self.start + n
        return BatchActivations(full.activations[self.start : stop], full.max[self.start : stop], full.argmax[self.start : stop], full.mean[self.start : stop])


def extract_shard(
    model: nn.Module,
    layers: Sequence[str],
    dataset: Any,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    dtype: str = "float32",
) -> dict[str, LayerOutput]:
    """Extract ``layers`` for the dataset items ``indices`` (one shard), in that order.

    Args:
        model: the network (a ``NormalizedModel`` from ``build_model``).
        layers: layer names.
        dataset: a ``ConceptDataset``; only ``load(indices).images`` is used.
        indices: dataset indexes of the shard (e.g. one of ``dataset.shards(n)``).
        batch_size: images per forward pass (an execution setting: results do not depend on it on the CPU).
        device: ``"auto"``/``"cpu"``/``"cuda[:N]"``.
        dtype: activation storage dtype, ``"float32"`` or ``"float16"``.

    Returns:
        ``{layer: LayerOutput}`` in the order of ``layers``; the activation table has one row per image
        (``image``, ``activations``), the summary table is described in the module docstring.
    """
    if batch_size < 1:
        raise StageInputError(f"batch_size must be ≥ 1; got {batch_size}")
    ids = np.asarray(indices, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise StageInputError("extract_shard got an empty shard; pass at least one dataset index")
    buffers = _ShardBuffers(len(ids), dtype)
    with Extractor(model, layers, device=device, dtype=dtype) as extractor:
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            images = dataset.load(chunk).images
            buffers.start = start
            extractor.run(images, buffers.sink)
        names = extractor.layers
    outputs = {}
    for name in names:
        full = buffers.arrays[name]
        outputs[name] = LayerOutput(
            activations=activations_table(ids, full.activations, dtype),
            summaries=summaries_table(ids, full.max, full.argmax, full.mean, full.activations.shape[1:]),
        )
    return outputs


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write an activation or summary table as Parquet with :data:`PARQUET_OPTIONS` (one row group)."""
    path = Path(path)
    pq.write_table(table, path, row_group_size=max(table.num_rows, 1), **PARQUET_OPTIONS)
    return path


class UnitMeans(StreamingStatistic):
    """Dataset-wide per-unit activation level: mean activation, mean of per-image maxima, overall max.

    State (float64 sums, exact to merge up to rounding): ``count`` images, ``sum_mean`` and ``sum_max`` over
    images of the per-image spatial mean / max, ``max`` over images. Readouts: :attr:`mean`, :attr:`mean_max`,
    :attr:`max`, :attr:`dead` (units never above zero — flagged, never divided by).
    """

    def __init__(self, num_units: int | None = None) -> None:
        self.count = 0
        self.sum_mean = None if num_units is None else np.zeros(num_units)
        self.sum_max = None if num_units is None else np.zeros(num_units)
        self.max_ = None if num_units is None else np.full(num_units, -np.inf)

    def _ensure(self, num_units: int) -> None:
        if self.sum_mean is None:
            self.sum_mean, self.sum_max, self.max_ = np.zeros(num_units), np.zeros(num_units), np.full(num_units, -np.inf)
        elif self.sum_mean.shape[0] != num_units:
            raise StageInputError(f"UnitMeans holds {self.sum_mean.shape[0]} units but got a batch with {num_units}")

    def update(self, mean: np.ndarray, max_values: np.ndarray) -> None:  # type: ignore[override]
        """Fold per-image summaries ``mean``/``max_values`` ``(N, C)`` into the state."""
        mean, max_values = np.asarray(mean, np.float64), np.asarray(max_values, np.float64)
        if mean.ndim != 2 or mean.shape != max_values.shape:
            raise StageInputError(f"UnitMeans.update needs two (N, C) arrays; got {mean.shape} and {max_values.shape}")
        self._ensure(mean.shape[1])
        self.count += mean.shape[0]
        self.sum_mean += mean.sum(0)
        self.sum_max += max_values.sum(0)
        if mean.shape[0]:
            np.maximum(self.max_, max_values.max(0), out=self.max_)

    @classmethod
    def from_summaries(cls, summaries: UnitSummaries | pa.Table) -> UnitMeans:
        """A statistic over the images of one summary table."""
        if isinstance(summaries, pa.Table):
            summaries = read_summaries(summaries)
        stat = cls(summaries.shape[0])
        stat.update(summaries.mean, summaries.max)
        return stat

    def merge(self, other: UnitMeans) -> UnitMeans:
        if other.sum_mean is None:
            return self
        self._ensure(other.sum_mean.shape[0])
        self.count += other.count
        self.sum_mean += other.sum_mean
        self.sum_max += other.sum_max
        np.maximum(self.max_, other.max_, out=self.max_)
        return self

    def _readout(self, sums: np.ndarray | None) -> np.ndarray:
        if sums is None:
            return np.zeros(0)
        return sums / self.count if self.count else np.zeros_like(sums)

    @property
    def mean(self) -> np.ndarray:
        """``(C,)`` mean activation per unit over images and positions (0 before any update)."""
        return self._readout(self.sum_mean)

    @property
    def mean_max(self) -> np.ndarray:
        """``(C,)`` mean over images of each unit's spatial max."""
        return self._readout(self.sum_max)

    @property
    def max(self) -> np.ndarray:
        """``(C,)`` largest activation of each unit (0 before any update)."""
        if self.max_ is None:
            return np.zeros(0)
        return np.where(np.isfinite(self.max_), self.max_, 0.0)

    @property
    def dead(self) -> np.ndarray:
        """``(C,)`` bool: the unit was never above zero on any image."""
        return self.max <= 0 if self.max_ is not None else np.zeros(0, bool)

    def to_table(self) -> pa.Table:
        arrays = {} if self.sum_mean is None else {"sum_mean": self.sum_mean, "sum_max": self.sum_max, "max": self.max_}
        return pack_arrays(arrays, {"count": self.count, "kind": "UnitMeans"})

    @classmethod
    def from_table(cls, table: pa.Table) -> UnitMeans:
        arrays, attrs = unpack_arrays(table)
        if attrs.get("kind") != "UnitMeans":
            raise StageInputError(f"table holds a {attrs.get('kind')!r} state, not UnitMeans")
        stat = cls()
        stat.count = int(attrs["count"])
        if arrays:
            stat.sum_mean, stat.sum_max, stat.max_ = arrays["sum_mean"].copy(), arrays["sum_max"].copy(), arrays["max"].copy()
        return stat


# --------------------------------------------------------------------------------------------- model cache

_CACHE: collections.OrderedDict[str, nn.Module] = collections.OrderedDict()
_CACHE_LOCK = threading.Lock()
_BUILD_LOCKS: dict[str, threading.Lock] = {}


def cached_model(key: str, build: Callable[[], nn.Module], *, maxsize: int = 4) -> nn.Module:
    """The model built by ``build()`` for ``key``, built once per process and reused (LRU of ``maxsize``).

    ``key`` must identify the model completely (e.g. the training stage's cache key or the spec digest plus
    the weights digest). Safe for concurrent Dask worker threads: each key is built by one thread only, and
    :class:`Extractor` hooks ignore other threads' forward passes.
    """
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
        build_lock = _BUILD_LOCKS.setdefault(key, threading.Lock())
    with build_lock:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
        model = build()
        with _CACHE_LOCK:
            _CACHE[key] = model
            _CACHE.move_to_end(key)
            while len(_CACHE) > maxsize:
                old, _ = _CACHE.popitem(last=False)
                _BUILD_LOCKS.pop(old, None)
    return model


def clear_model_cache() -> None:
    """Forget every cached model (frees their memory once no caller holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _BUILD_LOCKS.clear()
