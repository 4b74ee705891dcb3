"""Atomic file writers: a file appears at its final path complete, or not at all.

The constraint: runs die mid-write and several workers write side by side, so every writer writes to a
unique temporary sibling, fsyncs, and renames into place (``os.replace``); an abort or an exception leaves
nothing behind. The cache store publishes whole entries the same way; these are its building blocks and
the ones stages use for staged parts.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ._crash import crash_point

__all__ = ["sha256_file", "fsync_dir", "write_parquet_atomic", "write_bytes_atomic", "AtomicPartFile",
           "AtomicParquetWriter"]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_parquet_atomic(table: pa.Table, path: Path, **options: Any) -> None:
    """Write ``table`` to ``path`` through a temp sibling + fsync + rename (never a partial file).

    ``options`` go to the Parquet writer (default: zstd compression); ``row_group_size`` caps the rows per
    row group as in ``pyarrow.parquet.write_table``.
    """
    row_group_size = options.pop("row_group_size", None)
    with AtomicParquetWriter(path, table.schema, **options) as writer:
        writer.write(table, row_group_size=row_group_size)


class AtomicPartFile:
    """Life cycle shared by the streaming atomic writers: rows go to a hidden temp sibling of ``path``;
    :meth:`close` finishes it (subclass ``_finish``), fsyncs and renames it into place, :meth:`abort`
    stops the encoder (``_discard``) and removes it, so ``path`` never shows a partial file. Used as a
    context manager, an exception in the block aborts.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        self._done = False

    def _finish(self) -> None:
        """Complete the temp file (footer written, file closed); raise if it cannot be."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Stop writing the temp file (it is removed afterwards); must not raise."""
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"{self.path}: write after close/abort")

    def close(self) -> Path:
        """Finish the file and move it into place; on failure nothing is left behind."""
        if self._done:
            raise ValueError(f"{self.path}: already closed or aborted")
        self._done = True
        try:
            self._finish()
            with open(self._tmp, "rb") as fh:
                os.fsync(fh.fileno())
            crash_point("part-before-rename", str(self.path))
            os.replace(self._tmp, self.path)
        finally:
            self._tmp.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file (idempotent; a no-op after :meth:`close`)."""
        if self._done:
            return
        self._done = True
        try:
            self._discard()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class AtomicParquetWriter(AtomicPartFile):
    """Streaming counterpart of :func:`write_parquet_atomic`: row groups appended one call at a time.

    Publication as in :class:`AtomicPartFile`. ``options`` go to ``pyarrow.parquet.ParquetWriter``
    (default: zstd). Not thread-safe: one thread writes a given part (another may create it first and hand
    it over).
    """

    def __init__(self, path: str | Path, schema: pa.Schema, **options: Any) -> None:
        super().__init__(path)
        try:
            self._writer = pq.ParquetWriter(self._tmp, schema, **{"compression": "zstd", **options})
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def write(self, table: pa.Table | pa.RecordBatch, row_group_size: int | None = None) -> None:
        """Append ``table`` as one row group (more when it exceeds ``row_group_size`` or the writer's maximum)."""
        self._check_open()
        self._writer.write(table, row_group_size=row_group_size)

    def _finish(self) -> None:
        self._writer.close()

    def _discard(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - the file is discarded anyway
            pass


def write_bytes_atomic(data: bytes, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

