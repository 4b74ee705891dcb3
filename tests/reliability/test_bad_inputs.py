"""Bad-input catalogue: every mistake a researcher can make ends as one actionable line and exit code 2.

Each case drives the real CLI in-process (``repdissect.cli.main``) and checks the contract of
the issue: exit code 2, one ``error:`` line naming the problem, the value received and the fix, no
traceback (unless ``--debug``), and no entry in the cache — config and plan errors stop before any task;
errors inside tasks (corrupt images, NaN activations, unknown weights) must not publish the failing node.
A few cases also run the real console script in a subprocess to prove exit code 2 end to end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from reliability_support import MINIMAL, cli_command, entry_names, run_cli, write_config


# ------------------------------------------------------------------------------------------------ helpers
def _expect_user_error(capsys, argv: list[Any], *facts: str, cache: Path | None = None) -> str:
    """Run ``argv``; assert exit 2, one error line containing every fact, no traceback, empty cache."""
    code, out, err = run_cli(argv, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected exactly one error line, got:\n{err}"
    message = lines[0]
    for fact in facts:
        assert fact in message, f"{fact!r} missing from the message: {message}"
    if cache is not None:
        assert entry_names(cache) == [], f"the cache holds entries after a bad-input failure: {entry_names(cache)}"
    return message


def _run_argv(config: Path) -> list[Any]:
    return ["run", config, "--no-report", "--no-progress"]


def _config(tmp_path: Path, edit: Callable[[dict[str, Any]], None] | None = None, base=MINIMAL) -> Path:
    return write_config(tmp_path, base, edit=edit)


def _set(section: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        target = data["models"][0] if section == "models" else data.setdefault(section, {})
        target[key] = value

    return edit


# ------------------------------------------------------------------------------------------------ config
def test_config_syntax_error(tmp_path, capsys):
    path = tmp_path / "broken.toml"
    path.write_text("[run\nname = 'x'\n")
    _expect_user_error(capsys, _run_argv(path), "broken.toml", "not valid TOML", "line 1")


def test_config_file_missing(tmp_path, capsys):
    _expect_user_error(capsys, _run_argv(tmp_path / "nope.toml"), "nope.toml", "does not exist")


def test_config_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[run]\nname = 'caf\xe9'\n".encode("latin-1"))
    _expect_user_error(capsys, _run_argv(path), "latin1.toml", "UTF-8")


CONFIG_CASES = [
    # id, edit, facts the message must name (key, value, what is allowed)
    ("unknown_top_level_key", lambda d: d.update(runs={"x": 1}), ["'runs'", "allowed keys"]),
    ("unknown_section_key", _set("thresholds", "quantil", 0.1), ["'quantil'", "[thresholds]", "quantile"]),
    ("quantile_wrong_type", _set("thresholds", "quantile", "0.01"), ["[thresholds].quantile", "'0.01'", "expected a number"]),
    ("quantile_zero", _set("thresholds", "quantile", 0.0), ["[thresholds].quantile", "0.0", "strictly between 0 and 1"]),
    ("quantile_above_one", _set("thresholds", "quantile", 1.5), ["[thresholds].quantile", "1.5", "strictly between 0 and 1"]),
    ("empty_seed_list", _set("models", "seeds", []), ["seeds", "[]", "at least one seed"]),
    ("negative_seed", _set("models", "seeds", [-3]), ["seeds", "-3", "≥ 0"]),
    ("seeds_wrong_type", _set("models", "seeds", 3), ["seeds", "3", "expected a list"]),
    ("negative_workers", _set("execution", "workers", -2), ["[execution].workers", "-2", "≥ 1"]),
    ("zero_batch_size", _set("extract", "batch_size", 0), ["[extract].batch_size", "0", "≥ 1"]),
    ("moved_batch_size", _set("execution", "batch_size", 64), ["[execution].batch_size", "64", "[extract].batch_size"]),
    ("holdout_out_of_range", _set("compare", "holdout", 1.0), ["[compare].holdout", "1.0", "strictly between 0 and 1"]),
    ("top_k_too_small", _set("stability", "top_k", 1), ["[stability].top_k", "1", "≥ 2"]),
    ("unknown_device", _set("execution", "device", "tpu"), ["[execution].device", "'tpu'", "'cpu'"]),
    ("unknown_dataset_kind", lambda d: d["dataset"].update(kind="imagenet"), ["[dataset].kind", "'imagenet'", "synthetic"]),
    ("dataset_negative_images", lambda d: d["dataset"]["params"].update(images=-4), ["images=-4", "≥ 1"]),
    ("zero_images", lambda d: d["dataset"]["params"].update(images=0), ["images=0", "≥ 1"]),
    ("unknown_dataset_parameter", lambda d: d["dataset"]["params"].update(colour=3), ["colour", "synthetic"]),
    ("weights_without_path", _set("models", "init", "weights"), ["weights", "init = \"weights\" needs"]),
    ("run_name_escaping", lambda d: d["run"].update(name="../../etc"), ["[run].name", "'../../etc'"]),
    ("model_name_invalid", _set("models", "name", "a/b"), ["name", "'a/b'"]),
]


@pytest.mark.parametrize("edit,facts", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_value_errors(tmp_path, capsys, edit, facts):
    config = _config(tmp_path, edit)
    _expect_user_error(capsys, _run_argv(config), *facts, cache=tmp_path / "cache")


def test_cli_override_out_of_range(tmp_path, capsys):
    config = _config(tmp_path)
    _expect_user_error(capsys, _run_argv(config) + ["--workers", "0"], "workers", "0", "≥ 1", cache=tmp_path / "cache")


def test_debug_flag_shows_the_traceback(tmp_path, capsys):
    from repdissect.pipeline import ConfigError

    config = _config(tmp_path, _set("thresholds", "quantile", 2.0))
    with pytest.raises(ConfigError, match="quantile"):
        run_cli(["--debug", *_run_argv(config)], capsys)


# ------------------------------------------------------------------------------------------------ models
MODEL_CASES = [
    ("unknown_builtin_architecture", {"architecture": "builtin:nope"}, ["'builtin:nope'", "builtin:cnn"]),
    ("unimportable_architecture", {"architecture": "no_such_package_xyz.models:make"},
     ["no_such_package_xyz", "cannot import", "PYTHONPATH"]),
    ("unknown_torchvision_architecture", {"architecture": "torchvision:resnet19"}, ["'torchvision:resnet19'", "resnet18"]),
    ("bad_architecture_kwargs", {"arch": {"width": 4, "depth": 2, "colour": 1}}, ["colour"]),
    ("unknown_layer", {"layers": ["conv9"]}, ["[[models]] 'cnn'", "'conv9'", "available layers: conv1"]),
]


@pytest.mark.parametrize("model,facts", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_model_errors(tmp_path, capsys, model, facts):
    config = _config(tmp_path, lambda d: d["models"][0].update(model))
    _expect_user_error(capsys, _run_argv(config), *facts, cache=tmp_path / "cache")


def _cnn_state(**arch: int) -> dict[str, torch.Tensor]:
    from repdissect.stages import ModelSpec, build_model
    from repdissect.stages._models import unwrap

    model = build_model(ModelSpec(architecture="builtin:cnn", arch_kwargs=arch or {"width": 4, "depth": 2},
                                  num_classes=3), seed=0)
    return {k: v.clone() for k, v in unwrap(model).state_dict().items()}


def _weights_config(tmp_path: Path, weights: Path) -> Path:
    def edit(d: dict[str, Any]) -> None:
        d["models"][0].update(init="weights", weights=weights.as_posix(), num_classes=3)

    return _config(tmp_path, edit)


def test_weights_file_missing(tmp_path, capsys):
    config = _weights_config(tmp_path, tmp_path / "missing.pt")
    _expect_user_error(capsys, _run_argv(config), "missing.pt", "not found", cache=tmp_path / "cache")


def test_weights_file_not_a_checkpoint(tmp_path, capsys):
    weights = tmp_path / "notes.pt"
    weights.write_bytes(b"these are not weights\n" * 10)
    config = _weights_config(tmp_path, weights)
    _expect_user_error(capsys, _run_argv(config), "notes.pt", "weights_only", "state_dict", cache=tmp_path / "cache")


class _Payload:
    """A pickle that would create a file when unpickled — ``weights_only=True`` must refuse it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_file_with_code_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = tmp_path / "evil.pt"
    torch.save({"conv1.0.weight": _Payload(str(marker))}, weights)
    assert not marker.exists()
    config = _weights_config(tmp_path, weights)
    _expect_user_error(capsys, _run_argv(config), "evil.pt", "weights_only", cache=tmp_path / "cache")
    assert not marker.exists(), "loading a checkpoint executed code from it"


def test_weights_with_mismatched_keys(tmp_path, capsys):
    state = _cnn_state()
    state["extra.weight"] = state.pop(next(iter(state)))
    weights = tmp_path / "other.pt"
    torch.save(state, weights)
    config = _weights_config(tmp_path, weights)
    _expect_user_error(capsys, _run_argv(config), "other.pt", "missing keys", "unexpected keys", "extra.weight",
                       cache=tmp_path / "cache")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_activations_with_nan_or_inf(tmp_path, capsys, value):
    state = _cnn_state()
    name = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
    state[name][:] = value
    weights = tmp_path / "broken.pt"
    torch.save(state, weights)
    config = _weights_config(tmp_path, weights)
    _expect_user_error(capsys, _run_argv(config), "conv1", "NaN", cache=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ datasets
@pytest.fixture(scope="module")
def broden_template(tmp_path_factory) -> Path:
    from repdissect.datasets import SyntheticWorld, export_broden

    root = tmp_path_factory.mktemp("broden") / "data"
    export_broden(SyntheticWorld(images=4, size=16, seed=0), root)
    return root


@pytest.fixture
def broden(tmp_path, broden_template) -> Path:
    root = tmp_path / "broden"
    shutil.copytree(broden_template, root, symlinks=True)
    return root


def _broden_config(tmp_path: Path, root: Path, **params: Any) -> Path:
    def edit(d: dict[str, Any]) -> None:
        d["dataset"] = {"kind": "broden", "params": {"root": root.as_posix(), **params}}

    return _config(tmp_path, edit)


def _index_rows(root: Path) -> list[str]:
    return (root / "index.csv").read_text().splitlines()


def _write_index(root: Path, rows: list[str]) -> None:
    (root / "index.csv").write_text("\n".join(rows) + "\n")


def _first_cell(root: Path, column: str, row: int = 1) -> str:
    rows = _index_rows(root)
    header = rows[0].split(",")
    return rows[row].split(",")[header.index(column)]


def test_broden_runs_when_intact(tmp_path, capsys, broden):
    """The control for the dataset cases below: the unmodified copy runs."""
    code, _, err = run_cli(_run_argv(_broden_config(tmp_path, broden)), capsys)
    assert code == 0, err


def test_missing_dataset_directory(tmp_path, capsys):
    config = _broden_config(tmp_path, tmp_path / "no-such-broden")
    _expect_user_error(capsys, _run_argv(config), "no-such-broden", "no such folder", cache=tmp_path / "cache")


def test_broden_row_with_wrong_field_count(tmp_path, capsys, broden):
    rows = _index_rows(broden)
    rows[2] = rows[2] + ",surplus"
    _write_index(broden, rows)
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), "index.csv, line 3", "fields",
                       cache=tmp_path / "cache")


def test_broden_row_with_non_integer_size(tmp_path, capsys, broden):
    rows = _index_rows(broden)
    cells = rows[1].split(",")
    cells[2] = "sixteen"  # ih
    rows[1] = ",".join(cells)
    _write_index(broden, rows)
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), "index.csv, line 2", "'sixteen'",
                       cache=tmp_path / "cache")


@pytest.mark.parametrize("bad_path", ["../../outside.png", "/etc/passwd"], ids=["dotdot", "absolute"])
def test_broden_path_escaping_the_root(tmp_path, capsys, broden, bad_path):
    rows = _index_rows(broden)
    cells = rows[1].split(",")
    cells[0] = bad_path
    rows[1] = ",".join(cells)
    _write_index(broden, rows)
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), "index.csv, line 2", repr(bad_path),
                       cache=tmp_path / "cache")


def test_broden_symlink_escaping_the_root(tmp_path, capsys, broden):
    outside = tmp_path / "outside.png"
    image = broden / "images" / _first_cell(broden, "image")
    shutil.copy(image, outside)
    image.unlink()
    image.symlink_to(outside)
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), "index.csv, line 2",
                       "outside the dataset folder", cache=tmp_path / "cache")


def test_corrupt_image(tmp_path, capsys, broden):
    image = broden / "images" / _first_cell(broden, "image", row=3)
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), "index.csv, line 4", image.name,
                       "cannot decode", cache=tmp_path / "cache")


def _first_label_png(root: Path) -> tuple[Path, int]:
    rows = _index_rows(root)
    for line, row in enumerate(rows[1:], start=2):
        for cell in row.split(",")[6:]:
            for item in cell.split(";"):
                if item.endswith(".png"):
                    return root / "images" / item, line
    raise AssertionError("the exported dataset has no label PNG")


def test_corrupt_label_png(tmp_path, capsys, broden):
    png, line = _first_label_png(broden)
    png.write_bytes(png.read_bytes()[:40])
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), f"index.csv, line {line}", png.name,
                       cache=tmp_path / "cache")


def test_label_png_of_the_wrong_size(tmp_path, capsys, broden):
    from PIL import Image

    png, line = _first_label_png(broden)
    Image.new("RGB", (5, 7)).save(png)
    _expect_user_error(capsys, _run_argv(_broden_config(tmp_path, broden)), f"index.csv, line {line}", png.name,
                       "7×5", "16×16", cache=tmp_path / "cache")


def test_image_folder_without_images(tmp_path, capsys):
    root = tmp_path / "folder"
    (root / "cats").mkdir(parents=True)
    (root / "cats" / "readme.txt").write_text("no images here")

    def edit(d: dict[str, Any]) -> None:
        d["dataset"] = {"kind": "imagefolder", "params": {"root": root.as_posix(), "size": 16}}

    _expect_user_error(capsys, _run_argv(_config(tmp_path, edit)), "no images found", cache=tmp_path / "cache")


def test_too_few_images_for_a_validation_split(tmp_path, capsys):
    def edit(d: dict[str, Any]) -> None:
        d["dataset"]["params"]["images"] = 4
        d["models"][0]["init"] = "trained"

    _expect_user_error(capsys, _run_argv(_config(tmp_path, edit)), "4 images", "'val' split", "at least 5",
                       cache=tmp_path / "cache")


def test_too_few_images_for_a_held_out_split(tmp_path, capsys):
    def edit(d: dict[str, Any]) -> None:
        d["dataset"]["params"]["images"] = 3
        d["models"][0]["seeds"] = [0, 1]
        d["compare"] = {"pairs": "seeds", "cka_layers": False}
        d["similarity"] = {"enabled": False}

    message = _expect_user_error(capsys, _run_argv(_config(tmp_path, edit)), "no held-out samples",
                                 "[compare].holdout = 0.2")
    assert not any(name.startswith(("moments/", "compare/")) for name in entry_names(tmp_path / "cache")), message


# ------------------------------------------------------------------------------------------------ compare CLI
def _npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def test_compare_different_sample_counts(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = _npy(tmp_path / "a.npy", rng.normal(size=(50, 4)))
    b = _npy(tmp_path / "b.npy", rng.normal(size=(40, 4)))
    _expect_user_error(capsys, ["compare", a, b], "50 samples", "40", "same samples")


def test_compare_arrays_with_nan(tmp_path, capsys):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(50, 4))
    values[3, 1] = np.nan
    a = _npy(tmp_path / "a.npy", values)
    b = _npy(tmp_path / "b.npy", rng.normal(size=(50, 4)))
    _expect_user_error(capsys, ["compare", a, b], "NaN")


def test_compare_missing_file(tmp_path, capsys):
    b = _npy(tmp_path / "b.npy", np.zeros((10, 2)))
    _expect_user_error(capsys, ["compare", tmp_path / "gone.npy", b], "gone.npy", "does not exist")


def test_compare_pickled_object_array_is_refused(tmp_path, capsys):
    path = tmp_path / "objects.npy"
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    b = _npy(tmp_path / "b.npy", np.zeros((2, 2)))
    _expect_user_error(capsys, ["compare", path, b], "objects.npy", "numeric")


def test_compare_maps_of_different_spatial_size_without_resize_rule(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = _npy(tmp_path / "a.npy", rng.normal(size=(6, 3, 8, 8)).astype(np.float32))
    b = _npy(tmp_path / "b.npy", rng.normal(size=(6, 5, 4, 4)).astype(np.float32))
    _expect_user_error(capsys, ["compare", a, b], "8×8", "4×4", "--resize smaller")
    code, out, err = run_cli(["compare", a, b, "--resize", "smaller", "--metrics", "linear_cka"], capsys)
    assert code == 0, err
    assert "linear_cka" in out


# ------------------------------------------------------------------------------------------------ execution
def test_unreachable_scheduler_address(tmp_path, capsys):
    config = _config(tmp_path)
    _expect_user_error(capsys, _run_argv(config) + ["--scheduler", "tcp://127.0.0.1:9"], "tcp://127.0.0.1:9",
                       "cannot reach", "--scheduler local", cache=tmp_path / "cache")


def test_cache_directory_not_writable(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = _config(tmp_path)
    _expect_user_error(capsys, _run_argv(config) + ["--cache", blocker / "cache"], str(blocker / "cache"),
                       "not writable", "--cache")


def test_models_over_different_datasets_are_not_compared(tmp_path):
    """Two extraction entries of different datasets (same image count): the moments node must refuse."""
    from repdissect.pipeline import CacheStore, load_config, run
    from repdissect.pipeline._dag import build_plan
    from repdissect.pipeline._executor import Executor, _SyncClient
    from repdissect.core import Node
    from repdissect.stages import StageInputError

    def random_pair(seed: int):
        def edit(d: dict[str, Any]) -> None:
            d["dataset"]["params"]["seed"] = seed
            d["run"]["cache_dir"] = (tmp_path / "cache").as_posix()

        return write_config(tmp_path / f"ds{seed}", MINIMAL, edit=edit)

    extracts = []
    for seed in (0, 1):
        cfg = load_config(random_pair(seed))
        result = run(cfg)
        extracts.append(next(n for n in result.plan.nodes if n.stage == "extract"))
    a, b = extracts
    assert a.digests["dataset"] != b.digests["dataset"]
    moments = Node(stage="moments", label={"a": "x", "b": "y", "kind": "seed", "layer": "conv1"},
                   params={"layer_a": "conv1", "layer_b": "conv1", "samples": "positions", "resize": "smaller",
                           "holdout": 0.2},
                   upstream={"a": a, "b": b}, version=1)
    store = CacheStore(tmp_path / "cache")
    plan = build_plan(cfg)
    executor = Executor(store=store, client=_SyncClient(), dataset_spec=plan.dataset_spec,
                        execution={"shard_size": 6, "resolved_device": "cpu"})
    with pytest.raises(StageInputError, match="different datasets"):
        executor.run([a, b, moments])
    assert store.get("moments", moments.key) is None
    assert not any(name.startswith("moments/") for name in entry_names(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("case", ["config", "scheduler"])
def test_console_script_exit_code_two(tmp_path, case):
    config = _config(tmp_path, _set("thresholds", "quantile", 0.0) if case == "config" else None)
    extra = ["--scheduler", "tcp://127.0.0.1:9"] if case == "scheduler" else []
    proc = subprocess.run(cli_command("run", config, "--no-report", "--no-progress", *extra), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("error: ") == 1
    assert entry_names(tmp_path / "cache") == []


def test_user_errors_in_tasks_are_returned_not_raised(tmp_path):
    """Deterministic user errors must not be retried by Dask (``retries`` would redo hours of work)."""
    from repdissect.pipeline._executor import UserFailure, task_combine, task_map, task_publish
    from repdissect.core import Context, Node
    from repdissect.stages import StageInputError

    node = Node(stage="thresholds", label={}, params={"layer": "conv1", "quantile": 0.01}, version=1)
    ctx = Context(node=node, cache_root=str(tmp_path), inputs={}, dataset_spec={}, execution={})

    class BadInputs(dict):
        def __getitem__(self, key):
            raise StageInputError("the activations of layer 'conv1' are unusable; recompute them")

    ctx.inputs = BadInputs()
    failure = task_map(ctx, 0, 0)
    assert isinstance(failure, UserFailure) and "conv1" in str(failure.error)
    assert task_combine(ctx, failure, None) is failure
    assert task_publish(ctx, failure, 0.0) is failure


@pytest.mark.slow
def test_bad_input_on_a_local_cluster_is_one_line(tmp_path, broden):
    image = broden / "images" / _first_cell(broden, "image", row=2)
    image.write_bytes(b"not a png")
    proc = subprocess.run(cli_command("run", _broden_config(tmp_path, broden), "--no-report", "--no-progress",
                                      "--scheduler", "local"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "index.csv, line 3" in errors[0] and "cannot decode" in errors[0]
    assert "Traceback" not in proc.stderr and "Compute Failed" not in proc.stderr and "INFO" not in proc.stderr
    assert entry_names(tmp_path / "cache") == []
