"""write_report on a synthetic finished run: every table equals aggregates recomputed from the stage tables,
the LaTeX is valid, the page is self-contained, escaped and every link resolves (also in headless Chromium)."""

import dataclasses
import json
import math
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from repdissect.reports import summary_text, write_report

TABLES = ["1_dissection_summary", "2_top_units", "3_location_instability", "4_convergent_learning", "5_regression",
          "6_similarity", "7_concept_agreement", "8_training", "9_similarity_uncertainty", "10_layer_by_layer",
          "11_layer_identification", "17_sensitivity"]
FIGURES = ["correlation_cnn", "detectors", "svcca_curves", "cka_layers", "regression_curves", "location_instability",
           "concept_agreement",
           "exemplars_cnn_s0_conv1", "exemplars_cnn_s0_conv2"]


def _csv(index, name):
    return pd.read_csv(index.parent / "tables" / f"{name}.csv", keep_default_na=False, na_values=[""])


def _role(instance):
    return "random" if instance.endswith("-random") else "trained"


def _check(stat_row, column, values):
    """A CSV row's <column>_mean/_std/_n equal numpy's aggregate of ``values``."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    assert stat_row[f"{column}_n"] == len(values)
    if len(values):
        assert stat_row[f"{column}_mean"] == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)
    if len(values) > 1:
        assert stat_row[f"{column}_std"] == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12)
    else:
        assert math.isnan(stat_row[f"{column}_std"])


def test_every_table_and_figure_is_written(fake_run):
    _, index = fake_run
    out = index.parent
    for name in TABLES:
        for ext in ("md", "tex", "csv"):
            assert (out / "tables" / f"{name}.{ext}").stat().st_size > 0, f"{name}.{ext}"
    for name in FIGURES:
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000, name
    record = json.loads((out / "report.json").read_text())
    assert record["skipped"] == {}
    assert all((out / f).is_file() for f in record["files"])


def test_latex_tables_are_valid(fake_run, check_latex):
    _, index = fake_run
    for name in TABLES:
        tex = (index.parent / "tables" / f"{name}.tex").read_text()
        assert check_latex(tex) == [], (name, check_latex(tex))
        assert tex.count(r"\begin{table") == 1 and r"\bottomrule" in tex


def test_dissection_summary_equals_stage_aggregates(fake_run):
    result, index = fake_run
    stage = result.tables("iou", "summary")
    stage["role"] = stage["instance"].map(_role)
    table = _csv(index, "1_dissection_summary")
    cats = [c[len("unique_detectors_"):] for c in stage.columns
            if c.startswith("unique_detectors_") and c != "unique_detectors_total"]
    assert len(table) == 4
    for _, row in table.iterrows():
        role = "random" if row["Network"] == "random init" else "trained"
        sub = stage[(stage.layer == row["Layer"]) & (stage.role == role)]
        assert int(row["Units"]) == sub["units"].iloc[0]
        _check(row, "Interpretable units", sub["interpretable_units"])
        _check(row, "Unique detectors", sub["unique_detectors_total"])
        for cat in cats:
            _check(row, f"Unique {cat}", sub[f"unique_detectors_{cat}"])


def test_top_units_are_the_highest_iou_units(fake_run):
    result, index = fake_run
    units = result.tables("iou", "units")
    table = _csv(index, "2_top_units")
    for (layer, inst), grp in table.groupby(["Layer", "Network"]):
        assert _role(inst) == "trained"
        stage = units[(units.layer == layer) & (units.instance == inst)].sort_values("iou", ascending=False)
        assert grp["Unit"].tolist() == stage["unit"].head(len(grp)).tolist()
        assert grp["IoU"].tolist() == pytest.approx(stage["iou"].head(len(grp)).tolist())
        assert grp["Rank"].tolist() == list(range(1, len(grp) + 1))


def test_location_instability_equals_stage_aggregates(fake_run):
    result, index = fake_run
    stage = result.tables("stability", "summary")
    stage["role"] = stage["instance"].map(_role)
    center = result.tables("stability_center", "summary")["instability"].iloc[0]
    table = _csv(index, "3_location_instability")
    for _, row in table.iterrows():
        sub = stage[stage.layer == row["Layer"]]
        _check(row, "Trained", sub.loc[sub.role == "trained", "instability"])
        _check(row, "Random init", sub.loc[sub.role == "random", "instability"])
        _check(row, "Valid units (trained)", sub.loc[sub.role == "trained", "valid_units"])
        assert row["Image centre"] == pytest.approx(center)


def test_convergent_learning_and_similarity_equal_stage_aggregates(fake_run):
    result, index = fake_run
    stage = result.tables("compare", "summary")
    conv = _csv(index, "4_convergent_learning")
    sim = _csv(index, "6_similarity")
    for _, row in conv.iterrows():
        seeds = stage[(stage.layer == row["Layer"]) & (stage.kind == "seed")]
        layer = stage[stage.layer == row["Layer"]]
        _check(row, "Semi-matching", (seeds.semi_a_to_b_mean_corr + seeds.semi_b_to_a_mean_corr) / 2)
        _check(row, "Hungarian", seeds.hungarian_mean_corr)
        _check(row, "Bottleneck", seeds.bottleneck_mean_corr)
        _check(row, "Within-net max", (seeds.within_a_mean_max_corr + seeds.within_b_mean_max_corr) / 2)
        for kind, short in (("unrelated", "unrelated rnd"), ("random_pair", "rnd vs rnd"), ("drift", "drift")):
            _check(row, f"Hungarian ({short})", layer.loc[layer.kind == kind, "hungarian_mean_corr"])
    for _, row in sim.iterrows():
        sub = stage[stage.layer == row["Layer"]]
        for metric, title in (("svcca_mean", "SVCCA"), ("pwcca", "PWCCA"), ("linear_cka", "Linear CKA")):
            for kind, short in (("seed", "seeds"), ("unrelated", "unrelated rnd"), ("random_pair", "rnd vs rnd"),
                                ("drift", "drift")):
                _check(row, f"{title} ({short})", sub.loc[sub.kind == kind, metric])


def test_regression_equals_stage_aggregates(fake_run):
    result, index = fake_run
    stage = result.tables("compare", "regression")
    table = _csv(index, "5_regression")
    assert len(table) == 2 * stage["alpha"].nunique()
    for _, row in table.iterrows():
        alpha = 0.0 if row["L1 α"].startswith("0 ") else float(row["L1 α"])
        sub = stage[(stage.layer == row["Layer"]) & np.isclose(stage.alpha, alpha)]
        for kind, col in (("seed", "Held-out loss"), ("unrelated", "Loss (unrelated rnd)"), ("drift", "Loss (drift)")):
            per_pair = [g.heldout_loss.mean() for _, g in sub[sub.kind == kind].groupby(["a", "b"])]
            _check(row, col, per_pair)
        used = [g.mean_nonzero.mean() for _, g in sub[sub.kind == "seed"].groupby(["a", "b"])]
        _check(row, "Channels used", used)
        assert row["of"] == sub["n_inputs"].max()


def _agreement_reference(result):
    """Straightforward loop version of table 7's per-pair numbers."""
    units = result.tables("iou", "units")
    matches = result.tables("compare", "matches")
    info = {(r.instance, r.layer, r.unit): (bool(r.interpretable), int(r.label)) for r in units.itertuples()}
    rows = []
    for (a, b, kind, layer), grp in matches[matches.method == "hungarian"].groupby(["a", "b", "kind", "layer"]):
        pairs = []
        for r in grp.itertuples():
            ia, la = info[(a, layer, r.unit_a)]
            ib, lb = info[(b, layer, r.unit_b)]
            if ia and ib:
                pairs.append((r.corr, r.unit_a, la, lb))
        m = len(pairs)
        rec = {"kind": kind, "layer": layer, "pairs": m}
        if m:
            b_labels = [p[3] for p in pairs]
            rec["same"] = sum(p[2] == p[3] for p in pairs) / m
            rec["chance"] = sum(b_labels.count(p[2]) / m for p in pairs) / m
            ranked = sorted(pairs, key=lambda p: (-p[0], p[1]))
            top = ranked[: (m + 1) // 2]
            bottom = ranked[(m + 1) // 2:]
            rec["top"] = sum(p[2] == p[3] for p in top) / len(top)
            rec["bottom"] = sum(p[2] == p[3] for p in bottom) / len(bottom) if bottom else math.nan
        else:
            rec.update(same=math.nan, chance=math.nan, top=math.nan, bottom=math.nan)
        rows.append(rec)
    return pd.DataFrame(rows)


def test_concept_agreement_equals_loop_reference(fake_run):
    result, index = fake_run
    ref = _agreement_reference(result)
    table = _csv(index, "7_concept_agreement")
    from repdissect.reports._paper import KIND_TITLE

    kinds = {title: kind for kind, title in KIND_TITLE.items()}
    assert len(table) == 2 * 4
    for _, row in table.iterrows():
        sub = ref[(ref.layer == row["Layer"]) & (ref.kind == kinds[row["Network pairs"]])]
        _check(row, "Matched pairs, both interpretable", sub["pairs"])
        _check(row, "Same label", sub["same"])
        _check(row, "Chance", sub["chance"])
        _check(row, "Same label, top half by corr.", sub["top"])
        _check(row, "Same label, bottom half", sub["bottom"])


def test_concept_agreement_counts_planted_agreement():
    """Two nets whose matched units carry identical labels agree fully; chance is Σ p_l² of the labels."""
    from repdissect.reports._paper import concept_agreement_rows

    class Data:
        def table(self, stage, name):
            if stage == "compare":
                return pd.DataFrame({"model": "m", "a": "x", "b": "y", "kind": "seed", "layer": "L",
                                     "method": "hungarian", "unit_a": [0, 1, 2, 3], "unit_b": [3, 2, 1, 0],
                                     "corr": [0.9, 0.8, 0.7, 0.6]})
            labels = [5, 5, 6, 7]
            return pd.DataFrame({"instance": ["x"] * 4 + ["y"] * 4, "layer": "L", "unit": [0, 1, 2, 3] * 2,
                                 "label": labels + labels[::-1], "interpretable": True})

    rows = concept_agreement_rows(Data())
    rec = rows.iloc[0]
    assert rec["pairs"] == 4 and rec["same"] == 1.0 and rec["same_top"] == 1.0 and rec["same_bottom"] == 1.0
    assert rec["chance"] == pytest.approx((2 / 4) ** 2 + (1 / 4) ** 2 + (1 / 4) ** 2)


def test_training_summary_equals_stage_values(fake_run):
    result, index = fake_run
    table = _csv(index, "8_training")
    runs = table[table["Network"] != "mean ± std"]
    extras = {label["seed"]: entry.extras for label, entry in result.entries("train")}
    assert len(runs) == len(extras)
    for _, row in runs.iterrows():
        ex = extras[str(int(row["Seed"]))]
        # The mean ± std row expands these columns into _mean/_std/_n; a single run has n = 1.
        assert row["Final val accuracy_mean"] == pytest.approx(ex["final_val_acc"])
        assert row["Final train accuracy_mean"] == pytest.approx(ex["final_train_acc"])
        assert row["Epochs_mean"] == ex["epochs"] and row["Epochs_n"] == 1
        assert row["Time (s)_mean"] == pytest.approx(ex["train_seconds"])
    mean = table[table["Network"] == "mean ± std"].iloc[0]
    _check(mean, "Final val accuracy", [e["final_val_acc"] for e in extras.values()])


def test_page_is_escaped_and_links_resolve(fake_run, inspect_html):
    _, index = fake_run
    refs, scripts, text, unresolved = inspect_html(index)
    assert scripts == 0
    assert unresolved == []
    markup = index.read_text()
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert '<script>alert("x")</script>' in text
    srcs = {v for tag, attr, v in refs if tag == "img"}
    assert {f"figures/{name}.png" for name in FIGURES} <= srcs
    assert any(v.startswith("units/cnn_s0/conv2/unit_") for v in srcs)
    hrefs = {v for tag, attr, v in refs if tag == "a"}
    for name in TABLES:
        assert {f"tables/{name}.{ext}" for ext in ("csv", "tex", "md")} <= hrefs


def test_summary_text_is_compact(fake_run):
    result, _ = fake_run
    text = summary_text(result)
    lines = text.splitlines()
    assert len(lines) <= 25
    assert any(line.strip().startswith("conv1") for line in lines)
    assert any(line.strip().startswith("conv2") for line in lines)
    assert "nan" not in text.lower()


def test_missing_stages_are_skipped_with_reasons(fake_run, tmp_path, inspect_html):
    result, _ = fake_run
    dropped = ("stability", "stability_center", "cka", "iou")
    plan = dataclasses.replace(result.plan, nodes=[n for n in result.plan.nodes if n.stage not in dropped])
    partial = dataclasses.replace(result, plan=plan, out_dir=tmp_path / "out")
    index = write_report(partial)
    record = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(record["skipped"]) == {"dissection_summary", "top_units", "location_instability", "concept_agreement",
                                      "detectors", "cka_layers", "exemplars", "category_detectors"}
    assert not (tmp_path / "out" / "tables" / "3_location_instability.csv").exists()
    assert (tmp_path / "out" / "tables" / "4_convergent_learning.csv").exists()
    assert "skipped" in index.read_text()
    assert inspect_html(index)[3] == []


def test_regenerating_removes_only_files_of_the_previous_report(fake_run, tmp_path):
    result, _ = fake_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "figures").mkdir()
    (out / "figures" / "stale.png").write_bytes(b"x")
    (out / "notes.txt").write_text("mine")
    (out / "report.json").write_text(json.dumps({"files": ["figures/stale.png", "../outside.txt"]}))
    (tmp_path / "outside.txt").write_text("keep")
    # Only the training stage: a fast report with one table.
    plan = dataclasses.replace(result.plan, nodes=[n for n in result.plan.nodes if n.stage == "train"])
    write_report(dataclasses.replace(result, plan=plan, out_dir=out))
    assert not (out / "figures" / "stale.png").exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert (tmp_path / "outside.txt").exists()
    assert (out / "tables" / "8_training.csv").exists()
    written = set(json.loads((out / "report.json").read_text())["files"])
    assert written == {"index.html"} | {f"tables/8_training.{ext}" for ext in ("csv", "md", "tex")}


_PROBE = """<script>
window.addEventListener("load", () => {
  const bad = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify({images: document.images.length, broken: bad,
                                      scripts: document.scripts.length});
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_page_loads_in_headless_chromium(fake_run, tmp_path):
    _, index = fake_run
    # A probe copy next to the page: the same relative links, eager image loading, and one script of ours
    # that reports which images failed to load.
    markup = index.read_text().replace(' loading="lazy"', "").replace("</body>", _PROBE + "</body>")
    probe = index.parent / "_probe.html"
    probe.write_text(markup)
    try:
        proc = subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
             "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    dom = proc.stdout
    assert '<pre id="probe">' in dom, proc.stderr[-2000:]
    payload = json.loads(__import__("html").unescape(dom.split('<pre id="probe">')[1].split("</pre>")[0]))
    assert payload["images"] >= len(FIGURES)
    assert payload["broken"] == []
    assert payload["scripts"] == 1, "only the probe's own script may run: data must never become markup"


def test_matching_order_puts_matched_pairs_on_the_diagonal():
    from repdissect.reports._plots import matching_order

    rng = np.random.default_rng(3)
    perm = rng.permutation(6)
    corr = np.full((5, 6), 0.1)
    matched = pd.DataFrame({"unit_a": np.arange(5), "unit_b": perm[:5], "corr": rng.uniform(0.5, 1, 5)})
    corr[matched.unit_a, matched.unit_b] = matched["corr"]
    rows, cols = matching_order(5, 6, matched)
    assert sorted(rows) == list(range(5)) and sorted(cols) == list(range(6))
    diag = corr[rows, cols[:5]]
    assert diag.tolist() == sorted(matched["corr"], reverse=True)
    assert cols[5] == perm[5], "the unmatched unit comes last"


def test_cka_panels_average_the_stage_table(fake_run):
    from repdissect.reports._data import RunData
    from repdissect.reports._plots import cka_panels

    result, _ = fake_run
    stage = result.tables("cka", "cka")
    panels = cka_panels(RunData(result))
    assert [(p[1], p[4]) for p in panels] == [("seed", 3), ("unrelated", 3), ("random_pair", 3), ("drift", 3)]
    for _model, kind, layers, mat, _n in panels:
        for i, la in enumerate(layers):
            for j, lb in enumerate(layers):
                sub = stage[(stage.kind == kind) & (stage.layer_a == la) & (stage.layer_b == lb)]
                assert mat[i, j] == pytest.approx(sub["linear_cka"].mean())


@pytest.mark.skipif(shutil.which("pdflatex") is None and not os.environ.get("CI"),
                    reason="pdflatex is not installed (Debian: texlive-latex-recommended); CI installs it")
def test_latex_tables_compile(fake_run, tmp_path):
    """Every generated .tex table compiles in a minimal booktabs document (CI always runs this)."""
    _, index = fake_run
    tables = sorted((index.parent / "tables").glob("*.tex"))
    assert {t.stem for t in tables} >= set(TABLES)
    inputs = "\n".join(rf"\input{{{t.as_posix()}}}" for t in tables)
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage{booktabs,graphicx}\n"
                   "\\usepackage[margin=1cm,landscape]{geometry}\n\\begin{document}\n" + inputs + "\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert "Missing character" not in log


def test_layers_without_valid_units_have_no_instability():
    from repdissect.reports._paper import stability_summary

    class Data:
        def table(self, stage, name):
            return pd.DataFrame({"instance": ["x", "y"], "layer": "L", "valid_units": [0, 3],
                                 "instability": [0.0, 0.12]})

    values = stability_summary(Data())["instability"]
    assert math.isnan(values.iloc[0]) and values.iloc[1] == 0.12


def test_relative_output_folder_gives_relative_links(fake_run, tmp_path, monkeypatch, inspect_html):
    result, _ = fake_run
    monkeypatch.chdir(tmp_path)
    plan = dataclasses.replace(result.plan, nodes=[n for n in result.plan.nodes if n.stage in ("train", "compare")])
    index = write_report(dataclasses.replace(result, plan=plan, out_dir="runs/rel"))
    assert index == tmp_path / "runs" / "rel" / "index.html"
    refs, _, _, unresolved = inspect_html(index)
    assert unresolved == []
    assert "figures/correlation_cnn.png" in {v for _, _, v in refs}


def test_similarity_tables_trace_to_the_similarity_stage(fake_run):
    from repdissect.stages.compare import layer_identification

    result, index = fake_run
    stage = result.tables("similarity", "similarity")
    seeds = stage[stage.kind == "seed"]
    expected = layer_identification(seeds, ["conv1", "conv2"])
    table = pd.read_csv(index.parent / "tables" / "11_layer_identification.csv")
    assert list(table["Metric"]) == list(expected.metric)
    np.testing.assert_allclose(table["Accuracy"], expected.accuracy, atol=1e-3)
    nine = pd.read_csv(index.parent / "tables" / "9_similarity_uncertainty.csv")
    row = nine[(nine.Layer == "conv1") & (nine.Metric == "debiased_cka")].iloc[0]
    same = seeds[(seeds.layer_a == "conv1") & (seeds.layer_b == "conv1") & (seeds.metric == "debiased_cka")]
    assert row["Jackknife s.e."] == pytest.approx(same.se.mean(), abs=1e-3)
