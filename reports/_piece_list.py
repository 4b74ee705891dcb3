"""The report cut into pieces (see ``_pieces``): which pieces a run's report has, and what each one draws.

The constraint: the list of pieces must be known without drawing anything — and without importing pandas
or matplotlib, so that a report whose pieces are all cached loads neither. So the builders are named here
(the tests check the names against the builder lists of ``_paper`` and ``_plots``) and imported only when
a piece is drawn. Each piece's payload is plain JSON: a table's HTML and skip reason, a figure's caption,
path and display width, a layer's gallery section, the console summary's lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ._data import RunData
from ._pieces import Piece

__all__ = ["FIGURE_BUILDERS", "TABLE_KEYS", "report_pieces", "summary_piece"]

#: table builders in report order: the findings and per-category tables first, then ``_paper``'s, then
#: attribution (each name one piece)
TABLE_KEYS = ("findings", "category_detectors", "dissection_summary", "top_units", "location_instability",
              "convergent_learning", "regression", "similarity", "concept_agreement", "training", "icnn_instability",
              "icnn_comparison", "similarity_uncertainty", "layer_by_layer", "layer_identification", "sensitivity",
              "attribution_mass")
#: summary figure builders of ``_plots`` in report order, then the attribution figures
FIGURE_BUILDERS = ("correlation_figures", "detectors_figure", "svcca_figure", "cka_figure", "regression_figure",
                   "instability_figure", "agreement_figure", "visualise_figures", "icnn_instability_figure",
                   "category_figure", "attribution_figures")


def _table_payload(result: Any, root: Path) -> dict[str, Any]:
    from ._html import table_html

    if result.table is None:
        return {"key": result.key, "skipped": result.skipped, "html": None, "files": []}
    paths = result.table.write(root / "tables")
    files = {fmt: f"tables/{p.name}" for fmt, p in paths.items()}
    html = table_html(result.table, {"CSV": files["csv"], "LaTeX": files["tex"], "Markdown": files["md"]})
    return {"key": result.key, "skipped": "", "html": html, "files": sorted(files.values())}


def _draw_table(key: str) -> Callable[[RunData, Path], Any]:
    def draw(data: RunData, root: Path) -> list[dict[str, Any]]:
        from . import _paper

        if key == "attribution_mass":
            from ._attribution import attribution_tables

            results = attribution_tables(data)
        elif key == "findings":
            from ._findings import findings_table

            results = _paper.build_tables(data, [(key, findings_table, "no finding could be checked in this run")])
        elif key == "category_detectors":
            from ._category import category_table

            results = _paper.build_tables(data, [(key, category_table, "no IoU results in this run")])
        else:
            results = _paper.build_tables(data, [b for b in _paper._BUILDERS if b[0] == key])
        return [_table_payload(r, root) for r in results]

    return draw


def _display_width(path: Path) -> int | None:
    """On-screen width for a 150-dpi figure: 80 % of its pixels (≈ 120 CSS px per inch), so text reads like print."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.size[0] * 0.8)
    except OSError:
        return None


def _figure_payload(figure: Any, root: Path) -> dict[str, Any]:
    path = f"figures/{figure.path}" if figure.path else None
    return {"key": figure.key, "title": figure.title, "path": path, "caption": figure.caption,
            "skipped": figure.skipped, "group": figure.group,
            "width": _display_width(root / path) if path else None}


def _draw_figures(name: str) -> Callable[[RunData, Path], Any]:
    def draw(data: RunData, root: Path) -> list[dict[str, Any]]:
        if name == "attribution_figures":
            from ._attribution import attribution_figures

            figures = attribution_figures(data, root / "figures")
        else:
            from ._plots import build_figures

            figures = build_figures(data, root / "figures", [name])
        return [_figure_payload(f, root) for f in figures]

    return draw


def _draw_no_exemplars(data: RunData, root: Path) -> dict[str, Any]:
    return {"figure": {"key": "exemplars", "title": "Unit exemplars", "path": None, "caption": "",
                       "skipped": "no IoU results in this run", "group": "figures", "width": None},
            "gallery": None}


def _draw_exemplars(model: str, instance: str, layer: str, make_figure: bool, gallery_units: int | None,
                    ) -> Callable[[RunData, Path], Any]:
    def draw(data: RunData, root: Path) -> dict[str, Any]:
        from ._html import UnitCard, gallery_html
        from ._plots import layer_exemplar_figure, safe_name

        figure, cards = layer_exemplar_figure(data, root / "figures", root / "units", model, instance, layer,
                                              make_figure=make_figure, gallery_units=gallery_units)
        gallery = None
        if cards is not None:
            units_total = len(data.node_table("iou", "units", instance=instance, layer=layer))
            interpretable = sum(c["interpretable"] for c in cards)
            caption = (f"{len(cards)} of {units_total} units, best IoU first; {interpretable} of them are interpretable "
                       f"(IoU > {data.iou_threshold:g}); the others have dashed frames. Each card shows the unit's top "
                       "images by maximum activation; the outline marks where its upsampled activation exceeds its "
                       "threshold. " + _card_note(cards))
            html = gallery_html([
                UnitCard(Path(c["image"]).relative_to(root).as_posix(), f"unit {c['unit']}: {c['label'] or 'no concept'}",
                         [f"{c['category'] or '–'} · IoU {c['iou']:.3f}",
                          "max activation " + ", ".join(f"{v:.2f}" for v in c["values"]), *c.get("lines", [])],
                         dim=not c["interpretable"])
                for c in cards])
            gallery = {"anchor": f"units-{safe_name(instance)}-{safe_name(layer)}",
                       "title": f"Units of {data.layer_title(model, layer)} ({instance})", "caption": caption,
                       "html": html}
        return {"figure": _figure_payload(figure, root) if figure is not None else None, "gallery": gallery}

    return draw


def _card_note(cards: list[dict[str, Any]]) -> str:
    """What the cards of one layer show besides the exemplars (activation maximisation, guided backprop)."""
    am = any(line.startswith("right:") for c in cards for line in c.get("lines", []))
    gb = any(line.startswith("bottom:") for c in cards for line in c.get("lines", []))
    if not (am or gb):
        return ("This network has no activation-maximisation images or guided-backprop maps ([visualise].instances, "
                "[attribution].seeds and .layers choose which have them).")
    return " ".join(filter(None, [
        "Right: the unit's activation-maximisation image (one batched, seeded optimisation)." if am else "",
        "Bottom row: guided backprop of the unit's maximum on each exemplar above it (0.5 + g / 2s, s the 99.5th "
        "percentile of |g| per map; blank where the attribution entry has no map for that image)." if gb else ""]))


def _draw_overview(data: RunData, root: Path) -> dict[str, Any]:
    from ._convergence import convergence_lines

    return {"lines": [line.strip() for line in convergence_lines(data)]}


def _draw_icnn_note(data: RunData, root: Path) -> dict[str, Any]:
    from ._interpretable import icnn_closing_note

    return {"note": icnn_closing_note(data)}


def _draw_summary(data: RunData, root: Path) -> dict[str, Any]:
    from ._report import summary_body

    return {"text": summary_body(data)}


def summary_piece() -> Piece:
    """The console summary (its text, without the report's path)."""
    return Piece("summary", _draw_summary)


def report_pieces(data: RunData, *, gallery_units: int | None = 48) -> dict[str, list[Piece]]:
    """The pieces of ``data``'s report by page part: ``overview``, ``tables``, ``figures``, ``exemplars``."""
    exemplars: list[Piece] = []
    if not data.has_stage("iou"):
        exemplars.append(Piece("exemplars", _draw_no_exemplars))
    else:
        for model, layers in data.models:
            for position, inst in enumerate(data.trained(model)):
                for layer in layers:
                    grid = position == 0
                    exemplars.append(Piece(f"exemplars:{inst.name}:{layer}:{'grid' if grid else 'gallery'}"
                                           f":{gallery_units}", _draw_exemplars(model, inst.name, layer, grid,
                                                                                 gallery_units)))
    return {
        "overview": [Piece("overview", _draw_overview), Piece("icnn_note", _draw_icnn_note)],
        "tables": [Piece(f"table:{key}", _draw_table(key)) for key in TABLE_KEYS],
        "figures": [Piece(f"figure:{name}", _draw_figures(name)) for name in FIGURE_BUILDERS],
        "exemplars": exemplars,
    }
