"""Location (in)stability of units (Zhang, Wu, Zhu, "Interpretable CNNs", CVPR 2018, §5.2.2).

For unit ``u`` and image ``i`` the inferred part location is the centre of the unit's argmax cell mapped to
image coordinates on the upsampled grid: cell ``(r, c)`` of an H×W map in an ``H_img × W_img`` image is at

    x = (c + 0.5) · W_img / W,    y = (r + 0.5) · H_img / H

(pixel centres at ``i + 0.5``, the datasets' landmark convention; for a stride-s layer this is the centre of
the cell's s×s footprint — the upsampled-grid mapping, not a receptive-field centre). Then

* ``d_i(u, k) = ‖landmark_k(i) − location_u(i)‖ / √(W_img² + H_img²)`` (distance over the image diagonal);
* ``D(u, k)`` = standard deviation (ddof = 1, as the authors' MATLAB ``var`` and the ICNN port) of ``d_i``
  over the **top-K images by the unit's max activation among the images where landmark k is visible**
  (K = 100; ties broken by the smaller image id, so any sharding gives the same set);
* unit instability = mean over its valid landmarks; layer instability = mean over valid units. Lower is
  more stable. A (unit, landmark) with fewer than 2 such images is invalid; a unit whose selected max
  activations are all equal (dead or constant: its argmax carries no location) is flagged ``constant``;
  both are excluded from means and never produce NaN.

The constraint that shaped it: "top-K among images where landmark k is visible" depends on k, so the
mergeable :class:`LandmarkTopK` keeps, per (unit, landmark), the K best (activation, image id, distance)
triples — exact under any shard split, memory ``C · P · K`` triples.

Baselines: a random-init network is just another model run through the same code; the image-centre
predictor is :func:`center_baseline`, which produces tables with the same columns (one pseudo-unit 0).
"""

from __future__ import annotations

from typing import Sequence, Self

import numpy as np
import pandas as pd
import pyarrow as pa

from ..datasets import Batch

from ._errors import StageInputError
from ._topk import select_top
from ..core import StreamingStatistic, pack_arrays, unpack_arrays

__all__ = [
    "DEFAULT_TOP_K",
    "LandmarkTopK",
    "argmax_locations",
    "center_baseline",
    "spatial_max_argmax",
    "stability_tables",
]

DEFAULT_TOP_K = 100
_MIN_IMAGES = 2  # a ddof=1 standard deviation needs two values


def spatial_max_argmax(acts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and unit, the maximum over positions and its flat index (first on ties, row-major).

    Args:
        acts: ``(N, C, H, W)`` activations.

    Returns:
        ``max_values (N, C)`` in the input dtype and ``argmax (N, C)`` int64 flat indexes into H×W.
    """
    acts = np.asarray(acts)
    if acts.ndim != 4:
        raise StageInputError(f"spatial_max_argmax: activations must be (N, C, H, W); got shape {acts.shape}")
    flat = acts.reshape(*acts.shape[:2], -1)
    argmax = flat.argmax(axis=2)
    return np.take_along_axis(flat, argmax[:, :, None], axis=2)[:, :, 0], argmax.astype(np.int64)


def argmax_locations(argmax: np.ndarray, feature_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """Image coordinates ``(..., 2)`` as ``(x, y)`` of flat argmax cells (centre of the cell on the upsampled grid).

    Args:
        argmax: integer flat indexes into an H×W map, any shape.
        feature_size: ``(H, W)`` of the map.
        image_size: ``(H_img, W_img)`` of the image the landmarks refer to.
    """
    h, w = (int(s) for s in feature_size)
    ih, iw = (float(s) for s in image_size)
    argmax = np.asarray(argmax)
    if argmax.size and (argmax.min() < 0 or argmax.max() >= h * w):
        raise StageInputError(f"argmax_locations: flat indexes must lie in [0, {h * w}) for a {h}×{w} map")
    row, col = np.divmod(argmax.astype(np.int64), w)
    return np.stack([(col + 0.5) * (iw / w), (row + 0.5) * (ih / h)], axis=-1)


def _landmark_arrays(batch: Batch, n: int) -> tuple[np.ndarray, np.ndarray]:
    if batch.landmarks is None or batch.landmark_visible is None:
        raise StageInputError("location stability needs landmarks; this dataset's batches carry none (landmarks is None)")
    landmarks = np.asarray(batch.landmarks, dtype=np.float64)
    visible = np.asarray(batch.landmark_visible, dtype=bool)
    shape_ok = landmarks.ndim == 3 and landmarks.shape[0] == n and landmarks.shape[2] == 2
    if not shape_ok or visible.shape != landmarks.shape[:2]:
        raise StageInputError(
            f"landmarks must be (N={n}, P, 2) with visibility (N, P); got {landmarks.shape} and {visible.shape}"
        )
    if not np.isfinite(landmarks[visible]).all():
        raise StageInputError("visible landmarks must have finite coordinates")
    return landmarks, visible


class LandmarkTopK(StreamingStatistic):
    """Per (unit, landmark): the top-K images by the unit's max activation among images showing the landmark.

    Keeps (max activation, image id, normalised distance of the argmax location to the landmark) for each
    of the K; :func:`stability_tables` turns them into D(unit, landmark), unit and layer instability.

    Args:
        image_size: ``(H_img, W_img)`` of the images the landmarks refer to (the dataset's ``image_size``).
        top_k: K (100 in the paper).
    """

    def __init__(self, image_size: tuple[int, int], top_k: int = DEFAULT_TOP_K):
        ih, iw = (int(s) for s in image_size)
        if ih < 1 or iw < 1 or int(top_k) < _MIN_IMAGES:
            raise StageInputError(f"LandmarkTopK: need a positive image_size and top_k ≥ 2; got {image_size}, {top_k}")
        self.image_size = (ih, iw)
        self.top_k = int(top_k)
        self.values: np.ndarray | None = None  # (C, P, K) float64
        self.ids: np.ndarray | None = None  # (C, P, K) int64, −1 = empty
        self.distances: np.ndarray | None = None  # (C, P, K) float64

    def update(
        self,
        max_values: np.ndarray,
        argmax: np.ndarray,
        feature_size: tuple[int, int],
        batch: Batch,
        image_ids: np.ndarray | None = None,
    ) -> None:
        """Fold in one shard.

        Args:
            max_values: ``(N, C)`` per-image spatial max of each unit (see :func:`spatial_max_argmax`).
            argmax: ``(N, C)`` flat index of that max in the unit's H×W map.
            feature_size: ``(H, W)`` of the layer.
            batch: the dataset batch of the same images (``index``, ``landmarks``, ``landmark_visible``).
            image_ids: optional ids of the activation rows, checked against ``batch.index``.
        """
        max_values = np.asarray(max_values, dtype=np.float64)
        argmax = np.asarray(argmax)
        if max_values.ndim != 2 or argmax.shape != max_values.shape:
            raise StageInputError(
                f"LandmarkTopK.update: max_values and argmax must both be (N, C); got {max_values.shape}, {argmax.shape}"
            )
        n, c = max_values.shape
        if not np.isfinite(max_values).all():
            raise StageInputError("LandmarkTopK.update: max activations contain NaN/inf; fix the extraction")
        if len(batch) != n:
            raise StageInputError(f"LandmarkTopK.update: the batch has {len(batch)} images but the activations {n}")
        ids = np.asarray(batch.index, dtype=np.int64)
        if image_ids is not None and not np.array_equal(np.asarray(image_ids), ids):
            raise StageInputError("LandmarkTopK.update: image_ids differ from batch.index; load the batch for the same ids")
        if (ids < 0).any():
            raise StageInputError("LandmarkTopK.update: image ids must be ≥ 0")
        landmarks, visible = _landmark_arrays(batch, n)
        p = landmarks.shape[1]
        if self.values is not None and self.values.shape[:2] != (c, p):
            raise StageInputError(
                f"LandmarkTopK.update: {c} units × {p} landmarks here, {self.values.shape[0]} × {self.values.shape[1]} before"
            )
        location = argmax_locations(argmax, feature_size, self.image_size)  # (N, C, 2)
        diagonal = float(np.hypot(*self.image_size))
        delta = landmarks[:, None, :, :] - location[:, :, None, :]  # (N, C, P, 2)
        dist = np.hypot(delta[..., 0], delta[..., 1]) / diagonal
        # (C, P, N) candidates; invisible landmarks become empty slots.
        values = np.broadcast_to(max_values.T[:, None, :], (c, p, n))
        cand_ids = np.where(visible.T[None, :, :], ids[None, None, :], -1)
        cand_ids = np.broadcast_to(cand_ids, (c, p, n))
        self._fold(values, cand_ids, dist.transpose(1, 2, 0))

    def _fold(self, values: np.ndarray, ids: np.ndarray, dist: np.ndarray) -> None:
        if self.values is not None:
            values = np.concatenate([self.values, values], axis=-1)
            ids = np.concatenate([self.ids, ids], axis=-1)
            dist = np.concatenate([self.distances, dist], axis=-1)
        values, ids, rest = select_top(values, ids, self.top_k, {"dist": dist})
        dist = rest["dist"]
        if values.shape[-1] < self.top_k:  # pad so every state has K slots
            pad = ((0, 0), (0, 0), (0, self.top_k - values.shape[-1]))
            values, dist = np.pad(values, pad), np.pad(dist, pad)
            ids = np.pad(ids, pad, constant_values=-1)
        self.values, self.ids, self.distances = values, ids, dist

    def merge(self, other: Self) -> Self:
        if (other.image_size, other.top_k) != (self.image_size, self.top_k):
            raise StageInputError(
                f"LandmarkTopK.merge: image_size/top_k differ ({self.image_size}, {self.top_k}) vs "
                f"({other.image_size}, {other.top_k})"
            )
        if other.values is None:
            return self
        if self.values is not None and self.values.shape != other.values.shape:
            raise StageInputError(f"LandmarkTopK.merge: states of shape {self.values.shape} and {other.values.shape}")
        self._fold(other.values, other.ids, other.distances)
        return self

    def to_table(self) -> pa.Table:
        arrays = {} if self.values is None else {"values": self.values, "ids": self.ids, "distances": self.distances}
        return pack_arrays(arrays, {"kind": "LandmarkTopK", "image_size": list(self.image_size), "top_k": self.top_k})

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, attrs = unpack_arrays(table)
        arrays = {name: array.copy() for name, array in arrays.items()}  # unpacked arrays are read-only views
        if attrs.get("kind") != "LandmarkTopK":
            raise StageInputError(f"LandmarkTopK.from_table: table holds a {attrs.get('kind')!r} state")
        stat = cls(tuple(attrs["image_size"]), attrs["top_k"])
        if arrays:
            stat.values, stat.ids, stat.distances = arrays["values"], arrays["ids"], arrays["distances"]
        return stat


def _deviation_tables(
    distances: np.ndarray,
    used: np.ndarray,
    constant: np.ndarray,
    landmark_names: Sequence[str] | None,
    top_k: int,
) -> dict[str, pd.DataFrame]:
    """Tables from per (unit, landmark, slot) distances and a mask of the slots used."""
    c, p, _ = distances.shape
    names = list(landmark_names) if landmark_names else [str(k) for k in range(p)]
    if len(names) != p:
        raise StageInputError(f"stability_tables: {len(names)} landmark names for {p} landmarks")
    images = used.sum(axis=2)
    valid = images >= _MIN_IMAGES
    mean = np.where(valid, (distances * used).sum(axis=2) / np.maximum(images, 1), 0.0)
    squares = (((distances - mean[..., None]) ** 2) * used).sum(axis=2)
    deviation = np.where(valid, np.sqrt(squares / np.maximum(images - 1, 1)), 0.0)

    unit_landmark = pd.DataFrame(
        {
            "unit": np.repeat(np.arange(c, dtype=np.int64), p),
            "landmark": np.tile(np.arange(p, dtype=np.int64), c),
            "landmark_name": np.tile(np.array(names, dtype=object), c),
            "images": images.reshape(-1).astype(np.int64),
            "deviation": deviation.reshape(-1),
            "valid": valid.reshape(-1),
        }
    )
    landmarks_used = valid.sum(axis=1)
    unit_valid = (landmarks_used > 0) & ~constant
    instability = np.where(landmarks_used > 0, (deviation * valid).sum(axis=1) / np.maximum(landmarks_used, 1), 0.0)
    units = pd.DataFrame(
        {
            "unit": np.arange(c, dtype=np.int64),
            "landmarks": landmarks_used.astype(np.int64),
            "instability": instability,
            "constant": constant,
            "valid": unit_valid,
        }
    )
    summary = pd.DataFrame(
        [
            {
                "units": c,
                "valid_units": int(unit_valid.sum()),
                "landmarks": p,
                "top_k": top_k,
                "instability": float(instability[unit_valid].mean()) if unit_valid.any() else 0.0,
            }
        ]
    )
    return {"unit_landmark": unit_landmark, "units": units, "summary": summary}


def stability_tables(stat: LandmarkTopK, landmark_names: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """Location-instability tables of one layer (see the module docstring for the definitions).

    Args:
        stat: the merged :class:`LandmarkTopK` of the layer.
        landmark_names: names of the P landmarks (default, also when empty: ``"0"``, ``"1"``, …).

    Returns:
        ``unit_landmark``: ``unit, landmark, landmark_name, images, deviation, valid`` (deviation 0.0 when
        not valid). ``units``: ``unit, landmarks, instability, constant, valid`` (``landmarks`` = valid
        landmarks averaged; ``valid`` = at least one and not constant). ``summary``: one row ``units,
        valid_units, landmarks, top_k, instability`` (mean over valid units; 0.0 when there are none).
    """
    if stat.values is None:
        raise StageInputError("stability_tables: no activations were added")
    used = stat.ids >= 0
    highest = np.where(used, stat.values, -np.inf).max(axis=(1, 2))
    lowest = np.where(used, stat.values, np.inf).min(axis=(1, 2))
    constant = used.any(axis=(1, 2)) & (highest == lowest)
    return _deviation_tables(stat.distances, used, constant, landmark_names, stat.top_k)


def center_baseline(
    landmarks: np.ndarray,
    visible: np.ndarray,
    image_size: tuple[int, int],
    landmark_names: Sequence[str] | None = None,
    sample_size: int | None = None,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Instability of a predictor that always points at the image centre ``(W_img/2, H_img/2)``.

    It has no activation to rank images by, so by default every image where the landmark is visible is
    used: the std over all of them is the population value a top-K sample of an uninformative unit
    estimates. With ``sample_size=K`` it instead uses K visible images per landmark drawn uniformly
    without replacement by a seeded generator (deterministic; same sample size as the units).

    Args:
        landmarks: ``(N, P, 2)`` ``(x, y)`` pixel coordinates over the dataset.
        visible: ``(N, P)`` bool.
        image_size: ``(H_img, W_img)``.
        landmark_names: names of the P landmarks.
        sample_size: None (all visible images) or K.
        seed: seed of the sample.

    Returns:
        The tables of :func:`stability_tables` for a single pseudo-unit 0 (never ``constant``); the summary's
        ``top_k`` is the sample size (0 = all visible images).
    """
    landmarks = np.asarray(landmarks, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    if landmarks.ndim != 3 or landmarks.shape[2] != 2 or visible.shape != landmarks.shape[:2]:
        raise StageInputError(
            f"center_baseline: landmarks (N, P, 2) and visible (N, P) expected; got {landmarks.shape}, {visible.shape}"
        )
    ih, iw = (float(s) for s in image_size)
    centre = np.array([iw / 2, ih / 2])
    dist = np.hypot(*(landmarks - centre).transpose(2, 0, 1)) / np.hypot(ih, iw)  # (N, P)
    used = visible.copy()
    if sample_size is not None:
        if int(sample_size) < _MIN_IMAGES:
            raise StageInputError(f"center_baseline: sample_size must be ≥ 2 or None; got {sample_size}")
        rng = np.random.default_rng(seed)
        used[:] = False
        for k in range(visible.shape[1]):
            rows = np.flatnonzero(visible[:, k])
            pick = rng.choice(rows, size=min(int(sample_size), len(rows)), replace=False)
            used[pick, k] = True
    dist = np.where(used, dist, 0.0)
    return _deviation_tables(dist.T[None], used.T[None], np.array([False]), landmark_names, int(sample_size or 0))
