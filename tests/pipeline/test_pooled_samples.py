"""The pooled (one per image) samples of the layer × layer stages come from extraction's stored spatial means.

``cka`` and ``similarity`` read each unit's spatial mean from the summary parts instead of re-reading and
averaging the activation maps. Checked here against the maps themselves: the stored means equal the maps'
spatial means (to the storage dtype's rounding), and the ``cka`` table equals linear CKA computed from the maps
by the reference formula on arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.pipeline import run
import pyarrow.parquet as pq

from repdissect.stages import read_activations, read_summaries
from repdissect.stages.compare import linear_cka_arrays

from helpers import write_tiny_config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return run(write_tiny_config(tmp_path_factory.mktemp("pooled"), layers=("conv1", "conv2")))


def _pooled_from_maps(entry, layer: str) -> tuple[np.ndarray, np.ndarray]:
    ids, maps = read_activations(entry.parts(f"activations@{layer}"))
    return ids, maps.astype(np.float64).mean(axis=(2, 3))


@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_stored_means_are_the_maps_spatial_means(tiny_run, layer: str) -> None:
    for _, entry in tiny_run.entries("extract"):
        ids, reference = _pooled_from_maps(entry, layer)
        parts = [read_summaries(pq.read_table(p)) for p in entry.parts(f"summaries@{layer}")]
        got_ids = np.concatenate([p.image for p in parts])
        got = np.concatenate([p.mean for p in parts])
        assert np.array_equal(got_ids, ids) and got.dtype == np.float32
        scale = np.abs(reference).max()
        # float16 storage rounds each map value by ≤ 2⁻¹¹ relative; the stored mean is the unrounded one
        np.testing.assert_allclose(got, reference, rtol=0, atol=2e-3 * scale)


def test_cka_table_equals_linear_cka_of_the_maps(tiny_run) -> None:
    extracts = {label["instance"]: entry for label, entry in tiny_run.entries("extract")}
    checked = 0
    for label, entry in tiny_run.entries("cka"):
        table = entry.table("cka").to_pandas()
        for row in table.itertuples():
            _, x = _pooled_from_maps(extracts[label["a"]], row.layer_a)
            _, y = _pooled_from_maps(extracts[label["b"]], row.layer_b)
            assert row.linear_cka == pytest.approx(linear_cka_arrays(x, y), abs=2e-3)
            checked += 1
    assert checked > 0
