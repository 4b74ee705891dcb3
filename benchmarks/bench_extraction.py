"""Extraction throughput vs a bare forward loop over the same in-memory images.

Ours: ``extract_shard`` (hooks on every conv block, per-unit summaries, Arrow tables) plus writing every
activation and summary table as Parquet. Baseline: ``model(batch)`` under ``torch.inference_mode`` for the
same batches, nothing kept. The images are generated once and held in memory so that neither side pays for
data generation; the ratio is the pure cost of extraction. Target: overhead ≤ 15 %.

Run: ``python benchmarks/bench_extraction.py [--images 512] [--size 64] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
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


def bare_forward(model: torch.nn.Module, data: InMemory, batch_size: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(data), batch_size):
            model(torch.from_numpy(data.load(np.arange(first, min(first + batch_size, len(data)))).images))
    return time.perf_counter() - start


def extraction(model, layers, data, batch_size, dtype, out_dir: Path | None) -> tuple[float, float, int]:
    """Seconds for extract_shard (+ Parquet writes when out_dir is given), write seconds, bytes written."""
    start = time.perf_counter()
    outputs = extract_shard(model, layers, data, np.arange(len(data)), batch_size=batch_size, device="cpu", dtype=dtype)
    extracted = time.perf_counter()
    written = 0
    if out_dir is not None:
        for name, layer in outputs.items():
            written += write_table(layer.activations, out_dir / f"{name}.parquet").stat().st_size
            written += write_table(layer.summaries, out_dir / f"{name}-summaries.parquet").stat().st_size
    end = time.perf_counter()
    return end - start, end - extracted, written


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
    timings: dict[str, list[float]] = {"bare": [], "extract": [], "extract+write": [], "write": []}
    written = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            # Interleaved, so background load affects every variant alike.
            timings["bare"].append(bare_forward(model, data, args.batch_size))
            timings["extract"].append(extraction(model, layers, data, args.batch_size, args.dtype, None)[0])
            total, write, written = extraction(model, layers, data, args.batch_size, args.dtype, Path(tmp))
            timings["extract+write"].append(total)
            timings["write"].append(write)
    best = {name: min(values) for name, values in timings.items()}
    base = best["bare"]
    for name in ("bare", "extract", "extract+write"):
        print(
            f"{name:>14}: {best[name]:7.3f} s  {args.images / best[name]:8.1f} img/s  "
            f"ratio {best[name] / base:5.3f}  overhead {100 * (best[name] / base - 1):+6.1f} %"
        )
    print(f"{'parquet write':>14}: {best['write']:7.3f} s  ({written / 1e6:.1f} MB on disk, {written / args.images / 1e3:.1f} kB/image)")


if __name__ == "__main__":
    main()
