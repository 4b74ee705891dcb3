"""Dissection by concept category (table ``12_category_detectors`` and figure ``category_detectors``).

Bau et al. (2017) compare networks by *which kinds* of concepts their units detect: a random-init network
can have many "interpretable" units that are all colour detectors, so a total alone misleads. Per layer
and category (colour, object, part, material, scene), trained vs random-init networks: detector units
(interpretable units whose best concept is in the category; they add up to the interpretable units) and
unique detectors (distinct concepts among them; they add up to the unique detectors). All numbers are the
iou stage's ``summary`` columns ``detectors_<cat>`` / ``unique_detectors_<cat>``, aggregated over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import _figures as F
from ._data import RunData
from ._paper import categories_of
from ._tables import PaperTable, mean_std

__all__ = ["category_table", "category_figure"]

_ROLES = (("trained", "trained"), ("random", "random init"))


def category_table(data: RunData) -> PaperTable | None:
    summary = data.table("iou", "summary")
    if summary.empty:
        return None
    cats = categories_of(summary)
    rows, rules = [], []
    for model, layer in data.model_layers():
        sub = summary[(summary.model == model) & (summary.layer == layer)]
        if sub.empty:
            continue
        by_role = {role: sub[sub.role == role] for role, _ in _ROLES}
        for cat in [*cats, "total"]:
            units = "interpretable_units" if cat == "total" else f"detectors_{cat}"
            unique = "unique_detectors_total" if cat == "total" else f"unique_detectors_{cat}"
            row: list[Any] = [data.layer_title(model, layer), cat]
            row += [mean_std(by_role[r][units], digits=1) for r, _ in _ROLES]
            row += [mean_std(by_role[r][unique], digits=1) for r, _ in _ROLES]
            rows.append(row)
        rules.append(len(rows) - 1)
    return PaperTable(
        name="12_category_detectors",
        title="Detectors per concept category: trained vs random-init networks",
        columns=["Layer", "Category", "Detector units (trained)", "Detector units (random init)",
                 "Unique detectors (trained)", "Unique detectors (random init)"],
        rows=rows,
        caption=(f"Detector units: interpretable units (best IoU > {data.iou_threshold:g}) whose best concept is in "
                 "the category; they add up to the interpretable units (row 'total'). Unique detectors: distinct "
                 "concepts among them; they add up to the unique detectors. Mean ± std (n seeds)."),
        digits=1,
        rules_after=rules[:-1],
    )


def category_bars(data: RunData, summary: Any, column_prefix: str, total_column: str, ylabel: str) -> Any:
    """One panel per role (trained, random init) of per-layer bars stacked by concept category: the mean over
    seeds of ``<column_prefix><category>``, with the std over seeds of ``total_column`` as the error bar."""
    cats = categories_of(summary)
    roles = [(r, t) for r, t in _ROLES if (summary.role == r).any()]
    groups = [data.layer_title(m, l) for m, l in data.model_layers()]
    fig, axes = F.new_figure(3.0 * len(roles) + 1.2, 2.5, ncols=len(roles), squeeze=False, sharey=True)
    for j, (role, title) in enumerate(roles):
        means = np.zeros((len(groups), len(cats)))
        spread = np.full(len(groups), np.nan)
        for g, (model, layer) in enumerate(data.model_layers()):
            sub = summary[(summary.model == model) & (summary.layer == layer) & (summary.role == role)]
            if sub.empty:
                continue
            means[g] = [sub[f"{column_prefix}{c}"].mean() for c in cats]
            if len(sub) > 1:
                spread[g] = sub[total_column].std(ddof=1)
        F.stacked_bars(axes[0, j], groups, cats, means, total_std=spread,
                       ylabel=ylabel if j == 0 else "", legend=j == len(roles) - 1, title=title)
    return fig


def category_figure(data: RunData, fig_dir: Path) -> Any:
    from ._plots import FigureResult

    key = "category_detectors"
    summary = data.table("iou", "summary")
    if summary.empty:
        return FigureResult(key, "Detector units per category", skipped="no IoU results in this run")
    fig = category_bars(data, summary, "detectors_", "interpretable_units", "detector units")
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Detector units per concept category", path=path.name,
                        caption=("Interpretable units per layer, stacked by the category of their best concept, for "
                                 "trained networks and the same networks before training. Bar heights: means over "
                                 "seeds; error bars: std of the total over seeds."))
