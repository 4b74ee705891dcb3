"""Report pieces in the cache: each table, figure and gallery is drawn once per set of inputs (entry keys and
the config values it read) and copied into any new folder; a changed input redraws exactly the pieces that
read it; a damaged piece is dropped and redrawn; a piece cannot read the run around its recorded view."""

from __future__ import annotations

import dataclasses
import filecmp
import json
from pathlib import Path

import pytest

import repdissect.reports._figures as figures_module
from repdissect.core import MANIFEST, REPORTS
from repdissect.reports import _paper, _plots, write_report
from repdissect.reports._data import RunData
from repdissect.reports._piece_list import FIGURE_BUILDERS, TABLE_KEYS
from repdissect.reports._pieces import Piece, TracedData, serve_piece
from repdissect.reports._report import report_stamp
from repdissect.reports._tables import PaperTable


def _record(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _copies(result) -> Path:
    return Path(result.plan.config.run.cache_dir) / REPORTS


@pytest.fixture
def renders(monkeypatch):
    """Every figure saved and table written while the test runs (what drawing costs), by file name."""
    calls: list[str] = []
    save, write = figures_module.save_figure, PaperTable.write

    def counting_save(fig, path, *args, **kwargs):
        calls.append(Path(path).name)
        return save(fig, path, *args, **kwargs)

    def counting_write(self, directory):
        calls.append(self.name)
        return write(self, directory)

    monkeypatch.setattr(figures_module, "save_figure", counting_save)
    monkeypatch.setattr(PaperTable, "write", counting_write)
    return calls


def _with_out(result, out: Path):
    return dataclasses.replace(result, out_dir=out)


def _with_cache(result, cache: Path):
    cfg = result.plan.config
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, cache_dir=str(cache)))
    return dataclasses.replace(result, plan=dataclasses.replace(result.plan, config=cfg))


def test_a_warm_report_into_a_new_folder_redraws_nothing(fake_run, tmp_path, renders):
    result, index = fake_run
    drawn = index.parent
    out = tmp_path / "new-folder"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"x")  # left by an earlier report here: pruned
    (out / "report.json").write_text(json.dumps({"files": ["figures/stale.png"]}))
    again = write_report(_with_out(result, out))
    assert again == out.absolute() / "index.html"
    assert renders == []
    record = _record(out)
    assert record["pieces"]["drawn"] == [] and record["pieces"]["reused"] > 20
    assert not (out / "figures" / "stale.png").exists()
    files = sorted(record["files"])
    assert files == sorted(_record(drawn)["files"]) and len(files) > 20
    match, mismatch, errors = filecmp.cmpfiles(drawn, out, [f for f in files if f != "index.html"], shallow=False)
    assert mismatch == [] and errors == []
    assert not list(out.rglob(".*.tmp"))


def test_a_warm_report_reads_no_table(fake_run, tmp_path, monkeypatch):
    """Served pieces are checked against node keys only: no cached table is opened (so pandas need not load)."""
    result, _ = fake_run

    def refuse(self, *args, **kwargs):
        raise AssertionError("a table was read for a report whose pieces are all cached")

    monkeypatch.setattr(RunData, "table", refuse)
    monkeypatch.setattr(RunData, "node_table", refuse)
    write_report(_with_out(result, tmp_path / "a"))
    assert _record(tmp_path / "a")["pieces"]["drawn"] == []


def _rekey(result, stage: str, **label: str):
    """``result`` with the first node of ``stage`` matching ``label`` under a new key (same entry content)."""
    node = next(n for n in result.plan.nodes if n.stage == stage and all(n.label.get(k) == v for k, v in label.items()))
    new = dataclasses.replace(node, params={**node.params, "changed": True}, key="")
    nodes = [new if n is node else n for n in result.plan.nodes]
    results = dict(result.results)
    results[new.key] = dataclasses.replace(results[node.key], node=new)
    return dataclasses.replace(result, plan=dataclasses.replace(result.plan, nodes=nodes), results=results), new


def _readers(copies: Path, query_prefix: str) -> set[str]:
    """Names of the stored pieces whose trace asked a question starting with ``query_prefix``."""
    names = set()
    for manifest in copies.glob(f"*/{MANIFEST}"):
        m = json.loads(manifest.read_text())
        if any(q.startswith(query_prefix) for q in m["trace"]):
            names.add(m["piece"])
    return names


@pytest.mark.parametrize("stage, label, must, must_not, cold", [
    ("train", {"seed": "1"}, {"table:training"}, {"figure:cka_figure", "figure:svcca_figure"}, False),
    ("compare", {"kind": "seed"}, {"figure:svcca_figure", "table:convergent_learning"},
     {"table:training", "figure:detectors_figure"}, True),
])
def test_a_changed_entry_redraws_exactly_the_pieces_that_read_it(fake_run, tmp_path, renders, stage, label, must,
                                                                 must_not, cold):
    result, _ = fake_run  # its report is drawn: every piece is in the cache
    copies = _copies(result)
    changed, node = _rekey(result, stage, **label)
    readers = _readers(copies, f"stage:{stage}") | _readers(copies, f"entry:{stage}:")
    renders.clear()
    write_report(_with_out(changed, tmp_path / "after"))
    drawn = set(_record(tmp_path / "after")["pieces"]["drawn"])
    assert must <= drawn and not (must_not & drawn)
    # Exactly the readers of the changed stage: those that asked about its nodes (an entry look-up that hit
    # another node of the stage stays valid).
    asked_node = {p for p in readers if p in drawn}
    assert drawn == asked_node and 0 < len(drawn) < _record(tmp_path / "after")["pieces"]["reused"] + len(drawn)
    assert renders  # drawing was counted
    if not cold:
        return
    # The redrawn report is the one drawn from scratch (no stale piece served).
    cold = _with_cache(changed, tmp_path / "cold-cache")
    write_report(_with_out(cold, tmp_path / "cold"))
    files = sorted(_record(tmp_path / "cold")["files"])
    assert files == sorted(_record(tmp_path / "after")["files"])
    text = [f for f in files if f.endswith((".csv", ".md", ".tex"))]
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "cold", tmp_path / "after", text, shallow=False)
    assert mismatch == [] and errors == [] and match

def test_a_piece_names_the_keys_it_read(fake_run):
    """So ``clean`` drops a piece once an entry it was drawn from goes (and keeps it while they live)."""
    result, _ = fake_run
    keys = set()
    for manifest in _copies(result).glob(f"*/{MANIFEST}"):
        keys |= set(json.loads(manifest.read_text())["keys"])
    assert {n.key for n in result.plan.nodes} & keys
    training = [json.loads(m.read_text()) for m in _copies(result).glob(f"*/{MANIFEST}")]
    training = [m for m in training if m["piece"] == "table:training"]
    train_keys = {n.key for n in result.plan.nodes if n.stage == "train"}
    assert any(set(m["keys"]) == train_keys for m in training)


def test_a_changed_config_value_redraws_the_pieces_that_read_it(fake_run, tmp_path):
    """The IoU threshold is read by the report (interpretable units, captions), not only by stages."""
    result, _ = fake_run
    readers = _readers(_copies(result), "config:iou.threshold")
    cfg = result.plan.config
    other = dataclasses.replace(cfg, iou=dataclasses.replace(cfg.iou, threshold=cfg.iou.threshold + 0.01))
    changed = dataclasses.replace(result, plan=dataclasses.replace(result.plan, config=other))
    write_report(_with_out(changed, tmp_path / "after"))
    drawn = set(_record(tmp_path / "after")["pieces"]["drawn"])
    assert drawn == readers and "figure:cka_figure" not in drawn and drawn


def test_a_damaged_piece_is_redrawn(fake_run, tmp_path):
    result, _ = fake_run
    only_train = dataclasses.replace(result.plan, nodes=[n for n in result.plan.nodes if n.stage == "train"])
    result = _with_cache(dataclasses.replace(result, plan=only_train), tmp_path / "cache")
    write_report(_with_out(result, tmp_path / "a"))
    [copy] = [m.parent for m in _copies(result).glob(f"*/{MANIFEST}")
              if json.loads(m.read_text())["piece"] == "table:training"]
    table = next(copy.glob("tables/*training.csv"))
    table.write_text(table.read_text() + "garbage\n")  # wrong size: not trusted
    write_report(_with_out(result, tmp_path / "b"))
    assert _record(tmp_path / "b")["pieces"]["drawn"] == ["table:training"]
    name = table.relative_to(copy)
    assert (tmp_path / "b" / name).read_text() == (tmp_path / "a" / name).read_text()
    assert not copy.exists() or "garbage" not in table.read_text()


@pytest.mark.parametrize("reads", [
    lambda data: data.plan.nodes,
    lambda data: data.result.results,
    lambda data: data.config.with_overrides(),
])
def test_a_piece_cannot_read_around_its_trace(fake_run, tmp_path, reads):
    result, _ = fake_run
    piece = Piece("rogue", lambda data, root: reads(data))
    with pytest.raises(AttributeError, match="report piece|not methods"):
        serve_piece(piece, RunData(result), tmp_path / "out", tmp_path / "copies")


def test_the_trace_names_what_was_read(fake_run):
    result, _ = fake_run
    view = TracedData(RunData(result))
    assert view.config.iou.threshold == result.plan.config.iou.threshold
    [m.train.epochs for m in view.config.models]
    view.entry("train", instance="cnn@s0")
    assert {"config:iou.threshold", "config-len:models", "config:models[0].train.epochs",
            'entry:train:{"instance": "cnn@s0"}', "source", "report_version"} <= set(view.trace)
    assert not any(q.startswith("stage:") for q in view.trace)


def test_the_piece_list_names_every_builder():
    assert list(FIGURE_BUILDERS[:-1]) == [b.__name__ for b in _plots._BUILDERS]
    assert FIGURE_BUILDERS[-1] == "attribution_figures"
    assert [k for k in TABLE_KEYS if k not in ("findings", "category_detectors", "attribution_mass")] == \
        [k for k, _, _ in _paper._BUILDERS]


@pytest.mark.parametrize("change", ["key", "config", "gallery", "run_json"])
def test_what_changes_the_folder_changes_its_stamp(fake_run, tmp_path, change):
    """``write_run_report`` skips a folder whose report has the same stamp (its page states hits, run.json)."""
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
        assert report_stamp(dataclasses.replace(result, plan=dataclasses.replace(result.plan, config=moved))) == base
    elif change == "gallery":
        assert report_stamp(result, gallery_units=4) != base
    else:
        out = tmp_path / "with-run-json"
        out.mkdir()
        (out / "run.json").write_text("{}")
        assert report_stamp(dataclasses.replace(result, out_dir=out)) != base


def test_the_warm_path_imports_no_heavy_library():
    """A warm ``run``/``report`` copies the pieces and prints the stored summary: pandas, torch, matplotlib,
    scipy and Dask must not load on the way (their import time would dominate it)."""
    import subprocess
    import sys

    code = ("import sys, repdissect.cli, repdissect.pipeline, repdissect.reports, repdissect.reports._pieces, "
            "repdissect.reports._piece_list, repdissect.reports._report; "
            "print(sorted(m for m in ('pandas', 'torch', 'matplotlib', 'scipy', 'dask', 'distributed', 'sklearn') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]"


def test_a_failed_builder_is_not_kept(fake_run, tmp_path):
    """A figure whose builder raised is shown as failed this time and drawn again the next (never cached)."""
    result, _ = fake_run
    calls = []

    def draw(data, root):
        calls.append(1)
        return [{"key": "x", "skipped": "failed: OSError: disk hiccup"}]

    piece = Piece("flaky", draw)
    for _ in range(2):
        outcome = serve_piece(piece, RunData(result), tmp_path / "out", tmp_path / "copies")
        assert outcome.drawn
    assert len(calls) == 2 and not list((tmp_path / "copies").glob(f"*/{MANIFEST}"))


def test_a_version_drawn_by_other_report_code_is_replaced(fake_run, tmp_path, monkeypatch):
    import repdissect.reports._pieces as pieces

    result, _ = fake_run
    piece = Piece("versioned", lambda data, root: {"n": len(data.instances)})
    copies = tmp_path / "copies"
    assert serve_piece(piece, RunData(result), tmp_path / "out", copies).drawn
    assert not serve_piece(piece, RunData(result), tmp_path / "out", copies).drawn
    monkeypatch.setattr(pieces, "report_source", lambda: "edited report code")
    assert serve_piece(piece, RunData(result), tmp_path / "out", copies).drawn
    [manifest] = [json.loads(m.read_text()) for m in copies.glob(f"*/{MANIFEST}")]
    assert manifest["trace"]["source"] == "edited report code"
