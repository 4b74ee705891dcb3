"""Interpretable vs ordinary CNNs end to end on a tiny twin config: cache keys, tables 14–15 recomputed from the
stage tables, the figure, the findings row and the closing note; the shipped icnn config."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from repdissect.pipeline import ConfigError, load_config, run
from repdissect.pipeline._dag import build_plan
from repdissect.reports import summary_text, write_report
from repdissect.reports._data import RunData
from repdissect.reports._interpretable import icnn_closing_note, icnn_findings, icnn_twins

ROOT = Path(__file__).resolve().parents[2]

MODEL = """
[[models]]
name = "{name}"
architecture = "builtin:cnn"
seeds = [0, 1]
layers = ["conv1", "conv2"]
random_baseline = {random}
[models.arch]
width = 4
depth = 2
[models.train]
epochs = 1
batch_size = 32
{extra}
"""

CONFIG = """
[run]
name = "twins"
cache_dir = "{cache}"
out_dir = "{out}"
[dataset]
kind = "synthetic"
[dataset.params]
images = 64
size = 32
seed = 0
{models}
[thresholds]
quantile = 0.02
[stability]
top_k = 10
[compare]
alphas = [0.0]
match_thresholds = [0.5]
cka_layers = false
[extract]
batch_size = 32
[execution]
scheduler = "sync"
workers = 1
shard_size = 64
progress = false
"""

ICNN = 'interpretable_layer = "conv2"\ninterpretable_weight = 0.1\ninterpretable_tau = 5.0'


def _write(directory: Path, icnn_extra: str = ICNN, icnn_layers: str = "") -> Path:
    models = MODEL.format(name="cnn", random="true", extra="")
    twin = MODEL.format(name="icnn", random="false", extra=icnn_extra)
    if icnn_layers:
        twin = twin.replace('layers = ["conv1", "conv2"]', f"layers = {icnn_layers}")
    path = directory / "twins.toml"
    path.write_text(CONFIG.format(cache=(directory / "cache").as_posix(), out=(directory / "out").as_posix(),
                                  models=models + twin))
    return path


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("twins")
    result = run(_write(directory))
    index = write_report(result)
    return result, index


def _csv(index: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(index.parent / "tables" / f"{name}.csv", keep_default_na=False, na_values=[""])


def test_ordinary_train_key_ignores_the_interpretable_settings(tmp_path):
    plan = build_plan(load_config(_write(tmp_path)))
    train = {n.label["model"] + n.label["seed"]: n for n in plan.by_stage("train")}
    assert "interpretable_layer" not in train["cnn0"].params["train"]
    assert train["icnn0"].params["train"]["interpretable_layer"] == "conv2"
    assert train["cnn0"].key != train["icnn0"].key
    off = build_plan(load_config(_write(tmp_path, 'interpretable_layer = "conv2"\ninterpretable_weight = 0.0')))
    off_train = {n.label["model"] + n.label["seed"]: n for n in off.by_stage("train")}
    assert off_train["icnn0"].key == train["cnn0"].key  # weight 0 = ordinary training: the same cache entry
    # the twin's untrained networks would be the ordinary ones: same extraction keys
    extract = {n.label["instance"]: n.key for n in plan.by_stage("extract")}
    assert "icnn@s0-random" not in extract


@pytest.mark.parametrize("extra,layers,fragment", [
    ('interpretable_layer = "conv7"\ninterpretable_weight = 0.1', "", "conv7"),
    ('interpretable_layer = "fc"\ninterpretable_weight = 0.1', "", "not \\(C, H, W\\)"),
    ('interpretable_layer = "conv1"\ninterpretable_weight = 0.1', "", "run after it"),
    ('interpretable_weight = 0.1', "", "needs interpretable_layer"),
])
def test_bad_interpretable_configs_are_refused_at_load(tmp_path, extra, layers, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_plan(load_config(_write(tmp_path, extra, layers)))


def test_mask_off_at_eval_allows_later_layers(tmp_path):
    extra = 'interpretable_layer = "conv1"\ninterpretable_weight = 0.1\ninterpretable_mask_eval = false'
    plan = build_plan(load_config(_write(tmp_path, extra)))
    assert len(plan.by_stage("train")) == 4


def test_tables_match_the_stage_tables(twin_run):
    result, index = twin_run
    data = RunData(result)
    (twin,) = icnn_twins(data)
    assert (twin.icnn, twin.ordinary, twin.layer, twin.seeds) == ("icnn", "cnn", "conv2", (0, 1))
    stab = result.tables("stability", "summary")
    table = _csv(index, "14_icnn_instability")
    assert table["Layer"].tolist() == ["conv1", "conv2 (interpretable)"]
    for layer, row in zip(["conv1", "conv2"], table.to_dict("records")):
        def vals(instance_prefix, suffix=""):
            sub = stab[(stab.layer == layer)
                       & stab.instance.isin([f"{instance_prefix}@s{s}{suffix}" for s in (0, 1)])]
            return sub["instability"].where(sub["valid_units"] > 0).dropna().to_numpy()

        icnn, ordinary = vals("icnn"), vals("cnn")
        assert row["Interpretable_mean"] == pytest.approx(icnn.mean())
        assert row["Ordinary_mean"] == pytest.approx(ordinary.mean())
        assert row["Random init_mean"] == pytest.approx(vals("cnn", "-random").mean())
        lower = sum(a < b for a, b in zip(icnn, ordinary))
        assert row["Seeds interp. lower"] == f"{lower}/2"
    comparison = _csv(index, "15_icnn_comparison")
    acc = comparison[comparison.Measure == "Validation accuracy"].iloc[0]
    train = {(lab["model"], lab["seed"]): e.extras["final_val_acc"] for lab, e in result.entries("train")}
    assert acc["Interpretable_mean"] == pytest.approx(np.mean([train[("icnn", "0")], train[("icnn", "1")]]))
    assert acc["Ordinary_mean"] == pytest.approx(np.mean([train[("cnn", "0")], train[("cnn", "1")]]))
    cmp_ = result.tables("compare", "summary")
    hung = comparison[(comparison.Measure == "Hungarian-matched r (seed pairs)")
                      & (comparison.Layer == "conv2 (interpretable)")].iloc[0]
    icnn_pair = cmp_[(cmp_.a == "icnn@s0") & (cmp_.b == "icnn@s1") & (cmp_.layer == "conv2")]
    assert hung["Interpretable_mean"] == pytest.approx(float(icnn_pair["hungarian_mean_corr"].iloc[0]))
    assert hung["Interpretable_n"] == 1
    for name in ("14_icnn_instability", "15_icnn_comparison"):
        assert (index.parent / "tables" / f"{name}.tex").stat().st_size > 0
    assert (index.parent / "figures" / "icnn_instability.png").stat().st_size > 1000


def test_findings_row_and_closing_note(twin_run):
    result, index = twin_run
    data = RunData(result)
    (row,) = icnn_findings(data)
    table = _csv(index, "14_icnn_instability").set_index("Layer").loc["conv2 (interpretable)"]
    lower, n = (int(v) for v in table["Seeds interp. lower"].split("/"))
    expected = "holds" if lower == n else ("mixed" if table["Interpretable_mean"] < table["Ordinary_mean"] else "does not hold")
    assert row["verdict"] == expected and row["claim"].startswith("Interpretable filters")
    assert f"{table['Interpretable_mean']:.3f} vs {table['Ordinary_mean']:.3f}" in row["measured"]
    note = icnn_closing_note(data)
    assert "location instability at conv2" in note and "validation accuracy" in note
    assert note in summary_text(result)
    assert "filter loss on conv2" in index.read_text()
    categories = result.tables("train", "filter_categories")
    assert set(categories["model"]) == {"icnn"} and len(categories) == 2 * 8  # conv2 of width 4 · 2 = 8 filters


@pytest.mark.parametrize("name", ["icnn"])
def test_shipped_icnn_config_pairs_the_twins(name):
    config = load_config(ROOT / "configs" / f"{name}.toml")
    by_name = {m.name: m for m in config.models}
    icnn, cnn = by_name["icnn"], by_name["cnn"]
    assert icnn.train.interpretable and not cnn.train.interpretable
    assert icnn.seeds == cnn.seeds and icnn.arch == cnn.arch and icnn.layers == cnn.layers
    strip = lambda t: {k: v for k, v in t.to_dict().items() if not k.startswith("interpretable_")}  # noqa: E731
    assert strip(icnn.train) == strip(cnn.train)
    assert not math.isnan(icnn.train.interpretable_weight)
