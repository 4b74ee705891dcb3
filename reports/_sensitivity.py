"""Paper table 17 from the ``sensitivity`` stage: Ding et al. 2021's principal-component deletion test.

17. ``17_sensitivity`` — per layer and metric, Spearman ρ between the metric's dissimilarity and the linear
    probe's accuracy change as principal components are deleted, for each design (``self``: dissimilarity to the
    seed's own full representation vs its probe's accuracy drop; ``seed pairs``: Ding et al.'s every ordered
    seed pair, |Δ accuracy|) and deletion order; then the mean over layers (Ding et al. average over reference
    layers).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ._data import RunData
from ._tables import PaperTable

__all__ = ["sensitivity_table"]

_DESIGNS = (("self", "self"), ("seeds", "seed pairs"))
_ORDERS = {"low": "low first", "high": "high first"}


def _rho(cell: pd.DataFrame) -> Any:
    if cell.empty or not bool(cell["defined"].iloc[0]):
        return None
    rho, p = float(cell["rho"].iloc[0]), float(cell["rho_p"].iloc[0])
    return f"{rho:.2f}{'*' if p < 0.05 else ''}"


def sensitivity_table(data: RunData) -> PaperTable | None:
    frame = data.table("sensitivity", "sensitivity")
    if frame.empty:
        return None
    orders = [o for o in _ORDERS if o in set(frame["order"])]
    columns = [(d, o) for d, _ in _DESIGNS for o in orders]
    names = {d: label for d, label in _DESIGNS}
    head = (["Model"] if data.multi_model else []) + ["Layer", "Metric"]
    head += [f"ρ {names[d]}, {_ORDERS[o]}" for d, o in columns] + ["Bad frac (pairs, low first)"]
    rows: list[list[Any]] = []
    rules = []
    for model, layers in data.models:
        sub = frame[frame["model"] == model] if "model" in frame.columns else frame
        if sub.empty:
            continue
        for layer in [*layers, None]:
            part = sub[sub["layer"] == layer] if layer is not None else sub
            for metric in dict.fromkeys(sub["metric"]):
                m = part[part["metric"] == metric]
                if layer is None:
                    cells = []
                    for d, o in columns:
                        c = m[(m["design"] == d) & (m["order"] == o) & m["defined"].astype(bool)]
                        cells.append(float(c["rho"].mean()) if len(c) else None)
                    bad = m[(m["design"] == "seeds") & (m["order"] == "low")]["bad_frac"]
                    title = "mean over layers"
                else:
                    cells = [_rho(m[(m["design"] == d) & (m["order"] == o)]) for d, o in columns]
                    bad = m[(m["design"] == "seeds") & (m["order"] == "low")]["bad_frac"]
                    title = layer
                rows.append(([model] if data.multi_model else []) + [title, metric, *cells,
                                                                      float(bad.mean()) if len(bad) else np.nan])
            rules.append(len(rows) - 1)
    if not rows:
        return None
    return PaperTable(
        name="17_sensitivity",
        title="Sanity test: sensitivity to principal-component deletion (Ding et al. 2021)",
        columns=head,
        rows=rows,
        digits=2,
        caption=("Principal components of one seed's layer (pooled, one sample per image; basis from the training "
                 "images) are deleted progressively — lowest-variance first (Ding et al.'s protocol) or highest "
                 "first — and each metric's dissimilarity (a distance, or 1 − similarity) is rank-correlated "
                 "(Spearman ρ; * one-sided p < 0.05) with the change in a linear probe's held-out accuracy (logistic "
                 "regression trained on the full representation's training images). self: dissimilarity to the "
                 "seed's own full representation vs its probe's accuracy drop, pooled over seeds; seed pairs: "
                 "every ordered seed pair, |Δ accuracy| (Ding et al.). ρ = 0 for a metric that never moves (the "
                 "CCA family ignores a deleted subspace: the kept one is still linearly identical). Bad frac: "
                 "share of rows the metric ranks among its 20 % most similar while the accuracy change is among "
                 "the 20 % largest. A sensitive metric has high ρ and low bad frac; Ding et al. found CKA the "
                 "least sensitive to low-variance deletions."),
        rules_after=rules[:-1],
    )
