"""Report entry points: ``write_report`` (tables, figures, unit galleries, index.html), ``summary_text`` and
``report_from_cache``.

The constraint: the report is regenerated from the cache at any time (``repdissect report``) and must
never recompute a statistic, so everything goes through :class:`RunData` over cached entries. Outputs land
in ``<out>/tables``, ``<out>/figures`` and ``<out>/units``; ``<out>/report.json`` lists every file written,
so a regenerated report removes the files of the previous one that it no longer writes — and nothing else
in the output folder.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

from ._html import Page, UnitCard, definition_list, esc, figure_html, gallery_html, link, table_html
from ._tables import mean_std

if TYPE_CHECKING:
    from ._data import RunData
    from ._paper import TableResult

from ._report_cache import cached_summary, report_stamp, restore_report, save_report
from ._version import REPORT_VERSION

__all__ = ["REPORT_VERSION", "write_report", "summary_text", "report_from_cache"]

#: bumped whenever the report's content or layout changes, so callers that skip an up-to-date report
#: (same cache keys, same config) know to write it again.

log = logging.getLogger("repdissect.reports")

_REPORT_RECORD = "report.json"


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _rel(path: Path | str, root: Path) -> str:
    """``path`` relative to the (absolute) output folder, as a POSIX link target."""
    return Path(path).absolute().relative_to(root).as_posix()


def write_report(result: Any, *, gallery_units: int | None = 48) -> Path:
    """Write every table, figure and the page for ``result`` (a ``RunResult``); returns ``<out>/index.html``.

    Args:
        result: a finished run (``plan``, per-node cache entries, ``out_dir``).
        gallery_units: units per layer in the page's unit galleries (best IoU first; ``None`` = all).
    """
    out = Path(result.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    stamp = report_stamp(result, gallery_units=gallery_units)
    restored = restore_report(result, stamp, _prune_previous)  # drawn before from the same entries: copy it
    if restored is not None:
        return restored
    from ._attribution import attribution_figures, attribution_tables
    from ._data import RunData  # pandas loads only when the report is drawn (not when a copy is restored)
    from ._paper import build_tables

    data = RunData(result)
    tables_dir, fig_dir, units_dir = out / "tables", out / "figures", out / "units"

    from ._plots import build_figures, exemplar_figures  # matplotlib/torch load only when figures are drawn

    tables = _extra_tables(data) + build_tables(data) + attribution_tables(data)
    table_files: dict[str, dict[str, str]] = {}
    for t in tables:
        if t.table is not None:
            table_files[t.key] = {fmt: _rel(p, out) for fmt, p in t.table.write(tables_dir).items()}

    figures = build_figures(data, fig_dir)
    figures += attribution_figures(data, fig_dir)
    exemplars, galleries = exemplar_figures(data, fig_dir, gallery_units=gallery_units, gallery_dir=units_dir)
    for f in figures + exemplars:
        if f.path:
            f.path = _rel(fig_dir / f.path, out)

    page = _page(data, result, tables, table_files, figures, exemplars, galleries, out)
    index = out / "index.html"
    _write_text_atomic(index, page)

    written = {index.name}
    written |= {p for files in table_files.values() for p in files.values()}
    written |= {f.path for f in figures + exemplars if f.path}
    written |= {_rel(c["image"], out) for cards in galleries.values() for c in cards}
    _prune_previous(out, written)
    record = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "files": sorted(written),
              "skipped": {t.key: t.skipped for t in tables if t.table is None}
              | {f.key: f.skipped for f in figures + exemplars if f.skipped}}
    _write_text_atomic(out / _REPORT_RECORD, json.dumps(record, indent=1))
    save_report(result, stamp, written, summary=_summary_body(result))
    return index


def _extra_tables(data: RunData) -> list[TableResult]:
    """The findings table first, then the per-category dissection table (their own modules)."""
    from ._category import category_table
    from ._findings import findings_table
    from ._paper import build_tables

    return build_tables(data, [("findings", findings_table, "no finding could be checked in this run"),
                               ("category_detectors", category_table, "no IoU results in this run")])


def _prune_previous(out: Path, keep: set[str]) -> None:
    """Delete files the previous report wrote and this one did not (only those listed in its record)."""
    record = out / _REPORT_RECORD
    try:
        previous = json.loads(record.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError):
        return
    root = out.resolve()
    for rel in previous:
        if rel in keep:
            continue
        path = (out / rel).resolve()
        if root in path.parents and path.is_file():
            path.unlink()


# ------------------------------------------------------------------------------------------ page
def _page(data: RunData, result: Any, tables: list[TableResult], table_files: dict[str, dict[str, str]],
          figures: list[Any], exemplars: list[Any],
          galleries: dict[tuple[str, str], list[dict[str, Any]]], out: Path) -> str:
    cfg = data.config
    spec = data.plan.dataset_spec
    params = ", ".join(f"{k}={v}" for k, v in spec.get("params", {}).items())
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    page = Page(title=f"repdissect report: {cfg.run.name}",
                subtitle=[f"dataset {spec['kind']}" + (f" ({params})" if params else ""), f"generated {created} UTC"])

    overview = page.section("overview", "Run overview")
    facts: list[tuple[str, Any]] = [("run", cfg.run.name), ("dataset", spec["kind"])]
    for model, layers in data.models:
        seeds = [str(i.seed) for i in data.trained(model)]
        facts.append((f"model {model}", f"layers {', '.join(layers)}; seeds {', '.join(seeds)}"))
    facts += [("networks", ", ".join(i.name for i in data.instances)),
              ("network pairs", len(data.plan.pairs)), ("IoU threshold", data.iou_threshold),
              ("nodes", f"{len(result.results)} ({getattr(result, 'hits', 0)} from cache)")]
    overview.add(definition_list(facts))
    if (out / "run.json").is_file():
        overview.add(f'<p><a href="{link("run.json")}">run.json</a>: configuration, environment and the cache '
                     "key of every node.</p>")
    from ._convergence import convergence_lines

    for i, line in enumerate(convergence_lines(data)):
        overview.text(line.strip(), cls="warning" if i == 0 else "caption")
    overview.add('<p class="caption">Every number below is read from the run\'s cache; regenerate this page with '
                 "<code>repdissect report CONFIG</code>.</p>")

    sec = page.section("tables", "Tables")
    for t in tables:
        if t.table is None:
            sec.add(f'<p class="empty">Table “{esc(t.key.replace("_", " "))}” skipped: {esc(t.skipped)}.</p>')
            continue
        downloads = {fmt.upper() if fmt != "md" else "Markdown": path
                     for fmt, path in table_files[t.key].items()}
        sec.add(table_html(t.table, {"CSV": downloads["CSV"], "LaTeX": downloads["TEX"],
                                     "Markdown": downloads["Markdown"]}))

    from ._interpretable import icnn_closing_note

    if note := icnn_closing_note(data):
        sec.text(note, cls="caption")

    sec = page.section("figures", "Figures")
    for f in figures:
        if f.path:
            sec.heading(f.title, anchor=f"figure-{f.key}")
            sec.add(figure_html(f.path, f.caption, alt=f.title, width=_display_width(out / f.path)))
        else:
            sec.add(f'<p class="empty">Figure “{esc(f.title)}” skipped: {esc(f.skipped)}.</p>')

    sec = page.section("exemplars", "Unit exemplars")
    shown = False
    for f in exemplars:
        if f.path:
            sec.heading(f.title, anchor=f"figure-{f.key}")
            sec.add(figure_html(f.path, f.caption, alt=f.title, width=_display_width(out / f.path)))
            shown = True
        elif f.skipped:
            sec.add(f'<p class="empty">{esc(f.title)} skipped: {esc(f.skipped)}.</p>')
    if not shown and not exemplars:
        sec.text("No exemplars: the run has no trained network with dissection results.", cls="empty")

    for (instance, layer), cards in galleries.items():
        info = data.instance(instance)
        title = data.layer_title(info.model if info else "", layer)
        from ._plots import safe_name

        sec = page.section(f"units-{safe_name(instance)}-{safe_name(layer)}", f"Units of {title} ({instance})")
        units_total = len(data.node_table("iou", "units", instance=instance, layer=layer))
        interpretable = sum(c["interpretable"] for c in cards)
        sec.text(f"{len(cards)} of {units_total} units, best IoU first; {interpretable} of them are interpretable "
                 f"(IoU > {data.iou_threshold:g}); the others have dashed frames. Each card shows the unit's top images by "
                 "maximum activation; the outline marks where its upsampled activation exceeds its threshold. "
                 + _card_note(cards), cls="caption")
        sec.add(gallery_html([
            UnitCard(_rel(c["image"], out), f"unit {c['unit']}: {c['label'] or 'no concept'}",
                     [f"{c['category'] or '–'} · IoU {c['iou']:.3f}",
                      "max activation " + ", ".join(f"{v:.2f}" for v in c["values"]), *c.get("lines", [])],
                     dim=not c["interpretable"])
            for c in cards
        ]))
    return page.render()


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


def _display_width(path: Path) -> int | None:
    """On-screen width for a 150-dpi figure: 80 % of its pixels (≈ 120 CSS px per inch), so text reads like print."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.size[0] * 0.8)
    except OSError:
        return None


# --------------------------------------------------------------------------------------- summary
def _fmt(stat: Any, digits: int = 2) -> str:
    if stat.n == 0 or not math.isfinite(stat.mean):
        return "–"
    return f"{stat.mean:.{digits}f}"


def summary_text(result: Any) -> str:
    """A compact (≤ ~25 lines) console summary: headline numbers per layer, means over seeds / seed pairs.

    Read from the report copy in the cache when there is one (it is a function of the same entries).
    """
    body = cached_summary(result, report_stamp(result))
    if body is None:
        body = _summary_body(result)
    return body + f"\n  report: {Path(result.out_dir) / 'index.html'}"


def _summary_body(result: Any) -> str:
    """:func:`summary_text` without its last line (the report's path)."""
    import pandas as pd

    from ._data import RunData
    from ._paper import stability_summary

    data = RunData(result)
    iou = data.table("iou", "summary")
    stab = stability_summary(data)
    center = data.table("stability_center", "summary")
    cmp_ = data.table("compare", "summary")
    head = ["layer", "interp./units", "unique det.", "instab.", "instab. rnd", "hungarian r", "within r", "CKA",
            "CKA rnd"]
    lines = []
    for model, layer in data.model_layers():
        def sel(frame: pd.DataFrame, **eq: str) -> pd.DataFrame:
            if frame.empty:
                return frame
            mask = (frame.model == model) & (frame.layer == layer)
            for k, v in eq.items():
                mask &= frame[k] == v
            return frame[mask]

        t_iou = sel(iou, role="trained")
        t_stab, r_stab = sel(stab, role="trained"), sel(stab, role="random")
        seeds, rnd = sel(cmp_, kind="seed"), sel(cmp_, kind="unrelated")
        within = ((seeds["within_a_mean_max_corr"] + seeds["within_b_mean_max_corr"]) / 2
                  if "within_a_mean_max_corr" in seeds else pd.Series(dtype=float))
        units = f"/{int(t_iou['units'].iloc[0])}" if not t_iou.empty else ""
        row = [
            data.layer_title(model, layer)[:14],
            (_fmt(mean_std(t_iou.get("interpretable_units", [])), 1) + units) if not t_iou.empty else "–",
            _fmt(mean_std(t_iou.get("unique_detectors_total", [])), 1),
            _fmt(mean_std(t_stab.get("instability", [])), 3),
            _fmt(mean_std(r_stab.get("instability", [])), 3),
            _fmt(mean_std(seeds.get("hungarian_mean_corr", []))),
            _fmt(mean_std(within)),
            _fmt(mean_std(seeds.get("linear_cka", []))),
            _fmt(mean_std(rnd.get("linear_cka", []))),
        ]
        lines.append(row)
    # Columns the run has no data for (no landmarks, no comparisons) are left out.
    keep = [0] + [i for i in range(1, len(head)) if any(r[i] != "–" for r in lines)]
    head = [head[i] for i in keep]
    lines = [[r[i] for i in keep] for r in lines]
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["Summary (means over seeds / seed pairs; 'rnd' = random-init networks; CKA rnd = a trained seed vs "
           "another seed's untrained net):"]
    out.append("  " + "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))))
    for r in lines[:18]:
        out.append("  " + "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    if len(lines) > 18:
        out.append(f"  … {len(lines) - 18} more layers in the report")
    if not center.empty:
        out.append(f"  image-centre baseline instability: {float(center['instability'].iloc[0]):.3f}")
    train = [e.extras.get("final_val_acc") for _, e in data.entries("train")]
    train = [v for v in train if v is not None]
    if train:
        acc = mean_std(train)
        out.append(f"  final val accuracy: {acc.text()} over seeds")
    from ._attribution import attribution_summary_line
    from ._convergence import convergence_lines
    from ._interpretable import icnn_closing_note

    out += [f"  {line}" for line in convergence_lines(data)]
    if (line := attribution_summary_line(data)) is not None:
        out.append(line)
    if note := icnn_closing_note(data):
        out.append(f"  {note}")
    out += _category_lines(data, iou)
    from ._findings import findings_lines

    out += findings_lines(data)
    return "\n".join(out)


def _category_lines(data: RunData, iou: pd.DataFrame) -> list[str]:
    """Detector units per category at each model's deepest layer, trained vs random init (means over seeds)."""
    from ._paper import categories_of

    if iou.empty:
        return []
    out = []
    for model, layers in data.models:
        if not layers:
            continue
        sub = iou[(iou.model == model) & (iou.layer == layers[-1])]
        parts = []
        for cat in categories_of(iou):
            t = sub.loc[sub.role == "trained", f"detectors_{cat}"].mean()
            r = sub.loc[sub.role == "random", f"detectors_{cat}"].mean()
            parts.append(f"{cat} {t:.1f}/{r:.1f}" if math.isfinite(r) else f"{cat} {t:.1f}")
        out.append(f"  detector units per category at {data.layer_title(model, layers[-1])} (trained/random): "
                   + ", ".join(parts))
    return out


# ----------------------------------------------------------------------------------- from cache
def report_from_cache(config: Any = None, *, cache_dir: str | Path | None = None,
                      out_dir: str | Path | None = None) -> Any:
    """Rebuild the report of ``config`` from the cache alone (nothing is computed).

    Args:
        config: a config path, a ``Config``, or ``None`` for the default demo config.
        cache_dir, out_dir: overrides of ``[run].cache_dir`` / ``[run].out_dir``.

    Returns:
        The ``RunResult`` (every node a cache hit) whose report was written.

    Raises:
        PipelineError: when any node of the plan is not in the cache (names them and the fix).
    """
    from ..pipeline import CacheStore, NodeResult, PipelineError, RunResult, build_plan, resolve_config

    cfg = resolve_config(config, cache_dir=None if cache_dir is None else str(cache_dir),
                         out_dir=None if out_dir is None else str(out_dir))
    store = CacheStore(cfg.run.cache_dir)
    plan = build_plan(cfg)
    results: dict[str, Any] = {}
    missing = []
    for node in plan.nodes:
        if node.key in results:
            continue
        entry = store.get(node.stage, node.key)
        if entry is None:
            missing.append(node.node_id)
            continue
        results[node.key] = NodeResult(node=node, hit=True, seconds=0.0, entry=entry)
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        where = f" in cache {cfg.run.cache_dir}"
        raise PipelineError(f"cannot build the report: {len(missing)} of {len(plan.nodes)} nodes are not cached"
                            f"{where} ({shown}); run `repdissect run CONFIG` first with the same config and --cache "
                            "(if it already ran, the config or the code changed since: `repdissect status CONFIG` "
                            "says why)")
    out = cfg.run.out_path
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    try:
        record = json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    result = RunResult(plan=plan, results=results, out_dir=out, seconds=0.0, record=record)
    write_report(result)
    return result


def write_run_report(result: Any) -> bool:
    """Write ``result``'s report unless an identical one is already in its output folder.

    The report is a pure function of the entries and the config, so a stamp (the nodes' keys, the config
    and :data:`REPORT_VERSION`) next to ``index.html`` says whether it is current. Returns whether it wrote.
    """
    from ..core import write_bytes_atomic

    out_dir = result.out_dir
    stamp = report_stamp(result)
    stamp_file = out_dir / ".report-stamp"
    if (out_dir / "index.html").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        return False
    stamp_file.unlink(missing_ok=True)
    write_report(result)
    write_bytes_atomic(stamp.encode(), stamp_file)
    return True
