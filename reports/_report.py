"""Report entry points: ``write_report`` (tables, figures, unit galleries, index.html), ``summary_text`` and
``report_from_cache``.

The constraint: the report is regenerated from the cache at any time (``repdissect report``) and must
never recompute a statistic, so everything goes through :class:`RunData` over cached entries. Outputs land
in ``<out>/tables``, ``<out>/figures`` and ``<out>/units``; ``<out>/report.json`` lists every file written,
so a regenerated report removes the files of the previous one that it no longer writes — and nothing else
in the output folder. Each table, figure and gallery is a cached piece (``_pieces``, ``_piece_list``): drawn
once per set of inputs, copied into every later report.
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

from ._html import Page, definition_list, esc, figure_html, link
from ._tables import mean_std

if TYPE_CHECKING:
    from ._data import RunData

from ..core import REPORTS, digest
from ._pieces import PieceOutcome, serve_piece
from ._version import REPORT_VERSION

__all__ = ["REPORT_VERSION", "write_report", "write_run_report", "summary_text", "summary_body", "report_from_cache",
           "report_stamp"]

#: bumped whenever the report's content or layout changes, so callers that skip an up-to-date report
#: (same cache keys, same config) know to write it again.

log = logging.getLogger("repdissect.reports")

_REPORT_RECORD = "report.json"


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def report_stamp(result: Any, *, gallery_units: int | None = 48) -> str:
    """Digest of everything the output folder's files depend on: every node's key, the config (output and
    cache paths left out), the report version and what the page states about the run (cache hits, whether
    a ``run.json`` sits next to it). :func:`write_run_report` skips a folder whose report has this stamp."""
    config = result.plan.config.to_dict()
    run = dict(config.get("run", {}))
    for path_field in ("out_dir", "cache_dir"):
        run.pop(path_field, None)
    config = {**config, "run": run}
    out = Path(result.out_dir)
    return digest({"keys": sorted(n.key for n in result.plan.nodes), "config": config,
                   "report_version": REPORT_VERSION, "gallery_units": gallery_units,
                   "nodes": len(result.results), "hits": getattr(result, "hits", 0),
                   "run_json": (out / "run.json").is_file()})


def write_report(result: Any, *, gallery_units: int | None = 48) -> Path:
    """Write every table, figure and the page for ``result`` (a ``RunResult``); returns ``<out>/index.html``.

    Each table, figure and gallery is a cached piece (``_pieces``): copied from the cache when the entries
    it read have the same keys, drawn (and stored) otherwise. ``<out>/report.json`` lists the files and
    which pieces were drawn this time.

    Args:
        result: a finished run (``plan``, per-node cache entries, ``out_dir``).
        gallery_units: units per layer in the page's unit galleries (best IoU first; ``None`` = all).
    """
    from ._data import RunData
    from ._piece_list import report_pieces

    out = Path(result.out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    data = RunData(result)
    copies = _copies(result)
    parts = {part: [serve_piece(p, data, out, copies) for p in pieces]
             for part, pieces in report_pieces(data, gallery_units=gallery_units).items()}
    outcomes = [o for pieces in parts.values() for o in pieces]
    page = _page(data, result, parts, out)
    index = out / "index.html"
    _write_text_atomic(index, page)

    written = {index.name} | {f for o in outcomes for f in o.files}
    _prune_previous(out, written)
    tables = [t for o in parts["tables"] for t in o.payload]
    figures = [f for o in parts["figures"] for f in o.payload] + [o.payload["figure"] for o in parts["exemplars"]
                                                                  if o.payload["figure"] is not None]
    record = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(), "files": sorted(written),
              "skipped": {t["key"]: t["skipped"] for t in tables if t["html"] is None}
              | {f["key"]: f["skipped"] for f in figures if f["skipped"]},
              "pieces": {"drawn": [o.name for o in outcomes if o.drawn],
                         "reused": sum(not o.drawn for o in outcomes)}}
    _write_text_atomic(out / _REPORT_RECORD, json.dumps(record, indent=1))
    return index


def _copies(result: Any) -> Path:
    """Where the report's pieces are kept: ``<cache>/_reports``."""
    return Path(result.plan.config.run.cache_dir) / REPORTS


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
def _page(data: RunData, result: Any, parts: dict[str, list[PieceOutcome]], out: Path) -> str:
    """The page from the pieces' payloads; only what is specific to this run (cache hits, run.json, the
    time) is stated here, from the plan (nothing loaded)."""
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
    notes = {o.name: o.payload for o in parts["overview"]}
    for i, line in enumerate(notes["overview"]["lines"]):
        overview.text(line, cls="warning" if i == 0 else "caption")
    overview.add('<p class="caption">Every number below is read from the run\'s cache; regenerate this page with '
                 "<code>repdissect report CONFIG</code>.</p>")

    sec = page.section("tables", "Tables")
    for t in (t for o in parts["tables"] for t in o.payload):
        if t["html"] is None:
            sec.add(f'<p class="empty">Table “{esc(t["key"].replace("_", " "))}” skipped: {esc(t["skipped"])}.</p>')
        else:
            sec.add(t["html"])
    if note := notes["icnn_note"]["note"]:
        sec.text(note, cls="caption")

    sec = page.section("figures", "Figures")
    for f in (f for o in parts["figures"] for f in o.payload):
        if f["path"]:
            sec.heading(f["title"], anchor=f"figure-{f['key']}")
            sec.add(figure_html(f["path"], f["caption"], alt=f["title"], width=f["width"]))
        else:
            sec.add(f'<p class="empty">Figure “{esc(f["title"])}” skipped: {esc(f["skipped"])}.</p>')

    sec = page.section("exemplars", "Unit exemplars")
    exemplars = [o.payload["figure"] for o in parts["exemplars"] if o.payload["figure"] is not None]
    for f in exemplars:
        if f["path"]:
            sec.heading(f["title"], anchor=f"figure-{f['key']}")
            sec.add(figure_html(f["path"], f["caption"], alt=f["title"], width=f["width"]))
        elif f["skipped"]:
            sec.add(f'<p class="empty">{esc(f["title"])} skipped: {esc(f["skipped"])}.</p>')
    if not exemplars:
        sec.text("No exemplars: the run has no trained network with dissection results.", cls="empty")

    for gallery in (o.payload["gallery"] for o in parts["exemplars"] if o.payload["gallery"] is not None):
        sec = page.section(gallery["anchor"], gallery["title"])
        sec.text(gallery["caption"], cls="caption")
        sec.add(gallery["html"])
    return page.render()


# --------------------------------------------------------------------------------------- summary
def _fmt(stat: Any, digits: int = 2) -> str:
    if stat.n == 0 or not math.isfinite(stat.mean):
        return "–"
    return f"{stat.mean:.{digits}f}"


def summary_text(result: Any) -> str:
    """A compact (≤ ~25 lines) console summary: headline numbers per layer, means over seeds / seed pairs.

    A cached piece like the report's tables: served from the cache when the entries it reads are unchanged.
    """
    from ._data import RunData
    from ._piece_list import summary_piece

    outcome = serve_piece(summary_piece(), RunData(result), Path(result.out_dir).absolute(), _copies(result))
    return outcome.payload["text"] + f"\n  report: {Path(result.out_dir) / 'index.html'}"


def summary_body(data: RunData) -> str:
    """:func:`summary_text` without its last line (the report's path), drawn from ``data``."""
    import pandas as pd

    from ._paper import stability_summary

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
    found: dict[str, Any] = {}

    def look_up(node: Any) -> Any:
        if node.key not in found:
            found[node.key] = store.get(node.stage, node.key)
        return found[node.key]

    # With every node cached, the plan skips building each model once (which loads torch): nothing runs.
    plan = build_plan(cfg, is_cached=lambda node: look_up(node) is not None)
    results: dict[str, Any] = {}
    missing = []
    for node in plan.nodes:
        if node.key in results:
            continue
        entry = look_up(node)
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
    try:  # the page links run.json when the folder has one (a run's); a report alone writes none
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
