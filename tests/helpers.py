"""Test helpers shared across the suite (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from pathlib import Path

import pytest


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

[visualise]
am_steps = 8
tsne_points = 60

[extract]
batch_size = 32

[execution]
scheduler = "sync"
workers = 2
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



# Process targets for multiprocessing tests: spawned children import them by module name, so they live in this
# importable module (``tests/`` is on the path) rather than in a test file.
KEY = "ab" + "0" * 62


def race_publisher(root: str, barrier, n: int) -> None:
    """Wait for every racer, then publish the same key."""
    import pyarrow as pa

    from repdissect.core import CacheStore

    barrier.wait()
    table = pa.table({"unit": list(range(n)), "value": [float(i) for i in range(n)]})
    CacheStore(root).publish("thresholds", KEY, {"result": table}, manifest={})


class NoCacheLocator:
    """A Numba cache locator that never finds a place: what a read-only install without a home looks like."""

    @classmethod
    def from_function(cls, py_func, source_path):
        return None


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Single-threaded torch for a test module (import it there): results do not depend on the thread count,
    and on a loaded machine threads slow the tests badly."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
