"""Model registry: built-in CNN family, torchvision by name, import strings, weights loading, layer names."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repdissect.stages._errors import StageInputError
from repdissect.stages._models import (
    ModelSpec,
    NormalizedModel,
    SmallCNN,
    build_model,
    layer_shapes,
    list_models,
    load_weights,
    register_model,
    resolve_layers,
)

from helpers import one_torch_thread  # noqa: F401 - an autouse fixture: torch runs single-threaded here


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def resnet_spec() -> ModelSpec:
    return ModelSpec("torchvision:resnet18", num_classes=5)


@pytest.fixture(scope="module")
def resnet(resnet_spec) -> NormalizedModel:
    return build_model(resnet_spec, seed=0)


# --------------------------------------------------------------------------------------------- builtin family


@pytest.mark.parametrize(
    "kwargs, widths",
    [({}, [32, 64, 128, 256]), ({"depth": 3, "width": 8}, [8, 16, 32]), ({"depth": 2, "widths": [5, 7]}, [5, 7])],
)
def test_builtin_cnn_names_its_blocks_and_follows_width_and_depth(kwargs, widths):
    model = build_model(ModelSpec("builtin:cnn", kwargs), seed=0, num_classes=3)
    shapes = dict(layer_shapes(model, (32, 32)))
    depth = len(widths)
    for i, width in enumerate(widths, start=1):
        side = 32 // 2 ** (i - 1)
        assert shapes[f"conv{i}"] == (width, side, side)
        assert shapes[f"conv{i}.conv"] == shapes[f"conv{i}.relu"] == (width, side, side)
    assert f"conv{depth + 1}" not in shapes
    assert shapes["fc"] == (3,)


def test_builtin_block_output_is_post_relu():
    model = build_model(ModelSpec("builtin:cnn", {"depth": 2, "width": 4}), seed=0, num_classes=2)
    seen = {}
    net = model.net
    net.conv2.bn.register_forward_hook(lambda m, i, o: seen.__setitem__("bn", o.clone()))
    net.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("block", o.clone()))
    with torch.inference_mode():
        model(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert (seen["bn"] < 0).any()
    assert torch.equal(seen["block"], seen["bn"].clamp_min(0))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [({"depth": 0}, "depth"), ({"width": 0}, "width"), ({"depth": 2, "widths": [4]}, "widths"), ({"kernel_size": 2}, "kernel_size"), ({"head_pool": "sum"}, "head_pool")],
)
def test_builtin_cnn_rejects_bad_shapes(kwargs, fragment):
    with pytest.raises(StageInputError, match=fragment):
        SmallCNN(**kwargs)


def test_unknown_arch_kwarg_is_reported():
    with pytest.raises(StageInputError, match="rejected its arguments"):
        build_model(ModelSpec("builtin:cnn", {"colour": "red"}), seed=0)


# --------------------------------------------------------------------------------------------- seeding


def test_seeded_construction_is_reproducible_and_leaves_the_global_rng_alone():
    spec = ModelSpec("builtin:cnn", {"depth": 2, "width": 4})
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    a = build_model(spec, seed=1, num_classes=3)
    b = build_model(spec, seed=1, num_classes=3)
    c = build_model(spec, seed=2, num_classes=3)
    assert torch.equal(torch.rand(4), expected)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_num_classes_precedence():
    assert build_model(ModelSpec("builtin:cnn", {"depth": 1, "width": 2}, num_classes=4), seed=0, num_classes=9).net.fc.out_features == 4
    assert build_model(ModelSpec("builtin:cnn", {"depth": 1, "width": 2}), seed=0, num_classes=9).net.fc.out_features == 9


def test_normalisation_is_inside_the_model():
    model = NormalizedModel(nn.Identity(), (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = model(images)
    expected = torch.tensor([(0 / 255 - 0.5) / 0.5, (51 / 255 - 0.25) / 0.25, (1.0 - 0.0) / 2.0])
    torch.testing.assert_close(out[0, :, 0, 0], expected)
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_channels_last_is_numerically_equivalent():
    spec = ModelSpec("builtin:cnn", {"depth": 3, "width": 8})
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    fast = build_model(spec, seed=0, num_classes=3)
    plain = build_model(spec, seed=0, num_classes=3, channels_last=False)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------- registry


def test_registry_lists_builtin_and_torchvision_models():
    names = list_models()
    assert "builtin:cnn" in names and "torchvision:resnet18" in names and "torchvision:alexnet" in names
    assert list_models("builtin:*") == [n for n in names if n.startswith("builtin:")]
    assert list_models("torchvision:resnet1*") == ["torchvision:resnet101", "torchvision:resnet152", "torchvision:resnet18"]


def test_register_model_rejects_duplicates_and_serves_new_names():
    @register_model("test-tiny-linear")
    def tiny(num_classes: int = 2) -> nn.Module:
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, num_classes))

    assert "builtin:test-tiny-linear" in list_models("builtin:*")
    assert isinstance(build_model(ModelSpec("builtin:test-tiny-linear"), seed=0).net, nn.Sequential)
    with pytest.raises(ValueError, match="already registered"):
        register_model("test-tiny-linear")(tiny)
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn")(SmallCNN)


@pytest.mark.parametrize(
    "architecture, fragment",
    [
        ("builtin:nope", "available: builtin:cnn"),
        ("torchvision:resnet19", "did you mean torchvision:resnet18"),
        ("resnet18", "package.module:factory"),
        ("no_such_package_xyz.models:net", "cannot import module"),
        ("torch.nn:NoSuchLayer", "has no attribute"),
        ("builtins:dict", "not a torch.nn.Module"),
        ("math:pi", "not callable"),
    ],
)
def test_bad_architectures_say_what_is_accepted(architecture, fragment):
    with pytest.raises(StageInputError, match=fragment):
        build_model(ModelSpec(architecture), seed=0)


def test_import_string_factory_receives_arch_kwargs_and_num_classes():
    spec = ModelSpec("repdissect.stages._models:SmallCNN", {"depth": 2, "width": 3})
    model = build_model(spec, seed=0, num_classes=6)
    assert isinstance(model.net, SmallCNN)
    assert model.net.conv2.conv.out_channels == 6 and model.net.fc.out_features == 6


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"architecture": ""}, "non-empty"),
        ({"num_classes": 0}, "num_classes"),
        ({"input_mean": (0.5, 0.5)}, "input_mean"),
        ({"input_std": (1.0, 0.0, 1.0)}, "input_std"),
        ({"arch_kwargs": [1, 2]}, "arch_kwargs"),
        ({"archtecture": "builtin:cnn"}, "unknown model setting"),
    ],
)
def test_bad_model_spec_names_the_setting(params, fragment):
    with pytest.raises(StageInputError, match=fragment):
        ModelSpec.from_dict(params)


def test_spec_dict_round_trip():
    spec = ModelSpec("torchvision:resnet18", {"zero_init_residual": True}, 10, "w.pt", (0.1, 0.2, 0.3), (1, 2, 3))
    assert ModelSpec.from_dict(spec.to_dict()) == spec


# --------------------------------------------------------------------------------------------- weights


@pytest.mark.parametrize("wrapping", ["raw", "state_dict", "model", "data_parallel"])
def test_torchvision_model_loads_a_saved_state_dict(tmp_path, resnet, resnet_spec, wrapping):
    state = resnet.net.state_dict()
    payload = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "data_parallel": {f"module.{k}": v for k, v in state.items()},
    }[wrapping]
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    loaded = build_model(ModelSpec(resnet_spec.architecture, num_classes=5, weights=str(path)), seed=123)
    assert _same_weights(loaded, resnet)
    assert not _same_weights(build_model(resnet_spec, seed=123), resnet)


def test_mismatched_weights_name_missing_and_unexpected_keys(tmp_path):
    small = build_model(ModelSpec("builtin:cnn", {"depth": 2, "width": 4}), seed=0, num_classes=5)
    path = tmp_path / "cnn.pt"
    torch.save(small.net.state_dict(), path)
    with pytest.raises(StageInputError) as info:
        build_model(ModelSpec("torchvision:resnet18", num_classes=5, weights=str(path)), seed=0)
    message = str(info.value)
    assert "missing keys" in message and "layer1.0.conv1.weight" in message
    assert "unexpected keys" in message and "conv1.conv.weight" in message


def test_shape_mismatch_lists_the_shapes(tmp_path, resnet):
    path = tmp_path / "resnet5.pt"
    torch.save(resnet.net.state_dict(), path)
    with pytest.raises(StageInputError, match=r"shape mismatches \(2\): fc\.weight \(weights \(5, 512\), model \(10, 512\)\)"):
        build_model(ModelSpec("torchvision:resnet18", num_classes=10, weights=str(path)), seed=0)


def test_batchnorm_counters_may_be_missing():
    model = build_model(ModelSpec("builtin:cnn", {"depth": 2, "width": 4}), seed=0, num_classes=2)
    state = {k: v.clone() + 1 for k, v in model.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    load_weights(model, state)
    assert torch.equal(model.net.conv1.conv.weight, state["conv1.conv.weight"])


@pytest.mark.parametrize(
    "payload, fragment",
    [([1, 2, 3], "not a state dict"), ({"epoch": 3, "optimizer": {}}, "not a state dict"), (nn.Linear(2, 2), "weights_only")],
)
def test_unusable_weight_files_are_explained(tmp_path, payload, fragment):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(StageInputError, match=fragment):
        build_model(ModelSpec("builtin:cnn", weights=str(path)), seed=0)


def test_missing_weight_file():
    with pytest.raises(StageInputError, match="does not exist"):
        build_model(ModelSpec("builtin:cnn", weights="no/such/file.pt"), seed=0)


# --------------------------------------------------------------------------------------------- layers


def test_layer_shapes_of_resnet18(resnet):
    shapes = dict(layer_shapes(resnet, (64, 64)))
    assert shapes["conv1"] == (64, 32, 32)
    assert shapes["layer1.0"] == (64, 16, 16)
    assert shapes["layer4"] == (512, 2, 2)
    assert shapes["avgpool"] == (512, 1, 1)
    assert shapes["fc"] == (5,)
    assert list(shapes) == [name for name, _ in resnet.net.named_modules() if name]
    assert resnet.training is False


def test_layer_shapes_of_alexnet():
    alexnet = build_model(ModelSpec("torchvision:alexnet", num_classes=3), seed=0)
    shapes = dict(layer_shapes(alexnet, (67, 67)))
    assert shapes["features.0"] == (64, 16, 16)
    assert shapes["features.12"] == (256, 1, 1)
    assert shapes["classifier.6"] == (3,)


def test_layer_shapes_keeps_training_mode_and_reports_small_inputs():
    model = build_model(ModelSpec("builtin:cnn"), seed=0, num_classes=2).train()
    layer_shapes(model, (16, 16))
    assert model.training
    with pytest.raises(StageInputError, match="input size 4×4"):
        layer_shapes(model, (4, 4))


def test_resolve_layers_returns_modules_in_order(resnet):
    found = resolve_layers(resnet, ["layer4", "layer1.0.conv2", "fc"])
    assert list(found) == ["layer4", "layer1.0.conv2", "fc"]
    assert found["fc"] is resnet.net.fc


@pytest.mark.parametrize(
    "names, fragment",
    [
        (["layer5"], "did you mean layer"),
        (["layer4", "nope"], "available layers: conv1, bn1, relu, maxpool, layer1"),
        ([], "no layers given"),
        (["fc", "fc"], "more than once"),
    ],
)
def test_resolve_layers_errors_list_the_available_layers(resnet, names, fragment):
    with pytest.raises(StageInputError, match=fragment):
        resolve_layers(resnet, names)
