"""Built-in sanity test of the comparison metrics: Kornblith et al. 2019's layer identification.

Protocol (Kornblith, Norouzi, Lee & Hinton 2019, §6.1 / Table 2): for networks of the same architecture trained
from different seeds, for every ordered pair (A, B) and every layer i of A, pick ĵ = argmax_j s(A_i, B_j) over
the layers of B; a hit is ĵ = i. Accuracy = hits / (ordered pairs × layers). Distances are negated first; ties go
to the lower (earlier) layer; a NaN similarity never wins. The paper's Table 2 ranks linear CKA first (≈ 99 %),
CCA-based indexes far lower. Unreliable as a jackknife target (an argmax), so the table reports the count.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .._errors import StageInputError

__all__ = ["layer_identification"]


def layer_identification(table: pd.DataFrame, layers: Sequence[str]) -> pd.DataFrame:
    """Layer-identification accuracy of every metric in a long layer × layer similarity table.

    Args:
        table: rows ``a, b, layer_a, layer_b, metric, metric_kind, value`` ("similarity"/"distance") for one
            or more seed pairs (a, b) of the same architecture; each pair is used in both directions.
        layers: the layer order (ties go to the earlier layer).

    Returns:
        DataFrame ``metric, hits, trials, accuracy`` in the metrics' first-appearance order. A trial (one layer
        of one network against every layer of the other) counts only where the metric is defined for all
        candidates; a metric with no such trial (Fréchet between layers of different widths) gets accuracy NaN.
    """
    need = {"a", "b", "layer_a", "layer_b", "metric", "metric_kind", "value"}
    if not need <= set(table.columns):
        raise StageInputError(f"layer identification needs columns {sorted(need)}; got {sorted(table.columns)}")
    order = {layer: k for k, layer in enumerate(layers)}
    rows = []
    for metric, sub in table.groupby("metric", sort=False):
        sign = 1.0 if sub["metric_kind"].iloc[0] == "similarity" else -1.0
        hits = trials = 0
        for _, pair in sub.groupby(["a", "b"], sort=False):
            matrix = np.full((len(layers), len(layers)), np.nan)
            for la, lb, v in zip(pair.layer_a, pair.layer_b, pair.value):
                if la in order and lb in order:
                    matrix[order[la], order[lb]] = sign * v
            for m in (matrix, matrix.T):  # A's layer → B's layers, and B's → A's
                for i in range(len(layers)):
                    row = m[i]
                    # A trial needs the metric on every candidate layer: where it is undefined for some
                    # (Fréchet across widths), picking among the rest would be easier, not a pass.
                    if np.isfinite(row).all():
                        trials += 1
                        hits += int(np.argmax(row) == i)
        rows.append({"metric": metric, "hits": hits, "trials": trials,
                     "accuracy": hits / trials if trials else float("nan")})
    return pd.DataFrame(rows, columns=["metric", "hits", "trials", "accuracy"])
