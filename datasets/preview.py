"""Contact sheets: a grid of dataset items with their masks and landmarks drawn over them.

The point is a human check that labels sit where the pixels are, for any dataset kind: each tile shows the
image and, next to it, the same image greyed with one pixel category painted in colour (``part`` when
there is one, else ``object``, else the first pixel category), the outline of every ``object`` region in
white, and the landmarks (filled dot = visible, cross = invisible). The caption gives the class and the
whole-image labels; a legend at the bottom names the colours. Pure Pillow + numpy, nearest-neighbour
upscaling so single pixels stay visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._base import ConceptDataset, DatasetError

__all__ = ["contact_sheet", "overlay_category"]

_LANDMARK_COLORS = [(255, 40, 40), (40, 220, 255), (255, 220, 0), (60, 255, 60), (255, 80, 255), (255, 150, 0)]
_MIN_PANEL = 128  # px: smaller images are upscaled to at least this


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def overlay_category(dataset: ConceptDataset) -> str | None:
    """The pixel category painted in the overlay panel (``part`` > ``object`` > first pixel category)."""
    pixel = [c for c in dataset.categories if any(k.category == c and k.pixel_level for k in dataset.concepts)]
    for preferred in ("part", "object"):
        if preferred in pixel:
            return preferred
    return pixel[0] if pixel else None


def _label_colors(labels: list[int]) -> dict[int, tuple[int, int, int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: tuple(int(255 * x) for x in cmap(i % cmap.N)[:3]) for i, label in enumerate(labels)}


def _upscale(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer map (h, w) to ``shape``."""
    rows = (np.arange(shape[0]) * labels.shape[0]) // shape[0]
    cols = (np.arange(shape[1]) * labels.shape[1]) // shape[1]
    return labels[rows[:, None], cols[None, :]]


def contact_sheet(
    dataset: ConceptDataset,
    out_png: Path | str,
    n: int = 24,
    *,
    columns: int | None = None,
    scale: int | None = None,
    indices: np.ndarray | None = None,
) -> Path:
    """Write a PNG grid of ``n`` items (image | overlay) with captions and a legend; returns its path.

    Args:
        dataset: any :class:`ConceptDataset`.
        out_png: output file (parent folders are created).
        n: number of items (the first ``n`` indexes unless ``indices`` is given).
        columns: tiles per row (default: about square).
        scale: integer upscaling of each panel (default: enough for ``_MIN_PANEL`` pixels).
        indices: explicit item indexes to show.

    Returns:
        The path of the written PNG.
    """
    if indices is None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise DatasetError(f"preview: n={n!r} is invalid; use a positive number of images")
        indices = np.arange(min(n, len(dataset)), dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise DatasetError("preview: the dataset is empty; nothing to draw")
    batch = dataset.load(indices)
    height, width = dataset.image_size
    scale = scale or max(1, -(-_MIN_PANEL // max(height, width)))
    panel_h, panel_w = height * scale, width * scale
    columns = columns or int(np.ceil(np.sqrt(indices.size / 2)))  # tiles are two panels wide
    rows = -(-indices.size // columns)
    caption_h, gap = 18, 6
    tile_w, tile_h = 2 * panel_w + gap, panel_h + caption_h
    font = _font(12)

    concepts = {c.label: c for c in dataset.concepts}
    category = overlay_category(dataset)
    category_labels = [c.label for c in dataset.concepts if c.category == category]
    colors = _label_colors(category_labels)
    color_lut = np.zeros((max(concepts, default=0) + 1, 3), dtype=np.float32)
    for label, rgb in colors.items():
        color_lut[label] = rgb

    legend_items: list[tuple[tuple[int, int, int], str]] = [(colors[k], concepts[k].name) for k in category_labels]
    legend_items += [
        (_LANDMARK_COLORS[i % len(_LANDMARK_COLORS)], f"landmark {name}")
        for i, name in enumerate(dataset.landmark_names)
    ]
    sheet_w = columns * (tile_w + gap) + gap
    per_row = max(1, (sheet_w - gap) // 120)
    legend_rows = -(-len(legend_items) // per_row) if legend_items else 0
    legend_h = 22 * legend_rows + (28 if legend_items else 0)
    sheet = Image.new("RGB", (sheet_w, rows * (tile_h + gap) + gap + legend_h), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)

    for k in range(indices.size):
        image = batch.images[k].transpose(1, 2, 0)
        grey = image.astype(np.float32).mean(axis=2, keepdims=True) * 0.45
        overlay = np.repeat(grey, 3, axis=2)
        if category is not None and category in batch.pixel_labels:
            top = np.zeros(batch.pixel_labels[category].shape[2:], dtype=np.int64)
            for layer in batch.pixel_labels[category][k]:  # later layers (e.g. corners over rim/core) win
                top = np.where(layer > 0, layer, top)
            top = np.clip(_upscale(top, (height, width)), 0, len(color_lut) - 1)
            painted = top > 0
            overlay[painted] = 0.3 * overlay[painted] + 0.7 * color_lut[top[painted]]
        if "object" in batch.pixel_labels:
            obj = _upscale(batch.pixel_labels["object"][k, 0], (height, width))
            edge = np.zeros(obj.shape, dtype=bool)
            edge[:-1] |= obj[:-1] != obj[1:]
            edge[1:] |= obj[:-1] != obj[1:]
            edge[:, :-1] |= obj[:, :-1] != obj[:, 1:]
            edge[:, 1:] |= obj[:, :-1] != obj[:, 1:]
            overlay[edge & (obj > 0)] = 255
        left = Image.fromarray(image).resize((panel_w, panel_h), Image.Resampling.NEAREST)
        right = Image.fromarray(np.clip(overlay, 0, 255).astype(np.uint8))
        right = right.resize((panel_w, panel_h), Image.Resampling.NEAREST)
        x0 = gap + (k % columns) * (tile_w + gap)
        y0 = gap + (k // columns) * (tile_h + gap)
        sheet.paste(left, (x0, y0))
        sheet.paste(right, (x0 + panel_w + gap, y0))
        if batch.landmarks is not None:
            radius = max(2, scale + 1)
            for p, (x, y) in enumerate(batch.landmarks[k]):
                cx, cy = x0 + panel_w + gap + x * scale, y0 + y * scale
                color = _LANDMARK_COLORS[p % len(_LANDMARK_COLORS)]
                if not (0 <= x < width and 0 <= y < height):
                    continue
                if batch.landmark_visible is not None and batch.landmark_visible[k, p]:
                    draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=color, outline=(0, 0, 0))
                else:
                    draw.line([cx - radius, cy - radius, cx + radius, cy + radius], fill=color, width=2)
                    draw.line([cx - radius, cy + radius, cx + radius, cy - radius], fill=color, width=2)
        words = [f"#{int(batch.index[k])}"]
        if batch.class_label is not None and dataset.class_names and batch.class_label[k] >= 0:
            words.append(dataset.class_names[int(batch.class_label[k])])
        for labels in batch.image_labels.values():
            words += [concepts[int(v)].name if int(v) in concepts else str(int(v)) for v in labels[k] if v > 0]
        draw.text((x0, y0 + panel_h + 3), " ".join(words), fill=(230, 230, 230), font=font)

    if legend_items:
        y = rows * (tile_h + gap) + gap + 4
        title = f"overlay: {category}" if category else "landmarks"
        draw.text((gap, y), f"{title}  (landmark dot = visible, cross = hidden)", fill=(230, 230, 230), font=font)
        for i, (rgb, name) in enumerate(legend_items):
            lx, ly = gap + (i % per_row) * 120, y + 22 + 22 * (i // per_row)
            draw.rectangle([lx, ly, lx + 14, ly + 14], fill=rgb)
            draw.text((lx + 20, ly), name, fill=(230, 230, 230), font=font)

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
