"""The paper figures, each drawn from cached stage tables (and, for exemplars, cached activations).

The constraint: figures are read at paper size, so each is laid out for a 3.4 in (one column) or 7 in
(two columns) width with ≥ 8 pt text, and each one says in its caption what is averaged and what the
error bars are. Like the tables, figures never recompute a statistic; a figure whose inputs are absent is
skipped with the reason.

Figures (file stems under ``<out>/figures/``): ``correlation_<model>`` (between-seed correlation matrix
before/after sorting by the Hungarian matching), ``detectors`` (unique detectors per category per layer,
stacked, with seed spread), ``svcca_curves``, ``cka_layers`` (layer × layer linear CKA), ``regression_curves``
(held-out loss against channels used per L1 strength), ``location_instability``,
``concept_agreement``, ``exemplars_<instance>_<layer>`` (top units' top images with regions outlined).
"""

from __future__ import annotations

import logging
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
import pandas as pd

from . import _category
from . import _figures as F
from ._data import RunData
from ._exemplars import layer_exemplars, search_exemplars
from ._unitcards import card_lines, layer_views, unit_card_image
from ._visualise import visualise_figures
from ._paper import KIND_TITLE, PAIR_KINDS, _samples, concept_agreement_rows, stability_summary

__all__ = ["FigureResult", "build_figures", "safe_name", "exemplar_units", "layer_exemplar_figure", "EXEMPLAR_K",
           "GRID_UNITS"]

log = logging.getLogger("repdissect.reports")

#: top images per unit in exemplar grids and galleries
EXEMPLAR_K = 5
#: units per layer in the exemplar-grid figure
GRID_UNITS = 6


@dataclass
class FigureResult:
    """A written figure (path relative to the output folder) or the reason it was skipped."""

    key: str
    title: str
    path: str | None = None
    caption: str = ""
    skipped: str = ""
    group: str = "figures"


def safe_name(text: str) -> str:
    """A file-name-safe version of a layer or instance name (``cnn@s0`` → ``cnn_s0``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("._") or "x"


# ------------------------------------------------------------------------------- correlation matrix
def _corr_matrix(frame: pd.DataFrame) -> np.ndarray:
    ca = int(frame["unit_a"].max()) + 1
    cb = int(frame["unit_b"].max()) + 1
    mat = np.full((ca, cb), np.nan)
    mat[frame["unit_a"].to_numpy(), frame["unit_b"].to_numpy()] = frame["corr"].to_numpy()
    return mat


def matching_order(n_a: int, n_b: int, matches: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Row and column orders that put Hungarian-matched pairs on the diagonal, best correlation first.

    Unmatched units (dead ones, or the surplus of the larger side) follow in index order.
    """
    m = matches.sort_values(["corr", "unit_a"], ascending=[False, True])
    rows = list(m["unit_a"].astype(int))
    cols = list(m["unit_b"].astype(int))
    rows += [u for u in range(n_a) if u not in set(rows)]
    cols += [u for u in range(n_b) if u not in set(cols)]
    return np.asarray(rows), np.asarray(cols)


def correlation_figures(data: RunData, fig_dir: Path) -> list[FigureResult]:
    out = []
    for model, layers in data.models:
        pairs = data.seed_pairs(model)
        key = f"correlation_{safe_name(model)}"
        if not pairs:
            out.append(FigureResult(key, "Correlation matrices", skipped="needs at least two trained seeds"))
            continue
        a, b = pairs[0]
        panels = []
        for layer in layers:
            corr = data.node_table("compare", "correlation", a=a, b=b, layer=layer)
            matches = data.node_table("compare", "matches", a=a, b=b, layer=layer)
            if corr.empty or matches.empty:
                continue
            mat = _corr_matrix(corr)
            rows, cols = matching_order(mat.shape[0], mat.shape[1], matches[matches.method == "hungarian"])
            panels.append((layer, mat, mat[np.ix_(rows, cols)]))
        if not panels:
            out.append(FigureResult(key, "Correlation matrices", skipped="no correlation tables cached"))
            continue
        n = len(panels)
        width = min(7.0, 1.75 * n + 1.0)
        panel = (width - 1.0) / n
        fig, axes = F.new_figure(width, 2 * panel + 0.8, nrows=2, ncols=n, squeeze=False)
        image = None
        for j, (layer, before, after) in enumerate(panels):
            for i, (mat, what) in enumerate(((before, "unsorted"), (after, "sorted by matching"))):
                ax = axes[i, j]
                image = ax.imshow(mat, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="equal")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{layer}\n{mat.shape[0]}×{mat.shape[1]} units", fontsize=8)
                if j == 0:
                    ax.set_ylabel(f"{what}\nunits of {a}")
                if i == 1:
                    ax.set_xlabel(f"units of {b}")
        fig.colorbar(image, ax=axes, shrink=0.8, label="correlation", fraction=0.04, pad=0.02)
        path = fig_dir / f"{key}.png"
        F.save_figure(fig, path)
        out.append(FigureResult(
            key, f"Between-seed correlation matrices ({model})", path=path.name,
            caption=(f"Correlation of every unit of {a} (rows) with every unit of {b} (columns), per layer. Top: "
                     "original unit order. Bottom: rows ordered by matched correlation (highest first) and columns "
                     "by each row's Hungarian partner, so matched pairs lie on the diagonal (Li et al. 2016).")))
    return out


# ------------------------------------------------------------------------------------- detectors
def detectors_figure(data: RunData, fig_dir: Path) -> FigureResult:
    key = "detectors"
    summary = data.table("iou", "summary")
    if summary.empty:
        return FigureResult(key, "Unique detectors", skipped="no IoU results in this run")
    fig = _category.category_bars(data, summary, "unique_detectors_", "unique_detectors_total", "unique detectors")
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Unique detectors per concept category", path=path.name,
                        caption=("Number of distinct concepts detected by interpretable units (IoU > "
                                 f"{data.iou_threshold:g}) per layer, stacked by concept category; bar heights are "
                                 "means over seeds, error bars the standard deviation of the total over seeds."))


# ----------------------------------------------------------------------------------------- SVCCA
def _mean_curve(curves: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    length = max(len(c) for c in curves)
    stack = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        stack[i, : len(c)] = c
    counts = np.isfinite(stack).sum(axis=0)
    keep = counts > 0
    mean = np.nanmean(stack[:, keep], axis=0)
    std = np.zeros_like(mean)
    multi = counts[keep] > 1
    if multi.any():
        std[multi] = np.nanstd(stack[:, keep][:, multi], axis=0, ddof=1)
    return np.arange(1, keep.sum() + 1), mean, std


def svcca_figure(data: RunData, fig_dir: Path) -> FigureResult:
    key = "svcca_curves"
    svcca = data.table("compare", "svcca")
    if svcca.empty:
        return FigureResult(key, "SVCCA coefficients", skipped="no SVCCA results in this run")
    layers = [(m, l) for m, l in data.model_layers() if ((svcca.model == m) & (svcca.layer == l)).any()]
    rows, cols = F.grid_shape(len(layers), 4)
    fig, axes = F.new_figure(min(7.0, 1.9 * cols + 0.4), 1.9 * rows + 0.3, nrows=rows, ncols=cols, squeeze=False,
                             sharey=True)
    for idx, (model, layer) in enumerate(layers):
        ax = axes[idx // cols, idx % cols]
        series = []
        for kind, style, color in (("seed", "-", F.PALETTE[0]), ("unrelated", "--", F.PALETTE[5]),
                                   ("random_pair", ":", F.PALETTE[8]), ("drift", "-.", F.PALETTE[3])):
            sub = svcca[(svcca.model == model) & (svcca.layer == layer) & (svcca.kind == kind)]
            curves = [g.sort_values("index")["corr"].to_numpy() for _, g in sub.groupby(["a", "b"], sort=False)]
            if not curves:
                continue
            x, mean, std = _mean_curve(curves)
            series.append({"x": x, "y": mean, "band": std, "label": KIND_TITLE[kind],
                           "linestyle": style, "color": color})
        F.curves(ax, series, xlabel="SVCCA direction", ylabel="canonical corr." if idx % cols == 0 else "",
                 title=data.layer_title(model, layer), ylim=(0, 1.02), legend=False)
    for idx in range(len(layers), rows * cols):
        axes[idx // cols, idx % cols].axis("off")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        # Four entries in one row are wider than three panels: two rows keep the panels at full size.
        fig.legend(handles, labels, loc="outside upper center", ncols=len(handles) if cols >= 4 else 2,
                   frameon=False)
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "SVCCA coefficient curves", path=path.name,
                        caption=("Canonical correlations of the SVD-reduced subspaces, sorted from highest to lowest, "
                                 "per layer. Solid: mean over trained seed pairs; dashed: each trained network "
                                 "against another seed's untrained network (the null); dotted: two untrained "
                                 "networks; dash-dot: each trained network against its own initialisation "
                                 f"(training drift, not a null). Bands: ± std over pairs. Samples: {_samples(data)}."))


# ------------------------------------------------------------------------------------ regression
def regression_figure(data: RunData, fig_dir: Path) -> FigureResult:
    key = "regression_curves"
    reg = data.table("compare", "regression")
    if reg.empty:
        return FigureResult(key, "Sparse prediction", skipped="no regression results in this run")
    layers = [(m, l) for m, l in data.model_layers() if ((reg.model == m) & (reg.layer == l)).any()]
    fig, ax = F.new_figure(F.COLUMN_INCHES + 0.6, 2.5)
    for idx, (model, layer) in enumerate(layers):
        color = F.PALETTE[idx % len(F.PALETTE)]
        for kind, style in (("seed", "-"), ("unrelated", ":")):
            sub = reg[(reg.model == model) & (reg.layer == layer) & (reg.kind == kind)]
            if sub.empty:
                continue
            # Per pair and α the two directions averaged, then the mean over pairs (as table 5).
            per_pair = sub.groupby(["a", "b", "alpha"], as_index=False)[["heldout_loss", "mean_nonzero"]].mean()
            curve = per_pair.groupby("alpha")[["heldout_loss", "mean_nonzero"]].mean().sort_index()
            ax.plot(curve["mean_nonzero"], curve["heldout_loss"], linestyle=style, marker="o", markersize=3,
                    color=color, linewidth=1.2,
                    label=data.layer_title(model, layer) if kind == "seed" else None)
    ax.plot([], [], linestyle=":", color="black", label="vs unrelated random init")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("input channels used per target")
    ax.set_ylabel("held-out loss")
    ax.set_ylim(bottom=0)
    # Inside the axes where the curves leave room: a legend beside them took half the figure's width.
    ax.legend(frameon=False, loc="best", ncols=2)
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Sparse prediction: loss against channels used", path=path.name,
                        caption=("Predicting each channel of one network from the other's channels at the same layer: "
                                 "held-out loss (1 = no information) against the mean number of input channels with "
                                 "non-zero weight, one point per L1 strength α (Li et al. 2016). Solid: trained seed "
                                 "pairs (mean over pairs and both directions); dotted: a trained network vs another "
                                 f"seed's untrained network (the null). Samples: {_samples(data)}."))


# ------------------------------------------------------------------------------------------- CKA
CKA_COLUMNS = ("layer_a", "layer_b", "linear_cka")


def cka_panels(data: RunData) -> list[tuple[str, str, list[str], np.ndarray, int]]:
    """``(model, kind, layers, mean layer × layer CKA matrix, number of pairs)`` per model and pair kind."""
    cka = data.table("cka", "cka")
    if cka.empty or not set(CKA_COLUMNS) <= set(cka.columns):
        return []
    kinds = [k for k in PAIR_KINDS if (cka.kind == k).any()]
    panels = []
    for model, layers in data.models:
        for kind in kinds:
            sub = cka[(cka.model == model) & (cka.kind == kind)]
            if sub.empty:
                continue
            mean = sub.groupby(["layer_a", "layer_b"])["linear_cka"].mean()
            mat = np.full((len(layers), len(layers)), np.nan)
            for i, la in enumerate(layers):
                for j, lb in enumerate(layers):
                    if (la, lb) in mean.index:
                        mat[i, j] = mean[(la, lb)]
            n = sub.groupby(["a", "b"]).ngroups
            panels.append((model, kind, layers, mat, n))
    return panels


def cka_figure(data: RunData, fig_dir: Path) -> FigureResult:
    key = "cka_layers"
    panels = cka_panels(data)
    if not panels:
        return FigureResult(key, "Layer × layer CKA", skipped="no layer × layer CKA results in this run")
    # Two panels per row with wrapped titles: four side by side (seeds, unrelated, random pair, drift) overlapped
    # their titles and layer names.
    rows, cols = F.grid_shape(len(panels), 2)
    fig, axes = F.new_figure(3.3 * cols + 0.4, 2.9 * rows, nrows=rows, ncols=cols, squeeze=False)
    for j, (model, kind, layers, mat, n) in enumerate(panels):
        title = KIND_TITLE[kind]
        if data.multi_model:
            title = f"{model}: {title}"
        last_row = j // cols == rows - 1 or j + cols >= len(panels)
        F.heatmap(axes[j // cols, j % cols], mat, xlabels=layers, ylabels=layers, vmin=0, vmax=1,
                  annotate=len(layers) <= 8, title="\n".join(textwrap.wrap(f"{title} (n={n})", 30)),
                  xlabel="layer of network b" if last_row else "",
                  ylabel="layer of network a" if j % cols == 0 else "",
                  colorbar_label="linear CKA" if j % cols == cols - 1 else "")
    for j in range(len(panels), rows * cols):
        axes[j // cols, j % cols].axis("off")
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Layer × layer linear CKA", path=path.name,
                        caption=("Linear CKA between every layer of one network (rows) and every layer of the other "
                                 "(columns), averaged over network pairs; a bright diagonal means corresponding "
                                 "layers are most similar (Kornblith et al. 2019). Samples: one per image, spatially "
                                 "averaged (pooled), whatever [compare].samples says — so the diagonal differs from "
                                 "the CKA of the similarity table when that uses positions."))


# ------------------------------------------------------------------------------- location instability
def instability_figure(data: RunData, fig_dir: Path) -> FigureResult:
    key = "location_instability"
    summary = stability_summary(data)
    if summary.empty:
        return FigureResult(key, "Location instability", skipped="no location-stability results in this run")
    center = data.table("stability_center", "summary")
    groups = [data.layer_title(m, l) for m, l in data.model_layers()]
    roles = ["trained", "random"]
    means = np.full((len(groups), 2), np.nan)
    stds = np.full((len(groups), 2), np.nan)
    for g, (model, layer) in enumerate(data.model_layers()):
        for r, role in enumerate(roles):
            vals = summary[(summary.model == model) & (summary.layer == layer) & (summary.role == role)]["instability"]
            if len(vals):
                means[g, r] = vals.mean()
                stds[g, r] = vals.std(ddof=1) if len(vals) > 1 else np.nan
    fig, ax = F.new_figure(F.COLUMN_INCHES, 2.4)
    F.grouped_bars(ax, groups, ["trained", "random init"], means, stds=stds, ylabel="location instability",
                   colors=[F.PALETTE[0], F.PALETTE[8]])
    if not center.empty:
        value = float(center["instability"].iloc[0])
        ax.axhline(value, color=F.PALETTE[5], linestyle="--", linewidth=1.0, label="image centre")
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, handlelength=1.5,
              columnspacing=1.0)
    top = np.nanmax(np.r_[means.ravel() + np.nan_to_num(stds.ravel()),
                          [float(center["instability"].iloc[0])] if not center.empty else []])
    ax.set_ylim(0, top * 1.15 if np.isfinite(top) and top > 0 else 1)
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Location instability vs baselines", path=path.name,
                        caption=("Location instability per layer (lower = units fire at a more consistent place "
                                 "relative to the object's landmarks): trained networks, the same networks before "
                                 "training, and a predictor that always points at the image centre (dashed). "
                                 "Bars: mean over seeds; error bars: std."))


# ------------------------------------------------------------------------------- concept agreement
def agreement_figure(data: RunData, fig_dir: Path) -> FigureResult:
    key = "concept_agreement"
    rows = concept_agreement_rows(data)
    if rows.empty:
        return FigureResult(key, "Concept agreement", skipped="needs both comparisons and IoU results")
    rows = rows[rows.kind == "seed"]
    layer_keys = list(data.model_layers())
    groups = [data.layer_title(m, l) for m, l in layer_keys]
    same = np.full(len(groups), np.nan)
    same_std = np.full(len(groups), np.nan)
    chance = np.full(len(groups), np.nan)
    pairs = np.zeros(len(groups))
    for g, (model, layer) in enumerate(layer_keys):
        sub = rows[(rows.model == model) & (rows.layer == layer)]
        pairs[g] = sub["pairs"].sum()
        vals = sub["same"].dropna()
        if len(vals):
            same[g] = vals.mean()
            same_std[g] = vals.std(ddof=1) if len(vals) > 1 else np.nan
            chance[g] = sub["chance"].dropna().mean()
    if rows.empty:
        return FigureResult(key, "Concept agreement", skipped="no pairs of trained seeds")
    fig, ax = F.new_figure(F.COLUMN_INCHES, 2.3)
    x = np.arange(len(groups))
    ok = np.isfinite(same)
    ax.bar(x[ok], same[ok], width=0.6, color=F.PALETTE[2], label="same label",
           yerr=np.nan_to_num(same_std[ok]), capsize=2, error_kw={"elinewidth": 0.8})
    ax.hlines(chance[ok], x[ok] - 0.36, x[ok] + 0.36, colors="black", linestyles="--", linewidth=1.2,
              label="chance")
    for g in range(len(groups)):
        n = int(pairs[g])
        text = f"{n} unit pair{'s' if n != 1 else ''}" if ok[g] else "no interpretable\nmatched pairs"
        y = (same[g] + np.nan_to_num(same_std[g])) if ok[g] else 0.0
        ax.text(x[g], y + 0.03, text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, groups)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction of matched pairs")
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i] != "same label")
    ax.legend([handles[i] for i in order], [labels[i] for i in order], frameon=False, loc="lower center",
              bbox_to_anchor=(0.5, 1.0), ncols=2)
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Concept agreement of matched units", path=path.name,
                        caption=("Among Hungarian-matched pairs of interpretable units of two trained seeds, the "
                                 "fraction with the same concept label (bars: mean ± std over seed pairs) against "
                                 "the fraction expected by chance from the label frequencies (dashed); the label "
                                 "above each bar is the number of such unit pairs summed over seed pairs."))


# ------------------------------------------------------------------------------------- exemplars
def exemplar_units(units: pd.DataFrame, limit: int | None) -> pd.DataFrame:
    """A layer's units for display: interpretable first, by IoU (highest first), then by unit number."""
    ordered = units.sort_values(["interpretable", "iou", "unit"], ascending=[False, False, True])
    return ordered if limit is None else ordered.head(limit)


def exemplar_figures(data: RunData, fig_dir: Path, *, k: int = EXEMPLAR_K, grid_units: int = GRID_UNITS,
                     gallery_units: int | None = 48, gallery_dir: Path | None = None,
                     ) -> tuple[list[FigureResult], dict[tuple[str, str], list[dict[str, Any]]]]:
    """Exemplar grids (figures) for the first trained network of each model, gallery strips (page) for every
    trained network (every seed).

    Returns:
        ``(figures, galleries)`` where ``galleries[(instance, layer)]`` lists cards
        ``{unit, label, category, iou, interpretable, image (path), values}`` in display order.
    """
    figures: list[FigureResult] = []
    galleries: dict[tuple[str, str], list[dict[str, Any]]] = {}
    units_all = data.table("iou", "units")
    if units_all.empty:
        return [FigureResult("exemplars", "Unit exemplars", skipped="no IoU results in this run")], galleries
    for model, layers in data.models:
        trained = data.trained(model)
        if not trained:
            continue
        for position, inst in enumerate(trained if gallery_dir is not None else trained[:1]):
            for layer in layers:
                units = units_all[(units_all.instance == inst.name) & (units_all.layer == layer)]
                figure, cards = layer_exemplar_figure(data, fig_dir, gallery_dir, model, inst.name, layer, units,
                                                      make_figure=position == 0, k=k, grid_units=grid_units,
                                                      gallery_units=gallery_units)
                if figure is not None:
                    figures.append(figure)
                if cards is not None:
                    galleries[(inst.name, layer)] = cards
    return figures, galleries


def layer_exemplar_figure(data: RunData, fig_dir: Path, gallery_dir: Path | None, model: str, instance: str,
                          layer: str, units: pd.DataFrame | None = None, *, make_figure: bool, k: int = EXEMPLAR_K,
                          grid_units: int = GRID_UNITS, gallery_units: int | None = 48,
                          ) -> tuple[FigureResult | None, list[dict[str, Any]] | None]:
    """One layer of one network: its exemplar grid (when ``make_figure``, or the reason it is skipped) and its
    gallery cards (when ``gallery_dir``); ``(None, None)`` when the network was not extracted.

    ``units``: the layer's IoU units (read from its node when ``None``).
    """
    extract = data.entry("extract", instance=instance)
    if extract is None:
        return None, None
    if units is None:
        units = data.node_table("iou", "units", instance=instance, layer=layer)
    key = f"exemplars_{safe_name(instance)}_{safe_name(layer)}"
    title = f"Exemplars: {data.layer_title(model, layer)} ({instance})"
    try:
        figure, cards = _layer_exemplars(data, fig_dir, gallery_dir, extract, instance, model, layer, units, key,
                                         title, k=k, grid_units=grid_units, gallery_units=gallery_units,
                                         make_figure=make_figure)
    except Exception as exc:  # noqa: BLE001 - one broken layer must not cost the run its whole report
        log.warning("report exemplars of %s %s failed", instance, layer, exc_info=True)
        plt.close("all")
        figure, cards = FigureResult(key, title, skipped=f"failed: {type(exc).__name__}: {exc}"), None
    if figure is not None and not (make_figure or figure.skipped):
        figure = None
    return figure, cards


def _layer_exemplars(data: RunData, fig_dir: Path, gallery_dir: Path | None, extract: Any, instance: str, model: str,
                     layer: str, units: pd.DataFrame, key: str, title: str, *, k: int, grid_units: int,
                     gallery_units: int | None, make_figure: bool = True,
                     ) -> tuple[FigureResult | None, list[dict[str, Any]] | None]:
    """The layer's exemplar grid figure (when ``make_figure``) and its gallery cards (when ``gallery_dir``)."""
    thresholds = data.node_table("thresholds", "thresholds", instance=instance, layer=layer)
    tables = extract.manifest.get("tables", {})
    if units.empty or thresholds.empty or f"summaries@{layer}" not in tables or f"activations@{layer}" not in tables:
        return FigureResult(key, title, skipped="IoU, thresholds or extraction outputs missing for this layer"), None
    thr = np.zeros(int(thresholds["unit"].max()) + 1)
    thr[thresholds["unit"].to_numpy()] = thresholds["threshold"].to_numpy()
    shown = exemplar_units(units, gallery_units) if gallery_dir is not None else units.iloc[:0]
    grid = exemplar_units(units, grid_units) if make_figure else units.iloc[:0]
    order = list(dict.fromkeys([int(u) for u in grid["unit"]] + [int(u) for u in shown["unit"]]))
    search = data.entry("dataset_search", instance=instance, layer=layer)
    if search is not None and k <= int(search.frame("top")["rank"].max()) + 1:
        ex = {e.unit: e for e in search_exemplars(search.frame("top"), search.frame("maps"), thr, order, data.dataset,
                                                  k=k)}
    else:
        ex = {e.unit: e for e in layer_exemplars(
            [str(p) for p in extract.parts(f"summaries@{layer}")],
            [str(p) for p in extract.parts(f"activations@{layer}")], thr, order, data.dataset, k=k)}
    views = layer_views(data, instance, layer)
    info = units.set_index("unit")
    figure = None
    if make_figure:
        fig = F.exemplar_grid(
            [ex[int(u)].pixels for u in grid["unit"]], [ex[int(u)].masks for u in grid["unit"]],
            row_labels=[_unit_title(info.loc[int(u)], int(u)) for u in grid["unit"]],
            col_labels=[[f"max {v:.2f}" for v in ex[int(u)].values] for u in grid["unit"]],
            title=f"{data.layer_title(model, layer)} of {instance}: top units, top {k} images")
        path = fig_dir / f"{key}.png"
        F.save_figure(fig, path)
        figure = FigureResult(
            key, title, path=path.name, group="exemplars",
            caption=(f"The {len(grid)} units of {layer} with the highest concept IoU; per unit its top {k} images by "
                     "maximum activation, with the region where the upsampled activation exceeds the unit's "
                     "threshold outlined (outside dimmed). Row labels: unit, concept (category), IoU."))
    if gallery_dir is None:
        return figure, None
    cards = []
    folder = gallery_dir / safe_name(instance) / safe_name(layer)
    folder.mkdir(parents=True, exist_ok=True)
    for u in shown["unit"]:
        u = int(u)
        file = folder / f"unit_{u:04d}.png"
        unit_card_image(F.exemplar_strip(ex[u].pixels, ex[u].masks, cell=96, dim=1.0), ex[u].images, views.am.get(u),
                        views.gb.get(u)).save(file, compress_level=4)
        rec = info.loc[u]
        cards.append({"unit": u, "label": rec["name"], "category": rec["category"], "iou": float(rec["iou"]),
                      "interpretable": bool(rec["interpretable"]), "image": file, "values": ex[u].values.tolist(),
                      "lines": card_lines(u, views, ex[u].images)})
    return figure, cards


def _unit_title(rec: pd.Series, unit: int) -> str:
    name = rec["name"] or "–"
    cat = f" ({rec['category']})" if rec["category"] else ""
    return f"unit {unit}\n{name}{cat}\nIoU {float(rec['iou']):.3f}"


def icnn_instability_figure(data: RunData, fig_dir: Path) -> FigureResult | list[FigureResult]:
    """Interpretable vs ordinary CNNs (``_interpretable``)."""
    from ._interpretable import icnn_instability_figure as build

    return build(data, fig_dir)


_BUILDERS: list[Callable[[RunData, Path], Any]] = [
    correlation_figures, detectors_figure, svcca_figure, cka_figure, regression_figure, instability_figure,
    agreement_figure, visualise_figures, icnn_instability_figure, _category.category_figure,
]


def build_figures(data: RunData, fig_dir: Path, names: list[str] | None = None) -> list[FigureResult]:
    """Every summary figure (not the exemplars) in order, or those of the builders ``names``; skipped ones
    carry the reason."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    out: list[FigureResult] = []
    for builder in _BUILDERS if names is None else [b for b in _BUILDERS if b.__name__ in names]:
        try:
            result = builder(data, fig_dir)
        except Exception as exc:  # noqa: BLE001 - one broken figure must not cost the run its whole report
            log.warning("report figure %s failed", builder.__name__, exc_info=True)
            plt.close("all")
            result = FigureResult(builder.__name__.removesuffix("_figures").removesuffix("_figure"),
                                  builder.__name__.replace("_", " "), skipped=f"failed: {type(exc).__name__}: {exc}")
        out.extend(result if isinstance(result, list) else [result])
    return out
