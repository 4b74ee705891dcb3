"""Runs a DAG of :class:`Node` s on Dask (LocalCluster or an address) or in-process, publishing to the cache.

The constraint: the work must fan out over any Dask cluster while every result lands in the cache exactly
once and a dead worker costs only a retry. So the client holds a small event loop: a node whose upstream
entries exist is looked up in the cache (hit) or submitted as tasks — one ``map`` per shard, a pairwise
``combine`` tree, one ``finalize+publish`` — with readable Dask keys; tasks write to the cache from the
worker and hand back only small summaries (Dask's advice for big results). Task functions are module-level
and idempotent (staged shards are reused on retry), so Dask's ``retries`` are safe. Device stages request
the ``GPU`` resource only when some worker advertises it; otherwise they run on the CPU — a task never
waits forever for a resource nobody has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import platform
import socket
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as cf_wait
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .. import stages as _stages  # noqa: F401  (a worker unpickling a task registers the built-in stages)
from ..core import (USER_ERRORS, CacheStore, Context, Entry, Node, PipelineError, ShardedStage, StageOutput, crash_point,
                    digest, get_stage, write_parquet_atomic)
from ._memory_profile import task_profiler

__all__ = ["Executor", "NodeResult", "environment_info", "connect"]

log = logging.getLogger("repdissect.executor")


def _platform() -> str:
    """``system-release-machine[-with-libcVERSION]``, as ``platform.platform()`` prints it on Linux, without its
    ``uname -p`` child process (a vfork of the whole run, which a memory measurement counts twice)."""
    uname = platform.uname()  # its lazily computed ``processor`` field is the one that spawns; not read here
    libc, libc_version = platform.libc_ver() if uname.system == "Linux" else ("", "")
    parts = [uname.system, uname.release, uname.machine] + (["with", libc + libc_version] if libc else [])
    return "-".join(part for part in parts if part)


@functools.lru_cache(maxsize=1)
def environment_info() -> dict[str, Any]:
    """Library versions and host facts recorded in manifests and run records (cheap: no heavy imports)."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"python": sys.version.split()[0], "platform": _platform(), "host": socket.gethostname()}
    for dist in ("repdissect", "torch", "torchvision", "numpy", "scipy", "pandas", "pyarrow", "dask", "distributed"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    torch = sys.modules.get("torch")  # only report CUDA/determinism facts if torch is already loaded
    if torch is not None:
        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
        info["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
        info["torch_threads"] = torch.get_num_threads()
    return dict(info)


# ---------------------------------------------------------------------------------------------------
# Task functions: run on workers (or in-process). Module-level so they pickle by reference.
# ---------------------------------------------------------------------------------------------------
def _prepare_worker(ctx: Context) -> None:
    from ..stages import tune_allocator, warm_kernels

    tune_allocator()  # once per process: keep freed batch buffers mapped (see stages/_allocator.py)
    if ctx.execution.get("warm_kernels"):
        warm_kernels()  # once per process, in the background (see stages/_warmup.py)
    threads = int(ctx.execution.get("torch_threads") or 0)
    if threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@dataclass(frozen=True)
class UserFailure:
    """A user error (bad data, weights, input) raised in a task, returned instead of raised.

    Such errors are deterministic, so Dask must not retry them (``retries`` would repeat hours of work to
    fail the same way), and the worker must not log a traceback; the client re-raises ``error``.
    """

    error: BaseException


#: schema metadata marking the stand-in partial of a shard whose node another run published meanwhile
_SUPERSEDED = b"repdissect.superseded"


def _superseded() -> pa.Table:
    return pa.table({}).replace_schema_metadata({_SUPERSEDED: b"1"})


def _is_superseded(table: pa.Table | None) -> bool:
    return table is not None and bool(table.schema.metadata) and _SUPERSEDED in table.schema.metadata


def _releasing(task: Callable[..., Any]) -> Callable[..., Any]:
    """Return the memory a task freed to the OS when it ends (see ``release_freed_memory``): a long-lived worker
    otherwise keeps the high-water mark of every task it ran, and a cluster's processes add those up."""

    kind = task.__name__.removeprefix("task_")

    @functools.wraps(task)
    def run(*args: Any, **kwargs: Any) -> Any:
        profiler = task_profiler()  # None unless REPDISSECT_MEMORY_PROFILE is set (see _memory_profile.py)
        if profiler is not None:
            ctx = args[0]
            profiler.start(kind, ctx.node.stage, ctx.node.node_id)
        result = None
        try:
            result = task(*args, **kwargs)
            return result
        finally:
            from ..stages import release_freed_memory

            if profiler is not None:
                profiler.end(result_bytes=int(getattr(result, "nbytes", 0) or 0))
            release_freed_memory()
            if profiler is not None:
                profiler.end(released=True)

    return run


@_releasing
def task_map(ctx: Context, shard_index: int, shard: Any) -> pa.Table | UserFailure:
    """One shard → partial state. Reuses a staged partial from an earlier (killed) attempt."""
    _prepare_worker(ctx)
    crash_point("task-start", ctx.node.node_id)
    if ctx.store.get(ctx.node.stage, ctx.node.key) is not None:
        # Published already (by a racing run, or by this run before Dask recomputes tasks a killed worker
        # held): nothing to map, and staging nothing keeps the published node's staging dir gone.
        return _superseded()
    try:
        return _map_shard(ctx, shard_index, shard)
    except USER_ERRORS as exc:
        return UserFailure(exc)
    except Exception:
        # A racing run published this node and removed the shared staging dir while we wrote into it:
        # the rest of this node's work is moot (task_publish keeps the winner). Anything else is re-raised.
        if ctx.store.get(ctx.node.stage, ctx.node.key) is None:
            raise
        return _superseded()


def _map_shard(ctx: Context, shard_index: int, shard: Any) -> pa.Table:
    staged = ctx.staging / "_partials" / f"part-{shard_index:05d}.parquet"
    if staged.is_file():
        try:
            return pq.read_table(staged)
        except Exception:  # noqa: BLE001 - unreadable leftovers are recomputed, never trusted
            staged.unlink(missing_ok=True)
    stage = get_stage(ctx.node.stage)
    assert isinstance(stage, ShardedStage)
    partial = stage.map(ctx, shard_index, shard)
    write_parquet_atomic(partial, staged)
    crash_point("shard-staged", ctx.node.node_id)
    return partial


@_releasing
def task_combine(ctx: Context, a: pa.Table | UserFailure, b: pa.Table | UserFailure) -> pa.Table | UserFailure:
    for part in (a, b):
        if isinstance(part, UserFailure):
            return part
    if _is_superseded(a) or _is_superseded(b):
        return _superseded()
    _prepare_worker(ctx)
    stage = get_stage(ctx.node.stage)
    assert isinstance(stage, ShardedStage)
    try:
        return stage.combine(ctx, a, b)
    except USER_ERRORS as exc:
        return UserFailure(exc)


@_releasing
def task_publish(ctx: Context, merged: pa.Table | UserFailure | None, started: float) -> dict[str, Any] | UserFailure:
    """Finalize (sharded) or run (simple) the stage, then publish the entry atomically."""
    if isinstance(merged, UserFailure):
        return merged
    _prepare_worker(ctx)
    crash_point("task-start", ctx.node.node_id)
    store = ctx.store
    existing = store.get(ctx.node.stage, ctx.node.key)
    if existing is not None:  # a racing run published it meanwhile: first publisher wins
        store.discard_staging(ctx.node.stage, ctx.node.key)
        return {"key": ctx.node.key, "seconds": 0.0, "published": False}
    if _is_superseded(merged):
        raise PipelineError(f"{ctx.node.node_id}: another run published this entry while it was computed here, "
                            "but the entry is gone now (quarantined?); run again to recompute it")
    try:
        return _finalize_and_publish(ctx, merged, started)
    except USER_ERRORS as exc:
        return UserFailure(exc)
    except Exception:
        # A racing run may have published this key and removed the shared staging directory under our
        # feet: that is a lost race, not a failure (first publisher wins). Anything else is re-raised.
        if store.get(ctx.node.stage, ctx.node.key) is None:
            raise
        log.info("%s: another run published this entry first; keeping theirs", ctx.node.node_id)
        store.discard_staging(ctx.node.stage, ctx.node.key)
        return {"key": ctx.node.key, "seconds": 0.0, "published": False}


def _finalize_and_publish(ctx: Context, merged: pa.Table | None, started: float) -> dict[str, Any]:
    store = ctx.store
    stage = get_stage(ctx.node.stage)
    t0 = time.time()
    output: StageOutput = stage.finalize(ctx, merged) if isinstance(stage, ShardedStage) else stage.run(ctx)
    # The computation's temporaries are freed now; what glibc holds of them would stay resident under the
    # tables' conversion and writing (Arrow allocates from its own pool): hand it back first.
    from ..stages import release_freed_memory

    release_freed_memory()
    node = ctx.node
    manifest = {
        "stage_version": node.version,
        "label": dict(node.label),
        "params": dict(node.params),
        "exec_params": dict(node.exec_params),
        "upstream": {role: up.key for role, up in node.upstream.items()},
        "digests": dict(node.digests),
        "key_components": node.key_components(),
        "source_hash": type(stage).source_hash(),
        "source_modules": type(stage).source_hashes(),
        "extras": output.extras,
        "timings": {"total_seconds": time.time() - started, "finalize_seconds": time.time() - t0},
        "worker": socket.gethostname(),
        "pid": os.getpid(),
        "environment": environment_info(),
    }
    store.publish(node.stage, node.key, output.arrow_tables(), staged=ctx.staged_parts(), files=output.files,
                  manifest=manifest)
    crash_point("node-published", node.node_id)
    store.discard_staging(node.stage, node.key)
    return {"key": node.key, "seconds": time.time() - started, "published": True}


# ---------------------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------------------
class _SyncClient:
    """In-process stand-in for ``distributed.Client`` (``--scheduler sync``): runs each task on submit."""

    dashboard_link = None

    def submit(self, fn: Callable, *args: Any, key: str | None = None, resources: Any = None, retries: int = 0,
               pure: bool = False, priority: int = 0) -> Future:
        fut: Future = Future()
        resolved = [a.result() if isinstance(a, Future) else a for a in args]
        try:
            fut.set_result(fn(*resolved))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, like Dask
            fut.set_exception(exc)
        return fut

    def close(self) -> None:
        pass


def connect(scheduler: str, *, workers: int, threads_per_worker: int, gpu: bool) -> tuple[Any, Any]:
    """``(client, cluster)`` for ``"sync"``, ``"local"`` or a scheduler address; raises PipelineError."""
    if scheduler == "sync":
        return _SyncClient(), None
    from distributed import Client, LocalCluster

    # Dask's INFO chatter (and workers' "Compute Failed" reports of errors the client re-raises anyway)
    # would bury the one-line error message; ``--debug`` (root logger at DEBUG) keeps it.
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    if quiet:
        logging.getLogger("distributed").setLevel(logging.WARNING)
    if scheduler == "local":
        kwargs: dict[str, Any] = {"n_workers": workers, "threads_per_worker": threads_per_worker,
                                  "processes": True, "dashboard_address": ":0",
                                  "silence_logs": logging.CRITICAL if quiet else logging.INFO}
        if gpu:
            kwargs["resources"] = {"GPU": 1}
        try:
            cluster = LocalCluster(**kwargs)
        except Exception as exc:  # noqa: BLE001
            raise PipelineError(f"could not start a local Dask cluster ({exc}); try --scheduler sync") from None
        return Client(cluster), cluster
    fix = "start one with `dask scheduler` and workers with `dask worker ADDRESS`, or use --scheduler local / sync"
    try:
        _probe_tcp(scheduler)
        client = Client(scheduler, timeout="10s")
    except Exception as exc:  # noqa: BLE001 - connection errors come in many types
        raise PipelineError(
            f"cannot reach the Dask scheduler at {scheduler!r} ({type(exc).__name__}: {exc}); {fix}"
        ) from None
    return client, None


def _probe_tcp(address: str, timeout: float = 5.0) -> None:
    """Fail at once on a refused TCP address (``Client`` would retry until its timeout); other schemes pass."""
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme == "tcp":
        host, port = parse_host_port(location)
        socket.create_connection((host, port), timeout=timeout).close()


def _gpu_workers(client: Any) -> int:
    return len(_gpu_addresses(client))


def _gpu_addresses(client: Any) -> list[str]:
    """Addresses of the workers that advertise a ``GPU`` resource (none for the in-process client)."""
    if isinstance(client, _SyncClient):
        return []
    info = client.scheduler_info()
    return sorted(a for a, w in info.get("workers", {}).items() if w.get("resources", {}).get("GPU", 0) > 0)


#: Dask priority of combine and publish tasks (maps have 0): a combine runs as soon as its two inputs exist,
#: before further maps, so a worker holds a few partial states of a node rather than all of its maps' (the
#: demo's similarity states are 16.6 MiB each, eight maps per node). The tree is fixed when submitted, so
#: which states meet — and the result — does not depend on the order tasks run in.
_REDUCE_PRIORITY = 1


def _layout(shards: list[Any]) -> str:
    """A short digest of how a node is cut into shards (the name of its staging directory)."""
    return digest(shards)[:16]


@dataclass
class NodeResult:
    node: Node
    hit: bool
    seconds: float
    entry: Entry | None = None
    error: str | None = None


@dataclass
class Executor:
    """Runs nodes in dependency order; ``client`` is a distributed.Client or the in-process stand-in."""

    store: CacheStore
    client: Any
    dataset_spec: dict[str, Any]
    execution: dict[str, Any]
    retries: int = 2
    on_done: Callable[[NodeResult], None] | None = None
    results: dict[str, NodeResult] = field(default_factory=dict)
    #: entries the caller already looked up and validated this run (key → entry), so hits are not re-read
    known: dict[str, Entry] = field(default_factory=dict)

    def _context(self, node: Node) -> Context:
        inputs = {role: self.results[up.key].entry for role, up in node.upstream.items()}
        return Context(node=node, cache_root=str(self.store.root), inputs=inputs,
                       dataset_spec=self.dataset_spec, execution=self.execution)

    def _submit(self, node: Node) -> Future:
        stage = get_stage(node.stage)
        ctx = self._context(node)
        resources = {"GPU": 1} if (stage.uses_device and self.execution.get("gpu_resource")) else None
        started = time.time()
        base = f"{node.stage}-{node.key[:12]}"
        if isinstance(stage, ShardedStage):
            shards = stage.shards(ctx)
            if not shards:
                raise PipelineError(f"{node.node_id}: there are no shards to process (zero images?); "
                                    "check the dataset size and the upstream stage")
            ctx = dataclasses.replace(ctx, layout=_layout(shards))
            level = [self.client.submit(task_map, ctx, i, shard, key=f"{base}-map-{i}", resources=resources,
                                        retries=self.retries, pure=False) for i, shard in enumerate(shards)]
            depth = 0
            while len(level) > 1:
                nxt = []
                for j in range(0, len(level) - 1, 2):
                    nxt.append(self.client.submit(task_combine, ctx, level[j], level[j + 1],
                                                  key=f"{base}-combine-{depth}-{j // 2}", retries=self.retries,
                                                  pure=False, priority=_REDUCE_PRIORITY))
                if len(level) % 2:
                    nxt.append(level[-1])
                level, depth = nxt, depth + 1
            return self.client.submit(task_publish, ctx, level[0], started, key=f"{base}-publish",
                                      resources=resources, retries=self.retries, pure=False,
                                      priority=_REDUCE_PRIORITY)
        return self.client.submit(task_publish, ctx, None, started, key=f"{base}-run", resources=resources,
                                  retries=self.retries, pure=False)

    def run(self, nodes: Iterable[Node]) -> dict[str, NodeResult]:
        """Run every node (deduplicated by key); raises the first task error after cancelling the rest."""
        pending: dict[str, Node] = {}
        for node in nodes:
            pending.setdefault(node.key, node)
        submitted: dict[Any, tuple[Node, float]] = {}
        while pending or submitted:
            progressed = False
            for key, node in list(pending.items()):
                if not all(up.key in self.results for up in node.upstream.values()):
                    continue
                del pending[key]
                progressed = True
                entry = self.known.get(node.key) or self.store.get(node.stage, node.key)
                if entry is not None:
                    # shards staged by a run killed between publish and clean-up are no longer needed
                    self.store.discard_staging(node.stage, node.key)
                    self._done(NodeResult(node, hit=True, seconds=0.0, entry=entry))
                    continue
                submitted[self._submit(node)] = (node, time.time())
            if not submitted:
                if pending and not progressed:
                    missing = sorted(n.node_id for n in pending.values())
                    raise PipelineError(f"DAG has unsatisfiable dependencies: {missing[:5]}")
                continue
            done = self._wait_any(list(submitted))
            for fut in done:
                node, t0 = submitted.pop(fut)
                try:
                    value = fut.result()
                    if isinstance(value, UserFailure):
                        raise value.error
                except BaseException:
                    for other in submitted:
                        with contextlib.suppress(Exception):
                            other.cancel()
                    raise
                entry = self.store.get(node.stage, node.key)
                if entry is None:
                    raise PipelineError(f"{node.node_id}: the task finished but its cache entry is missing or invalid")
                self._done(NodeResult(node, hit=False, seconds=time.time() - t0, entry=entry))
        return self.results

    def _wait_any(self, futures: list[Any]) -> list[Any]:
        if isinstance(self.client, _SyncClient):
            return list(cf_wait(futures, return_when=FIRST_COMPLETED).done)
        from distributed import wait

        return list(wait(futures, return_when="FIRST_COMPLETED").done)

    def _done(self, result: NodeResult) -> None:
        self.results[result.node.key] = result
        if self.on_done is not None:
            self.on_done(result)
