"""Each attribution method against captum (where captum has it) and against the identities it must satisfy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

from repdissect.stages import StageInputError
from repdissect.stages.attribution import (
    RowUnitTarget, UnitTarget, cam, deconvnet, grad_cam, grid_segments, guided_backprop, guided_grad_cam, lime, lrp, occlusion,
    relu_backward_rule, ridge_surrogate, saliency, smoothgrad, upsample,
)

captum_attr = pytest.importorskip("captum.attr")


class Net(nn.Module):
    """conv → ReLU → max-pool → conv → ReLU → GAP → linear; ``relu`` picks how the ReLUs are written."""

    def __init__(self, relu: str = "module", bias: bool = True, head: str = "avg") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.act1 = nn.ReLU(inplace=relu == "inplace")
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
        self.act2 = nn.ReLU(inplace=relu == "inplace")
        self.gap = nn.AdaptiveAvgPool2d(1) if head == "avg" else nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(6, 5, bias=bias)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relu == "functional":
            x = self.pool(F.relu(self.conv1(x)))
            x = torch.relu(self.conv2(x))
        elif self.relu == "method":
            x = self.pool(self.conv1(x).relu())
            x = self.conv2(x).relu()
        else:
            x = self.act2(self.conv2(self.pool(self.act1(self.conv1(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))


def make(relu: str = "module", seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(relu, **kw).double().eval()


def inputs(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


TARGETS = [2, torch.tensor([0, 3, 4])]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("ours,theirs", [
    (saliency, lambda m: captum_attr.Saliency(m)),
    (guided_backprop, lambda m: captum_attr.GuidedBackprop(m)),
    (deconvnet, lambda m: captum_attr.Deconvolution(m)),
])
def test_gradient_methods_equal_captum(ours, theirs, target) -> None:
    model, x = make(), inputs()
    kwargs = {"abs": False} if ours is saliency else {}
    expected = theirs(model).attribute(x, target=target, **kwargs)
    torch.testing.assert_close(ours(model, x, target), expected)


@pytest.mark.parametrize("relu", ["inplace", "functional", "method"])
@pytest.mark.parametrize("method", [guided_backprop, deconvnet])
def test_inplace_and_functional_relus_get_the_rule(method, relu) -> None:
    """Same weights written with module ReLUs (captum's reference) and in-place / functional ReLUs."""
    x = inputs()
    expected = {guided_backprop: captum_attr.GuidedBackprop, deconvnet: captum_attr.Deconvolution}[method](
        make("module")).attribute(x, target=1)
    got = method(make(relu), x, 1)
    torch.testing.assert_close(got, expected)
    # and the patch is gone afterwards: a plain gradient of the functional model is the plain gradient again
    torch.testing.assert_close(saliency(make(relu), x, 1), saliency(make("module"), x, 1))


def test_relu_rules_on_one_relu() -> None:
    x = torch.tensor([-1.0, -1.0, 2.0, 2.0])
    g = torch.tensor([-3.0, 3.0, -3.0, 3.0])
    assert relu_backward_rule(x, g, "plain").tolist() == [0, 0, -3, 3]
    assert relu_backward_rule(x, g, "deconvnet").tolist() == [0, 3, 0, 3]
    assert relu_backward_rule(x, g, "guided").tolist() == [0, 0, 0, 3]


def test_other_activations_are_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.LeakyReLU(), nn.Flatten(), nn.Linear(72, 2)).double().eval()
    with pytest.raises(StageInputError, match="LeakyReLU"):
        guided_backprop(model, inputs(), 0)


def test_smoothgrad_equals_captum_noise_tunnel_with_the_same_noise(monkeypatch) -> None:
    """captum draws its noise from torch's global RNG; the map is the mean of the same noisy gradients."""
    model, x = make(), inputs(2)
    for kind in ("smoothgrad", "smoothgrad_sq", "vargrad"):
        ours = smoothgrad(model, x, 1, samples=4, stdev=0.3, kind=kind, seed=7)
        noises = [torch.randn(x.shape, generator=torch.Generator().manual_seed(7 * 1_000_003 + i), dtype=x.dtype) * 0.3
                  for i in range(4)]
        grads = torch.stack([captum_attr.Saliency(model).attribute(x + e, target=1, abs=False) for e in noises])
        expected = {"smoothgrad": grads.mean(0), "smoothgrad_sq": (grads**2).mean(0),
                    "vargrad": (grads**2).mean(0) - grads.mean(0) ** 2}[kind]
        torch.testing.assert_close(ours, expected)
    # captum's NoiseTunnel itself on zero noise reduces to the plain gradient, as ours does
    nt = captum_attr.NoiseTunnel(captum_attr.Saliency(model)).attribute(x, target=1, nt_samples=3, stdevs=0.0, abs=False)
    torch.testing.assert_close(smoothgrad(model, x, 1, samples=3, stdev=0.0), nt)


@pytest.mark.parametrize("relu", [False, True])
def test_grad_cam_equals_captum(relu) -> None:
    model, x = make(), inputs()
    expected = captum_attr.LayerGradCam(model, model.conv2).attribute(x, target=3, relu_attributions=relu)[:, 0]
    torch.testing.assert_close(grad_cam(model, x, 3, layer="conv2", relu=relu), expected)


def test_guided_grad_cam_equals_captum() -> None:
    model, x = make(), inputs()
    expected = captum_attr.GuidedGradCam(model, model.conv2).attribute(x, target=3)
    torch.testing.assert_close(guided_grad_cam(model, x, 3, layer="conv2"), expected)


def test_grad_cam_times_z_equals_cam_on_a_gap_linear_net() -> None:
    model, x = make(), inputs()
    maps = cam(model, x, None, layer="act2", head="fc")  # (N, classes, h, w)
    z = maps.shape[-1] * maps.shape[-2]
    for c in range(5):
        torch.testing.assert_close(grad_cam(model, x, c, layer="act2") * z, maps[:, c])
    # the CAM's spatial mean is the logit minus the bias
    torch.testing.assert_close(maps.mean((2, 3)), model(x) - model.fc.bias)


def test_cam_refuses_a_max_pool_head() -> None:
    with pytest.raises(StageInputError, match="grad_cam"):
        cam(make(head="max"), inputs(), 0, layer="act2", head="fc")


def test_occlusion_equals_captum() -> None:
    model, x = make(), inputs(2)
    expected = captum_attr.Occlusion(model).attribute(x, sliding_window_shapes=(3, 3, 3), strides=(3, 2, 2),
                                                      target=torch.tensor([1, 4]), baselines=0.25)
    got = occlusion(model, x, torch.tensor([1, 4]), window=(3, 3), stride=(2, 2), baseline=0.25, batch=7)
    # captum accumulates in float32 whatever the input dtype
    torch.testing.assert_close(got, expected.double(), rtol=1e-5, atol=1e-6)


def test_one_pixel_occlusion_of_a_linear_model_is_gradient_times_input() -> None:
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).double().eval()
    x = inputs(2)
    # a 1x1 window spans all channels, so per pixel it is Σ_c w_c x_c: grad⊙x summed over channels
    got = occlusion(lin, x, 1, window=(1, 1), stride=(1, 1), baseline=0.0)
    gx = (saliency(lin, x, 1) * x).sum(1, keepdim=True).expand_as(x)
    torch.testing.assert_close(got, gx)


def test_lrp_epsilon_equals_captum() -> None:
    model, x = make(), inputs()
    expected = captum_attr.LRP(model).attribute(x, target=2)
    torch.testing.assert_close(lrp(model, x, 2), expected)


def test_lrp_epsilon_is_conservative_on_a_bias_free_net() -> None:
    model, x = make(bias=False), inputs()
    relevance = lrp(model, x, torch.tensor([0, 1, 2]), epsilon=1e-12)
    logits = model(x).gather(1, torch.tensor([[0], [1], [2]]))[:, 0]
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-6, atol=1e-9)


def test_lrp_zplus_is_conservative_and_positive_on_nonnegative_inputs() -> None:
    model, x = make(bias=False), inputs().abs()
    logits = model(x)[:, 2]
    relevance = lrp(model, x, 2, rule="zplus")
    torch.testing.assert_close(relevance.sum((1, 2, 3)), logits, rtol=1e-6, atol=1e-9)
    pos = logits > 0
    assert (relevance[pos] >= -1e-12).all()


def test_lrp_refuses_residual_additions() -> None:
    class Res(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(192, 2)

        def forward(self, x):
            return self.fc(torch.flatten(x + self.conv(x), 1))

    with pytest.raises(StageInputError, match="residual"):
        lrp(Res().double().eval(), inputs(), 0)


def test_lime_recovers_a_linear_model_and_matches_sklearn_ridge() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).double().eval()
    x = inputs(1)
    segs = grid_segments(8, 8, 4)
    maps = lime(lin, x, 1, cell=4, samples=200, ridge=1e-9, fill=0.0, seed=3)
    # exact per-superpixel contribution of a linear model with fill 0: Σ_{pixels in s, c} w x
    contrib = (saliency(lin, x, 1) * x).sum(1)[0]
    per_seg = torch.stack([contrib[segs == s].sum() for s in range(4)])
    torch.testing.assert_close(maps[0], per_seg[segs], rtol=1e-6, atol=1e-8)
    # the closed-form surrogate is scikit-learn's weighted Ridge
    gen = torch.Generator().manual_seed(5)
    z = torch.randint(0, 2, (40, 6), generator=gen).double()
    y = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    wts = torch.rand(40, generator=gen, dtype=torch.float64)
    coef, intercept = ridge_surrogate(z, y, wts, 1.0)
    ref = sklearn.Ridge(alpha=1.0).fit(z.numpy(), y.numpy(), sample_weight=wts.numpy())
    torch.testing.assert_close(coef, torch.as_tensor(ref.coef_))
    torch.testing.assert_close(intercept, torch.as_tensor(ref.intercept_))


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("method,captum_cls", [
    (guided_backprop, "NeuronGuidedBackprop"), (deconvnet, "NeuronDeconvolution"), (saliency, "NeuronGradient"),
])
def test_unit_targets_batched_equal_captum_neuron_loop(method, captum_cls, reduce) -> None:
    """All units of a layer in one call == captum's neuron method looped over units (its users' way)."""
    model, x = make(), inputs()
    got = method(model, x, UnitTarget("conv2", reduce=reduce), unit_chunk=4)  # (N, 6, C, H, W), 2 chunks
    assert got.shape == (3, 6, 3, 8, 8)
    cls = getattr(captum_attr, captum_cls)
    for k in range(6):
        selector = (lambda out, k=k: out[:, k].amax((1, 2))) if reduce == "max" else (lambda out, k=k: out[:, k].mean((1, 2)))
        expected = cls(model, model.conv2).attribute(x, neuron_selector=selector)
        torch.testing.assert_close(got[:, k], expected)


def test_unit_occlusion_and_grad_cam_cover_all_units() -> None:
    model, x = make(), inputs(2)
    target = UnitTarget("act2", reduce="mean")
    occ = occlusion(model, x, target, window=(2, 2), stride=(2, 2))
    cams = grad_cam(model, x, target, layer="conv1")
    for k in (0, 5):
        one = UnitTarget("act2", units=[k], reduce="mean")
        torch.testing.assert_close(occ[:, k], occlusion(model, x, one, window=(2, 2), stride=(2, 2))[:, 0])
        torch.testing.assert_close(cams[:, k], grad_cam(model, x, one, layer="conv1")[:, 0])
    with pytest.raises(StageInputError, match="below"):
        grad_cam(model, x, target, layer="act2")


def test_unit_lrp_sums_to_the_unit_value() -> None:
    model, x = make(bias=False), inputs(2)
    rel = lrp(model, x, UnitTarget("act2", reduce="max"), epsilon=1e-12)
    with torch.no_grad():
        value = model.act2(model.conv2(model.pool(model.act1(model.conv1(x))))).amax((2, 3))
    torch.testing.assert_close(rel.sum((2, 3, 4)), value, rtol=1e-6, atol=1e-9)


def test_upsample_modes() -> None:
    m = torch.arange(4.0).reshape(1, 2, 2)
    assert upsample(m, (4, 4), "nearest")[0, 0].tolist() == [0, 0, 1, 1]
    torch.testing.assert_close(upsample(m, (4, 4))[0], F.interpolate(m[None], (4, 4), mode="bilinear")[0, 0])


def test_bad_targets_are_one_clear_error() -> None:
    model, x = make(), inputs()
    with pytest.raises(StageInputError, match="out of range"):
        saliency(model, x, 9)
    with pytest.raises(StageInputError, match="not a module"):
        saliency(model, x, UnitTarget("nope"))
    with pytest.raises(StageInputError, match="units"):
        saliency(model, x, UnitTarget("conv2", units=[6]))


@pytest.mark.parametrize("method", [guided_backprop, lrp, lambda m, x, t: grad_cam(m, x, t, layer="conv1"),
                                    lambda m, x, t: occlusion(m, x, t, window=(2, 2), stride=(2, 2)),
                                    lambda m, x, t: lime(m, x, t, cell=4, samples=16)])
def test_row_unit_targets_pick_each_rows_unit(method) -> None:
    """Row i explaining unit u_i equals row i of the all-units call at unit u_i."""
    model, x = make(), inputs(3)
    units = [4, 0, 4]
    rows = method(model, x, RowUnitTarget("act2", units, reduce="mean"))
    full = method(model, x, UnitTarget("act2", reduce="mean"))
    torch.testing.assert_close(rows, full[torch.arange(3), torch.tensor(units)])


def test_receptive_field_crops_equal_the_whole_image_gradient() -> None:
    """The max-unit fast path (crops around each unit's argmax) gives exactly the whole-image gradients."""
    from repdissect.stages.attribution import backward_maps, relu_rule

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(5, 6, 3, padding=1), nn.ReLU()).double().eval()
    x = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for rule in ("plain", "guided", "deconvnet"):
        with relu_rule(model, rule):
            fast = backward_maps(model, x, UnitTarget("7"), unit_chunk=4)[0]
            slow = backward_maps(model, x, UnitTarget("7"), unit_chunk=4, crop=False)[0]
            rows = backward_maps(model, x, RowUnitTarget("7", [5, 0, 2]))[0]
        assert fast.abs().sum() > 0
        torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rows, slow[torch.arange(3), torch.tensor([5, 0, 2])], rtol=1e-10, atol=1e-12)
    # the crop really is smaller than the image here, so the fast path ran
    from repdissect.stages.attribution._engine import _receptive_field
    sy, sx, up, down, left, right = _receptive_field(model, x, "7")
    assert (sy, sx) == (4, 4) and up + down + 8 < 40
