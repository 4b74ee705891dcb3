"""Activation extraction: forward hooks on named layers, per-unit summaries on the fly, Arrow tables per shard.

Public names: :class:`Extractor`, :func:`extract_shard`, :func:`forward_batches`, :class:`LayerOutput`,
:func:`write_table`, :data:`PARQUET_OPTIONS`. The device choice lives in ``_device``, the per-unit
statistic in ``_unit_means``, the per-process model LRU in ``_model_cache``.

The constraint that shaped it: extraction is the only stage that touches the network, and everything
downstream streams over what it writes, so it must add as little as possible to a bare forward pass. Hence:

* one forward pass feeds every requested layer, and it stops as soon as the last hooked layer has fired;
* each hook copies its layer's output once, straight into a preallocated shard buffer of the storage dtype
  (the copy is also what protects the values from later in-place ReLUs; float16 storage of a channels-last
  output takes a float32 layout copy first);
* the per-unit summaries (spatial max, its flat index, spatial mean) are computed in float32 while the data
  is hot — on the CPU with numpy's ``argmax`` (several times faster than torch's ``max(dim)``) plus one
  ``mean`` — and the float16 overflow check uses the per-unit extremes rather than a pass over the values;
* the Arrow tables wrap those buffers without another copy;
* with ``write_parts`` (the extract stage), a background thread per layer writes the rows to that layer's
  Parquet part, a row group per batch or more: while the next batches run when a core is free for it
  (always on an accelerator), so that the encoding overlaps the forward passes, else once extraction is
  done, all layers in parallel. The stage encodes with polars where it is installed: pyarrow spends
  ~10 ns per value on a long ``fixed_size_list`` column (per-value repetition and definition levels,
  float16 as 2-byte fixed-length values), polars 2–7× less (``repdissect.core.open_part_writer``).

Hooks only record calls from the thread that registered them, so one cached model can serve several Dask
worker threads.

What remains is proportional to the stored volume: copying channels-last outputs into C×H×W order (a
transpose, most of it), first-touch page faults of the shard buffers and summarising cost ~50 % of the
demo CNN's cheap forward pass (≈0.1–1 MB of activations per 64×64 image) and a few % of ResNet-18's at
224 px; persisting the bytes at all (page cache, fsync) costs about as much again for the demo CNN, which
is why its extraction cannot come near a bare forward loop on any format (``benchmarks/bench_extraction.py``
measures that floor beside the stage).

Summary table (one per shard and layer), columns:
``image`` int64; ``max`` fixed_size_list<float32>[C] (spatial max per unit); ``argmax``
fixed_size_list<int32>[C] (flat index ``row · W + col`` of the first maximum at the layer's H×W);
``mean`` fixed_size_list<float32>[C] (spatial mean). Schema metadata: ``repdissect.shape`` = ``[C, H, W]``,
``repdissect.summaries`` = ``"1"``.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ..core import PartWriter
from ._activations import activations_schema, activations_table, summaries_table
from ._device import reproducible_kernels, resolve_device
from ._errors import StageInputError
from ._models import NormalizedModel, resolve_layers

__all__ = [
    "Extractor",
    "BatchActivations",
    "extract_shard",
    "LayerOutput",
    "write_table",
    "PARQUET_OPTIONS",
    "ROW_GROUP_MIN_BYTES",
]

_STORAGE = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16)}
_FLOAT16_MAX = float(np.finfo(np.float16).max)

#: Parquet writer options for activation parts. Uncompressed: float activations shrink only to ~2/3 with
#: lz4/snappy (post-ReLU zeros) at more than twice the write CPU time, and the write already costs more than
#: a small CNN's forward pass (``benchmarks/bench_extraction.py``). Dictionaries and statistics are useless
#: for dense floats. Measured without effect on the write time (within ±10 %): data page sizes from 64 KiB
#: to 16 MiB, data page v2, format version 1.0, ``write_batch_size``, byte_stream_split (slower), page
#: checksums/index off (the defaults). float16 storage halves the bytes but not the time: pyarrow encodes
#: per value, and float16 as 2-byte fixed-length values is no faster per value than float32.
PARQUET_OPTIONS: dict[str, Any] = {"compression": "none", "use_dictionary": False, "write_statistics": False}


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


def _summarise_cpu(flat: torch.Tensor, out: BatchActivations, *, want_min: bool) -> np.ndarray | None:
    """Per-unit max, its first flat index and the mean of a float32 CPU ``(N, C, H·W)`` tensor, into ``out``.

    Two passes over the values: numpy's ``argmax`` (several times faster than torch's ``max(dim)`` on the
    CPU for these shapes; both return the first maximum) and torch's ``mean``; the maxima are gathered at the
    indices. Returns the per-unit minimum when ``want_min`` (the float16 overflow check), else ``None``.
    """
    values = flat.numpy()
    index = values.argmax(axis=2)
    out.argmax[...] = index
    out.max[...] = np.take_along_axis(values, index[:, :, None], axis=2)[:, :, 0]
    torch.mean(flat, dim=2, out=torch.from_numpy(out.mean))
    return flat.amin(dim=2).numpy() if want_min else None


def _summarise_device(flat: torch.Tensor, out: BatchActivations, *, want_min: bool) -> np.ndarray | None:
    """:func:`_summarise_cpu` for a float32 tensor on any device: torch reductions there, small results copied back."""
    values, index = flat.max(dim=2)
    torch.from_numpy(out.max).copy_(values)
    torch.from_numpy(out.argmax).copy_(index)
    torch.from_numpy(out.mean).copy_(flat.mean(dim=2))
    return flat.amin(dim=2).cpu().numpy() if want_min else None


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
        self._host = self.device.type == "cpu"  # CPU: numpy summaries; elsewhere torch reductions on the device
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
        if t.dtype != torch.float32:
            t = t.to(torch.float32)
        half = self.dtype == "float16"
        if self._host:
            if half:
                # Summaries come from the float32 values in C×H×W order (a layout copy for channels-last
                # outputs, so that they equal the float32 path's bit for bit), then one cast into the buffer.
                work = t.contiguous()
                low = _summarise_cpu(work.view(n, c, h * w), out, want_min=True)
                dest.copy_(work)
            else:
                # The one copy (layout conversion into the shard buffer, which also protects the values from
                # later in-place ops); the summaries then read that contiguous copy.
                dest.copy_(t)
                low = _summarise_cpu(dest.view(n, c, h * w), out, want_min=False)
        else:
            low = _summarise_device(t.reshape(n, c, h * w), out, want_min=half)
            dest.copy_(t.to(_STORAGE[self.dtype][1]))  # cast on the device: fewer bytes cross the bus
        if half:
            # The cast is monotonic, so a map overflows float16 exactly when its max or min does: checking the
            # (N, C) extremes replaces a pass over the stored values.
            assert low is not None
            peak = np.maximum(np.abs(out.max), np.abs(low))
            if bool(torch.isinf(torch.from_numpy(peak).to(torch.float16)).any()):
                raise StageInputError(
                    f"layer {name!r} has activations up to {float(np.nanmax(peak)):.4g}, beyond float16's range "
                    f"(±{_FLOAT16_MAX:.0f}); store this model's activations as float32"
                )
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
            with torch.inference_mode(), reproducible_kernels():
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


class OpenPart(Protocol):
    """``open_part(layer, schema, row_group_size=n)``: a fresh part writer for one layer of one shard.

    ``row_group_size`` is the number of rows per row group :func:`extract_shard` aims at; writers that
    regroup rows themselves (polars) use it, writers that take each ``write`` as a row group may ignore it.
    """

    def __call__(self, layer: str, schema: pa.Schema, *, row_group_size: int) -> PartWriter: ...

#: Row groups hold at least this many bytes and at least one batch: big enough that row-group overhead is
#: nil, small enough that writing overlaps the forward passes (and that writer and reader stay in cache).
ROW_GROUP_MIN_BYTES = 1 << 20

_ABORT = object()


def _spare_core(device: torch.device) -> bool:
    """Whether writer threads can run beside the forward passes: on an accelerator, or with an idle core.

    When torch's intra-op threads already occupy every core, a writer thread would preempt them mid
    parallel region and slow the forward pass by more than the write it hides.
    """
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    return torch.get_num_threads() < cores


class _PartStreamer:
    """Writes the finished rows of each layer's shard buffer from a background thread per layer.

    Rows handed over during extraction are written while the next batches run (pyarrow's Parquet writer
    releases the GIL); rows handed over at the end are written by all layers' threads in parallel. Rows are
    only read after the main thread handed them over and are never written again, so the buffers need no
    lock. A writer's failure is re-raised in the main thread at the next hand-over or at :meth:`close`;
    :meth:`close` publishes the parts only when every layer's writer succeeded (the writers meet at a
    barrier first, so which parts survive a failure never depends on thread timing); :meth:`abort` stops
    every writer, which removes its unfinished file; both join every thread.
    """

    def __init__(self, open_part: OpenPart, ids: np.ndarray, dtype: str, batch_size: int) -> None:
        self._open_part, self._ids, self._dtype, self._batch = open_part, ids, dtype, batch_size
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._threads: list[threading.Thread] = []
        self._handed: dict[str, int] = {}
        self._errors: list[BaseException] = []

    def rows_ready(self, arrays: dict[str, BatchActivations], stop: int, *, last: bool = False) -> None:
        """Rows ``[0, stop)`` of every layer are final: hand over those not handed yet if they fill a row
        group, or all of them when ``last``."""
        self.raise_error()
        for name, full in arrays.items():
            if name not in self._queues:
                self._start(name, full.activations)
            begin = self._handed[name]
            if stop > begin and (last or (stop - begin) * full.activations[0].nbytes >= ROW_GROUP_MIN_BYTES):
                self._queues[name].put((begin, stop))
                self._handed[name] = stop

    def _start(self, name: str, activations: np.ndarray) -> None:
        self._queues[name] = queue.SimpleQueue()
        self._handed[name] = 0
        thread = threading.Thread(target=self._write, args=(name, activations, self._queues[name]),
                                  name=f"extract-writer-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _write(self, name: str, activations: np.ndarray, todo: queue.SimpleQueue) -> None:
        part: PartWriter | None = None
        failed = False
        row_bytes = max(activations[0].nbytes, 1)
        group = max(self._batch, -(-ROW_GROUP_MIN_BYTES // row_bytes))
        try:
            part = self._open_part(name, activations_schema(activations.shape[1:], self._dtype), row_group_size=group)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            self._errors.append(exc)
            failed = True
        try:
            while (item := todo.get()) is not _ABORT:
                if isinstance(item, threading.Barrier):
                    # Publish only when every layer wrote all its rows: a failure in any layer drops them all.
                    if failed:
                        item.abort()
                        return
                    try:
                        item.wait()
                    except threading.BrokenBarrierError:
                        return
                    part.close()
                    part = None
                    return
                if failed:
                    continue  # keep consuming until the close or abort signal
                begin, stop = item
                # Even row groups of at least `group` rows (one when fewer than two fit).
                pieces = max((stop - begin) // group, 1)
                bounds = [begin + i * (stop - begin) // pieces for i in range(pieces + 1)]
                try:
                    for lo, hi in zip(bounds[:-1], bounds[1:]):
                        part.write(activations_table(self._ids[lo:hi], activations[lo:hi], self._dtype))
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    self._errors.append(exc)
                    failed = True
        except BaseException as exc:  # noqa: BLE001 - e.g. the close itself failed
            self._errors.append(exc)
        finally:
            if part is not None:
                part.abort()

    def raise_error(self) -> None:
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        """Publish every part once all layers' rows are written (hand the last ones over with ``last=True``);
        if any layer's writer failed, no part of this shard is published. Joins."""
        self._stop(threading.Barrier(len(self._queues)))
        self.raise_error()

    def abort(self) -> None:
        """Stop every writer and drop the unfinished parts (parts already closed stay); joins."""
        self._stop(_ABORT)

    def _stop(self, signal: object) -> None:
        for todo in self._queues.values():
            todo.put(signal)
        for thread in self._threads:
            thread.join()
        self._queues, self._threads = {}, []


def forward_batches(ids: np.ndarray, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of ``ids`` that form the forward batches: consecutive rows whose image ids
    fall in the same cell ``id // batch_size`` of the dataset's batch grid (at most ``batch_size`` rows each
    for distinct ids)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return []
    cell = ids // batch_size
    cuts = np.flatnonzero(cell[1:] != cell[:-1]) + 1
    bounds = np.concatenate([[0], cuts, [ids.size]])
    ranges = []
    for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        ranges.extend((s, min(s + batch_size, stop)) for s in range(start, stop, batch_size))
    return ranges


def extract_shard(
    model: nn.Module,
    layers: Sequence[str],
    dataset: Any,
    indices: Sequence[int] | np.ndarray,
    *,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    dtype: str = "float32",
    write_parts: OpenPart | None = None,
    overlap: bool | None = None,
) -> dict[str, LayerOutput]:
    """Extract ``layers`` for the dataset items ``indices`` (one shard), in that order.

    Args:
        model: the network (a ``NormalizedModel`` from ``build_model``).
        layers: layer names.
        dataset: a ``ConceptDataset``; only ``load(indices).images`` is used.
        indices: dataset indexes of the shard (e.g. one of ``dataset.shards(n)``).
        batch_size: the forward-pass batch grid: image ``i`` is computed together with the other requested
            images of ``i // batch_size``, so a contiguous shard cut at multiples of ``batch_size`` gives
            exactly the bits of one whole pass (convolutions are not bit-identical across batch sizes).
        device: ``"auto"``/``"cpu"``/``"cuda[:N]"``.
        dtype: activation storage dtype, ``"float32"`` or ``"float16"``.
        write_parts: when given, each layer's activation table is also written to a part:
            ``write_parts(layer, schema, row_group_size=n)`` opens the layer's part (see :class:`OpenPart`;
            e.g. ``Context.open_part`` or ``open_part_writer``), a background thread per layer appends the rows in row groups of at
            least one batch and :data:`ROW_GROUP_MIN_BYTES`, and closes the part at the end. Any error
            aborts every unfinished part and is raised here; the threads are always joined.
        overlap: with ``write_parts``, whether rows are written while later batches are extracted (else
            all at the end, the layers in parallel). Default: when a core is free for it — always on an
            accelerator, on the CPU when torch uses fewer threads than there are cores.

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
    streamer = _PartStreamer(write_parts, ids, dtype, batch_size) if write_parts is not None else None
    try:
        with Extractor(model, layers, device=device, dtype=dtype) as extractor:
            if overlap is None:
                overlap = _spare_core(extractor.device)
            for start, stop in forward_batches(ids, batch_size):
                images = dataset.load(ids[start:stop]).images
                buffers.start = start
                extractor.run(images, buffers.sink)
                if streamer is not None and (overlap or stop == len(ids)):
                    streamer.rows_ready(buffers.arrays, stop, last=stop == len(ids))
            names = extractor.layers
        if streamer is not None:
            streamer.close()
    except BaseException:
        if streamer is not None:
            streamer.abort()
        raise
    outputs = {}
    for name in names:
        full = buffers.arrays[name]
        outputs[name] = LayerOutput(
            activations=activations_table(ids, full.activations, dtype),
            summaries=summaries_table(ids, full.max, full.argmax, full.mean, full.activations.shape[1:]),
        )
    return outputs


def write_table(table: pa.Table, path: str | Path) -> Path:
    """Write an activation or summary table as Parquet with :data:`PARQUET_OPTIONS` (one row group).

    For tables already in memory (tests, tools); the extract stage streams activation parts instead
    (``extract_shard(write_parts=...)``).
    """
    path = Path(path)
    pq.write_table(table, path, row_group_size=max(table.num_rows, 1), **PARQUET_OPTIONS)
    return path
