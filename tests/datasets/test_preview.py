"""Contact sheets and the CLI helper functions (export / preview)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from repdissect.datasets import (
    Batch,
    BrodenDataset,
    ConceptDataset,
    DatasetError,
    SyntheticWorld,
    contact_sheet,
    export_command,
    preview_command,
)
from repdissect.datasets.preview import overlay_category


def test_contact_sheet_shows_images_and_part_overlays(tmp_path):
    world = SyntheticWorld(images=10, size=32, seed=2)
    out = contact_sheet(world, tmp_path / "sheet.png", n=6, columns=3, scale=4)
    sheet = np.asarray(Image.open(out).convert("RGB"))
    panel, gap = 32 * 4, 6
    assert sheet.shape[1] == 3 * (2 * panel + gap + gap) + gap
    # First tile: the left panel is the image itself, upscaled by nearest neighbour.
    image = world.load(np.array([0])).images[0].transpose(1, 2, 0)
    left = sheet[gap : gap + panel, gap : gap + panel]
    assert np.array_equal(left[::4, ::4], image)
    # The right panel differs from the image (greyed + painted parts) but is not blank.
    right = sheet[gap : gap + panel, 2 * gap + panel : 2 * gap + 2 * panel].astype(int)
    assert np.abs(right[::4, ::4] - image).mean() > 20 and right.std() > 10
    assert overlay_category(world) == "part"


class _LandmarksOnly(ConceptDataset):
    """Four grey images with two landmarks each, no masks (like CUB)."""

    kind = "landmarks-only"

    def __len__(self):
        return 4

    image_size = seg_size = property(lambda self: (20, 20))
    concepts = property(lambda self: [])
    landmark_names = property(lambda self: ["head", "tail"])

    def digest(self):
        return "fixed"

    def load(self, indices):
        n = len(indices)
        landmarks = np.tile(np.array([[5.5, 5.5], [30.0, 10.0]], np.float32), (n, 1, 1))  # tail off the image
        return Batch(index=np.asarray(indices), images=np.full((n, 3, 20, 20), 90, np.uint8),
                     landmarks=landmarks, landmark_visible=np.tile([True, False], (n, 1)))


def test_contact_sheet_works_without_masks(tmp_path):
    data = _LandmarksOnly()
    assert overlay_category(data) is None
    sheet = np.asarray(Image.open(contact_sheet(data, tmp_path / "lm.png", n=4, columns=2, scale=5)).convert("RGB"))
    gap, panel = 6, 100
    right = sheet[gap : gap + panel, 2 * gap + panel : 2 * gap + 2 * panel]
    assert np.array_equal(right[27, 27], [255, 40, 40])  # the visible 'head' dot at (5.5, 5.5) · 5


def test_export_command_writes_a_loadable_broden_folder(tmp_path):
    out = export_command("synthetic", "broden", tmp_path / "exported", images=12, size=32, seed=3)
    loaded = BrodenDataset(out)
    world = SyntheticWorld(images=12, size=32, seed=3)
    assert len(loaded) == 12
    assert np.array_equal(loaded.load(np.arange(12)).images, world.load(np.arange(12)).images)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("broden", "broden"), "--kind 'broden'"),
        (("synthetic", "coco"), "--format 'coco'"),
    ],
)
def test_export_command_rejects_unknown_kind_or_format(tmp_path, args, fragment):
    with pytest.raises(DatasetError, match=fragment):
        export_command(*args, tmp_path / "x", images=2, size=32, seed=0)


def test_export_command_validates_generator_parameters(tmp_path):
    with pytest.raises(DatasetError, match="images=0"):
        export_command("synthetic", "broden", tmp_path / "x", images=0, size=32, seed=0)


def test_preview_command(tmp_path):
    world = SyntheticWorld(images=4, size=32)
    assert preview_command(world, tmp_path / "p.png", 4).is_file()
    with pytest.raises(DatasetError, match="--n 0"):
        preview_command(world, tmp_path / "p.png", 0)
    with pytest.raises(DatasetError, match=".png"):
        preview_command(world, tmp_path / "p.jpg", 2)
