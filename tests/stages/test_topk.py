"""The one top-k statistic: sharded == whole == numpy.argsort, ties broken by image index; select_top rows."""

from __future__ import annotations

import numpy as np
import pytest

from repdissect.stages import StageInputError, TopK, select_top


def _reference(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: stable argsort of −score over images sorted by id (ties → smaller id first)."""
    by_id = np.argsort(ids, kind="stable")
    s, i = scores[by_id], ids[by_id]
    order = np.argsort(-s.T, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s.T, order, 1), i[order]


@pytest.mark.parametrize("n, c, k, shards, ties", [
    (50, 4, 5, [10, 25, 50], False),
    (50, 3, 7, [1, 2, 3, 50], True),   # many ties: tie-break by image index must hold across shards
    (6, 2, 10, [3, 6], True),          # fewer images than k
    (40, 1, 1, [13, 27, 40], False),
])
def test_sharded_equals_whole_equals_argsort(n: int, c: int, k: int, shards: list[int], ties: bool) -> None:
    rng = np.random.default_rng(n + c + k)
    scores = rng.integers(0, 4, (n, c)).astype(float) if ties else rng.normal(size=(n, c))
    ids = rng.permutation(1000)[:n]
    argmax = rng.integers(0, 64, (n, c))
    whole = TopK(k, ("argmax",))
    whole.update(scores, ids, {"argmax": argmax})
    parts, start = [], 0
    for stop in shards:
        part = TopK(k, ("argmax",))
        part.update(scores[start:stop], ids[start:stop], {"argmax": argmax[start:stop]})
        parts.append(TopK.from_table(part.to_table()))  # through the transport format
        start = stop
    merged = parts[-1]
    for p in parts[-2::-1]:  # a different order than the shards'
        merged = p.merge(merged)
    ref_scores, ref_ids = _reference(scores, ids, k)
    for stat in (whole, merged):
        res = stat.result()
        np.testing.assert_array_equal(res["scores"], ref_scores)
        np.testing.assert_array_equal(res["ids"], ref_ids)
        row_of = {int(i): r for r, i in enumerate(ids)}
        expected_argmax = np.array([[argmax[row_of[int(i)], u] for i in row] for u, row in enumerate(ref_ids)])
        np.testing.assert_array_equal(res["argmax"], expected_argmax)


def test_select_top_leading_axes_and_empty_slots() -> None:
    scores = np.array([[[3.0, 1.0, 3.0, 9.0]]])
    ids = np.array([[[4, 2, 1, -1]]])
    s, i, p = select_top(scores, ids, 3, {"d": np.array([[[0.4, 0.2, 0.1, 0.9]]])})
    np.testing.assert_array_equal(i, [[[1, 4, 2]]])  # empty (-1) last though its score is highest
    np.testing.assert_array_equal(p["d"], [[[0.1, 0.4, 0.2]]])


@pytest.mark.parametrize("call, message", [
    (lambda: TopK(0), "k must be"),
    (lambda: TopK(2).update(np.zeros((2, 3)), np.array([0, -1])), "≥ 0"),
    (lambda: TopK(2).update(np.array([[np.nan]]), np.array([0])), "NaN"),
    (lambda: TopK(2, ("argmax",)).update(np.zeros((1, 1)), np.array([0])), "payloads"),
    (lambda: TopK(2).merge(TopK(3)), "differ"),
    (lambda: TopK(2).result(), "no images"),
])
def test_bad_input(call, message: str) -> None:
    with pytest.raises(StageInputError, match=message):
        call()
