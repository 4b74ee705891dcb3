"""The findings table (``0_findings``): each qualitative claim of the papers, the run's numbers, and whether it holds.

The constraint: a finding is a verdict computed from the same cached stage tables the paper tables show —
never a sentence written in advance — so a run where a claim fails says so, and changing an input changes
the verdict (tested). Each check is a pure function of data frames; :func:`findings_frame` runs them all and
:func:`findings_table` renders the result as a :class:`PaperTable`.

Claims (at the deepest configured layer unless stated; means ± sample std over seeds or pairs):

1. *Bau et al. 2017* — trained networks have more object/part/material detectors (interpretable units whose
   best concept is in one of those categories) than random-init networks: trained mean − random mean
   > 2·√(s_t² + s_r²).
2. *Zhang et al. 2018* — trained networks beat the random-init networks on location instability (lower)
   by more than two standard deviations, and 3. beat the image-centre predictor by more than two standard
   deviations of the trained value (the centre predictor is one number).
4. *Li et al. 2016 / Raghu / Morcos / Kornblith* — seed pairs are more similar than a trained seed vs an
   unrelated random-init network on every metric (SVCCA, PWCCA, linear CKA, Hungarian and semi-matching
   correlation: higher; least-squares held-out loss: lower), one row per layer: the pair-mean comparison.
5. *Li et al. 2016* — L1 regression uses few channels (at most a quarter of the inputs) at a small loss
   increase (held-out loss at most 0.05 above least squares), for some α > 0 on seed pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ._data import RunData
from ._paper import stability_summary
from ._tables import PaperTable, mean_std

__all__ = ["Finding", "findings_frame", "findings_table", "findings_lines", "STRUCTURED_CATEGORIES",
           "FEW_CHANNELS", "SMALL_LOSS_INCREASE", "SIMILARITY_METRICS"]

#: concept categories that count as "object/part/material" detectors (Bau et al.'s higher-level concepts)
STRUCTURED_CATEGORIES = ("object", "part", "material")
#: "few channels": at most this fraction of the input channels per target
FEW_CHANNELS = 0.25
#: "small loss increase": held-out loss (fraction of target variance) at most this much above least squares
SMALL_LOSS_INCREASE = 0.05
#: (summary column, title, higher is more similar)
SIMILARITY_METRICS = (
    ("svcca_mean", "SVCCA", True), ("pwcca", "PWCCA", True), ("linear_cka", "linear CKA", True),
    ("hungarian_mean_corr", "Hungarian r", True), ("semi", "semi-matching r", True),
    ("ls_loss", "least-squares loss", False),
)


@dataclass
class Finding:
    """One claim checked on one layer."""

    claim: str
    paper: str
    layer: str
    measured: str
    test: str
    holds: bool | None  # None: the run has no data for it

    def verdict(self) -> str:
        return "n/a" if self.holds is None else ("holds" if self.holds else "does NOT hold")


def _fmt(values: pd.Series | list[float], digits: int = 3) -> str:
    return mean_std(values, digits).text(show_n=True)


def _gap_test(better: pd.Series, worse: pd.Series, higher: bool) -> tuple[bool | None, float]:
    """Whether ``better`` beats ``worse`` by more than 2·√(s_b² + s_w²) (s = sample std; 0 for one value)."""
    b, w = mean_std(better), mean_std(worse)
    if b.n == 0 or w.n == 0:
        return None, math.nan
    spread = math.sqrt(sum(s * s for s in (b.std, w.std) if math.isfinite(s)))
    gap = (b.mean - w.mean) if higher else (w.mean - b.mean)
    if spread > 0:
        return bool(gap > 2 * spread), gap / spread
    return bool(gap > 0), (math.copysign(math.inf, gap) if gap else 0.0)  # no spread: any gap is decisive


def structured_detectors(iou_summary: pd.DataFrame) -> pd.Series:
    """Per row of the iou ``summary``: interpretable units whose best concept is an object, part or material."""
    cols = [f"detectors_{c}" for c in STRUCTURED_CATEGORIES if f"detectors_{c}" in iou_summary]
    return iou_summary[cols].sum(axis=1) if cols else pd.Series(np.nan, index=iou_summary.index)


def check_detectors(iou_summary: pd.DataFrame, model: str, layer: str, title: str) -> Finding:
    claim = "trained nets have more object/part/material detectors than random-init nets"
    test = "trained − random > 2·√(s_t² + s_r²)"
    if iou_summary.empty:
        return Finding(claim, "Bau et al. 2017", title, "no dissection results", test, None)
    sub = iou_summary[(iou_summary.model == model) & (iou_summary.layer == layer)]
    counts = structured_detectors(sub)
    trained, random = counts[sub.role == "trained"], counts[sub.role == "random"]
    holds, _ = _gap_test(trained, random, higher=True)
    return Finding(claim, "Bau et al. 2017", title, f"trained {_fmt(trained, 1)} vs random {_fmt(random, 1)}",
                   test, holds)


def check_instability(stability: pd.DataFrame, center: float, model: str, layer: str, title: str) -> list[Finding]:
    paper = "Zhang et al. 2018"
    tests = ("trained lower than random init by > 2·√(s_t² + s_r²)", "trained lower than image centre by > 2·s_t")
    claims = ("trained nets' units are more stable relative to landmarks than random-init nets'",
              "trained nets' units are more stable relative to landmarks than the image centre")
    if stability.empty:
        return [Finding(c, paper, title, "no location-stability results", t, None) for c, t in zip(claims, tests)]
    sub = stability[(stability.model == model) & (stability.layer == layer)]
    trained, random = sub.loc[sub.role == "trained", "instability"], sub.loc[sub.role == "random", "instability"]
    holds_random, _ = _gap_test(trained, random, higher=False)
    centre = pd.Series([center]) if math.isfinite(center) else pd.Series(dtype=float)
    holds_centre, _ = _gap_test(trained, centre, higher=False)
    return [
        Finding(claims[0], paper, title, f"trained {_fmt(trained)} vs random {_fmt(random)}", tests[0], holds_random),
        Finding(claims[1], paper, title, f"trained {_fmt(trained)} vs centre {center:.3f}", tests[1], holds_centre),
    ]


def pair_metrics(compare_summary: pd.DataFrame, regression: pd.DataFrame) -> pd.DataFrame:
    """Per (pair, layer) the similarity metrics of :data:`SIMILARITY_METRICS` (``semi``: both directions
    averaged; ``ls_loss``: held-out least-squares loss, both directions averaged)."""
    if compare_summary.empty:
        return pd.DataFrame()
    keys = ["model", "a", "b", "kind", "layer"]
    out = compare_summary.copy()
    if {"semi_a_to_b_mean_corr", "semi_b_to_a_mean_corr"} <= set(out.columns):
        out["semi"] = (out["semi_a_to_b_mean_corr"] + out["semi_b_to_a_mean_corr"]) / 2
    if not regression.empty:
        ls = regression[regression["alpha"] == 0].groupby(keys, as_index=False)["heldout_loss"].mean()
        out = out.merge(ls.rename(columns={"heldout_loss": "ls_loss"}), on=keys, how="left")
    return out


def check_similarity(metrics: pd.DataFrame, model: str, layer: str, title: str) -> Finding:
    claim = "seed pairs are more similar than a seed vs an unrelated random-init net, on every metric"
    test = "pair means: seed better than unrelated on each metric"
    paper = "Li et al. 2016; Raghu 2017; Morcos 2018; Kornblith 2019"
    if metrics.empty:
        return Finding(claim, paper, title, "no comparisons", test, None)
    sub = metrics[(metrics.model == model) & (metrics.layer == layer)]
    seed, null = sub[sub.kind == "seed"], sub[sub.kind == "unrelated"]
    if seed.empty or null.empty:
        return Finding(claim, paper, title, "needs seed pairs and unrelated pairs (≥ 2 seeds, random_baseline)",
                       test, None)
    wins, failed, shown = 0, [], []
    present = [(col, name, higher) for col, name, higher in SIMILARITY_METRICS if col in sub]
    for col, name, higher in present:
        s, n = mean_std(seed[col]), mean_std(null[col])
        win = (s.mean > n.mean) if higher else (s.mean < n.mean)
        wins += bool(win)
        if not win:
            failed.append(name)
        shown.append(f"{name} {s.mean:.2f}/{n.mean:.2f}")
    measured = f"{wins}/{len(present)} metrics (seed/unrelated: " + ", ".join(shown) + ")"
    if failed:
        measured += "; not: " + ", ".join(failed)
    return Finding(claim, paper, title, measured, test, wins == len(present) and len(present) > 0)


def check_sparse_regression(regression: pd.DataFrame, model: str, layer: str, title: str) -> Finding:
    claim = "L1 regression uses few channels at a small loss increase"
    test = (f"some α > 0: channels used ≤ {FEW_CHANNELS:g}·inputs and loss ≤ least-squares loss + "
            f"{SMALL_LOSS_INCREASE:g}")
    if regression.empty:
        return Finding(claim, "Li et al. 2016", title, "no regression results", test, None)
    sub = regression[(regression.model == model) & (regression.layer == layer) & (regression.kind == "seed")]
    if sub.empty:
        return Finding(claim, "Li et al. 2016", title, "no seed pairs", test, None)
    per_alpha = (sub.groupby(["a", "b", "alpha"], as_index=False)
                 .agg(loss=("heldout_loss", "mean"), used=("mean_nonzero", "mean"), inputs=("n_inputs", "mean"))
                 .groupby("alpha").mean(numeric_only=True).sort_index())
    if 0.0 not in per_alpha.index:
        return Finding(claim, "Li et al. 2016", title, "no least-squares (α = 0) fit", test, None)
    base = per_alpha.loc[0.0]
    ok = per_alpha[(per_alpha.index > 0) & (per_alpha["used"] <= FEW_CHANNELS * per_alpha["inputs"])
                   & (per_alpha["loss"] <= base["loss"] + SMALL_LOSS_INCREASE)]
    if ok.empty:
        return Finding(claim, "Li et al. 2016", title, _sparse_miss(per_alpha, base), test, False)
    alpha = ok.index[-1]
    rec = ok.loc[alpha]
    measured = (f"α = {alpha:g}: {rec['used']:.1f}/{rec['inputs']:.0f} channels, loss {rec['loss']:.3f} vs "
                f"least squares {base['loss']:.3f}")
    return Finding(claim, "Li et al. 2016", title, measured, test, True)


def _sparse_miss(per_alpha: pd.DataFrame, base: pd.Series) -> str:
    """The failing trade-off curve around the rule's corner: every α from the sparsest fit still within the
    loss bound to the lowest-loss fit already within the channel bound (the path's ends where a bound is met
    nowhere), so a reader sees by how much each side misses rather than one arbitrary point of the path."""
    sparse = per_alpha[per_alpha.index > 0]
    if sparse.empty:
        return f"least squares loss {base['loss']:.3f}; no α > 0 fitted"
    cheap = sparse[sparse["loss"] <= base["loss"] + SMALL_LOSS_INCREASE]
    few = sparse[sparse["used"] <= FEW_CHANNELS * sparse["inputs"]]
    ends = (cheap["used"].idxmin() if not cheap.empty else sparse.index[0],
            few["loss"].idxmin() if not few.empty else sparse.index[-1])
    around = sparse.loc[min(ends):max(ends)]
    points = [f"α = {alpha:g}: {rec['used']:.1f}/{rec['inputs']:.0f} channels ({rec['used'] / rec['inputs']:.1%}) "
              f"at {rec['loss'] - base['loss']:+.3f}" for alpha, rec in around.iterrows()]
    return f"least squares loss {base['loss']:.3f}; " + "; ".join(points)


def findings_frame(iou_summary: pd.DataFrame, stability: pd.DataFrame, center: float,
                   compare_summary: pd.DataFrame, regression: pd.DataFrame,
                   models: list[tuple[str, list[str]]], multi_model: bool = False) -> list[Finding]:
    """Every finding for every model: claims 1–3 and 5 at its deepest layer, claim 4 at every layer.

    Args:
        iou_summary: iou ``summary`` rows with ``model, layer, role`` and ``detectors_<category>`` columns.
        stability: stability ``summary`` rows with ``model, layer, role, instability``.
        center: the image-centre predictor's instability (NaN when absent).
        compare_summary: compare ``summary`` rows with ``model, a, b, kind, layer`` and the metrics.
        regression: compare ``regression`` rows with ``alpha, heldout_loss, mean_nonzero, n_inputs``.
        models: ``[(model, layers in order)]``; the last layer is the deepest.
    """
    metrics = pair_metrics(compare_summary, regression)
    out: list[Finding] = []
    for model, layers in models:
        if not layers:
            continue
        title = (lambda layer: f"{model} {layer}") if multi_model else (lambda layer: layer)
        deep = layers[-1]
        out.append(check_detectors(iou_summary, model, deep, title(deep)))
        out += check_instability(stability, center, model, deep, title(deep))
        out += [check_similarity(metrics, model, layer, title(layer)) for layer in layers]
        out.append(check_sparse_regression(regression, model, deep, title(deep)))
    return out


def run_findings(data: RunData) -> list[Finding]:
    """:func:`findings_frame` on a run's cached tables, plus Zhang et al. 2018's interpretable-CNN claim where the
    run trains an interpretable model next to its ordinary twin (:func:`._interpretable.icnn_findings`)."""
    from ._interpretable import icnn_findings

    center = data.table("stability_center", "summary")
    found = findings_frame(
        data.table("iou", "summary"), stability_summary(data),
        float(center["instability"].iloc[0]) if not center.empty else math.nan,
        data.table("compare", "summary"), data.table("compare", "regression"), data.models, data.multi_model)
    for row in icnn_findings(data):
        holds = None if row["verdict"] == "no data" else row["verdict"] == "holds"
        found.append(Finding(claim=row["claim"], paper=row["source"], layer=row["layer"],
                             measured=f"{row['measured']} ({row['verdict']})", test=row["expected"], holds=holds))
    return found


def findings_table(data: RunData) -> PaperTable | None:
    """Table 0: the findings with their numbers and verdicts."""
    found = [f for f in run_findings(data) if f.holds is not None]
    if not found:
        return None
    held = sum(bool(f.holds) for f in found)
    return PaperTable(
        name="0_findings",
        title=f"Findings: {held} of {len(found)} hold",
        columns=["Finding", "Paper", "Layer", "Measured", "Test", "Holds"],
        rows=[[f.claim, f.paper, f.layer, f.measured, f.test, f.verdict()] for f in found],
        caption=("Each qualitative finding of the papers this tool reproduces, computed from this run's tables "
                 "(mean ± std (n) over seeds or network pairs; s = sample standard deviation). 'Unrelated': a "
                 "trained network against another seed's untrained network. A finding that does not hold says "
                 "so; nothing here is written in advance."),
    )


def findings_lines(data: Any) -> list[str]:
    """The findings as console lines for the printed summary (``data``: a RunData)."""
    found = [f for f in run_findings(data) if f.holds is not None]
    if not found:
        return []
    held = sum(bool(f.holds) for f in found)
    lines = [f"Findings ({held} of {len(found)} hold; table 0_findings):"]
    for f in found:
        mark = "yes" if f.holds else "NO "
        lines.append(f"  [{mark}] {f.layer}: {f.claim} — {f.measured}")
    return lines
