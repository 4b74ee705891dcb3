"""Named crash points: deterministic fault injection for the crash-safety and worker-failure tests.

The constraint: a test that kills a run "at some moment" and then checks that nothing half-written is
visible proves little when the moment is found by polling or sleeping — on a loaded machine the kill lands
somewhere else, or after the run ended. Instead the code calls :func:`crash_point` at each meaningful spot
(a shard's partial staged, an entry written but not yet renamed into place, an entry published but its
staging not yet removed, a worker task started), and a test *arms* one through the environment, so the
process dies exactly there, every time.

Unarmed (the normal case) a crash point is one dictionary lookup. Armed::

    REPDISSECT_CRASH_AT="NAME[:MATCH][#N]"     e.g. "publish-before-rename:iou[#2"

* ``NAME``: the point's name (:data:`CRASH_POINTS` lists them);
* ``MATCH``: only hits whose ``where`` text (a node id such as ``iou[model=cnn,…]``, or a path) contains it;
* ``N``: die at the N-th matching hit in this process (default 1st).

The process then kills itself with ``SIGKILL`` — no ``finally`` block, no ``atexit``, no flush: what a
power cut or the OOM killer leaves. With ``REPDISSECT_CRASH_ONCE=PATH`` the point fires only for the first
process that creates ``PATH`` (exclusively; it records the pid, the point and the ``where`` text), so the
retry that a Dask nanny or a rerun performs passes it. Several specs may be given, separated by commas.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

__all__ = ["CRASH_ENV", "CRASH_ONCE_ENV", "CRASH_POINTS", "crash_point"]

CRASH_ENV = "REPDISSECT_CRASH_AT"
CRASH_ONCE_ENV = "REPDISSECT_CRASH_ONCE"

#: every crash point the code defines (a spec naming another is refused, so a typo never passes silently)
CRASH_POINTS: dict[str, str] = {
    "task-start": "a worker starts a task of a node (where: node id)",
    "shard-staged": "a shard's partial result was written to the node's staging dir (where: node id)",
    "part-before-rename": "an atomic file is complete and fsynced but not renamed into place (where: its path)",
    "publish-before-rename": "an entry's files and manifest are in its temp dir, not yet renamed (where: stage/key)",
    "node-published": "an entry is published, its staging dir not yet removed (where: node id)",
    "report-before-publish": "a report piece is written to its temp dir, not yet renamed into the cache (where: piece)",
}


@dataclass(frozen=True)
class _Spec:
    name: str
    match: str
    nth: int


_parsed: tuple[str, tuple[_Spec, ...]] | None = None
_hits: dict[_Spec, int] = {}


def _parse(text: str) -> tuple[_Spec, ...]:
    specs = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        nth = 1
        if "#" in raw:
            raw, count = raw.rsplit("#", 1)
            try:
                nth = int(count)
            except ValueError:
                raise ValueError(f"{CRASH_ENV}: hit count {count!r} is not an integer (NAME[:MATCH][#N])") from None
        name, _, match = raw.partition(":")
        if name not in CRASH_POINTS:
            raise ValueError(f"{CRASH_ENV}: unknown crash point {name!r}; the points are {sorted(CRASH_POINTS)}")
        specs.append(_Spec(name, match, max(nth, 1)))
    return tuple(specs)


def crash_point(name: str, where: str = "") -> None:
    """Die here (``SIGKILL`` of this process) if the environment arms point ``name`` for ``where``."""
    text = os.environ.get(CRASH_ENV)
    if not text:
        return
    global _parsed
    if _parsed is None or _parsed[0] != text:
        _parsed = (text, _parse(text))
        _hits.clear()
    for spec in _parsed[1]:
        if spec.name != name or spec.match not in where:
            continue
        _hits[spec] = _hits.get(spec, 0) + 1
        if _hits[spec] != spec.nth:
            continue
        once = os.environ.get(CRASH_ONCE_ENV)
        if once:
            try:
                fd = os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue  # fired already (in this or another process): the retry passes
            os.write(fd, f"{os.getpid()}\n{name}\n{where}\n".encode("utf-8"))
            os.fsync(fd)
            os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
