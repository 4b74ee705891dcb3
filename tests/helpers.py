"""Test helpers shared across the suite (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from pathlib import Path


TINY = """
[run]
name = "tiny"
cache_dir = "{cache}"
out_dir = "{out}"

[dataset]
kind = "synthetic"
[dataset.params]
images = {images}
size = 32
seed = 0

[[models]]
name = "cnn"
architecture = "builtin:cnn"
seeds = [0, 1]
layers = [{layers}]
random_baseline = true
[models.arch]
width = 4
depth = 2
[models.train]
epochs = 1
batch_size = 32

[thresholds]
quantile = {quantile}
[iou]
threshold = {iou}
[stability]
top_k = 10
[compare]
alphas = [0.0, 0.05]
match_thresholds = [0.5]

[execution]
scheduler = "sync"
workers = 2
batch_size = 32
shard_size = {shard}
progress = false
"""


def write_tiny_config(directory: Path, *, images: int = 96, layers: tuple[str, ...] = ("conv2",),
                      quantile: float = 0.01, iou: float = 0.04, shard: int = 40, name: str = "tiny.toml") -> Path:
    """A config for a whole-DAG run of a few seconds; cache and outputs inside ``directory``."""
    path = directory / name
    path.write_text(TINY.format(cache=(directory / "cache").as_posix(), out=(directory / "out").as_posix(),
                                images=images, layers=", ".join(f'"{l}"' for l in layers), quantile=quantile,
                                iou=iou, shard=shard))
    return path

