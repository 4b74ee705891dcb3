"""The ``[attribution]`` section through the pipeline: cached maps, sharded == whole, clear config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import one_torch_thread, write_tiny_config  # noqa: F401  (autouse fixture)
from repdissect.pipeline import ConfigError, load_config, run
from repdissect.stages.attribution import maps_from_table

SECTION = """
[attribution]
enabled = true
layers = ["conv2"]
unit_methods = ["guided_backprop", "grad_cam"]
class_methods = ["saliency", "grad_cam"]
top_k = 2
units = [0, 1, 2]
mass_images = 48
batch_size = 8
"""


def _config(directory: Path, shard: int, extra: str = SECTION) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = write_tiny_config(directory, layers=("conv1", "conv2"), shard=shard)
    path.write_text(path.read_text() + extra)
    return path


def test_attribution_is_cached_and_sharding_never_changes_a_bit(tmp_path: Path) -> None:
    a = run(_config(tmp_path / "a", shard=40))
    b = run(_config(tmp_path / "b", shard=16))
    exemplars = a.tables("attribute", "exemplars")
    assert sorted(exemplars["unit"].unique()) == [0, 1, 2] and (exemplars.groupby("unit").size() == 2).all()
    maps = a.tables("attribute", "unit_maps")
    assert sorted(maps["method"].unique()) == ["grad_cam", "guided_backprop"]
    shapes = {m: tuple(s) for m, s in zip(maps["method"], maps["shape"])}
    assert shapes["guided_backprop"] == (3, 32, 32) and shapes["grad_cam"] == (32, 32)  # cam at conv1 (no pool before)
    panels = a.tables("attribute", "class_maps")
    assert set(panels["method"]) == {"saliency", "grad_cam"} and panels["image"].nunique() >= 2
    for stage, table in (("attribution_mass", "units"), ("attribute", "unit_maps"), ("attribute", "class_maps")):
        ta, tb = a.tables(stage, table), b.tables(stage, table)
        if "map" in ta.columns:
            for x, y in zip(maps_from_table(ta), maps_from_table(tb)):
                assert np.array_equal(x, y)
            ta, tb = ta.drop(columns=["map", "shape"]), tb.drop(columns=["map", "shape"])
        pd.testing.assert_frame_equal(ta, tb)
    mass = a.tables("attribution_mass", "units")
    assert ((mass["mass"] >= 0) & (mass["mass"] <= 1)).all() and (mass["images"] > 0).all()
    again = run(_config(tmp_path / "a", shard=40))
    assert all(r.hit for r in again.results.values())
    from repdissect.reports import summary_text, write_run_report

    write_run_report(again)
    figures = {p.name for p in (tmp_path / "a" / "out" / "figures").iterdir()}
    assert {"attribution_units_cnn_s0_conv2.png", "attribution_classes_cnn_s0_conv2.png"} <= figures
    assert (tmp_path / "a" / "out" / "tables" / "16_attribution_mass.csv").is_file()
    assert "attribution concept mass" in summary_text(again)


@pytest.mark.parametrize("extra,match", [
    ("[attribution]\nenabled = true\nlayers = [\"conv9\"]\n", "not among model"),
    ("[attribution]\nenabled = true\nunit_methods = [\"cam\"]\n", "unit_methods"),
    ("[attribution]\nenabled = true\nlayers = [\"conv1\"]\n", "cam_layer"),
    ("[attribution]\nenabled = true\nimages = [100000]\n", "past the dataset"),
    ("[attribution]\nenabled = true\nlrp_rule = \"alphabeta\"\nlrp_alpha = 0.5\n", "lrp_alpha"),
    ("[attribution]\nenabled = true\nlime_segmentation = \"quickshift\"\n", "lime_segmentation"),
])
def test_bad_attribution_config_is_one_clear_error(tmp_path: Path, extra: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run(_config(tmp_path, shard=40, extra=extra))


@pytest.mark.slow
def test_cli_attribute_turns_the_section_on_and_writes_the_galleries(tmp_path: Path, capsys) -> None:
    from repdissect.cli import main

    config = write_tiny_config(tmp_path, layers=("conv1", "conv2"), shard=48)
    config.write_text(config.read_text() + "\n[attribution]\nunit_methods = [\"guided_backprop\"]\n"
                      "class_methods = [\"saliency\"]\nunits = [0, 1]\ntop_k = 1\nmass_images = 16\n")
    assert main(["attribute", str(config), "--images", "0,3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "attribution concept mass" in out
    figures = {p.name for p in (tmp_path / "out" / "figures").iterdir()}
    assert {"attribution_units_cnn_s0_conv2.png", "attribution_classes_cnn_s0_conv2.png"} <= figures
    assert (tmp_path / "out" / "tables" / "16_attribution_mass.csv").is_file()
    assert main(["attribute", str(config), "--images", "0,x"]) == 2
    assert "--images" in capsys.readouterr().err
