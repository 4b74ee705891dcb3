"""Sanity checks of attribution maps: model randomisation (Adebayo et al. 2018), reruns, the concept-mass statistic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from helpers import one_torch_thread  # noqa: F401  (autouse: single-threaded torch)

from repdissect.stages.attribution import (
    ConceptMass, UnitTarget, concept_masks, grad_cam, guided_backprop, lrp, mass_fractions, occlusion, saliency,
    smoothgrad, top_exemplars,
)


def _task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16×16 noise images with one bright 4×4 square; class = which half (left/right) holds it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.3
    y = torch.randint(0, 2, (n,), generator=g)
    rows = torch.randint(0, 12, (n,), generator=g)
    cols = torch.randint(0, 4, (n,), generator=g) + 8 * y
    for i in range(n):
        x[i, :, rows[i]:rows[i] + 4, cols[i]:cols[i] + 4] += 2.0
    return x, y


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 2))


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, random_init = _net(0), _net(0)
    x, y = _task(512, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(80):
        idx = torch.arange(step * 32, step * 32 + 32) % 512
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    test_x, test_y = _task(64, 1)
    assert (model(test_x).argmax(1) == test_y).float().mean() > 0.9  # the net learned the task
    return model.eval(), random_init.eval(), test_x[:16]


def _rank_corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.abs().reshape(a.shape[0], -1).detach().numpy()
    b = b.abs().reshape(b.shape[0], -1).detach().numpy()
    return float(np.mean([spearmanr(u, v)[0] for u, v in zip(a, b)]))


@pytest.mark.parametrize("method", [
    saliency, lambda m, x, t: smoothgrad(m, x, t, samples=4, stdev=0.2),
    lambda m, x, t: grad_cam(m, x, t, layer="2"),
    lambda m, x, t: occlusion(m, x, t, window=(4, 4), stride=(2, 2)),
    lambda m, x, t: lrp(m, x, t),
])
def test_model_randomisation_changes_the_maps(trained, method) -> None:
    """Maps of the trained net differ from the random-init net's; a model-blind "method" does not."""
    model, random_init, x = trained
    target = model(x).argmax(1)
    corr = _rank_corr(method(model, x, target), method(random_init, x, target))
    assert corr < 0.8, corr
    blind = lambda m, x, t: x  # noqa: E731 - an edge-detector-like map that ignores the model
    assert _rank_corr(blind(model, x, target), blind(random_init, x, target)) == pytest.approx(1.0)


def test_guided_backprop_randomisation_is_reported_not_asserted(trained) -> None:
    """GB is known to stay correlated under randomisation (Adebayo et al.); it still must not be identical."""
    model, random_init, x = trained
    target = model(x).argmax(1)
    corr = _rank_corr(guided_backprop(model, x, target), guided_backprop(random_init, x, target))
    assert corr < 1.0


def test_reruns_are_bit_identical(trained) -> None:
    model, _, x = trained
    for fn in (lambda: guided_backprop(model, x, UnitTarget("4")), lambda: smoothgrad(model, x, 1, samples=3, seed=4),
               lambda: lrp(model, x, 0)):
        assert torch.equal(fn(), fn())


def test_concept_mass_merges_exactly_in_any_order() -> None:
    rng = np.random.default_rng(0)
    strength = torch.as_tensor(rng.random((12, 3, 8, 8)))
    masks = rng.random((12, 3, 4, 4)) > 0.6
    masks[0, 1] = False  # an image without the concept does not count
    frac, valid = mass_fractions(strength, masks)
    whole = ConceptMass([5, 6, 7])
    whole.update(frac, valid, masks)
    parts = []
    for sl in (slice(0, 5), slice(5, 7), slice(7, 12)):
        s = ConceptMass([5, 6, 7])
        s.update(frac[sl], valid[sl], masks[sl])
        parts.append(ConceptMass.from_table(s.to_table()))
    merged = parts[2].merge(parts[0]).merge(parts[1])
    assert merged.to_table().equals(whole.to_table())
    out = whole.result()
    # reference: area-average to 4×4, fraction inside per image, mean over images with the concept
    pooled = strength.reshape(12, 3, 4, 2, 4, 2).mean((3, 5)).numpy()
    for u in range(3):
        keep = masks[:, u].any((1, 2))
        ref = [(pooled[i, u] * masks[i, u]).sum() / pooled[i, u].sum() for i in np.flatnonzero(keep)]
        assert out["images"][u] == keep.sum()
        assert out["mass"][u] == pytest.approx(np.mean(ref), abs=1e-9)
        assert out["area"][u] == pytest.approx(masks[keep, u].mean())


def test_concept_masks_and_top_exemplars() -> None:
    labels = {"object": np.array([[[[0, 3], [3, 0]], [[2, 0], [0, 0]]]], np.int32)}  # (1, 2 layers, 2, 2)
    m = concept_masks(labels, [3, 2], ["object", "object"])
    assert m[0, 0].tolist() == [[False, True], [True, False]] and m[0, 1].tolist() == [[True, False], [False, False]]
    images, scores = top_exemplars(np.array([10, 11, 12]), np.array([[1.0, 5.0], [3.0, 5.0], [3.0, 1.0]]), 2)
    assert images.tolist() == [[11, 12], [10, 11]] and scores.tolist() == [[3.0, 3.0], [5.0, 5.0]]
