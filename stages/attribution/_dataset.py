"""Attribution over datasets: the concept-mass statistic, concept masks, exemplar choice and map tables.

**Concept mass** ("does the unit's guided backprop fall on the concept its IoU label names?"): for unit
``k`` with pixel-level IoU label ``c`` and every image whose mask ``M_c`` is non-empty,

``mass_k(image) = Σ_{p ∈ M_c} s_k(p) / Σ_p s_k(p)``, ``s_k = max_colour |attribution of unit k|`` at the
label maps' resolution (area-averaged), and ``area_k(image) = |M_c| / |image|``.

:class:`ConceptMass` keeps per unit the number of such images, ``Σ mass`` in fixed point (each image's
fraction rounded to 2⁻³² and summed as int64, so merging shards in any order is exact and sharded == whole
bit for bit) and the integer pixel counts of the masks. Read-out: ``mass`` = mean per-image fraction,
``area`` = mean mask fraction (what a uniform map would score), ``concentration = mass / area`` (> 1: the
attribution prefers the concept). Memory: O(units), whatever the number of images.
"""

from __future__ import annotations

from typing import Any, Self, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.nn.functional as F

from ...core import StreamingStatistic, pack_arrays, unpack_arrays
from .._errors import StageInputError

__all__ = ["ConceptMass", "concept_masks", "mass_fractions", "top_exemplars", "maps_table", "maps_from_table"]

_SCALE = float(2**32)


def concept_masks(pixel_labels: dict[str, np.ndarray], labels: Sequence[int], categories: Sequence[str]) -> np.ndarray:
    """``(N, U, sh, sw)`` bool: unit ``u``'s concept ``labels[u]`` (of ``categories[u]``) in each image.

    ``pixel_labels`` is a dataset batch's ``category → (N, L, sh, sw)`` int label layers; a pixel belongs to
    the concept when any layer holds its label number.
    """
    first = next(iter(pixel_labels.values()))
    n, _, sh, sw = first.shape
    out = np.zeros((n, len(labels), sh, sw), dtype=bool)
    for u, (label, category) in enumerate(zip(labels, categories)):
        if category not in pixel_labels:
            raise StageInputError(f"concept category {category!r} has no pixel labels in this dataset batch")
        out[:, u] = (pixel_labels[category] == int(label)).any(axis=1)
    return out


def mass_fractions(strength: torch.Tensor, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (image, unit): fraction of ``strength`` inside the mask and whether the image counts.

    Args:
        strength: ``(N, U, H, W)`` non-negative attribution strength.
        masks: ``(N, U, sh, sw)`` bool concept masks; ``strength`` is area-resampled to ``(sh, sw)``.

    Returns:
        ``(fraction (N, U) float64, valid (N, U) bool)``; valid = non-empty mask and non-zero attribution.

    Computed in groups of units (float64 copies of ~2²¹ values each, not of the whole batch: the demo's conv4
    batch was four 64 MiB temporaries); every (image, unit) value is the same reduction of its own plane
    either way, so the bits do not depend on the grouping (tested against the whole batch at once).
    """
    n, u, h, w = strength.shape
    sh, sw = masks.shape[-2:]
    frac = np.zeros((n, u), np.float64)
    valid = np.zeros((n, u), bool)
    step = max(1, _GROUP_VALUES // max(1, n * max(h * w, sh * sw)))
    for start in range(0, u, step):
        f, v = _fractions(strength[:, start:start + step], masks[:, start:start + step])
        frac[:, start:start + step], valid[:, start:start + step] = f, v
    return frac, valid


#: values per float64 temporary of :func:`mass_fractions` (16 MiB)
_GROUP_VALUES = 1 << 21


def _fractions(strength: torch.Tensor, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`mass_fractions` of one group of units, all at once."""
    n, u, h, w = strength.shape
    sh, sw = masks.shape[-2:]
    s = strength.double()
    if (h, w) != (sh, sw):
        s = F.interpolate(s.reshape(n * u, 1, h, w), size=(sh, sw), mode="area").reshape(n, u, sh, sw)
    m = torch.as_tensor(masks, dtype=torch.float64)
    total = s.sum((2, 3))
    inside = (s * m).sum((2, 3))
    valid = (m.sum((2, 3)) > 0) & (total > 0)
    frac = torch.where(valid, inside / total.clamp(min=1e-300), torch.zeros_like(total))
    return frac.numpy(), valid.numpy()


class ConceptMass(StreamingStatistic):
    """Mergeable per-unit concept mass (see module docstring); state: int64 counts only."""

    def __init__(self, units: Sequence[int] = ()) -> None:
        self.units = np.asarray(units, dtype=np.int64)
        u = len(self.units)
        self.images = np.zeros(u, np.int64)
        self.mass_q = np.zeros(u, np.int64)
        self.mask_pixels = np.zeros(u, np.int64)
        self.pixels = np.zeros(u, np.int64)

    def update(self, fraction: np.ndarray, valid: np.ndarray, masks: np.ndarray) -> None:  # type: ignore[override]
        """Fold ``(N, U)`` fractions/validity and the ``(N, U, sh, sw)`` masks of one batch."""
        if fraction.shape != (masks.shape[0], len(self.units)) or valid.shape != fraction.shape:
            raise StageInputError(f"ConceptMass.update: fractions {fraction.shape} do not match "
                                  f"{masks.shape[0]} images × {len(self.units)} units")
        q = np.rint(np.clip(fraction, 0.0, 1.0) * _SCALE).astype(np.int64)
        self.images += valid.sum(0)
        self.mass_q += np.where(valid, q, 0).sum(0)
        area = masks.reshape(*masks.shape[:2], -1).sum(-1).astype(np.int64)
        self.mask_pixels += np.where(valid, area, 0).sum(0)
        self.pixels += valid.sum(0).astype(np.int64) * int(np.prod(masks.shape[2:]))

    def merge(self, other: Self) -> Self:
        if not np.array_equal(self.units, other.units):
            raise StageInputError("ConceptMass.merge: the two states cover different units")
        self.images += other.images
        self.mass_q += other.mass_q
        self.mask_pixels += other.mask_pixels
        self.pixels += other.pixels
        return self

    def to_table(self) -> pa.Table:
        return pack_arrays({"units": self.units, "images": self.images, "mass_q": self.mass_q,
                            "mask_pixels": self.mask_pixels, "pixels": self.pixels})

    @classmethod
    def from_table(cls, table: pa.Table) -> Self:
        arrays, _ = unpack_arrays(table)
        stat = cls(arrays["units"])
        for name in ("images", "mass_q", "mask_pixels", "pixels"):
            setattr(stat, name, np.array(arrays[name], dtype=np.int64))  # writable copies: merge adds in place
        return stat

    def result(self) -> pd.DataFrame:
        """unit, images, mass, area, concentration (NaN where no image had the concept)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mass = np.where(self.images > 0, self.mass_q / _SCALE / np.maximum(self.images, 1), np.nan)
            area = np.where(self.pixels > 0, self.mask_pixels / np.maximum(self.pixels, 1), np.nan)
            conc = mass / area
        return pd.DataFrame({"unit": self.units, "images": self.images, "mass": mass, "area": area,
                             "concentration": conc})


def top_exemplars(image: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit the ``k`` images with the largest value (ties: smaller image index first).

    Args:
        image: ``(N,)`` image ids; values: ``(N, U)`` per-image unit scores (spatial max or mean).

    Returns:
        ``(images (U, k'), scores (U, k'))``, best first, ``k' = min(k, N)``.
    """
    kk = min(int(k), image.size)
    order = np.stack([np.lexsort((image, -col))[:kk] for col in values.T]) if values.size else np.zeros((0, kk), int)
    return image[order], np.take_along_axis(values.T, order, axis=1)


def maps_table(columns: dict[str, Sequence[Any]], maps: Sequence[np.ndarray]) -> pa.Table:
    """A table of raw maps: the given scalar ``columns`` plus ``shape`` (list<int32>) and ``map`` (list<float32>).

    The ``map`` column wraps one concatenated float32 array (zero-copy) with its row offsets: converting the
    list of arrays element by element made Arrow grow a second copy of every map in its own pool.
    """
    data = {name: pa.array(list(values)) for name, values in columns.items()}
    data["shape"] = pa.array([list(m.shape) for m in maps], pa.list_(pa.int32()))
    offsets = np.zeros(len(maps) + 1, np.int64)
    np.cumsum([np.size(m) for m in maps], out=offsets[1:])
    values = np.empty(int(offsets[-1]), np.float32)
    for m, start, stop in zip(maps, offsets[:-1], offsets[1:]):
        values[start:stop] = np.asarray(m, np.float32).ravel()
    data["map"] = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(data)


def maps_from_table(table: pa.Table | pd.DataFrame) -> list[np.ndarray]:
    """The ``map`` column of :func:`maps_table` back as arrays of their ``shape``."""
    df = table.to_pandas() if isinstance(table, pa.Table) else table
    return [np.asarray(m, np.float32).reshape(tuple(s)) for m, s in zip(df["map"], df["shape"])]
