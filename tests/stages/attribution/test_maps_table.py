"""``maps_table``: one concatenated float32 buffer with offsets is the same table as Arrow's element-wise
conversion of the map list, and ``maps_from_table`` gives the maps back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from repdissect.stages.attribution import maps_from_table, maps_table


def _elementwise(columns, maps):
    data = {name: pa.array(list(values)) for name, values in columns.items()}
    data["shape"] = pa.array([list(m.shape) for m in maps], pa.list_(pa.int32()))
    data["map"] = pa.array([np.ascontiguousarray(m, np.float32).ravel() for m in maps], pa.large_list(pa.float32()))
    return pa.table(data)


def _maps(kind):
    rng = np.random.default_rng(3)
    if kind == "none":
        return []
    if kind == "mixed":  # shapes, dtypes, an empty map, a strided view
        return [rng.standard_normal((3, 4, 5)).astype(np.float32), rng.standard_normal((4, 5)),
                np.zeros(0, np.float32), rng.standard_normal((2, 6, 6)).astype(np.float32)[:, ::-1, ::2]]
    return list(rng.standard_normal((6, 3, 8, 8)).astype(np.float32))  # rows of one batch (views)


@pytest.mark.parametrize("kind", ["none", "mixed", "batch"])
def test_same_table_as_the_elementwise_conversion(kind):
    maps = _maps(kind)
    columns = {"unit": list(range(len(maps))), "method": ["m"] * len(maps)}
    got = maps_table(columns, maps)
    assert got.schema.equals(_elementwise(columns, maps).schema)
    assert got.equals(_elementwise(columns, maps))
    back = maps_from_table(got)
    assert len(back) == len(maps)
    for a, b in zip(back, maps):
        assert a.shape == b.shape and np.array_equal(a, np.asarray(b, np.float32))
