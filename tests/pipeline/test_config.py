"""Config loading: typed, frozen, validated once, one message naming key, value and what is allowed."""

import dataclasses
import tomllib
from pathlib import Path

import pytest

from repdissect.pipeline import ConfigError, load_config
from repdissect.pipeline._config import Config, config_from_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["demo", "quick"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / f"{name}.toml")
    assert isinstance(cfg, Config)
    assert cfg.run.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.name = "x"


def test_defaults_fill_missing_sections():
    cfg = config_from_dict({})
    assert cfg.thresholds.quantile == 0.005 and cfg.iou.threshold == 0.04 and cfg.stability.top_k == 100


def _load(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return load_config(path)


BAD = [
    ("[run]\nname = 'x'\ncolour = 1\n", r"unknown config key 'colour' in \[run\]: allowed keys are cache_dir, name, out_dir"),
    ("[thresholds]\nquantile = 1.5\n", r"\[thresholds\]\.quantile = 1\.5 is invalid: must be strictly between 0 and 1"),
    ("[thresholds]\nquantile = 0\n", r"quantile = 0(\.0)? is invalid"),
    ("[thresholds]\nquantile = 'high'\n", r"\[thresholds\]\.quantile = 'high' has the wrong type: expected a number"),
    ("[execution]\nworkers = 0\n", r"\[execution\]\.workers = 0 is invalid: must be an integer ≥ 1"),
    ("[execution]\nworkers = 2.5\n", r"workers = 2\.5 has the wrong type: expected an integer"),
    ("[execution]\ndevice = 'tpu'\n", r"device = 'tpu' is invalid: choose one of 'auto', 'cpu', 'cuda'"),
    ("[execution]\nprogress = 'yes'\n", r"progress = 'yes' has the wrong type: expected true or false"),
    ("[execution]\nparquet_engine = 'arrow'\n",
     r"parquet_engine = 'arrow' is invalid: choose one of 'auto', 'polars', 'pyarrow'"),
    ("[[models]]\nseeds = []\n", r"\[\[models\]\]\[0\]\.seeds = \[\] is invalid: give at least one seed"),
    ("[[models]]\nseeds = [1, 1]\n", r"seeds must be distinct"),
    ("[[models]]\nlayers = 'conv1'\n", r"layers = 'conv1' has the wrong type: expected a list of a string"),
    ("[[models]]\ninit = 'weights'\n", r"init = \"weights\" needs weights"),
    ("[[models]]\n[models.train]\nepochs = -1\n", r"\[\[models\]\]\[0\]\.train: training setting epochs must be an integer ≥ 1; got -1"),
    ("[[models]]\n[models.train]\nepochs = 2\nfoo = 1\n", r"unknown config key 'foo' in \[\[models\]\]\[0\]\.train"),
    ("[[models]]\nname='a'\n[[models]]\nname='a'\n", r"model names must be distinct"),
    ("[dataset]\nkind = 'imagenet'\n", r"\[dataset\]\.kind = 'imagenet' is invalid: choose one of"),
    ("[compare]\nholdout = 1.0\n", r"holdout = 1\.0 is invalid"),
    ("[compare]\nalphas = [-1.0]\n", r"alphas = \[-1\.0\] is invalid"),
    ("[iou]\nthreshold = -0.1\n", r"\[iou\]\.threshold = -0\.1 is invalid"),
    ("[run]\nname = 'a b'\n", r"\[run\]\.name = 'a b' is invalid"),
    ("models = 3\n", r"\[\[models\]\] = 3 has the wrong type"),
    ("[stability]\ntop_k = 1\n", r"top_k = 1 is invalid"),
    ("[similarity]\nmetrics = ['cka9']\n", r"\[similarity\]\.metrics = \['cka9'\] is invalid: choose a non-empty list"),
    ("[similarity]\ngroups = 1\n", r"\[similarity\]\.groups = 1 is invalid"),
    ("[similarity]\nsubset = 2\n", r"\[similarity\]\.subset = 2 is invalid"),
    ("[sensitivity]\norders = ['middle']\n", r"\[sensitivity\]\.orders = \['middle'\] is invalid: choose a non-empty"),
    ("[sensitivity]\nsteps = 1\n", r"\[sensitivity\]\.steps = 1 is invalid"),
    ("[sensitivity]\nmetrics = []\n", r"\[sensitivity\]\.metrics = \[\] is invalid"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_bad_values_name_key_value_and_fix(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, text)


def test_syntax_error_names_file_and_position(tmp_path):
    with pytest.raises(ConfigError, match=r"is not valid TOML .*line 1"):
        _load(tmp_path, "[run\nname = 1\n")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_validated():
    cfg = config_from_dict({})
    assert cfg.with_overrides(execution={"workers": 4}).execution.workers == 4
    with pytest.raises(ConfigError, match="workers = 0"):
        cfg.with_overrides(execution={"workers": 0})


def test_an_unusable_polars_engine_is_refused_at_load(tmp_path, monkeypatch):
    from repdissect.pipeline import _config

    monkeypatch.setattr(_config, "polars_unavailable_reason", lambda: "polars is not importable (No module named 'polars')")
    with pytest.raises(ConfigError, match=r"\[execution\]\.parquet_engine = 'polars' is invalid: polars is not "
                                          r"importable .*install polars>=2\.1 or use \"auto\" or \"pyarrow\""):
        _load(tmp_path, "[execution]\nparquet_engine = 'polars'\n")
    assert _load(tmp_path, "[execution]\nparquet_engine = 'auto'\n").execution.parquet_engine == "auto"


def test_similarity_defaults_name_every_registered_metric():
    from repdissect.pipeline import load_config
    from repdissect.stages.compare import REGISTRY

    assert load_config(None).similarity.metrics == list(REGISTRY)
