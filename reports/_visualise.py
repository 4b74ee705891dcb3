"""Visualisation figures from cached stages: activation-maximisation galleries, t-SNE maps, first-layer filters.

* ``am_<instance>_<layer>`` — the AM image of the layer's most interpretable units (by IoU), titled with the
  unit's concept and how far the image drove it (AM max / dataset max);
* ``tsne_<model>_<layer>`` — the t-SNE of the first seed's images, trained vs random-init side by side,
  coloured by class (top row) and by dominant concept outside the class-defining categories (bottom row; on
  the procedural world the dominant colour, since the ``object`` category is the class);
* ``filters_<model>`` — the first RGB convolution of the trained and the random-init network.

The unit cards of the page show the AM image next to each unit's exemplars (``_unitcards``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ..stages import table_images
from . import _figures as F

__all__ = ["visualise_figures"]


def _fig_result(key: str, title: str, path: Path | None = None, caption: str = "", skipped: str = "") -> Any:
    from ._plots import FigureResult

    return FigureResult(key, title, path=path.name if path else None, caption=caption, skipped=skipped)


def _am_figures(data: Any, fig_dir: Path) -> list[Any]:
    from ._plots import exemplar_units, safe_name

    out = []
    units_all = data.table("iou", "units")
    for label, entry in data.entries("activation_max"):
        inst, layer = label["instance"], label["layer"]
        images = table_images(entry.frame("images"))
        stats = entry.frame("units").set_index("unit")
        units = units_all[(units_all.get("instance") == inst) & (units_all.get("layer") == layer)] if not units_all.empty else units_all
        shown = [int(u) for u in exemplar_units(units, 16)["unit"]] if not units.empty else sorted(images)[:16]
        info = units.set_index("unit") if not units.empty else None
        classes = list(data.dataset.class_names) if layer == "logits" else []
        cols = min(8, len(shown))
        rows = -(-len(shown) // cols)
        fig, axes = F.new_figure(1.0 * cols + 0.2, 1.25 * rows + 0.3, nrows=rows, ncols=cols, squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, u in zip(axes.ravel(), shown):
            ax.imshow(images[u], interpolation="nearest")
            if classes:
                ax.set_title(f"class {classes[u] if u < len(classes) else u}\nlogit {stats.loc[u, 'objective']:.1f}",
                             fontsize=6)
                continue
            name = str(info.loc[u, "name"] or "–") if info is not None else ""
            peak = float(stats.loc[u, "dataset_max"])
            drive = f"×{stats.loc[u, 'activation_max'] / peak:.1f}" if peak > 0 else f"max {stats.loc[u, 'activation_max']:.1f}"
            ax.set_title(f"{u} {name}\n{drive}", fontsize=6)
        key = f"am_{safe_name(inst)}_{safe_name(layer)}"
        path = fig_dir / f"{key}.png"
        F.save_figure(fig, path)
        if classes:
            out.append(_fig_result(key, f"Class models ({inst})", path, "One optimised image per class logit "
                                   "(Simonyan et al.), all classes in one batched, seeded optimisation."))
            continue
        out.append(_fig_result(key, f"Activation maximisation: {layer} ({inst})", path,
                               f"One optimised image per unit (the {len(shown)} units with the highest concept IoU "
                               "shown), all units of the layer in one batched, seeded optimisation. Title: unit, "
                               "concept, and the unit's activation on the image over its maximum on the dataset."))
    return out


def _tsne_figures(data: Any, fig_dir: Path) -> list[Any]:
    from ._plots import safe_name

    out = []
    points = data.table("tsne", "points")
    if points.empty:
        return out
    classes = list(getattr(data.dataset, "class_names", []) or [])
    for model, layers in data.models:
        for layer in layers:
            sub = points[(points["model"] == model) & (points["layer"] == layer)]
            if sub.empty:
                continue
            panels = [(inst, g) for inst, g in sorted(sub.groupby("instance"), key=lambda t: (t[0].endswith("-random"), t[0]))]
            fig, axes = F.new_figure(3.2 * len(panels), 6.0, nrows=2, ncols=len(panels), squeeze=False)
            # concepts named like a class get that class's colour; the others follow
            present = set(sub["concept_name"]) - {""}
            concepts = [c for c in classes if c in present] + sorted(present - set(classes))
            for col, (inst, g) in enumerate(panels):
                for row, (field, names) in enumerate((("class_label", classes), ("concept_name", concepts))):
                    ax = axes[row, col]
                    values = g[field].to_numpy()
                    if field == "class_label":
                        cats = sorted(set(values))
                        colour = {c: int(c) for c in cats}
                    else:
                        cats = concepts
                        extra = [c for c in concepts if c not in classes]
                        colour = {c: classes.index(c) if c in classes else len(classes) + extra.index(c) for c in cats}
                    cmap = F.plt.get_cmap("tab10" if max(colour.values(), default=0) < 10 else "tab20")
                    named = _named_colours(cats) if field == "concept_name" else None
                    for c in cats:
                        m = values == c
                        label = (names[c] if field == "class_label" and 0 <= c < len(names) else str(c))
                        if named:  # colour concepts drawn in their own colour, edged so white shows on white
                            ax.scatter(g["x"][m], g["y"][m], s=4, color=named[c], label=label, edgecolors="0.35",
                                       linewidths=0.2)
                        else:
                            ax.scatter(g["x"][m], g["y"][m], s=3, color=cmap(colour[c] % cmap.N), label=label,
                                       linewidths=0)
                    ax.set_xticks([]), ax.set_yticks([])
                    ax.set_title(f"{inst}: by {'class' if row == 0 else _concept_title(g)}", fontsize=7)
                    if col == len(panels) - 1:
                        ax.legend(fontsize=5, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
            key = f"tsne_{safe_name(model)}_{safe_name(layer)}"
            path = fig_dir / f"{key}.png"
            F.save_figure(fig, path)
            out.append(_fig_result(key, f"t-SNE of {data.layer_title(model, layer)}", path,
                                   "t-SNE of each image's spatially pooled unit activations (seeded; PCA init), "
                                   "trained network vs its random initialisation. Distances between clusters and "
                                   "cluster sizes carry no meaning. " + _concept_caption(data, sub)))
    return out


def _named_colours(concepts: list[str]) -> dict[str, Any] | None:
    """``{concept: RGBA}`` when every concept is a colour name (Broden's ``-c`` suffix allowed), else ``None``."""
    from matplotlib.colors import is_color_like, to_rgba

    bare = {c: c[:-2] if c.endswith("-c") else c for c in concepts}
    if not bare or not all(is_color_like(b) and not b.replace(".", "").isdigit() for b in bare.values()):
        return None
    return {c: to_rgba(b) for c, b in bare.items()}


def _concept_title(points: Any) -> str:
    """``dominant <category>`` when one category supplies every point's concept, else ``dominant concept``."""
    cats = set(points["concept_category"]) - {""} if "concept_category" in points else set()
    return f"dominant {next(iter(cats))}" if len(cats) == 1 else "dominant concept"


def _concept_caption(data: Any, points: Any) -> str:
    """What the bottom row's colour means, with the class-defining categories left out and their purities."""
    purity: dict[str, float] = {}
    excluded: list[str] = []
    for label, entry in data.entries("tsne"):
        if label.get("instance") in set(points["instance"]):
            purity = purity or dict(entry.extras.get("concept_purity") or {})
            excluded = excluded or list(entry.extras.get("class_defining") or [])
    text = ("Bottom row: each image's dominant concept, the pixel-level concept covering the most pixels among the "
            "categories the class does not decide")
    if excluded:
        shown = ", ".join(f"{c} {purity.get(c, float('nan')):.2f}" for c in excluded)
        from ..stages import MAX_PURITY

        text += (f"; left out as class-defining (purity ≥ {MAX_PURITY:g}: the share of images whose dominant concept of "
                 f"the category is their class's most common one): {shown}")
    used = sorted(set(points.get("concept_category", [])) - {""} - set(excluded))
    if used:
        text += f". It comes from {', '.join(used)}"
        if purity:
            text += " (purity " + ", ".join(f"{purity[c]:.2f}" for c in used if c in purity) + ")"
    return text + (": an attribute the class does not decide, so the two rows show whether the layer groups images "
                   "by their class or by something else.")


def _filter_figures(data: Any, fig_dir: Path) -> list[Any]:
    from ._plots import safe_name

    entries = data.entries("filters")
    if not entries:
        return []
    entries = sorted(entries, key=lambda t: (t[0]["instance"].endswith("-random"), t[0]["instance"]))
    fig, axes = F.new_figure(3.0 * len(entries), 3.2, ncols=len(entries), squeeze=False)
    for ax, (label, entry) in zip(axes[0], entries):
        frame = entry.frame("grid")
        ax.imshow(table_images(frame)[0], interpolation="nearest")
        ax.axis("off")
        ax.set_title(f"{label['instance']}: {frame['layer'].iloc[0]}", fontsize=7)
    key = "filters"
    path = fig_dir / f"{safe_name(key)}.png"
    F.save_figure(fig, path)
    return [_fig_result(key, "First-layer filters", path,
                        "The first RGB convolution's filters, each min–max scaled on its own; trained vs random init.")]


def visualise_figures(data: Any, fig_dir: Path) -> list[Any]:
    """Every visualisation figure of the run (none when the run has no visualisation stages)."""
    return _filter_figures(data, fig_dir) + _tsne_figures(data, fig_dir) + _am_figures(data, fig_dir)
