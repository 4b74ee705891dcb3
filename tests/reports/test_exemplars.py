"""Exemplar selection: top images per unit from cached summaries, maps streamed from activation parts, regions
as the IoU tally sees them."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from repdissect.reports._exemplars import read_image_maps, region_masks, top_images
from repdissect.stages._activations import activations_table
from repdissect.stages import summaries_table


def _parts(tmp_path, acts, sizes=(5, 4, 3)):
    c, h, w = acts.shape[1:]
    act_paths, sum_paths = [], []
    start = 0
    for i, size in enumerate(sizes):
        ids = np.arange(start, start + size)
        a = acts[start:start + size]
        act_paths.append(tmp_path / f"a{i}.parquet")
        sum_paths.append(tmp_path / f"s{i}.parquet")
        pq.write_table(activations_table(ids, a), act_paths[-1])
        pq.write_table(summaries_table(ids, a.max(axis=(2, 3)), a.reshape(size, c, -1).argmax(-1),
                                       a.mean(axis=(2, 3)), (c, h, w)), sum_paths[-1])
        start += size
    return act_paths, sum_paths


def test_top_images_rank_by_max_with_ties_to_the_smaller_index(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(12, 3, 4, 4)).astype(np.float32)
    acts[:, 2] = 0.0
    acts[[7, 2, 9], 2, 1, 1] = 5.0  # unit 2: three tied maxima, the rest 0
    _, sums = _parts(tmp_path, acts)
    images, values = top_images(sums, k=4)
    assert images.shape == (3, 4)
    for unit in (0, 1):
        expected = np.argsort(-acts[:, unit].max(axis=(1, 2)), kind="stable")[:4]
        assert images[unit].tolist() == expected.tolist()
        assert values[unit] == pytest.approx(acts[expected, unit].max(axis=(1, 2)))
    assert images[2].tolist() == [2, 7, 9, 0]
    assert top_images(sums, k=50)[0].shape == (3, 12)


def test_read_image_maps_returns_exact_maps_from_any_part(tmp_path):
    acts = np.random.default_rng(1).normal(size=(12, 3, 4, 4)).astype(np.float32)
    parts, _ = _parts(tmp_path, acts)
    maps = read_image_maps(parts, [11, 0, 6], batch_rows=2)
    assert sorted(maps) == [0, 6, 11]
    for i, m in maps.items():
        assert np.array_equal(m, acts[i])
    assert read_image_maps(parts, []) == {}


def test_regions_match_the_iou_tally_upsampling():
    from repdissect.stages import upsample_bilinear

    maps = np.random.default_rng(2).gamma(1.0, 1.0, size=(5, 7, 6)).astype(np.float32)
    threshold = float(np.quantile(maps, 0.9))
    ours = region_masks(maps, threshold, (28, 24))
    theirs = (upsample_bilinear(maps, (28, 24)) > threshold).numpy()
    # Two float32 formulas of the same interpolation: at most a pixel within rounding of T may differ.
    assert ours.shape == (5, 28, 24)
    assert (ours != theirs).sum() <= 2


def test_a_single_hot_cell_lights_its_own_footprint():
    maps = np.zeros((1, 4, 4), np.float32)
    maps[0, 1, 2] = 1.0
    mask = region_masks(maps, 0.5, (16, 16))[0]
    ys, xs = np.nonzero(mask)
    assert 4 <= ys.min() and ys.max() < 8 and 8 <= xs.min() and xs.max() < 12
