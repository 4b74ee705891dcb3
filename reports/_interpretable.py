"""Interpretable CNNs against ordinary ones: tables 14 and 15, a figure, the closing note and the findings row.

A run compares the two when it has an *interpretable twin*: a ``[[models]]`` entry trained with
``[models.train] interpretable_layer`` / ``interpretable_weight`` (Zhang et al., CVPR 2018) and another with the
same architecture, arguments and training recipe without them, sharing seeds (``configs/icnn.toml``). Every
number comes from cached stage tables (stability, iou, compare, train), aggregated over the seeds both share:

* ``14_icnn_instability`` — location instability per layer: interpretable vs ordinary vs random init vs the
  image-centre predictor, and in how many seeds the interpretable network is the more stable one. Both are
  measured on the same tensor, the layer's unmasked output (extraction runs the plain network).
* ``15_icnn_comparison`` — validation accuracy (the interpretable network's with its mask), then per layer:
  interpretable units, detectors per concept category, Hungarian- and semi-matched correlation between seeds
  (convergent learning) and the concept agreement of matched interpretable units.
* figure ``icnn_instability`` — table 14 as bars.
* :func:`icnn_findings` — the findings row for Zhang's claim ("interpretable filters have lower location
  instability than ordinary ones"), computed from table 14's per-seed values; :func:`icnn_closing_note` — the
  headline numbers in one paragraph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._data import RunData
from ._paper import categories_of, concept_agreement_rows, stability_summary
from ._tables import PaperTable, mean_std

__all__ = ["IcnnTwin", "icnn_twins", "icnn_instability_table", "icnn_comparison_table", "icnn_instability_figure",
           "icnn_findings", "icnn_closing_note", "icnn_instability_frame"]

CLAIM = "Interpretable filters have lower location instability than ordinary ones"
SOURCE = "Zhang, Wu, Zhu, Interpretable CNNs, CVPR 2018"


@dataclass(frozen=True)
class IcnnTwin:
    """An interpretable model and its ordinary twin (same architecture, recipe and seeds, no filter loss)."""

    icnn: str
    ordinary: str
    layer: str  # the interpretable layer
    layers: tuple[str, ...]  # layers both dissect, in the interpretable model's order
    seeds: tuple[int, ...]  # seeds both train


def _recipe(train: Any) -> dict[str, Any]:
    return {k: v for k, v in train.to_dict().items() if not k.startswith("interpretable_")}


def icnn_twins(data: RunData) -> list[IcnnTwin]:
    """Every interpretable model of the run with its ordinary twin (the first matching one in config order)."""
    out = []
    models = list(data.config.models)
    for m in models:
        if m.init != "trained" or not m.train.interpretable:
            continue
        for o in models:
            if (o is m or o.init != "trained" or o.train.interpretable or o.architecture != m.architecture
                    or dict(o.arch) != dict(m.arch) or _recipe(o.train) != _recipe(m.train)):
                continue
            seeds = tuple(s for s in m.seeds if s in o.seeds)
            layers = tuple(layer for layer in m.layers if layer in o.layers)
            if seeds and layers:
                out.append(IcnnTwin(m.name, o.name, m.train.interpretable_layer, layers, seeds))
                break
    return out


def _layer_title(twin: IcnnTwin, layer: str, many: bool) -> str:
    title = f"{layer} (interpretable)" if layer == twin.layer else layer
    return f"{twin.icnn}: {title}" if many else title


def icnn_instability_frame(data: RunData, twin: IcnnTwin) -> pd.DataFrame:
    """Per layer and seed: ``layer, seed, icnn, ordinary, random`` instabilities (NaN where absent)."""
    summary = stability_summary(data)
    if summary.empty:
        return pd.DataFrame(columns=["layer", "seed", "icnn", "ordinary", "random"])
    rows = []
    for layer in twin.layers:
        for seed in twin.seeds:
            def value(model: str, role: str) -> float:
                sub = summary[(summary.model == model) & (summary.layer == layer) & (summary.seed == seed)
                              & (summary.role == role)]
                return float(sub["instability"].iloc[0]) if len(sub) else math.nan

            random = value(twin.ordinary, "random")
            if math.isnan(random):
                random = value(twin.icnn, "random")
            rows.append({"layer": layer, "seed": seed, "icnn": value(twin.icnn, "trained"),
                         "ordinary": value(twin.ordinary, "trained"), "random": random})
    return pd.DataFrame(rows)


def _lower_count(frame: pd.DataFrame) -> tuple[int, int]:
    both = frame.dropna(subset=["icnn", "ordinary"])
    return int((both["icnn"] < both["ordinary"]).sum()), int(len(both))


def icnn_instability_table(data: RunData) -> PaperTable | None:
    """Table 14: location instability, interpretable vs ordinary vs random init vs image centre."""
    twins = icnn_twins(data)
    if not twins or stability_summary(data).empty:
        return None
    center = data.table("stability_center", "summary")
    center_value = float(center["instability"].iloc[0]) if not center.empty else math.nan
    rows = []
    for twin in twins:
        frame = icnn_instability_frame(data, twin)
        for layer in twin.layers:
            sub = frame[frame.layer == layer]
            lower, n = _lower_count(sub)
            rows.append([_layer_title(twin, layer, len(twins) > 1), mean_std(sub["icnn"].dropna()),
                         mean_std(sub["ordinary"].dropna()), mean_std(sub["random"].dropna()), center_value,
                         f"{lower}/{n}" if n else None])
    return PaperTable(
        name="14_icnn_instability",
        title="Location instability: interpretable vs ordinary CNNs",
        columns=["Layer", "Interpretable", "Ordinary", "Random init", "Image centre", "Seeds interp. lower"],
        rows=rows,
        caption=("Zhang et al.'s location instability (lower = more stable; definition as in table 3) of the same "
                 "architecture trained from the same seeds with the filter loss and template mask on the "
                 "interpretable layer and without them, both measured on that layer's unmasked output; the "
                 "random-init networks and the image-centre predictor are the baselines. Last column: seeds in "
                 "which the interpretable network's value is the lower one. Mean ± std (n seeds)."),
    )


def _train_frame(data: RunData) -> pd.DataFrame:
    rows = []
    for label, entry in data.entries("train"):
        acc = entry.extras.get("final_val_acc")
        if acc is None and "history" in entry.manifest.get("tables", {}):
            acc = float(entry.frame("history")["val_acc"].iloc[-1])
        rows.append({"model": label.get("model"), "seed": int(label.get("seed", -1)),
                     "val_acc": math.nan if acc is None else float(acc)})
    return pd.DataFrame(rows, columns=["model", "seed", "val_acc"])


def _seed_pairs(frame: pd.DataFrame, model: str, layer: str, seeds: tuple[int, ...], data: RunData) -> pd.DataFrame:
    """Rows of a per-pair frame (``a``, ``b``, ``kind``, ``layer``) for seed pairs of ``model`` within ``seeds``."""
    if frame.empty:
        return frame
    names = {f"{i.name}" for i in data.trained(model) if i.seed in seeds}
    return frame[(frame.kind == "seed") & (frame.layer == layer) & frame["a"].isin(names) & frame["b"].isin(names)]


def icnn_comparison_table(data: RunData) -> PaperTable | None:
    """Table 15: accuracy cost, detectors per category and convergence across seeds, side by side."""
    twins = icnn_twins(data)
    if not twins:
        return None
    train = _train_frame(data)
    iou = data.table("iou", "summary")
    cats = categories_of(iou) if not iou.empty else []
    cmp_ = data.table("compare", "summary")
    agreement = concept_agreement_rows(data)
    rows: list[list[Any]] = []
    rules: list[int] = []
    for twin in twins:
        prefix = f"{twin.icnn}: " if len(twins) > 1 else ""
        if not train.empty:
            acc = {m: train[(train.model == m) & train.seed.isin(twin.seeds)]["val_acc"].dropna()
                   for m in (twin.icnn, twin.ordinary)}
            rows.append([f"{prefix}all", "Validation accuracy", mean_std(acc[twin.icnn]), mean_std(acc[twin.ordinary])])
        for layer in twin.layers:
            rules.append(len(rows) - 1)
            title = prefix + (f"{layer} (interpretable)" if layer == twin.layer else layer)

            def per_seed(model: str, column: str) -> pd.Series:
                if iou.empty or column not in iou:
                    return pd.Series(dtype=float)
                sub = iou[(iou.model == model) & (iou.layer == layer) & (iou.role == "trained") & iou.seed.isin(twin.seeds)]
                return sub[column]

            if not iou.empty:
                rows.append([title, "Interpretable units", mean_std(per_seed(twin.icnn, "interpretable_units"), digits=1),
                             mean_std(per_seed(twin.ordinary, "interpretable_units"), digits=1)])
                for cat in cats:
                    rows.append([title, f"Detectors: {cat}", mean_std(per_seed(twin.icnn, f"detectors_{cat}"), digits=1),
                                 mean_std(per_seed(twin.ordinary, f"detectors_{cat}"), digits=1)])
            if not cmp_.empty and "hungarian_mean_corr" in cmp_:
                a = _seed_pairs(cmp_, twin.icnn, layer, twin.seeds, data)
                b = _seed_pairs(cmp_, twin.ordinary, layer, twin.seeds, data)
                rows.append([title, "Hungarian-matched r (seed pairs)", mean_std(a["hungarian_mean_corr"]),
                             mean_std(b["hungarian_mean_corr"])])
                if "semi_a_to_b_mean_corr" in cmp_:
                    semi = lambda f: (f["semi_a_to_b_mean_corr"] + f["semi_b_to_a_mean_corr"]) / 2  # noqa: E731
                    rows.append([title, "Semi-matched r (seed pairs)", mean_std(semi(a)), mean_std(semi(b))])
            if not agreement.empty:
                a = _seed_pairs(agreement, twin.icnn, layer, twin.seeds, data)
                b = _seed_pairs(agreement, twin.ordinary, layer, twin.seeds, data)
                rows.append([title, "Matched interpretable pairs, same label", mean_std(a["same"].dropna()),
                             mean_std(b["same"].dropna())])
    if not rows:
        return None
    return PaperTable(
        name="15_icnn_comparison",
        title="Interpretable vs ordinary CNNs: accuracy, detectors and convergence across seeds",
        columns=["Layer", "Measure", "Interpretable", "Ordinary"],
        rows=rows,
        caption=("The same architecture and seeds with and without the filter loss. Validation accuracy: after the "
                 "last epoch (the interpretable network with its template mask). Interpretable units and detectors "
                 "per category: units whose best concept IoU exceeds the threshold (table 1). Matched r: mean "
                 "between-seed correlation of one-to-one (Hungarian) and semi-matched units (table 4) — do "
                 "interpretable filters converge across seeds more than ordinary ones? Same label: among "
                 "Hungarian-matched pairs of interpretable units, the fraction with the same concept label "
                 "(table 7). Mean ± std (n seeds or seed pairs)."),
        rules_after=[r for r in rules if r >= 0],
    )


def icnn_findings(data: RunData) -> list[dict[str, Any]]:
    """The findings row(s) for Zhang's claim, one per interpretable twin, from table 14's per-seed values.

    Keys: ``claim``, ``source``, ``layer``, ``expected``, ``measured``, ``verdict`` (``"holds"``: lower in every seed;
    ``"mixed"``: lower on average but not in every seed; ``"does not hold"``; ``"no data"``) and ``evidence``
    (the table it comes from).
    """
    out = []
    for twin in icnn_twins(data):
        frame = icnn_instability_frame(data, twin)
        sub = frame[frame.layer == twin.layer].dropna(subset=["icnn", "ordinary"])
        row = {"claim": CLAIM, "source": SOURCE, "layer": twin.layer,
               "expected": "interpretable < ordinary at the interpretable layer",
               "evidence": "table 14_icnn_instability"}
        if sub.empty:
            row.update(measured="no paired seeds with instability values", verdict="no data")
        else:
            lower, n = _lower_count(sub)
            layers = frame.dropna(subset=["icnn", "ordinary"])
            all_lower, all_n = _lower_count(layers)
            row["measured"] = (f"{twin.layer}: {sub['icnn'].mean():.3f} vs {sub['ordinary'].mean():.3f}, lower in "
                               f"{lower}/{n} seeds (all dissected layers: {all_lower}/{all_n} layer-seeds)")
            row["verdict"] = ("holds" if lower == n else "mixed" if sub["icnn"].mean() < sub["ordinary"].mean()
                              else "does not hold")
        out.append(row)
    return out


def icnn_closing_note(data: RunData) -> str | None:
    """One paragraph with the headline numbers (instability, accuracy cost, convergence), or ``None``."""
    twins = icnn_twins(data)
    if not twins:
        return None
    train = _train_frame(data)
    cmp_ = data.table("compare", "summary")
    center = data.table("stability_center", "summary")
    parts = []
    for twin in twins:
        frame = icnn_instability_frame(data, twin)
        sub = frame[frame.layer == twin.layer]
        text = [f"Interpretable CNN ({twin.icnn}, filter loss on {twin.layer}) vs ordinary ({twin.ordinary}), "
                f"{len(twin.seeds)} seeds:"]
        if sub[["icnn", "ordinary"]].notna().any().all():
            lower, n = _lower_count(sub)
            text.append(f"location instability at {twin.layer} {sub['icnn'].mean():.3f} vs {sub['ordinary'].mean():.3f} "
                        f"(lower in {lower}/{n} seeds; random init {sub['random'].mean():.3f}"
                        + (f", image centre {float(center['instability'].iloc[0]):.3f}" if not center.empty else "")
                        + ");")
        if not train.empty:
            acc_i = train[(train.model == twin.icnn) & train.seed.isin(twin.seeds)]["val_acc"].mean()
            acc_o = train[(train.model == twin.ordinary) & train.seed.isin(twin.seeds)]["val_acc"].mean()
            text.append(f"validation accuracy {acc_i:.3f} vs {acc_o:.3f} (cost {acc_o - acc_i:+.3f});")
        if not cmp_.empty and "hungarian_mean_corr" in cmp_:
            a = _seed_pairs(cmp_, twin.icnn, twin.layer, twin.seeds, data)["hungarian_mean_corr"]
            b = _seed_pairs(cmp_, twin.ordinary, twin.layer, twin.seeds, data)["hungarian_mean_corr"]
            if len(a) and len(b):
                text.append(f"Hungarian-matched correlation between seeds at {twin.layer} {a.mean():.3f} vs {b.mean():.3f}.")
        parts.append(" ".join(text))
    return " ".join(parts)


def icnn_instability_figure(data: RunData, fig_dir: Path) -> Any:
    """Figure ``icnn_instability``: table 14 as grouped bars (mean over seeds, std error bars); ``[]`` (no
    figure, nothing skipped) in a run without an interpretable model."""
    from . import _figures as F
    from ._plots import FigureResult

    key = "icnn_instability"
    if not any(m.train.interpretable for m in data.config.models):
        return []  # only in runs with an interpretable model
    twins = icnn_twins(data)
    if not twins or stability_summary(data).empty:
        return FigureResult(key, "Interpretable vs ordinary: location instability",
                            skipped="no interpretable twin with location-stability results in this run")
    groups, means, stds = [], [], []
    for twin in twins:
        frame = icnn_instability_frame(data, twin)
        for layer in twin.layers:
            sub = frame[frame.layer == layer]
            groups.append(_layer_title(twin, layer, len(twins) > 1).replace(" (interpretable)", "*"))
            means.append([sub[c].mean() for c in ("icnn", "ordinary", "random")])
            stds.append([sub[c].std(ddof=1) if sub[c].notna().sum() > 1 else np.nan for c in ("icnn", "ordinary", "random")])
    means_a, stds_a = np.array(means, dtype=float), np.array(stds, dtype=float)
    fig, ax = F.new_figure(F.COLUMN_INCHES, 2.4)
    F.grouped_bars(ax, groups, ["interpretable", "ordinary", "random init"], means_a, stds=stds_a,
                   ylabel="location instability", colors=[F.PALETTE[2], F.PALETTE[0], F.PALETTE[8]])
    center = data.table("stability_center", "summary")
    tops = list(means_a.ravel() + np.nan_to_num(stds_a.ravel()))
    if not center.empty:
        value = float(center["instability"].iloc[0])
        ax.axhline(value, color=F.PALETTE[5], linestyle="--", linewidth=1.0, label="image centre")
        tops.append(value)
    ax.legend(frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=2, handlelength=1.5,
              columnspacing=1.0)
    top = np.nanmax(tops) if tops else np.nan
    ax.set_ylim(0, top * 1.15 if np.isfinite(top) and top > 0 else 1)
    path = fig_dir / f"{key}.png"
    F.save_figure(fig, path)
    return FigureResult(key, "Interpretable vs ordinary: location instability", path=path.name,
                        caption=("Table 14 as bars: location instability per layer of the interpretable network "
                                 "(* marks the layer with the filter loss), its ordinary twin from the same seeds, "
                                 "their random initialisations and the image-centre predictor (dashed). Bars: "
                                 "mean over seeds; error bars: std."))
