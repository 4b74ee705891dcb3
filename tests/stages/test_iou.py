"""IoU tally: equal to a straightforward per-image, per-unit loop; planted detectors; whole-image labels."""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from repdissect.datasets import Batch, Concept
from repdissect.stages._errors import StageInputError
from repdissect.stages import IoUTally, iou_tables, upsample_bilinear

CONCEPTS = (
    [Concept(l, f"obj{l}", "object", True) for l in range(1, 7)]
    + [Concept(l, f"part{l}", "part", True) for l in range(7, 10)]
    + [Concept(l, f"scene{l}", "scene", False) for l in (10, 11, 300)]  # a sparse label number
)
CATEGORIES = ["object", "part", "scene"]


def random_world(rng, n=12, c=7, feature=(5, 6), seg=(23, 31), dyadic=False):
    """Random activations, two pixel categories (one with 2 layers) and a whole-image category."""
    h, w = feature
    sh, sw = seg
    if dyadic:
        # Multiples of 1/8 upsampled ×4: every bilinear value is a multiple of 1/512, exact in float32 under any
        # evaluation order, and thresholds sit half-way between such values, so every implementation agrees.
        acts = rng.integers(-16, 17, (n, c, h, w)).astype(np.float32) / 8
        thresholds = rng.integers(-256, 512, c) / 512 + 1 / 1024
    else:
        acts = rng.standard_normal((n, c, h, w)).astype(np.float32)
        thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(c, -1), 0.8, axis=1)
    obj = rng.integers(0, 7, (n, 1, sh, sw))
    obj[:, :, : sh // 2, : sw // 3] = rng.integers(0, 7, (n, 1, 1, 1))  # uniform regions exercise one-label quads
    obj[0] = 0  # an image with no object label: irrelevant to "object"
    part = rng.integers(7, 10, (n, 2, sh, sw))
    part[rng.random((n, 2, sh, sw)) < 0.6] = 0
    scene = rng.choice([0, 10, 11, 300], (n, 2))
    batch = Batch(
        index=np.arange(n, dtype=np.int64) + 50,
        images=np.zeros((n, 3, 1, 1), np.uint8),
        pixel_labels={"object": obj.astype(np.int32), "part": part.astype(np.int32)},
        image_labels={"scene": scene.astype(np.int32)},
    )
    return acts, thresholds, batch


def slice_batch(batch, sl):
    return Batch(
        index=batch.index[sl],
        images=batch.images[sl],
        pixel_labels={k: v[sl] for k, v in batch.pixel_labels.items()},
        image_labels={k: v[sl] for k, v in batch.image_labels.items()},
    )


def loop_tally(acts, thresholds, batch, concepts, seg, upsample):
    """The straightforward way: per image, per unit, upsample the map and count every label with numpy."""
    labels = sorted(c.label for c in concepts)
    column = {l: i for i, l in enumerate(labels)}
    categories = list(dict.fromkeys(c.category for c in concepts))
    category = {c.label: categories.index(c.category) for c in concepts}
    n, c = acts.shape[:2]
    inter = np.zeros((c, len(labels)), np.int64)
    act = np.zeros((c, len(categories)), np.int64)
    truth = np.zeros(len(labels), np.int64)
    for i in range(n):
        maps = np.concatenate([v[i] for v in batch.pixel_labels.values()]) if batch.pixel_labels else np.zeros((0, *seg))
        whole = [l for v in batch.image_labels.values() for l in v[i] if l]
        present = {l for l in np.unique(maps) if l} | set(whole)
        for l in np.unique(maps):
            if l:
                truth[column[l]] += (maps == l).sum()
        for l in whole:
            truth[column[l]] += seg[0] * seg[1]
        for u in range(c):
            on = upsample(acts[i, u]) > np.float32(thresholds[u])
            for layer in maps:
                for l in np.unique(layer[on]):
                    if l:
                        inter[u, column[l]] += (on & (layer == l)).sum()
            for l in whole:
                inter[u, column[l]] += on.sum()
            for cat in {category[l] for l in present}:
                act[u, cat] += on.sum()
    return inter, act, truth


def torch_interpolate(seg):
    return lambda m: F.interpolate(torch.from_numpy(m)[None, None], size=seg, mode="bilinear", align_corners=False)[0, 0].numpy()


def our_upsample(seg):
    return lambda m: upsample_bilinear(m, seg).numpy()


def tally_of(acts, thresholds, batch, seg, **kwargs):
    tally = IoUTally(CONCEPTS, seg, **kwargs)
    tally.update(acts, thresholds, batch)
    return tally


def assert_same_counts(tally, inter, act, truth):
    np.testing.assert_array_equal(tally.intersection, inter)
    np.testing.assert_array_equal(tally.activation, act)
    np.testing.assert_array_equal(tally.truth, truth)


HAS_NUMBA = importlib.util.find_spec("numba") is not None
NO_NUMBA = "Numba (the optional [fast] extra) is not installed; the torch path is tested instead"
KERNELS = [pytest.param("compiled", marks=pytest.mark.skipif(not HAS_NUMBA, reason=NO_NUMBA)), "torch"]
AVAILABLE_KERNELS = ["compiled", "torch"] if HAS_NUMBA else ["torch"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_equals_loop_with_torch_interpolate_on_exact_data(kernel):
    rng = np.random.default_rng(0)
    acts, thresholds, batch = random_world(rng, feature=(4, 5), seg=(16, 20), dyadic=True)
    tally = tally_of(acts, thresholds, batch, (16, 20), kernel=kernel)
    assert_same_counts(tally, *loop_tally(acts, thresholds, batch, CONCEPTS, (16, 20), torch_interpolate((16, 20))))
    assert tally.intersection.sum() > 0 and tally.activation.sum() > 0


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seg", [(23, 31), (5, 6), (4, 3), (1, 1)], ids=str)
def test_equals_loop_on_random_data(seg, kernel):
    """Any scale (up, identity, down): the sparse quad evaluation equals the dense upsampling, count for count."""
    rng = np.random.default_rng(1)
    acts, thresholds, batch = random_world(rng, seg=seg)
    tally = tally_of(acts, thresholds, batch, seg, block_pixels=64, kernel=kernel)
    assert_same_counts(tally, *loop_tally(acts, thresholds, batch, CONCEPTS, seg, our_upsample(seg)))


def test_upsampling_matches_torch_interpolate():
    maps = torch.randn(3, 4, 7, 5)
    for size in [(56, 40), (29, 37), (7, 5), (3, 2)]:
        ours = upsample_bilinear(maps, size)
        theirs = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=4e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_thresholds_equal_to_activation_values(kernel):
    """Ties (T equal to cell values, as a quantile of quantised data gives): pruning must not change anything."""
    rng = np.random.default_rng(2)
    acts, _, batch = random_world(rng, seg=(17, 13))
    acts = np.round(acts * 3) / 3
    thresholds = acts[0, :, 1, 1].astype(np.float64)
    tally = tally_of(acts, thresholds, batch, (17, 13), kernel=kernel)
    assert_same_counts(tally, *loop_tally(acts, thresholds, batch, CONCEPTS, (17, 13), our_upsample((17, 13))))


SHARDINGS = [[12], [5, 7], [1, 1, 10], [3, 3, 3, 3]]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sizes", SHARDINGS, ids=str)
def test_sharded_and_merged_equals_whole(sizes, kernel):
    rng = np.random.default_rng(3)
    acts, thresholds, batch = random_world(rng)
    whole = tally_of(acts, thresholds, batch, (23, 31))
    bounds = np.cumsum([0, *sizes])
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = tally_of(acts[a:b], thresholds, slice_batch(batch, slice(a, b)), (23, 31), chunk_images=2, kernel=kernel)
        parts.append(IoUTally.from_table(part.to_table()))
    merged = parts[-1]
    for part in reversed(parts[:-1]):
        merged = part.merge(merged)
    assert_same_counts(merged, whole.intersection, whole.activation, whole.truth)
    assert merged.images == 12


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunk_images, block_pixels", [(1, 400), (4, 100), (64, 2**22)])
def test_execution_parameters_do_not_change_counts(chunk_images, block_pixels, kernel):
    rng = np.random.default_rng(4)
    acts, thresholds, batch = random_world(rng)
    reference = tally_of(acts, thresholds, batch, (23, 31))
    other = tally_of(
        acts, thresholds, batch, (23, 31), chunk_images=chunk_images, block_pixels=block_pixels, kernel=kernel
    )
    assert_same_counts(other, reference.intersection, reference.activation, reference.truth)


def test_state_round_trips_through_parquet(tmp_path):
    rng = np.random.default_rng(5)
    acts, thresholds, batch = random_world(rng)
    tally = tally_of(acts, thresholds, batch, (23, 31))
    pq.write_table(tally.to_table(), tmp_path / "tally.parquet")
    back = IoUTally.from_table(pq.read_table(tmp_path / "tally.parquet"))
    np.testing.assert_array_equal(back.iou(), tally.iou())
    assert back.categories == CATEGORIES and back.images == tally.images


def planted_world(n=6):
    """8×8 maps, 32×32 labels. Unit 0 fires (1.0) on a 4×4-cell block whose ×4 footprint is label 3's mask."""
    rng = np.random.default_rng(6)
    acts = rng.uniform(0, 0.4, (n, 4, 8, 8)).astype(np.float32)
    acts[:, 0] = 0
    obj = np.zeros((n, 1, 32, 32), np.int32)
    for i in range(n):
        r, c = 1 + i % 3, 3 - i % 3  # the block stays off the edges
        acts[i, 0, r : r + 4, c : c + 4] = 1
        obj[i, 0, 4 * r : 4 * r + 16, 4 * c : 4 * c + 16] = 3
        obj[i, 0, :4, :] = 5  # another object elsewhere
    part = np.where(rng.random((n, 1, 32, 32)) < 0.3, 7, 0).astype(np.int32)
    batch = Batch(
        index=np.arange(n), images=np.zeros((n, 3, 1, 1), np.uint8),
        pixel_labels={"object": obj, "part": part}, image_labels={"scene": np.full((n, 1), 10, np.int32)},
    )
    return acts, np.array([0.5, 0.35, 0.35, 0.35]), batch


def test_planted_unit_is_labelled_with_its_concept():
    acts, thresholds, batch = planted_world()
    tally = tally_of(acts, thresholds, batch, (32, 32))
    tables = iou_tables(tally, CONCEPTS)
    unit0 = tables["units"].iloc[0]
    # Bilinear corners of the block fall just under 0.5: 4 of 256 pixels per image are missed.
    assert unit0["label"] == 3 and unit0["name"] == "obj3" and unit0["category"] == "object"
    assert unit0["iou"] == pytest.approx(252 / 256)
    assert unit0["interpretable"]
    rows = tables["unit_label"].query("unit == 0").set_index("label")["iou"]
    assert rows[10] == 252 / 1024  # the whole-image scene label of every image: on-area / image area
    assert rows.drop([3, 10]).max() < 0.2  # chance overlap with the 30 %-noise part label
    summary = tables["summary"].iloc[0]
    assert summary["detectors_object"] >= 1 and summary["unique_detectors_object"] >= 1


def test_whole_image_labels_are_full_masks():
    """Hand-counted: P on-pixels in image 0 (scene 10), P in image 1 (no scene), none in image 2 (scene 10)."""
    p = 4 * 6
    acts = np.zeros((3, 1, 2, 3), np.float32)
    acts[:2] = 1.0
    batch = Batch(
        index=np.arange(3), images=np.zeros((3, 3, 1, 1), np.uint8),
        image_labels={"scene": np.array([[10], [0], [10]], np.int32)},
    )
    concepts = [Concept(10, "street-s", "scene", False), Concept(11, "park-s", "scene", False)]
    tally = IoUTally(concepts, (4, 6))
    tally.update(acts, np.array([0.5]), batch)
    np.testing.assert_array_equal(tally.truth, [2 * p, 0])
    np.testing.assert_array_equal(tally.intersection, [[p, 0]])
    np.testing.assert_array_equal(tally.activation, [[p]])  # image 1 has no scene label: not relevant
    np.testing.assert_allclose(tally.iou(), [[p / (p + 2 * p - p), 0.0]])


def test_activation_counts_only_relevant_images():
    """A unit firing everywhere: A[u, c] = pixels × images having some label of c."""
    rng = np.random.default_rng(7)
    acts, _, batch = random_world(rng)
    tally = tally_of(np.ones_like(acts), np.zeros(acts.shape[1]), batch, (23, 31))
    p = 23 * 31
    has_object = (batch.pixel_labels["object"].reshape(12, -1) > 0).any(1).sum()
    has_part = (batch.pixel_labels["part"].reshape(12, -1) > 0).any(1).sum()
    has_scene = (batch.image_labels["scene"] > 0).any(1).sum()
    np.testing.assert_array_equal(tally.activation[0], [has_object * p, has_part * p, has_scene * p])
    assert has_object == 11  # image 0 carries no object label


def test_iou_tables_schema_and_consistency():
    rng = np.random.default_rng(8)
    acts, thresholds, batch = random_world(rng)
    tally = tally_of(acts, thresholds, batch, (23, 31))
    tables = iou_tables(tally, CONCEPTS, iou_threshold=0.05)
    unit_label = tables["unit_label"]
    assert list(unit_label.columns) == ["unit", "label", "name", "category", "intersection", "activation", "truth", "iou"]
    assert len(unit_label) == 7 * 12
    union = unit_label["activation"] + unit_label["truth"] - unit_label["intersection"]
    np.testing.assert_allclose(unit_label["iou"], unit_label["intersection"] / union)
    units = tables["units"]
    expected = ["unit", "label", "name", "category", "iou", "interpretable"]
    expected += [f"{c}_{f}" for c in CATEGORIES for f in ("label", "name", "iou")]
    assert list(units.columns) == expected
    best = unit_label.loc[unit_label.groupby("unit")["iou"].idxmax()]
    np.testing.assert_array_equal(units["label"], best["label"])
    np.testing.assert_allclose(units["iou"], best["iou"])
    for cat in CATEGORIES:
        np.testing.assert_allclose(units[f"{cat}_iou"], unit_label[unit_label.category == cat].groupby("unit")["iou"].max())
    summary = tables["summary"].iloc[0]
    interpretable = units[units["iou"] > 0.05]
    assert summary["interpretable_units"] == len(interpretable)
    assert summary["unique_detectors_total"] == interpretable["label"].nunique()
    for cat in CATEGORIES:
        assert summary[f"detectors_{cat}"] == (interpretable["category"] == cat).sum()
        assert summary[f"unique_detectors_{cat}"] == interpretable.loc[interpretable["category"] == cat, "label"].nunique()
    assert not any(t.isna().any().any() for t in tables.values())


def test_layer_without_interpretable_units_and_dead_units():
    rng = np.random.default_rng(9)
    acts, _, batch = random_world(rng)
    acts[:, 0] = 0  # dead unit at its threshold 0: never on
    thresholds = np.full(acts.shape[1], 100.0)
    thresholds[0] = 0.0
    tables = iou_tables(tally_of(acts, thresholds, batch, (23, 31)), CONCEPTS)
    summary = tables["summary"].iloc[0]
    assert summary["interpretable_units"] == 0 and summary["unique_detectors_total"] == 0
    assert (tables["units"]["label"] == 0).all() and (tables["units"]["name"] == "").all()
    assert not any(t.isna().any().any() for t in tables.values())


@pytest.mark.parametrize("kernel", KERNELS)
def test_fully_connected_layer_maps_are_constant(kernel):
    rng = np.random.default_rng(10)
    _, _, batch = random_world(rng)
    acts = rng.standard_normal((12, 3)).astype(np.float32)
    tally = tally_of(acts, np.zeros(3), batch, (23, 31), kernel=kernel)
    on_images = (acts > 0).sum(0)
    has_scene = (batch.image_labels["scene"] > 0).any(1)
    np.testing.assert_array_equal(tally.activation[:, 2], ((acts > 0) & has_scene[:, None]).sum(0) * 23 * 31)
    assert (tally.activation[:, 0] <= on_images * 23 * 31).all()


def hard_maps(rng, n, c, h, w):
    """Maps where float32 rounding decides: plateaus exactly at T, T = 0 under ReLU zeros, float16 steps,
    subnormals, negative thresholds, values a few ulps either side of T, huge next to tiny."""
    acts = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float16).astype(np.float32)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(c, -1), 0.9, axis=1)
    thresholds[0] = 0.0  # ReLU zeros everywhere below: on-pixels are exactly the positive ones
    acts[:, 1] = np.float32(thresholds[1])  # a plateau at T: T·w_lo + T·w_hi may round either side of T
    acts[:, 1, ::2, 1::2] = np.nextafter(np.float32(thresholds[1]), np.float32(np.inf))
    thresholds[2] = -0.75
    acts[:, 2] -= 1.0  # negative values and threshold
    acts[:, 3] = rng.choice(np.array([0, 1e-45, 1e-40, 2e-38], np.float32), (n, h, w))  # subnormals
    thresholds[3] = 1e-45
    steps = rng.integers(-3, 4, (n, h, w)).astype(np.float32)
    acts[:, 4] = np.float32(thresholds[4]) + steps * np.spacing(np.float32(thresholds[4]))  # ulps around T
    acts[:, 5, :, : w // 2] = 1e30  # huge next to tiny
    thresholds[5] = 1e-3
    return acts, thresholds


@pytest.mark.parametrize("feature, seg", [((5, 6), (23, 31)), ((7, 7), (112, 112)), ((6, 5), (6, 5)), ((9, 8), (4, 3))], ids=str)
def test_kernels_agree_where_rounding_decides(feature, seg):
    """The compiled loops and the torch path count the same pixels as the dense upsampling, bit for bit,
    including where a value lands within an ulp of the threshold (pruning and full-row shortcuts are exact)."""
    rng = np.random.default_rng(13)
    _, _, batch = random_world(rng, n=6, feature=feature, seg=seg)
    acts, thresholds = hard_maps(rng, 6, 7, *feature)
    reference = loop_tally(acts, thresholds, batch, CONCEPTS, seg, our_upsample(seg))
    for kernel in AVAILABLE_KERNELS:
        assert_same_counts(tally_of(acts, thresholds, batch, seg, kernel=kernel), *reference)
    assert reference[1].sum() > 0 and reference[0].sum() > 0
    if seg[0] > feature[0]:
        assert reference[1][1].sum() > 0  # the plateau unit fires between its T cells and their neighbours


@pytest.mark.parametrize("kernel", KERNELS)
def test_failed_update_leaves_the_tally_unchanged(kernel):
    rng = np.random.default_rng(14)
    acts, thresholds, batch = random_world(rng)
    tally = tally_of(acts[:4], thresholds, slice_batch(batch, slice(0, 4)), (23, 31), kernel=kernel, chunk_images=2)
    before = IoUTally.from_table(tally.to_table())
    bad = slice_batch(batch, slice(None))
    bad.pixel_labels["part"] = bad.pixel_labels["part"].copy()
    bad.pixel_labels["part"][-1, 1, -1, -1] = 99  # in the last chunk: earlier chunks must not have been counted
    with pytest.raises(StageInputError, match=r"\[99\]"):
        tally.update(acts, thresholds, bad)
    acts = acts.copy()
    acts[-1, -1, -1, -1] = np.inf  # in the last map read
    with pytest.raises(StageInputError, match="NaN/inf"):
        tally.update(acts, thresholds, batch)
    assert_same_counts(tally, before.intersection, before.activation, before.truth)
    assert tally.images == 4


def test_kernel_choice(monkeypatch):
    assert IoUTally(CONCEPTS, (4, 4)).kernel == ("compiled" if HAS_NUMBA else "torch")
    assert IoUTally(CONCEPTS, (4, 4), kernel="torch").kernel == "torch"
    assert IoUTally(CONCEPTS, (4, 4), device="meta").kernel == "torch"
    with pytest.raises(StageInputError, match="kernel must be"):
        IoUTally(CONCEPTS, (4, 4), kernel="numba")
    with pytest.raises(StageInputError, match="runs on the CPU"):
        IoUTally(CONCEPTS, (4, 4), device="meta", kernel="compiled")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "numba" else real_find_spec(name, *a))
    assert IoUTally(CONCEPTS, (4, 4)).kernel == "torch"  # no Numba on this platform: the torch path counts
    with pytest.raises(StageInputError, match=r"kernel='compiled' needs Numba"):
        IoUTally(CONCEPTS, (4, 4), kernel="compiled")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_equals_cpu():
    rng = np.random.default_rng(11)
    acts, thresholds, batch = random_world(rng)
    cpu = tally_of(acts, thresholds, batch, (23, 31))
    gpu = tally_of(acts, thresholds, batch, (23, 31), device="cuda")
    assert_same_counts(gpu, cpu.intersection, cpu.activation, cpu.truth)


@pytest.mark.parametrize("concepts, message", [
    ([], "concept list is empty"),
    ([Concept(1, "a", "object", True), Concept(1, "b", "part", True)], r"unique numbers ≥ 1; got \[1, 1\]"),
    ([Concept(3, "a", "object", True), Concept(0, "b", "part", True)], r"unique numbers ≥ 1; got \[3, 0\]"),
    ([Concept(2, "a", "object", True), Concept(-1, "b", "part", True)], r"unique numbers ≥ 1; got \[2, -1\]"),
], ids=["empty", "duplicate", "zero", "negative"])
def test_bad_concept_lists_raise_stage_input_error(concepts, message):
    with pytest.raises(StageInputError, match=message):
        IoUTally(concepts, (4, 4))


def test_concepts_are_ordered_by_label_with_categories_in_first_appearance_order():
    concepts = [Concept(9, "a", "part", True), Concept(2, "b", "object", True), Concept(5, "c", "part", True),
                Concept(7, "d", "scene", False)]
    tally = IoUTally(concepts, (4, 4))
    assert tally.labels.tolist() == [2, 5, 7, 9]
    assert tally.categories == ["part", "object", "scene"]
    assert tally.label_category.tolist() == [1, 0, 2, 0]


def test_bad_inputs_raise_stage_input_error():
    rng = np.random.default_rng(12)
    acts, thresholds, batch = random_world(rng)
    tally = IoUTally(CONCEPTS, (23, 31))
    with pytest.raises(StageInputError, match="thresholds"):
        tally.update(acts, thresholds[:-1], batch)
    with pytest.raises(StageInputError, match="seg_size"):
        IoUTally(CONCEPTS, (24, 31)).update(acts, thresholds, batch)
    with pytest.raises(StageInputError, match="batch has"):
        tally.update(acts[:5], thresholds, batch)
    with pytest.raises(StageInputError, match="image_ids"):
        tally.update(acts, thresholds, batch, image_ids=np.arange(12))
    bad = slice_batch(batch, slice(None))
    bad.pixel_labels["object"] = bad.pixel_labels["object"].copy()
    bad.pixel_labels["object"][0, 0, 0, 0] = 42
    with pytest.raises(StageInputError, match=r"\[42\]"):
        tally.update(acts, thresholds, bad)
    with pytest.raises(StageInputError, match="NaN"):
        tally.update(np.full_like(acts, np.nan), thresholds, batch)
    with pytest.raises(StageInputError, match="different concepts"):
        tally.merge(IoUTally(CONCEPTS[:-1], (23, 31)))
    with pytest.raises(StageInputError, match="concept"):
        IoUTally([], (23, 31))


@pytest.mark.skipif(not HAS_NUMBA, reason=NO_NUMBA)
def test_compiled_kernel_works_without_a_writable_cache(tmp_path):
    """Where Numba finds no writable cache location (read-only install), the kernels compile per process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numpy as np\n"
        "from repdissect.datasets import Batch, Concept\n"
        "from repdissect.stages._iou import IoUTally\n"
        "t = IoUTally([Concept(1, 'a', 'object', True)], (8, 8))\n"
        "b = Batch(index=np.arange(2), images=np.zeros((2, 3, 1, 1), np.uint8),\n"
        "          pixel_labels={'object': np.ones((2, 1, 8, 8), np.int32)}, image_labels={})\n"
        "t.update(np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4), np.array([20.0]), b)\n"
        "print(t.intersection[0, 0], t.activation[0, 0])\n"
    )
    tests_dir = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="helpers.NoCacheLocator",
               PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reference = tally_of(np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4), np.array([20.0]),
                         Batch(index=np.arange(2), images=np.zeros((2, 3, 1, 1), np.uint8),
                               pixel_labels={"object": np.ones((2, 1, 8, 8), np.int32)}, image_labels={}), (8, 8))
    assert proc.stdout.split() == [str(reference.intersection[0, 0]), str(reference.activation[0, 0])]


# ------------------------------------------------------------------ union conventions (NetDissect-Lite)
def lite_loop(acts, thresholds, batch, concepts, seg):
    """NetDissect-Lite's tally, image by image and unit by unit (``feature_operation.py``, ``tally_job``).

    Per image: the pixel label layers of every category stacked, the whole-image ("scalar") labels listed;
    ``tally_labels`` gets every pixel label and sh·sw per scalar label. Per unit whose map exceeds its
    threshold somewhere: the upsampled map's on-pixels (``indexes``), a bincount of the labels under them
    (label 0 zeroed) added to ``tally_both``, the categories those labels belong to (``tally_cat``), every
    scalar label intersecting all on-pixels; ``tally_units_cat`` adds the on-count to each category that was
    touched — the categories of the touched pixel labels and of the image's scalar labels.
    """
    labels = sorted(c.label for c in concepts)
    column = {l: i for i, l in enumerate(labels)}
    categories = list(dict.fromkeys(c.category for c in concepts))
    labelcat = np.zeros((max(labels) + 1, len(categories)), np.int64)  # label number → one-hot category
    for c in concepts:
        labelcat[c.label, categories.index(c.category)] = 1
    n, units = acts.shape[:2]
    tally_both = np.zeros((units, max(labels) + 1), np.int64)
    tally_units_cat = np.zeros((units, len(categories)), np.int64)
    tally_labels = np.zeros(max(labels) + 1, np.int64)
    for i in range(n):
        pixels = np.concatenate([v[i] for v in batch.pixel_labels.values()])
        scalars = [int(l) for v in batch.image_labels.values() for l in v[i] if l]
        for scalar in scalars:
            tally_labels[scalar] += seg[0] * seg[1]
        tally_label = np.bincount(pixels.ravel(), minlength=len(tally_labels))
        tally_label[0] = 0
        tally_labels += tally_label
        for unit in range(units):
            feature_map = acts[i, unit]
            if feature_map.max() > thresholds[unit]:
                mask = upsample_bilinear(feature_map, seg).numpy()
                indexes = np.argwhere(mask > np.float32(thresholds[unit]))
                tally_bt = np.bincount(pixels[:, indexes[:, 0], indexes[:, 1]].ravel(), minlength=len(tally_labels))
                tally_bt[0] = 0
                tally_cat = tally_bt[None, :] @ labelcat
                tally_cat = tally_cat[0] + sum((labelcat[s] for s in scalars), np.zeros(len(categories), np.int64))
                tally_both[unit] += tally_bt
                for scalar in scalars:
                    tally_both[unit, scalar] += len(indexes)
                tally_units_cat[unit] += len(indexes) * (tally_cat > 0)
    cols = [column[l] for l in labels]
    return tally_both[:, labels][:, np.argsort(cols)], tally_units_cat, tally_labels[labels]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("seg", [(23, 31), (5, 6), (4, 3)], ids=str)
def test_lite_equals_netdissect_lite_loop(seg, kernel):
    rng = np.random.default_rng(7)
    acts, thresholds, batch = random_world(rng, seg=seg)
    tally = IoUTally(CONCEPTS, seg, kernel=kernel, union="lite", block_pixels=64)
    tally.update(acts, thresholds, batch)
    inter, act, truth = lite_loop(acts, thresholds, batch, CONCEPTS, seg)
    np.testing.assert_array_equal(tally.intersection, inter)
    np.testing.assert_array_equal(tally.activation, act)
    np.testing.assert_array_equal(tally.truth, truth)
    assert act.sum() > 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_lite_never_exceeds_category_images_and_shares_intersections(kernel):
    rng = np.random.default_rng(3)
    acts, thresholds, batch = random_world(rng, n=16)
    for maps in batch.pixel_labels.values():  # small labelled patches: many on-pixels miss a category
        maps[:, :, 6:, :] = 0
        maps[:, :, :, 8:] = 0
    tallies = {}
    for union in ("category-images", "lite"):
        tallies[union] = IoUTally(CONCEPTS, (23, 31), kernel=kernel, union=union)
        tallies[union].update(acts, thresholds, batch)
    full, lite = tallies["category-images"], tallies["lite"]
    np.testing.assert_array_equal(full.intersection, lite.intersection)
    np.testing.assert_array_equal(full.truth, lite.truth)
    assert (lite.activation <= full.activation).all() and (lite.activation < full.activation).any()
    assert (lite.iou() >= full.iou()).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_lite_sharded_and_merged_equals_whole(kernel):
    rng = np.random.default_rng(4)
    acts, thresholds, batch = random_world(rng, n=12)
    whole = IoUTally(CONCEPTS, (23, 31), kernel=kernel, union="lite")
    whole.update(acts, thresholds, batch)
    merged = IoUTally(CONCEPTS, (23, 31), kernel=kernel, union="lite")
    for sl in (slice(0, 5), slice(5, 12)):
        part = IoUTally(CONCEPTS, (23, 31), kernel=kernel, union="lite")
        part.update(acts[sl], thresholds, slice_batch(batch, sl))
        merged.merge(part)
    np.testing.assert_array_equal(merged.activation, whole.activation)
    np.testing.assert_array_equal(merged.intersection, whole.intersection)


def test_union_round_trips_and_conventions_do_not_mix():
    rng = np.random.default_rng(5)
    acts, thresholds, batch = random_world(rng, n=4)
    lite = IoUTally(CONCEPTS, (23, 31), kernel="torch", union="lite")
    lite.update(acts, thresholds, batch)
    back = IoUTally.from_table(lite.to_table())
    assert back.union == "lite"
    np.testing.assert_array_equal(back.activation, lite.activation)
    with pytest.raises(StageInputError, match="union conventions cannot be merged"):
        IoUTally(CONCEPTS, (23, 31), union="category-images").merge(back)
    with pytest.raises(StageInputError, match="union must be one of 'category-images', 'lite'; got 'lit'"):
        IoUTally(CONCEPTS, (23, 31), union="lit")
