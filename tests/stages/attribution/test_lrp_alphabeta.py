"""LRP αβ rule: against a per-layer reference written from the formula, against captum's α1β0, conservation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

from repdissect.stages import StageInputError
from repdissect.stages.attribution import UnitTarget, lrp

captum_attr = pytest.importorskip("captum.attr")


def _ab_dense(z: torch.Tensor, relevance: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``R_i = Σ_j [α z⁺_ij/Σ_i z⁺_ij − β z⁻_ij/Σ_i z⁻_ij] R_j`` for ``z (n, I, J)``, ``R_j (n, J)`` → ``(n, I)``."""
    zp, zn = z.clamp(min=0), z.clamp(max=0)
    sp, sn = zp.sum(1, keepdim=True), zn.sum(1, keepdim=True)
    pos = torch.where(sp > 0, zp / sp.clamp(min=1e-300), 0.0)
    neg = torch.where(sn < 0, zn / sn.clamp(max=-1e-300), 0.0)
    return ((alpha * pos - beta * neg) * relevance[:, None, :]).sum(2)


def _ref_linear(a: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    return _ab_dense(a[:, :, None] * weight.T[None], relevance, alpha, beta)


def _ref_conv(a: torch.Tensor, conv: nn.Conv2d, relevance: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Per output position ``(o, l)``: ``z_(c,kh,kw),(o,l)`` from the unfolded input patches; relevance folded back."""
    n, c, h, w = a.shape
    k = conv.kernel_size
    patches = F.unfold(a, k, padding=conv.padding, stride=conv.stride)  # (n, c·kh·kw, L)
    wf = conv.weight.reshape(conv.out_channels, -1)  # (O, c·kh·kw)
    length = patches.shape[2]
    z = patches[:, :, None, :] * wf.T[None, :, :, None]  # (n, I, O, L)
    zp, zn = z.clamp(min=0), z.clamp(max=0)
    sp, sn = zp.sum(1, keepdim=True), zn.sum(1, keepdim=True)
    pos = torch.where(sp > 0, zp / sp.clamp(min=1e-300), 0.0)
    neg = torch.where(sn < 0, zn / sn.clamp(max=-1e-300), 0.0)
    rel = relevance.reshape(n, 1, conv.out_channels, length)
    per_patch = ((alpha * pos - beta * neg) * rel).sum(2)  # (n, I, L)
    return F.fold(per_patch, (h, w), k, padding=conv.padding, stride=conv.stride)


class Chain(nn.Module):
    """conv → ReLU → flatten → linear, with biases (the rule leaves them out of the denominators)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.act(self.conv(x)), 1))


@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0), (3.0, 2.0)])
def test_alphabeta_equals_the_formula_layer_by_layer(alpha, beta) -> None:
    torch.manual_seed(0)
    model = Chain().double().eval()
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)  # signed pixels
    target = torch.tensor([0, 3, 4])
    got = lrp(model, x, target, rule="alphabeta", alpha=alpha, beta=beta)
    with torch.no_grad():
        a1 = model.act(model.conv(x))
        out = model(x)
        r_out = torch.zeros_like(out)
        r_out[torch.arange(3), target] = out[torch.arange(3), target]
        r_hidden = _ref_linear(a1.flatten(1), model.fc.weight, r_out, alpha, beta).reshape(a1.shape)
        expected = _ref_conv(x, model.conv, r_hidden, alpha, beta)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0)])
def test_one_layer_is_conservative(alpha, beta) -> None:
    """Σ_i R_i = (α − β) Σ_j R_j = Σ_j R_j for every output whose z⁺ and z⁻ are both non-zero."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double().eval()
    x = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for c in range(4):
        rel = lrp(model, x, c, rule="alphabeta", alpha=alpha, beta=beta)
        value = model(x)[:, c]
        torch.testing.assert_close(rel.sum((1, 2, 3)), value, rtol=1e-9, atol=1e-12)


class Net(nn.Module):
    def __init__(self, bias: bool, width: int = 6) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=bias)
        self.act1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, width, 3, padding=1, bias=bias)
        self.act2 = nn.ReLU()
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 5, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.pool(self.act1(self.conv1(x)))))
        return self.fc(torch.flatten(self.gap(x), 1))


def _net(bias: bool, seed: int = 0, width: int = 6) -> Net:
    torch.manual_seed(seed)
    return Net(bias, width).double().eval()


def test_alpha1_beta0_equals_captum_and_zplus_on_nonnegative_inputs() -> None:
    """captum's Alpha1_Beta0_Rule clamps the weights (biases zeroed with set_bias_to_zero): on inputs ≥ 0 that is
    α1β0; pools and GAP keep captum's ε rule (1e-9), as ours."""
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule

    model = _net(bias=True)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).abs()
    ours = lrp(model, x, 2, rule="alphabeta", alpha=1.0, beta=0.0, epsilon=1e-9)
    for layer in (model.conv1, model.conv2, model.fc):
        layer.rule = Alpha1_Beta0_Rule(set_bias_to_zero=True)
    expected = captum_attr.LRP(model).attribute(x, target=2)  # (captum removes the rules afterwards)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours, lrp(model, x, 2, rule="zplus", epsilon=1e-9), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("alpha,beta", [(2.0, 1.0), (1.0, 0.0)])
def test_alphabeta_conserves_relevance_on_a_bias_free_net(alpha, beta) -> None:
    """Conservative wherever every layer's z⁺ and z⁻ are non-zero: 32 GAP features of mixed-sign weights, so no
    class sees only one sign (the degenerate case is the next test)."""
    model = _net(bias=False, seed=4, width=32)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    target = torch.tensor([0, 1, 2, 3])
    rel = lrp(model, x, target, rule="alphabeta", alpha=alpha, beta=beta, epsilon=1e-12)
    value = model(x).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(rel.sum((1, 2, 3)), value, rtol=1e-6, atol=1e-9)
    # unit targets too: the relevance seeded at a unit sums to the unit's value
    rel_u = lrp(model, x, UnitTarget("act2", units=[1, 4], reduce="max"), rule="alphabeta", alpha=alpha, beta=beta,
                epsilon=1e-12)
    with torch.no_grad():
        unit = model.act2(model.conv2(model.pool(model.act1(model.conv1(x)))))[:, [1, 4]].amax((2, 3))
    torch.testing.assert_close(rel_u.sum((2, 3, 4)), unit, rtol=1e-6, atol=1e-9)


def test_a_one_signed_layer_passes_alpha_times_the_relevance() -> None:
    """Where Σ_i z⁻_ij = 0 (no negative contribution) the β term has nothing to divide: α·R_j flows down, the
    stabilised convention of zennit and captum (documented; conservation then needs α1β0)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 1, bias=False)).double().eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 2.0, -1.0]]))
    x = torch.tensor([[[[1.0]], [[2.0]], [[0.0]]]], dtype=torch.float64)  # the negative weight sees a zero
    value = float(model(x)[0, 0])
    assert float(lrp(model, x, 0, rule="alphabeta", alpha=2.0, beta=1.0).sum()) == pytest.approx(2 * value)
    assert float(lrp(model, x, 0, rule="alphabeta", alpha=1.0, beta=0.0).sum()) == pytest.approx(value)


def test_alpha2_beta1_differs_from_alpha1_beta0_and_has_negative_relevance() -> None:
    model, x = _net(bias=False, seed=4), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6),
                                                    dtype=torch.float64)
    a21 = lrp(model, x, 1, rule="alphabeta", alpha=2.0, beta=1.0)
    a10 = lrp(model, x, 1, rule="alphabeta", alpha=1.0, beta=0.0)
    assert (a21 - a10).abs().max() > 1e-3 * a10.abs().max()
    assert (a21 < 0).any()


@pytest.mark.parametrize("alpha,beta", [(2.0, 0.0), (1.0, 1.0), (0.5, -0.5)])
def test_alpha_minus_beta_must_be_one(alpha, beta) -> None:
    with pytest.raises(StageInputError, match="α − β = 1"):
        lrp(_net(bias=False), torch.zeros(1, 3, 8, 8, dtype=torch.float64), 0, rule="alphabeta", alpha=alpha, beta=beta)
