"""A real Dask cluster, started as a user would: ``dask scheduler`` and two ``dask worker`` processes on localhost.

The quick config runs three times: in-process (the reference), on the cluster, and on the cluster again
(fresh cache) while a worker dies mid-run. Both cluster runs must publish exactly the reference's tables, bit
for bit. The worker death is deterministic: a worker preload (``cluster_kill_preload.py``) SIGKILLs the first
worker that starts an armed task, so the test never waits on a timer to decide when to strike. Every process
the test started is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from repdissect.cli import main
from repdissect.pipeline import CacheStore

PRELOAD = Path(__file__).with_name("cluster_kill_preload.py")
QUICK = Path(__file__).resolve().parents[2] / "configs" / "quick.toml"
#: wall-clock columns are records of a run, not results
TIMING_COLUMNS = {"seconds"}


def cache_tables(root: Path) -> dict[tuple[str, str, str], object]:
    """Every table of every published entry, by (stage, key, table#part), without timing columns."""
    out = {}
    for stage, key, path in CacheStore(root).iter_entries():
        manifest = json.loads((path / "manifest.json").read_text())
        for table, files in manifest["tables"].items():
            for i, rel in enumerate(files):
                t = pq.read_table(path / rel)
                out[(stage, key, f"{table}#{i}")] = t.drop_columns([c for c in t.column_names if c in TIMING_COLUMNS])
    return out


def assert_bit_equal(reference: dict, other: dict, context: str) -> None:
    assert reference.keys() == other.keys(), f"{context}: different cache entries"
    unequal = [key for key in reference if not reference[key].equals(other[key])]
    assert not unequal, f"{context}: tables differ from the in-process run: {unequal[:5]}"


def _wait_until(predicate, timeout: float, what: str, procs: list[subprocess.Popen]) -> None:
    """Poll for a start-up condition; fail fast (with the logs) if one of our processes exited."""
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen (exited: {[p.args[3] for p in dead]})")
        time.sleep(0.05)


def _run_cli(config: Path, directory: Path, scheduler: str) -> None:
    code = main(["run", str(config), "--cache", str(directory / "cache"), "--out", str(directory / "out"),
                 "--scheduler", scheduler, "--no-report", "--no-progress"])
    assert code == 0


class Cluster:
    """``dask scheduler`` + ``dask worker`` subprocesses, each in its own process group so that stopping
    them also stops the worker processes their nannies spawned."""

    def __init__(self, directory: Path, workers: int, trigger_dir: Path) -> None:
        self.directory = directory
        self.procs: list[subprocess.Popen] = []
        self.scheduler_file = directory / "scheduler.json"
        self.env = {**os.environ, "PYTHONWARNINGS": "ignore", "REPDISSECT_TEST_TRIGGER_DIR": str(trigger_dir)}
        try:
            self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(self.scheduler_file)])
            _wait_until(self.scheduler_file.is_file, 120, "the scheduler writing its address", self.procs)
            for i in range(workers):
                self._start(f"worker{i}", ["worker", "--scheduler-file", str(self.scheduler_file), "--nworkers",
                                           "1", "--nthreads", "1", "--no-dashboard", "--name", f"w{i}",
                                           "--death-timeout", "60", "--local-directory", str(directory / f"w{i}"),
                                           "--preload", str(PRELOAD)])
        except BaseException:
            self.stop()  # nothing this test started outlives a failed start
            raise

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.directory / f"{name}.log", "wb")
        self.procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log, stderr=subprocess.STDOUT,
                                           env=self.env, start_new_session=True))
        log.close()

    @property
    def address(self) -> str:
        return json.loads(self.scheduler_file.read_text())["address"]

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            for proc in self.procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, sig)  # the group this test created for that process
            for proc in self.procs:
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if all(proc.poll() is not None for proc in self.procs):
                return


def test_scheduler_address_cluster_equals_sync_and_survives_a_killed_worker(tmp_path):
    from distributed import Client

    quick = QUICK
    trigger = tmp_path / "trigger"
    trigger.mkdir()
    _run_cli(quick, tmp_path / "sync", "sync")
    reference = cache_tables(tmp_path / "sync" / "cache")

    cluster = Cluster(tmp_path, workers=2, trigger_dir=trigger)
    try:
        with Client(cluster.address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            pids = set(client.run(os.getpid).values())

            _run_cli(quick, tmp_path / "cluster", cluster.address)
            assert_bit_equal(reference, cache_tables(tmp_path / "cluster" / "cache"), "cluster run")

            # Arm the trigger: the first worker to start an extraction task kills itself.
            (trigger / "armed").write_text("extract-")
            _run_cli(quick, tmp_path / "killed", cluster.address)
            killed = trigger / "killed"
            assert killed.is_file(), "no worker started an extraction task, so none was killed"
            pid = int(killed.read_text().split()[0])
            assert pid in pids, "the killed process was one of the two original workers"
            assert_bit_equal(reference, cache_tables(tmp_path / "killed" / "cache"), "run with a killed worker")
            cache = tmp_path / "killed" / "cache"
            assert not list(cache.glob("*/.staging-*")) + list(cache.glob("*/*/.tmp-*")), "temp dirs left behind"
            # The nanny replaced the dead worker: the cluster is whole again.
            client.wait_for_workers(2, timeout=120)
            assert pid not in set(client.run(os.getpid).values())
    finally:
        cluster.stop()
    assert all(proc.poll() is not None for proc in cluster.procs), "a cluster process outlived the test"
