"""Content-addressed cache of stage results: ``<cache>/<stage>/<key[:2]>/<key>/`` + ``manifest.json``.

The constraint: runs take hours and die; two runs may race on one key; disks flip bytes. So an entry is
published atomically — every file written and fsynced into a temp sibling, ``manifest.json`` (sizes,
sha256, row counts) written last, then one ``rename`` into place — and an entry exists only if its
manifest is present and valid. Every read checks file sizes against the manifest (sha256 too when asked);
an entry that fails is moved to ``<cache>/_quarantine/`` and treated as missing, so it is recomputed.
The first publisher of a key wins; a loser discards its copy (equal keys mean equivalent results).

Shard-level work of a node is staged in ``<stage>/.staging-<key>/`` with the same write-then-rename rule,
so a killed run resumes without recomputing finished shards.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import fsync_dir, sha256_file, write_bytes_atomic
from ._crash import crash_point
from ._errors import CacheError, PipelineError
from ._retention import CleanPlan, load_run_records, select_records, tree_bytes

__all__ = ["CacheStore", "Entry", "MANIFEST", "MANIFEST_SCHEMA", "REPORTS"]

log = logging.getLogger("repdissect.cache")

MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
_QUARANTINE = "_quarantine"
_RUNS = "_runs"
#: report pieces (``<cache>/_reports/<piece>-<trace>/``), kept while every entry they were drawn from is live
REPORTS = "_reports"


def _newest_mtime(path: Path) -> float:
    """Latest modification time in a tree: a staging dir being filled for hours is not stale."""
    newest = 0.0
    for item in [path, *path.rglob("*")]:
        try:
            newest = max(newest, item.stat().st_mtime)
        except OSError:  # removed meanwhile
            continue
    return newest


@dataclass(frozen=True)
class Entry:
    """A published, validated cache entry."""

    path: Path
    manifest: dict[str, Any]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    def parts(self, table: str) -> list[Path]:
        """Parquet files of ``table`` in order (one file, or ``<table>/part-*.parquet``)."""
        names = self.manifest["tables"].get(table)
        if names is None:
            raise CacheError(
                f"cache entry {self.path} has no table {table!r}; it has {sorted(self.manifest['tables'])}"
            )
        return [self.path / name for name in names]

    def table(self, table: str) -> pa.Table:
        """The whole table (all parts concatenated). For small tables; stream big ones with :meth:`parts`."""
        parts = [pq.read_table(p) for p in self.parts(table)]
        if len(parts) == 1:
            return parts[0]
        return pa.concat_tables(parts)

    def frame(self, table: str):
        return self.table(table).to_pandas()

    def file(self, name: str) -> Path:
        """A non-table file of the entry (e.g. a checkpoint)."""
        if name not in self.manifest["files"]:
            raise CacheError(f"cache entry {self.path} has no file {name!r}")
        return self.path / name

    @property
    def extras(self) -> dict[str, Any]:
        return self.manifest.get("extras", {})


class CacheStore:
    """The cache directory. Thread- and process-safe by construction (atomic renames only)."""

    def __init__(self, root: str | Path, *, verify_checksums: bool = False) -> None:
        self.root = Path(root)
        self.verify_checksums = verify_checksums

    # -- layout ---------------------------------------------------------------------------------
    def entry_path(self, stage: str, key: str) -> Path:
        return self.root / stage / key[:2] / key

    def staging_path(self, stage: str, key: str) -> Path:
        return self.root / stage / f".staging-{key}"

    def ensure_writable(self) -> None:
        """Fail early, with the fix, when the cache directory cannot be created or written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise PipelineError(
                f"cache directory {str(self.root)!r} is not writable ({exc.strerror or exc}); "
                "choose another with --cache DIR or [run].cache_dir, or fix its permissions"
            ) from None

    # -- reading --------------------------------------------------------------------------------
    def get(self, stage: str, key: str, *, verify: bool | None = None) -> Entry | None:
        """The valid entry for ``key``, or ``None``; an invalid entry is quarantined and reported."""
        path = self.entry_path(stage, key)
        if not path.exists():
            return None
        try:
            return self._validate(path, key, self.verify_checksums if verify is None else verify)
        except CacheError as exc:
            self.quarantine(path, str(exc))
            return None

    def _validate(self, path: Path, key: str | None, verify: bool) -> Entry:
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CacheError(f"{path}: manifest.json is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CacheError(f"{path}: manifest.json is unreadable ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("manifest_schema") != MANIFEST_SCHEMA:
            raise CacheError(f"{path}: manifest schema {manifest.get('manifest_schema') if isinstance(manifest, dict) else None!r} "
                             f"is not {MANIFEST_SCHEMA}")
        if key is not None and manifest.get("key") != key:
            raise CacheError(f"{path}: manifest key {manifest.get('key')!r} does not match the directory")
        files, tables = manifest.get("files"), manifest.get("tables")
        # A parseable but malformed manifest is as untrustworthy as a truncated one: never a KeyError later.
        well_formed = (
            isinstance(files, dict) and isinstance(tables, dict)
            and all(isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
                    for i in files.values())
            and all(isinstance(parts, list) and all(p in files for p in parts) for parts in tables.values())
        )
        if not well_formed:
            raise CacheError(f"{path}: manifest.json is malformed (files/tables missing, or a table part not listed)")
        for name, info in files.items():
            file = path / name
            try:
                size = file.stat().st_size
            except FileNotFoundError:
                raise CacheError(f"{path}: file {name} listed in the manifest is missing") from None
            if size != info["bytes"]:
                raise CacheError(f"{path}: file {name} has {size} bytes, the manifest says {info['bytes']} (truncated?)")
            if verify and sha256_file(file) != info["sha256"]:
                raise CacheError(f"{path}: file {name} does not match its sha256 in the manifest (corrupted)")
        return Entry(path=path, manifest=manifest)

    def quarantine(self, path: Path, reason: str) -> Path | None:
        target = self.root / _QUARANTINE / f"{path.parent.parent.name}-{path.name}-{uuid.uuid4().hex[:8]}"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(path, target)
        except OSError:
            return None
        (target / "QUARANTINE_REASON.txt").write_text(reason + "\n", encoding="utf-8")
        log.warning("cache entry quarantined and will be recomputed: %s", reason)
        return target

    # -- writing --------------------------------------------------------------------------------
    def publish(
        self,
        stage: str,
        key: str,
        tables: Mapping[str, pa.Table],
        *,
        staged: Mapping[str, list[Path]] | None = None,
        files: Mapping[str, bytes] | None = None,
        manifest: Mapping[str, Any],
    ) -> Entry:
        """Atomically publish an entry; if another process published ``key`` first, keep theirs.

        Args:
            tables: name → table, written as ``<name>.parquet``.
            staged: name → already-written Parquet part files (moved in as ``<name>/part-NNNNN.parquet``).
            files: extra files (name → bytes), e.g. a checkpoint.
            manifest: stage-provided manifest fields (params, upstream keys, timings, …).
        """
        final = self.entry_path(stage, key)
        existing = self.get(stage, key)
        if existing is not None:
            return existing
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            self._write_and_rename(stage, key, tmp, final, tables, staged, files, manifest)
        except OSError:
            # The winner of a race removes the losers' temp dirs (and the shared staging dir): a write that
            # fails because its files vanished is a lost race when a valid entry is now in place.
            winner = self.get(stage, key)
            if winner is None:
                raise
            return winner
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._remove_stale_temps(final.parent, key)
        entry = self.get(stage, key, verify=False)
        if entry is None:  # pragma: no cover - would mean the filesystem lies about rename
            raise CacheError(f"published entry {final} failed validation right after publish")
        return entry

    @staticmethod
    def _remove_stale_temps(parent: Path, key: str) -> None:
        """Temp dirs of ``key`` left by killed or losing publishers: garbage once the entry exists."""
        for stale in parent.glob(f".tmp-{key[:16]}-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def _write_and_rename(self, stage: str, key: str, tmp: Path, final: Path, tables: Mapping[str, pa.Table],
                          staged: Mapping[str, list[Path]] | None, files: Mapping[str, bytes] | None,
                          manifest: Mapping[str, Any]) -> None:
        """Write every file into ``tmp`` (fsynced, manifest last) and rename it to ``final``."""
        table_files: dict[str, list[str]] = {}
        file_info: dict[str, dict[str, Any]] = {}
        for name, table in tables.items():
            rel = f"{name}.parquet"
            pq.write_table(table, tmp / rel, compression="zstd")
            table_files[name] = [rel]
            file_info[rel] = {"rows": table.num_rows}
        for name, paths in (staged or {}).items():
            (tmp / name).mkdir(parents=True, exist_ok=True)
            rels = []
            for i, src in enumerate(paths):
                rel = f"{name}/part-{i:05d}.parquet"
                shutil.copyfile(src, tmp / rel)
                rels.append(rel)
                file_info[rel] = {"rows": pq.ParquetFile(tmp / rel).metadata.num_rows}
            table_files[name] = rels
        for name, data in (files or {}).items():
            (tmp / name).write_bytes(data)
            file_info[name] = {}
        for rel, info in file_info.items():
            path = tmp / rel
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            info["bytes"] = path.stat().st_size
            info["sha256"] = sha256_file(path)
        full = dict(manifest)
        full.update({
            "manifest_schema": MANIFEST_SCHEMA,
            "stage": stage,
            "key": key,
            "tables": table_files,
            "files": file_info,
            "published_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        })
        write_bytes_atomic(json.dumps(full, indent=1, sort_keys=True).encode("utf-8"), tmp / MANIFEST)
        fsync_dir(tmp)
        crash_point("publish-before-rename", f"{stage}/{key}")
        try:
            os.rename(tmp, final)
        except OSError:
            # Lost the race (or a stale invalid dir is in the way): keep the winner if it is valid.
            if self.get(stage, key) is not None:
                return
            self.quarantine(final, "invalid entry in the way of a new publish")
            os.rename(tmp, final)
        fsync_dir(final.parent)

    def discard_staging(self, stage: str, key: str) -> None:
        shutil.rmtree(self.staging_path(stage, key), ignore_errors=True)

    # -- maintenance ----------------------------------------------------------------------------
    def iter_entries(self) -> Iterator[tuple[str, str, Path]]:
        """``(stage, key, path)`` for every entry directory (valid or not), skipping temp/staging dirs."""
        if not self.root.is_dir():
            return
        for stage_dir in sorted(self.root.iterdir()):
            if not stage_dir.is_dir() or stage_dir.name.startswith((".", "_")):
                continue
            for fan in sorted(stage_dir.iterdir()):
                if not fan.is_dir() or fan.name.startswith("."):
                    continue
                for entry in sorted(fan.iterdir()):
                    if entry.is_dir() and not entry.name.startswith("."):
                        yield stage_dir.name, entry.name, entry

    def verify(self) -> list[tuple[str, str, str | None]]:
        """Re-check every entry with sha256. Returns ``(stage, key, problem or None)``; bad ones are quarantined."""
        report = []
        for stage, key, path in list(self.iter_entries()):
            try:
                self._validate(path, key, verify=True)
                report.append((stage, key, None))
            except CacheError as exc:
                self.quarantine(path, str(exc))
                report.append((stage, key, str(exc)))
        return report

    # -- run records (GC roots) -----------------------------------------------------------------
    def record_run(self, record: Mapping[str, Any], path: Path | None = None) -> Path:
        """Write a run record (a new file, or ``path`` to replace the one a run wrote when it started)."""
        if path is None:
            stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            path = self.root / _RUNS / f"{stamp}-{record.get('name', 'run')}.json"
        write_bytes_atomic(json.dumps(record, indent=1, sort_keys=True, default=str).encode("utf-8"), path)
        return path

    def run_records(self) -> list[dict[str, Any]]:
        records = []
        runs = self.root / _RUNS
        if runs.is_dir():
            for path in sorted(runs.glob("*.json")):
                try:
                    records.append(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, json.JSONDecodeError):
                    log.warning("ignoring unreadable run record %s", path)
        return records

    def plan_clean(self, *, keep_last: int | None = None, newer_than: _dt.datetime | None = None,
                   max_temp_age_s: float = 3600.0) -> CleanPlan:
        """What :meth:`clean` would remove under the retention policy, with the bytes that frees.

        Entries referenced by a kept run record stay (a running run's record is always kept); entries only
        dropped records (or none) refer to go, with the quarantine, stale temp/staging dirs and report copies
        whose inputs are gone. ``keep_last``/``newer_than``: see :func:`select_records`.
        """
        kept, dropped = select_records(load_run_records(self.root / _RUNS), keep_last=keep_last,
                                       newer_than=newer_than)
        referenced = {k for r in kept for k in r.keys}
        plan = CleanPlan(records=dropped, kept_records=kept)
        for stage, key, path in list(self.iter_entries()):
            if (stage, key) not in referenced:
                plan.entries.append(path)
        live_keys = {key for _, key in referenced}
        now = time.time()
        if self.root.is_dir():
            for stage_dir in self.root.iterdir():
                if not stage_dir.is_dir() or stage_dir.name == _RUNS:
                    continue
                if stage_dir.name == _QUARANTINE:
                    plan.other.extend(p for p in stage_dir.iterdir())
                    continue
                if stage_dir.name == REPORTS:
                    plan.other.extend(self._dead_report_copies(stage_dir, live_keys, now, max_temp_age_s))
                    continue
                candidates = list(stage_dir.glob(".staging-*")) + list(stage_dir.glob("*/.tmp-*"))
                for tmp in candidates:
                    if now - _newest_mtime(tmp) > max_temp_age_s:
                        plan.other.append(tmp)
        plan.bytes_freed = sum(tree_bytes(p) for p in plan.paths)
        return plan

    @staticmethod
    def _dead_report_copies(reports: Path, live_keys: set[str], now: float, max_temp_age_s: float) -> list[Path]:
        """Report pieces (``<cache>/_reports/<piece>-<trace>``) drawn from an entry that is no longer live."""
        dead = []
        for copy in reports.iterdir():
            if copy.name.startswith("."):
                if now - _newest_mtime(copy) > max_temp_age_s:
                    dead.append(copy)
                continue
            try:
                keys = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))["keys"]
            except (OSError, ValueError, KeyError, TypeError):
                dead.append(copy)
                continue
            if not set(keys) <= live_keys:
                dead.append(copy)
        return dead

    def clean(self, *, keep_last: int | None = None, newer_than: _dt.datetime | None = None,
              max_temp_age_s: float = 3600.0, dry_run: bool = False) -> list[Path]:
        """Remove what :meth:`plan_clean` lists (nothing in a ``dry_run``); returns the paths."""
        plan = self.plan_clean(keep_last=keep_last, newer_than=newer_than, max_temp_age_s=max_temp_age_s)
        if not dry_run:
            self.apply_clean(plan)
        return plan.paths

    def apply_clean(self, plan: CleanPlan) -> None:
        """Remove the paths of ``plan``: dropped run records first, then entries (manifest first)."""
        for record in plan.records:
            record.path.unlink(missing_ok=True)
        # A run that started after the plan was made keeps whatever its record names.
        live = {k for r in load_run_records(self.root / _RUNS) for k in r.keys}
        for path in plan.entries:
            if (path.parent.parent.name, path.name) in live:
                continue
            (path / MANIFEST).unlink(missing_ok=True)  # manifest first: a half-deleted entry is never valid
            shutil.rmtree(path, ignore_errors=True)
        for path in plan.other:
            if path.is_dir():
                (path / MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
