"""Streaming part writers: pyarrow's and polars' encoders publish the same tables, atomically."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from repdissect.core import _part_writers
from repdissect.core import PolarsParquetWriter, open_part_writer, parquet_engine

HAVE_POLARS = parquet_engine("auto") == "polars"
ENGINES = ["pyarrow", pytest.param("polars", marks=pytest.mark.skipif(not HAVE_POLARS, reason="polars >= 2.1 missing"))]
needs_polars = pytest.mark.skipif(not HAVE_POLARS, reason="polars >= 2.1 missing")
OPTIONS = {"compression": "none", "use_dictionary": False, "write_statistics": False}


def _schema(width: int, value_type: pa.DataType) -> pa.Schema:
    element = pa.field("element", value_type, nullable=False)
    return pa.schema([pa.field("image", pa.int64(), nullable=False),
                      pa.field("values", pa.list_(element, width), nullable=False, metadata={b"shape": b"[2, 3]"})],
                     metadata={b"shape": b"[2, 3]"})


def _table(schema: pa.Schema, start: int, rows: int, dtype) -> pa.Table:
    width = schema.field("values").type.list_size
    values = (np.arange(start * width, (start + rows) * width) * 0.37 - 5).astype(dtype)
    column = pa.FixedSizeListArray.from_arrays(pa.array(values), type=schema.field("values").type)
    return pa.Table.from_arrays([pa.array(np.arange(start, start + rows), pa.int64()), column], schema=schema)


def _sinks() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("parquet-sink-")]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_a_streamed_part_reads_back_as_written(tmp_path, engine, dtype):
    schema = _schema(6, pa.from_numpy_dtype(dtype))
    pieces = [_table(schema, start, rows, dtype) for start, rows in [(0, 5), (5, 5), (10, 3)]]
    path = tmp_path / "t" / "part-00000.parquet"
    writer = open_part_writer(path, schema, engine=engine, row_group_size=5, **OPTIONS)
    for piece in pieces:
        writer.write(piece)
    assert not path.exists()
    assert writer.close() == path
    back = pq.read_table(path)
    assert back.equals(pa.concat_tables(pieces).replace_schema_metadata(back.schema.metadata))
    assert back.schema.equals(schema, check_metadata=False)  # the non-null flags survive
    assert back.schema.field("values").metadata == {b"shape": b"[2, 3]"}
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [5, 5, 3]
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert not _sinks()


@pytest.mark.parametrize("engine", ENGINES)
def test_an_empty_part_is_a_valid_file(tmp_path, engine):
    schema = _schema(4, pa.float32())
    path = open_part_writer(tmp_path / "e.parquet", schema, engine=engine, **OPTIONS).close()
    back = pq.read_table(path)
    assert back.num_rows == 0 and back.schema.equals(schema, check_metadata=False)


@pytest.mark.parametrize("engine", ENGINES)
def test_abort_and_errors_leave_nothing(tmp_path, engine):
    schema = _schema(4, pa.float32())
    writer = open_part_writer(tmp_path / "a.parquet", schema, engine=engine, **OPTIONS)
    writer.write(_table(schema, 0, 3, np.float32))
    writer.abort()
    writer.abort()  # idempotent
    with pytest.raises(ValueError, match="after close/abort"):
        writer.write(_table(schema, 0, 3, np.float32))
    with pytest.raises(RuntimeError, match="boom"):
        with open_part_writer(tmp_path / "b.parquet", schema, engine=engine, **OPTIONS) as writer:
            writer.write(_table(schema, 0, 3, np.float32))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    assert not _sinks()


@needs_polars
def test_polars_writer_rejects_a_table_of_another_schema(tmp_path):
    writer = PolarsParquetWriter(tmp_path / "m.parquet", _schema(4, pa.float32()))
    with pytest.raises(ValueError, match="does not match the part's schema"):
        writer.write(_table(_schema(5, pa.float32()), 0, 2, np.float32))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@needs_polars
@pytest.mark.parametrize("finish", ["abort", "close"])
def test_a_late_temp_file_creation_after_the_writer_ends_cannot_leave_a_file(tmp_path, finish):
    # polars' sink can create its output after `sink_parquet` has raised; emulate that creation, deterministically,
    # at the worst moment: after the writer has finished and cleaned up
    schema = _schema(3, pa.float32())
    writer = PolarsParquetWriter(tmp_path / "m.parquet", schema)
    writer.write(_table(schema, 0, 4, np.float32))
    late_path = writer._tmp
    getattr(writer, finish)()
    with pytest.raises(FileNotFoundError):
        late_path.write_bytes(b"late")
    assert [p.name for p in tmp_path.iterdir()] == ([] if finish == "abort" else ["m.parquet"])


@needs_polars
def test_an_encoder_failure_surfaces_at_close_and_leaves_no_file(tmp_path, monkeypatch):
    import polars as pl

    def broken_sink(self, path, **options):
        open(path, "wb").write(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl.LazyFrame, "sink_parquet", broken_sink)
    schema = _schema(4, pa.float32())
    writer = PolarsParquetWriter(tmp_path / "f.parquet", schema)
    writer._thread.join()  # the sink has failed
    with pytest.raises(OSError, match="No space left"):
        writer.write(_table(schema, 0, 2, np.float32))
    with pytest.raises(OSError, match="No space left"):
        writer.close()
    assert list(tmp_path.iterdir()) == []


@needs_polars
def test_concurrent_polars_parts_do_not_block_each_other(tmp_path):
    """One sink per layer runs at once in extraction; each must finish even with more sinks than cores."""
    schema = _schema(64, pa.float16())
    writers = [PolarsParquetWriter(tmp_path / f"p{i}.parquet", schema, row_group_size=8) for i in range(8)]
    for start in range(0, 64, 8):
        for writer in writers:
            writer.write(_table(schema, start, 8, np.float16))
    closers = [threading.Thread(target=w.close) for w in writers]
    for thread in closers:
        thread.start()
    for thread in closers:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in closers)
    expected = pa.concat_tables([_table(schema, s, 8, np.float16) for s in range(0, 64, 8)])
    for i in range(8):
        back = pq.read_table(tmp_path / f"p{i}.parquet")
        assert back.equals(expected.replace_schema_metadata(back.schema.metadata))


def test_engine_choice(monkeypatch):
    with pytest.raises(ValueError, match="unknown Parquet engine 'arrow'"):
        parquet_engine("arrow")
    monkeypatch.setattr(_part_writers, "polars_unavailable_reason", lambda: pytest.fail("'pyarrow' must not probe polars"))
    assert parquet_engine("pyarrow") == "pyarrow"
    monkeypatch.setattr(_part_writers, "polars_unavailable_reason", lambda: "polars is not importable (no module)")
    assert parquet_engine("auto") == "pyarrow"
    with pytest.raises(ValueError, match="'polars' is unavailable: polars is not importable.*use 'pyarrow'"):
        parquet_engine("polars")


@needs_polars
def test_polars_writer_options_are_checked(tmp_path):
    schema = _schema(4, pa.float32())
    with pytest.raises(ValueError, match="unknown Parquet compression 'lzo'"):
        PolarsParquetWriter(tmp_path / "x.parquet", schema, compression="lzo")
    with pytest.raises(ValueError, match="dictionary"):
        PolarsParquetWriter(tmp_path / "x.parquet", schema, use_dictionary=True)
    with pytest.raises(ValueError, match="row_group_size must be >= 1; got 0"):
        PolarsParquetWriter(tmp_path / "x.parquet", schema, row_group_size=0)
    assert list(tmp_path.iterdir()) == []


def test_polars_versions_are_compared_numerically(monkeypatch):
    import sys
    import types

    assert _part_writers._version_tuple("2.10.0rc1") == (2, 10) > (2, 1)
    assert _part_writers._version_tuple("dev") == (0, 0)
    fake = types.ModuleType("polars")
    fake.__version__ = "1.35.2"
    monkeypatch.setitem(sys.modules, "polars", fake)
    monkeypatch.setitem(sys.modules, "polars.io", types.ModuleType("polars.io"))
    plugins = types.ModuleType("polars.io.plugins")
    plugins.register_io_source = lambda **kwargs: None
    monkeypatch.setitem(sys.modules, "polars.io.plugins", plugins)
    _part_writers.polars_unavailable_reason.cache_clear()
    try:
        assert _part_writers.polars_unavailable_reason() == "polars 1.35.2 is too old (need polars >= 2.1)"
        assert parquet_engine("auto") == "pyarrow"
    finally:
        _part_writers.polars_unavailable_reason.cache_clear()
