"""Report pieces: each table, figure, gallery and summary is cached by the keys of the entries it read.

The constraint: a report is a pure function of cache entries, the config and the report code, yet drawing
it (matplotlib, pandas, ~60 PNGs) dominates a warm rerun — and a warm ``run`` or ``report`` into any new
folder must not redraw anything, while a changed input must redraw exactly the pieces that read it.

So the report is cut into *pieces* (one table builder, one figure builder, one layer's exemplars, the
console summary, ...). A piece draws through a :class:`TracedData` view of the run, which records every
question the piece asks and the answer at the level of cache keys, never data:

* ``stage:S`` — the ``(label, key)`` of every node of stage ``S`` (asked by ``table``/``entries``);
* ``entry:S:{label}`` — the key of the one node a piece looked up (``entry``/``node_table``);
* ``has:S``, ``instances``, ``pairs``, ``dataset`` (its spec and digest: exemplar images are drawn from it);
* ``config:PATH`` — one config value the piece read (``config.iou.threshold``), through a read-only proxy;
* ``source`` — a digest of the report package's code (any edit to it redraws every piece).

The piece's files and page fragment are then published under ``<cache>/_reports/<piece>-<trace>/``
(temp dir, manifest last, one rename) with that trace. Looking a piece up replays each recorded
question against the current plan — all answered from node keys, so nothing is loaded — and serves the
first stored version whose answers all match (a *verifying trace*, as in build systems with dynamic
dependencies). A piece that reads through anything but the view (``data.plan``, ``data.result``) fails,
so no dependency goes unrecorded; a piece in which a builder failed is served once and not kept; a
version drawn by other report code (an upgrade, an edit) is removed when the piece is next looked up. ``repdissect clean`` drops a piece once an entry it read is gone.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ..core import MANIFEST, crash_point, digest, write_bytes_atomic
from ._data import InstanceInfo, RunData
from ._version import REPORT_VERSION

__all__ = ["Piece", "PieceOutcome", "TracedData", "serve_piece", "report_source"]

log = logging.getLogger("repdissect.reports")

_MISSING = "<missing>"
_PATH_TOKEN = re.compile(r"\.?([A-Za-z_]\w*)|\[(\d+)\]")


@dataclass(frozen=True)
class Piece:
    """One cacheable part of the report.

    ``draw(data, root)`` writes its files under ``root`` (``figures/``, ``tables/``, ``units/``, the same
    layout as the output folder) and returns a JSON-able payload (what the page and summary need).
    """

    name: str
    draw: Callable[[RunData, Path], Any]


@dataclass
class PieceOutcome:
    """A piece's payload and files (relative to the output folder), and whether it was drawn just now."""

    name: str
    payload: Any
    files: list[str]
    drawn: bool


# ------------------------------------------------------------------------------------------ answers
def _canon(value: Any) -> Any:
    """``value`` as plain JSON (tuples → lists, paths → strings, dataclasses → dicts), for comparison."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _config_value(config: Any, path: str) -> Any:
    """The config value at ``path`` (``iou.threshold``, ``models[0].train``); ``_MISSING`` when absent."""
    value = config
    for name, index in _PATH_TOKEN.findall(path):
        try:
            value = getattr(value, name) if name else value[int(index)]
        except (AttributeError, IndexError, KeyError, TypeError):
            return _MISSING
    return value


@functools.lru_cache(maxsize=1)
def report_source() -> str:
    """SHA-256 over the bytes of every module of this package.

    Raw bytes, not the docstring-blind syntax-tree fingerprint the stages use: parsing the package costs
    ~2 s on a loaded machine, which a warm report cannot afford, and a documentation edit here costs only
    a redrawn report, never a recomputed statistic.
    """
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode("utf-8") + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def answer(data: RunData, query: str) -> Any:
    """The answer to one recorded question about ``data`` (a plain :class:`RunData`), as plain JSON.

    Every answer comes from the plan (node labels and keys, config, dataset spec): nothing is loaded.
    """
    return _canon(_raw_answer(data, query))


def _raw_answer(data: RunData, query: str) -> Any:
    kind, _, arg = query.partition(":")
    plan = data.plan
    if kind == "stage":
        return sorted([sorted(n.label.items()), n.key] for n in plan.by_stage(arg))
    if kind == "entry":
        stage, _, label = arg.partition(":")
        want = json.loads(label)
        hit = next((n.key for n in plan.by_stage(stage) if all(n.label.get(k) == v for k, v in want.items())), None)
        return hit
    if kind == "has":
        return bool(plan.by_stage(arg))
    if kind == "instances":
        return _canon([dataclasses.astuple(i) for i in data.instances])
    if kind == "pairs":
        return [[a.name, b.name, k, a.model.name] for a, b, k in plan.pairs]
    if kind == "dataset":
        return {"spec": plan.dataset_spec, "digest": getattr(plan, "dataset_digest", None)}
    if kind == "config":
        return _canon(_config_value(data.config, arg))
    if kind == "config-len":
        value = _config_value(data.config, arg)
        return _MISSING if value == _MISSING else len(value)
    if kind == "source":
        return report_source()
    if kind == "report_version":
        return REPORT_VERSION
    raise ValueError(f"unknown report-piece question {query!r}")


def _keys_in(query: str, value: Any) -> Iterator[str]:
    """Cache keys named by an answer (what ``clean`` checks a piece against)."""
    kind = query.partition(":")[0]
    if kind == "stage":
        yield from (key for _, key in value)
    elif kind == "entry" and value is not None:
        yield value


# --------------------------------------------------------------------------------------- the view
class _ConfigView:
    """Read-only proxy of a config (or one of its sections) that records every leaf value read."""

    __slots__ = ("_obj", "_path", "_owner")

    def __init__(self, obj: Any, path: str, owner: TracedData) -> None:
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_owner", owner)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._obj, name)
        path = f"{self._path}.{name}" if self._path else name
        if name == "to_dict":  # the whole section: recorded as one value
            self._owner._ask(f"config:{self._path}")
            return value
        if callable(value) and not isinstance(value, type):
            raise AttributeError(f"report pieces read config values, not methods ({path})")
        return self._owner._wrap(value, path)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is read-only in a report")

    def __repr__(self) -> str:
        return f"<config view {self._path or 'config'}>"


class TracedData(RunData):
    """A :class:`RunData` over ``parent`` that records each question asked and its key-level answer.

    Tables and entries are the parent's (loaded once per report); only the bookkeeping is per piece.
    """

    def __init__(self, parent: RunData) -> None:  # noqa: D107 - not RunData.__init__: shares the parent's state
        self._parent = parent
        self.trace: dict[str, Any] = {}
        self._ask("source")
        self._ask("report_version")

    def _ask(self, query: str) -> Any:
        if query not in self.trace:
            self.trace[query] = answer(self._parent, query)
        return self.trace[query]

    def _wrap(self, value: Any, path: str) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return _ConfigView(value, path, self)
        if isinstance(value, (list, tuple)) and value and all(
                dataclasses.is_dataclass(v) and not isinstance(v, type) for v in value):
            self._ask(f"config-len:{path}")
            return type(value)(_ConfigView(v, f"{path}[{i}]", self) for i, v in enumerate(value))
        self._ask(f"config:{path}")
        return value

    # -- what a piece may not touch directly --------------------------------------------------------
    @property
    def plan(self) -> Any:  # type: ignore[override]
        raise AttributeError("a report piece reads the run through RunData's methods, not .plan (they are recorded)")

    @property
    def result(self) -> Any:  # type: ignore[override]
        raise AttributeError("a report piece reads the run through RunData's methods, not .result")

    @property
    def config(self) -> Any:  # type: ignore[override]
        return _ConfigView(self._parent.config, "", self)

    # -- recorded reads -------------------------------------------------------------------------------
    @property
    def instances(self) -> list[InstanceInfo]:  # type: ignore[override]
        self._ask("instances")
        return self._parent.instances

    @property
    def models(self) -> list[tuple[str, list[str]]]:  # type: ignore[override]
        return [(m.name, list(m.layers)) for m in self.config.models]

    def has_stage(self, stage: str) -> bool:
        return bool(self._ask(f"has:{stage}"))

    def table(self, stage: str, table: str | None = None) -> Any:
        self._ask(f"stage:{stage}")
        return self._parent.table(stage, table)

    def entries(self, stage: str) -> list[tuple[dict[str, str], Any]]:
        self._ask(f"stage:{stage}")
        return self._parent.entries(stage)

    def entry(self, stage: str, **label: str) -> Any | None:
        self._ask(f"entry:{stage}:{json.dumps(label, sort_keys=True)}")
        return self._parent.entry(stage, **label)

    @property
    def dataset(self) -> Any:  # type: ignore[override]
        self._ask("dataset")
        return self._parent.dataset

    def seed_pairs(self, model: str | None = None) -> list[tuple[str, str]]:
        self._ask("pairs")
        return self._parent.seed_pairs(model)


# -------------------------------------------------------------------------------------- the store
def _slug(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:16]


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a hidden temp sibling and a rename (never a partial file)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex}.tmp")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _stored(copies: Path, piece: Piece) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Stored versions of ``piece`` (newest first) with their manifests; damaged ones are removed."""
    try:
        found = sorted(copies.glob(f"{_slug(piece.name)}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for copy in found:
        try:
            manifest = json.loads((copy / MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("piece") != piece.name or not isinstance(manifest.get("trace"), dict):
                raise ValueError("not this piece")
            for rel, size in manifest["files"].items():
                if (copy / rel).stat().st_size != size:
                    raise ValueError(f"{rel} has the wrong size")
        except FileNotFoundError:
            continue  # being published or removed right now
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("report piece %s is damaged (%s); it is drawn again", copy, exc)
            shutil.rmtree(copy, ignore_errors=True)
            continue
        yield copy, manifest


def _matches(data: RunData, trace: dict[str, Any]) -> bool:
    try:
        return all(answer(data, query) == value for query, value in trace.items())
    except (ValueError, TypeError, KeyError):
        return False


def _files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def serve_piece(piece: Piece, data: RunData, out: Path, copies: Path) -> PieceOutcome:
    """Put ``piece``'s files into ``out`` — copied from a stored version whose trace still holds, else drawn
    (through a :class:`TracedData` view) and stored under ``copies`` for the next report."""
    source = report_source()
    for copy, manifest in _stored(copies, piece):
        if manifest["trace"].get("source") != source:
            # Drawn by other report code: it can never be served again (every trace asks for the source).
            shutil.rmtree(copy, ignore_errors=True)
            continue
        if _matches(data, manifest["trace"]):
            for rel in manifest["files"]:
                _copy_file(copy / rel, out / rel)
            return PieceOutcome(piece.name, manifest["payload"], sorted(manifest["files"]), drawn=False)
    try:
        copies.mkdir(parents=True, exist_ok=True)
        tmp = copies / f".tmp-{_slug(piece.name)}-{uuid.uuid4().hex}"
        tmp.mkdir()
    except OSError:  # a cache that cannot take it only costs the next report the drawing
        tmp = Path(tempfile.mkdtemp(prefix="repdissect-piece-"))
        copies = None  # type: ignore[assignment]
    try:
        view = TracedData(data)
        payload = _canon(piece.draw(view, tmp))
        files = _files_under(tmp)
        for rel in files:
            _copy_file(tmp / rel, out / rel)
        if copies is not None and not _failed(payload):
            _publish(tmp, copies, piece, view.trace, payload, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PieceOutcome(piece.name, payload, files, drawn=True)


def _failed(payload: Any) -> bool:
    """Whether a builder failed inside the piece (its skip reason says so): such a piece is not kept, so the
    next report tries again instead of serving the failure until an input changes."""
    if isinstance(payload, dict):
        skipped = payload.get("skipped")
        return (isinstance(skipped, str) and skipped.startswith("failed:")) or any(map(_failed, payload.values()))
    if isinstance(payload, list):
        return any(map(_failed, payload))
    return False


def _publish(tmp: Path, copies: Path, piece: Piece, trace: dict[str, Any], payload: Any, files: list[str]) -> None:
    keys = sorted({k for q, v in trace.items() for k in _keys_in(q, v)})
    manifest = {"piece": piece.name, "report_version": REPORT_VERSION, "trace": trace, "payload": payload,
                "files": {rel: (tmp / rel).stat().st_size for rel in files}, "keys": keys}
    final = copies / f"{_slug(piece.name)}-{digest({'piece': piece.name, 'trace': trace})[:32]}"
    try:
        write_bytes_atomic(json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"), tmp / MANIFEST)
        crash_point("report-before-publish", piece.name)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():
                raise
    except OSError as exc:
        log.warning("could not keep report piece %s in %s (%s); the next report draws it again", piece.name,
                    copies, exc)
