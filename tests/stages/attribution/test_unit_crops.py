"""Receptive-field crops in float32 (channels-last on the CPU) and the tight stride-aligned crop size."""

from __future__ import annotations

import torch
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

from repdissect.stages.attribution import RowUnitTarget, UnitTarget, backward_maps, relu_rule


def _net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 12, 3, padding=1), nn.ReLU()).eval()


def test_float32_crops_equal_the_whole_image_gradient() -> None:
    model = _net()
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(6))
    x[2] = -10.0  # a constant image
    with torch.no_grad():
        a = model(x).flatten(2)
    assert ((a == a.amax(2, keepdim=True)).sum(2) > 1).any()  # some rows tie (e.g. a unit zero everywhere):
    # those take the whole-image path, the others crops
    for rule in ("plain", "guided", "deconvnet"):
        with relu_rule(model, rule):
            fast = backward_maps(model, x, UnitTarget("8"))[0]
            slow = backward_maps(model, x, UnitTarget("8"), crop=False)[0]
            rows = backward_maps(model, x, RowUnitTarget("8", [11, 0, 3]))[0]
        assert fast.abs().sum() > 0
        scale = float(slow.abs().max())
        torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6 * scale)
        torch.testing.assert_close(rows, slow[torch.arange(3), torch.tensor([11, 0, 3])], rtol=0, atol=1e-6 * scale)
        assert fast.is_contiguous()  # the caller gets an ordinary NCHW tensor back


def test_crop_is_the_receptive_field_rounded_to_the_stride() -> None:
    from repdissect.stages.attribution._engine import _crop_plan, _receptive_field

    model = _net()
    x = torch.zeros(1, 3, 48, 48)
    sy, sx, up, down, left, right = _receptive_field(model, x, "8")
    assert (sy, sx, up, down, left, right) == (4, 4, 7, 11, 7, 11)  # 3×3 convs and 2×2 pools: 18 px
    assert _crop_plan(48, 4, up, down) == 20  # ⌈7/4⌉·4 + ⌈11/4⌉·4, not 18 + 2 strides
    assert _crop_plan(20, 4, up, down) is None  # not smaller than the image: no crop
