"""``scheduler = "auto"``: in-process for work a cluster cannot repay, a LocalCluster otherwise; always says why."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from repdissect.cli import main
from repdissect.pipeline import (PAYOFF_MEGAPIXEL_PASSES, Workload, build_plan, choose_scheduler,
                                 estimate_workload, load_config, run)

from helpers import write_tiny_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _node(stage: str, epochs: int = 1) -> SimpleNamespace:
    return SimpleNamespace(stage=stage, params={"train": {"epochs": epochs}} if stage == "train" else {})


@pytest.mark.parametrize("nodes, images, size, expected", [
    ([], 100, (8, 8), Workload(0, 0, 0.0)),
    ([_node("extract")], 100, (8, 8), Workload(0, 1, 6400.0)),
    ([_node("train", epochs=2)], 100, (8, 8), Workload(1, 0, 100 * 64 * 2 * 3.0)),
    ([_node("train"), _node("extract"), _node("iou"), _node("moments")], 10, (4, 5), Workload(1, 1, 200 * 3 + 200.0)),
])
def test_estimate_workload_counts_only_train_and_extract(nodes, images, size, expected):
    assert estimate_workload(nodes, images=images, image_size=size) == expected


BIG = Workload(3, 6, 1e9)


@pytest.mark.parametrize("requested, workload, workers, scheduler, phrase", [
    ("local", Workload(0, 0, 0.0), 2, "local", "as configured"),
    ("sync", BIG, 4, "sync", "as configured"),
    ("tcp://10.0.0.5:8786", Workload(0, 1, 1.0), 2, "tcp://10.0.0.5:8786", "as configured"),
    ("auto", BIG, 1, "sync", "with 1 worker"),
    ("auto", Workload(0, 1, 1e12), 2, "sync", "nothing heavy can run side by side"),
    ("auto", Workload(2, 4, PAYOFF_MEGAPIXEL_PASSES * 1e6 / 2), 2, "sync", "below"),
    ("auto", Workload(2, 4, PAYOFF_MEGAPIXEL_PASSES * 1e6), 2, "local", "auto → local (2 workers)"),
    ("auto", BIG, 3, "local", "auto → local (3 workers)"),
])
def test_choose_scheduler(requested, workload, workers, scheduler, phrase):
    choice = choose_scheduler(requested, workload, workers=workers)
    assert choice.scheduler == scheduler
    assert phrase in choice.reason


def test_quick_config_runs_in_process_and_demo_on_a_cluster():
    """The shipped configs land on the two sides of the threshold (with nothing cached)."""
    quick = build_plan(load_config(CONFIGS / "quick.toml"))
    work = estimate_workload(quick.nodes, images=240, image_size=(32, 32))
    assert (work.train_nodes, work.extract_nodes) == (2, 4)
    assert choose_scheduler("auto", work, workers=2).scheduler == "sync"
    # demo: 3 seeds × 6 epochs on 4000 images of 64 px, 6 instances extracted (no plan build: it trains nothing
    # but would build 4000 images and check every model)
    demo = [_node("train", epochs=6)] * 3 + [_node("extract")] * 6
    work = estimate_workload(demo, images=4000, image_size=(64, 64))
    assert work.megapixel_passes > 10 * PAYOFF_MEGAPIXEL_PASSES
    assert choose_scheduler("auto", work, workers=2).scheduler == "local"


def test_auto_says_why_in_the_run_record_and_on_stderr(tmp_path, capsys):
    config = write_tiny_config(tmp_path)
    assert main(["run", str(config), "--scheduler", "auto", "--no-report", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "scheduler: auto → sync" in err and "M pixel-passes" in err
    record = json.loads((tmp_path / "out" / "run.json").read_text())["execution"]
    assert record["requested_scheduler"] == "auto" and record["scheduler"] == "sync"
    assert record["scheduler_reason"].startswith("auto → sync")
    rerun = run(config, scheduler="auto")
    assert rerun.misses == 0
    assert rerun.record["execution"]["scheduler_reason"].startswith("everything is cached")


def test_default_scheduler_is_auto():
    from repdissect.pipeline import Config

    assert Config.__dataclass_fields__["execution"].default_factory().scheduler == "auto"
