"""Streaming, atomic Parquet part writers with a choice of encoder: pyarrow's or polars'.

The constraint that shaped it: extraction writes activation parts whose one big column is a
``fixed_size_list`` of C·H·W values per image, and pyarrow's Parquet writer spends ~10 ns per value on
it (a repetition and a definition level per value, level histograms, float16 as 2-byte fixed-length
values): 0.14–0.19 GB/s of CPU for float16 and 0.35–0.48 GB/s for float32, more than a small CNN's whole
forward pass. polars' writer encodes the same schema at 0.8–1.3 GB/s, and pyarrow reads its files back
to the same arrays, types and nullability (``benchmarks/bench_extraction.py``; pyarrow 26, polars 2.1).

Two differences from pyarrow's files, both absorbed by the readers: polars stores field-level metadata
from the Arrow schema it is given but not schema-level metadata (so the metadata readers need must also
sit on a field), and it cuts row groups every ``row_group_size`` rows rather than one per ``write`` call.

Mechanics of :class:`PolarsParquetWriter`: polars' streaming engine pulls DataFrames from a Python
generator (an IO-plugin source) and sinks them into a hidden temp file, on a thread of its own; ``write``
only enqueues the table (no copy: the DataFrame wraps the Arrow buffers), so the caller goes on at once.
``close`` ends the stream, waits for the sink, fsyncs and renames; ``abort`` makes the generator raise,
waits, and removes the temp file. Either way ``path`` never shows a partial file, as with
:class:`~._atomic.AtomicParquetWriter`.
"""

from __future__ import annotations

import functools
import queue
import re
import shutil
import threading
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa

from ._atomic import AtomicParquetWriter, AtomicPartFile

__all__ = ["PartWriter", "PolarsParquetWriter", "open_part_writer", "parquet_engine", "polars_unavailable_reason",
           "PARQUET_ENGINES"]

PARQUET_ENGINES = ("auto", "polars", "pyarrow")

_END = object()
_ABORT = object()
# pyarrow's compression names → polars'
_COMPRESSION = {"none": "uncompressed", "uncompressed": "uncompressed", "snappy": "snappy", "zstd": "zstd",
                "lz4": "lz4", "gzip": "gzip", "brotli": "brotli"}


class PartWriter(Protocol):
    """One part file being written: ``write`` row groups, then ``close`` (publish) or ``abort``.

    ``write`` may return before the rows are encoded (polars); the rows' buffers must stay untouched until
    ``close`` returns.
    """

    path: Path

    def write(self, table: pa.Table) -> None: ...

    def close(self) -> Path: ...

    def abort(self) -> None: ...


class _Aborted(Exception):
    """Raised inside the polars source to stop the sink on :meth:`PolarsParquetWriter.abort`."""


@functools.lru_cache(maxsize=1)
def polars_unavailable_reason() -> str | None:
    """Why polars' streaming writer cannot be used here, or ``None`` when it can."""
    try:
        import polars as pl
        from polars.io.plugins import register_io_source  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken build or an unsupported CPU fails beyond ImportError
        return f"polars is not importable ({type(exc).__name__}: {exc})"
    # 2.1 is the first version tested here with Float16 arrays and `arrow_schema` in `sink_parquet`
    if _version_tuple(pl.__version__) < (2, 1):
        return f"polars {pl.__version__} is too old (need polars >= 2.1)"
    return None


def _version_tuple(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a version string such as ``"2.1.0"`` or ``"2.10.0rc1"``; ``(0, 0)`` if unparseable."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def parquet_engine(engine: str = "auto") -> str:
    """Resolve ``"auto"`` to ``"polars"`` when a suitable polars is installed, else ``"pyarrow"``.

    Raises:
        ValueError: for an unknown engine name, or ``"polars"`` when polars cannot be used.
    """
    if engine not in PARQUET_ENGINES:
        raise ValueError(f"unknown Parquet engine {engine!r}; use one of {list(PARQUET_ENGINES)}")
    if engine == "pyarrow":  # never imports polars (the escape hatch where importing it is the problem)
        return engine
    problem = polars_unavailable_reason()
    if engine == "auto":
        return "pyarrow" if problem else "polars"
    if engine == "polars" and problem:
        raise ValueError(f"Parquet engine 'polars' is unavailable: {problem}; install polars>=2.1 or use 'pyarrow'")
    return engine


def open_part_writer(path: str | Path, schema: pa.Schema, *, engine: str = "auto",
                     row_group_size: int | None = None, **options: Any) -> PartWriter:
    """A streaming atomic writer for ``path`` with the chosen encoder.

    ``options`` use pyarrow's names (``compression``, ``use_dictionary``, ``write_statistics``); with
    pyarrow each ``write`` is one row group, with polars rows are regrouped every ``row_group_size``.
    """
    if parquet_engine(engine) == "polars":
        return PolarsParquetWriter(path, schema, row_group_size=row_group_size, **options)
    return AtomicParquetWriter(path, schema, **options)


class PolarsParquetWriter(AtomicPartFile):
    """Streaming atomic Parquet writer encoding with polars (see the module docstring).

    Args:
        path: the file to publish on :meth:`close`.
        schema: the Arrow schema every written table must have (names and types); it is stored in the file,
            field metadata and nullability included.
        compression: pyarrow's codec names (``"none"``, ``"snappy"``, ``"zstd"``, ...); default zstd.
        write_statistics: per-column min/max statistics.
        use_dictionary: accepted for pyarrow compatibility; only ``False`` or ``None`` (polars decides).
        row_group_size: rows per row group (polars' default when ``None``).

    Publication as in :class:`AtomicPartFile` (``close`` waits for the encoder). Not thread-safe: one
    thread writes a given part.
    """

    def __init__(self, path: str | Path, schema: pa.Schema, *, compression: str = "zstd",
                 write_statistics: bool = True, use_dictionary: bool | None = None,
                 row_group_size: int | None = None) -> None:
        problem = polars_unavailable_reason()
        if problem:
            raise ValueError(f"PolarsParquetWriter is unavailable: {problem}")
        if compression not in _COMPRESSION:
            raise ValueError(f"unknown Parquet compression {compression!r}; use one of {sorted(_COMPRESSION)}")
        if use_dictionary:
            raise ValueError("PolarsParquetWriter cannot force dictionary encoding; pass use_dictionary=False")
        if row_group_size is not None and row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1; got {row_group_size}")
        import polars as pl
        from polars.io.plugins import register_io_source

        super().__init__(path)
        # polars' sink may still create its output file after `sink_parquet` has raised (its I/O runs on its
        # own executor), i.e. after an abort removed the temp file. The temp file therefore lives in a private
        # hidden folder: once the folder is gone, such a late creation fails instead of leaving a stray file.
        self._tmp_dir = self._tmp.with_name(self._tmp.name + "dir")
        self._tmp_dir.mkdir()
        self._tmp = self._tmp_dir / "part.parquet"
        self._schema = schema
        self._todo: queue.SimpleQueue = queue.SimpleQueue()
        self._errors: list[BaseException] = []
        todo = self._todo

        def source(with_columns: list[str] | None, predicate: Any, n_rows: int | None, batch_size: int | None):
            while (item := todo.get()) is not _END:
                if item is _ABORT:
                    raise _Aborted("part writer aborted")
                frame = pl.from_arrow(item)
                yield frame if with_columns is None else frame.select(with_columns)

        frame = register_io_source(io_source=source, schema=pl.from_arrow(schema.empty_table()).schema)
        sink_options = {"compression": _COMPRESSION[compression], "statistics": bool(write_statistics),
                        "row_group_size": row_group_size, "arrow_schema": schema}
        self._thread = threading.Thread(target=self._sink, args=(frame, sink_options),
                                        name=f"parquet-sink-{self.path.name}", daemon=True)
        self._thread.start()

    def _sink(self, frame: Any, options: dict[str, Any]) -> None:
        try:
            frame.sink_parquet(self._tmp, **options)
        except BaseException as exc:  # noqa: BLE001 - re-raised by write/close
            self._errors.append(exc)

    def _raise_error(self) -> None:
        if self._errors:
            raise self._errors[0]

    def write(self, table: pa.Table | pa.RecordBatch) -> None:
        """Queue ``table``'s rows (returns at once; the buffers must stay unchanged until :meth:`close`)."""
        self._check_open()
        self._raise_error()
        if not table.schema.equals(self._schema, check_metadata=False):
            raise ValueError(f"{self.path}: table schema does not match the part's schema:\n"
                             f"{table.schema}\nvs\n{self._schema}")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        self._todo.put(table)

    def _finish(self) -> None:
        self._todo.put(_END)
        self._thread.join()
        self._raise_error()

    def _discard(self) -> None:
        self._todo.put(_ABORT)
        self._thread.join()

    def close(self) -> Path:
        try:
            return super().close()
        finally:
            self._remove_tmp_dir()

    def abort(self) -> None:
        try:
            super().abort()
        finally:
            self._remove_tmp_dir()

    def _remove_tmp_dir(self) -> None:
        # a late file creation can race the removal (ENOTEMPTY): retry until the folder is gone
        for _ in range(1000):
            try:
                shutil.rmtree(self._tmp_dir)
                return
            except FileNotFoundError:
                return
            except OSError:
                continue
