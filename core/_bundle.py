"""Several named Arrow tables in one table (Arrow IPC bytes per row), for multi-statistic partial states.

A sharded stage's ``map`` returns one table per shard; a stage that tracks one statistic per layer (or per
split) bundles their ``to_table()`` states so the Dask tree reduction still moves a single object.
"""

from __future__ import annotations

from typing import Mapping

import pyarrow as pa

__all__ = ["bundle", "unbundle"]


def bundle(tables: Mapping[str, pa.Table]) -> pa.Table:
    names, blobs = [], []
    for name, table in tables.items():
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        names.append(name)
        blobs.append(sink.getvalue().to_pybytes())
    return pa.table({"name": pa.array(names, pa.string()), "ipc": pa.array(blobs, pa.large_binary())})


def unbundle(table: pa.Table) -> dict[str, pa.Table]:
    out = {}
    for name, blob in zip(table.column("name").to_pylist(), table.column("ipc").to_pylist()):
        out[name] = pa.ipc.open_stream(pa.py_buffer(blob)).read_all()
    return out
