"""Crash safety: ``repdissect run`` killed with SIGKILL at a random moment resumes to identical results.

Each trial starts the real command in its own process, kills it (SIGKILL, no chance to clean up) at a
random moment after its cache directory appears, and then checks what the issue demands:

* whatever entry is visible after the kill is complete (its manifest validates, sha256 included);
* the rerun trusts exactly those entries (each is a cache hit) and recomputes the rest;
* the final cache equals an uninterrupted run's, table by table (timing columns aside);
* no temp or staging directory is left behind, and nothing had to be quarantined.

Three trials on a tiny config run in the default suite; twenty on ``configs/quick.toml`` are ``slow``.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from repdissect.pipeline import CacheStore
from repdissect.core import MANIFEST

from reliability_support import (Reference, assert_same_results, cache_tables, code_fingerprint, entry_names, leftovers,
                                 reference_run, start_run, wait_for)

QUICK = Path(__file__).resolve().parents[2] / "configs" / "quick.toml"


@dataclass
class TrialOutcome:
    delay: float
    interrupted: bool
    visible_after_kill: int
    temps_after_kill: int
    staged_after_kill: int
    recomputed: int
    reused: int


def crash_trial(reference: Reference, directory: Path, delay: float, after_entries: int = 0) -> TrialOutcome:
    """Start ``repdissect run``, SIGKILL it, rerun the command, compare with the reference.

    The kill comes ``delay`` seconds after the run's cache holds ``after_entries`` entries (0: after the cache
    directory appears) — progress-relative moments land in the same phase however loaded the machine is.
    """
    cache, out = directory / "cache", directory / "out"
    proc = start_run(reference.config, cache, out)
    try:
        assert wait_for(lambda: cache.is_dir() or proc.poll() is not None, timeout=300), "the run never started"
        if after_entries:
            wait_for(lambda: len(entry_names(cache)) >= after_entries or proc.poll() is not None, timeout=600,
                     poll=0.005)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        interrupted = proc.poll() is None
        if interrupted:
            proc.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code in (0, -signal.SIGKILL), f"run failed on its own (exit {code}): {(out / 'stderr.txt').read_text()[-2000:]}"

    store = CacheStore(cache)
    visible = {}
    for stage, key, path in store.iter_entries():
        # Never a partial entry: everything visible validates completely.
        entry = store._validate(path, key, verify=True)
        assert (path / MANIFEST).is_file()
        visible[key] = entry
    temps = [p for p in leftovers(cache) if p.name.startswith(".tmp-")]
    staged = [p for p in leftovers(cache) if p.name.startswith(".staging-")]

    rerun = start_run(reference.config, cache, out / "rerun")
    assert rerun.wait(timeout=1800) == 0, (out / "rerun" / "stderr.txt").read_text()[-2000:]
    record = json.loads((out / "rerun" / "run.json").read_text())  # the rerun's record is whole
    nodes = {n["key"]: n["hit"] for n in record["nodes"]}
    reused = {k for k, hit in nodes.items() if hit}
    assert set(visible) <= reused, "an entry published before the kill was recomputed"
    assert_same_results(reference.tables, cache_tables(cache), context=f"kill after {delay:.2f}s")
    assert leftovers(cache) == [], f"temp/staging dirs left after the rerun: {leftovers(cache)}"
    assert not (cache / "_quarantine").exists(), "a complete entry was judged corrupt"
    return TrialOutcome(delay=delay, interrupted=interrupted, visible_after_kill=len(visible),
                        temps_after_kill=len(temps), staged_after_kill=len(staged),
                        recomputed=len(nodes) - len(reused), reused=len(reused))


def _summary(outcomes: list[TrialOutcome], redone: int) -> str:
    killed = [o for o in outcomes if o.interrupted]
    return (f"{len(outcomes)} trials survived ({len(killed)} killed mid-run); entries visible after kill: "
            f"{[o.visible_after_kill for o in outcomes]}; temp dirs after kill: {sum(o.temps_after_kill for o in outcomes)}; "
            f"staging dirs after kill: {sum(o.staged_after_kill for o in outcomes)}; reused on rerun: "
            f"{[o.reused for o in outcomes]}; trials repeated after a source change: {redone}")


def run_trials(reference: Reference, moments: list[tuple[int, float]], workdir, config: Path) -> tuple[list, int]:
    """One crash trial per ``(after_entries, delay)`` moment; see :func:`crash_trial`.

    Results are comparable only between runs of one version of the code: if the source changes under a
    trial (concurrent development), the reference is retaken and the trial repeated (at most 3 times).
    """
    fingerprint = reference.fingerprint
    outcomes, redone = [], 0
    for i, (after, delay) in enumerate(moments):
        while True:
            try:
                outcomes.append(crash_trial(reference, workdir(f"trial{i}-{redone}"), delay, after_entries=after))
                break
            except AssertionError:
                if code_fingerprint() == fingerprint or redone >= 3:
                    raise
                redone += 1
                fingerprint = code_fingerprint()
                reference = reference_run(workdir(f"reference-{redone}"), config)
    return outcomes, redone


def test_killed_runs_resume_to_identical_results(tiny_reference, tmp_path):
    # Kill once while nothing is published yet (training) and twice in the publishing phase (some nodes
    # done, some staged, one possibly half-published); seeded random moments, so a failure replays.
    total = len({key for _, key, _ in tiny_reference.tables})
    rng = np.random.default_rng(20240)
    moments = [(0, float(rng.uniform(0.0, max(tiny_reference.publishing[0] - 0.2, 0.1)))),
               (int(rng.integers(1, total // 2)), float(rng.uniform(0.0, 0.2))),
               (int(rng.integers(total // 2, total)), float(rng.uniform(0.0, 0.2)))]
    outcomes, redone = run_trials(tiny_reference, moments, lambda name: tmp_path / name, tiny_reference.config)
    print(_summary(outcomes, redone))
    assert sum(o.interrupted for o in outcomes) >= 2, "the kills missed the run; the timing is off"


@pytest.mark.slow
def test_quick_config_survives_twenty_random_kills(tmp_path_factory):
    reference = reference_run(tmp_path_factory.mktemp("quick-reference"), QUICK)
    total = len({key for _, key, _ in reference.tables})
    rng = np.random.default_rng(8)
    moments = []
    for trial in range(20):
        if trial % 2:  # a moment anywhere in the run
            moments.append((0, float(rng.uniform(0.0, reference.seconds))))
        else:  # a moment in the publishing phase, relative to progress
            moments.append((int(rng.integers(1, total)), float(rng.uniform(0.0, 0.5))))
    outcomes, redone = run_trials(reference, moments, tmp_path_factory.mktemp, QUICK)
    print(_summary(outcomes, redone))
    assert sum(o.interrupted for o in outcomes) >= 15
