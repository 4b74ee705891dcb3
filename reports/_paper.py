"""The eight paper tables, each built from cached stage tables only (aggregated over seeds or seed pairs).

The constraint: every number here must be traceable to a stage table — the tests recompute each from the
stage tables — so builders only select, group and aggregate (mean ± sample std with the count); they never
re-derive a statistic from activations. Each builder returns a :class:`PaperTable`, or ``None`` when the
run has no data for it (e.g. no landmarks → no location-instability table); :func:`build_tables` collects
them in paper order with the reason for each one skipped.

Tables (file stems under ``<out>/tables/``):

1. ``1_dissection_summary`` — units, interpretable units, unique detectors per category (iou ``summary``).
2. ``2_top_units`` — the best units of every layer and trained seed (iou ``units``).
3. ``3_location_instability`` — trained vs random-init networks vs the image-centre predictor.
4. ``4_convergent_learning`` — mean correlation of semi-, Hungarian- and bottleneck-matched units, within-net
   baseline (compare ``summary``).
5. ``5_regression`` — held-out loss and channels used of linear / L1 prediction per α (compare ``regression``).
6. ``6_similarity`` — SVCCA, PWCCA, linear CKA, trained pairs vs random-init baseline (compare ``summary``).
7. ``7_concept_agreement`` — among Hungarian-matched pairs of interpretable units, the fraction with the same
   concept label vs chance from the label frequencies (compare ``matches`` × iou ``units``).
8. ``8_training`` — final accuracy, epochs and time per seed (train ``history`` and extras).

14–15. ``14_icnn_instability``, ``15_icnn_comparison`` — interpretable vs ordinary CNNs (``_interpretable``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from ._data import RunData
from ._similarity import SIMILARITY_BUILDERS
from ._tables import PaperTable, mean_std

__all__ = [
    "TableResult",
    "build_tables",
    "dissection_summary",
    "top_units",
    "location_instability",
    "convergent_learning",
    "regression_table",
    "similarity_table",
    "concept_agreement",
    "concept_agreement_rows",
    "training_summary",
    "categories_of",
    "stability_summary",
    "TOP_UNITS",
]

log = logging.getLogger("repdissect.reports")

#: units listed per (layer, trained seed) in table 2
TOP_UNITS = 5

ROLE_TITLE = {"trained": "trained", "random": "random init"}
#: comparison pair kinds in report order (the pipeline's PAIR_KINDS) and their titles
PAIR_KINDS = ("seed", "unrelated", "random_pair", "drift")
KIND_TITLE = {"seed": "seed pairs", "unrelated": "seed vs unrelated random init", "random_pair": "random vs random",
              "drift": "training drift (seed vs own init)"}
#: short column suffixes per kind
KIND_SHORT = {"seed": "seeds", "unrelated": "unrelated rnd", "random_pair": "rnd vs rnd", "drift": "drift"}
_NULLS_CAPTION = ("Seeds: pairs of trained networks. Unrelated rnd (the null): each trained network against "
                  "another seed's untrained network. Rnd vs rnd: two untrained networks. Drift: each trained "
                  "network against its own initialisation — how far training moved it, not a null (the trained "
                  "net inherits its init's weights).")


@dataclass
class TableResult:
    """A built table, or the reason it was skipped."""

    key: str
    table: PaperTable | None
    skipped: str = ""


def _rules(groups: list[Any]) -> list[int]:
    """Row indexes after which the group value changes (for ``\\midrule`` between layers)."""
    return [i for i in range(len(groups) - 1) if groups[i] != groups[i + 1]]


def categories_of(summary: pd.DataFrame) -> list[str]:
    """Concept categories in the order of the iou summary's ``unique_detectors_<cat>`` columns."""
    prefix = "unique_detectors_"
    return [c[len(prefix):] for c in summary.columns if c.startswith(prefix) and c != "unique_detectors_total"]


def _same(values: pd.Series) -> Any:
    """The value when all equal (e.g. a layer's unit count), else a mean ± std."""
    uniq = pd.unique(values)
    return int(uniq[0]) if len(uniq) == 1 else mean_std(values, digits=1)


# ---------------------------------------------------------------------------------------- table 1
def dissection_summary(data: RunData) -> PaperTable | None:
    summary = data.table("iou", "summary")
    if summary.empty:
        return None
    cats = categories_of(summary)
    columns = ["Layer", "Network", "Units", "Interpretable units", "Unique detectors"] + [f"Unique {c}" for c in cats]
    rows, groups = [], []
    for model, layer in data.model_layers():
        for role in ("trained", "random"):
            sub = summary[(summary.model == model) & (summary.layer == layer) & (summary.role == role)]
            if sub.empty:
                continue
            row = [data.layer_title(model, layer), ROLE_TITLE[role], _same(sub["units"]),
                   mean_std(sub["interpretable_units"], digits=1), mean_std(sub["unique_detectors_total"], digits=1)]
            row += [mean_std(sub[f"unique_detectors_{c}"], digits=1) for c in cats]
            rows.append(row)
            groups.append((model, layer))
    threshold = float(summary["iou_threshold"].iloc[0]) if "iou_threshold" in summary else data.iou_threshold
    return PaperTable(
        name="1_dissection_summary",
        title="Network Dissection summary per layer",
        columns=columns,
        rows=rows,
        caption=(f"A unit is interpretable when its best concept IoU exceeds {threshold:g}. Unique detectors: "
                 "distinct concept labels among interpretable units (per category: units whose best concept "
                 "is in that category). Mean ± std (n seeds)."),
        digits=1,
        rules_after=_rules(groups),
    )


# ---------------------------------------------------------------------------------------- table 2
def top_units(data: RunData, per_seed: int = TOP_UNITS) -> PaperTable | None:
    units = data.table("iou", "units")
    if units.empty:
        return None
    units = units[units.role == "trained"]
    rows, groups = [], []
    for model, layer in data.model_layers():
        for inst in data.trained(model):
            sub = units[(units.layer == layer) & (units.instance == inst.name)]
            if sub.empty:
                continue
            best = sub.sort_values(["iou", "unit"], ascending=[False, True]).head(per_seed)
            for rank, rec in enumerate(best.itertuples(index=False), 1):
                rows.append([data.layer_title(model, layer), inst.name, rank, int(rec.unit),
                             rec.name or "–", rec.category or "–", float(rec.iou)])
                groups.append((model, layer))
    if not rows:
        return None
    return PaperTable(
        name="2_top_units",
        title="Top units per layer",
        columns=["Layer", "Network", "Rank", "Unit", "Label", "Category", "IoU"],
        rows=rows,
        caption=(f"The {per_seed} units with the highest concept IoU in each layer of each trained network "
                 "(unit numbers are 0-based channel indexes)."),
        rules_after=_rules(groups),
    )


# ---------------------------------------------------------------------------------------- table 3
def stability_summary(data: RunData) -> pd.DataFrame:
    """The stability stage's ``summary`` rows; a layer without valid units has no instability (NaN, so it is
    left out of means) rather than the stage's placeholder 0.0."""
    summary = data.table("stability", "summary")
    if not summary.empty and "valid_units" in summary:
        summary = summary.assign(instability=summary["instability"].where(summary["valid_units"] > 0))
    return summary


def location_instability(data: RunData) -> PaperTable | None:
    summary = stability_summary(data)
    if summary.empty:
        return None
    center = data.table("stability_center", "summary")
    center_value = float(center["instability"].iloc[0]) if not center.empty else math.nan
    rows, groups = [], []
    for model, layer in data.model_layers():
        sub = summary[(summary.model == model) & (summary.layer == layer)]
        if sub.empty:
            continue
        trained = sub[sub.role == "trained"]
        random = sub[sub.role == "random"]
        rows.append([data.layer_title(model, layer), mean_std(trained["instability"]),
                     mean_std(random["instability"]), center_value,
                     mean_std(trained["valid_units"], digits=1) if "valid_units" in sub else None,
                     _same(sub["units"]) if "units" in sub else None])
        groups.append(model)
    top_k = f"K = {int(summary['top_k'].iloc[0])}" if "top_k" in summary else "K"
    return PaperTable(
        name="3_location_instability",
        title="Location instability per layer (lower is more stable)",
        columns=["Layer", "Trained", "Random init", "Image centre", "Valid units (trained)", "Units"],
        rows=rows,
        caption=("Zhang et al.'s location instability: per unit and landmark, the standard deviation over the "
                 f"unit's top images ({top_k}, by maximum activation, among images where the landmark is "
                 "visible) of the distance between the unit's peak and the landmark, divided by the image "
                 "diagonal; averaged over landmarks and over valid units (dead or constant units excluded). "
                 "Image centre: a predictor that always points at the image centre, over the same number of "
                 "images per landmark drawn at random among those where it is visible. Mean ± std (n seeds)."),
        rules_after=_rules(groups),
    )


# ---------------------------------------------------------------------------------------- table 4
def _samples(data: RunData) -> str:
    """Which samples the comparison metrics use (the run's ``[compare].samples``), for captions."""
    mode = getattr(getattr(data.config, "compare", None), "samples", "positions")
    return ("one per image and spatial position (positions mode)" if mode == "positions"
            else "one per image, spatially averaged (pooled mode)")


def _pair_frame(data: RunData, table: str = "summary") -> pd.DataFrame:
    return data.table("compare", table)


def convergent_learning(data: RunData) -> PaperTable | None:
    summary = _pair_frame(data)
    if summary.empty or "hungarian_mean_corr" not in summary:
        return None
    summary = summary.assign(
        semi=(summary["semi_a_to_b_mean_corr"] + summary["semi_b_to_a_mean_corr"]) / 2,
        within=(summary["within_a_mean_max_corr"] + summary["within_b_mean_max_corr"]) / 2,
    )
    rows = []
    for model, layer in data.model_layers():
        sub = summary[(summary.model == model) & (summary.layer == layer)]
        if sub.empty:
            continue
        seeds = sub[sub.kind == "seed"]
        rows.append([data.layer_title(model, layer), mean_std(seeds["semi"]), mean_std(seeds["hungarian_mean_corr"]),
                     mean_std(seeds["bottleneck_mean_corr"]), mean_std(seeds["within"])]
                    + [mean_std(sub.loc[sub.kind == k, "hungarian_mean_corr"]) for k in PAIR_KINDS[1:]])
    return PaperTable(
        name="4_convergent_learning",
        title="Convergent learning: mean correlation of matched units",
        columns=["Layer", "Semi-matching", "Hungarian", "Bottleneck", "Within-net max"]
        + [f"Hungarian ({KIND_SHORT[k]})" for k in PAIR_KINDS[1:]],
        rows=rows,
        caption=("Li et al. (2016): mean between-net correlation of each unit's partner under semi-matching "
                 "(each unit takes its most correlated unit; both directions averaged), one-to-one Hungarian "
                 "matching (maximum total correlation) and bottleneck matching (maximum smallest correlation). "
                 "Within-net max: each unit's highest correlation with another unit of its own network, the "
                 "baseline. " + _NULLS_CAPTION + " Mean ± std (n pairs). Samples: " + _samples(data) + "."),
    )


# ---------------------------------------------------------------------------------------- table 5
def regression_table(data: RunData) -> PaperTable | None:
    reg = _pair_frame(data, "regression")
    if reg.empty:
        return None
    # One value per pair and α: the two prediction directions averaged.
    keys = ["model", "a", "b", "kind", "layer", "alpha"]
    per_pair = reg.groupby(keys, sort=False, as_index=False).agg(
        loss=("heldout_loss", "mean"), used=("mean_nonzero", "mean"), inputs=("n_inputs", "mean"))
    rows, groups = [], []
    for model, layer in data.model_layers():
        sub = per_pair[(per_pair.model == model) & (per_pair.layer == layer)]
        if sub.empty:
            continue
        for alpha in sorted(sub["alpha"].unique()):
            at = sub[sub.alpha == alpha]
            seeds = at[at.kind == "seed"]
            inputs = at["inputs"]
            rows.append([data.layer_title(model, layer), "0 (unregularised)" if alpha == 0 else f"{alpha:g}",
                         mean_std(seeds["loss"]), mean_std(seeds["used"], digits=1),
                         int(round(inputs.max())) if len(inputs) else None]
                        + [mean_std(at.loc[at.kind == k, "loss"]) for k in PAIR_KINDS[1:]])
            groups.append((model, layer))
    return PaperTable(
        name="5_regression",
        title="Predicting one network's channels from another's: loss and channels used",
        columns=["Layer", "L1 α", "Held-out loss", "Channels used", "of"]
        + [f"Loss ({KIND_SHORT[k]})" for k in PAIR_KINDS[1:]],
        rows=rows,
        caption=("Each channel of one network is predicted linearly from all channels of the other at the same "
                 "layer (standardised; α = 0: least squares, positive α: L1-regularised). Loss: held-out mean "
                 "squared error over target variance (1 = no information). Channels used: mean non-zero "
                 "weights per target. Both directions averaged per pair; mean ± std (n pairs). " + _NULLS_CAPTION
                 + " Samples: " + _samples(data) + "."),
        rules_after=_rules(groups),
    )


# ---------------------------------------------------------------------------------------- table 6
def similarity_table(data: RunData) -> PaperTable | None:
    summary = _pair_frame(data)
    metrics = [m for m in ("svcca_mean", "pwcca", "linear_cka") if m in summary.columns]
    if summary.empty or not metrics:
        return None
    titles = {"svcca_mean": "SVCCA", "pwcca": "PWCCA", "linear_cka": "Linear CKA"}
    columns = ["Layer"]
    for m in metrics:
        columns += [f"{titles[m]} ({KIND_SHORT[k]})" for k in PAIR_KINDS]
    rows = []
    for model, layer in data.model_layers():
        sub = summary[(summary.model == model) & (summary.layer == layer)]
        if sub.empty:
            continue
        row: list[Any] = [data.layer_title(model, layer)]
        for m in metrics:
            row += [mean_std(sub.loc[sub.kind == k, m]) for k in PAIR_KINDS]
        rows.append(row)
    return PaperTable(
        name="6_similarity",
        title="Representation similarity per layer: trained seed pairs vs null pairs",
        columns=columns,
        rows=rows,
        caption=("SVCCA: mean canonical correlation after keeping the top singular directions (99 % of the "
                 "spectrum); PWCCA: projection-weighted CCA (Morcos et al. 2018; google/svcca convention); linear CKA (Kornblith et al. "
                 "2019). " + _NULLS_CAPTION + " Mean ± std (n pairs). Samples: " + _samples(data) + "."),
    )


# ---------------------------------------------------------------------------------------- table 7
def concept_agreement_rows(data: RunData) -> pd.DataFrame:
    """Per (pair, layer): matched pairs where both units are interpretable, same-label and chance fractions.

    Columns: ``model, a, b, kind, layer, pairs, same, chance, same_top, same_bottom`` where ``same`` is the
    fraction of those pairs with the same best concept label, ``chance`` the fraction expected if the b-side
    labels were randomly permuted among the pairs (Σ_l n_a(l)·n_b(l) / M², from the label frequencies),
    and ``same_top``/``same_bottom`` the fraction among the better / worse correlated half of the pairs.
    Fractions are NaN for a pair with no such units (left out of the aggregates, never shown as NaN).
    """
    matches = _pair_frame(data, "matches")
    units = data.table("iou", "units")
    if matches.empty or units.empty:
        return pd.DataFrame()
    matches = matches[matches.method == "hungarian"]
    labels = {key: grp.set_index("unit") for key, grp in units.groupby(["instance", "layer"], sort=False)}
    out = []
    for (model, a, b, kind, layer), grp in matches.groupby(["model", "a", "b", "kind", "layer"], sort=False):
        ua, ub = labels.get((a, layer)), labels.get((b, layer))
        if ua is None or ub is None:
            continue
        la = ua.reindex(grp["unit_a"].to_numpy())
        lb = ub.reindex(grp["unit_b"].to_numpy())
        both = la["interpretable"].fillna(False).to_numpy(bool) & lb["interpretable"].fillna(False).to_numpy(bool)
        m = int(both.sum())
        rec = {"model": model, "a": a, "b": b, "kind": kind, "layer": layer, "pairs": m,
               "same": math.nan, "chance": math.nan, "same_top": math.nan, "same_bottom": math.nan}
        if m:
            lab_a = la["label"].to_numpy()[both]
            lab_b = lb["label"].to_numpy()[both]
            corr = grp["corr"].to_numpy()[both]
            same = lab_a == lab_b
            va, ca = np.unique(lab_a, return_counts=True)
            cb = pd.Series(lab_b).value_counts()
            chance = float(sum(n * cb.get(v, 0) for v, n in zip(va, ca))) / (m * m)
            # Stable order: highest correlation first, ties by the a-side unit.
            order = np.lexsort((la.index.to_numpy()[both], -corr))
            half = (m + 1) // 2
            rec.update(same=float(same.mean()), chance=chance, same_top=float(same[order[:half]].mean()),
                       same_bottom=float(same[order[half:]].mean()) if m > half else math.nan)
        out.append(rec)
    return pd.DataFrame(out)


def concept_agreement(data: RunData) -> PaperTable | None:
    rows_frame = concept_agreement_rows(data)
    if rows_frame.empty:
        return None
    rows, groups = [], []
    for model, layer in data.model_layers():
        for kind in PAIR_KINDS:
            sub = rows_frame[(rows_frame.model == model) & (rows_frame.layer == layer) & (rows_frame.kind == kind)]
            if sub.empty:
                continue
            rows.append([data.layer_title(model, layer), KIND_TITLE[kind], mean_std(sub["pairs"], digits=1),
                         mean_std(sub["same"]), mean_std(sub["chance"]), mean_std(sub["same_top"]),
                         mean_std(sub["same_bottom"])])
            groups.append((model, layer))
    return PaperTable(
        name="7_concept_agreement",
        title="Concept agreement of matched units",
        columns=["Layer", "Network pairs", "Matched pairs, both interpretable", "Same label", "Chance",
                 "Same label, top half by corr.", "Same label, bottom half"],
        rows=rows,
        caption=("Among Hungarian-matched unit pairs where both units are interpretable, the fraction whose best "
                 "concept labels agree, against the fraction expected by chance from the two sides' label "
                 "frequencies (a random pairing of the same units), and split by the pair's correlation rank. "
                 "Mean ± std (n network pairs; the fractions only over network pairs with at least one such "
                 "unit pair)."),
        rules_after=_rules(groups),
    )


# ---------------------------------------------------------------------------------------- table 8
def training_summary(data: RunData) -> PaperTable | None:
    entries = data.entries("train")
    if not entries:
        return None
    by_model_seed = {(i.model, str(i.seed)): i for i in data.trained()}
    rows, finals = [], []
    for label, entry in entries:
        inst = by_model_seed.get((label.get("model"), label.get("seed")))
        history = entry.frame("history") if "history" in entry.manifest.get("tables", {}) else pd.DataFrame()
        extras = entry.extras
        last = history.iloc[-1] if not history.empty else None
        train_acc = extras.get("final_train_acc", last["train_acc"] if last is not None else math.nan)
        val_acc = extras.get("final_val_acc", last["val_acc"] if last is not None else math.nan)
        epochs = int(extras.get("epochs", len(history)))
        seconds = extras.get("train_seconds", float(history["seconds"].sum()) if "seconds" in history else math.nan)
        name = inst.name if inst else f"{label.get('model')}@s{label.get('seed')}"
        rows.append([name, int(label.get("seed", -1)), epochs, float(train_acc), float(val_acc), float(seconds)])
        finals.append(rows[-1])
    if len(finals) > 1:
        rows.append(["mean ± std", None, mean_std([r[2] for r in finals], digits=1),
                     mean_std([r[3] for r in finals]), mean_std([r[4] for r in finals]),
                     mean_std([r[5] for r in finals], digits=1)])
    return PaperTable(
        name="8_training",
        title="Training summary per seed",
        columns=["Network", "Seed", "Epochs", "Final train accuracy", "Final val accuracy", "Time (s)"],
        rows=rows,
        caption="Accuracy on the dataset's class labels after the last epoch; time is the training stage's wall time.",
        column_digits={"Time (s)": 1},
        rules_after=[len(finals) - 1] if len(finals) > 1 else [],
    )


_BUILDERS: list[tuple[str, Callable[[RunData], PaperTable | None], str]] = [
    ("dissection_summary", dissection_summary, "no IoU results in this run"),
    ("top_units", top_units, "no IoU results in this run"),
    ("location_instability", location_instability, "no location-stability results (the dataset has no landmarks "
                                                    "or [stability] is disabled)"),
    ("convergent_learning", convergent_learning, "no comparisons in this run ([compare].pairs = \"none\" or one seed)"),
    ("regression", regression_table, "no regression results in this run"),
    ("similarity", similarity_table, "no comparisons in this run"),
    ("concept_agreement", concept_agreement, "needs both comparisons and IoU results"),
    ("training", training_summary, "no trained networks in this run"),
    ("icnn_instability", lambda data: _icnn("icnn_instability_table", data),
     "no interpretable model with an ordinary twin and location-stability results"),
    ("icnn_comparison", lambda data: _icnn("icnn_comparison_table", data),
     "no interpretable model with an ordinary twin (same architecture, recipe and seeds) in this run"),
    *SIMILARITY_BUILDERS,
]


def _icnn(builder: str, data: RunData) -> PaperTable | None:
    """Tables 14–15 (interpretable vs ordinary CNNs) live in ``_interpretable``, which builds on this module."""
    from . import _interpretable

    return getattr(_interpretable, builder)(data)


def build_tables(data: RunData, builders: list[tuple[str, Callable[[RunData], Any], str]] | None = None
                 ) -> list[TableResult]:
    """All paper tables in order (or those of ``builders``: ``(key, builder, reason when absent)``); a skipped
    table carries the reason, a failing one its error."""
    out = []
    for key, builder, reason in (_BUILDERS if builders is None else builders):
        if key.startswith("icnn_") and not any(m.train.interpretable for m in data.config.models):
            continue  # tables 14–15 exist only in runs with an interpretable model
        try:
            table = builder(data)
        except Exception as exc:  # noqa: BLE001 - one broken table must not cost the run its whole report
            log.warning("report table %s failed", key, exc_info=True)
            out.append(TableResult(key, None, f"failed: {type(exc).__name__}: {exc}"))
            continue
        out.append(TableResult(key, table, "" if table is not None else reason))
    return out
