"""CLI commands end to end: run/verify/clean/layers/compare/dataset, exit codes and ``python -m``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd

from repdissect.pipeline import CacheStore
from repdissect.cli import main


def test_run_then_verify_detects_a_flipped_byte(tiny_config, capsys, tmp_path):
    assert main(["run", str(tiny_config), "--no-report"]) == 0
    assert "computed" in capsys.readouterr().out
    store = CacheStore(tmp_path / "cache")
    entries = list(store.iter_entries())
    stage, key, path = next(e for e in entries if e[0] == "thresholds")
    data = path / "thresholds.parquet"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x55
    data.write_bytes(bytes(raw))
    assert main(["verify", str(tiny_config)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT  thresholds/{key[:16]}" in out and f"{len(entries)} entries checked, 1 corrupt" in out
    # the quarantined entry is recomputed by the next run, and only it
    assert main(["run", str(tiny_config), "--no-report"]) == 0
    assert "1 computed" in capsys.readouterr().out
    assert main(["verify", str(tiny_config)]) == 0


def test_clean_removes_only_unreferenced_entries(tiny_config, capsys, tmp_path):
    assert main(["run", str(tiny_config), "--no-report"]) == 0
    store = CacheStore(tmp_path / "cache")
    before = {key for _, key, _ in store.iter_entries()}
    orphan = store.publish("thresholds", "ff" + "0" * 62, {"t": pd.DataFrame({"a": [1]}).pipe(
        __import__("pyarrow").Table.from_pandas)}, manifest={})
    capsys.readouterr()
    assert main(["clean", str(tiny_config), "--dry-run"]) == 0
    assert str(orphan.path) in capsys.readouterr().out and orphan.path.exists()
    assert main(["clean", str(tiny_config)]) == 0
    assert not orphan.path.exists()
    assert {key for _, key, _ in store.iter_entries()} == before


def test_layers_lists_names_and_shapes(capsys):
    assert main(["layers", "builtin:cnn", "--input-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "conv1 " in out and "32x32x32" in out


def test_compare_cli_writes_metric_table(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6))
    b = a[:, ::-1] * 3.0 + 1.0
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out_csv = tmp_path / "t.csv"
    assert main(["compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out", str(out_csv)]) == 0
    table = pd.read_csv(out_csv)
    assert list(table.columns) == ["metric", "value", "se", "ci_low", "ci_high", "p_value", "b_shuffled", "samples"]
    values = dict(zip(table["metric"], table["value"]))
    assert abs(values["hungarian_mean_corr"] - 1) < 1e-9 and abs(values["svcca_mean"] - 1) < 1e-6
    assert abs(values["shape_alpha0"]) < 1e-6 and abs(values["debiased_cka"] - 1) < 1e-9
    # B's rows shuffled: what independent data gives — far below the real pairing
    shuffled = dict(zip(table["metric"], table["b_shuffled"]))
    assert shuffled["svcca_mean"] < 0.3 and shuffled["hungarian_mean_corr"] < 0.2
    samples = dict(zip(table["metric"], table["samples"]))
    assert samples["svcca_mean"] == values["n_train"] == 400
    assert samples["lstsq_heldout_loss_a_from_b"] == values["n_heldout"] == 100
    assert "b_shuffled" in capsys.readouterr().out
    assert main(["compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--metrics", "procrustes,rsa",
                 "--permutations", "19", "--out", str(out_csv)]) == 0
    table = pd.read_csv(out_csv).set_index("metric")
    assert list(table.index) == ["procrustes", "rsa"] and (table.p_value == 0.05).all()


def test_sanity_command_prints_layer_identification_and_deletion_sensitivity(tmp_path, capsys):
    from helpers import write_tiny_config

    config = write_tiny_config(tmp_path, layers=("conv1", "conv2"))
    assert main(["sanity", str(config)]) == 0
    out = capsys.readouterr().out
    assert "layer identification" in out and "| cnn | linear\\_cka |" in out and "/4 |" in out
    # Ding et al.'s deletion test: one row per (layer, metric) and the mean over layers
    assert "sensitivity to principal-component deletion" in out
    assert "| conv1 | procrustes |" in out and "| mean over layers | rsa |" in out


def test_dataset_export_and_preview(tmp_path, capsys):
    out = tmp_path / "broden"
    assert main(["dataset", "export", "--kind", "synthetic", "--format", "broden", "--out", str(out),
                 "--images", "6", "--size", "32"]) == 0
    assert (out / "index.csv").is_file() and (out / "label.csv").is_file()
    png = tmp_path / "sheet.png"
    assert main(["dataset", "preview", "--out", str(png), "-n", "4"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_and_exit_code_2():
    proc = subprocess.run([sys.executable, "-m", "repdissect.cli", "run", "no/such/config.toml"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: config file 'no/such/config.toml' does not exist")
    assert "Traceback" not in proc.stderr
