"""The Python API: ``run(config) -> RunResult``, plus ``status`` (what is cached and why not).

Used by the CLI and by notebooks alike: ``repdissect.pipeline.run("configs/quick.toml").tables("iou", "units")``
gives one DataFrame over every (model, layer) with the node's labels as leading columns.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..core import CacheStore, Entry, get_stage, this_host, write_bytes_atomic
from ._config import Config, load_config
from ._dag import Plan, build_plan
from ._executor import Executor, NodeResult, connect, environment_info, _gpu_workers
from ._workload import SchedulerChoice, choose_scheduler, workload_of

if TYPE_CHECKING:  # loaded by RunResult.tables only: a warm rerun answers without pandas
    import pandas as pd

__all__ = ["run", "status", "RunResult", "NodeStatus", "resolve_config"]

log = logging.getLogger("repdissect")


def resolve_config(config: Config | str | Path | None, **overrides: Any) -> Config:
    cfg = config if isinstance(config, Config) else load_config(config)
    run_o = {k: overrides.get(k) for k in ("cache_dir", "out_dir")}
    ex_o = {k: overrides.get(k) for k in ("scheduler", "workers", "device", "progress")}
    if any(v is not None for v in run_o.values()) or any(v is not None for v in ex_o.values()):
        cfg = cfg.with_overrides(run=run_o, execution=ex_o)
    return cfg


@dataclass
class RunResult:
    """Outcome of a run: the plan, each node's result, and table accessors over the cache."""

    plan: Plan
    results: dict[str, NodeResult]
    out_dir: Path
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)

    def entries(self, stage: str) -> list[tuple[Mapping[str, str], Entry]]:
        return [(n.label, self.results[n.key].entry) for n in self.plan.by_stage(stage)]

    def tables(self, stage: str, table: str | None = None) -> pd.DataFrame:
        """One table of ``stage`` over all its nodes, with the node labels as leading columns."""
        import pandas as pd

        frames = []
        for label, entry in self.entries(stage):
            name = table or next(iter(entry.manifest["tables"]))
            if name not in entry.manifest["tables"]:
                continue
            frame = entry.frame(name)
            for i, (k, v) in enumerate(label.items()):
                frame.insert(i, k, v)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def hits(self) -> int:
        return sum(r.hit for r in self.results.values())

    @property
    def misses(self) -> int:
        return sum(not r.hit for r in self.results.values())


class _LineProgress:
    """Progress without a terminal (``run > log``): one line per finished stage, and at most one line per
    ``every`` seconds of computed nodes, each with the elapsed time and an estimate of what is left.

    The estimate is elapsed time × (nodes still to compute / nodes computed so far): crude — a training node
    costs more than a comparison — and labelled as such.
    """

    def __init__(self, plan: Plan, stream: Any = None, every: float = 15.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self.started = time.perf_counter()
        self.last = self.started
        unique = {n.key: n for n in plan.nodes}.values()
        self.left: dict[str, int] = {}
        for node in unique:
            self.left[node.stage] = self.left.get(node.stage, 0) + 1
        self.total = len(unique)
        self.done = 0
        self.computed = 0
        self.cached = 0

    def __call__(self, result: NodeResult) -> None:
        stage = result.node.stage
        self.done += 1
        self.left[stage] = self.left.get(stage, 1) - 1
        if result.hit:
            self.cached += 1
        else:
            self.computed += 1
        now = time.perf_counter()
        finished_stage = self.left[stage] == 0
        if not finished_stage and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        remaining = self.total - self.done
        if remaining and self.computed:
            estimate = f"≈{elapsed / self.computed * remaining:.0f} s left by node count"
        else:
            estimate = "done" if not remaining else "estimate after the first computed node"
        what = f"stage {stage} finished" if finished_stage else f"{stage} node finished"
        print(f"[{elapsed:7.1f} s] {what}; {self.done}/{self.total} nodes ({self.cached} cached); {estimate}",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


class _Progress:
    """One tqdm bar per stage on a terminal; silent otherwise."""

    def __init__(self, plan: Plan, enabled: bool) -> None:
        self.bars: dict[str, Any] = {}
        if not enabled:
            return
        from tqdm.auto import tqdm

        counts: dict[str, int] = {}
        for node in {n.key: n for n in plan.nodes}.values():
            counts[node.stage] = counts.get(node.stage, 0) + 1
        for pos, (stage, total) in enumerate(counts.items()):
            self.bars[stage] = tqdm(total=total, desc=f"{stage:<16}", position=pos, leave=True, unit="node",
                                    dynamic_ncols=True)

    def __call__(self, result: NodeResult) -> None:
        bar = self.bars.get(result.node.stage)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str("cached" if result.hit else f"{result.seconds:.1f}s", refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run(config: Config | str | Path | None = None, *, print_summary: bool = False, **overrides: Any) -> RunResult:
    """Run (or fetch from the cache) every node of ``config`` and write ``<out>/run.json``.

    The HTML report is the next floor's job: ``repdissect.reports.write_run_report(result)`` (the
    ``repdissect run`` command calls it).

    Keyword overrides: ``cache_dir``, ``out_dir``, ``scheduler``, ``workers``, ``device``, ``progress``.
    """
    from ..stages import tune_allocator

    tune_allocator()
    cfg = resolve_config(config, **overrides)
    started = time.time()
    store = CacheStore(cfg.run.cache_dir, verify_checksums=cfg.execution.verify_checksums)
    store.ensure_writable()
    found: dict[str, Entry] = {}  # each node is looked up (and validated) once per run
    plan = build_plan(cfg, is_cached=lambda node: _look_up(store, found, node) is not None)
    # Recorded before anything runs, so that a `clean` meanwhile keeps the entries this run reads and
    # publishes; completed below. (Without key components: `status` explains from finished runs only.)
    # pid + host let `clean` tell a live run from a crashed one (a live run's entries are never removed).
    provisional = {
        "name": cfg.run.name, "status": "running", "pid": os.getpid(), "host": this_host(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "nodes": [{"node": n.node_id, "stage": n.stage, "key": n.key} for n in plan.nodes],
    }
    record_path = store.record_run(provisional)
    try:
        result = _execute(cfg, store, plan, found, started, record_path, print_summary=print_summary,
                          record_base={k: provisional[k] for k in ("pid", "host", "created")})
    except BaseException:
        store.record_run({**provisional, "status": "failed"}, record_path)  # its published entries stay live
        raise
    return result


def _look_up(store: CacheStore, found: dict[str, Entry], node) -> Entry | None:
    """The node's valid entry, read from the store at most once per run (``found`` remembers hits)."""
    entry = found.get(node.key) or store.get(node.stage, node.key)
    if entry is not None:
        found[node.key] = entry
    return entry


def _execute(cfg: Config, store: CacheStore, plan: Plan, found: dict[str, Entry], started: float,
             record_path: Path, *, print_summary: bool, record_base: Mapping[str, Any] | None = None) -> RunResult:
    """Compute what is missing, write ``<out>/run.json`` and complete the run record.

    ``found``: the entries looked up so far this run (filled here for every node), handed to the executor
    so that no entry is read and validated twice.
    """
    ex = cfg.execution
    # Nothing to compute (a rerun): answer from the cache without starting a cluster or touching torch.
    everything_cached = all([_look_up(store, found, n) is not None for n in plan.nodes])  # every node, no short cut
    # The plan's keys name the device class (probed here or on the workers): compute exactly there.
    want_gpu = not everything_cached and plan.device.is_cuda
    choice = _choose_scheduler(cfg, plan, found, everything_cached)
    log.info("scheduler: %s", choice.reason)
    if print_summary and choice.scheduler != ex.scheduler:
        print(f"scheduler: {choice.reason}", file=sys.stderr)
    client, cluster = connect(choice.scheduler, workers=ex.workers, threads_per_worker=ex.threads_per_worker,
                              gpu=want_gpu)
    try:
        gpu_workers = _gpu_workers(client)
        resolved = "cuda" if plan.device.is_cuda else "cpu"
        # IoU tallies to count on a CPU: load their compiled kernels in the background from the start (here and
        # in each worker, see _prepare_worker), so that no tally waits for a compile or a cache load.
        warm = resolved == "cpu" and any(found.get(n.key) is None for n in plan.by_stage("iou"))
        execution = {"shard_size": ex.shard_size, "resolved_device": resolved,
                     "gpu_resource": gpu_workers > 0 and resolved == "cuda",
                     "torch_threads": ex.threads_per_worker, "parquet_engine": ex.parquet_engine,
                     "warm_kernels": warm}
        if warm and choice.scheduler == "sync":
            from ..stages import warm_kernels

            warm_kernels()
        link = getattr(client, "dashboard_link", None)
        if link and print_summary:
            print(f"Dask dashboard: {link}", file=sys.stderr)
        progress: Any = (_Progress(plan, enabled=True) if sys.stderr.isatty()
                         else _LineProgress(plan)) if ex.progress else _Progress(plan, enabled=False)
        executor = Executor(store=store, client=client, dataset_spec=plan.dataset_spec, execution=execution,
                            known=found, on_done=progress)
        try:
            results = executor.run(plan.nodes)
        finally:
            progress.close()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    out_dir = cfg.run.out_path
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = time.time() - started
    base = dict(record_base or {})
    record = {
        "name": cfg.run.name,
        "status": "finished",
        "pid": base.get("pid"), "host": base.get("host"), "started": base.get("created"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "seconds": seconds,
        "config": cfg.to_dict(),
        "dataset": {"spec": plan.dataset_spec, "digest": plan.dataset_digest},
        "cache_dir": str(Path(cfg.run.cache_dir).resolve()),
        "environment": environment_info(),
        "execution": {"scheduler": choice.scheduler, "requested_scheduler": ex.scheduler,
                      "scheduler_reason": choice.reason, "workers": ex.workers, "device": resolved,
                      "device_class": plan.device.device},
        "nodes": [
            {"node": n.node_id, "stage": n.stage, "label": dict(n.label), "key": n.key,
             "hit": results[n.key].hit, "seconds": round(results[n.key].seconds, 3),
             "key_components": n.key_components()}
            for n in plan.nodes
        ],
    }
    write_bytes_atomic(json.dumps(record, indent=1, sort_keys=True, default=str).encode(), out_dir / "run.json")
    store.record_run(record, record_path)
    result = RunResult(plan=plan, results=results, out_dir=out_dir, seconds=seconds, record=record)
    return result


def _choose_scheduler(cfg: Config, plan: Plan, found: dict[str, Entry], everything_cached: bool) -> SchedulerChoice:
    """The scheduler this run uses: none needed for a fully cached rerun, else ``auto`` resolved on the
    work still missing (see :mod:`._workload`)."""
    ex = cfg.execution
    if everything_cached:
        return SchedulerChoice("sync", "everything is cached: nothing to compute, no cluster started")
    if ex.scheduler != "auto":
        return SchedulerChoice(ex.scheduler, f"scheduler {ex.scheduler!r} as configured")
    from ..core import load_dataset

    missing = [n for n in plan.nodes if n.key not in found]
    workload = workload_of(missing, load_dataset(plan.dataset_spec))
    return choose_scheduler("auto", workload, workers=ex.workers)


@dataclass
class NodeStatus:
    node_id: str
    stage: str
    key: str
    cached: bool
    reason: str


def _explain(components: Mapping[str, Any], previous: Mapping[str, Any] | None) -> str:
    if previous is None:
        return "never computed (no earlier run recorded this node)"
    changes = []
    if previous.get("stage_version") != components["stage_version"]:
        changes.append(f"stage version {previous.get('stage_version')} → {components['stage_version']}")
    if previous.get("cache_format_version") != components["cache_format_version"]:
        changes.append("cache format version changed")
    old_p, new_p = previous.get("params", {}), components["params"]
    for k in sorted(set(old_p) | set(new_p)):
        if old_p.get(k) != new_p.get(k):
            changes.append(f"param {k}: {json.dumps(old_p.get(k))} → {json.dumps(new_p.get(k))}")
    old_u, new_u = previous.get("upstream", {}), components["upstream"]
    for k in sorted(set(old_u) | set(new_u)):
        if old_u.get(k) != new_u.get(k):
            changes.append(f"upstream {k} changed")
    old_d, new_d = previous.get("digests", {}), components["digests"]
    for k in sorted(set(old_d) | set(new_d)):
        if old_d.get(k) != new_d.get(k):
            changes.append(f"{k} digest changed")
    if not changes:
        return "same recipe as a recorded run, but the entry is missing or was quarantined"
    return "; ".join(changes)


def source_changes(stage: str, manifest: Mapping[str, Any]) -> list[str]:
    """The modules of ``stage`` (its declaring module and ``depends_on``) whose code differs from when the
    entry with ``manifest`` was computed; docstring, comment and formatting edits do not count.

    Empty when nothing changed or the entry (or this install) recorded no fingerprints. An entry from before
    per-module fingerprints only has their combined hash: then ``["the stage's source"]`` when it differs.
    """
    cls = type(get_stage(stage))
    now = cls.source_hashes()
    if not now:
        return []
    recorded = manifest.get("source_modules")
    if isinstance(recorded, dict) and recorded:
        return sorted(m for m in set(now) | set(recorded) if now.get(m) != recorded.get(m))
    old = manifest.get("source_hash")
    return ["the stage's source"] if old and old != cls.source_hash() else []


def status(config: Config | str | Path | None = None, **overrides: Any) -> list[NodeStatus]:
    """Each node: cached or not, and why not (which key component changed since the last recorded run)."""
    cfg = resolve_config(config, **overrides)
    store = CacheStore(cfg.run.cache_dir)
    plan = build_plan(cfg)
    previous: dict[str, Mapping[str, Any]] = {}
    for record in store.run_records():  # oldest first: later runs overwrite
        for node in record.get("nodes", []):
            if "key_components" in node:
                previous[node["node"]] = node["key_components"]
    out = []
    for node in plan.nodes:
        entry = store.get(node.stage, node.key)
        if entry is not None:
            reason = "cached"
            changed = source_changes(node.stage, entry.manifest)
            if changed:
                reason = (f"cached (warning: {', '.join(changed)} changed since this entry was computed, but the "
                          f"{node.stage} stage version was not bumped; bump it if its results change)")
            out.append(NodeStatus(node.node_id, node.stage, node.key, True, reason))
        else:
            out.append(NodeStatus(node.node_id, node.stage, node.key, False,
                                  _explain(node.key_components(), previous.get(node.node_id))))
    return out
