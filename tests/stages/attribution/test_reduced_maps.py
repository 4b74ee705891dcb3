"""Maps reduced piece by piece (``map_fn``) are the reduction of the whole map stack, bit for bit.

The concept-mass stage needs only ``max_c |map|`` per (image, unit); with ``map_fn`` the engine reduces each
pass of rows (or unit chunk) as it is made instead of returning every unit's ``(3, H, W)`` map. Every path of
the engine is checked against the maps computed all at once and reduced afterwards, with ``torch.equal``:
the planned region backward of a module chain, the step-by-step chain walk, autograd on crops, tied maxima
(the whole-image path for those rows), the replicated unit chunks (``reduce="mean"``), row targets and class
targets; and the concept-mass fractions computed in groups of units against the whole batch at once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

import repdissect.stages.attribution._dataset as dataset_mod
import repdissect.stages.attribution._engine as engine
from repdissect.stages.attribution import (
    RowUnitTarget, UnitTarget, attribute, deconvnet, guided_backprop, mass_fractions, relu_rule, saliency, saliency_map,
)
from repdissect.stages import StageInputError


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _chain() -> nn.Module:  # conv/BN/ReLU/pool modules: the planned region backward
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, 1), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), _bn(12, 2), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2), nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(inplace=True)).eval()


def _relu_then_bn() -> nn.Module:  # a ReLU below a batch norm: the chain walked step by step
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), _bn(6, 4), nn.MaxPool2d(2),
                         nn.Conv2d(6, 7, 3, padding=1), nn.ReLU()).eval()


class _Functional(nn.Module):  # functional ReLUs: not a chain, autograd on crops
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.pool(torch.relu(self.conv1(x)))))


def _x(n: int, size: int, seed: int = 7, constant: bool = False) -> torch.Tensor:
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    if constant:
        x[-1] = 0.7  # a flat image: equal activations inside, so tied maxima (positive and 0)
    return x


def _paths(monkeypatch) -> list[str]:
    taken: list[str] = []
    for fn in ("_plan_maps", "_crop_maps", "chain_backward", "_unit_rows"):
        real = getattr(engine, fn)
        monkeypatch.setattr(engine, fn, lambda *a, _fn=fn, _real=real, **k: taken.append(_fn) or _real(*a, **k))
    return taken


METHODS = {"saliency": saliency, "guided_backprop": guided_backprop, "deconvnet": deconvnet}

# (network, layer, images, size, flat image, reduce, unit chunk, a path that must run)
CASES = {
    "chain, planned regions": (_chain, "9", 3, 24, False, "max", 16, "_plan_maps"),
    "chain, ties": (_chain, "9", 3, 24, True, "max", 16, "_unit_rows"),
    "chain walked step by step": (_relu_then_bn, "5", 2, 20, True, "max", 16, "chain_backward"),
    "autograd on crops": (_Functional, "conv2", 2, 24, True, "max", 16, "_crop_maps"),
    "large images, few rows: crops": (_chain, "9", 2, 64, False, "max", 16, "_crop_maps"),
    "unit chunks (mean)": (_chain, "9", 3, 16, False, "mean", 3, "_unit_rows"),
    "unit chunks (no crop)": (_Functional, "conv2", 2, 16, False, "mean", 2, "_unit_rows"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_reduced_unit_maps_equal_the_whole_stack_reduced(case: str, method: str, monkeypatch) -> None:
    make, layer, n, size, flat, reduce, chunk, path = CASES[case]
    model, x = make(), _x(n, size, constant=flat)
    units = [0, 2, 3, 4] if case.startswith("large") else None  # few rows: below the whole-image work
    target = UnitTarget(layer, units, reduce)
    whole = METHODS[method](model, x, target, unit_chunk=chunk)
    taken = _paths(monkeypatch)
    reduced = METHODS[method](model, x, target, unit_chunk=chunk, map_fn=saliency_map)
    if path == "chain_backward" and method == "saliency":
        path = "_plan_maps"  # the plain rule's clamp commutes with the scale: the plan covers it
    assert path in taken
    expected = whole.abs().amax(dim=2)  # what the concept-mass stage computed before
    assert reduced.shape == expected.shape and reduced.dtype == expected.dtype
    assert torch.equal(reduced, expected)


def test_any_number_of_rows_per_pass() -> None:
    model, x = _chain(), _x(2, 24, constant=True)
    rows, cols = [b for b in range(2) for _ in range(10)], list(range(10)) * 2
    with relu_rule(model, "guided"):
        for per_pass in (1, 3, 7, 256):
            whole = engine._unit_rows_cropped(model, x, rows, cols, "9", rows_per_pass=per_pass)
            got = engine._unit_rows_cropped(model, x, rows, cols, "9", rows_per_pass=per_pass, map_fn=saliency_map)
            assert torch.equal(got, whole.abs().amax(dim=1))


@pytest.mark.parametrize("target", [3, RowUnitTarget("9", [1, 4, 9])], ids=["class", "row units"])
def test_class_and_row_targets(target) -> None:
    model = _chain() if isinstance(target, RowUnitTarget) else nn.Sequential(_chain(), nn.Flatten(), nn.LazyLinear(5))
    x = _x(3, 16)
    if not isinstance(target, RowUnitTarget):
        model(x)  # materialise the lazy head
        model.eval()
    whole = guided_backprop(model, x, target)
    assert torch.equal(guided_backprop(model, x, target, map_fn=saliency_map), whole.abs().amax(dim=1))


def test_the_returned_input_is_the_same_values() -> None:
    model, x = _chain(), _x(2, 16)
    with relu_rule(model, "plain"):
        for kwargs in ({}, {"crop": False, "unit_chunk": 3}):
            _, at = engine.backward_maps(model, x, UnitTarget("9"), **kwargs)
            _, at_reduced = engine.backward_maps(model, x, UnitTarget("9"), map_fn=saliency_map, **kwargs)
            assert torch.equal(at, at_reduced)


def test_methods_without_a_piecewise_reduction_say_so() -> None:
    with pytest.raises(StageInputError, match="map_fn"):
        attribute("occlusion", _chain(), _x(1, 16), UnitTarget("9"), map_fn=saliency_map)


@pytest.mark.parametrize("size,label_size", [(16, 16), (16, 8), (12, 8)])
@pytest.mark.parametrize("group", [1, 3, 1 << 21])
def test_mass_fractions_in_groups_equal_the_whole_batch(size: int, label_size: int, group: int,
                                                        monkeypatch) -> None:
    g = torch.Generator().manual_seed(1)
    n, u = 5, 9
    s = torch.rand(n, u, size, size, generator=g) ** 3
    s[0, 1] = 0.0  # no attribution: not valid
    masks = np.random.default_rng(2).random((n, u, label_size, label_size)) < 0.3
    masks[1, 2] = False  # empty mask: not valid
    expected = dataset_mod._fractions(s, masks)  # the whole batch at once
    monkeypatch.setattr(dataset_mod, "_GROUP_VALUES", group * n * max(size, label_size) ** 2)
    got = mass_fractions(s, masks)
    assert np.array_equal(got[1], expected[1]) and not got[1][0, 1] and not got[1][1, 2]
    assert np.array_equal(got[0].view(np.int64), expected[0].view(np.int64))
