"""Extraction throughput vs a bare forward loop over the same in-memory images.

Ours (``extract+write``): what the ``extract`` stage does per shard — ``extract_shard`` (hooks on the
requested layers, per-unit summaries) writing every layer's activation rows to a Parquet part from a
background thread per layer (``write_parts``; atomic temp file, fsync, rename), while the next batches run
when a core is free for it (``--threads`` below the core count), else after extraction with the layers in
parallel (``--overlap`` forces either); then the summary tables written the same way. Baseline:
``model(batch)`` under ``torch.inference_mode`` for the same batches, nothing kept. Other rows: ``extract``
alone (no writes); ``extract, then write``: the same tables written one after the other once extraction is
done (the previous way; no fsync), whose write time is also shown alone; ``extract+ipc``: those tables as
Arrow IPC files instead (reference only, not the project format), to show how much of the cost is
Parquet's encoding of long lists. Wall and process-CPU times are both reported: overlapping hides write
time from the wall clock only where a core is free, while the CPU ratio counts all work; on a shared
machine the CPU ratios are the steadier ones. The images are generated once and held in memory so that
neither side pays for data generation. Target: overhead ≤ 15 %.

Run: ``python benchmarks/bench_extraction.py [--images 512] [--size 64] [--dtype float32] [--threads N]
[--architecture builtin:cnn] [--arch width=16 depth=4] [--layers conv2 conv3] [--overlap auto|on|off]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from repdissect.datasets import Batch, ConceptDataset
from repdissect.pipeline._store import AtomicParquetWriter, write_parquet_atomic
from repdissect.stages._extraction import PARQUET_OPTIONS, _spare_core, extract_shard, write_table
from repdissect.stages._models import ModelSpec, build_model, layer_shapes


class InMemory(ConceptDataset):
    """Pre-generated uint8 images served by index (the synthetic world when available, else noise)."""

    kind = "bench-in-memory"

    def __init__(self, images: int, size: int, seed: int = 0) -> None:
        try:
            from repdissect.datasets.synthetic import SyntheticWorld

            self.images = SyntheticWorld(images=images, size=size, seed=seed).load(np.arange(images)).images
            self.source = "synthetic world"
        except Exception:  # the synthetic world is optional for this benchmark
            self.images = np.random.default_rng(seed).integers(0, 256, (images, 3, size, size), dtype=np.uint8)
            self.source = "uniform noise"

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[-2:])

    @property
    def seg_size(self) -> tuple[int, int]:
        return self.image_size

    @property
    def concepts(self):
        return []

    def digest(self) -> str:
        return "bench"

    def load(self, indices: np.ndarray) -> Batch:
        return Batch(index=np.asarray(indices), images=self.images[indices])


class Clock:
    """Wall and process-CPU seconds of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bare_forward(model: torch.nn.Module, data: InMemory, batch_size: int) -> Clock:
    with Clock() as clock, torch.inference_mode():
        for first in range(0, len(data), batch_size):
            model(torch.from_numpy(data.load(np.arange(first, min(first + batch_size, len(data)))).images))
    return clock


def write_ipc(table: pa.Table, path: Path) -> Path:
    """Reference writer (not the project format): the same table as an uncompressed Arrow IPC file."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def extraction(model, layers, data, batch_size, dtype, out_dir: Path | None, mode: str = "none",
               overlap: bool | None = None) -> tuple[Clock, Clock, int]:
    """Clocks of one whole-dataset shard (extraction plus writes) and of the writes after extraction, bytes.

    ``mode``: ``none`` (no writes), ``stream`` (the extract stage's path: activation parts streamed during
    extraction, then summaries), ``parquet`` or ``ipc`` (every table written after extraction).
    """
    written = 0

    def open_part(layer: str, schema: pa.Schema) -> AtomicParquetWriter:
        return AtomicParquetWriter(out_dir / f"{layer}.parquet", schema, **PARQUET_OPTIONS)

    with Clock() as total:
        outputs = extract_shard(model, layers, data, np.arange(len(data)), batch_size=batch_size, device="cpu",
                                dtype=dtype, write_parts=open_part if mode == "stream" else None, overlap=overlap)
        with Clock() as write:
            if mode == "stream":
                for name, layer in outputs.items():
                    write_parquet_atomic(layer.summaries, out_dir / f"{name}-summaries.parquet")
            elif mode in ("parquet", "ipc"):
                writer = write_table if mode == "parquet" else write_ipc
                for name, layer in outputs.items():
                    writer(layer.activations, out_dir / f"{name}.part")
                    writer(layer.summaries, out_dir / f"{name}-summaries.part")
    if out_dir is not None:
        written = sum(f.stat().st_size for f in out_dir.iterdir())
        for f in out_dir.iterdir():
            f.unlink()
    return total, write, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--architecture", default="builtin:cnn")
    parser.add_argument("--arch", nargs="*", default=[], help="architecture keyword arguments, e.g. width=16 depth=4")
    parser.add_argument("--layers", nargs="*", help="default: every conv block of the built-in CNN")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                        help="extract+write: write during extraction (on), after it (off), or as the stage decides")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    overlap = {"auto": None, "on": True, "off": False}[args.overlap]
    resolved = _spare_core(torch.device("cpu")) if overlap is None else overlap

    data = InMemory(args.images, args.size)
    arch_kwargs = {key: int(value) for key, value in (item.split("=", 1) for item in args.arch)}
    model = build_model(ModelSpec(args.architecture, arch_kwargs=arch_kwargs), seed=0, num_classes=8)
    layers = args.layers or [name for name, _ in layer_shapes(model, data.image_size) if name.startswith("conv") and "." not in name]
    shapes = dict(layer_shapes(model, data.image_size))
    per_image = sum(int(np.prod(shapes[name])) for name in layers) * np.dtype(args.dtype).itemsize
    print(
        f"{args.architecture}, {args.images} images {args.size}×{args.size} ({data.source}), batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, layers {layers}, {per_image / 1e6:.2f} MB of {args.dtype} per image, "
        f"parquet {PARQUET_OPTIONS}, writes {'overlapped with' if resolved else 'after'} extraction ({args.overlap})"
    )

    bare_forward(model, data, args.batch_size)  # warm-up (allocator, oneDNN kernel selection)
    rows = {"bare": None, "extract": "none", "extract+write": "stream", "extract, then write": "parquet",
            "extract+ipc": "ipc"}
    timings: dict[str, list[Clock]] = {name: [] for name in [*rows, "write"]}
    written: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            # Interleaved, so background load affects every variant alike.
            for name, mode in rows.items():
                if mode is None:
                    timings[name].append(bare_forward(model, data, args.batch_size))
                    continue
                total, write, written[name] = extraction(model, layers, data, args.batch_size, args.dtype,
                                                         None if mode == "none" else Path(tmp), mode, overlap)
                timings[name].append(total)
                if mode == "parquet":
                    timings["write"].append(write)
    wall = {name: min(c.wall for c in clocks) for name, clocks in timings.items()}
    cpu = {name: min(c.cpu for c in clocks) for name, clocks in timings.items()}
    print(f"{'':>20}  {'wall s':>8} {'img/s':>8} {'ratio':>6} {'overhead':>9}   {'cpu s':>8} {'ratio':>6} {'overhead':>9}")
    for name in rows:
        print(
            f"{name:>20}  {wall[name]:8.3f} {args.images / wall[name]:8.1f} {wall[name] / wall['bare']:6.3f} "
            f"{100 * (wall[name] / wall['bare'] - 1):+8.1f}%   {cpu[name]:8.3f} {cpu[name] / cpu['bare']:6.3f} "
            f"{100 * (cpu[name] / cpu['bare'] - 1):+8.1f}%"
        )
    size = written["extract+write"]
    print(
        f"{'parquet files':>20}  {size / 1e6:.1f} MB ({size / args.images / 1e3:.1f} kB/image); written after "
        f"extraction they take {wall['write']:.3f} s wall, {cpu['write']:.3f} s cpu "
        f"({written['extract, then write'] / wall['write'] / 1e6:.0f} MB/s)"
    )

if __name__ == "__main__":
    main()
