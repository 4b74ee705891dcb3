"""HTML builders: every data string is escaped, links are relative and percent-encoded, the page is static."""

import pytest

from repdissect.reports._html import Page, UnitCard, figure_html, gallery_html, link, table_html
from repdissect.reports._tables import PaperTable, mean_std

EVIL = '<script>alert("x")</script>'


def _page():
    page = Page(title=f"Run {EVIL}", subtitle=[f"dataset {EVIL}"])
    table = PaperTable(name="t1", title=f"T {EVIL}", columns=["label", EVIL],
                       rows=[[EVIL, mean_std([1.0, 2.0])], ["ok & fine", 3]], caption=EVIL, notes=[EVIL])
    sec = page.section("tables", f"Tables {EVIL}")
    sec.add(table_html(table, {"csv": "tables/t1.csv", "tex": "tables/t 1&2.tex"}))
    sec.add(figure_html("figures/a b.png", EVIL))
    sec.add(gallery_html([UnitCard("units/u<1>.png", EVIL, [EVIL], dim=True)]))
    sec.text(EVIL)
    sec.heading(EVIL, anchor="h-1")
    return page.render()


def test_no_markup_from_data_survives(inspect_html, tmp_path):
    markup = _page()
    index = tmp_path / "index.html"
    index.write_text(markup, encoding="utf-8")
    refs, scripts, text, _ = inspect_html(index)
    assert scripts == 0
    assert "<script>" not in markup
    assert text.count(EVIL) >= 8, "escaped names must still read as the original text"
    values = {v for _, _, v in refs}
    assert "tables/t%201%262.tex" in values
    assert "figures/a%20b.png" in values
    assert "units/u%3C1%3E.png" in values


def test_links_must_be_relative():
    for bad in ["/etc/passwd", "http://example.com/x.png", "file:///etc/hosts"]:
        with pytest.raises(ValueError, match="relative"):
            link(bad)
    assert link("figures/x.png") == "figures/x.png"
    assert link('a"b.png') == "a%22b.png"


def test_page_is_self_contained():
    markup = _page()
    assert "<link" not in markup and "http://" not in markup and "https://" not in markup
    assert markup.startswith("<!DOCTYPE html>") and "<style>" in markup
    assert '<nav class="toc"><a href="#tables">' in markup


def test_sentence_columns_wrap_and_number_columns_do_not():
    long = "least squares loss 0.422; α = 0.01: 63.2/128 channels (49.4%) at +0.018"
    table = PaperTable(name="f", title="F", columns=["Finding", "Measured", "Value"],
                       rows=[["short", long, 1.5], ["also short", "brief", 2.5]])
    markup = table_html(table)
    assert markup.count('<td class="prose">') == 2  # the whole Measured column, its short cell too
    assert '<td class="">short</td>' in markup and markup.count('<td class="num">') == 2
