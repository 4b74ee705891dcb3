"""Extraction throughput vs a bare forward loop over the same in-memory images.

Ours: ``extract_shard`` (hooks on every conv block, per-unit summaries, Arrow tables) plus writing every
activation and summary table as Parquet. Baseline: ``model(batch)`` under ``torch.inference_mode`` for the
same batches, nothing kept. A reference row writes the same tables as Arrow IPC files instead, to show how
much of the cost is Parquet's encoding of long lists. Wall and process-CPU times are both reported; on a
shared machine the CPU ratios are the steadier ones. The images are generated once and held in memory so that neither side pays for
data generation; the ratio is the pure cost of extraction. Target: overhead ≤ 15 %.

Run: ``python benchmarks/bench_extraction.py [--images 512] [--size 64] [--dtype float32]``.
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
from repdissect.stages._extraction import PARQUET_OPTIONS, extract_shard, write_table
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


def extraction(model, layers, data, batch_size, dtype, out_dir: Path | None, writer=write_table) -> tuple[Clock, Clock, int]:
    """Clocks of extract_shard + writes (when out_dir is given) and of the writes alone, bytes written."""
    written = 0
    with Clock() as total:
        outputs = extract_shard(model, layers, data, np.arange(len(data)), batch_size=batch_size, device="cpu", dtype=dtype)
        with Clock() as write:
            if out_dir is not None:
                for name, layer in outputs.items():
                    written += writer(layer.activations, out_dir / f"{name}.part").stat().st_size
                    written += writer(layer.summaries, out_dir / f"{name}-summaries.part").stat().st_size
    return total, write, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--architecture", default="builtin:cnn")
    parser.add_argument("--layers", nargs="*", help="default: every conv block of the built-in CNN")
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = InMemory(args.images, args.size)
    model = build_model(ModelSpec(args.architecture), seed=0, num_classes=8)
    layers = args.layers or [name for name, _ in layer_shapes(model, data.image_size) if name.startswith("conv") and "." not in name]
    shapes = dict(layer_shapes(model, data.image_size))
    per_image = sum(int(np.prod(shapes[name])) for name in layers) * np.dtype(args.dtype).itemsize
    print(
        f"{args.architecture}, {args.images} images {args.size}×{args.size} ({data.source}), batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads, layers {layers}, {per_image / 1e6:.2f} MB of {args.dtype} per image, "
        f"parquet {PARQUET_OPTIONS}"
    )

    bare_forward(model, data, args.batch_size)  # warm-up (allocator, oneDNN kernel selection)
    timings: dict[str, list[Clock]] = {"bare": [], "extract": [], "extract+write": [], "write": [], "extract+ipc": []}
    written = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            # Interleaved, so background load affects every variant alike.
            timings["bare"].append(bare_forward(model, data, args.batch_size))
            timings["extract"].append(extraction(model, layers, data, args.batch_size, args.dtype, None)[0])
            total, write, written = extraction(model, layers, data, args.batch_size, args.dtype, Path(tmp))
            timings["extract+write"].append(total)
            timings["write"].append(write)
            timings["extract+ipc"].append(extraction(model, layers, data, args.batch_size, args.dtype, Path(tmp), write_ipc)[0])
    wall = {name: min(c.wall for c in clocks) for name, clocks in timings.items()}
    cpu = {name: min(c.cpu for c in clocks) for name, clocks in timings.items()}
    print(f"{'':>14}  {'wall s':>8} {'img/s':>8} {'ratio':>6} {'overhead':>9}   {'cpu s':>8} {'ratio':>6} {'overhead':>9}")
    for name in ("bare", "extract", "extract+write", "extract+ipc"):
        print(
            f"{name:>14}  {wall[name]:8.3f} {args.images / wall[name]:8.1f} {wall[name] / wall['bare']:6.3f} "
            f"{100 * (wall[name] / wall['bare'] - 1):+8.1f}%   {cpu[name]:8.3f} {cpu[name] / cpu['bare']:6.3f} "
            f"{100 * (cpu[name] / cpu['bare'] - 1):+8.1f}%"
        )
    print(
        f"{'parquet write':>14}  {wall['write']:8.3f} s wall, {cpu['write']:.3f} s cpu, {written / 1e6:.1f} MB "
        f"({written / args.images / 1e3:.1f} kB/image); extract+ipc writes the same tables as Arrow IPC files "
        "(reference only, not the project format)"
    )


if __name__ == "__main__":
    main()
