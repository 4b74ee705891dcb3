"""The explicit region backward of unit maps through a verified module chain (``attribution._chain``).

Checked against the whole-image autograd path (``crop=False``) and captum's neuron methods looped over units,
for every ReLU rule, in-place and out-of-place ReLUs, batch norm with negative scales, strided and dilated
convolutions, ``valid`` padding and regions that overhang the image; chains the path must not take (a
functional ReLU, a residual addition, an in-place edit between modules, train-mode batch norm) fall back.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

from repdissect.stages.attribution import UnitTarget, backward_maps, deconvnet, guided_backprop, relu_rule, saliency
from repdissect.stages.attribution._chain import plan_chain, record_chain


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g))  # some scales negative
        bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _vgg(inplace: bool) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8, 1), nn.ReLU(inplace=inplace),
                         nn.MaxPool2d(2), nn.Conv2d(8, 12, 3, padding=1), _bn(12, 2), nn.ReLU(inplace=inplace),
                         nn.MaxPool2d(2), nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(inplace=inplace)).eval()


def _strided() -> nn.Module:  # a stride-2 conv, a dilated conv, 'valid' 1×1 conv, dropout and identity
    torch.manual_seed(4)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         _bn(8, 3), nn.ReLU(), nn.Dropout(0.3), nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                         nn.Identity(), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 9, 1, padding="valid"),
                         nn.ReLU()).eval()


def _relu_then_bn() -> nn.Module:  # conv → ReLU → BN: a clamp below a scale, run step by step
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), _bn(6, 4), nn.MaxPool2d(2),
                         nn.Conv2d(6, 7, 3, padding=1), nn.ReLU()).eval()


NETS = {"vgg_inplace": (lambda: _vgg(True), "9"), "vgg": (lambda: _vgg(False), "9"),
        "vgg_bn_top": (lambda: _vgg(True), "6"),  # target under a batch norm with negative scales
        "strided": (_strided, "11"), "relu_then_bn": (_relu_then_bn, "5")}


def _x(n: int = 3, size: int = 40, seed: int = 7) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("rule", ["plain", "guided", "deconvnet"])
def test_chain_path_equals_the_whole_image_gradient(name: str, rule: str, monkeypatch) -> None:
    import repdissect.stages.attribution._engine as engine

    taken = []  # which region backward ran: the planned one, or the general chain walk (ReLU before BN)
    for fn in ("plan_backward", "chain_backward"):
        real = getattr(engine, fn)
        monkeypatch.setattr(engine, fn, lambda *a, _fn=fn, _real=real, **k: taken.append(_fn) or _real(*a, **k))
    build, layer = NETS[name]
    model = build()
    x = _x(2, 24)  # small enough that every net's units take a region backward rather than per-row crops
    with relu_rule(model, rule):
        _, steps = record_chain(model, x, dict(model.named_modules())[layer])
        assert steps is not None  # the chain is recognised ...
        fast = backward_maps(model, x, UnitTarget(layer))[0]
        assert taken  # ... and a region backward computed the maps (not a crop forward or the whole image)
        if name == "relu_then_bn" and rule != "plain":  # a clamp below a scale: the step-by-step walk
            assert set(taken) == {"chain_backward"}
        slow = backward_maps(model, x, UnitTarget(layer), crop=False)[0]
    scale = float(slow.abs().max())
    assert scale > 0 and fast.is_contiguous()
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6 * scale)


def test_plan_covers_the_usual_chains_and_not_a_clamp_below_a_scale() -> None:
    for name, covered in (("vgg", True), ("strided", True), ("relu_then_bn", False)):
        build, layer = NETS[name]
        model = build()
        with relu_rule(model, "guided"):
            a, steps = record_chain(model, _x(), dict(model.named_modules())[layer])
            plan = plan_chain(steps, tuple(a.shape), torch.float32, torch.device("cpu"))
        assert (plan is not None) == covered, name


def test_float64_chain_path_is_the_whole_image_gradient_to_rounding() -> None:
    model = _vgg(True).double()
    x = _x().double()
    fast = guided_backprop(model, x, UnitTarget("9"))
    with relu_rule(model, "guided"):
        slow = backward_maps(model, x, UnitTarget("9"), crop=False)[0]
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-13 * float(slow.abs().max()))


@pytest.mark.parametrize("method,captum_name", [(guided_backprop, "NeuronGuidedBackprop"),
                                                 (deconvnet, "NeuronDeconvolution"),
                                                 (saliency, "NeuronGradient")])
def test_chain_path_equals_captum_neuron_loop(method, captum_name: str) -> None:
    import captum.attr as ca

    model = _vgg(True)
    theirs = copy.deepcopy(model)
    for m in theirs.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False  # captum's hooks refuse in-place ReLUs; ours runs on the original
    x = _x(2, 32)
    ours = method(model, x, UnitTarget("9"))
    cls = getattr(ca, captum_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        algo = cls(theirs, theirs[9])
        ref = torch.stack([algo.attribute(x.clone(), neuron_selector=lambda o, k=k: o[:, k].amax((1, 2)))
                           for k in range(10)], 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6 * float(ref.abs().max()))


def test_regions_overhanging_the_image_and_rows_per_pass_do_not_change_a_bit() -> None:
    from repdissect.stages.attribution._engine import _unit_rows_cropped

    model = _vgg(False)
    x = _x(2, 24)  # 24 px: most units' receptive fields (18 px) overhang a border
    with relu_rule(model, "guided"):
        rows = [b for b in range(2) for _ in range(10)]
        cols = list(range(10)) * 2
        whole = _unit_rows_cropped(model, x, rows, cols, "9")
        small = _unit_rows_cropped(model, x, rows, cols, "9", rows_per_pass=3)
        again = _unit_rows_cropped(model, x, rows, cols, "9")
        slow = backward_maps(model, x, UnitTarget("9"), crop=False)[0].reshape(20, 3, 24, 24)
    assert torch.equal(whole, small) and torch.equal(whole, again)  # rerun- and pass-size-invariant
    torch.testing.assert_close(whole, slow, rtol=0, atol=1e-6 * float(slow.abs().max()))


def test_sharded_images_equal_the_whole_batch() -> None:
    model = _vgg(True)
    x = _x(4, 32)
    whole = guided_backprop(model, x, UnitTarget("9"))
    parts = torch.cat([guided_backprop(model, x[:1], UnitTarget("9")), guided_backprop(model, x[1:], UnitTarget("9"))])
    assert torch.equal(whole, parts)


def test_units_dead_on_an_image_give_exact_zero_maps() -> None:
    model = _vgg(True)
    x = _x(2, 32)
    x[1] = -10.0  # a constant image: many units are 0 everywhere (a tied maximum of 0)
    with relu_rule(model, "guided"):
        fast = backward_maps(model, x, UnitTarget("9"))[0]
        slow = backward_maps(model, x, UnitTarget("9"), crop=False)[0]
        with torch.no_grad():
            dead = model(x).flatten(2).amax(2) <= 0
    assert dead.any()
    assert fast[dead].abs().sum() == 0
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6 * float(slow.abs().max()))


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 5, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.pool(torch.relu(self.conv1(x)))))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 5, 3, padding=1)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.conv2(self.relu1(self.conv1(x)) + x))


class _Edited(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h.mul_(2.0)  # an in-place edit between two modules
        return self.relu(self.conv2(self.relu(h)))


@pytest.mark.parametrize("make,layer", [(_Functional, "conv2"), (_Residual, "relu2"), (_Edited, "relu"),
                                        (lambda: _vgg(True).train(), "9")])
def test_chains_the_path_must_not_take_fall_back_and_stay_right(make, layer: str) -> None:
    torch.manual_seed(8)
    model = make()
    x = _x(2, 16)
    with relu_rule(model, "guided"):
        a, steps = record_chain(model, x, dict(model.named_modules())[layer])
        assert a is not None and steps is None
        if model.training:
            return  # batch statistics: no unit map is defined per image (the engine is eval-only)
        fast = backward_maps(model, x, UnitTarget(layer))[0]
        slow = backward_maps(model, x, UnitTarget(layer), crop=False)[0]
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6 * float(slow.abs().max()))


def test_a_network_that_edits_its_input_in_place_is_not_a_chain() -> None:
    class EditsInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2.0)
            return self.relu(self.conv(x))

    model = EditsInput().eval()
    a, steps = record_chain(model, _x(1, 8), model.relu)
    assert a is not None and steps is None


def test_large_zero_buffers_are_zero_writable_and_outlive_their_map() -> None:
    import gc

    from repdissect.stages.attribution._engine import _zeros

    for numel in (10, 3 * 2**20 + 1):  # small: torch.zeros; large: an anonymous memory map
        z = _zeros(numel, torch.float32, torch.device("cpu"))
        gc.collect()
        assert z.shape == (numel,) and z.dtype == torch.float32 and not z.any()
        z[-1] = 2.0
        view = z[:-1].view(-1, 3)
        del z
        gc.collect()
        assert float(view.sum()) == 0.0 and view.is_contiguous()


def test_the_engine_takes_the_chain_path_for_small_images_and_crops_for_large_ones(monkeypatch) -> None:
    import repdissect.stages.attribution._engine as engine

    calls = []
    real = engine.plan_backward
    monkeypatch.setattr(engine, "plan_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _vgg(True)
    guided_backprop(model, _x(2, 32), UnitTarget("9"))  # 2·32² px ≤ 20 rows · 20² px of crops
    assert calls
    calls.clear()
    guided_backprop(model, _x(2, 96), UnitTarget("9", units=[0, 1]))  # 2·96² px > 4 rows · 20² px
    assert not calls
