"""Paper tables 9–11 from the ``similarity`` stage: every metric with uncertainty, layer × layer, layer identification.

Built from cached stage tables only (the ``similarity`` table of each model pair):

9. ``9_similarity_uncertainty`` — per layer (same layer in both nets) and metric: value over seed pairs
   (mean ± std), the mean leave-one-group-out jackknife s.e. within a pair (stimulus variance), the permutation
   null's 95th percentile and the largest p-value over pairs, and the random-init baseline.
10. ``10_layer_by_layer`` — every metric's layer × layer matrix, mean over seed pairs.
11. ``11_layer_identification`` — Kornblith et al. 2019's sanity test: how often each metric picks the same layer
    of the other seed as most similar (both directions of every seed pair).

Table 17 (Ding et al.'s deletion sensitivity, ``_sensitivity``) is appended to the same builders.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..stages.compare import layer_identification
from ._data import RunData
from ._sensitivity import sensitivity_table
from ._tables import PaperTable, mean_std

__all__ = ["SIMILARITY_BUILDERS", "sanity_table", "sanity_tables", "similarity_uncertainty", "layer_by_layer", "layer_identification_table"]


def _frame(data: RunData) -> pd.DataFrame:
    """The stage table with undefined cells (``valid``/``has_se``/``has_null`` False) back as NaN."""
    frame = data.table("similarity", "similarity")
    if frame.empty or "valid" not in frame:
        return frame
    frame = frame.copy()
    frame.loc[~frame["valid"].astype(bool), "value"] = np.nan
    frame.loc[~frame["has_se"].astype(bool), "se"] = np.nan
    frame.loc[~frame["has_null"].astype(bool), ["null_q95", "p_value"]] = np.nan
    return frame


def similarity_uncertainty(data: RunData) -> PaperTable | None:
    frame = _frame(data)
    if frame.empty:
        return None
    frame = frame[frame.layer_a == frame.layer_b]
    rows: list[list[Any]] = []
    rules = []
    for model, layer in data.model_layers():
        sub = frame[(frame.model == model) & (frame.layer_a == layer)]
        if sub.empty:
            continue
        for metric in dict.fromkeys(sub.metric):
            seeds = sub[(sub.metric == metric) & (sub.kind == "seed")]
            random = sub[(sub.metric == metric) & (sub.kind == "unrelated")]
            p = seeds["p_value"].max() if len(seeds) else np.nan
            rows.append([data.layer_title(model, layer), metric, mean_std(seeds["value"]),
                         float(seeds["se"].mean()) if len(seeds) else np.nan,
                         float(seeds["null_q95"].mean()) if len(seeds) else np.nan, p, mean_std(random["value"])])
        rules.append(len(rows) - 1)
    if not rows:
        return None
    return PaperTable(
        name="9_similarity_uncertainty",
        title="Every metric with uncertainty: same layer of two seeds",
        columns=["Layer", "Metric", "Seed pairs", "Jackknife s.e.", "Null 95%", "p (max)", "Unrelated random"],
        rows=rows,
        caption=("One sample per image (spatial mean). Seed pairs: mean ± std over pairs of trained seeds (seed "
                 "variance). Jackknife s.e.: leave-one-group-out over hashed image groups, mean over pairs "
                 "(stimulus variance). Null 95%: 95th percentile (toward 'similar') of the metric with one "
                 "network's images shuffled, on the fixed image subset; p: largest permutation p-value over "
                 "pairs. Distances (procrustes, shape_*, frechet): smaller is more similar. pwcca is "
                 "google/svcca's convention, pwcca_morcos the paper's canonical-variate weights. Unrelated random: a trained "
                 "seed against another seed's untrained network (the null pair)."),
        rules_after=rules[:-1],
    )


def layer_by_layer(data: RunData) -> PaperTable | None:
    frame = _frame(data)
    if frame.empty:
        return None
    seeds = frame[frame.kind == "seed"]
    if seeds.empty:
        return None
    rows: list[list[Any]] = []
    rules = []
    width = max(len(layers) for _, layers in data.models)
    for model, layers in data.models:
        sub = seeds[seeds.model == model]
        for metric in dict.fromkeys(sub.metric):
            m = sub[sub.metric == metric]
            for la in layers:
                cells = [mean_std(m[(m.layer_a == la) & (m.layer_b == lb)]["value"]).mean for lb in layers]
                cells += [None] * (width - len(layers))
                rows.append([model if data.multi_model else metric, metric if data.multi_model else la,
                             *([la] if data.multi_model else []), *cells])
            rules.append(len(rows) - 1)
    if not rows:
        return None
    head = ["Model", "Metric", "Layer of A"] if data.multi_model else ["Metric", "Layer of A"]
    return PaperTable(
        name="10_layer_by_layer",
        title="Layer × layer similarity of two seeds, every metric",
        columns=head + [f"B layer {k + 1}" for k in range(width)],
        rows=rows,
        caption=("Mean over seed pairs of each metric between layer i of one seed (rows) and layer j of the other "
                 "(columns, in the model's layer order). Distances: smaller is more similar."),
        rules_after=rules[:-1],
    )


def layer_identification_table(data: RunData) -> PaperTable | None:
    frame = _frame(data)
    if frame.empty:
        return None
    rows: list[list[Any]] = []
    for model, layers in data.models:
        seeds = frame[(frame.model == model) & (frame.kind == "seed")]
        if seeds.empty or len(layers) < 2:
            continue
        result = layer_identification(seeds, layers)
        for row in result.itertuples(index=False):
            rows.append([model, row.metric, row.accuracy, f"{row.hits}/{row.trials}"])
    if not rows:
        return None
    return PaperTable(
        name="11_layer_identification",
        title="Sanity test: layer identification across seeds (Kornblith et al. 2019)",
        columns=["Model", "Metric", "Accuracy", "Hits"],
        rows=rows,
        caption=("For every ordered seed pair and layer i of the first, the layer of the second with the highest "
                 "similarity (lowest distance) should be i. Kornblith et al. 2019 (Table 2) report linear CKA "
                 "≈ 99 % and CCA-based indexes far lower on 10-layer CIFAR-10 CNNs. A trial counts only where the "
                 "metric is defined for every candidate layer; Fréchet distance is undefined between layers of "
                 "different widths, so with layers of distinct widths it has no trial (no accuracy)."),
    )


#: (key, builder, reason when skipped), appended to the paper tables' builders.
SIMILARITY_BUILDERS = [
    ("similarity_uncertainty", similarity_uncertainty, "no similarity results ([similarity].enabled = false or no pairs)"),
    ("layer_by_layer", layer_by_layer, "no similarity results for seed pairs"),
    ("layer_identification", layer_identification_table, "needs seed pairs of a model with ≥ 2 layers"),
    ("sensitivity", sensitivity_table, "no sensitivity results ([sensitivity] disabled or no trained seeds with labels)"),
]


def sanity_table(result: object) -> PaperTable | None:
    """Table 11 (layer identification per metric) of a finished run."""
    return layer_identification_table(RunData(result))


def sanity_tables(result: object) -> list[PaperTable]:
    """Tables 11 (layer identification) and 17 (deletion sensitivity) of a finished run, those it has: the
    ``repdissect sanity`` read-out."""
    data = RunData(result)
    return [t for t in (layer_identification_table(data), sensitivity_table(data)) if t is not None]
