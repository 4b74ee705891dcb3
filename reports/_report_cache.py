"""Report copies in the cache: a report is a function of its inputs' keys, so it is drawn once per key set.

The constraint: tables, figures and unit galleries are pure functions of the run's cache entries and the
config, yet drawing them (matplotlib, ~60 PNGs) dominates a warm rerun. So after a report is written, its
files are copied into ``<cache>/_reports/<stamp>/`` (published like an entry: temp dir, manifest last, one
rename), where the stamp is a digest of every node's key, the config (output and cache paths left out: they
do not change a figure), the report version and what the page states about the run (cache hits, whether a
``run.json`` sits next to it). A warm ``run`` or ``report`` into any folder with the same stamp copies the
files instead of drawing them, and prints the console summary stored with it — so the warm path loads
neither matplotlib nor pandas. ``repdissect clean`` removes a copy once any entry it was drawn from goes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

from ..core import MANIFEST, REPORTS, crash_point, digest, write_bytes_atomic
from ._version import REPORT_VERSION

__all__ = ["cached_summary", "report_stamp", "restore_report", "save_report"]

log = logging.getLogger("repdissect.reports")

_RECORD = "report.json"


def report_stamp(result: Any, *, gallery_units: int | None = 48) -> str:
    """Digest of everything the report's files depend on (see the module docstring)."""
    config = result.plan.config.to_dict()
    run = dict(config.get("run", {}))
    for path_field in ("out_dir", "cache_dir"):
        run.pop(path_field, None)
    config = {**config, "run": run}
    out = Path(result.out_dir)
    return digest({"keys": sorted(n.key for n in result.plan.nodes), "config": config,
                   "report_version": REPORT_VERSION, "gallery_units": gallery_units,
                   "nodes": len(result.results), "hits": getattr(result, "hits", 0),
                   "run_json": (out / "run.json").is_file()})


def _copies(result: Any) -> Path:
    return Path(result.plan.config.run.cache_dir) / REPORTS


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a hidden temp sibling and a rename (never a partial file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def restore_report(result: Any, stamp: str, prune: Any) -> Path | None:
    """Copy the cached report with ``stamp`` into ``result.out_dir``; ``None`` when there is none (or it is
    damaged: then it is removed and the report is drawn again).

    ``prune(out, keep)`` removes the files of the folder's previous report that this one does not write.
    """
    copy = _copies(result) / stamp
    try:
        manifest = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))
        files: dict[str, int] = manifest["files"]
        if manifest.get("stamp") != stamp or _RECORD not in files:
            raise ValueError("stamp mismatch")
        for rel, size in files.items():
            if (copy / rel).stat().st_size != size:
                raise ValueError(f"{rel} has the wrong size")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("report copy %s is damaged (%s); drawing the report again", copy, exc)
        shutil.rmtree(copy, ignore_errors=True)
        return None
    out = Path(result.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    written = set(files) - {_RECORD}
    prune(out, written)
    for rel in sorted(written):
        _copy_file(copy / rel, out / rel)
    _copy_file(copy / _RECORD, out / _RECORD)  # last: it names the files of the report now in place
    return out / "index.html"


def cached_summary(result: Any, stamp: str) -> str | None:
    """The console summary stored with the report copy ``stamp`` (``None`` when there is none)."""
    try:
        summary = json.loads((_copies(result) / stamp / MANIFEST).read_text(encoding="utf-8")).get("summary")
    except (OSError, ValueError, AttributeError):
        return None
    return summary if isinstance(summary, str) else None


def save_report(result: Any, stamp: str, written: Iterable[str], *, summary: str | None = None) -> None:
    """Publish a copy of the report just written to ``result.out_dir`` under ``stamp`` (best effort: a
    cache that cannot take it only costs the next run the drawing)."""
    copies = _copies(result)
    final = copies / stamp
    if (final / MANIFEST).is_file():
        return
    out = Path(result.out_dir).absolute()
    tmp = copies / f".tmp-{stamp[:16]}-{uuid.uuid4().hex}"
    try:
        files = {}
        for rel in sorted({*written, _RECORD}):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / rel, tmp / rel)
            files[rel] = (tmp / rel).stat().st_size
        manifest = {"stamp": stamp, "report_version": REPORT_VERSION, "files": files, "summary": summary,
                    "keys": sorted({n.key for n in result.plan.nodes})}
        write_bytes_atomic(json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"), tmp / MANIFEST)
        crash_point("report-before-publish", stamp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
    except OSError as exc:
        log.warning("could not keep a copy of the report in %s (%s); the next run draws it again", copies, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
