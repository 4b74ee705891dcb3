"""Numerics: dead units, constant channels, rank deficiency and tiny samples never put NaN/inf in a table.

Table-driven over degenerate inputs, each statistic is driven the way the pipeline drives it and every
floating cell of every result table is checked (nested list columns included); where a value is
undefined the tables must say so through their flags (``dead``, ``constant``, ``valid``, label 0) instead.
The end-to-end case runs the DAG on a network engineered to have dead and constant channels, with a
handful of images, and scans the whole cache.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch

from repdissect.datasets import Batch, Concept
from repdissect.pipeline import CacheStore, run
from repdissect.stages import IoUTally, iou_tables
from repdissect.stages._stability import LandmarkTopK, spatial_max_argmax, stability_tables
from repdissect.stages._thresholds import RadixQuantile, TopQuantile
from repdissect.stages.compare import JointMoments, compare_arrays, compare_moments

from reliability_support import TINY, non_finite_cells, write_config


def assert_finite(tables: dict[str, Any], context: str) -> None:
    bad = {}
    for name, table in tables.items():
        arrow = pa.Table.from_pandas(table, preserve_index=False) if isinstance(table, pd.DataFrame) else table
        if cells := non_finite_cells(arrow):
            bad[name] = cells
    assert not bad, f"{context}: NaN/inf in {bad}"


# ------------------------------------------------------------------------------------------------ compare
def _degenerate_pairs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 6)), rng.normal(size=(60, 5))
    dead, constant = a.copy(), a.copy()
    dead[:, :3] = 0.0
    constant[:, 1] = 5.0
    return {
        "dead_units": (dead, b),
        "constant_channel": (constant, b),
        "rank_deficient": (a, np.concatenate([b, b[:, :2], b[:, :1] + b[:, 1:2]], axis=1)),
        "more_units_than_samples": (rng.normal(size=(8, 12)), rng.normal(size=(8, 10))),
        "all_dead": (np.zeros((40, 4)), np.zeros((40, 3))),
        "identical": (a, a.copy()),
        "tiny_sample": (rng.normal(size=(6, 3)), rng.normal(size=(6, 3))),
        "extreme_scales": (a * 1e150, b * 1e-150),
        "single_unit": (a[:, :1], b[:, :1]),
    }


@pytest.mark.parametrize("case", list(_degenerate_pairs()))
def test_comparison_tables_stay_finite(case):
    a, b = _degenerate_pairs()[case]
    held = max(2, len(a) // 4)
    train, heldout = JointMoments(a.shape[1], b.shape[1]), JointMoments(a.shape[1], b.shape[1])
    train.update(a[held:], b[held:])
    heldout.update(a[:held], b[:held])
    tables = compare_moments(train, heldout, alphas=[0.0, 0.01, 0.1], thresholds=[0.3, 0.9])
    assert_finite(tables, case)
    assert_finite({"metrics": compare_arrays(a, b, holdout_fraction=0.34)}, f"{case} (arrays)")
    units = tables["units"]
    dead_a = np.flatnonzero(np.ptp(a[held:], axis=0) == 0)
    flagged = units[(units["side"] == "a") & units["dead"]]["unit"].to_numpy()
    assert set(dead_a) <= set(flagged), "constant/dead units are flagged"


# ------------------------------------------------------------------------------------------------ dissection
def _maps() -> np.ndarray:
    """(N=6, C=4, 4, 4) activations: unit 0 dead (0), unit 1 constant, unit 2 normal, unit 3 one hot pixel."""
    rng = np.random.default_rng(1)
    acts = np.zeros((6, 4, 4, 4), np.float32)
    acts[:, 1] = 2.5
    acts[:, 2] = rng.random((6, 4, 4))
    acts[0, 3, 1, 2] = 9.0
    return acts


@pytest.mark.parametrize("method", [TopQuantile, RadixQuantile])
def test_thresholds_of_dead_and_constant_units(method):
    acts = _maps()
    stat = method(len(acts), 0.05, 1 << 20)
    stat.update(acts[:3])
    other = method(len(acts), 0.05, 1 << 20)
    other.update(acts[3:])
    stat = stat.merge(other)
    if method is RadixQuantile:
        while not stat.done:
            stat = stat.next_pass()
            if stat.done:
                break
            stat.update(acts)
    result = stat.result()
    assert_finite({"thresholds": result}, method.__name__)
    assert result["threshold"].tolist()[:2] == [0.0, 2.5]


def _batch(n: int) -> Batch:
    labels = np.zeros((n, 1, 8, 8), np.int32)
    labels[:, 0, :4] = 1
    labels[::2, 0, 4:, :4] = 2
    landmarks = np.tile(np.array([[[2.0, 2.0], [6.0, 6.0]]], np.float32), (n, 1, 1))
    return Batch(index=np.arange(n), images=np.zeros((n, 3, 8, 8), np.uint8), pixel_labels={"object": labels},
                 landmarks=landmarks, landmark_visible=np.ones((n, 2), bool))


CONCEPTS = [Concept(1, "top", "object", True), Concept(2, "corner", "object", True), Concept(3, "never", "object", True)]


def test_iou_of_dead_constant_and_unseen():
    acts = _maps()
    thresholds = np.array([0.0, 2.5, 0.5, 1.0])  # dead unit: threshold 0 and never above it
    tally = IoUTally(CONCEPTS, (8, 8))
    tally.update(acts, thresholds, _batch(len(acts)))
    tables = iou_tables(tally, CONCEPTS, 0.04)
    assert_finite(tables, "iou")
    units = tables["units"].set_index("unit")
    assert units.loc[0, "iou"] == 0.0 and units.loc[0, "label"] == 0 and not units.loc[0, "interpretable"]
    unseen = tables["unit_label"][tables["unit_label"]["label"] == 3]
    assert (unseen["iou"] == 0.0).all(), "a concept that never occurs has IoU 0, not 0/0"


def test_stability_of_dead_and_constant_units():
    acts = _maps()
    values, argmax = spatial_max_argmax(acts)
    stat = LandmarkTopK((8, 8), top_k=3)
    stat.update(values, argmax, acts.shape[2:], _batch(len(acts)))
    tables = stability_tables(stat, ["a", "b"])
    assert_finite(tables, "stability")
    units = tables["units"].set_index("unit")
    assert bool(units.loc[0, "constant"]) and bool(units.loc[1, "constant"])
    assert not units.loc[0, "valid"] and not units.loc[1, "valid"]


def test_stability_with_a_single_image():
    acts = _maps()[:1]
    values, argmax = spatial_max_argmax(acts)
    stat = LandmarkTopK((8, 8), top_k=2)
    stat.update(values, argmax, acts.shape[2:], _batch(1))
    assert_finite(stability_tables(stat, ["a", "b"]), "one image")


# ------------------------------------------------------------------------------------------------ end to end
def _degenerate_weights(path) -> None:
    """builtin:cnn weights whose first channel of each block is dead and second constant (after the ReLU)."""
    from repdissect.stages import ModelSpec, build_model
    from repdissect.stages._models import unwrap

    net = unwrap(build_model(ModelSpec(architecture="builtin:cnn", arch_kwargs={"width": 4, "depth": 2},
                                       num_classes=8), seed=0))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for block in ("conv1", "conv2"):
        state[f"{block}.conv.weight"][:2] = 0.0
        state[f"{block}.bn.bias"][0] = -1.0  # relu(−1) = 0 everywhere: dead
        state[f"{block}.bn.bias"][1] = 0.7  # relu(0.7): constant
    torch.save(state, path)


def test_pipeline_with_dead_units_and_few_images_has_no_nan(tmp_path):
    weights = tmp_path / "degenerate.pt"
    _degenerate_weights(weights)
    data = copy.deepcopy(TINY)
    data["dataset"]["params"]["images"] = 10
    data["models"][0].update(init="weights", weights=weights.as_posix(), num_classes=8, layers=["conv1", "conv2"])
    data["stability"]["top_k"] = 3
    data["execution"].update(shard_size=4)
    data["extract"] = {"batch_size": 4}
    result = run(write_config(tmp_path, data))
    store = CacheStore(tmp_path / "cache")
    bad = {}
    for stage, key, path in store.iter_entries():
        entry = store.get(stage, key)
        for table in entry.manifest["tables"]:
            if cells := non_finite_cells(entry.table(table)):
                bad[(stage, table)] = cells
    assert not bad, f"NaN/inf in {bad}"
    units = result.tables("extract", "units@conv1")
    engineered = units[units["instance"] == "cnn@s0"].set_index("unit")
    assert engineered.loc[0, "dead"] and not engineered.loc[2, "dead"], "the dead channel is flagged"
    compare_units = result.tables("compare", "units")
    assert compare_units[compare_units["unit"].isin([0, 1]) & (compare_units["side"] == "a")]["dead"].all()
