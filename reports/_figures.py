"""Figure helpers: matplotlib (Agg) plots sized for a paper column, and Pillow exemplar strips for the page.

The constraint: figures must be legible when printed at paper size (≥ 8 pt text at a 3.3–7 inch width)
and must render headless on any worker, so matplotlib runs on the Agg backend with one style set here,
and every helper draws into an ``Axes`` it is given (callers compose panels) or returns a finished
``Figure`` that :func:`save_figure` writes at 150 dpi and closes. Unit galleries for the HTML page need
hundreds of small images, so those are composed with Pillow (no matplotlib figure per unit).

Helpers: :func:`heatmap`, :func:`stacked_bars`, :func:`curves`, :func:`grouped_bars`,
:func:`exemplar_grid` (top images per unit with the thresholded region outlined by a contour),
:func:`exemplar_strip` (the same as one Pillow image), :func:`mask_outline`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg", force=False)

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import ndimage  # noqa: E402

__all__ = [
    "DPI",
    "STYLE",
    "new_figure",
    "save_figure",
    "heatmap",
    "stacked_bars",
    "curves",
    "grouped_bars",
    "exemplar_grid",
    "exemplar_strip",
    "mask_outline",
    "PALETTE",
]

DPI = 150
#: one paper-column width in inches; double-column figures use 2×.
COLUMN_INCHES = 3.4

STYLE: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "figure.titlesize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "savefig.dpi": DPI,
    "figure.dpi": DPI,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.04,
    "image.interpolation": "nearest",
}

#: colour-blind-safe qualitative palette (Okabe–Ito), used for categories and series.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999"]


def new_figure(width: float = COLUMN_INCHES, height: float = 2.4, *, nrows: int = 1, ncols: int = 1,
               **kwargs: Any) -> tuple[Figure, Any]:
    """A figure in the report style: ``(fig, axes)`` as :func:`matplotlib.pyplot.subplots` returns them."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kwargs)
    return fig, axes


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG at :data:`DPI` and close it (figures are never kept open)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with plt.rc_context(STYLE):
        fig.savefig(path, dpi=DPI, format="png", metadata={"Software": None}, pil_kwargs={"compress_level": 4})
    plt.close(fig)
    return path


def _short(text: str, limit: int = 18) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def heatmap(ax: Axes, matrix: np.ndarray, *, xlabels: Sequence[str] | None = None,
            ylabels: Sequence[str] | None = None, title: str = "", xlabel: str = "", ylabel: str = "",
            cmap: str = "viridis", vmin: float | None = None, vmax: float | None = None,
            colorbar_label: str = "", annotate: bool = False, digits: int = 2) -> Any:
    """Draw ``matrix`` (rows × columns) as an image with a colour bar; returns the image artist.

    Tick labels are shown when given and few enough to read (≤ 40); ``annotate`` writes each value
    (for small matrices such as layer × layer CKA). NaN cells are drawn light grey.
    """
    data = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
    image = ax.imshow(data, cmap=colormap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    cbar = ax.figure.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    if colorbar_label:
        cbar.set_label(colorbar_label)
    rows, cols = data.shape
    if xlabels is not None and len(xlabels) <= 40:
        ax.set_xticks(range(cols), [_short(x) for x in xlabels], rotation=45 if cols > 4 else 0,
                      ha="right" if cols > 4 else "center")
    if ylabels is not None and len(ylabels) <= 40:
        ax.set_yticks(range(rows), [_short(y) for y in ylabels])
    if annotate:
        lo = float(np.nanmin(data)) if vmin is None else vmin
        hi = float(np.nanmax(data)) if vmax is None else vmax
        mid = (lo + hi) / 2
        for i in range(rows):
            for j in range(cols):
                value = data[i, j]
                if np.ma.is_masked(value):
                    continue
                ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=7,
                        color="white" if value < mid else "black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def stacked_bars(ax: Axes, groups: Sequence[str], stacks: Sequence[str], means: np.ndarray, *,
                 total_std: np.ndarray | None = None, colors: Sequence[str] | None = None, ylabel: str = "",
                 title: str = "", legend: bool = True) -> None:
    """Stacked bars: one bar per group (e.g. layer), one segment per stack (e.g. concept category).

    Args:
        groups: ``G`` bar labels.
        stacks: ``S`` segment names (legend entries).
        means: ``(G, S)`` segment heights (means over seeds).
        total_std: ``(G,)`` spread of the bar total over seeds, drawn as an error bar on top; NaN = none.
    """
    means = np.nan_to_num(np.asarray(means, dtype=float).reshape(len(groups), len(stacks)))
    colors = list(colors or PALETTE)
    x = np.arange(len(groups))
    bottom = np.zeros(len(groups))
    for s, name in enumerate(stacks):
        ax.bar(x, means[:, s], bottom=bottom, width=0.65, label=str(name), color=colors[s % len(colors)],
               edgecolor="white", linewidth=0.5)
        bottom += means[:, s]
    top = float(bottom.max()) if len(bottom) else 0.0
    if total_std is not None:
        err = np.asarray(total_std, dtype=float)
        ok = np.isfinite(err) & (err > 0)  # a zero spread would draw a stray cap
        if ok.any():
            ax.errorbar(x[ok], bottom[ok], yerr=err[ok], fmt="none", ecolor="black", elinewidth=0.8, capsize=2.5)
            top = max(top, float((bottom[ok] + err[ok]).max()))
    ax.set_xticks(x, [_short(g) for g in groups])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # Shared y axes keep the largest limit, so every panel's error bars stay inside.
    ax.set_ylim(0, max(top * 1.08, ax.get_ylim()[1], 1.0))
    if legend and len(stacks):
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def curves(ax: Axes, series: Sequence[Mapping[str, Any]], *, xlabel: str = "", ylabel: str = "", title: str = "",
           ylim: tuple[float, float] | None = None, legend: bool = True, logx: bool = False) -> None:
    """Line plots with optional shaded bands.

    Each series is a mapping with ``x``, ``y`` (equal-length arrays), ``label`` and optionally ``band``
    (half-width of a shaded band, e.g. the std over seed pairs), ``color``, ``linestyle``, ``marker``.
    """
    for i, s in enumerate(series):
        x = np.asarray(s["x"], dtype=float)
        y = np.asarray(s["y"], dtype=float)
        color = s.get("color", PALETTE[i % len(PALETTE)])
        ax.plot(x, y, label=s.get("label"), color=color, linestyle=s.get("linestyle", "-"),
                marker=s.get("marker"), markersize=3, linewidth=1.2)
        band = s.get("band")
        if band is not None:
            band = np.nan_to_num(np.asarray(band, dtype=float))
            ax.fill_between(x, y - band, y + band, color=color, alpha=0.2, linewidth=0)
    if logx:
        ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if legend and any(s.get("label") for s in series):
        ax.legend(frameon=False)


def grouped_bars(ax: Axes, groups: Sequence[str], series: Sequence[str], means: np.ndarray, *,
                 stds: np.ndarray | None = None, colors: Sequence[str] | None = None, ylabel: str = "",
                 title: str = "", hatches: Sequence[str | None] | None = None, legend: bool = True,
                 ylim: tuple[float, float] | None = None) -> None:
    """Grouped bars: ``G`` groups on the x axis, ``S`` side-by-side bars per group with error bars.

    Args:
        means: ``(G, S)``; NaN bars are left out.
        stds: ``(G, S)`` error-bar half-widths (NaN = none).
    """
    means = np.asarray(means, dtype=float).reshape(len(groups), len(series))
    stds = None if stds is None else np.asarray(stds, dtype=float).reshape(means.shape)
    colors = list(colors or PALETTE)
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for s, name in enumerate(series):
        offs = x - 0.4 + width * (s + 0.5)
        ok = np.isfinite(means[:, s])
        err = None
        if stds is not None:
            err = np.where(np.isfinite(stds[:, s]), stds[:, s], 0.0)[ok]
        ax.bar(offs[ok], means[ok, s], width=width * 0.92, label=str(name), color=colors[s % len(colors)],
               yerr=err, capsize=2, error_kw={"elinewidth": 0.8},
               hatch=(hatches[s] if hatches else None), edgecolor="white" if not hatches else "black",
               linewidth=0.4)
    ax.set_xticks(x, [_short(g) for g in groups])
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if legend and len(series) > 1:
        ax.legend(frameon=False, ncols=min(len(series), 3), loc="lower center", bbox_to_anchor=(0.5, 1.0))


def mask_outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boolean edge of ``mask`` (pixels inside the mask that touch the outside), ``width`` pixels thick."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return np.zeros_like(mask)
    eroded = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~eroded


def exemplar_grid(images: Sequence[Sequence[np.ndarray]], masks: Sequence[Sequence[np.ndarray]], *,
                  row_labels: Sequence[str], col_labels: Sequence[Sequence[str]] | None = None,
                  title: str = "", cell_inches: float = 0.9, dim: float = 0.45,
                  outline_color: str = "#ffdd00") -> Figure:
    """The "dataset search" view: per row a unit, per column one of its top images with the region outlined.

    Args:
        images: ``R`` rows of ``K`` RGB ``uint8`` arrays ``(H, W, 3)`` (rows may be shorter than K).
        masks: matching boolean ``(H, W)`` arrays — the unit's thresholded activation, upsampled.
        row_labels: ``R`` row titles (unit, label, IoU), printed left of each row.
        col_labels: optional per-image captions (e.g. the activation value).
        dim: brightness of pixels outside the region (1 = no dimming), so the region stands out even
            where the contour is hard to see.

    Returns:
        The finished figure (save with :func:`save_figure`).
    """
    rows = len(images)
    cols = max((len(r) for r in images), default=1) or 1
    label_inches = 1.5
    fig = plt.figure(figsize=(label_inches + cols * cell_inches, 0.25 + rows * cell_inches * 1.02))
    with plt.rc_context(STYLE):
        grid = fig.add_gridspec(rows, cols, left=label_inches / (label_inches + cols * cell_inches), right=0.995,
                                top=1 - 0.25 / (0.25 + rows * cell_inches * 1.02), bottom=0.01, wspace=0.04,
                                hspace=0.08 if not col_labels else 0.28)
        for r in range(rows):
            for c in range(cols):
                ax = fig.add_subplot(grid[r, c])
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c >= len(images[r]):
                    ax.axis("off")
                    continue
                image = np.asarray(images[r][c])
                mask = np.asarray(masks[r][c], dtype=bool)
                shown = image.astype(np.float32) / 255.0
                if mask.any() and dim < 1:
                    shown = np.where(mask[..., None], shown, shown * dim)
                ax.imshow(shown, interpolation="bilinear")
                if mask.any() and not mask.all():
                    # A dark halo under the bright line keeps the outline visible on light and dark images.
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=["black"], linewidths=1.3)
                    ax.contour(mask.astype(np.float32), levels=[0.5], colors=[outline_color], linewidths=0.6)
                if col_labels is not None and c < len(col_labels[r]):
                    ax.set_title(col_labels[r][c], fontsize=6, pad=1.5)
                if c == 0:
                    ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=7, labelpad=4)
        if title:
            fig.suptitle(title, fontsize=9, x=0.5, y=0.998, va="top")
    return fig


def exemplar_strip(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *, cell: int = 96, gap: int = 3,
                   dim: float = 0.45, outline: tuple[int, int, int] = (255, 221, 0)) -> Image.Image:
    """One unit's top images side by side, outside-region dimmed and the region edge drawn (Pillow).

    Args:
        images: ``K`` RGB ``uint8`` arrays ``(H, W, 3)``.
        masks: ``K`` boolean ``(H, W)`` regions (same size as the image).
        cell: output size of each square tile in pixels.

    Returns:
        An RGB image ``(cell, K·cell + (K−1)·gap)``.
    """
    k = max(len(images), 1)
    strip = Image.new("RGB", (k * cell + (k - 1) * gap, cell), (255, 255, 255))
    for i, (image, mask) in enumerate(zip(images, masks)):
        tile = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((cell, cell), Image.Resampling.BILINEAR)
        m = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((cell, cell), Image.Resampling.BILINEAR)
        region = np.asarray(m) >= 128
        pixels = np.asarray(tile, dtype=np.float32)
        if region.any() and dim < 1:
            pixels = np.where(region[..., None], pixels, pixels * dim)
        width = max(1, cell // 48)
        edge = mask_outline(region, width=width)
        # Dark ring just outside the bright edge, for contrast on light images.
        halo = ndimage.binary_dilation(region, iterations=width) & ~region
        pixels[halo] = (0, 0, 0)
        pixels[edge] = outline
        strip.paste(Image.fromarray(pixels.astype(np.uint8)), (i * (cell + gap), 0))
    return strip


def grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    """Rows and columns of a panel grid for ``n`` panels."""
    cols = min(max_cols, max(n, 1))
    return int(math.ceil(max(n, 1) / cols)), cols
