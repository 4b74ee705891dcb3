"""The dataset protocol, checked the same way for every registered kind (tiny instances of each)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repdissect.datasets import ConceptDataset, SyntheticWorld, create_dataset, export_broden, list_datasets


def _cub(root: Path) -> Path:
    (root / "parts").mkdir(parents=True)
    (root / "images" / "001.A").mkdir(parents=True)
    lines, boxes, locs = [], [], []
    for image_id in (1, 2, 3):
        rng = np.random.default_rng(image_id)
        pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / "001.A" / f"{image_id}.png")
        lines.append(f"{image_id} 001.A/{image_id}.png\n")
        boxes.append(f"{image_id} 2.0 3.0 30.0 20.0\n")
        locs += [f"{image_id} 1 10.0 10.0 1\n", f"{image_id} 2 0.0 0.0 0\n"]
    (root / "images.txt").write_text("".join(lines))
    (root / "bounding_boxes.txt").write_text("".join(boxes))
    (root / "parts" / "parts.txt").write_text("1 back\n2 left wing\n")
    (root / "parts" / "part_locs.txt").write_text("".join(locs))
    return root


def _folder(root: Path) -> Path:
    for k, name in enumerate(["a/x.png", "a/y.png", "b/z.png"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((10, 12, 3), 40 * k, np.uint8)).save(root / name)
    return root


def _params(kind: str, tmp: Path) -> dict:
    if kind == "synthetic":
        return {"images": 12, "size": 32, "seed": 4}
    if kind == "broden":
        return {"root": str(export_broden(SyntheticWorld(images=12, size=32, seg_scale=2), tmp / "broden"))}
    if kind == "cub":
        return {"root": str(_cub(tmp / "cub")), "size": 24}
    if kind == "imagefolder":
        return {"root": str(_folder(tmp / "folder")), "size": 16}
    raise AssertionError(f"add a tiny instance of the new kind {kind!r} here")


@pytest.fixture(params=list_datasets())
def dataset(request, tmp_path) -> tuple[ConceptDataset, dict]:
    params = _params(request.param, tmp_path)
    return create_dataset(request.param, **params), params


def test_all_kinds_are_registered():
    assert set(list_datasets()) >= {"synthetic", "broden", "cub", "imagefolder"}


def test_batches_follow_the_documented_layout(dataset):
    data, _ = dataset
    n = len(data)
    batch = data.load(np.arange(n))
    h, w = data.image_size
    sh, sw = data.seg_size
    assert batch.images.shape == (n, 3, h, w) and batch.images.dtype == np.uint8
    assert batch.index.tolist() == list(range(n)) and len(batch) == n
    labels = {c.label for c in data.concepts}
    for category, maps in batch.pixel_labels.items():
        assert maps.dtype == np.int32 and maps.ndim == 4 and maps.shape[0] == n and maps.shape[2:] == (sh, sw)
        assert set(np.unique(maps).tolist()) <= labels | {0}, category
    for category, values in batch.image_labels.items():
        assert values.dtype == np.int32 and values.ndim == 2 and values.shape[0] == n
        assert set(np.unique(values).tolist()) <= labels | {0}, category
    if data.landmark_names:
        assert batch.landmarks.shape == (n, len(data.landmark_names), 2) and batch.landmarks.dtype == np.float32
        assert batch.landmark_visible.shape == (n, len(data.landmark_names))
        assert batch.landmark_visible.dtype == bool and np.isfinite(batch.landmarks).all()
    if batch.class_label is not None:
        assert batch.class_label.dtype == np.int64
        assert ((batch.class_label >= -1) & (batch.class_label < max(len(data.class_names), 1))).all()


def test_concepts_are_sorted_unique_and_categorised(dataset):
    data, _ = dataset
    concepts = data.concepts
    labels = [c.label for c in concepts]
    assert labels == sorted(set(labels)) and all(label >= 1 for label in labels)
    assert len({c.name for c in concepts}) == len(concepts)
    assert {c.category for c in concepts} <= set(data.categories)


def test_loading_is_order_independent_and_survives_pickling(dataset):
    data, _ = dataset
    n = len(data)
    whole = data.load(np.arange(n))
    backwards = pickle.loads(pickle.dumps(data)).load(np.arange(n)[::-1])
    assert np.array_equal(backwards.images[::-1], whole.images)
    for category, maps in whole.pixel_labels.items():
        assert np.array_equal(backwards.pixel_labels[category][::-1], maps)
    if whole.landmarks is not None:
        assert np.array_equal(backwards.landmarks[::-1], whole.landmarks)


def test_digest_is_stable_and_describe_is_json(dataset):
    data, params = dataset
    again = create_dataset(data.kind, **params)
    assert data.digest() == again.digest() == pickle.loads(pickle.dumps(data)).digest()
    assert len(data.digest()) == 64 and int(data.digest(), 16) >= 0
    json.dumps(data.describe())


def test_shards_and_splits_partition_the_dataset(dataset):
    data, _ = dataset
    n = len(data)
    covered = [i for shard in data.shards(5) for i in shard]
    assert covered == list(range(n))
    train, val = data.split_indices("train"), data.split_indices("val")
    assert not set(train.tolist()) & set(val.tolist())
    assert set(train.tolist()) | set(val.tolist()) <= set(range(n))
