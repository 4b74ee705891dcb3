"""Paper tables, figures and the HTML report of a run, read from the cache (nothing is recomputed).

Public API::

    from repdissect.reports import write_report, summary_text, report_from_cache
    index = write_report(result)          # <out>/tables/*.{md,tex,csv}, <out>/figures/*.png, <out>/index.html
    write_run_report(result)              # the same, skipped when an identical report is already there
    print(summary_text(result))           # compact per-layer headline numbers
    result = report_from_cache("configs/demo.toml")   # regenerate from the cache alone

Building blocks: :class:`PaperTable` (Markdown / LaTeX booktabs / CSV), :func:`mean_std` and
:func:`aggregate` (``mean ± std (n)`` over seeds), the matplotlib helpers in ``_figures`` and the
escaping HTML builders in ``_html``.

Layering: this package reads results through the public APIs of :mod:`repdissect.pipeline` (plans, run
results), :mod:`repdissect.stages` (activation readers), :mod:`repdissect.datasets` and
:mod:`repdissect.core` (the cache store); only the CLI sits above it.
"""

from typing import TYPE_CHECKING, Any

from ._report import REPORT_VERSION, report_from_cache, summary_text, write_report, write_run_report
from ._tables import MeanStd, PaperTable, aggregate, latex_escape, markdown_escape, mean_std

if TYPE_CHECKING:
    from ._data import RunData


def visualise_figures(data: "RunData", fig_dir: Any) -> Any:
    """The visualisation figures (AM galleries, t-SNE, filters) of a run into ``fig_dir`` (loads matplotlib)."""
    from ._visualise import visualise_figures as build

    return build(data, fig_dir)


__all__ = [
    "REPORT_VERSION",
    "write_report",
    "write_run_report",
    "summary_text",
    "report_from_cache",
    "sanity_table",
    "sanity_tables",
    "PaperTable",
    "MeanStd",
    "mean_std",
    "aggregate",
    "latex_escape",
    "markdown_escape",
    "RunData",
    "visualise_figures",
]


def sanity_table(result: Any) -> Any:
    """Layer-identification accuracy of every comparison metric (pandas loads here, not at import)."""
    from ._similarity import sanity_table as build

    return build(result)


def sanity_tables(result: Any) -> Any:
    """The ``repdissect sanity`` tables: layer identification and deletion sensitivity, those the run has."""
    from ._similarity import sanity_tables as build

    return build(result)


def __getattr__(name: str) -> Any:
    # RunData loads pandas on its first table read; imported lazily all the same, like the other builders.
    if name == "RunData":
        from ._data import RunData

        return RunData
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
