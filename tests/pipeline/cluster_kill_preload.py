"""Dask worker preload for the cluster test: a deterministic worker death, not a timed one.

Loaded into each ``dask worker`` process with ``--preload <this file>``. When the directory named by the
environment variable ``REPDISSECT_TEST_TRIGGER_DIR`` holds a file ``armed`` whose text is a task-key prefix,
the first worker to *start executing* a task with that prefix claims the file ``killed`` (created exclusively,
so exactly one worker in the whole cluster wins), writes its pid into it and SIGKILLs itself — mid-run, with
the task assigned to it and nothing reported back. The nanny restarts the worker; the restarted process loads
this preload again, finds ``killed`` taken and keeps running. Without the variable or the ``armed`` file the
plugin does nothing.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin

TRIGGER_ENV = "REPDISSECT_TEST_TRIGGER_DIR"


class KillOnceOnTask(WorkerPlugin):
    """SIGKILL this worker process the first time (cluster-wide) a task with the armed prefix starts."""

    name = "repdissect-test-kill-once"

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing":
            return
        armed = self.directory / "armed"
        try:
            prefix = armed.read_text().strip()
        except FileNotFoundError:
            return
        if not prefix or not str(key).startswith(prefix):
            return
        try:
            fd = os.open(self.directory / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {key}\n".encode())
        os.fsync(fd)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


async def dask_setup(worker: Any) -> None:
    directory = os.environ.get(TRIGGER_ENV)
    if directory:
        await worker.plugin_add(KillOnceOnTask(Path(directory)), name=KillOnceOnTask.name)
