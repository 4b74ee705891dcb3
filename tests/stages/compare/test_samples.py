"""samples_from_maps: positions vs pooled samples, resizing to the smaller grid, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repdissect.stages._errors import StageInputError
from repdissect.stages.compare import samples_from_maps


def test_positions_are_image_major_rows():
    maps = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    a, b = samples_from_maps(maps, maps[:, :2], mode="positions")
    assert a.shape == (8, 3) and b.shape == (8, 2)
    # Row k = image k // 4, position (y, x) = divmod(k % 4, 2).
    for row in range(8):
        image, (y, x) = row // 4, divmod(row % 4, 2)
        np.testing.assert_array_equal(a[row], maps[image, :, y, x])


def test_pooled_is_spatial_mean_and_accepts_vectors():
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((5, 4, 3, 3))
    vectors = rng.standard_normal((5, 7))
    a, b = samples_from_maps(maps, vectors, mode="pooled")
    np.testing.assert_allclose(a, maps.mean(axis=(2, 3)))
    np.testing.assert_array_equal(b, vectors)


def test_resize_smaller_average_pools_the_larger_map():
    rng = np.random.default_rng(1)
    big = rng.standard_normal((2, 3, 4, 6)).astype(np.float32)
    small = rng.standard_normal((2, 2, 2, 3)).astype(np.float32)
    a, b = samples_from_maps(big, small, mode="positions", resize="smaller")
    expected = big.reshape(2, 3, 2, 2, 3, 2).mean(axis=(3, 5))  # exact 2×2 block means
    np.testing.assert_allclose(a, expected.transpose(0, 2, 3, 1).reshape(-1, 3), rtol=1e-6)
    np.testing.assert_array_equal(b, small.transpose(0, 2, 3, 1).reshape(-1, 2))


def test_resize_none_refuses_different_grids():
    with pytest.raises(StageInputError, match=r"\(2, 3, 4, 4\).*\(2, 3, 2, 2\).*resize='smaller'"):
        samples_from_maps(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 2, 2)), resize="none")


def test_torch_input_gives_torch_output_and_float16_is_upcast():
    maps = torch.rand(3, 2, 4, 4, dtype=torch.float16)
    a, b = samples_from_maps(maps, maps[:, :, ::2, ::2].contiguous())
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float32 and a.shape == (12, 2)
    a_np, _ = samples_from_maps(maps.numpy(), maps.numpy()[:, :, ::2, ::2])
    assert a_np.dtype == np.float32
    np.testing.assert_allclose(a.numpy(), a_np, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs,shape_b,match",
    [
        ({"mode": "grid"}, (2, 3, 4, 4), "unknown sample mode"),
        ({"resize": "bilinear"}, (2, 3, 4, 4), "unknown resize"),
        ({}, (3, 3, 4, 4), "2 images but acts_b holds 3"),
        ({}, (2, 3, 4), "acts_b must be"),
    ],
)
def test_validation(kwargs, shape_b, match):
    with pytest.raises(StageInputError, match=match):
        samples_from_maps(np.zeros((2, 3, 4, 4)), np.zeros(shape_b), **kwargs)
