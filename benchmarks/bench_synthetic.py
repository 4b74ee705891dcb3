"""Benchmark: images/s of the procedural world vs a naive per-image PIL drawing loop (plus Broden I/O).

The baseline draws comparable content one image at a time with Pillow — background, a rotated polygon
object with a striped fill, two distractors, the object/colour/material/part masks (rim by erosion) and
pixel noise — which is how such generators are usually written. Ours renders whole batches with numpy.
Also timed: exporting the world to Broden layout and reading it back with the Broden loader.

Usage::

    python benchmarks/bench_synthetic.py [--images 1000] [--size 64] [--batch 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from repdissect.datasets import BrodenDataset, SyntheticWorld, export_broden


def naive_pil_world(count: int, size: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One image at a time with ImageDraw: returns (image, stacked label maps) per item."""
    out = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        background = tuple(int(v) for v in rng.integers(0, 256, 3))
        image = Image.new("RGB", (size, size), background)
        object_mask = Image.new("L", (size, size), 0)
        material_mask = Image.new("L", (size, size), 0)
        for slot in range(3):  # main object + two distractors
            radius = size * (rng.uniform(0.17, 0.30) if slot == 0 else rng.uniform(0.07, 0.12))
            cx, cy = rng.uniform(0.3, 0.7, 2) * size
            sides = int(rng.integers(3, 8))
            angles = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(sides) / sides
            polygon = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            stripe = tuple(int(v) for v in rng.integers(0, 256, 3))
            shape = Image.new("L", (size, size), 0)
            ImageDraw.Draw(shape).polygon(polygon, fill=255)
            pattern = Image.new("RGB", (size, size), fill)
            draw = ImageDraw.Draw(pattern)
            period = int(rng.integers(5, 9))
            for offset in range(-size, 2 * size, period):
                draw.line([(offset, 0), (offset + size, size)], fill=stripe, width=max(1, period // 2))
            image.paste(pattern, (0, 0), shape)
            object_mask.paste(slot + 1, (0, 0), shape)
            material_mask.paste(1 + slot % 4, (0, 0), shape)
        core = object_mask.filter(ImageFilter.MinFilter(3))
        pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 5, (size, size, 3))
        labels = np.stack([np.asarray(object_mask), np.asarray(material_mask), np.asarray(core)])
        colors = np.asarray(image.convert("P", palette=Image.Palette.ADAPTIVE, colors=11))
        out.append((np.clip(pixels, 0, 255).astype(np.uint8), np.concatenate([labels, colors[None]])))
    return out


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-broden", action="store_true", help="skip the export/load timings")
    args = parser.parse_args()

    world = SyntheticWorld(images=args.images, size=args.size, seed=0)
    shards = world.shards(args.batch)
    world.load(np.arange(min(8, args.images)))  # warm-up (imports, caches)

    ours = best_of(args.repeats, lambda: [world.load(np.arange(s.start, s.stop)) for s in shards])
    baseline_count = min(args.images, 400)
    baseline = best_of(args.repeats, lambda: naive_pil_world(baseline_count, args.size, 0))
    ours_rate, baseline_rate = args.images / ours, baseline_count / baseline
    print(f"synthetic world  {args.images} images {args.size}×{args.size}, batch {args.batch}, best of {args.repeats}")
    print(f"  ours (vectorised numpy)     {ours_rate:9.0f} images/s")
    print(f"  baseline (per-image PIL)    {baseline_rate:9.0f} images/s   ({baseline_count} images)")
    print(f"  speed-up                    {ours_rate / baseline_rate:9.2f}×")
    concepts = world.concepts
    by_category = {c: sum(k.category == c for k in concepts) for c in world.categories}
    print(f"  concepts: {len(concepts)} {by_category}; classes {len(world.class_names)}; "
          f"landmarks {len(world.landmark_names)}")

    if args.skip_broden:
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = export_broden(world, Path(tmp) / "broden", batch_size=args.batch)
        export_time = time.perf_counter() - start
        loaded = BrodenDataset(root)
        start = time.perf_counter()
        for s in loaded.shards(args.batch):
            loaded.load(np.arange(s.start, s.stop))
        load_time = time.perf_counter() - start
    print(f"broden export     {args.images / export_time:9.0f} images/s")
    print(f"broden load       {args.images / load_time:9.0f} images/s   (vs generating: "
          f"{(args.images / load_time) / ours_rate:.2f}×)")


if __name__ == "__main__":
    main()
