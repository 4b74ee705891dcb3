"""The compiled IoU kernels' strip layout, count for count against a dense NetDissect-Lite-style loop.

Feature maps at the sizes real layers have (7, 14, 28, 56 → 112 px labels, the ResNet-18 stages), maps with
one hot cell (in a corner, on an edge, inside), all-hot maps (whole-row shortcuts), label regions touching the
borders, maps wider than 64 cells (several bit words per row) and shrinking maps (corner cells without pixels):
every case is counted by the compiled kernel, the torch kernel and a straightforward per-image, per-unit loop
over the densely upsampled maps, under both union conventions.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from scipy import ndimage

from repdissect.datasets import Batch, Concept
from repdissect.stages import IoUTally, upsample_bilinear
from repdissect.stages._errors import StageInputError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="Numba (the optional [fast] extra) is not installed"
)

CONCEPTS = (
    [Concept(l, f"obj{l}", "object", True) for l in range(1, 9)]
    + [Concept(l, f"part{l}", "part", True) for l in range(9, 13)]
    + [Concept(l, f"scene{l}", "scene", False) for l in (13, 14)]
)


def dense_loop(acts, thresholds, batch, seg, union):
    """Per image and unit: upsample densely, threshold, count labels under the on-pixels (NetDissect-Lite's
    ``tally_job``, with our upsampling); ``union`` picks the images a unit's on-pixels count in."""
    labels = sorted(c.label for c in CONCEPTS)
    column = {l: k for k, l in enumerate(labels)}
    categories = list(dict.fromkeys(c.category for c in CONCEPTS))
    category = np.array([categories.index(c.category) for c in sorted(CONCEPTS, key=lambda c: c.label)])
    n, units = acts.shape[:2]
    inter = np.zeros((units, len(labels)), np.int64)
    act = np.zeros((units, len(categories)), np.int64)
    truth = np.zeros(len(labels), np.int64)
    up = upsample_bilinear(acts, seg).numpy()
    for i in range(n):
        layers = np.concatenate([v[i] for v in batch.pixel_labels.values()])
        whole = [column[int(l)] for v in batch.image_labels.values() for l in v[i] if l]
        for layer in layers:
            for l in np.unique(layer):
                if l:
                    truth[column[l]] += (layer == l).sum()
        for k in whole:
            truth[k] += seg[0] * seg[1]
        present = {category[column[l]] for l in np.unique(layers) if l} | {category[k] for k in whole}
        for u in range(units):
            on = up[i, u] > np.float32(thresholds[u])
            pixel = np.zeros(len(labels), np.int64)
            for layer in layers:
                pixel += np.bincount(layer[on], minlength=max(labels) + 1)[labels]
            inter[u] += pixel
            for k in whole:
                inter[u, k] += on.sum()
            if union == "lite":
                met = {category[k] for k in np.flatnonzero(pixel)} | {category[k] for k in whole}
            else:
                met = present
            for cat in met:
                act[u, cat] += on.sum()
    return inter, act, truth


def labels_of(rng, n, seg, border=False):
    """An object layer of overlapping rectangles, two sparse part layers, a whole-image scene label."""
    sh, sw = seg
    obj = np.zeros((n, 1, sh, sw), np.int32)
    part = np.zeros((n, 2, sh, sw), np.int32)
    for i in range(n):
        for _ in range(6):
            y, x = rng.integers(0, sh), rng.integers(0, sw)
            obj[i, 0, y : y + rng.integers(1, sh // 2 + 2), x : x + rng.integers(1, sw // 2 + 2)] = rng.integers(1, 9)
        for layer in range(2):
            y, x = rng.integers(0, sh), rng.integers(0, sw)
            part[i, layer, y : y + rng.integers(1, sh // 4 + 2), x : x + rng.integers(1, sw // 4 + 2)] = rng.integers(9, 13)
        if border:  # label regions along every edge and in the corners
            obj[i, 0, 0, :] = 1
            obj[i, 0, -1, :] = 2
            obj[i, 0, :, 0] = 3
            obj[i, 0, :, -1] = 4
            part[i, 0, :2, :2] = 9
            part[i, 1, -2:, -2:] = 10
    scene = rng.choice([0, 13, 14], (n, 1)).astype(np.int32)
    return Batch(index=np.arange(n, dtype=np.int64), images=np.zeros((n, 3, 1, 1), np.uint8),
                 pixel_labels={"object": obj, "part": part}, image_labels={"scene": scene})


def smooth_maps(rng, n, c, h, w):
    """Blurred noise through a ReLU, as in CNN layers: the top cells of a unit cluster."""
    noise = ndimage.gaussian_filter(rng.standard_normal((n, c, h, w)), sigma=(0, 0, 1, 1))
    return np.maximum(noise + 0.3 * rng.standard_normal((n, c, 1, 1)), 0).astype(np.float32)


def assert_all_agree(acts, thresholds, batch, seg):
    for union in ("category-images", "lite"):
        reference = dense_loop(acts, thresholds, batch, seg, union)
        for kernel in ("compiled", "torch"):
            tally = IoUTally(CONCEPTS, seg, kernel=kernel, union=union)
            tally.update(acts, thresholds, batch)
            for got, want in zip((tally.intersection, tally.activation, tally.truth), reference):
                np.testing.assert_array_equal(got, want, err_msg=f"{kernel} kernel, union={union}")
    return reference


@pytest.mark.parametrize("feature", [7, 14, 28, 56])
def test_feature_map_sizes_of_resnet_stages(feature):
    rng = np.random.default_rng(feature)
    acts = smooth_maps(rng, 3, 6, feature, feature)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(6, -1), 0.97, axis=1)
    thresholds[0] = 0.0  # ReLU zeros below: every positive region counts, whole rows above the full bound
    inter, act, _ = assert_all_agree(acts, thresholds, labels_of(rng, 3, (112, 112)), (112, 112))
    assert inter.sum() > 0 and act.sum() > 0


@pytest.mark.parametrize("feature, seg", [((7, 7), (112, 112)), ((14, 9), (40, 33)), ((5, 5), (5, 5))], ids=str)
def test_maps_with_one_hot_cell(feature, seg):
    """A single cell above T, in each corner, on each edge and inside: only its quads can be on."""
    h, w = feature
    spots = [(0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1), (0, w // 2), (h // 2, 0), (h - 1, w // 2),
             (h // 2, w - 1), (h // 2, w // 2)]
    acts = np.zeros((2, len(spots), h, w), np.float32)
    for u, (y, x) in enumerate(spots):
        acts[:, u, y, x] = 1.0
    thresholds = np.full(len(spots), 0.3)
    rng = np.random.default_rng(1)
    inter, act, _ = assert_all_agree(acts, thresholds, labels_of(rng, 2, seg, border=True), seg)
    assert (act.sum(axis=1) > 0).all()


def test_all_hot_maps_and_negative_thresholds():
    """Every cell above the bound: every strip, every corner column; shortcuts on (T ≥ 0) and off (T < 0)."""
    rng = np.random.default_rng(2)
    acts = rng.uniform(1.0, 2.0, (2, 4, 7, 9)).astype(np.float32)
    acts[:, 2] -= 3.0  # all negative, threshold below them
    thresholds = np.array([0.5, 1.5, -2.5, 1.0])
    seg = (50, 61)
    inter, act, _ = assert_all_agree(acts, thresholds, labels_of(rng, 2, seg, border=True), seg)
    np.testing.assert_array_equal(act[0], act[0].max() * (act[0] > 0))  # unit 0: every pixel of relevant images


@pytest.mark.parametrize("feature, seg", [((3, 70), (9, 140)), ((4, 130), (7, 97)), ((2, 64), (4, 128))], ids=str)
def test_maps_wider_than_one_bit_word(feature, seg):
    """More than 64 corner columns: a row's hot cells span several 64-bit words, runs cross word borders."""
    rng = np.random.default_rng(3)
    acts = smooth_maps(rng, 2, 5, *feature)
    acts[:, 0, :, 60:70] = 5.0  # a hot run across the border of the first and second word
    acts[:, 1] = 0.0
    acts[:, 1, -1, min(64, feature[1] - 1)] = 5.0  # alone at the start of the second word: column 63's quads
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(5, -1), 0.9, axis=1)
    thresholds[1] = 1.0
    inter, act, _ = assert_all_agree(acts, thresholds, labels_of(rng, 2, seg, border=True), seg)
    assert act.sum() > 0


@pytest.mark.parametrize("feature, seg", [((7, 56), (112, 112)), ((56, 56), (112, 168)), ((33, 40), (100, 79))],
                         ids=str)
def test_narrow_quads_that_are_not_two_by_two(feature, seg):
    """Quad by quad (corner columns of ≤ 4 pixels) where quads are not the common 2 × 2: strips of 16–24 pixel
    rows, quads of 3 columns, and uneven 2–4 × 1–3 quads — each against the dense loop and the torch kernel."""
    rng = np.random.default_rng(6)
    acts = smooth_maps(rng, 3, 5, *feature)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(5, -1), 0.85, axis=1)
    inter, act, _ = assert_all_agree(acts, thresholds, labels_of(rng, 3, seg, border=True), seg)
    assert inter.sum() > 0 and act.sum() > 0


@pytest.mark.parametrize("feature, seg", [((40, 33), (23, 17)), ((9, 9), (8, 8))], ids=str)
def test_shrinking_maps_with_corner_cells_without_pixels(feature, seg):
    rng = np.random.default_rng(4)
    acts = smooth_maps(rng, 3, 5, *feature)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(5, -1), 0.9, axis=1)
    assert_all_agree(acts, thresholds, labels_of(rng, 3, seg), seg)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("feature, cell", [(14, (7, 7)), (14, (13, 13)), (56, (55, 55)), (56, (0, 0))], ids=str)
def test_nan_in_a_late_map_leaves_a_tally_with_counts_unchanged(feature, cell, value):
    """The kernel takes back its partial counts (negatively) when a NaN or ±inf stops it, under both unions:
    in a map's vector body or its masked tail (14² = 12 vectors of 16 and 4 cells), at both path widths."""
    rng = np.random.default_rng(5)
    acts = smooth_maps(rng, 4, 6, feature, feature)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(6, -1), 0.95, axis=1)
    batch = labels_of(rng, 4, (112, 112))
    for union in ("category-images", "lite"):
        tally = IoUTally(CONCEPTS, (112, 112), kernel="compiled", union=union)
        tally.update(acts, thresholds, batch)
        before = (tally.intersection.copy(), tally.activation.copy(), tally.truth.copy())
        bad = acts.copy()
        bad[3, 4, cell[0], cell[1]] = value
        with pytest.raises(StageInputError, match="NaN/inf"):
            tally.update(bad, thresholds, batch)
        for got, want in zip((tally.intersection, tally.activation, tally.truth), before):
            np.testing.assert_array_equal(got, want)


def reference_tables(pixel, lookup, y_cells, x_cells):
    """The label tables of ``prepare_labels`` computed the obvious way (numpy, per quad row)."""
    n, layers, sh, sw = pixel.shape
    unlabelled = int(lookup[0])
    columns = np.where(pixel < len(lookup), lookup[np.minimum(pixel, len(lookup) - 1)], -1)
    columns = np.where(columns < 0, unlabelled, columns)
    num_y, num_x = len(y_cells) - 1, len(x_cells) - 1
    row_code = np.full((n, layers, sh, num_x), -1, np.int64)
    for i, layer, y, cx in np.ndindex(n, layers, sh, num_x):
        row = columns[i, layer, y, x_cells[cx] : x_cells[cx + 1]]
        if not len(row):
            continue
        changes = np.flatnonzero(row[1:] != row[:-1]) + 1
        if len(changes) == 0:
            row_code[i, layer, y, cx] = row[0]
        elif len(changes) == 1:
            row_code[i, layer, y, cx] = -2 - (x_cells[cx] + changes[0])
    uniform = np.full((n, layers, num_y, num_x), -1, np.int64)
    for i, layer, cy, cx in np.ndindex(n, layers, num_y, num_x):
        rows = np.maximum(row_code[i, layer, y_cells[cy] : y_cells[cy + 1], cx], -1)
        if len(rows) and (rows == rows[0]).all():
            uniform[i, layer, cy, cx] = rows[0]
    # From the definition (not the kernel's right-to-left scan): a one-label quad's stretch ends before the first
    # quad to its right that differs; a mixed quad (-1) is its own stretch.
    extent = np.zeros_like(uniform)
    for i, layer, cy, cx in np.ndindex(n, layers, num_y, num_x):
        row = uniform[i, layer, cy]
        differ = np.flatnonzero(row[cx + 1:] != row[cx])
        extent[i, layer, cy, cx] = cx + 1 if row[cx] < 0 else (cx + 1 + differ[0] if len(differ) else num_x)
    per_image = np.stack([np.bincount(columns[i].ravel(), minlength=unlabelled + 1) for i in range(n)])
    return columns, row_code, uniform, extent, per_image


def boundary_labels(n, seg, x_cells):
    """Label boundaries at every offset inside and at the edges of the quad columns: vertical ones (quad rows
    of two labels split at each pixel), three labels in one quad row, horizontal ones (one-label rows),
    unlabelled pixels on one side."""
    sh, sw = seg
    obj = np.zeros((n, 1, sh, sw), np.int32)
    part = np.zeros((n, 2, sh, sw), np.int32)
    for y in range(sh):
        cx = y % (len(x_cells) - 1)
        x0, x1 = x_cells[cx], x_cells[cx + 1]
        offset = (y // (len(x_cells) - 1)) % max(1, x1 - x0 + 1)
        obj[:, 0, y, : x0 + offset] = 1 + y % 3
        obj[:, 0, y, x0 + offset :] = 4 + y % 5
    obj[1:, 0, ::7, :] = 0  # unlabelled rows: one side of a boundary counts nothing
    for x in range(0, sw, 3):
        part[:, 0, :, x] = 9 + x % 4  # three labels and more within one quad row
    part[:, 1, sh // 3 : 2 * sh // 3, :] = 11  # horizontal boundaries only
    scene = np.full((n, 1), 13, np.int32)
    return Batch(index=np.arange(n, dtype=np.int64), images=np.zeros((n, 3, 1, 1), np.uint8),
                 pixel_labels={"object": obj, "part": part}, image_labels={"scene": scene})


def rectangle_labels(n, seg, seed=0):
    """Label regions as in segmentation data sets: overlapping rectangles, so most rows repeat the row above or
    carry one label, with the other rows mixing two or more."""
    rng = np.random.default_rng(seed)
    sh, sw = seg
    pixel = np.zeros((n, 3, sh, sw), np.int32)
    for i, layer in np.ndindex(n, 3):
        for _ in range(6):
            y, x = rng.integers(0, sh), rng.integers(0, sw)
            h, w = rng.integers(1, max(2, sh // 2)), rng.integers(1, max(2, sw // 2))
            pixel[i, layer, y : y + h, x : x + w] = rng.integers(1, 10)
    pixel[0, 1, : sh // 2, :] = 3  # whole rows of one label, then rows repeating a mixed row
    pixel[0, 1, sh // 2 :, :] = pixel[0, 1, sh // 2]
    return pixel


@pytest.mark.parametrize("labels", ["boundaries", "rectangles"])
@pytest.mark.parametrize("feature, seg", [((7, 7), (112, 112)), ((56, 56), (112, 112)), ((5, 6), (23, 31)),
                                          ((9, 8), (8, 8))], ids=str)
def test_label_tables_equal_a_per_quad_row_derivation(feature, seg, labels):
    """``prepare_labels`` (one pass: rows repeating the row above or of one label whole, else quad rows tested
    whole where long, label runs where short) against numpy."""
    from repdissect.stages._iou_geometry import _axis
    from repdissect.stages._iou_kernels import prepare_labels

    ay, ax = _axis(feature[0], seg[0]), _axis(feature[1], seg[1])
    if labels == "boundaries":
        batch = boundary_labels(2, seg, ax.cell_start)
        pixel = np.concatenate([batch.pixel_labels["object"], batch.pixel_labels["part"]], axis=1)
    else:
        pixel = rectangle_labels(2, seg)
    pixel[0, 0, 0, :3] = 99  # a number that is no concept's (the tally raises on it; here: counted unlabelled)
    tally = IoUTally(CONCEPTS, seg, kernel="compiled")
    n, layers = pixel.shape[:2]
    columns = np.full((n, layers, *seg), -7, np.int32)
    uniform = np.zeros((n, layers, *feature), np.int32)
    extent = np.zeros_like(uniform)
    row_uniform = np.zeros((n, layers, seg[0], feature[1]), np.int32)
    row_split = np.full((n, layers, seg[0], feature[1], 2), -7, np.int32)
    per_image = np.zeros((n, len(tally.labels) + 1), np.int64)
    unknown = prepare_labels(pixel, tally._lookup, ay.cell_start, ax.cell_start, columns, per_image, uniform, extent,
                             row_uniform, row_split, 0)
    want_columns, want_rows, want_uniform, want_extent, want_per_image = reference_tables(
        pixel, tally._lookup, ay.cell_start, ax.cell_start)
    assert unknown > 0
    np.testing.assert_array_equal(row_uniform, want_rows)
    np.testing.assert_array_equal(uniform, want_uniform)
    np.testing.assert_array_equal(extent, want_extent)
    np.testing.assert_array_equal(per_image, want_per_image)
    # The count reads a split row's two columns (left of the split, from it on) and the pixels' columns of a row
    # of three labels or more (-1; none for quad rows without pixels): written there, not elsewhere.
    for i, layer, y, cx in zip(*np.nonzero(want_rows <= -2)):
        split = -2 - want_rows[i, layer, y, cx]
        want = want_columns[i, layer, y, [ax.cell_start[cx], split]]
        np.testing.assert_array_equal(row_split[i, layer, y, cx], want, err_msg=f"split row {(i, layer, y, cx)}")
    np.testing.assert_array_equal(row_split[want_rows > -2], -7)
    several = np.repeat(want_rows == -1, np.diff(ax.cell_start), axis=3)
    np.testing.assert_array_equal(columns[several], want_columns[several])
    np.testing.assert_array_equal(columns[~several], -7)
    widest = np.diff(ax.cell_start).max()
    assert (want_rows >= 0).any() and ((want_rows <= -2).any() or widest < 2)
    if widest >= 8 and labels == "boundaries":  # room for three labels in a quad row (labels every 3rd column)
        assert (want_rows == -1).any()
    repeats = (pixel[:, :, 1:] == pixel[:, :, :-1]).all(axis=3)
    one_label = (pixel == pixel[..., :1]).all(axis=3)
    assert (repeats & ~one_label[:, :, 1:]).any()  # rows repeating a row of several labels


@pytest.mark.parametrize("feature", [7, 14, 28, 56])
def test_label_boundaries_at_every_offset_in_a_quad(feature):
    """Two labels split at every pixel of a quad row, three or more in one, one-label rows, unlabelled sides:
    on hot maps with rows on at every pixel (shortcut), partly on (evaluated), ties at T and off."""
    from repdissect.stages._iou_geometry import _axis

    seg = (112, 112)
    rng = np.random.default_rng(feature)
    batch = boundary_labels(3, seg, _axis(feature, seg[1]).cell_start)
    acts = smooth_maps(rng, 3, 5, feature, feature)
    thresholds = np.quantile(acts.transpose(1, 0, 2, 3).reshape(5, -1), 0.8, axis=1)
    acts[:, 1] = rng.uniform(1.0, 2.0, (3, feature, feature))  # every pixel on (whole-row shortcuts)
    thresholds[1] = 0.5
    acts[:, 2] = np.float32(0.7)  # a plateau at T: rounding decides pixel by pixel
    acts[:, 2, ::2, 1::3] = np.nextafter(np.float32(0.7), np.float32(1))
    thresholds[2] = np.float32(0.7)
    thresholds[3] = 0.0  # ReLU zeros below: exactly the positive region
    inter, act, _ = assert_all_agree(acts, thresholds, batch, seg)
    assert inter[1].sum() > 0 and inter[2].sum() > 0


@pytest.mark.slow
def test_count_kernel_compiles_without_gathers_or_scatters():
    """Signed indexes into flat arrays made Numba's negative-index wrap-around a per-element select, which
    LLVM vectorised into gather and scatter instructions (slow on x86): the count kernel must hold none.

    Compiled afresh (the on-disk cache keeps no assembly), with the dtypes ``IoUTally`` passes.
    """
    import re

    from llvmlite import binding
    from numba import njit

    from repdissect.stages import _iou_kernels

    features = binding.get_host_cpu_features()
    if not (features.get("avx2") or features.get("avx512f")):
        pytest.skip("no AVX2/AVX-512 here: LLVM emits no gather or scatter, so the check could not fail")

    kernel = njit(nogil=True)(_iou_kernels.count_maps.py_func)
    i64, f32 = np.zeros(3, np.int64), np.zeros(3, np.float32)
    labels = np.zeros((1, 1, 2, 2), np.int32)
    kernel(
        np.zeros((1, 1, 2, 2), np.float32), f32, f32, f32, i64, i64, f32, f32, i64, i64, f32, f32,
        labels, labels.copy(), labels.copy(), labels.copy(), np.zeros((1, 1, 2, 2, 2), np.int32),
        np.zeros((1, 1), np.int64), i64,
        np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), np.zeros((0, 0, 0), np.uint8),
        np.zeros((1, 2), np.int64),
    )
    assembly = kernel.inspect_asm(kernel.signatures[0])
    assert "ret" in assembly  # real assembly, not a placeholder
    assert re.findall(r"\bv\w*(?:gather|scatter)\w*", assembly) == []
