"""Worker failure: SIGKILL of a Dask worker process mid-run still completes the run with identical results.

The run goes to a two-worker LocalCluster created here (so the test can see which worker is busy); once a
worker is processing a task, its process is killed without warning. The nanny starts a replacement, the
scheduler reruns the lost tasks (task functions are idempotent: staged shards are reused, publishing is
first-writer-wins), and the cache must equal the in-process reference.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from repdissect.pipeline import run

from reliability_support import TINY, assert_same_results, cache_tables, leftovers, write_config


def _kill_a_busy_worker(client, deadline: float, prefix: str) -> str | None:
    """SIGKILL the process of a worker processing a task whose key starts with ``prefix``."""
    while time.monotonic() < deadline:
        busy = {w: tasks for w, tasks in client.processing().items()
                if any(str(t).startswith(prefix) for t in tasks)}
        if busy:
            worker = sorted(busy)[0]
            pids = client.run(os.getpid, workers=[worker])
            os.kill(pids[worker], signal.SIGKILL)
            return worker
        time.sleep(0.01)
    return None


@pytest.mark.parametrize("prefix", ["extract-", pytest.param("train-", marks=pytest.mark.slow),
                                    pytest.param("iou-", marks=pytest.mark.slow),
                                    pytest.param("moments-", marks=pytest.mark.slow)])
def test_killing_a_busy_worker_still_completes(tiny_reference, tmp_path, prefix):
    from distributed import Client, LocalCluster

    config = write_config(tmp_path, TINY)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        outcome: dict[str, object] = {}

        def target() -> None:
            try:
                outcome["result"] = run(config, scheduler=cluster.scheduler_address)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        killed = _kill_a_busy_worker(client, time.monotonic() + 300, prefix)
        thread.join(timeout=600)
        assert not thread.is_alive(), "the run hung after the worker died"
        assert killed is not None, "no worker was ever busy with such a task"
        assert "error" not in outcome, f"the run failed after a worker died: {outcome.get('error')!r}"
        # The nanny restarts the killed worker; a short run may finish before the new one registers.
        client.wait_for_workers(2, timeout=120)
        assert len(client.scheduler_info()["workers"]) == 2, "the nanny replaced the killed worker"
    assert_same_results(tiny_reference.tables, cache_tables(tmp_path / "cache"), context=f"killed {killed}")
    assert leftovers(tmp_path / "cache") == []
