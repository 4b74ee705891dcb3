"""Training reads its splits in chunks (images and class labels only): same arrays as one whole-split load."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.datasets import create_dataset
from repdissect.stages import _training
from repdissect.stages._errors import StageInputError


class Unlabelled:
    """The synthetic world with every 3rd image unlabelled (−1) and optionally one label out of range."""

    def __init__(self, images: int, bad_index: int | None = None):
        self.inner = create_dataset("synthetic", images=images, size=16, seed=0)
        self.kind, self.image_size, self.bad_index = "unlabelled", self.inner.image_size, bad_index
        self.loads: list[int] = []

    def split_indices(self, split: str) -> np.ndarray:
        return self.inner.split_indices(split)

    def load(self, indices: np.ndarray):
        self.loads.append(len(indices))
        batch = self.inner.load(indices)
        labels = np.where(np.asarray(indices) % 3 == 0, -1, batch.class_label)
        if self.bad_index is not None:
            labels = np.where(np.asarray(indices) == self.bad_index, 99, labels)
        batch.class_label = labels
        return batch


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_split_equals_whole_split(monkeypatch, chunk):
    data = Unlabelled(90)
    indices = np.asarray(data.split_indices("train"), dtype=np.int64)
    whole = data.load(indices)
    keep = whole.class_label >= 0
    monkeypatch.setattr(_training, "_LOAD_CHUNK", chunk)
    data.loads.clear()
    got_indices, images, labels = _training._labelled_split(data, "train", num_classes=10)
    assert np.array_equal(got_indices, indices[keep])
    assert images.dtype == whole.images.dtype and images.flags.c_contiguous
    assert np.array_equal(images, whole.images[keep])
    assert np.array_equal(labels, whole.class_label[keep])
    assert max(data.loads) == min(chunk, len(indices))  # never more than a chunk at once


def test_out_of_range_label_is_reported_from_any_chunk(monkeypatch):
    data = Unlabelled(90, bad_index=int(Unlabelled(90).split_indices("train")[-1]))
    monkeypatch.setattr(_training, "_LOAD_CHUNK", 8)
    with pytest.raises(StageInputError, match="class label 99 is out of range"):
        _training._labelled_split(data, "train", num_classes=10)
