"""Attribution in the report: per-unit galleries, per-class panels and the concept-mass table.

Everything is read from the ``attribute`` and ``attribution_mass`` cache entries (raw maps); the display
transforms live here and nowhere else: signed RGB maps (guided backprop, saliency, LRP, …) are shown as
``0.5 + g / (2 max|g|)`` per map, CAM-family maps as ``ReLU`` + bilinear upsampling (``align_corners=False``)
+ per-map scaling to [0, 1] over the image, occlusion and LIME (signed, one value per pixel) on a diverging
colour map symmetric about 0. The unit's activation region is its upsampled map above the unit's
threshold (from the extraction and thresholds entries), as in the exemplar grids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import _figures as F
from ._data import RunData
from ._exemplars import read_image_maps, region_masks
from ._tables import PaperTable

__all__ = ["attribution_figures", "attribution_mass_table", "attribution_tables", "attribution_summary_line"]

log = logging.getLogger("repdissect.reports")

#: units per gallery figure and exemplars shown per unit
GALLERY_UNITS = 6
GALLERY_EXEMPLARS = 2
_SIGNED_SCALAR = {"occlusion", "lime"}
_CAMS = {"grad_cam", "cam"}


def _display(method: str, m: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """``(image, colour map)`` of one raw map for display."""
    import torch
    import torch.nn.functional as TF

    if method in _CAMS:
        t = torch.as_tensor(np.maximum(m, 0), dtype=torch.float32)[None, None]
        up = TF.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        return up / (up.max() or 1.0), "inferno"
    if method in _SIGNED_SCALAR:
        a = m[0] if m.ndim == 3 else m
        return a, "RdBu_r"
    if m.ndim == 3:  # signed RGB input-space map
        peak = float(np.abs(m).max()) or 1.0
        return np.clip(0.5 + np.transpose(m, (1, 2, 0)) / (2 * peak), 0, 1), None
    return m, "inferno"


def _show(ax: Any, method: str, m: np.ndarray, size: tuple[int, int]) -> None:
    img, cmap = _display(method, m, size)
    if cmap == "RdBu_r":
        v = float(np.abs(img).max()) or 1.0
        ax.imshow(img, cmap=cmap, vmin=-v, vmax=v)
    elif cmap:
        ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
    else:
        ax.imshow(img)
    ax.set_xticks([])
    ax.set_yticks([])


def _gallery_units(data: RunData, instance: str, layer: str, exemplars: pd.DataFrame) -> list[int]:
    units = data.node_table("iou", "units", instance=instance, layer=layer)
    present = set(int(u) for u in exemplars["unit"])
    if not units.empty:
        ordered = units.sort_values(["interpretable", "iou", "unit"], ascending=[False, False, True])
        return [int(u) for u in ordered["unit"] if int(u) in present][:GALLERY_UNITS]
    return sorted(present)[:GALLERY_UNITS]


def _unit_gallery(data: RunData, fig_dir: Path, instance: str, layer: str, entry: Any) -> Any:
    from ._plots import FigureResult, safe_name

    key = f"attribution_units_{safe_name(instance)}_{safe_name(layer)}"
    title = f"Attribution gallery: {layer} ({instance})"
    exemplars = entry.table("exemplars").to_pandas()
    unit_maps = entry.table("unit_maps").to_pandas()
    if unit_maps.empty:
        return FigureResult(key, title, skipped="no unit methods configured", group="attribution")
    from ..stages.attribution import maps_from_table  # torch loads only when figures are drawn

    maps = maps_from_table(unit_maps)
    methods = list(dict.fromkeys(unit_maps["method"]))
    units = _gallery_units(data, instance, layer, exemplars)
    chosen = exemplars[exemplars["unit"].isin(units) & (exemplars["rank"] < GALLERY_EXEMPLARS)]
    ids = np.unique(chosen["image"].to_numpy(np.int64))
    batch = data.dataset.load(ids)
    pixels = {int(i): np.transpose(img, (1, 2, 0)) for i, img in zip(batch.index, batch.images)}
    thresholds = data.node_table("thresholds", "thresholds", instance=instance, layer=layer)
    extract = data.entry("extract", instance=instance)
    acts = read_image_maps([str(p) for p in extract.parts(f"activations@{layer}")], ids) if extract else {}
    thr = dict(zip(thresholds.get("unit", []), thresholds.get("threshold", [])))
    info = data.node_table("iou", "units", instance=instance, layer=layer)
    info = info.set_index("unit") if not info.empty else None
    index = {(int(u), int(r), m): i for i, (u, r, m) in enumerate(zip(unit_maps["unit"], unit_maps["rank"],
                                                                        unit_maps["method"]))}
    cols = GALLERY_EXEMPLARS * (1 + len(methods))
    fig, axes = F.new_figure(width=0.95 * cols + 1.2, height=1.0 * len(units) + 0.5, nrows=len(units), ncols=cols,
                             squeeze=False)
    for row, unit in enumerate(units):
        for rank in range(GALLERY_EXEMPLARS):
            hit = chosen[(chosen["unit"] == unit) & (chosen["rank"] == rank)]
            base = rank * (1 + len(methods))
            if hit.empty:
                for c in range(1 + len(methods)):
                    axes[row, base + c].axis("off")
                continue
            image = int(hit["image"].iloc[0])
            px = pixels[image]
            ax = axes[row, base]
            ax.imshow(px)
            if image in acts and unit in thr:
                mask = region_masks(acts[image][unit][None], float(thr[unit]), px.shape[:2])[0]
                ax.contour(mask.astype(float), levels=[0.5], colors="#ffdd00", linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"exemplar {rank + 1}\n+ region", fontsize=6)
            for c, method in enumerate(methods, start=1):
                a = axes[row, base + c]
                _show(a, method, maps[index[(unit, rank, method)]], px.shape[:2])
                if row == 0:
                    a.set_title(method.replace("_", " "), fontsize=6)
        label = f"unit {unit}"
        if info is not None and unit in info.index:
            rec = info.loc[unit]
            label += f"\n{rec['name'] or '–'}\nIoU {float(rec['iou']):.3f}"
        axes[row, 0].set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, title, path=path.name, group="attribution", caption=(
        f"Per unit of {layer} (best IoU first), its top {GALLERY_EXEMPLARS} images by {entry.manifest['params']['reduce']} "
        "activation with the region where the upsampled activation exceeds the unit's threshold (yellow), then "
        f"each method's map for that unit on that image ({', '.join(methods)}). Grad-CAM is taken at "
        f"{entry.extras.get('cam_layer') or '–'}, ReLU'd and upsampled bilinearly; RGB maps are scaled per map."))


def _class_panels(data: RunData, fig_dir: Path, instance: str, layer: str, entry: Any) -> Any:
    from ._plots import FigureResult, safe_name

    key = f"attribution_classes_{safe_name(instance)}_{safe_name(layer)}"
    title = f"Per-class panels ({instance})"
    frame = entry.table("class_maps").to_pandas()
    if frame.empty:
        return FigureResult(key, title, skipped="no class images or class methods", group="attribution")
    from ..stages.attribution import maps_from_table

    maps = maps_from_table(frame)
    methods = list(dict.fromkeys(frame["method"]))
    images = list(dict.fromkeys(int(i) for i in frame["image"]))
    batch = data.dataset.load(np.asarray(sorted(images), np.int64))
    pixels = {int(i): np.transpose(img, (1, 2, 0)) for i, img in zip(batch.index, batch.images)}
    names = list(data.dataset.class_names)
    index = {(int(i), m): k for k, (i, m) in enumerate(zip(frame["image"], frame["method"]))}
    fig, axes = F.new_figure(width=0.95 * (1 + len(methods)) + 1.0, height=0.95 * len(images) + 0.4,
                             nrows=len(images), ncols=1 + len(methods), squeeze=False)
    for row, image in enumerate(images):
        rec = frame.iloc[index[(image, methods[0])]]
        px = pixels[image]
        axes[row, 0].imshow(px)
        axes[row, 0].set_xticks([])
        axes[row, 0].set_yticks([])

        def name(c: int) -> str:
            return names[c] if 0 <= c < len(names) else str(c)

        axes[row, 0].set_ylabel(f"#{image}\nlabel {name(int(rec['label']))}\npred. {name(int(rec['predicted']))}",
                                fontsize=6, rotation=0, ha="right", va="center")
        for c, method in enumerate(methods, start=1):
            _show(axes[row, c], method, maps[index[(image, method)]], px.shape[:2])
            if row == 0:
                axes[row, c].set_title(method.replace("_", " "), fontsize=6)
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    target = data.config.attribution.class_target
    return FigureResult(key, title, path=path.name, group="attribution", caption=(
        f"One image per class (or the configured image list); each method explains the {target} class's logit. "
        f"Grad-CAM at {layer}; occlusion: logit drop when a grey patch covers the pixel (red = important)."))


def attribution_figures(data: RunData, fig_dir: Path) -> list[Any]:
    """Unit gallery and class panels of every ``attribute`` node (skipped ones carry the reason)."""
    from ._plots import FigureResult

    out = []
    fig_dir.mkdir(parents=True, exist_ok=True)
    for label, entry in data.entries("attribute"):
        for build in (_unit_gallery, _class_panels):
            try:
                out.append(build(data, fig_dir, label["instance"], label["layer"], entry))
            except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the run its whole report
                import matplotlib.pyplot as plt

                log.warning("attribution figure of %s %s failed", label["instance"], label["layer"], exc_info=True)
                plt.close("all")
                out.append(FigureResult(f"{build.__name__}_{label['instance']}_{label['layer']}",
                                        "attribution figure", skipped=f"failed: {type(exc).__name__}: {exc}"))
    return out


def attribution_mass_table(data: RunData) -> PaperTable | None:
    """Concept mass per (network, layer): how much of each unit's attribution falls on its IoU-label concept."""
    summary = data.table("attribution_mass", "summary")
    if summary.empty:
        return None
    rows = [[r["instance"], r["layer"], r["method"], int(r["images"]), int(r["units"]), int(r["interpretable_units"]),
             r["mean_mass"], r["mean_area"], r["mean_concentration"], r["interpretable_mean_concentration"]]
            for _, r in summary.iterrows()]
    return PaperTable(
        name="16_attribution_mass", title="Attribution mass inside each unit's concept",
        columns=["Network", "Layer", "Method", "Images", "Units", "Interp.", "Mass", "Area", "Conc.", "Conc. (interp.)"],
        rows=rows,
        caption=("Per unit with a pixel-level IoU label: the mean over images containing the concept of the share of "
                 "the unit's attribution (max over colour of |map|) inside the concept mask (Mass); Area is the mean "
                 "mask share, i.e. what a uniform map would get; Conc. = Mass / Area (> 1: the map prefers the "
                 "concept). Means over units; Interp. = units with IoU above the threshold."),
    )


def attribution_tables(data: RunData) -> list[Any]:
    """The attribution tables as report ``TableResult`` s — none when the run has no attribution stages."""
    from ._paper import TableResult

    if not data.has_stage("attribution_mass"):
        return []
    try:
        table = attribution_mass_table(data)
    except Exception as exc:  # noqa: BLE001 - one broken table must not cost the run its whole report
        log.warning("report table attribution_mass failed", exc_info=True)
        return [TableResult("attribution_mass", None, f"failed: {type(exc).__name__}: {exc}")]
    return [TableResult("attribution_mass", table, "" if table is not None else "no attribution-mass results")]


def attribution_summary_line(data: RunData) -> str | None:
    """One line for the console summary, or None when the run has no concept-mass results."""
    summary = data.table("attribution_mass", "summary")
    if summary.empty:
        return None
    parts = [f"{r['layer']} {r['method']}: mass {r['mean_mass']:.2f} vs area {r['mean_area']:.2f} "
             f"(×{r['mean_concentration']:.2f})" for _, r in summary.iterrows()]
    return "  attribution concept mass: " + "; ".join(parts[:3])
