"""Top-activating images per unit with the unit's thresholded region: the "dataset search" view.

The constraint: exemplars come from cached outputs only — the ``dataset_search`` stage's top-k table and
activation maps (a mergeable top-k over shards, computed once in the pipeline) when the run has it; else
the extraction's per-image unit maxima (``summaries@<layer>``) streamed part by part through the same
:class:`~repdissect.stages.TopK` statistic (memory ``O(units · k)``, never every image's maximum) and the
chosen images' maps read from the activation parts in small record batches. The thresholds stage gives
each unit's ``T``. The region is the unit's map upsampled bilinearly to the image size (half-pixel centres,
``align_corners=False``, the geometry the IoU tally uses) and binarised ``> T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq

from ..stages import TopK, read_image_maps, read_summaries

__all__ = ["UnitExemplars", "top_images", "read_image_maps", "region_masks", "layer_exemplars", "search_exemplars"]


@dataclass
class UnitExemplars:
    """One unit's top images: dataset indexes, their max activation, RGB images and regions."""

    unit: int
    images: np.ndarray  # (K,) int64 dataset indexes, best first
    values: np.ndarray  # (K,) float32 per-image max activation
    pixels: list[np.ndarray] = field(default_factory=list)  # K × (H, W, 3) uint8
    masks: list[np.ndarray] = field(default_factory=list)  # K × (H, W) bool


def top_images(summary_parts: Iterable[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the ``k`` images with the largest spatial-max activation (ties: smaller image index first).

    Streams the parts through :class:`~repdissect.stages.TopK`, so memory is ``O(C · k)``.

    Args:
        summary_parts: Parquet parts of an extraction ``summaries@<layer>`` table.
        k: images per unit.

    Returns:
        ``(images (C, k') int64, values (C, k') float32)`` with ``k' = min(k, N)``, best first.
    """
    stat = TopK(k)
    for path in summary_parts:
        summary = read_summaries(pq.read_table(path, columns=["image", "max", "argmax", "mean"]))
        stat.update(summary.max, summary.image)
    res = stat.result()
    return res["ids"], res["scores"].astype(np.float32)


def region_masks(maps: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Upsample ``(K, H, W)`` maps bilinearly (``align_corners=False``) to ``size`` and binarise ``> threshold``."""
    import torch  # only the figure path needs it; `summary_text` on a cached run must not load torch
    import torch.nn.functional as F

    # a copy: cached maps are read-only views of Arrow buffers, which torch refuses to wrap without a warning
    x = torch.from_numpy(np.array(maps, dtype=np.float32))[:, None]
    up = F.interpolate(x, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)[:, 0]
    return (up > float(threshold)).numpy()


def layer_exemplars(summary_parts: Sequence[str], activation_parts: Sequence[str], thresholds: np.ndarray,
                    units: Sequence[int], dataset: Any, k: int = 5) -> list[UnitExemplars]:
    """Top-``k`` exemplars with regions for each of ``units`` of one layer of one network.

    Args:
        summary_parts, activation_parts: the extraction entry's parts for the layer.
        thresholds: ``(C,)`` unit thresholds of the layer (thresholds stage, indexed by unit).
        units: which units, in display order.
        dataset: the run's dataset (``load(indices).images`` gives ``(N, 3, H, W)`` uint8).
        k: images per unit.
    """
    images, values = top_images(summary_parts, k)
    units = [int(u) for u in units]
    wanted = np.unique(images[units].ravel()) if units else np.zeros(0, np.int64)
    maps = read_image_maps(activation_parts, wanted)
    pixels: dict[int, np.ndarray] = {}
    if wanted.size:
        batch = dataset.load(wanted)
        for idx, img in zip(batch.index, batch.images):
            pixels[int(idx)] = np.ascontiguousarray(np.transpose(img, (1, 2, 0)))
    out = []
    for unit in units:
        ids = images[unit]
        ex = UnitExemplars(unit=unit, images=ids, values=values[unit])
        stack = np.stack([maps[int(i)][unit] for i in ids])
        size = pixels[int(ids[0])].shape[:2]
        masks = region_masks(stack, float(thresholds[unit]), size)
        ex.pixels = [pixels[int(i)] for i in ids]
        ex.masks = list(masks)
        out.append(ex)
    return out


def search_exemplars(top: Any, maps: Any, thresholds: np.ndarray, units: Sequence[int], dataset: Any,
                     k: int = 5) -> list[UnitExemplars]:
    """:func:`layer_exemplars` from a ``dataset_search`` entry's ``top`` and ``maps`` tables (pandas)."""
    top = top[top["rank"] < k]
    maps = maps[maps["rank"] < k]
    units = [int(u) for u in units]
    wanted = np.unique(top[top["unit"].isin(units)]["image"].to_numpy()) if units else np.zeros(0, np.int64)
    pixels: dict[int, np.ndarray] = {}
    if wanted.size:
        batch = dataset.load(wanted)
        for idx, img in zip(batch.index, batch.images):
            pixels[int(idx)] = np.ascontiguousarray(np.transpose(img, (1, 2, 0)))
    by_unit = {u: g.sort_values("rank") for u, g in top[top["unit"].isin(units)].groupby("unit")}
    map_rows = {u: g.sort_values("rank") for u, g in maps[maps["unit"].isin(units)].groupby("unit")}
    out = []
    for unit in units:
        rows, mrows = by_unit[unit], map_rows[unit]
        ids = rows["image"].to_numpy(np.int64)
        stack = np.stack([np.asarray(m, np.float32).reshape(int(h), int(w))
                          for m, h, w in zip(mrows["map"], mrows["height"], mrows["width"])])
        size = pixels[int(ids[0])].shape[:2]
        out.append(UnitExemplars(unit=unit, images=ids, values=rows["value"].to_numpy(np.float32),
                                 pixels=[pixels[int(i)] for i in ids],
                                 masks=list(region_masks(stack, float(thresholds[unit]), size))))
    return out
