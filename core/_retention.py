"""Retention policy of the cache: which run records (GC roots) to keep, and what cleaning would free.

The constraint: every run leaves a record in ``<cache>/_runs/`` naming the entries it read and published,
and ``clean`` only removes entries no record refers to — so without a policy the cache only grows. A
policy drops whole run records (never single entries of a kept run), after which the entries only the
dropped runs referred to become garbage:

* ``keep_last=N`` keeps the ``N`` newest records of each config name (``[run].name``);
* ``newer_than=T`` keeps every record created at or after ``T``;
* both given: a record is kept when either rule keeps it (like ``--keep-last``/``--keep-within`` of backup
  tools); neither given: every record is kept (only unreferenced entries and stale temp dirs go).

A record that belongs to a *running* run is always kept, whatever its age: a run writes its record (with
``pid`` and ``host``) before it computes, so the entries it reads and publishes stay live. A record in state
``running`` counts as running when its process is alive on this host, or when it was written on another
host or by a version that did not record a pid (this host cannot tell, so it errs on keeping); a
``running`` record whose process is gone on this host is a crashed run and is subject to the policy.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ._errors import UserInputError

__all__ = ["RunRecord", "CleanPlan", "load_run_records", "process_alive", "select_records", "parse_when",
           "tree_bytes", "this_host"]

log = logging.getLogger("repdissect.cache")


def this_host() -> str:
    """The name run records store as ``host`` (compared with the host of a ``running`` record)."""
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (``kill(pid, 0)``; a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    try:  # a killed child not yet reaped by its parent is a zombie: it no longer runs
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass(frozen=True)
class RunRecord:
    """One file of ``<cache>/_runs/``: a run's name, state, creation time, process and the keys it uses."""

    path: Path
    name: str
    status: str
    created: _dt.datetime
    pid: int | None
    host: str | None
    keys: frozenset[tuple[str, str]]

    @property
    def running(self) -> bool:
        """True while the run may still read or publish its entries (see the module docstring)."""
        if self.status != "running":
            return False
        if self.pid is None or self.host is None or self.host != this_host():
            return True
        return process_alive(self.pid)


def _created(raw: dict[str, Any], path: Path) -> _dt.datetime:
    for field_name in ("started", "created"):
        value = raw.get(field_name)
        if isinstance(value, str):
            try:
                when = _dt.datetime.fromisoformat(value)
            except ValueError:
                continue
            return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)
    return _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)


def load_run_records(runs_dir: Path) -> list[RunRecord]:
    """Every readable record in ``runs_dir``, oldest first; unreadable ones are logged and skipped."""
    out = []
    if not runs_dir.is_dir():
        return out
    for path in sorted(runs_dir.glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            pid = raw.get("pid")
            keys = frozenset((n["stage"], n["key"]) for n in raw.get("nodes", [])
                             if isinstance(n, dict) and "stage" in n and "key" in n)
            out.append(RunRecord(path=path, name=str(raw.get("name", "run")), status=str(raw.get("status", "finished")),
                                 created=_created(raw, path), pid=pid if isinstance(pid, int) else None,
                                 host=raw.get("host") if isinstance(raw.get("host"), str) else None, keys=keys))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable run record %s (%s)", path, exc)
    out.sort(key=lambda r: (r.created, r.path.name))
    return out


def select_records(records: Iterable[RunRecord], *, keep_last: int | None = None,
                   newer_than: _dt.datetime | None = None) -> tuple[list[RunRecord], list[RunRecord]]:
    """Split records into ``(kept, dropped)`` under the policy; running runs are always kept.

    Args:
        keep_last: keep the newest ``keep_last`` records per config name (``None``: no such rule).
        newer_than: keep records created at or after this (timezone-aware) moment (``None``: no such rule).
    """
    if keep_last is not None and keep_last < 0:
        raise UserInputError(f"--keep-last must be 0 or more, got {keep_last}; give the number of runs to keep "
                             "per config name")
    records = sorted(records, key=lambda r: (r.created, r.path.name))
    if keep_last is None and newer_than is None:
        return records, []
    newest: set[Path] = set()
    if keep_last:
        by_name: dict[str, list[RunRecord]] = {}
        for r in records:
            by_name.setdefault(r.name, []).append(r)
        for group in by_name.values():
            newest.update(r.path for r in group[-keep_last:])
    kept, dropped = [], []
    for r in records:
        keep = r.running or r.path in newest or (newer_than is not None and r.created >= newer_than)
        (kept if keep else dropped).append(r)
    return kept, dropped


def parse_when(text: str, *, now: _dt.datetime | None = None) -> _dt.datetime:
    """``--newer-than`` value: an ISO date or date-time (UTC unless it has an offset), as an aware datetime."""
    try:
        when = _dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise UserInputError(f"--newer-than {text!r} is not a date; give an ISO date such as 2026-01-31 or "
                             "2026-01-31T18:00 (UTC unless an offset is given), or use --keep-days N") from None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (``path`` itself when it is a file); vanished files count 0."""
    if path.is_file():
        try:
            return path.stat().st_size
        except OSError:
            return 0
    total = 0
    for item in path.rglob("*"):
        try:
            if item.is_file() and not item.is_symlink():
                total += item.stat().st_size
        except OSError:
            continue
    return total


@dataclass
class CleanPlan:
    """What ``clean`` removes (or, in a dry run, would remove) and the bytes that frees."""

    entries: list[Path] = field(default_factory=list)
    other: list[Path] = field(default_factory=list)  # quarantine, stale temp/staging dirs, stale report pieces
    records: list[RunRecord] = field(default_factory=list)  # run records dropped by the policy
    kept_records: list[RunRecord] = field(default_factory=list)
    bytes_freed: int = 0

    @property
    def paths(self) -> list[Path]:
        """Every path removed, entries first (what ``CacheStore.clean`` returns)."""
        return [*self.entries, *self.other, *(r.path for r in self.records)]

    @property
    def running(self) -> list[RunRecord]:
        return [r for r in self.kept_records if r.running]
