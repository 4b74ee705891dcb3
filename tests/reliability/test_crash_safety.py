"""Crash safety: ``repdissect run`` killed (SIGKILL) at a named crash point resumes to identical results.

Each trial starts the real command in its own process with one crash point armed (see
``repdissect.core.crash_point``): the process kills itself exactly there — while a network trains, right
after a shard's partial is staged, with an entry's files complete but not yet renamed into place, right after
an entry is published but before its staging is removed. Then the trial checks what the issue demands:

* the kill happened (every trial is interrupted, at the moment it names; nothing depends on timing);
* whatever entry is visible after the kill is complete (its manifest validates, sha256 included);
* the half-done work the point leaves is what it should be (a temp dir, a staged shard, …) and is invisible;
* the rerun trusts exactly those entries (each is a cache hit) and recomputes the rest;
* the final cache equals an uninterrupted run's, table by table (timing columns aside);
* no temp or staging directory is left behind, and nothing had to be quarantined.

Three trials on a tiny config run in the default suite; twenty on ``configs/quick.toml`` are ``slow``
(``-k subset`` picks the eight that CI runs).
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from repdissect.core import CRASH_ENV, MANIFEST
from repdissect.pipeline import CacheStore

from reliability_support import (Reference, assert_same_results, cache_tables, code_fingerprint, leftovers,
                                 reference_run, start_run)

QUICK = Path(__file__).resolve().parents[2] / "configs" / "quick.toml"


@dataclass
class TrialOutcome:
    crash_at: str
    visible_after_kill: int
    temps_after_kill: int
    staged_after_kill: int
    recomputed: int
    reused: int


def crash_trial(reference: Reference, directory: Path, crash_at: str) -> TrialOutcome:
    """Start ``repdissect run`` with ``crash_at`` armed, let it kill itself there, rerun, compare."""
    cache, out = directory / "cache", directory / "out"
    proc = start_run(reference.config, cache, out, env={CRASH_ENV: crash_at})
    try:
        code = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == -signal.SIGKILL, (f"the run was not killed at {crash_at} (exit {code}): "
                                     f"{(out / 'stderr.txt').read_text()[-2000:]}")

    store = CacheStore(cache)
    visible = {}
    for stage, key, path in store.iter_entries():
        # Never a partial entry: everything visible validates completely.
        entry = store._validate(path, key, verify=True)
        assert (path / MANIFEST).is_file()
        visible[key] = (stage, entry)
    temps = [p for p in leftovers(cache) if p.name.startswith(".tmp-")]
    staged = [p for p in leftovers(cache) if p.name.startswith(".staging-")]
    point, _, match = crash_at.split("#")[0].partition(":")
    if point == "publish-before-rename":  # complete files and manifest, in a temp dir nobody reads
        assert temps and all((t / MANIFEST).is_file() for t in temps), f"{crash_at}: no complete temp dir left"
        assert not any(t.parent.parent.name == match.rstrip("/") and t.name[5:21] in {k[:16] for k in visible}
                       for t in temps), "a temp dir's key is visible"
    elif point in ("shard-staged", "part-before-rename"):
        assert staged, f"{crash_at}: no staged shard left"
    elif point == "node-published":
        stage = match.rstrip("[")
        assert any(s == stage for s, _ in visible.values()), f"{crash_at}: no {stage} entry visible"

    rerun = start_run(reference.config, cache, out / "rerun")
    assert rerun.wait(timeout=1800) == 0, (out / "rerun" / "stderr.txt").read_text()[-2000:]
    record = json.loads((out / "rerun" / "run.json").read_text())  # the rerun's record is whole
    nodes = {n["key"]: n["hit"] for n in record["nodes"]}
    reused = {k for k, hit in nodes.items() if hit}
    assert set(visible) == reused, "the rerun did not trust exactly the entries published before the kill"
    assert_same_results(reference.tables, cache_tables(cache), context=f"killed at {crash_at}")
    assert leftovers(cache) == [], f"temp/staging dirs left after the rerun: {leftovers(cache)}"
    assert not (cache / "_quarantine").exists(), "a complete entry was judged corrupt"
    return TrialOutcome(crash_at=crash_at, visible_after_kill=len(visible), temps_after_kill=len(temps),
                        staged_after_kill=len(staged), recomputed=len(nodes) - len(reused), reused=len(reused))


def _summary(outcomes: list[TrialOutcome], redone: int) -> str:
    return (f"{len(outcomes)} trials killed and resumed; "
            + "; ".join(f"{o.crash_at}: {o.visible_after_kill} visible, {o.temps_after_kill} temp, "
                        f"{o.staged_after_kill} staged, {o.reused} reused" for o in outcomes)
            + f"; trials repeated after a source change: {redone}")


def run_trials(reference: Reference, points: list[str], workdir, config: Path) -> tuple[list, int]:
    """One crash trial per armed point; see :func:`crash_trial`.

    Results are comparable only between runs of one version of the code: if the source changes under a
    trial (concurrent development), the reference is retaken and the trial repeated (at most 3 times).
    """
    fingerprint = reference.fingerprint
    outcomes, redone = [], 0
    for i, crash_at in enumerate(points):
        while True:
            try:
                outcomes.append(crash_trial(reference, workdir(f"trial{i}-{redone}"), crash_at))
                break
            except AssertionError:
                if code_fingerprint() == fingerprint or redone >= 3:
                    raise
                redone += 1
                fingerprint = code_fingerprint()
                reference = reference_run(workdir(f"reference-{redone}"), config)
    return outcomes, redone


def test_killed_runs_resume_to_identical_results(tiny_reference, tmp_path):
    # While the network trains (nothing published yet), right after a shard is staged (extraction half
    # done), and with an IoU entry complete in its temp dir but not renamed into place.
    points = ["task-start:train[", "shard-staged:extract[#2", "publish-before-rename:iou/"]
    outcomes, redone = run_trials(tiny_reference, points, lambda name: tmp_path / name, tiny_reference.config)
    print(_summary(outcomes, redone))
    assert [o.visible_after_kill for o in outcomes][0] < [o.visible_after_kill for o in outcomes][2]


#: crash points of the quick config (2 seeds + random baselines, 2 layers, several shards per node): every
#: point, in every family of stages; SUBSET is the part CI runs.
SUBSET = ["task-start:train[#2", "shard-staged:extract[#3", "part-before-rename#5", "publish-before-rename:extract/",
          "publish-before-rename:iou/", "node-published:thresholds[", "publish-before-rename:compare/",
          "node-published:stability["]
REST = ["task-start:train[", "shard-staged:extract[", "shard-staged:iou[#2", "shard-staged:moments[",
        "part-before-rename#1", "publish-before-rename:train/", "publish-before-rename:thresholds/",
        "publish-before-rename:moments/", "publish-before-rename:cka/", "node-published:extract[#3",
        "node-published:iou[#2", "node-published:compare["]


@pytest.fixture(scope="module")
def quick_reference(tmp_path_factory) -> Reference:
    return reference_run(tmp_path_factory.mktemp("quick-reference"), QUICK)


@pytest.mark.slow
@pytest.mark.parametrize("points", [SUBSET, REST], ids=["subset", "rest"])
def test_quick_config_survives_every_crash_point(quick_reference, tmp_path_factory, points):
    outcomes, redone = run_trials(quick_reference, points, tmp_path_factory.mktemp, QUICK)
    print(_summary(outcomes, redone))
    assert len(outcomes) == len(points)
