"""Worker failure: SIGKILL of a Dask worker process mid-task still completes the run with identical results.

The run goes to a two-worker LocalCluster created here whose workers (only they) have a crash point armed
(``task-start`` of the first task of a node of the stage under test, once): the worker process dies exactly
when it starts that task, every time. The nanny starts a replacement, the scheduler reruns the lost tasks
(task functions are idempotent: staged shards are reused, publishing is first-writer-wins; the once-marker
lets the retry pass), and the cache must equal the in-process reference.
"""

from __future__ import annotations

import logging
import threading

import pytest

from repdissect.core import CRASH_ENV, CRASH_ONCE_ENV, process_alive
from repdissect.pipeline import run

from reliability_support import TINY, assert_same_results, cache_tables, leftovers, write_config


@pytest.mark.parametrize("stage", ["extract", pytest.param("train", marks=pytest.mark.slow),
                                   pytest.param("iou", marks=pytest.mark.slow),
                                   pytest.param("moments", marks=pytest.mark.slow)])
def test_killing_a_busy_worker_still_completes(tiny_reference, tmp_path, stage):
    from distributed import Client, LocalCluster

    config = write_config(tmp_path, TINY)
    marker = tmp_path / "crashed"
    armed = {CRASH_ENV: f"task-start:{stage}[", CRASH_ONCE_ENV: str(marker)}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=logging.ERROR, env=armed) as cluster, Client(cluster) as client:
        outcome: dict[str, object] = {}

        def target() -> None:  # the run's own client lives in this thread, the test's in the test thread
            try:
                outcome["result"] = run(config, scheduler=cluster.scheduler_address)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(timeout=1200)
        assert not thread.is_alive(), "the run hung after the worker died"
        assert "error" not in outcome, f"the run failed after a worker died: {outcome.get('error')!r}"
        result = outcome["result"]
        # The nanny restarts the killed worker; a short run may finish before the new one registers.
        client.wait_for_workers(2, timeout=120)
        pids = client.run(lambda: __import__("os").getpid())
    assert marker.is_file(), f"no worker ever started a {stage} task"
    pid, point, where = marker.read_text().splitlines()
    assert (point, where.split("[")[0]) == ("task-start", stage)
    assert not process_alive(int(pid)) and int(pid) not in pids.values(), "the armed worker was not replaced"
    assert result.misses == len(result.results)
    assert_same_results(tiny_reference.tables, cache_tables(tmp_path / "cache"), context=f"killed in {where}")
    assert leftovers(tmp_path / "cache") == []
