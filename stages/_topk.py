"""The one top-k of the package: per row, the k best (score, image id, payload…) entries, mergeable over shards.

Three places need "the k largest": dataset search (top images per unit, Zeiler & Fergus's "images causing
the greatest response of that neuron"), location stability (top-K images per unit and landmark, Zhang et
al.) and the exact quantile thresholds (the k largest activation values per unit, Bau et al.). They share
this module:

* :func:`select_top` — per row of any leading shape, the ``k`` best entries ordered by ``(score desc, id
  asc)``, carrying any payload arrays along; empty slots (id −1) sort last. The tie-break on the image
  index makes the selection a function of the *set* of candidates, so any shard layout and any merge order
  give the same answer (bit for bit).
* :class:`TopK` — the mergeable statistic over images (``update`` with one shard's ``(N, C)`` scores,
  ``merge``, ``to_table``/``from_table``); dataset search runs it through the statistic driver and location
  stability folds its per-landmark candidates with :func:`select_top`.
* :func:`keep_largest` — the id-free variant (values only, unordered) for the thresholds' top-quantile state,
  where ``k`` is a fraction of all activation values and the candidate filter matters more than an order.
"""

from __future__ import annotations

from typing import Mapping, Self

import numpy as np
import pyarrow as pa

from ..core import StreamingStatistic, pack_arrays, unpack_arrays
from ._errors import StageInputError

__all__ = ["select_top", "keep_largest", "TopK"]


def select_top(scores: np.ndarray, ids: np.ndarray, k: int,
               payloads: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per row (all axes but the last), the ``k`` best entries by ``(score desc, id asc)``; id −1 = empty, last.

    Args:
        scores: ``(..., M)`` candidate scores (finite; an empty slot's score is ignored).
        ids: ``(..., M)`` int64 image ids, −1 for an empty slot.
        k: entries to keep (the result has ``min(k, M)`` columns).
        payloads: arrays of the same shape carried along (argmax positions, distances, …).

    Returns:
        ``(scores, ids, payloads)`` of shape ``(..., min(k, M))``, best first.
    """
    scores, ids = np.asarray(scores), np.asarray(ids)
    if scores.shape != ids.shape:
        raise StageInputError(f"select_top: scores {scores.shape} and ids {ids.shape} must have the same shape")
    empty = ids < 0
    # lexsort: the last key is primary → empty slots last, then score descending, then id ascending.
    order = np.lexsort((ids, -np.where(empty, 0, scores), empty), axis=-1)[..., : int(k)]
    out = {name: np.take_along_axis(np.asarray(a), order, -1) for name, a in (payloads or {}).items()}
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1), out


def keep_largest(top: np.ndarray | None, new: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` largest values of ``top ∪ new`` (unordered, no ids); rows are units.

    ``top`` is a previous result (``(R, ≤ k)``) or ``None``; ``new`` is ``(R, M)``. Candidates not above the
    current k-th largest are filtered out before the partition (they could only tie with a kept value).
    """
    if top is not None and top.shape[1] == k:
        floor = top.min(axis=1, keepdims=True)
        keep = new > floor
        per_row = keep.sum(axis=1)
        width = int(per_row.max()) if per_row.size else 0
        if width == 0:
            return top
        rows, cols = np.nonzero(keep)  # row-major: each row's hits are consecutive
        slot = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)
        # -inf never displaces a kept (finite) value.
        compact = np.full((new.shape[0], width), -np.inf, dtype=new.dtype)
        compact[rows, slot] = new[rows, cols]
        new = compact
    merged = new if top is None else np.concatenate([top, new], axis=1)
    if merged.shape[1] > k:
        merged = np.partition(merged, merged.shape[1] - k, axis=1)[:, merged.shape[1] - k :]
    return np.ascontiguousarray(merged)


class TopK(StreamingStatistic):
    """Per unit, the ``k`` images with the highest score, with their ids and payloads (e.g. the argmax cell).

    State: ``scores (C, k)`` float64, ``ids (C, k)`` int64 (−1 = empty slot) and one ``(C, k)`` array per
    payload, always ``k`` wide, best first. Memory is ``O(C·k)`` whatever the number of images; ``merge`` is
    :func:`select_top` of the union, so any sharding equals the whole-dataset selection, and that equals a
    stable ``numpy.argsort`` of ``-score`` per unit (ties → smaller image index first).

    Args:
        k: images per unit (≥ 1).
        payloads: names of the per-(image, unit) integer payloads carried along (e.g. ``("argmax",)``).
    """

    def __init__(self, k: int, payloads: tuple[str, ...] = ()) -> None:
        if int(k) < 1:
            raise StageInputError(f"TopK: k must be ≥ 1; got {k!r}")
        self.k = int(k)
        self.payload_names = tuple(str(p) for p in payloads)
        self.scores: np.ndarray | None = None
        self.ids: np.ndarray | None = None
        self.payloads: dict[str, np.ndarray] = {}

    def update(self, scores: np.ndarray, image_ids: np.ndarray,  # type: ignore[override]
               payloads: Mapping[str, np.ndarray] | None = None) -> None:
        """Fold in one shard: ``scores (N, C)``, ``image_ids (N,)`` ≥ 0, payloads ``{name: (N, C)}``."""
        scores = np.asarray(scores, dtype=np.float64)
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if scores.ndim != 2 or image_ids.shape != scores.shape[:1]:
            raise StageInputError(f"TopK.update: scores must be (N, C) with ids (N,); got {scores.shape}, {image_ids.shape}")
        if not np.isfinite(scores).all():
            raise StageInputError("TopK.update: scores contain NaN/inf; fix the extraction")
        if image_ids.size and image_ids.min() < 0:
            raise StageInputError("TopK.update: image ids must be ≥ 0")
        payloads = dict(payloads or {})
        if sorted(payloads) != sorted(self.payload_names):
            raise StageInputError(f"TopK.update: payloads {sorted(payloads)} given, {sorted(self.payload_names)} declared")
        n, c = scores.shape
        cand = {name: np.asarray(payloads[name], dtype=np.int64).T for name in self.payload_names}
        if any(a.shape != (c, n) for a in cand.values()):
            raise StageInputError(f"TopK.update: every payload must be (N, C) = ({n}, {c})")
        self._fold(np.ascontiguousarray(scores.T), np.broadcast_to(image_ids, (c, n)), cand)

    def _fold(self, scores: np.ndarray, ids: np.ndarray, payloads: dict[str, np.ndarray]) -> None:
        if self.scores is not None:
            if self.scores.shape[0] != scores.shape[0]:
                raise StageInputError(f"TopK: {scores.shape[0]} units here, {self.scores.shape[0]} before")
            scores = np.concatenate([self.scores, scores], axis=1)
            ids = np.concatenate([self.ids, ids], axis=1)
            payloads = {name: np.concatenate([self.payloads[name], a], axis=1) for name, a in payloads.items()}
        scores, ids, payloads = select_top(scores, ids, self.k, payloads)
        if scores.shape[1] < self.k:  # pad so every state is k wide
            pad = ((0, 0), (0, self.k - scores.shape[1]))
            scores = np.pad(scores, pad)
            ids = np.pad(ids, pad, constant_values=-1)
            payloads = {name: np.pad(a, pad) for name, a in payloads.items()}
        self.scores, self.ids, self.payloads = scores, ids, payloads

    def merge(self, other: Self) -> Self:
        if (other.k, other.payload_names) != (self.k, self.payload_names):
            raise StageInputError(f"TopK.merge: k/payloads differ ({self.k}, {self.payload_names}) vs "
                                  f"({other.k}, {other.payload_names})")
        if other.scores is not None:
            self._fold(other.scores, other.ids, dict(other.payloads))
        return self

    def to_table(self) -> pa.Table:
        arrays = {} if self.scores is None else {"scores": self.scores, "ids": self.ids,
                                                 **{f"payload.{n}": a for n, a in self.payloads.items()}}
        return pack_arrays(arrays, {"kind": "TopK", "k": self.k, "payloads": list(self.payload_names)})

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        if attrs.get("kind") != "TopK":
            raise StageInputError(f"TopK.from_table: table holds a {attrs.get('kind')!r} state")
        stat = cls(attrs["k"], tuple(attrs["payloads"]))
        if arrays:
            stat.scores, stat.ids = arrays["scores"].copy(), arrays["ids"].copy()
            stat.payloads = {n: arrays[f"payload.{n}"].copy() for n in stat.payload_names}
        return stat

    def result(self) -> dict[str, np.ndarray]:
        """``{"scores", "ids", *payloads}``, each ``(C, k')`` best first, ``k' = min(k, images seen)``."""
        if self.scores is None:
            raise StageInputError("TopK.result: no images were added")
        filled = int((self.ids >= 0).sum(axis=1).min())
        return {"scores": self.scores[:, :filled], "ids": self.ids[:, :filled],
                **{n: a[:, :filled] for n, a in self.payloads.items()}}
