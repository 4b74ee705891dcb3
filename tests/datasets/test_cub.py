"""CUB-200-2011 landmarks: bounding-box crop, landmark rescaling, visibility, splits and error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from repdissect.datasets import CUBDataset, DatasetError, create_dataset

# image id: (relative path, (width, height), box (x, y, w, h), class id, is_train)
IMAGES = {
    1: ("001.Albatross/a.jpg", (40, 30), (5.0, 4.0, 20.0, 16.0), 1, 1),
    2: ("002.Auklet/b.png", (50, 50), (10.0, 10.0, 25.0, 25.0), 2, 0),
    3: ("001.Albatross/c.png", (36, 28), (0.0, 0.0, 36.0, 28.0), 1, 1),
}
PARTS = {1: "back", 2: "beak", 3: "left eye", 4: "tail"}
# (image id, part id): (x, y, visible) — pixel-centre coordinates of markers in the original image
LOCS = {
    (1, 1): (10.5, 8.5, 1), (1, 2): (20.5, 14.5, 1), (1, 3): (0.0, 0.0, 0), (1, 4): (35.5, 25.5, 1),  # tail off-box
    (2, 1): (12.5, 30.5, 1), (2, 2): (30.5, 12.5, 1), (2, 3): (22.5, 22.5, 1), (2, 4): (0.0, 0.0, 0),
    (3, 1): (5.5, 5.5, 1), (3, 2): (30.5, 20.5, 1), (3, 3): (18.5, 14.5, 1), (3, 4): (2.5, 25.5, 1),
}


def write_cub(root: Path) -> Path:
    (root / "parts").mkdir(parents=True)
    for image_id, (rel, (w, h), _, _, _) in IMAGES.items():
        pixels = np.full((h, w, 3), 40, np.uint8)
        for (iid, _), (x, y, visible) in LOCS.items():
            if iid == image_id and visible:
                pixels[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 255  # 3×3 marker on the landmark
        path = root / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=100) if rel.endswith(".jpg") else Image.fromarray(pixels).save(path)
    (root / "images.txt").write_text("".join(f"{i} {v[0]}\n" for i, v in IMAGES.items()))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {' '.join(map(str, v[2]))}\n" for i, v in IMAGES.items()))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {v[3]}\n" for i, v in IMAGES.items()))
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    (root / "train_test_split.txt").write_text("".join(f"{i} {v[4]}\n" for i, v in IMAGES.items()))
    (root / "parts" / "parts.txt").write_text("".join(f"{k} {v}\n" for k, v in PARTS.items()))
    (root / "parts" / "part_locs.txt").write_text(
        "".join(f"{i} {p} {x} {y} {v}\n" for (i, p), (x, y, v) in LOCS.items())
    )
    return root


@pytest.fixture
def cub_root(tmp_path) -> Path:
    return write_cub(tmp_path / "CUB_200_2011")


def test_crop_rescales_landmarks_with_the_image(cub_root):
    data = CUBDataset(cub_root, size=32)
    assert len(data) == 3 and data.image_size == (32, 32)
    assert data.landmark_names == ["back", "beak", "left eye", "tail"]
    batch = data.load(np.arange(3))
    assert batch.images.shape == (3, 3, 32, 32) and not batch.pixel_labels
    for k, image_id in enumerate(data.image_ids):
        x, y, w, h = IMAGES[int(image_id)][2]
        for p in range(4):
            lx, ly, visible = LOCS[(int(image_id), p + 1)]
            expected = ((lx - x) * 32 / w, (ly - y) * 32 / h)
            assert np.allclose(batch.landmarks[k, p], expected, atol=1e-4)
            inside = 0 <= expected[0] < 32 and 0 <= expected[1] < 32
            assert batch.landmark_visible[k, p] == (visible == 1 and inside)
            if batch.landmark_visible[k, p]:
                # The marker drawn at the landmark lands under the rescaled landmark.
                px, py = int(expected[0]), int(expected[1])
                assert batch.images[k, :, py, px].min() > 150, (image_id, p)
    assert not batch.landmark_visible[0, 3]  # the tail of image 1 lies outside its box
    assert batch.images[:, :, :, :].min() < 60  # background stays dark


def test_uncropped_mode_scales_the_whole_image(cub_root):
    batch = CUBDataset(cub_root, size=40, crop=False).load(np.array([1]))
    assert np.allclose(batch.landmarks[0, 0], (12.5 * 40 / 50, 30.5 * 40 / 50))
    assert batch.landmark_visible[0].tolist() == [True, True, True, False]


def test_parts_selection_classes_and_split(cub_root):
    by_id = CUBDataset(cub_root, size=16, parts="1,4")
    by_name = CUBDataset(cub_root, size=16, parts=["back", "Tail"])
    assert by_id.landmark_names == by_name.landmark_names == ["back", "tail"]
    assert np.array_equal(by_id.load(np.arange(3)).landmarks, by_name.load(np.arange(3)).landmarks)
    assert by_id.digest() == by_name.digest() != CUBDataset(cub_root, size=16).digest()
    data = create_dataset("cub", root=str(cub_root), size=16)
    assert data.class_names == ["001.Albatross", "002.Auklet"]
    assert data.load(np.arange(3)).class_label.tolist() == [0, 1, 0]
    assert data.split_indices("train").tolist() == [0, 2] and data.split_indices("val").tolist() == [1]


def test_optional_files_may_be_absent(cub_root):
    for name in ("image_class_labels.txt", "classes.txt", "train_test_split.txt"):
        (cub_root / name).unlink()
    data = CUBDataset(cub_root, size=16)
    assert data.class_names == [] and data.load(np.arange(3)).class_label.tolist() == [-1, -1, -1]
    assert len(data.split_indices("train")) + len(data.split_indices("val")) == 3


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


ERRORS = [
    (lambda r: _replace(r / "parts" / "part_locs.txt", "1 2 20.5 14.5 1", "1 2 20.5 1"), False,
     ["part_locs.txt, line 2", "expected 5 fields"]),
    (lambda r: _replace(r / "parts" / "part_locs.txt", "1 2 20.5 14.5 1", "1 2 20.5 y 1"), False,
     ["part_locs.txt, line 2", "'y'"]),
    (lambda r: _replace(r / "parts" / "part_locs.txt", "1 2 20.5 14.5 1", "1 2 20.5 14.5 2"), False,
     ["part_locs.txt, line 2", "visible flag"]),
    (lambda r: _replace(r / "parts" / "part_locs.txt", "1 2 20.5 14.5 1", "9 2 20.5 14.5 1"), False,
     ["part_locs.txt, line 2", "image id 9"]),
    (lambda r: _replace(r / "parts" / "part_locs.txt", "1 2 20.5 14.5 1", "1 7 20.5 14.5 1"), False,
     ["part_locs.txt, line 2", "part id 7"]),
    (lambda r: _replace(r / "bounding_boxes.txt", "2 10.0 10.0 25.0 25.0\n", ""), False,
     ["bounding_boxes.txt", "image id 2"]),
    (lambda r: _replace(r / "bounding_boxes.txt", "25.0 25.0", "0 25.0"), False,
     ["bounding_boxes.txt, line 2", "non-positive"]),
    (lambda r: _replace(r / "images.txt", "002.Auklet/b.png", "002.Auklet/gone.png"), True,
     ["images.txt, line 2", "does not exist"]),
    (lambda r: _replace(r / "images.txt", "002.Auklet/b.png", "../../secret.png"), True,
     ["images.txt, line 2", "escapes"]),
    (lambda r: (r / "images" / "002.Auklet" / "b.png").write_bytes(b"garbage"), True,
     ["images.txt, line 2", "cannot decode"]),
    (lambda r: (r / "parts" / "parts.txt").unlink(), False, ["parts.txt", "missing"]),
]


@pytest.mark.parametrize("mutate, needs_load, fragments", ERRORS, ids=[
    "short-line", "non-numeric", "bad-visible", "unknown-image", "unknown-part", "missing-box", "empty-box",
    "missing-image", "escaping-path", "corrupt-image", "missing-parts-file",
])
def test_errors_name_the_file_and_line(cub_root, mutate, needs_load, fragments):
    mutate(cub_root)
    with pytest.raises(DatasetError) as info:
        data = CUBDataset(cub_root, size=16)
        assert needs_load, "construction should have failed"
        data.load(np.arange(len(data)))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize(
    "params, fragment",
    [({"parts": "wing"}, "'wing' is not a part"), ({"size": 0}, "size=0"), ({"crop": "yes"}, "crop")],
)
def test_bad_parameters(cub_root, params, fragment):
    with pytest.raises(DatasetError, match=fragment):
        CUBDataset(cub_root, **params)
