"""report_from_cache: refuses (naming the missing nodes and the fix) when the cache lacks the run; regenerates
the same tables as the run wrote when it has it, copying every piece into a new folder without loading
torch, pandas or matplotlib (the slow test runs the real pipeline on a tiny config)."""

import filecmp
import json
import subprocess
import sys

import pytest

from repdissect.pipeline import PipelineError
from repdissect.reports import report_from_cache, summary_text

TINY = """
[run]
name = "tiny"

[dataset]
kind = "synthetic"

[dataset.params]
images = 96
size = 32
seed = 0

[[models]]
name = "cnn"
architecture = "builtin:cnn"
seeds = [0, 1]
layers = ["conv2", "conv3"]

[models.arch]
width = 8
depth = 3

[models.train]
epochs = 1
batch_size = 32

[thresholds]
quantile = 0.02

[stability]
top_k = 10

[compare]
alphas = [0.0, 0.1]
match_thresholds = [0.3]

[extract]
batch_size = 48

[execution]
scheduler = "sync"
shard_size = 48
"""


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_missing_cache_names_the_nodes_and_the_fix(tiny_config, tmp_path):
    with pytest.raises(PipelineError) as info:
        report_from_cache(tiny_config, cache_dir=tmp_path / "empty-cache", out_dir=tmp_path / "out")
    message = str(info.value)
    assert "not cached" in message and "train[model=cnn,seed=0]" in message
    assert "repdissect run" in message
    assert not (tmp_path / "out" / "index.html").exists()


@pytest.mark.slow
def test_regenerated_report_equals_the_run_report(tiny_config, tmp_path):
    from repdissect.pipeline import run
    from repdissect.reports import write_run_report

    result = run(tiny_config, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "run-out"), progress=False)
    assert write_run_report(result) and not write_run_report(result)  # the second finds it current
    assert (tmp_path / "run-out" / "index.html").is_file()
    again = report_from_cache(tiny_config, cache_dir=tmp_path / "cache", out_dir=tmp_path / "regen-out")
    assert again.misses == 0
    first = sorted(p.name for p in (tmp_path / "run-out" / "tables").iterdir())
    second = sorted(p.name for p in (tmp_path / "regen-out" / "tables").iterdir())
    assert first == second and len(first) == 3 * 14  # 14 tables, each as Markdown, LaTeX and CSV
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "run-out" / "tables", tmp_path / "regen-out" / "tables",
                                               first, shallow=False)
    # Training times are the same cached numbers, so every table file is byte-identical.
    assert mismatch == [] and errors == []
    assert summary_text(again).splitlines()[1:-1] == summary_text(result).splitlines()[1:-1]
    # Into a new folder (no run.json there, every node a hit): every piece is copied, none drawn ...
    assert json.loads((tmp_path / "regen-out" / "report.json").read_text())["pieces"]["drawn"] == []
    # ... and the command loads neither torch (the plan skips building cached models) nor pandas/matplotlib.
    code = ("import sys; from repdissect.cli import main; "
            f"code = main(['report', {str(tiny_config)!r}, '--cache', {str(tmp_path / 'cache')!r}, "
            f"'--out', {str(tmp_path / 'cli-out')!r}]); "
            "print(code, sorted(m for m in ('torch', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stderr[-2000:]
    assert json.loads((tmp_path / "cli-out" / "report.json").read_text())["pieces"]["drawn"] == []
