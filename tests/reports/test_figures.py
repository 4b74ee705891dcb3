"""Figure helpers: every helper renders a non-trivial PNG at the report dpi; mask outlines are exact."""

import numpy as np
import pytest
from PIL import Image

from repdissect.reports import _figures as F


def _png_ok(path):
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
        assert im.info.get("dpi", (F.DPI, F.DPI))[0] == pytest.approx(F.DPI, abs=1)
    assert arr.shape[0] > 100 and arr.shape[1] > 100
    assert arr.std() > 5, "the figure is blank"
    return arr


def test_heatmap_stacked_curves_grouped(tmp_path):
    fig, axes = F.new_figure(7, 5, nrows=2, ncols=2)
    F.heatmap(axes[0, 0], np.array([[1.0, np.nan], [0.2, 0.5]]), xlabels=["a", "b"], ylabels=["c", "d"],
              annotate=True, colorbar_label="CKA", vmin=0, vmax=1)
    F.stacked_bars(axes[0, 1], ["conv1", "conv2"], ["object", "color"], np.array([[1, 2], [3, 4]]),
                   total_std=np.array([0.5, np.nan]))
    F.curves(axes[1, 0], [{"x": [0, 1, 2], "y": [1, 0.5, 0.2], "band": [0.1, 0.1, 0.1], "label": "s"}])
    F.grouped_bars(axes[1, 1], ["l1", "l2"], ["trained", "random"], np.array([[0.1, 0.2], [np.nan, 0.3]]),
                   stds=np.array([[0.01, np.nan], [0.0, 0.02]]))
    _png_ok(F.save_figure(fig, tmp_path / "panels.png"))


def test_mask_outline_is_the_inner_boundary():
    mask = np.zeros((7, 7), bool)
    mask[2:5, 2:5] = True
    edge = F.mask_outline(mask)
    assert edge.sum() == 8 and not edge[3, 3] and edge[2, 2]
    assert not F.mask_outline(np.zeros((4, 4), bool)).any()


def _exemplars(rows=2, k=3, size=16):
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(k)] for _ in range(rows)]
    masks = []
    for _ in range(rows):
        row = []
        for _ in range(k):
            m = np.zeros((size, size), bool)
            m[4:10, 5:12] = True
            row.append(m)
        masks.append(row)
    return images, masks


def test_exemplar_grid_draws_outline(tmp_path):
    images, masks = _exemplars()
    masks[1][2] = np.zeros_like(masks[1][2])  # a unit that never fires on an image: no contour, no crash
    fig = F.exemplar_grid(images, masks, row_labels=["unit 1\nsky", "unit 2\n<b>"], title="conv2",
                          col_labels=[["0.9", "0.8", "0.7"], ["0.5", "0.4", "0.3"]])
    arr = _png_ok(F.save_figure(fig, tmp_path / "grid.png"))
    yellow = (arr[..., 0] > 200) & (arr[..., 1] > 180) & (arr[..., 2] < 90)
    assert yellow.sum() > 50, "the region outline is missing"


def test_exemplar_strip_size_and_edge_colour():
    images, masks = _exemplars(rows=1, k=4)
    strip = F.exemplar_strip(images[0], masks[0], cell=48, gap=2)
    assert strip.size == (4 * 48 + 3 * 2, 48)
    arr = np.asarray(strip)
    assert ((arr == (255, 221, 0)).all(axis=-1)).sum() > 4 * 20
