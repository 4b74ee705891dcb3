"""Top-activating images per unit with the unit's thresholded region: the "dataset search" view.

The constraint: exemplars come from cached outputs only — the extraction stage's per-image unit maxima
(``summaries@<layer>``) rank the images, its activation parts give the chosen images' maps, and the
thresholds stage gives each unit's ``T`` — and activation parts can be gigabytes (conv1 of the demo is
0.5 MB per image), so the parts are streamed in small record batches and only the rows of the chosen
images are kept. The region is the unit's map upsampled bilinearly to the image size (half-pixel centres,
``align_corners=False``, the geometry the IoU tally uses) and binarised ``> T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..stages import read_summaries, table_to_arrays

__all__ = ["UnitExemplars", "top_images", "read_image_maps", "region_masks", "layer_exemplars"]


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

    Args:
        summary_parts: Parquet parts of an extraction ``summaries@<layer>`` table.
        k: images per unit.

    Returns:
        ``(images (C, k') int64, values (C, k') float32)`` with ``k' = min(k, N)``, best first.
    """
    ids, maxima = [], []
    for path in summary_parts:
        summary = read_summaries(pq.read_table(path, columns=["image", "max", "argmax", "mean"]))
        ids.append(summary.image)
        maxima.append(summary.max)
    image = np.concatenate(ids)
    values = np.concatenate(maxima).T  # (C, N)
    kk = min(k, image.size)
    # lexsort by (image asc) then (value desc) gives a deterministic tie order.
    order = np.stack([np.lexsort((image, -row))[:kk] for row in values])
    return image[order], np.take_along_axis(values, order, axis=1)


def read_image_maps(activation_parts: Sequence[str], wanted: Iterable[int], batch_rows: int = 32) -> dict[int, np.ndarray]:
    """The ``(C, H, W)`` activation maps of the ``wanted`` images, streamed from activation parts.

    A part's small ``image`` column is read first; parts holding none of the wanted images are skipped.
    """
    want = set(int(i) for i in wanted)
    found: dict[int, np.ndarray] = {}
    for path in activation_parts:
        if len(found) == len(want):
            break
        pf = pq.ParquetFile(path)
        ids = pf.read(columns=["image"]).column(0).to_numpy()
        if not np.isin(ids, list(want)).any():
            continue
        schema = pf.schema_arrow
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["image", "activations"]):
            image = batch.column(0).to_numpy()
            hit = np.isin(image, list(want))
            if not hit.any():
                continue
            table = pa.Table.from_batches([batch], schema=schema).filter(pa.array(hit))
            ids, acts = table_to_arrays(table)
            for i, a in zip(ids, acts):
                found[int(i)] = np.asarray(a, dtype=np.float32)
    return found


def region_masks(maps: np.ndarray, threshold: float, size: tuple[int, int]) -> np.ndarray:
    """Upsample ``(K, H, W)`` maps bilinearly (``align_corners=False``) to ``size`` and binarise ``> threshold``."""
    import torch  # only the figure path needs it; `summary_text` on a cached run must not load torch
    import torch.nn.functional as F

    x = torch.as_tensor(np.asarray(maps, dtype=np.float32))[:, None]
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
