"""Plain image folders: class labels from folder names, resizing policies, digest, error paths."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repdissect.datasets import DatasetError, ImageFolderDataset, create_dataset


def _save(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    _save(root / "cat" / "a.png", np.full((8, 8, 3), 10, np.uint8))
    _save(root / "cat" / "sub" / "b.png", np.full((12, 10, 3), 20, np.uint8))
    striped = np.zeros((8, 16, 3), np.uint8)
    striped[:, :4] = (255, 0, 0)
    striped[:, 4:12] = (0, 0, 255)
    striped[:, 12:] = (255, 0, 0)
    _save(root / "dog" / "c.png", striped)
    _save(root / "dog" / ".hidden.png", np.zeros((8, 8, 3), np.uint8))
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


def test_classes_from_folder_names_and_resize(folder):
    data = ImageFolderDataset(folder, size=8)
    assert data.class_names == ["cat", "dog"]
    assert data.files == ["cat/a.png", "cat/sub/b.png", "dog/c.png"]
    batch = data.load(np.arange(3))
    assert batch.images.shape == (3, 3, 8, 8) and batch.class_label.tolist() == [0, 0, 1]
    assert (batch.images[1] == 20).all()
    assert data.concepts == [] and not batch.pixel_labels and batch.landmarks is None


def test_crop_keeps_the_centre_and_reject_refuses_other_sizes(folder):
    cropped = ImageFolderDataset(folder, size=8, resize="crop").load(np.array([2])).images[0]
    assert (cropped[2] > 200).all() and (cropped[0] < 50).all()  # only the blue centre survives
    stretched = ImageFolderDataset(folder, size=8, resize="resize").load(np.array([2])).images[0]
    assert stretched[0, :, 0].max() > 200  # red edges squeezed in
    strict = ImageFolderDataset(folder, size=8, resize="reject")
    assert strict.load(np.array([0])).images.shape == (1, 3, 8, 8)
    with pytest.raises(DatasetError, match=r"b\.png: image is 12×10, expected 8×8"):
        strict.load(np.array([1]))


def test_digest_tracks_the_file_list(folder):
    first = create_dataset("imagefolder", root=str(folder), size=8)
    assert first.digest() == ImageFolderDataset(folder, size=8).digest()
    assert first.digest() != ImageFolderDataset(folder, size=[8, 6]).digest()
    _save(folder / "dog" / "d.png", np.zeros((8, 8, 3), np.uint8))
    assert ImageFolderDataset(folder, size=8).digest() != first.digest()


def test_errors(folder, tmp_path):
    (folder / "cat" / "a.png").write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"a\.png.*cannot decode"):
        ImageFolderDataset(folder, size=8).load(np.array([0]))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images found"):
        ImageFolderDataset(tmp_path / "empty")
    _save(tmp_path / "outside.png", np.zeros((4, 4, 3), np.uint8))
    os.symlink(tmp_path / "outside.png", folder / "dog" / "link.png")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        ImageFolderDataset(folder)
    with pytest.raises(DatasetError, match="resize='squash'"):
        ImageFolderDataset(folder, resize="squash")
    with pytest.raises(DatasetError, match="size=0"):
        ImageFolderDataset(folder, size=0)
