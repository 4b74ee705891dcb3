"""End-to-end DAG behaviour: cache hits on rerun, minimal recomputation, status reasons, Dask == in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from repdissect.pipeline import CacheStore, load_config, run, status
from repdissect.cli import main
from repdissect.core import parquet_engine

from helpers import write_tiny_config

#: wall-clock columns are records of a run, not results
TIMING_COLUMNS = {"seconds"}


def cache_contents(root: Path) -> dict[tuple[str, str, str], object]:
    """Every table of every entry, by (stage, key, table), without timing columns."""
    out = {}
    for stage, key, path in CacheStore(root).iter_entries():
        manifest = json.loads((path / "manifest.json").read_text())
        for table, files in manifest["tables"].items():
            for i, rel in enumerate(files):
                t = pq.read_table(path / rel)
                t = t.drop_columns([c for c in t.column_names if c in TIMING_COLUMNS])
                out[(stage, key, f"{table}#{i}")] = t
    return out


def test_rerun_is_all_hits_and_run_record(tiny_config):
    first = run(tiny_config)
    assert first.misses == len(first.results) and first.hits == 0
    stages = {n.stage for n in first.plan.nodes}
    assert stages == {"train", "extract", "thresholds", "iou", "stability", "stability_center", "moments",
                      "compare", "cka", "dataset_search", "activation_max", "filters", "tsne",
                      "similarity", "sensitivity"}
    second = run(tiny_config)
    assert second.misses == 0 and second.hits == len(first.results)
    record = json.loads((second.out_dir / "run.json").read_text())
    assert all(node["hit"] for node in record["nodes"])
    assert {node["key"] for node in record["nodes"]} == {n.key for n in first.plan.nodes}
    assert record["config"]["run"]["name"] == "tiny"
    assert "torch" in record["environment"]


def test_param_change_reruns_that_stage_and_descendants_only(tmp_path):
    config = write_tiny_config(tmp_path)
    base = run(config)
    changed = write_tiny_config(tmp_path, quantile=0.02)
    reasons = {s.node_id: s for s in status(changed)}
    for s in reasons.values():
        if s.stage in ("thresholds", "iou"):
            assert not s.cached
        else:
            assert s.cached, s
    thr = next(s for s in reasons.values() if s.stage == "thresholds")
    assert "param quantile: 0.01 → 0.02" in thr.reason
    iou = next(s for s in reasons.values() if s.stage == "iou")
    assert iou.reason == "upstream thresholds changed"
    rerun = run(changed)
    recomputed = {r.node.stage for r in rerun.results.values() if not r.hit}
    assert recomputed == {"thresholds", "iou"}
    assert rerun.misses == len(base.plan.by_stage("thresholds")) + len(base.plan.by_stage("iou"))


def test_status_cli_explains(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    assert main(["status", str(config)]) == 0
    out = capsys.readouterr().out
    assert "MISSING" in out and "never computed" in out
    run(config)
    assert main(["status", str(config)]) == 0
    out = capsys.readouterr().out
    assert "MISSING" not in out and out.strip().endswith("nodes cached")


def test_tables_api_adds_labels(tiny_config):
    result = run(tiny_config)
    units = result.tables("iou", "units")
    assert list(units.columns[:2]) == ["instance", "layer"]
    assert set(units["instance"]) == {"cnn@s0", "cnn@s1", "cnn@s0-random", "cnn@s1-random"}
    pairs = result.tables("compare", "summary")
    assert set(pairs["kind"]) == {"seed", "unrelated", "random_pair", "drift"}
    named = {(r.a, r.b, r.kind) for r in pairs[["a", "b", "kind"]].drop_duplicates().itertuples()}
    # the null pairs each trained seed with ANOTHER seed's untrained net; own-init pairs are labelled drift
    assert ("cnn@s0", "cnn@s1-random", "unrelated") in named and ("cnn@s1", "cnn@s0-random", "unrelated") in named
    assert ("cnn@s0-random", "cnn@s1-random", "random_pair") in named
    assert ("cnn@s0", "cnn@s0-random", "drift") in named and ("cnn@s1", "cnn@s1-random", "drift") in named
    assert ("cnn@s0", "cnn@s1", "seed") in named
    # dissection by category: detector units and unique detectors per category add up to the totals
    summary = result.tables("iou", "summary")
    cats = [c.removeprefix("unique_detectors_") for c in summary.columns
            if c.startswith("unique_detectors_") and c != "unique_detectors_total"]
    assert {"color", "object", "part", "material"} <= set(cats)
    assert (summary[[f"detectors_{c}" for c in cats]].sum(axis=1) == summary["interpretable_units"]).all()
    assert (summary[[f"unique_detectors_{c}" for c in cats]].sum(axis=1) == summary["unique_detectors_total"]).all()


def test_sharding_does_not_change_results(tmp_path):
    """Whole-dataset shards vs many small ones: identical statistics downstream of extraction."""
    contents = []
    for name, shard in (("whole", 96), ("split", 25)):
        (tmp_path / name).mkdir()
        run(write_tiny_config(tmp_path / name, shard=shard))
        # extraction parts and shard tables differ in layout by design; every other table must be equal
        contents.append({k: v for k, v in cache_contents(tmp_path / name / "cache").items() if k[0] != "extract"})
    whole, split = contents
    assert whole.keys() == split.keys()
    for key in whole:
        # integer counts and thresholds are exact; float sums merged in another order agree to rounding
        pd.testing.assert_frame_equal(whole[key].to_pandas(), split[key].to_pandas(), check_exact=False,
                                      rtol=1e-9, atol=1e-12, obj=str(key))


def test_local_cluster_equals_in_process(tmp_path):
    (tmp_path / "sync").mkdir()
    (tmp_path / "dask").mkdir()
    sync_cfg = write_tiny_config(tmp_path / "sync")
    dask_cfg = write_tiny_config(tmp_path / "dask")
    run(sync_cfg)
    run(dask_cfg, scheduler="local", workers=2)
    a = cache_contents(tmp_path / "sync" / "cache")
    b = cache_contents(tmp_path / "dask" / "cache")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equals(b[key]), key


@pytest.mark.skipif(parquet_engine("auto") != "polars", reason="polars >= 2.1 is not installed")
def test_parquet_engine_does_not_change_results(tmp_path):
    """Activation parts encoded by polars or pyarrow: same keys, same tables downstream (an execution setting)."""
    contents = {}
    for engine in ("pyarrow", "polars"):
        (tmp_path / engine).mkdir()
        config = write_tiny_config(tmp_path / engine)
        config.write_text(config.read_text() + f'parquet_engine = "{engine}"\n')
        run(config)
        contents[engine] = cache_contents(tmp_path / engine / "cache")
        parts = list((tmp_path / engine / "cache" / "extract").rglob("activations@*/part-*.parquet"))
        # pyarrow stores schema-level metadata, polars only the field's: proof of which encoder ran
        assert parts and {pq.read_schema(p).metadata is None for p in parts} == {engine == "polars"}
    assert contents["pyarrow"].keys() == contents["polars"].keys()
    for key, table in contents["pyarrow"].items():
        assert table.equals(contents["polars"][key]), key


def test_multi_row_group_activation_parts_do_not_change_results(tmp_path, monkeypatch):
    """Downstream stages read streamed parts (one row group per batch) exactly like single-row-group ones."""
    from repdissect.stages import _extraction

    contents = []
    for name, min_bytes in (("one", 1 << 40), ("many", 1)):
        monkeypatch.setattr(_extraction, "ROW_GROUP_MIN_BYTES", min_bytes)
        (tmp_path / name).mkdir()
        run(write_tiny_config(tmp_path / name, shard=96))  # one shard, 3 batches of 32
        contents.append(cache_contents(tmp_path / name / "cache"))
        groups = [pq.ParquetFile(path).metadata.num_row_groups
                  for path in (tmp_path / name / "cache" / "extract").rglob("activations@*/part-*.parquet")]
        assert groups and set(groups) == ({1} if name == "one" else {3})
    one, many = contents
    assert one.keys() == many.keys()
    for key in one:
        assert one[key].equals(many[key]), key


def test_progress_lines_without_a_terminal(tiny_config, capsys):
    """Not a TTY (``run > log``): one line per finished stage with elapsed time and an estimate of what is left."""
    result = run(tiny_config, progress=True)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    stages = {n.stage for n in result.plan.nodes}
    finished = {line.split("stage ", 1)[1].split(" finished")[0] for line in lines if "stage " in line}
    assert finished == stages
    assert all(" s] " in line and "nodes" in line for line in lines)
    assert "left by node count" in err and lines[-1].endswith("done")
    run(tiny_config, progress=False)
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]


def test_status_prints_cached_once(tiny_config, capsys):
    run(tiny_config)
    assert main(["status", str(tiny_config)]) == 0
    lines = capsys.readouterr().out.splitlines()[:-1]
    assert lines and all(line.count("cached") == 1 for line in lines)
