"""Report copies in the cache: a report drawn once is copied (never redrawn) into any new folder with the same
inputs; anything that changes a file (a key, the config, what the page states) draws it again; a damaged
copy is dropped and redrawn."""

from __future__ import annotations

import dataclasses
import filecmp
import json
from pathlib import Path

import pytest

import repdissect.reports._data as data_module
from repdissect.core import MANIFEST, REPORTS
from repdissect.reports import write_report
from repdissect.reports._report_cache import report_stamp


def _files(out: Path) -> list[str]:
    return sorted(json.loads((out / "report.json").read_text())["files"])


@pytest.fixture
def no_drawing(monkeypatch):
    """Fail the test if the report is computed (its data read) instead of copied."""
    calls = []

    def refuse(result):
        calls.append(result)
        raise AssertionError("the report was drawn, not copied")

    monkeypatch.setattr(data_module, "RunData", refuse)
    return calls


def _copies(result) -> Path:
    return Path(result.plan.config.run.cache_dir) / REPORTS


def test_a_warm_report_into_a_new_folder_is_copied(fake_run, tmp_path, no_drawing):
    result, index = fake_run
    drawn = index.parent
    stamp = report_stamp(result)
    assert (_copies(result) / stamp / MANIFEST).is_file()
    out = tmp_path / "new-folder"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"x")  # left by an earlier report here: pruned
    (out / "report.json").write_text(json.dumps({"files": ["figures/stale.png"]}))
    again = write_report(dataclasses.replace(result, out_dir=out))
    assert again == out.absolute() / "index.html" and not no_drawing
    assert not (out / "figures" / "stale.png").exists()
    files = _files(out)
    assert files == _files(drawn) and len(files) > 20
    match, mismatch, errors = filecmp.cmpfiles(drawn, out, files, shallow=False)
    assert mismatch == [] and errors == []
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.parametrize("change", ["key", "config", "gallery", "run_json"])
def test_what_changes_a_file_changes_the_stamp(fake_run, tmp_path, change):
    result, _ = fake_run
    base = report_stamp(result)
    if change == "key":
        node = dataclasses.replace(result.plan.nodes[0], params={**result.plan.nodes[0].params, "x": 1})
        nodes = [dataclasses.replace(node, key=""), *result.plan.nodes[1:]]
        other = dataclasses.replace(result, plan=dataclasses.replace(result.plan, nodes=nodes))
        assert report_stamp(other) != base
    elif change == "config":
        cfg = result.plan.config
        renamed = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name="another"))
        moved = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, out_dir=str(tmp_path / "x"),
                                                                 cache_dir=str(tmp_path / "c")))
        assert report_stamp(dataclasses.replace(result, plan=dataclasses.replace(result.plan, config=renamed))) != base
        # Where the report and the cache live changes no file.
        assert report_stamp(dataclasses.replace(result, plan=dataclasses.replace(result.plan, config=moved))) == base
    elif change == "gallery":
        assert report_stamp(result, gallery_units=4) != base
    else:
        out = tmp_path / "with-run-json"
        out.mkdir()
        (out / "run.json").write_text("{}")  # the page links it: another page
        assert report_stamp(dataclasses.replace(result, out_dir=out)) != base


def test_a_damaged_copy_is_redrawn(fake_run, tmp_path):
    result, _ = fake_run
    only_train = dataclasses.replace(result.plan, nodes=[n for n in result.plan.nodes if n.stage == "train"])
    small = dataclasses.replace(result, plan=only_train, out_dir=tmp_path / "a")
    write_report(small)
    copy = _copies(result) / report_stamp(small)
    table = copy / "tables" / "8_training.csv"
    table.write_text(table.read_text() + "garbage\n")  # wrong size: not trusted
    redrawn = dataclasses.replace(small, out_dir=tmp_path / "b")
    write_report(redrawn)
    assert (tmp_path / "b" / "tables" / "8_training.csv").read_text() == \
        (tmp_path / "a" / "tables" / "8_training.csv").read_text()
    assert not table.exists() or "garbage" not in table.read_text()


def test_the_warm_path_imports_no_heavy_library():
    """A warm ``run``/``report`` copies the report and prints the stored summary: pandas, torch, matplotlib,
    scipy and Dask must not load on the way (their import time would dominate it)."""
    import subprocess
    import sys

    code = ("import sys, repdissect.cli, repdissect.pipeline, repdissect.reports; "
            "print(sorted(m for m in ('pandas', 'torch', 'matplotlib', 'scipy', 'dask', 'distributed', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"
