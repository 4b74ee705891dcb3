"""Retention policy of ``clean``: keep the last N runs per config name or runs newer than a date, dry-run
bytes, and never a running run's entries."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest

from repdissect.cli import main
from repdissect.core import CacheStore, UserInputError, parse_when, this_host
from repdissect.core import REPORTS, MANIFEST

T0 = _dt.datetime(2026, 3, 1, tzinfo=_dt.timezone.utc)


def _key(i: int) -> str:
    return f"{i:02x}" + f"{i:x}" * 62


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _cache(tmp_path, runs):
    """``runs``: (name, day offset, entry ids, extra record fields). Entries are published, records written."""
    store = CacheStore(tmp_path / "cache")
    ids = sorted({i for _, _, used, _ in runs for i in used} | {99})  # 99: referenced by no run
    for i in ids:
        store.publish("thresholds", _key(i), {"t": pa.table({"v": list(range(10 * (i + 1)))})}, manifest={})
    for n, (name, day, used, extra) in enumerate(runs):
        record = {"name": name, "status": "finished", "created": (T0 + _dt.timedelta(days=day)).isoformat(),
                  "nodes": [{"stage": "thresholds", "key": _key(i)} for i in used], **extra}
        store.record_run(record, store.root / "_runs" / f"{n:03d}-{name}.json")
    return store


def _alive(store):
    return {int(key[:2], 16) for _, key, _ in store.iter_entries()}


RUNS = [("quick", 0, [1, 2], {}), ("quick", 1, [2, 3], {}), ("quick", 2, [3, 4], {}),
        ("demo", 0, [5], {}), ("demo", 3, [6], {})]


@pytest.mark.parametrize("policy, kept_entries, kept_records", [
    ({}, {1, 2, 3, 4, 5, 6}, 5),                                      # no policy: only the orphan goes
    ({"keep_last": 1}, {3, 4, 6}, 2),                                 # newest per config name
    ({"keep_last": 2}, {2, 3, 4, 5, 6}, 4),
    ({"keep_last": 0}, set(), 0),
    ({"newer_than": T0 + _dt.timedelta(days=2)}, {3, 4, 6}, 2),       # on or after the date
    ({"newer_than": T0 + _dt.timedelta(days=1, hours=1)}, {3, 4, 6}, 2),
    ({"keep_last": 1, "newer_than": T0 + _dt.timedelta(days=1)}, {2, 3, 4, 6}, 3),  # either rule keeps
])
def test_policy_keeps_what_it_says(tmp_path, policy, kept_entries, kept_records):
    store = _cache(tmp_path, RUNS)
    plan = store.plan_clean(**policy)
    assert len(plan.kept_records) == kept_records
    removed = store.clean(**policy)
    assert _alive(store) == kept_entries
    assert len(list((store.root / "_runs").glob("*.json"))) == kept_records
    assert all(not p.exists() for p in removed)
    for i in kept_entries:  # what stays is intact
        assert store.get("thresholds", _key(i), verify=True) is not None


def test_dry_run_removes_nothing_and_counts_the_bytes(tmp_path):
    store = _cache(tmp_path, RUNS)
    before = sorted(p for p in store.root.rglob("*"))
    plan = store.plan_clean(keep_last=1)
    expected = sum(f.stat().st_size for p in plan.paths for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.is_file())
    assert plan.bytes_freed == expected > 0
    assert store.clean(keep_last=1, dry_run=True) == plan.paths
    assert sorted(p for p in store.root.rglob("*")) == before


@pytest.mark.parametrize("extra, running", [
    ({"status": "running", "pid": "self", "host": "self"}, True),        # alive here
    ({"status": "running", "pid": "dead", "host": "self"}, False),       # crashed here: subject to the policy
    ({"status": "running", "pid": "self", "host": "elsewhere"}, True),   # another host: cannot tell, kept
    ({"status": "running"}, True),                                       # no pid recorded: kept
    ({"status": "failed", "pid": "self", "host": "self"}, False),
    ({"status": "finished", "pid": "self", "host": "self"}, False),
])
def test_a_running_runs_entries_are_never_removed(tmp_path, extra, running):
    pids = {"self": os.getpid(), "dead": _dead_pid()}
    hosts = {"self": this_host(), "elsewhere": "another-host.example"}
    fields = {"status": extra["status"]}
    if "pid" in extra:
        fields.update(pid=pids[extra["pid"]], host=hosts[extra["host"]])
    store = _cache(tmp_path, [("quick", 0, [1], fields), ("quick", 5, [2], {})])
    plan = store.plan_clean(keep_last=0, newer_than=T0 + _dt.timedelta(days=30))
    assert [r.running for r in plan.kept_records] == ([True] if running else [])
    store.apply_clean(plan)
    assert _alive(store) == ({1} if running else set())


def test_a_run_recorded_after_the_plan_keeps_its_entries(tmp_path):
    store = _cache(tmp_path, [("quick", 0, [1], {})])
    plan = store.plan_clean(keep_last=0)
    store.record_run({"name": "late", "status": "running", "nodes": [{"stage": "thresholds", "key": _key(1)}]})
    store.apply_clean(plan)
    assert _alive(store) == {1}


def test_report_copies_go_with_their_entries(tmp_path):
    store = _cache(tmp_path, RUNS)
    for name, keys in (("live", [_key(6)]), ("dead", [_key(1), _key(6)])):
        copy = store.root / REPORTS / name
        copy.mkdir(parents=True)
        (copy / "index.html").write_text("x")
        (copy / MANIFEST).write_text(json.dumps({"keys": keys}))
    store.clean(keep_last=1)
    assert sorted(p.name for p in (store.root / REPORTS).iterdir()) == ["live"]


@pytest.mark.parametrize("text, expected", [
    ("2026-03-02", T0 + _dt.timedelta(days=1)),
    ("2026-03-02T06:00", T0 + _dt.timedelta(days=1, hours=6)),
    ("2026-03-02T06:00+02:00", T0 + _dt.timedelta(days=1, hours=4)),
])
def test_dates_are_utc_unless_they_say_otherwise(text, expected):
    assert parse_when(text) == expected


def test_cli_clean_policy_and_errors(tmp_path, capsys):
    store = _cache(tmp_path, RUNS)
    cache = str(store.root)
    assert main(["clean", "--cache", cache, "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove run record 000-quick.json" in out and "would be freed" in out
    assert _alive(store) == {1, 2, 3, 4, 5, 6, 99}
    assert main(["clean", "--cache", cache, "--keep-days", "100000"]) == 0  # every run is recent: orphan only
    assert _alive(store) == {1, 2, 3, 4, 5, 6}
    assert main(["clean", "--cache", cache, "--newer-than", "2026-03-03"]) == 0
    assert _alive(store) == {3, 4, 6}
    for bad in (["--newer-than", "last week"], ["--keep-last", "-1"], ["--keep-days", "-2"]):
        assert main(["clean", "--cache", cache, *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(UserInputError):
        parse_when("soon")
