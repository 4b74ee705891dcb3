"""The built-in CNN family ``builtin:cnn`` (:class:`SmallCNN`): the demo's network, small enough for a CPU.

Layers are named ``conv1`` … ``convN`` (conv + batch norm + ReLU + pooling blocks) so dissection and
comparison configs name them directly.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import nn

from ._errors import StageInputError
from ._model_registry import register_model

__all__ = ["ConvBlock", "SmallCNN", "small_cnn"]


class ConvBlock(nn.Sequential):
    """``conv → bn → relu``; hooking the block gives its post-ReLU feature map."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                bn=nn.BatchNorm2d(out_channels),
                relu=nn.ReLU(inplace=True),
            )
        )


class SmallCNN(nn.Module):
    """The built-in CNN family: ``conv1 … convD`` blocks (conv→BN→ReLU), 2×2 max-pool between blocks, global
    pooling ``global_pool`` and a linear head ``fc``.

    Args:
        num_classes: outputs of ``fc``.
        depth: number of conv blocks D ≥ 1 (the input must survive D − 1 halvings).
        width: channels of ``conv1``; block i (0-based) has ``width · 2^i`` channels unless ``widths`` is given.
        widths: explicit channels per block (length ``depth``).
        kernel_size: odd kernel size of every conv.
        head_pool: global pooling before ``fc``: ``"max"`` (default; detects a shape anywhere in clutter and
            trains several times faster on the synthetic world than averaging) or ``"avg"``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        depth: int = 4,
        width: int = 32,
        widths: Sequence[int] | None = None,
        kernel_size: int = 3,
        head_pool: str = "max",
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 1:
            raise StageInputError(f"builtin:cnn depth must be an integer ≥ 1; got {depth!r}")
        if widths is None:
            if not isinstance(width, int) or width < 1:
                raise StageInputError(f"builtin:cnn width must be an integer ≥ 1; got {width!r}")
            widths = [width * 2**i for i in range(depth)]
        widths = [int(w) for w in widths]
        if len(widths) != depth or min(widths) < 1:
            raise StageInputError(f"builtin:cnn widths must be {depth} positive integers (one per block); got {widths!r}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise StageInputError(f"builtin:cnn kernel_size must be odd and ≥ 1; got {kernel_size!r}")
        if head_pool not in ("max", "avg"):
            raise StageInputError(f"builtin:cnn head_pool must be 'max' or 'avg'; got {head_pool!r}")
        in_channels = 3
        for i, out_channels in enumerate(widths, start=1):
            self.add_module(f"conv{i}", ConvBlock(in_channels, out_channels, kernel_size))
            if i < depth:
                self.add_module(f"pool{i}", nn.MaxPool2d(2))
            in_channels = out_channels
        self.global_pool = nn.AdaptiveMaxPool2d(1) if head_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name, module in self.named_children():
            if name == "fc":
                x = torch.flatten(x, 1)
            x = module(x)
        return x


@register_model("cnn")
def small_cnn(**kwargs: Any) -> SmallCNN:
    """``builtin:cnn``: :class:`SmallCNN` with the given keyword arguments."""
    return SmallCNN(**kwargs)
