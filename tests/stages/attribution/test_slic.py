"""SLIC superpixels for LIME: coverage, count, connectivity, determinism, boundary adherence vs the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

from repdissect.stages import StageInputError
from repdissect.stages.attribution import grid_segments, lime, lime_segments, slic_segments


def _piecewise(seed: int, h: int = 64, w: int = 64, rects: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rectangles of random colour (+ a little noise) and the true region of every pixel."""
    g = torch.Generator().manual_seed(seed)
    img, truth = torch.zeros(3, h, w), torch.zeros(h, w, dtype=torch.long)
    for r in range(1, rects + 1):
        y0, x0 = torch.randint(0, h - 8, (2,), generator=g).tolist()
        hh, ww = torch.randint(6, 28, (2,), generator=g).tolist()
        img[:, y0:y0 + hh, x0:x0 + ww] = torch.rand(3, 1, 1, generator=g)
        truth[y0:y0 + hh, x0:x0 + ww] = r
    return img + 0.05 * torch.randn(3, h, w, generator=g), truth


def _purity(seg: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of pixels lying in their segment's majority true region (1 = no segment straddles a boundary)."""
    return sum(int(torch.bincount(truth[seg == s]).max()) for s in seg.unique()) / truth.numel()


IMAGES = [
    ("piecewise", _piecewise(0)[0]),
    ("noise", torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(1))),
    ("ramp", torch.linspace(0, 1, 64).repeat(3, 64, 1)),
    ("constant", torch.full((3, 32, 32), 0.5)),
]


@pytest.mark.parametrize("name,image", IMAGES, ids=[n for n, _ in IMAGES])
@pytest.mark.parametrize("n", [9, 49])
def test_segments_cover_the_image_connected_and_near_the_requested_count(name, image, n) -> None:
    seg = slic_segments(image, n)
    assert seg.shape == image.shape[1:] and seg.dtype == torch.int64
    count = int(seg.max()) + 1
    assert sorted(seg.unique().tolist()) == list(range(count))  # every pixel labelled, labels 0..S'-1
    assert 0.7 * n <= count <= 1.3 * n, (name, n, count)
    for s in range(count):  # each segment one 4-connected piece
        assert ndimage.label((seg == s).numpy())[1] == 1
    torch.testing.assert_close(slic_segments(image, n), seg, rtol=0, atol=0)  # deterministic


def test_slic_follows_region_boundaries_better_than_a_grid() -> None:
    for seed in range(3):
        image, truth = _piecewise(seed)
        slic, grid = slic_segments(image, 49), grid_segments(64, 64, 8)  # 49 vs 64 segments: the grid has more
        assert _purity(slic, truth) > 0.93
        assert _purity(slic, truth) > _purity(grid, truth) + 0.15


def test_compactness_trades_colour_for_shape() -> None:
    image, truth = _piecewise(1)
    loose, square = slic_segments(image, 49, compactness=1.0), slic_segments(image, 49, compactness=20.0)
    assert _purity(loose, truth) > _purity(square, truth)


def test_scale_of_the_input_does_not_matter_much() -> None:
    image, _ = _piecewise(2)
    a, b = slic_segments(image, 36), slic_segments(image * 255.0 - 7.0, 36)
    assert (a == b).float().mean() > 0.99


def test_lime_selects_the_segmentation_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    x = torch.stack([_piecewise(s, 24, 24, 4)[0] for s in (3, 4)]).double()
    segs = lime_segments(x, "slic", n_segments=12)
    assert segs.shape == (2, 24, 24) and not torch.equal(segs[0], segs[1])
    by_name = lime(model, x, 1, segmentation="slic", n_segments=12, samples=32, seed=1)
    given = lime(model, x, 1, segments=segs, samples=32, seed=1)
    torch.testing.assert_close(by_name, given, rtol=0, atol=0)
    for i in range(2):  # the map is constant on every superpixel
        for s in segs[i].unique():
            assert by_name[i][segs[i] == s].unique().numel() == 1
    grid = lime(model, x, 1, samples=32, seed=1)  # the default stays the grid
    torch.testing.assert_close(grid, lime(model, x, 1, segmentation="grid", cell=8, samples=32, seed=1))
    with pytest.raises(StageInputError, match="segmentation"):
        lime(model, x, 1, segmentation="quickshift")


def test_bad_slic_arguments_are_one_clear_error() -> None:
    with pytest.raises(StageInputError, match="n_segments"):
        slic_segments(torch.zeros(3, 8, 8), 0)
    with pytest.raises(StageInputError, match="one"):
        slic_segments(torch.zeros(1, 3, 8, 8), 4)
