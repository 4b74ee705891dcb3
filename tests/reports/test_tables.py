"""PaperTable renderings (Markdown, LaTeX, CSV), escaping and the mean ± std (n) aggregator."""

import io
import math

import numpy as np
import pandas as pd
import pytest

from repdissect.reports._tables import MeanStd, PaperTable, aggregate, latex_escape, markdown_escape, mean_std

NASTY = ["a_b", "50%", "R&D", "#1", "$x$", "{set}", "~home", "x^2", "back\\slash", "<script>alert(1)</script>",
         "pipe|name", "*bold*"]


def _table(labels=NASTY):
    rows = [[lab, i, 0.5 + i / 10, mean_std([1.0, 2.0, 4.0])] for i, lab in enumerate(labels)]
    return PaperTable(name="t_demo", title="Demo: 100% of units_x", columns=["label", "count", "IoU", "score"],
                      rows=rows, caption="Caption with & and _", notes=["n = seeds; ± is the sample std"],
                      rules_after=[1])


@pytest.mark.parametrize("values", [[1.0], [1.0, 3.0], [0.2, 0.4, 0.9, 1.7], [np.nan, 1.0, 2.0], [], [np.inf]])
def test_mean_std_matches_numpy(values):
    got = mean_std(values)
    finite = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    assert got.n == finite.size
    if finite.size:
        assert got.mean == pytest.approx(finite.mean())
    else:
        assert math.isnan(got.mean)
    if finite.size > 1:
        assert got.std == pytest.approx(finite.std(ddof=1))
    else:
        assert math.isnan(got.std)


@pytest.mark.parametrize("stat, text", [
    (MeanStd(0.12345, 0.01, 3), "0.123 ± 0.010 (3)"),
    (MeanStd(0.5, math.nan, 1), "0.500 (1)"),
    (MeanStd(math.nan, math.nan, 0), "–"),
    (MeanStd(12.0, 1.5, 2, digits=1), "12.0 ± 1.5 (2)"),
])
def test_mean_std_text(stat, text):
    assert stat.text() == text


def test_aggregate_groups_in_order_and_equals_manual():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"layer": ["b", "a", "b", "a", "b"], "v": rng.normal(size=5), "w": rng.normal(size=5)})
    got = aggregate(frame, "layer", ["v", "w"])
    assert list(got) == ["b", "a"]
    for layer, stats in got.items():
        sub = frame[frame.layer == layer]
        assert stats["v"].mean == pytest.approx(sub.v.mean())
        assert stats["w"].std == pytest.approx(sub.w.std(ddof=1))
        assert stats["v"].n == len(sub)
    two = aggregate(frame.assign(k=1), ["layer", "k"], ["v"])
    assert set(two) == {("b", 1), ("a", 1)}
    assert aggregate(frame.iloc[:0], "layer", ["v"]) == {}


def test_latex_is_valid_and_escapes_every_special(check_latex):
    tex = _table().to_latex()
    assert check_latex(tex) == [], tex
    for needle in [r"a\_b", r"50\%", r"R\&D", r"\#1", r"\$x\$", r"\{set\}", r"\textasciitilde{}home",
                   r"x\textasciicircum{}2", r"back\textbackslash{}slash", r"\textless{}script\textgreater{}"]:
        assert needle in tex
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\label{tab:t_demo}" in tex
    assert tex.count(r"\midrule") == 2  # header rule + rules_after=[1]
    assert r"$\pm$" in tex


def test_latex_checker_catches_broken_sources(check_latex):
    good = _table().to_latex()
    assert check_latex(good.replace(r"a\_b", "a_b"))
    assert check_latex(good.replace(r"50\%", "50%"))
    assert check_latex(good.replace(r"\end{tabular}", ""))
    assert check_latex(good.replace(r"R\&D", "R&D"))
    assert check_latex(good.replace(r"\{set\}", "{set"))
    assert check_latex(good.replace(r"\{set\}", "set}"))
    assert check_latex(good.replace(r"50\%", "50% "))


@pytest.mark.parametrize("text", NASTY)
def test_latex_escape_roundtrip_is_valid(text, check_latex):
    assert check_latex(latex_escape(text)) == []


def test_markdown_table_shape_and_escaping():
    table = _table()
    md = table.to_markdown()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + len(table.rows)
    # Every row has exactly as many unescaped pipes as the header.
    def cells(line):
        return len([p for p in __import__("re").split(r"(?<!\\)\|", line)]) - 2
    assert {cells(line) for line in lines} == {len(table.columns)}
    assert "<script>" not in md and r"\<script\>" in md
    assert lines[1] == "|:---|---:|---:|---:|"
    assert "1.000 ± 1.528 (3)" in md.replace("2.333 ± 1.528 (3)", "1.000 ± 1.528 (3)")
    assert markdown_escape("a|b") == r"a\|b"


def test_csv_expands_mean_std_and_keeps_full_precision():
    table = _table()
    frame = pd.read_csv(io.StringIO(table.to_csv()), keep_default_na=False)
    assert list(frame.columns) == ["label", "count", "IoU", "score_mean", "score_std", "score_n"]
    assert frame["label"].tolist() == NASTY
    assert frame["score_mean"].iloc[0] == pytest.approx(7 / 3, abs=1e-12)
    assert frame["score_std"].iloc[0] == pytest.approx(np.std([1, 2, 4], ddof=1), abs=1e-12)
    assert frame["score_n"].tolist() == [3] * len(NASTY)
    assert frame["IoU"].tolist() == pytest.approx([0.5 + i / 10 for i in range(len(NASTY))])


def test_write_creates_three_files(tmp_path):
    paths = _table().write(tmp_path / "tables")
    assert sorted(p.name for p in paths.values()) == ["t_demo.csv", "t_demo.md", "t_demo.tex"]
    assert all(p.stat().st_size > 0 for p in paths.values())


def test_bad_tables_are_rejected():
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        PaperTable(name="x", title="x", columns=["a", "b"], rows=[["only"]])
    with pytest.raises(ValueError, match="plain file stem"):
        PaperTable(name="../evil", title="x", columns=["a"], rows=[])


def test_empty_table_renders_everywhere(check_latex):
    table = PaperTable(name="empty", title="Nothing", columns=["layer", "value"], rows=[])
    assert check_latex(table.to_latex()) == []
    assert "| – | – |" in table.to_markdown()
    assert table.to_csv().strip() == "layer,value"


def test_nan_and_none_cells_show_a_dash():
    table = PaperTable(name="n", title="n", columns=["a", "b"], rows=[[None, float("nan")]])
    assert table.records() == [{"a": "–", "b": "–"}]


def test_latex_states_a_shared_count_once_and_keeps_mixed_counts(check_latex):
    shared = _table().to_latex()
    assert r"2.333 $\pm$ 1.528 \\" in shared and "(3)" not in shared.split(r"\midrule")[1]
    assert "n = 3" in shared
    mixed = PaperTable(name="m", title="m", columns=["a", "b"],
                       rows=[["x", mean_std([1.0, 2.0])], ["y", mean_std([1.0, 2.0, 3.0])], ["z", mean_std([4.0])]])
    tex = mixed.to_latex()
    assert check_latex(tex) == []
    assert "(2)" in tex and "(3)" in tex and "4.000 (1)" in tex and "n = " not in tex


@pytest.mark.parametrize("ncols, env, scaled", [(3, "table", False), (6, "table*", False), (12, "table*", True)])
def test_table_width_picks_the_layout(ncols, env, scaled, check_latex):
    stat = mean_std([0.25, 0.5, 1.0])
    table = PaperTable(name="w", title="w", columns=["Layer"] + [f"Long column name {i}" for i in range(ncols - 1)],
                       rows=[["conv1"] + [stat] * (ncols - 1)])
    tex = table.to_latex()
    assert check_latex(tex) == [], check_latex(tex)
    assert f"\\begin{{{env}}}" in tex and f"\\end{{{env}}}" in tex
    assert (r"\resizebox{\textwidth}{!}{%" in tex) == scaled
    assert (r"\usepackage{booktabs, graphicx}" in tex) == scaled
    assert r"\shortstack[r]{Long column \\ name 1}" in tex


def test_column_digits_override_plain_numbers_only():
    table = PaperTable(name="d", title="d", columns=["acc", "time"], rows=[[0.12345, 12.345]],
                       column_digits={"time": 1})
    assert table.records() == [{"acc": "0.123", "time": "12.3"}]
    assert "| 0.123 | 12.3 |" in table.to_markdown()
    assert "0.123 & 12.3" in table.to_latex()


@pytest.mark.parametrize("text", ["loss − 0.05", "≤ 0.25·inputs", "λ = 0.1, τ·n² = 5", "‖x‖ ≈ ∞", "✓ ⟨x⟩ ∑", "café"])
def test_latex_escape_leaves_nothing_pdflatex_cannot_read(text):
    """pdflatex (T1, default UTF-8 input) reads Latin-1; everything else becomes a command or ASCII."""
    escaped = latex_escape(text)
    assert all(ord(ch) < 256 for ch in escaped), escaped
