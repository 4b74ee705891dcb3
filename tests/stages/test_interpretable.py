"""Interpretable CNN (Zhang et al. 2018): templates, the masked forward pass, the mutual-information filter
loss (against scikit-learn's mutual information of the same joint distribution), filter categories, gradient
locality, a planted-part toy and training with the mode on and off."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import mutual_info_score

from repdissect.stages._errors import StageInputError
from repdissect.stages._interpretable import (
    FILTER_LOSS_COLUMNS,
    FilterCategories,
    InterpretableLayer,
    filter_mi_terms,
    iter_layers_after,
    locate_parts,
    mask_feature_map,
    positive_templates,
    template_masks,
)
from repdissect.stages._models import ModelSpec, build_model
from repdissect.stages._training import HISTORY_COLUMNS, TrainConfig, train_model, train_model_full

from helpers import one_torch_thread  # noqa: F401 - an autouse fixture: torch runs single-threaded here

from .test_training import SquaresAndDisks, TINY_SPEC, _weights_equal


# ------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("n", [3, 7, 14])
@pytest.mark.parametrize("beta", [4.0, 2.0])
def test_templates_follow_the_paper(n, beta):
    tau = 0.5 / n**2
    t = positive_templates(n, n, tau, beta).numpy()
    assert t.shape == (n * n, n, n)
    rows, cols = np.mgrid[0:n, 0:n]
    for mu in range(n * n):
        mi, mj = divmod(mu, n)
        expected = tau * np.maximum(1 - beta * (np.abs(rows - mi) + np.abs(cols - mj)) / n, -1)
        np.testing.assert_allclose(t[mu], expected, rtol=1e-6, atol=1e-9)
        assert t[mu, mi, mj] == pytest.approx(tau) and t[mu].max() == pytest.approx(tau)
        assert t[mu].min() >= -tau - 1e-12
        far = beta * (np.abs(rows - mi) + np.abs(cols - mj)) / n >= 2
        np.testing.assert_allclose(t[mu][far], -tau, rtol=1e-6)


def test_bad_template_parameters_are_refused():
    with pytest.raises(StageInputError, match="beta"):
        template_masks(4, 4, 0.0)
    with pytest.raises(StageInputError, match="alpha"):
        filter_mi_terms(torch.rand(2, 1, 3, 3), torch.ones(2, 1, dtype=torch.bool), alpha=1.5)


# ------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("n,peak", [(7, (3, 3)), (7, (0, 6)), (8, (5, 2)), (14, (9, 1))])
def test_masked_map_is_zero_outside_the_template(n, peak):
    generator = torch.Generator().manual_seed(n)
    x = torch.rand(2, 3, n, n, generator=generator) * 0.5
    x[:, :, peak[0], peak[1]] = 5.0
    mu = locate_parts(x, "argmax")
    assert (mu == peak[0] * n + peak[1]).all()
    masked = mask_feature_map(x, mu, beta=4.0)
    mask = template_masks(n, n, 4.0)[peak[0] * n + peak[1]]
    assert (masked >= 0).all()
    assert (masked[:, :, mask <= 0] == 0).all()
    assert (masked[:, :, peak[0], peak[1]] == 5.0).all()
    inside = mask > 0
    torch.testing.assert_close(masked[:, :, inside], x[:, :, inside] * mask[inside])


def test_centroid_and_argmax_differ_on_a_two_peak_map():
    x = torch.zeros(1, 1, 9, 9)
    x[0, 0, 1, 1] = 1.0
    x[0, 0, 7, 7] = 0.9
    assert int(locate_parts(x, "argmax")) == 1 * 9 + 1
    assert int(locate_parts(x, "centroid")) == 4 * 9 + 4  # the weighted mean (3.84, 3.84) rounds to (4, 4)
    assert int(locate_parts(torch.zeros(1, 1, 3, 3), "centroid")) == 0  # dead map: argmax fallback
    with pytest.raises(StageInputError, match="argmax"):
        locate_parts(x, "peak")


@pytest.mark.parametrize("mask_eval", [True, False])
def test_hook_masks_in_training_and_at_eval_only_if_asked(mask_eval):
    model = build_model(TINY_SPEC, seed=0, num_classes=2)
    images = torch.from_numpy(SquaresAndDisks().load(np.arange(4)).images)
    seen = {}
    handle = model.net.global_pool.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].clone()))
    with InterpretableLayer(model, "conv2", mask_eval=mask_eval) as hook:
        model.train()
        model(images)
        pre = hook.features.detach()
        mask = template_masks(*pre.shape[-2:], 4.0)[locate_parts(pre)]
        assert (seen["x"][mask <= 0] == 0).all() and not torch.equal(seen["x"], pre)
        model.eval()
        with torch.no_grad():
            plain_pre = {}
            model.net.conv2.register_forward_hook(lambda _m, _i, out: plain_pre.__setitem__("x", out.clone()),
                                                prepend=True)  # runs before the mask: the pre-mask map
            model(images)
        masked_at_eval = not torch.equal(seen["x"], plain_pre["x"])
        assert masked_at_eval is mask_eval
    handle.remove()


@pytest.mark.parametrize("head_pool,inert", [("max", True), ("avg", False)])
def test_mask_changes_the_output_only_when_the_head_sees_more_than_the_peak(head_pool, inert):
    # The mask is 1 at the argmax and ≤ 1 elsewhere, so a global max-pool head (the built-in CNN's default)
    # sees exactly the unmasked maximum: there the forward mask is inert and only the filter loss acts.
    spec = ModelSpec("builtin:cnn", {"depth": 2, "width": 4, "head_pool": head_pool})
    model = build_model(spec, seed=0, num_classes=2)
    images = torch.from_numpy(SquaresAndDisks().load(np.arange(4)).images)
    with torch.no_grad():
        plain = model(images)
        with InterpretableLayer(model, "conv2", mask_eval=True):
            masked = model(images)
    assert torch.equal(plain, masked) is inert


# ------------------------------------------------------------------------------------------- filter loss
def _joint_reference(x: np.ndarray, positives: np.ndarray, tau: float, beta: float, alpha: float) -> list[np.ndarray]:
    """Per filter, the joint p(T, x) of the paper's definition, written out directly (float64, no log-space)."""
    b, c, h, w = x.shape
    cells = h * w
    alpha = alpha or cells / (1 + cells)  # the paper: p(T_μ) = α/n², p(T⁻) = 1 − α
    templates = positive_templates(h, w, tau / cells, beta).double().numpy().reshape(cells, -1)
    out = []
    for f in range(c):
        flat = x[:, f].reshape(b, -1).astype(np.float64)
        scores = np.concatenate([(-tau / cells) * flat.sum(1, keepdims=True), flat @ templates.T], axis=1)
        pos = positives[:, f]
        prior = np.r_[1 - alpha, np.full(cells, alpha / cells)] if pos.any() else np.r_[1.0, np.zeros(cells)]
        support = np.ones_like(scores, dtype=bool)
        support[:, 1:] = pos[:, None] if pos.any() else True
        lik = np.where(support, np.exp(scores - scores.max()), 0.0)
        lik /= lik.sum(0, keepdims=True)
        out.append(lik * prior[None, :])  # (B, T), sums to 1
    return out


CASES = {
    "random": (torch.rand(12, 4, 5, 5, generator=torch.Generator().manual_seed(0)), 0.3, 0.5, 4.0, 0.0),
    "strong": (torch.rand(10, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 4, 0.5, 5.0, 4.0, 0.3),
    "rectangular": (torch.rand(8, 2, 4, 7, generator=torch.Generator().manual_seed(2)), 0.5, 2.0, 2.0, 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_filter_loss_is_minus_mutual_information_and_decomposes(case):
    x, fraction, tau, beta, alpha = CASES[case]
    positives = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(5)) < fraction
    positives[:, 0] = False  # a filter whose category is not in the batch
    positives[0, 1] = True
    terms = filter_mi_terms(x, positives, tau=tau, beta=beta, alpha=alpha)
    for f, joint in enumerate(_joint_reference(x.numpy(), positives.numpy(), tau, beta, alpha)):
        used = joint[:, joint.sum(axis=0) > 0]  # templates with prior 0 (no positives) carry no mass
        expected = mutual_info_score(None, None, contingency=used * 1e8)  # scikit-learn normalises (and multiplies marginals as int64)
        assert float(terms["mi"][f]) == pytest.approx(expected, abs=1e-5)
    assert (terms["loss"] <= 1e-7).all()
    assert float(terms["loss"][0]) == 0.0
    torch.testing.assert_close(terms["neg_entropy"] + terms["inter_category"] + terms["spatial"], terms["loss"],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w", [(3, 3), (8, 8), (4, 7)])
def test_default_prior_is_the_papers_uniform_one(h, w):
    # Zhang et al.: p(T_μ) = α/n², p(T⁻) = 1 − α with α = n²/(1 + n²): every one of the n² + 1 templates has
    # prior 1/(1 + n²), so −H(T) = −log(1 + n²) bounds the loss from below. (The negative template taking α
    # instead caps the mutual information at ≈ 0.14 nats for an 8×8 map and left the loss inert.)
    x = torch.rand(6, 2, h, w, generator=torch.Generator().manual_seed(h * w))
    terms = filter_mi_terms(x, torch.ones(6, 2, dtype=torch.bool), tau=5.0)
    torch.testing.assert_close(terms["neg_entropy"], torch.full((2,), -float(np.log(1 + h * w))))
    half = filter_mi_terms(x, torch.ones(6, 2, dtype=torch.bool), tau=5.0, alpha=0.5)
    expected = 0.5 * np.log(0.5) + 0.5 * np.log(0.5 / (h * w))  # p(T⁻) = 1 − α = 0.5, each T_μ 0.5/HW
    torch.testing.assert_close(half["neg_entropy"], torch.full((2,), float(expected)))


def test_a_part_detector_scores_far_below_a_diffuse_filter():
    # One filter peaks sharply at a different cell in each positive image and is silent on the negatives;
    # the other is diffuse noise. Under the paper's prior the detector's loss is well below −½·log(positives)
    # (its images are told apart by their templates) while the diffuse one stays near 0; with the roles of
    # the priors swapped (p(T⁻) = n²/(1 + n²)) even the perfect detector could not pass −H(T) ≈ −0.22.
    b, n = 8, 6
    x = torch.rand(b, 2, n, n, generator=torch.Generator().manual_seed(0)) * 0.1
    x[:, 0] = 0.0
    for i in range(b // 2):
        x[i, 0, i, (2 * i) % n] = 40.0
    positives = (torch.arange(b) < b // 2).view(-1, 1).expand(b, 2)
    loss = filter_mi_terms(x, positives, tau=5.0)["loss"]
    assert float(loss[0]) < -0.5 * np.log(b // 2) and float(loss[1]) > -0.1
    swapped = filter_mi_terms(x, positives, tau=5.0, alpha=1 / (1 + n * n))
    assert float(swapped["loss"][0]) >= float(swapped["neg_entropy"][0]) > -0.25


@pytest.mark.parametrize("name,x,positives", [
    ("dead filters", torch.zeros(6, 3, 4, 4), torch.ones(6, 3, dtype=torch.bool)),
    ("huge activations", torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 1e3,
     torch.arange(6).view(-1, 1).expand(6, 3) % 2 == 0),
    ("no positives", torch.rand(6, 3, 4, 4), torch.zeros(6, 3, dtype=torch.bool)),
    ("empty batch", torch.zeros(0, 3, 4, 4), torch.zeros(0, 3, dtype=torch.bool)),
    ("one image", torch.rand(1, 3, 4, 4), torch.ones(1, 3, dtype=torch.bool)),
])
def test_filter_loss_and_its_gradient_are_finite(name, x, positives):
    x = x.clone().requires_grad_(True)
    terms = filter_mi_terms(x, positives, tau=5.0)
    for key, value in terms.items():
        assert torch.isfinite(value).all(), (name, key)
    terms["loss"].sum().backward()
    assert torch.isfinite(x.grad).all(), name
    assert (terms["loss"] <= 1e-6).all(), name


def _planted_part_toy(n: int = 64, size: int = 16) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Class 0 has a red 3×3 square at a random place on dark noise; class 1 is noise only."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, size=(n, 3, size, size)).astype(np.uint8)
    labels = np.arange(n) % 2
    centres = np.zeros((n, 2), np.int64)
    for i in np.flatnonzero(labels == 0):
        r, c = rng.integers(1, size - 3, size=2)
        images[i, 0, r:r + 3, c:c + 3] = 255
        images[i, 1:, r:r + 3, c:c + 3] = 0
        centres[i] = (r + 1, c + 1)
    return torch.from_numpy(images), torch.from_numpy(labels), centres


def test_filter_loss_decreases_and_finds_the_planted_part():
    images, labels, centres = _planted_part_toy()
    model = build_model(ModelSpec("builtin:cnn", {"depth": 2, "widths": [8, 4]}), seed=0, num_classes=2)
    params = [p for name, p in model.named_parameters() if not name.startswith("net.fc")]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    positives = (labels == 0).view(-1, 1).expand(-1, 4)
    part = labels.numpy() == 0

    def near_part(features: torch.Tensor) -> np.ndarray:
        flat = features.detach().reshape(len(labels), 4, -1).argmax(2).numpy()
        rows, cols = flat // 8, flat % 8  # the 8×8 map of a 16-px image: cell = pixel // 2
        d = np.abs(rows - centres[:, :1] // 2) + np.abs(cols - centres[:, 1:] // 2)
        return (d[part] <= 1).mean(axis=0)

    losses = []
    with InterpretableLayer(model, "conv2") as hook:
        model.train()
        for step in range(60):
            model(images)
            if step == 0:
                before = near_part(hook.features)
            loss = filter_mi_terms(hook.features, positives, tau=5.0)["loss"].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        model(images)
        after = near_part(hook.features)
        silent = hook.features.detach()[~torch.from_numpy(part)].mean() / hook.features.detach()[torch.from_numpy(part)].mean()
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 3 * losses[0] < 0  # the mutual information at least triples
    assert (before < 0.9).sum() >= 2  # at least two untrained filters peak elsewhere
    assert after.min() >= 0.9, after  # every filter's peak lands on the part in ≥ 90 % of the part images
    assert float(silent) < 0.2  # and the filters are nearly silent on the other category


def test_filter_loss_gradient_reaches_only_the_layer_and_below():
    model = build_model(ModelSpec("builtin:cnn", {"depth": 3, "width": 4}), seed=0, num_classes=2)
    images = torch.from_numpy(SquaresAndDisks().load(np.arange(8)).images)
    with InterpretableLayer(model, "conv2") as hook:
        model.train()
        model(images)
        positives = FilterCategories(2, hook.features.shape[1]).positives(torch.zeros(8, dtype=torch.long))
        filter_mi_terms(hook.features, positives, tau=5.0)["loss"].sum().backward()
    for name, param in model.net.named_parameters():
        below = name.startswith(("conv1.", "conv2."))
        if below and name.endswith("weight"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        if not below:
            assert param.grad is None or not param.grad.any(), name


# ------------------------------------------------------------------------------------------- categories
def test_filter_categories_follow_the_mean_peak_response():
    cats = FilterCategories(3, 2, momentum=0.5)
    assert cats.positives(torch.tensor([0, 2])).all()  # before any update: every image is a positive
    x = torch.zeros(4, 2, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 1, 1], x[2, 1, 0, 1], x[3, 1, 1, 0] = 2.0, 4.0, 1.0, 3.0
    labels = torch.tensor([0, 0, 1, 2])
    cats.update(x, labels)
    assert cats.assigned().tolist() == [0, 2]  # filter 0: class 0 (mean 3); filter 1: class 2 (3 > 1)
    assert cats.positives(labels).tolist() == [[True, False], [True, False], [False, False], [False, True]]
    x2 = torch.zeros(1, 2, 2, 2)
    x2[0, 1] = 10.0
    cats.update(x2, torch.tensor([1]))  # class 1's filter-1 EMA: 0.5·1 + 0.5·10 = 5.5 > 3
    assert cats.assigned().tolist() == [0, 1]
    table = cats.table(["a", "b", "c"])
    assert table["category_name"].tolist() == ["a", "b"] and table["response"].tolist() == [3.0, 5.5]


def test_layers_after():
    model = build_model(ModelSpec("builtin:cnn", {"depth": 3, "width": 4}), seed=0, num_classes=2)
    after = list(iter_layers_after(model, "conv2", (16, 16)))
    assert "conv3" in after and "fc" in after and "conv1" not in after and "conv2.relu" not in after


# ------------------------------------------------------------------------------------------- training
FAST = TrainConfig(epochs=2, batch_size=16, lr=0.05, augment_shift=1)


def test_weight_zero_is_ordinary_training_bit_for_bit():
    toy = SquaresAndDisks(images=96)
    ordinary, history = train_model(TINY_SPEC, toy, seed=1, config=FAST, num_threads=1)
    off = TrainConfig(**{**FAST.to_dict(), "interpretable_layer": "conv2", "interpretable_weight": 0.0,
                         "interpretable_tau": 9.0})
    result = train_model_full(TINY_SPEC, toy, seed=1, config=off, num_threads=1)
    assert _weights_equal(ordinary, result.state_dict)
    assert result.filter_categories is None and list(result.history.columns) == list(HISTORY_COLUMNS)
    assert off.to_dict() == FAST.to_dict()  # the same cache key too


def test_interpretable_training_changes_weights_and_records_its_loss():
    toy = SquaresAndDisks(images=96)
    ordinary, _ = train_model(TINY_SPEC, toy, seed=1, config=FAST, num_threads=1)
    on = TrainConfig(**{**FAST.to_dict(), "interpretable_layer": "conv2", "interpretable_weight": 0.1,
                        "interpretable_tau": 5.0})
    first = train_model_full(TINY_SPEC, toy, seed=1, config=on, num_threads=1)
    second = train_model_full(TINY_SPEC, toy, seed=1, config=on, num_threads=1)
    assert not _weights_equal(ordinary, first.state_dict)
    assert _weights_equal(first.state_dict, second.state_dict)  # deterministic on the CPU
    assert list(first.history.columns) == list(HISTORY_COLUMNS) + list(FILTER_LOSS_COLUMNS)
    assert np.isfinite(first.history[list(FILTER_LOSS_COLUMNS)].to_numpy()).all()
    assert (first.history["filter_loss"] < 0).all()
    assert first.filter_categories["unit"].tolist() == list(range(8))
    assert set(first.filter_categories["category_name"]) <= {"square", "disk"}
    assert "interpretable_layer" in on.to_dict() and on.to_dict()["interpretable_tau"] == 5.0
    build_model(TINY_SPEC, seed=1, num_classes=2, state_dict=first.state_dict)  # the plain network's weights


@pytest.mark.parametrize("params,fragment", [
    ({"interpretable_weight": 0.1}, "needs interpretable_layer"),
    ({"interpretable_layer": "conv2", "interpretable_weight": -1.0}, "interpretable_weight"),
    ({"interpretable_locate": "peak"}, "interpretable_locate"),
    ({"interpretable_alpha": 1.0}, "interpretable_alpha"),
    ({"interpretable_tau": 0.0}, "interpretable_tau"),
])
def test_bad_interpretable_settings_name_the_setting(params, fragment):
    with pytest.raises(StageInputError, match=fragment):
        TrainConfig(**params)


def test_unknown_interpretable_layer_fails_with_the_layer_name():
    toy = SquaresAndDisks(images=32)
    config = TrainConfig(epochs=1, batch_size=16, interpretable_layer="conv9", interpretable_weight=0.1)
    with pytest.raises(StageInputError, match="conv9"):
        train_model(TINY_SPEC, toy, seed=0, config=config, num_threads=1)


@pytest.mark.parametrize("architecture,arch,layer", [
    ("builtin:cnn", {"depth": 3, "width": 4}, "conv3"),
    ("torchvision:resnet18", {}, "layer4"),
])
def test_any_registry_network_takes_the_filter_loss(architecture, arch, layer):
    if architecture.startswith("torchvision"):
        pytest.importorskip("torchvision")
    model = build_model(ModelSpec(architecture, arch), seed=0, num_classes=3)
    images = torch.from_numpy(SquaresAndDisks(size=64).load(np.arange(4)).images)
    with InterpretableLayer(model, layer) as hook:
        model.train()
        logits = model(images)
        features = hook.features
        assert features.ndim == 4 and logits.shape == (4, 3)
        categories = FilterCategories(3, features.shape[1])
        categories.update(features, torch.tensor([0, 1, 2, 0]))
        loss = filter_mi_terms(features, categories.positives(torch.tensor([0, 1, 2, 0])), tau=5.0)["loss"].sum()
        loss.backward()
        assert torch.isfinite(loss)
    head = [p for n, p in model.net.named_parameters() if n.startswith(("fc.", "classifier."))]
    assert head and all(p.grad is None for p in head)
