"""Warnings about L1 regression fits that stopped at the sweep limit instead of converging.

The ``compare`` stage stores, per (direction, α), whether every target's coordinate descent reached the
duality-gap tolerance (``converged``) and how many sweeps it ran (``sweeps``). A fit that did not converge
still gives a held-out loss, but a less sparse and less accurate one than the α promises, so the run
summary and the report name every such fit, with the settings to change (``[compare].lasso_max_sweeps``,
``[compare].lasso_tol``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["lasso_warnings", "convergence_lines"]

#: at most this many fits are named one by one; the rest are counted
_SHOWN = 5


def lasso_warnings(regression: pd.DataFrame) -> list[str]:
    """One line per regression fit that did not converge.

    Args:
        regression: the ``compare`` stage's ``regression`` tables over nodes, with the node labels
            (``a``, ``b``, ``layer``) as columns, plus ``direction``, ``alpha``, ``converged``, ``sweeps``.

    Returns:
        ``"<a> vs <b>, layer <layer>, <direction>, α=<alpha>: stopped after <sweeps> sweeps"`` per fit, in
        table order; empty when every fit converged (or there is no regression table).
    """
    if regression.empty or "converged" not in regression.columns:
        return []
    bad = regression[~regression["converged"].astype(bool)]
    lines = []
    for row in bad.itertuples(index=False):
        where = ", ".join(str(getattr(row, k)) for k in ("a", "b") if hasattr(row, k))
        where = where.replace(", ", " vs ", 1) if hasattr(row, "b") else where
        layer = f", layer {row.layer}" if hasattr(row, "layer") else ""
        lines.append(f"{where}{layer}, {row.direction}, α={row.alpha:g}: stopped after {int(row.sweeps)} sweeps")
    return lines


def convergence_lines(data: Any) -> list[str]:
    """The warning block for the console summary and the report page (empty when all fits converged).

    ``data``: the report's :class:`~repdissect.reports._data.RunData` (its ``table`` and ``config``).
    """
    lines = lasso_warnings(data.table("compare", "regression"))
    if not lines:
        return []
    cc = data.config.compare
    head = (f"warning: {len(lines)} lasso fit(s) did not converge within [compare].lasso_max_sweeps = "
            f"{cc.lasso_max_sweeps} (lasso_tol = {cc.lasso_tol:g}); their held-out losses are not at the optimum. "
            "Raise lasso_max_sweeps (or loosen lasso_tol) and rerun:")
    shown = [f"  {line}" for line in lines[:_SHOWN]]
    if len(lines) > _SHOWN:
        shown.append(f"  … and {len(lines) - _SHOWN} more (the regression tables' 'converged' column)")
    return [head, *shown]
