"""Per-unit cards of the report page: what a unit responds to, from three views side by side.

One card per unit of every trained network (every seed), built only from cache entries:

* top row — the unit's top images by maximum activation (``dataset_search``), the region where its upsampled
  activation exceeds its threshold outlined; nothing is dimmed, unlike the exemplar grids: at card size a
  dimmed part of an object reads as a second, darker object (a triangle's tips outside a conv4 unit's region
  made the triangle look like an oval beside a dark triangle);
* bottom row — guided backprop of the unit on each of those images (the ``attribute`` entry's
  ``unit_maps``: the unit's own spatial maximum explained, shown as ``0.5 + g / (2 s)`` with ``s`` a high
  percentile of ``|g|`` per map), under
  the image it explains; a blank cell where the entry has no map for that image (an exemplar beyond
  ``[attribution].top_k``);
* right — the unit's activation-maximisation image (``activation_max``), spanning both rows, with how far it
  drove the unit (its activation on the image over its maximum on the dataset) in the card's text.

A network or layer without an ``attribute`` or ``activation_max`` entry (``[attribution].seeds``,
``[attribution].layers``, ``[visualise].instances`` choose which have them) gets the parts it has; nothing
is recomputed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = ["UnitViews", "layer_views", "unit_card_image", "card_lines", "CARD_METHOD"]

#: the attribution method shown under the exemplars
CARD_METHOD = "guided_backprop"
_GAP = 3
_BLANK = (236, 238, 241)


@dataclass
class UnitViews:
    """The cached views of one layer of one network: AM images and stats, guided-backprop maps per unit."""

    am: dict[int, np.ndarray] = field(default_factory=dict)  # unit → (H, W, 3) uint8
    am_drive: dict[int, float] = field(default_factory=dict)  # unit → AM activation / dataset max
    gb: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)  # unit → image → (3, H, W) raw map
    gb_top_k: int = 0  # exemplars per unit in the attribute entry


def layer_views(data: Any, instance: str, layer: str) -> UnitViews:
    """The AM images and guided-backprop maps cached for ``(instance, layer)`` (empty parts when not run)."""
    from ..stages import table_images

    views = UnitViews()
    am = data.entry("activation_max", instance=instance, layer=layer)
    if am is not None:
        views.am = table_images(am.frame("images"))
        stats = am.frame("units")
        if "dataset_max" in stats:
            peak = stats["dataset_max"].to_numpy(np.float64)
            drive = np.divide(stats["activation_max"].to_numpy(np.float64), peak, out=np.full(peak.shape, np.nan),
                              where=peak > 0)
            views.am_drive = {int(u): float(d) for u, d in zip(stats["unit"], drive)}
    attr = data.entry("attribute", instance=instance, layer=layer)
    if attr is not None:
        import pyarrow.compute as pc

        table = attr.table("unit_maps")
        table = table.filter(pc.equal(table["method"], CARD_METHOD)) if table.num_rows else table
        if table.num_rows:
            from ..stages.attribution import maps_from_table

            frame = table.to_pandas()
            for u, i, m in zip(frame["unit"], frame["image"], maps_from_table(frame)):
                views.gb.setdefault(int(u), {})[int(i)] = m
            views.gb_top_k = int(frame["rank"].max()) + 1
    return views


def _gb_tile(m: np.ndarray, cell: int) -> Image.Image:
    """A raw ``(3, H, W)`` guided-backprop map as a ``cell``-pixel tile: ``0.5 + g / (2 s)`` clipped to [0, 1],
    ``s`` = the 99.5th percentile of ``|g|`` over the map (its maximum when that is 0).

    Guided backprop concentrates on a few edge pixels; scaled by the maximum the rest of the outline fades
    to grey at card size, so a high percentile sets the scale and the few brightest pixels saturate.
    """
    a = np.abs(m)
    peak = float(np.percentile(a, 99.5)) or float(a.max()) or 1.0
    rgb = np.clip(0.5 + np.transpose(m, (1, 2, 0)) / (2 * peak), 0, 1)
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).resize((cell, cell), Image.Resampling.BILINEAR)


def unit_card_image(strip: Image.Image, images: Sequence[int], am: np.ndarray | None,
                    gb: dict[int, np.ndarray] | None, *, gap: int = 9) -> Image.Image:
    """The card's picture: the exemplar ``strip`` (cells of ``strip.height`` pixels, ``_GAP`` apart), the
    guided-backprop maps of ``images`` (the exemplars' dataset indexes) under it, the AM image on the right.

    Without maps the picture is one row (the strip, then the AM image at the strip's height); without an AM
    image it has no right column.
    """
    cell = strip.height
    rows = 2 if gb else 1
    height = rows * cell + (rows - 1) * _GAP
    am_size = height if am is not None else 0
    width = strip.width + (gap + am_size if am is not None else 0)
    out = Image.new("RGB", (width, height), (255, 255, 255))
    out.paste(strip, (0, 0))
    if gb:
        for k, image in enumerate(images):
            x = k * (cell + _GAP)
            m = gb.get(int(image))
            tile = _gb_tile(m, cell) if m is not None else Image.new("RGB", (cell, cell), _BLANK)
            out.paste(tile, (x, cell + _GAP))
    if am is not None:
        out.paste(Image.fromarray(np.asarray(am, np.uint8)).resize((am_size, am_size), Image.Resampling.NEAREST),
                  (strip.width + gap, 0))
    return out


def card_lines(unit: int, views: UnitViews, images: Sequence[int]) -> list[str]:
    """The card's text lines about its AM image and guided-backprop row (empty when it has neither)."""
    lines = []
    if unit in views.am:
        drive = views.am_drive.get(unit)
        lines.append("right: activation maximisation" + (f", ×{drive:.1f} the dataset maximum"
                                                          if drive is not None and np.isfinite(drive) else ""))
    maps = views.gb.get(unit, {})
    have = sum(int(i) in maps for i in images)
    if have:
        lines.append(f"bottom: guided backprop on {have} of the {len(images)} exemplars")
    return lines
