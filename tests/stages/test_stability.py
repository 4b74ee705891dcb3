"""Location stability (Zhang et al.): hand-computed cases, top-K among visible images, sharding invariance."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from repdissect.datasets import Batch
from repdissect.stages._errors import StageInputError
from repdissect.stages._stability import (
    LandmarkTopK,
    argmax_locations,
    center_baseline,
    spatial_max_argmax,
    stability_tables,
)

IMAGE = (40, 40)  # diagonal 40·√2
DIAGONAL = 40 * math.sqrt(2)


def batch_of(ids, landmarks, visible):
    ids = np.asarray(ids, dtype=np.int64)
    return Batch(
        index=ids, images=np.zeros((len(ids), 3, 1, 1), np.uint8),
        landmarks=np.asarray(landmarks, np.float32), landmark_visible=np.asarray(visible, bool),
    )


def sample_std(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_argmax_cell_centres_on_the_upsampled_grid():
    # 2×4 map on a 40 (high) × 80 (wide) image: cells are 20×20, centres at 10 + 20·k.
    locations = argmax_locations(np.array([0, 3, 4, 6]), (2, 4), (40, 80))
    np.testing.assert_array_equal(locations, [[10, 10], [70, 10], [10, 30], [50, 30]])


def test_spatial_max_argmax_takes_the_first_maximum():
    acts = np.zeros((1, 2, 2, 3), np.float32)
    acts[0, 0, 1, 2] = 5
    acts[0, 1] = 1  # all tied: first cell
    max_values, argmax = spatial_max_argmax(acts)
    np.testing.assert_array_equal(max_values, [[5, 1]])
    np.testing.assert_array_equal(argmax, [[5, 0]])


def hand_case():
    """One unit on a 2×2 map of a 40×40 image (cell centres (10|30, 10|30)), one landmark at (10, 10).

    Images by decreasing max activation: 0 → cell (0,0), 1 → (1,1), 2 → (0,1), 3 → (0,0), 4 → (1,1).
    """
    max_values = np.array([[4.0], [3.0], [2.0], [1.0], [0.5]])
    argmax = np.array([[0], [3], [1], [0], [3]])
    landmarks = np.full((5, 1, 2), 10.0)
    return max_values, argmax, landmarks


def test_hand_computed_deviation():
    max_values, argmax, landmarks = hand_case()
    stat = LandmarkTopK(IMAGE, top_k=3)
    stat.update(max_values, argmax, (2, 2), batch_of(range(5), landmarks, np.ones((5, 1))))
    tables = stability_tables(stat, ["head"])
    # top 3: distances 0, √(20²+20²), 20 over the diagonal → 0, 1/2, √2/4
    expected = sample_std([0.0, 0.5, math.sqrt(2) / 4])
    row = tables["unit_landmark"].iloc[0]
    assert row["images"] == 3 and row["valid"] and row["landmark_name"] == "head"
    assert row["deviation"] == pytest.approx(expected, rel=1e-12)
    assert tables["units"]["instability"].iloc[0] == pytest.approx(expected, rel=1e-12)
    assert tables["summary"]["instability"].iloc[0] == pytest.approx(expected, rel=1e-12)


def test_top_k_is_taken_among_images_where_the_landmark_is_visible():
    max_values, argmax, landmarks = hand_case()
    visible = np.array([[1], [0], [1], [1], [1]])  # the second-best image does not show the landmark
    stat = LandmarkTopK(IMAGE, top_k=3)
    stat.update(max_values, argmax, (2, 2), batch_of(range(5), landmarks, visible))
    # top 3 visible: images 0, 2, 3 → distances 0, 1/(2√2)·… = 20/diag, 0
    expected = sample_std([0.0, 20 / DIAGONAL, 0.0])
    assert stability_tables(stat)["unit_landmark"]["deviation"].iloc[0] == pytest.approx(expected, rel=1e-12)


def random_case(rng, n=30, c=4, p=3, feature=(3, 5)):
    acts = rng.standard_normal((n, c, *feature))
    acts[:, 1] = np.round(acts[:, 1])  # ties in max activation
    landmarks = rng.uniform(0, 40, (n, p, 2))
    visible = rng.random((n, p)) < 0.6
    return acts, landmarks, visible


def loop_instability(acts, landmarks, visible, ids, top_k, feature):
    """Independent loop: per unit and landmark, sort visible images by (−max, id), take K, ddof=1 std."""
    n, c = acts.shape[:2]
    h, w = feature
    result = np.zeros((c, landmarks.shape[1]))
    for u in range(c):
        for k in range(landmarks.shape[1]):
            rows = [i for i in range(n) if visible[i, k]]
            rows.sort(key=lambda i: (-acts[i, u].max(), ids[i]))
            d = []
            for i in rows[:top_k]:
                r, col = divmod(int(acts[i, u].argmax()), w)
                x, y = (col + 0.5) * IMAGE[1] / w, (r + 0.5) * IMAGE[0] / h
                d.append(math.hypot(float(landmarks[i, k, 0]) - x, float(landmarks[i, k, 1]) - y) / DIAGONAL)
            result[u, k] = sample_std(d)
    return result


def test_equals_independent_loop():
    rng = np.random.default_rng(0)
    acts, landmarks, visible = random_case(rng)
    ids = rng.permutation(1000)[:30]
    stat = LandmarkTopK(IMAGE, top_k=6)
    max_values, argmax = spatial_max_argmax(acts)
    stat.update(max_values, argmax, (3, 5), batch_of(ids, landmarks, visible))
    deviation = stability_tables(stat)["unit_landmark"]["deviation"].to_numpy().reshape(4, 3)
    expected = loop_instability(acts, landmarks.astype(np.float32), visible, ids, 6, (3, 5))
    np.testing.assert_allclose(deviation, expected, rtol=1e-12)


@pytest.mark.parametrize("sizes", [[30], [1, 29], [10, 10, 10], [7, 1, 13, 9]], ids=str)
def test_sharded_and_merged_equals_whole(sizes):
    rng = np.random.default_rng(1)
    acts, landmarks, visible = random_case(rng)
    max_values, argmax = spatial_max_argmax(acts)
    whole = LandmarkTopK(IMAGE, top_k=5)
    whole.update(max_values, argmax, (3, 5), batch_of(range(30), landmarks, visible))
    bounds = np.cumsum([0, *sizes])
    parts = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part = LandmarkTopK(IMAGE, top_k=5)
        part.update(max_values[a:b], argmax[a:b], (3, 5), batch_of(range(a, b), landmarks[a:b], visible[a:b]))
        parts.append(LandmarkTopK.from_table(part.to_table()))
    merged = parts[-1]
    for part in parts[:-1]:
        merged = part.merge(merged)
    for name, table in stability_tables(whole).items():
        assert table.equals(stability_tables(merged)[name]), name
    np.testing.assert_array_equal(merged.ids, whole.ids)


def test_state_round_trips_through_parquet(tmp_path):
    rng = np.random.default_rng(2)
    acts, landmarks, visible = random_case(rng)
    stat = LandmarkTopK(IMAGE, top_k=4)
    stat.update(*spatial_max_argmax(acts), (3, 5), batch_of(range(30), landmarks, visible))
    pq.write_table(stat.to_table(), tmp_path / "topk.parquet")
    back = LandmarkTopK.from_table(pq.read_table(tmp_path / "topk.parquet"))
    assert stability_tables(back)["units"].equals(stability_tables(stat)["units"])


def test_too_few_images_and_constant_units_are_flagged_not_nan():
    rng = np.random.default_rng(3)
    acts, landmarks, visible = random_case(rng, n=6)
    visible[:, 0] = [1, 0, 0, 0, 0, 0]  # landmark 0 seen once: invalid for every unit
    visible[:, 1] = False  # landmark 1 never seen
    acts[:, 2] = 0  # dead unit: its argmax carries no location
    stat = LandmarkTopK(IMAGE, top_k=4)
    stat.update(*spatial_max_argmax(acts), (3, 5), batch_of(range(6), landmarks, visible))
    tables = stability_tables(stat)
    rows = tables["unit_landmark"]
    assert not rows.query("landmark in (0, 1)")["valid"].any()
    assert (rows.query("landmark in (0, 1)")["deviation"] == 0).all()
    units = tables["units"].set_index("unit")
    assert units.loc[2, "constant"] and not units.loc[2, "valid"]
    assert (units.loc[[0, 1, 3], "landmarks"] == 1).all() and units.loc[[0, 1, 3], "valid"].all()
    expected = rows.query("landmark == 2 and unit != 2")["deviation"].mean()
    assert tables["summary"]["instability"].iloc[0] == pytest.approx(expected)
    assert tables["summary"]["valid_units"].iloc[0] == 3
    assert not any(t.isna().any().any() for t in tables.values())

    none_visible = LandmarkTopK(IMAGE, top_k=4)
    none_visible.update(*spatial_max_argmax(acts), (3, 5), batch_of(range(6), landmarks, np.zeros_like(visible)))
    summary = stability_tables(none_visible)["summary"].iloc[0]
    assert summary["valid_units"] == 0 and summary["instability"] == 0.0


def test_center_baseline_hand_computed():
    # Centre (20, 20). Landmark 0 at distances 0, 20, 20, 10 (last invisible); landmark 1 always at the centre.
    landmarks = np.array(
        [[[20, 20], [20, 20]], [[40, 20], [20, 20]], [[20, 0], [20, 20]], [[30, 20], [20, 20]]], dtype=np.float32
    )
    visible = np.array([[1, 1], [1, 1], [1, 1], [0, 1]], bool)
    tables = center_baseline(landmarks, visible, IMAGE, ["beak", "tail"])
    d0 = sample_std([0, 20 / DIAGONAL, 20 / DIAGONAL])
    np.testing.assert_allclose(tables["unit_landmark"]["deviation"], [d0, 0.0], rtol=1e-12)
    np.testing.assert_array_equal(tables["unit_landmark"]["images"], [3, 4])
    assert tables["summary"]["instability"].iloc[0] == pytest.approx(d0 / 2)
    assert list(tables["units"].columns) == ["unit", "landmarks", "instability", "constant", "valid"]


def test_center_baseline_sample_is_deterministic_and_sized():
    rng = np.random.default_rng(4)
    landmarks = rng.uniform(0, 40, (200, 3, 2))
    visible = rng.random((200, 3)) < 0.5
    a = center_baseline(landmarks, visible, IMAGE, sample_size=20, seed=7)
    b = center_baseline(landmarks, visible, IMAGE, sample_size=20, seed=7)
    assert a["unit_landmark"].equals(b["unit_landmark"])
    assert (a["unit_landmark"]["images"] == 20).all()
    everything = center_baseline(landmarks, visible, IMAGE, sample_size=1000)
    assert everything["unit_landmark"]["deviation"].equals(center_baseline(landmarks, visible, IMAGE)["unit_landmark"]["deviation"])


def test_bad_inputs_raise():
    stat = LandmarkTopK(IMAGE)
    no_landmarks = Batch(index=np.arange(2), images=np.zeros((2, 3, 1, 1), np.uint8))
    with pytest.raises(StageInputError, match="landmarks"):
        stat.update(np.zeros((2, 3)), np.zeros((2, 3), int), (2, 2), no_landmarks)
    good = batch_of(range(2), np.zeros((2, 1, 2)), np.ones((2, 1)))
    with pytest.raises(StageInputError, match=r"\(N, C\)"):
        stat.update(np.zeros((2, 3)), np.zeros((2, 4), int), (2, 2), good)
    with pytest.raises(StageInputError, match="flat indexes"):
        stat.update(np.zeros((2, 3)), np.full((2, 3), 4), (2, 2), good)
    with pytest.raises(StageInputError, match="image_ids"):
        stat.update(np.zeros((2, 3)), np.zeros((2, 3), int), (2, 2), good, image_ids=np.array([5, 6]))
    with pytest.raises(StageInputError, match="top_k"):
        LandmarkTopK(IMAGE, top_k=1)
    with pytest.raises(StageInputError, match="no activations"):
        stability_tables(LandmarkTopK(IMAGE))
