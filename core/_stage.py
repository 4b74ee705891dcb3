"""The stage contract: what a stage declares and what it returns, and the stage registry.

A stage is a class with a ``name``, a hand-bumped integer ``version`` (bump it when its results change),
and either one ``run`` function (small stages) or the sharded quartet ``shards`` / ``map`` / ``combine`` /
``finalize`` (dataset-wide stages: ``map`` turns one shard into a mergeable partial state, ``combine``
merges two partials — a Dask tree reduction — and ``finalize`` turns the merged state into tables). A
sharded stage over one mergeable statistic does not write that quartet: it declares the statistic
(:class:`~repdissect.core.StatisticStage`). Which parameters affect the result is declared by the DAG
when it builds a :class:`~repdissect.core.Node`.

A stage also declares ``depends_on``: the modules (relative to its own package, e.g. ``"._iou"``,
``".compare._cca"``) its result depends on besides the module that declares it. Their docstring-free
fingerprints (:func:`~repdissect.core.source_fingerprint`) are recorded in each entry's manifest, so
``status`` can warn, naming the module, when science code changed under a cached entry but the stage's
version was not bumped.

Stages do no cache I/O themselves: they read upstream entries through :class:`~repdissect.core.Context`
and return :class:`StageOutput`; the executor publishes. Stages register themselves by name
(:func:`register_stage`, a duplicate raises); the orchestration layer looks them up (:func:`get_stage`).
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa

from ._source import source_fingerprint

if TYPE_CHECKING:  # pandas loads only when a stage hands over a DataFrame (a warm rerun never does)
    import pandas as pd

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["Stage", "ShardedStage", "StageOutput", "register_stage", "get_stage", "list_stages"]


@dataclass
class StageOutput:
    """What a stage returns: named tables (pandas or Arrow), extra files, and small JSON metadata."""

    tables: dict[str, pa.Table | pd.DataFrame] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def arrow_tables(self) -> dict[str, pa.Table]:
        out = {}
        for name, table in self.tables.items():
            if not isinstance(table, pa.Table):
                table = pa.Table.from_pandas(table, preserve_index=False)
            out[name] = table
        return out


class Stage:
    """A single-task stage. Subclasses set ``name``, ``version`` and implement :meth:`run`."""

    name: ClassVar[str]
    version: ClassVar[int]
    #: runs on an accelerator when one is configured (asks Dask for the ``GPU`` resource)
    uses_device: ClassVar[bool] = False
    sharded: ClassVar[bool] = False
    #: modules, relative to the declaring module's package (``"._iou"``, ``".compare._cca"``), whose code the
    #: stage's result depends on; the declaring module itself (without the other stages in it) always counts
    depends_on: ClassVar[tuple[str, ...]] = ()

    def run(self, ctx: "Context") -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def source_files(cls, root: str | Path | None = None) -> dict[str, Path]:
        """``{name: path}`` of the declaring module and every ``depends_on`` module; names are POSIX paths
        relative to the declaring module's package directory, ``root`` stands in for that directory (a copy
        of the sources, in tests)."""
        module_file = Path(sys.modules[cls.__module__].__file__)
        base = Path(root) if root is not None else module_file.parent
        files = {module_file.name: base / module_file.name}
        for name in cls.depends_on:
            files[_module_relpath(base, name)] = base / _module_relpath(base, name)
        return dict(sorted(files.items()))

    @classmethod
    def source_hashes(cls, root: str | Path | None = None) -> dict[str, str]:
        """``{module: fingerprint}`` over :meth:`source_files`; empty when the sources cannot be read (then the
        guard is off). The declaring module is fingerprinted without the other stages declared in it.

        Without ``root`` the answer is computed once per process and class: it describes the code this
        process imported (a later edit on disk is not what runs here either).
        """
        if root is None:
            return dict(_loaded_source_hashes(cls))
        return cls._read_source_hashes(root)

    @classmethod
    def _read_source_hashes(cls, root: str | Path | None) -> dict[str, str]:
        neighbours = [c.__name__ for c in _REGISTRY.values() if c.__module__ == cls.__module__ and c is not cls]
        try:
            own = Path(sys.modules[cls.__module__].__file__).name
            return {name: source_fingerprint(path.read_text(encoding="utf-8"),
                                             drop_classes=neighbours if name == own else ())
                    for name, path in cls.source_files(root).items()}
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError):
            return {}  # e.g. a stage defined interactively or in a zip: no readable source file

    @classmethod
    def source_hash(cls, root: str | Path | None = None) -> str:
        """One sha256 over :meth:`source_hashes` (``""`` when the sources cannot be read)."""
        hashes = cls.source_hashes(root)
        return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest() if hashes else ""


@functools.lru_cache(maxsize=None)
def _loaded_source_hashes(cls: type[Stage]) -> dict[str, str]:
    return cls._read_source_hashes(None)


def _module_relpath(base: Path, name: str) -> str:
    """``"._iou"`` → ``"_iou.py"``, ``".compare._cca"`` → ``"compare/_cca.py"`` (a package → its ``__init__.py``)."""
    if not name.startswith(".") or name.startswith("..") or not all(p.isidentifier() for p in name[1:].split(".")):
        raise ValueError(f"depends_on entry {name!r}: give a module relative to the stage's package, e.g. '._iou'")
    parts = name[1:].split(".")
    rel = Path(*parts)
    if (base / rel).is_dir():
        return (rel / "__init__.py").as_posix()
    return rel.with_suffix(".py").as_posix()


class ShardedStage(Stage):
    """A dataset-wide stage computed as map over shards → tree-combine → finalize."""

    sharded: ClassVar[bool] = True

    def shards(self, ctx: "Context") -> list[Any]:  # pragma: no cover - abstract
        """JSON-able shard descriptors, in a deterministic order."""
        raise NotImplementedError

    def map(self, ctx: "Context", shard_index: int, shard: Any) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def combine(self, ctx: "Context", a: pa.Table, b: pa.Table) -> pa.Table:  # pragma: no cover - abstract
        raise NotImplementedError

    def finalize(self, ctx: "Context", merged: pa.Table) -> StageOutput:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, type[Stage]] = {}


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator; a duplicate stage name raises."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"stage {cls.name!r} is already registered by {_REGISTRY[cls.name].__module__}")
    module_file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    if module_file is not None:  # a declared dependency that does not exist is a bug in the declaration
        base = Path(module_file).parent
        missing = [n for n in cls.depends_on if not (base / _module_relpath(base, n)).is_file()]
        if missing:
            raise ValueError(f"stage {cls.name!r} depends_on {missing}, which do not exist next to {module_file}")
    _REGISTRY[cls.name] = cls
    return cls


def get_stage(name: str) -> Stage:
    """A fresh instance of the stage registered as ``name`` (importing :mod:`repdissect.stages` registers
    the built-in ones; :mod:`repdissect.pipeline` does that)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_stages(pattern: str = "*") -> list[str]:
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))
