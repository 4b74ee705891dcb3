"""Per-unit cards: exemplars with regions, guided backprop under the exemplar it explains, the AM image on the right;
read from the cache only, for every seed (with the parts that seed has)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import one_torch_thread, write_tiny_config  # noqa: F401  (autouse fixture)
from repdissect.reports._unitcards import UnitViews, _gb_tile, card_lines, unit_card_image

CELL, GAP = 8, 3


def _strip(k: int) -> Image.Image:
    return Image.new("RGB", (k * CELL + (k - 1) * GAP, CELL), (10, 20, 30))


def _map(value: float) -> np.ndarray:
    m = np.zeros((3, 4, 4), np.float32)
    m[0, 1, 2] = value
    return m


@pytest.mark.parametrize("images, am, gb, size, gb_cells", [
    # strip only: no AM image, no maps
    ([5, 6, 7], None, None, (3 * CELL + 2 * GAP, CELL), {}),
    # AM only: one row, the AM image as high as the strip, 9 px right of it
    ([5, 6, 7], np.full((4, 4, 3), 200, np.uint8), None, (3 * CELL + 2 * GAP + 9 + CELL, CELL), {}),
    # maps for exemplars 0 and 2 (by image id, whatever order the dict has); exemplar 1 blank; AM spans both rows
    ([5, 6, 7], np.full((4, 4, 3), 200, np.uint8), {7: _map(-2.0), 5: _map(1.0)},
     (3 * CELL + 2 * GAP + 9 + 2 * CELL + GAP, 2 * CELL + GAP), {0: 5, 2: 7}),
    # maps but no AM image
    ([9, 8], None, {8: _map(3.0)}, (2 * CELL + GAP, 2 * CELL + GAP), {1: 8}),
])
def test_card_layout(images, am, gb, size, gb_cells):
    card = np.asarray(unit_card_image(_strip(len(images)), images, am, gb))
    assert card.shape[:2] == size[::-1]
    assert (card[:CELL, :CELL] == (10, 20, 30)).all()  # the strip first
    for k in range(len(images) if gb else 0):
        x = k * (CELL + GAP)
        cell = card[CELL + GAP:2 * CELL + GAP, x:x + CELL]
        if k in gb_cells:
            np.testing.assert_array_equal(cell, np.asarray(_gb_tile(gb[gb_cells[k]], CELL)))
        else:
            assert (cell == (236, 238, 241)).all()  # blank: no map for this exemplar
    if am is not None:
        assert (card[:, -1] == 200).all()  # the AM image fills the right column's whole height


def test_gb_tile_is_signed_and_scaled_per_map():
    tile = np.asarray(_gb_tile(_map(-4.0), 4))
    assert tile[1, 2, 0] == 0 and tile[0, 0, 0] == 128  # −max → 0, zero → grey
    assert (np.asarray(_gb_tile(np.zeros((3, 4, 4)), 4)) == 128).all()


def test_card_lines():
    views = UnitViews(am={3: np.zeros((2, 2, 3), np.uint8)}, am_drive={3: 4.26}, gb={3: {11: _map(1.0)}})
    assert card_lines(3, views, [11, 12]) == ["right: activation maximisation, ×4.3 the dataset maximum",
                                              "bottom: guided backprop on 1 of the 2 exemplars"]
    assert card_lines(4, views, [11, 12]) == []


SECTION = """
[attribution]
enabled = true
layers = ["conv2"]
unit_methods = ["guided_backprop"]
class_methods = []
top_k = 3
units = [0, 1]
mass_images = 16
batch_size = 8
"""


def test_report_cards_from_a_run(tmp_path: Path):
    from repdissect.pipeline import run
    from repdissect.reports import write_run_report
    from repdissect.stages.attribution import maps_from_table

    path = write_tiny_config(tmp_path, layers=("conv2",), quantile=0.05, iou=0.0)
    path.write_text(path.read_text() + SECTION)
    result = run(path)
    write_run_report(result)
    out = tmp_path / "out"
    html = (out / "index.html").read_text()

    maps = dict((lab["layer"], e) for lab, e in result.entries("attribute") if lab["instance"] == "cnn@s0")["conv2"]
    table = maps.frame("unit_maps")
    search = dict(((lab["instance"], lab["layer"]), e) for lab, e in result.entries("dataset_search"))
    top = search[("cnn@s0", "conv2")].frame("top")
    for unit in (0, 1):
        card = np.asarray(Image.open(out / "units" / "cnn_s0" / "conv2" / f"unit_{unit:04d}.png"))
        cell = card.shape[0] // 2 - 1  # two rows of 96-px cells, 3 px apart
        assert card.shape[0] == 2 * cell + 3
        exemplars = top[top["unit"] == unit].sort_values("rank")["image"].to_numpy()[:5]
        rows = table[table["unit"] == unit]
        for k, image in enumerate(exemplars):
            hit = rows[rows["image"] == image]
            got = card[cell + 3:, k * (cell + 3):k * (cell + 3) + cell]
            if k < 3:  # [attribution].top_k = 3: the same top images, so a map under each of the first three
                assert len(hit) == 1
                np.testing.assert_array_equal(got, np.asarray(_gb_tile(maps_from_table(hit)[0], cell)))
            else:
                assert hit.empty and (got == (236, 238, 241)).all()
        assert "bottom: guided backprop on 3 of the 5 exemplars" in html
    # a unit without maps (units = [0, 1]) and the other seed (no AM, no attribution): one row, exemplars only
    other = np.asarray(Image.open(out / "units" / "cnn_s0" / "conv2" / "unit_0002.png"))
    seed1 = np.asarray(Image.open(out / "units" / "cnn_s1" / "conv2" / "unit_0000.png"))
    assert other.shape[0] == seed1.shape[0] == cell
    assert other.shape[1] > seed1.shape[1]  # the first seed's cards carry the AM image
    assert re.search(r"right: activation maximisation, ×[0-9.]+ the dataset maximum", html)
    assert "Bottom row: guided backprop" in html and "has no activation-maximisation images" in html
