"""Extraction throughput vs a bare forward loop over the same in-memory images.

Ours (``extract+write``): what the ``extract`` stage does per shard — ``extract_shard`` (hooks on the
requested layers, per-unit summaries) writing every layer's activation rows to a Parquet part from a
background thread per layer (``write_parts``; atomic temp file, fsync, rename), while the next batches run
when a core is free for it (``--threads`` below the core count), else after extraction with the layers in
parallel (``--overlap`` forces either); then the summary tables. The stage encodes with polars when it is
installed. Baseline: ``model(batch)`` under ``torch.inference_mode`` for the same batches, nothing kept.
Other rows: ``extract`` alone (no writes); ``extract+write pyarrow``: the same path with pyarrow's
encoder; ``extract+raw bytes``: every buffer written as raw bytes and fsynced, all layers at once, after
extraction — no format can persist the activations for less on this disk, so this row is the floor for
any model whose activations outweigh its compute. Wall and process-CPU times (all threads) are both
reported: overlapping hides write time from the wall clock only where a core is free, while the CPU ratio
counts all work; on a shared machine the CPU ratios are the steadier ones. The images are generated once
and held in memory so that neither side pays for data generation. Target: overhead ≤ 15 %.

Run: ``python benchmarks/bench_extraction.py [--images 512] [--size 64] [--dtype float32] [--threads N]
[--architecture builtin:cnn] [--arch width=16 depth=4] [--layers conv2 conv3] [--overlap auto|on|off]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from repdissect.datasets import Batch, ConceptDataset
from repdissect.core import open_part_writer, parquet_engine
from repdissect.core import write_parquet_atomic
from repdissect.stages._activations import table_to_arrays
from repdissect.stages._extraction import PARQUET_OPTIONS, _spare_core, extract_shard
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


def write_raw(array: np.ndarray, path: Path) -> None:
    """The floor of any persistent format: the buffer's bytes as they are, fsynced (no encoding at all)."""
    with open(path, "wb") as fh:
        array.tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())


def extraction(model, layers, data, batch_size, dtype, out_dir: Path | None, mode: str = "none",
               overlap: bool | None = None) -> tuple[Clock, int]:
    """Clock of one whole-dataset shard (extraction plus writes), and the bytes written.

    ``mode``: ``none`` (no writes); ``polars`` or ``pyarrow`` (the extract stage's path with that Parquet
    encoder: activation parts streamed during extraction, then the summaries); ``raw`` (every activation
    and summary buffer written as raw bytes after extraction, all layers at once: the floor of any
    format).
    """
    def open_part(layer: str, schema: pa.Schema, *, row_group_size: int):
        return open_part_writer(out_dir / f"{layer}.parquet", schema, engine=mode, row_group_size=row_group_size,
                                **PARQUET_OPTIONS)

    streamed = mode in ("polars", "pyarrow")
    with Clock() as total:
        outputs = extract_shard(model, layers, data, np.arange(len(data)), batch_size=batch_size, device="cpu",
                                dtype=dtype, write_parts=open_part if streamed else None, overlap=overlap)
        if streamed:
            for name, layer in outputs.items():
                write_parquet_atomic(layer.summaries, out_dir / f"{name}-summaries.parquet")
        elif mode == "raw":
            def dump(name: str, layer) -> None:
                write_raw(table_to_arrays(layer.activations)[1], out_dir / f"{name}.bin")
                for column_name, column in zip(layer.summaries.column_names, layer.summaries.columns):
                    values = column.combine_chunks()
                    values = values.flatten() if pa.types.is_fixed_size_list(values.type) else values
                    write_raw(values.to_numpy(), out_dir / f"{name}-{column_name}.bin")

            with ThreadPoolExecutor(len(outputs)) as pool:  # every layer at once, like the stage's writers
                list(pool.map(dump, outputs, outputs.values()))
    written = 0
    if out_dir is not None:
        written = sum(f.stat().st_size for f in out_dir.iterdir())
        for f in out_dir.iterdir():
            f.unlink()
    return total, written


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
    rows = {"bare": None, "extract": "none", "extract+write": parquet_engine("auto"),
            "extract+write pyarrow": "pyarrow", "extract+raw bytes": "raw"}
    if rows["extract+write"] == "pyarrow":
        print("(polars >= 2.1 is not installed: the stage writes with pyarrow)")
        del rows["extract+write pyarrow"]
    timings: dict[str, list[Clock]] = {name: [] for name in rows}
    written: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            # Interleaved, so background load affects every variant alike.
            for name, mode in rows.items():
                if mode is None:
                    timings[name].append(bare_forward(model, data, args.batch_size))
                    continue
                total, written[name] = extraction(model, layers, data, args.batch_size, args.dtype,
                                                  None if mode == "none" else Path(tmp), mode, overlap)
                timings[name].append(total)
    wall = {name: min(c.wall for c in clocks) for name, clocks in timings.items()}
    cpu = {name: min(c.cpu for c in clocks) for name, clocks in timings.items()}
    print(f"{'':>22}  {'wall s':>8} {'img/s':>8} {'ratio':>6} {'overhead':>9}   {'cpu s':>8} {'ratio':>6} {'overhead':>9}")
    for name in rows:
        print(
            f"{name:>22}  {wall[name]:8.3f} {args.images / wall[name]:8.1f} {wall[name] / wall['bare']:6.3f} "
            f"{100 * (wall[name] / wall['bare'] - 1):+8.1f}%   {cpu[name]:8.3f} {cpu[name] / cpu['bare']:6.3f} "
            f"{100 * (cpu[name] / cpu['bare'] - 1):+8.1f}%"
        )
    size, raw = written["extract+write"], written["extract+raw bytes"]
    print(f"{'parquet files':>22}  {size / 1e6:.1f} MB ({size / args.images / 1e3:.1f} kB/image); raw bytes "
          f"{raw / 1e6:.1f} MB, written and fsynced at {raw / max(wall['extract+raw bytes'] - wall['extract'], 1e-9) / 1e6:.0f} MB/s wall")
    if "extract+write pyarrow" in rows:
        print(f"{'polars vs pyarrow':>22}  {cpu['extract+write pyarrow'] / cpu['extract+write']:.2f}× less CPU, "
              f"{wall['extract+write pyarrow'] / wall['extract+write']:.2f}× less wall for extract+write")


if __name__ == "__main__":
    main()
