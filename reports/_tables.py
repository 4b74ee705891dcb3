"""Paper tables: one :class:`PaperTable` rendered as Markdown, LaTeX (booktabs) and CSV, plus seed aggregates.

The constraint: a table is pasted into a paper or a notebook unchanged, and its cells come from data
(dataset, concept, layer and model names) that may contain any character. So the three renderings share
one cell model — text, numbers, or :class:`MeanStd` (``mean ± std (n)`` over seeds / seed pairs) — and
every renderer escapes what its format treats as markup: LaTeX specials (``\\ _ % & # $ { } ~ ^ < >``),
Markdown pipes and inline markup. CSV keeps numbers machine-readable: a ``MeanStd`` column becomes
``<col>_mean``, ``<col>_std`` and ``<col>_n`` columns.

Standard deviations are sample standard deviations (``ddof=1``) over independent runs; with one run the
spread is unknown and is shown as ``mean (1)`` rather than a misleading ``± 0``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # pandas loads where a frame is built: a warm report is copied without it
    import pandas as pd

__all__ = [
    "MeanStd",
    "PaperTable",
    "mean_std",
    "aggregate",
    "latex_escape",
    "markdown_escape",
    "format_number",
]


@dataclass(frozen=True)
class MeanStd:
    """Mean, sample standard deviation and count of a quantity over runs (seeds or seed pairs).

    ``std`` is NaN when ``n < 2`` and both are NaN when ``n == 0``; renderers show these as ``mean (1)``
    and ``–``. ``digits`` is the number of decimals to print.
    """

    mean: float
    std: float
    n: int
    digits: int = 3

    def text(self, *, pm: str = "±", show_n: bool = True) -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "–"
        mean = format_number(self.mean, self.digits)
        count = f" ({self.n})" if show_n or self.n < 2 else ""
        if self.n < 2 or not math.isfinite(self.std):
            return f"{mean}{count}"
        return f"{mean} {pm} {format_number(self.std, self.digits)}{count}"


def format_number(value: Any, digits: int = 3) -> str:
    """Numbers for tables: integers without decimals, floats with ``digits`` decimals, NaN/None as ``–``."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(float(value)):
            return "–"
        return f"{float(value):.{digits}f}"
    return str(value)


def mean_std(values: Iterable[float], digits: int = 3) -> MeanStd:
    """Aggregate finite values into a :class:`MeanStd` (non-finite values are dropped, not propagated)."""
    arr = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return MeanStd(math.nan, math.nan, 0, digits)
    std = float(np.std(arr, ddof=1)) if n > 1 else math.nan
    return MeanStd(float(np.mean(arr)), std, n, digits)


def aggregate(frame: pd.DataFrame, by: str | Sequence[str], values: Sequence[str], *,
              digits: int = 3) -> dict[Any, dict[str, MeanStd]]:
    """Group ``frame`` by ``by`` and aggregate each column of ``values`` with :func:`mean_std`.

    Args:
        frame: one row per run (seed or seed pair) and group, e.g. one row per (instance, layer).
        by: grouping column(s); keys of the result are scalars for one column, tuples for several.
        values: numeric columns to aggregate.

    Returns:
        ``{group key: {column: MeanStd}}`` in order of first appearance of each group.
    """
    keys = [by] if isinstance(by, str) else list(by)
    out: dict[Any, dict[str, MeanStd]] = {}
    if frame.empty:
        return out
    for key, group in frame.groupby(keys, sort=False, dropna=False):
        key = key[0] if isinstance(by, str) and isinstance(key, tuple) else key
        out[key] = {col: mean_std(group[col].to_numpy(), digits) for col in values}
    return out


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    # Non-ASCII symbols our own captions use, so the file also compiles without a UTF-8 font setup.
    "±": r"$\pm$",
    "×": r"$\times$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "→": r"$\rightarrow$",
    "–": "--",
    "—": "---",
    "ρ": r"$\rho$",
    "α": r"$\alpha$",
    "β": r"$\beta$",
    "ε": r"$\varepsilon$",
    "λ": r"$\lambda$",
    "σ": r"$\sigma$",
    "τ": r"$\tau$",
    "−": r"$-$",
    "·": r"$\cdot$",
    "≈": r"$\approx$",
    "≠": r"$\neq$",
    "∞": r"$\infty$",
    "²": r"$^2$",
    "³": r"$^3$",
    "…": r"\ldots{}",
    "‖": r"$\|$",
    "’": "'",
    "“": "``",
    "”": "''",
}
#: any other character outside Latin-1 (which T1 + pdflatex's default UTF-8 input set up) would stop pdflatex
_LATEX_RE = re.compile("|".join(re.escape(k) for k in _LATEX_SPECIALS) + "|[^\x00-\xff]")


def _latex_char(char: str) -> str:
    if char in _LATEX_SPECIALS:
        return _LATEX_SPECIALS[char]
    folded = unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode()
    return latex_escape(folded) if folded else "?"


def latex_escape(text: Any) -> str:
    """Escape a string for LaTeX text mode: all ten specials, ``< >``, the Unicode symbols tables use
    (minus, Greek letters, relations), and any other character outside Latin-1 folded to ASCII (or ``?``),
    so a table always compiles with pdflatex."""
    return _LATEX_RE.sub(lambda m: _latex_char(m.group(0)), str(text).replace("\n", " "))


#: widths (in characters of table text) of one column of a two-column paper and of the full text width
_ONE_COLUMN_CHARS = 52
_TEXT_WIDTH_CHARS = 118


def _header_lines(header: str, limit: int = 12) -> list[str]:
    """A column header as one line, or two lines split at the space nearest the middle when it is long."""
    if len(header) <= limit or " " not in header:
        return [header]
    spaces = [i for i, ch in enumerate(header) if ch == " "]
    cut = min(spaces, key=lambda i: abs(i - len(header) / 2))
    return [header[:cut], header[cut + 1:]]


_MARKDOWN_RE = re.compile(r"([\\|<>*_`\[\]])")


def markdown_escape(text: Any) -> str:
    """Escape a string for a Markdown pipe-table cell (pipes, inline markup and raw-HTML brackets)."""
    return _MARKDOWN_RE.sub(r"\\\1", str(text).replace("\n", " ").replace("\r", " "))


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating, MeanStd)) and not isinstance(value, bool)


@dataclass
class PaperTable:
    """A table for a paper: title, column headers, rows of cells, caption and notes.

    Cells are ``str``, numbers (``int``/``float``, NaN shown as ``–``), ``None`` (``–``) or :class:`MeanStd`.
    ``name`` is the file stem (``<name>.md``, ``.tex``, ``.csv``) and the LaTeX label (``tab:<name>``);
    ``rules_after`` lists row indexes after which LaTeX draws a ``\\midrule`` (e.g. between layers);
    ``column_digits`` overrides ``digits`` for plain numbers of named columns (``MeanStd`` carries its own).
    """

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    digits: int = 3
    rules_after: list[int] = field(default_factory=list)
    column_digits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ValueError(f"PaperTable name {self.name!r} must be a plain file stem (letters, digits, _ . -)")
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.name!r} row {i} has {len(row)} cells but {len(self.columns)} "
                                 f"columns ({self.columns}); give one cell per column")

    # -- cell text ------------------------------------------------------------------------------
    def cell_text(self, value: Any, column: int | None = None) -> str:
        """Plain text of one cell (Markdown, HTML, console); ``column`` selects a :attr:`column_digits` override."""
        if isinstance(value, MeanStd):
            return value.text()
        digits = self.column_digits.get(self.columns[column], self.digits) if column is not None else self.digits
        return format_number(value, digits)

    def numeric_columns(self) -> list[bool]:
        """Whether each column holds numbers (right-aligned) — true when every non-empty cell is numeric."""
        flags = []
        for j in range(len(self.columns)):
            cells = [row[j] for row in self.rows if row[j] is not None]
            flags.append(bool(cells) and all(_is_numeric(c) for c in cells))
        return flags

    # -- renderers ------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        numeric = self.numeric_columns()
        lines = [f"### {markdown_escape(self.title)}", ""]
        if self.caption:
            lines += [markdown_escape(self.caption), ""]
        lines.append("| " + " | ".join(markdown_escape(c) for c in self.columns) + " |")
        lines.append("|" + "|".join("---:" if num else ":---" for num in numeric) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(markdown_escape(self.cell_text(v, j)) for j, v in enumerate(row)) + " |")
        if not self.rows:
            lines.append("| " + " | ".join("–" for _ in self.columns) + " |")
        for note in self.notes:
            lines += ["", f"Note: {markdown_escape(note)}"]
        return "\n".join(lines) + "\n"

    def uniform_count(self) -> int | None:
        """The count shared by every :class:`MeanStd` cell with a spread (n ≥ 2), or ``None``."""
        counts = {v.n for row in self.rows for v in row if isinstance(v, MeanStd) and v.n >= 2}
        return counts.pop() if len(counts) == 1 else None

    def to_latex(self) -> str:
        r"""LaTeX booktabs table, laid out for a paper.

        When every mean ± std shares one count it is stated once in a note instead of in every cell; long
        headers break onto two lines (``\shortstack``, no extra package); a table too wide for one column of
        a two-column paper becomes ``table*`` in a smaller font, and one too wide even for the full text
        width is scaled down with ``\resizebox`` (``graphicx``).
        """
        numeric = self.numeric_columns()
        spec = "".join("r" if num else "l" for num in numeric)
        shared_n = self.uniform_count()
        header = [_header_lines(c) for c in self.columns]
        body = []
        for row in self.rows:
            cells = []
            for j, v in enumerate(row):
                if isinstance(v, MeanStd):
                    cells.append(v.text(show_n=shared_n is None))
                else:
                    cells.append(self.cell_text(v, j))
            body.append(cells)
        # Width estimate in characters: each column's widest header line or cell, plus the column gap.
        chars = sum(max([len(line) for line in header[j]] + [len(r[j]) for r in body]) + 2
                    for j in range(len(self.columns)))
        wide = chars > _ONE_COLUMN_CHARS
        scale = chars > _TEXT_WIDTH_CHARS
        env = "table*" if wide else "table"
        packages = "booktabs" + (", graphicx" if scale else "")
        out = [
            f"% {self.name}: requires \\usepackage{{{packages}}}",
            f"\\begin{{{env}}}[t]",
            r"\centering",
            r"\footnotesize" if wide else r"\small",
        ]
        if wide:
            out.append(r"\setlength{\tabcolsep}{4pt}")
        out += [
            f"\\caption{{{latex_escape(self.title)}{'. ' + latex_escape(self.caption) if self.caption else ''}}}",
            f"\\label{{tab:{self.name}}}",
        ]
        if scale:
            out.append(r"\resizebox{\textwidth}{!}{%")
        out += [f"\\begin{{tabular}}{{{spec}}}", r"\toprule"]
        heads = []
        for lines, num in zip(header, numeric):
            escaped = [latex_escape(line) for line in lines]
            align = "r" if num else "l"
            heads.append(escaped[0] if len(escaped) == 1
                         else f"\\shortstack[{align}]{{" + r" \\ ".join(escaped) + "}")
        out += [" & ".join(heads) + r" \\", r"\midrule"]
        rules = set(self.rules_after)
        for i, cells in enumerate(body):
            out.append(" & ".join(latex_escape(c) for c in cells) + r" \\")
            if i in rules and i != len(body) - 1:
                out.append(r"\midrule")
        out += [r"\bottomrule", r"\end{tabular}" + ("}" if scale else "")]
        notes = list(self.notes)
        if shared_n is not None:
            notes.insert(0, f"Every mean ± std is over n = {shared_n}.")
        if notes:
            out.append(r"\par\smallskip")
            out.append(r"{\footnotesize " + " ".join(latex_escape(n) for n in notes) + "}")
        out.append(f"\\end{{{env}}}")
        return "\n".join(out) + "\n"

    def csv_columns(self) -> list[str]:
        cols = []
        for j, name in enumerate(self.columns):
            if any(isinstance(row[j], MeanStd) for row in self.rows):
                cols += [f"{name}_mean", f"{name}_std", f"{name}_n"]
            else:
                cols.append(name)
        return cols

    def to_frame(self) -> pd.DataFrame:
        """The table as numbers: ``MeanStd`` columns expanded into ``_mean``/``_std``/``_n`` columns."""
        expand = [any(isinstance(row[j], MeanStd) for row in self.rows) for j in range(len(self.columns))]
        records = []
        for row in self.rows:
            rec: list[Any] = []
            for j, v in enumerate(row):
                if expand[j]:
                    if isinstance(v, MeanStd):
                        rec += [v.mean, v.std, v.n]
                    else:
                        rec += [v if _is_numeric(v) else math.nan, math.nan, 0 if v is None else 1]
                else:
                    rec.append(v)
            records.append(rec)
        import pandas as pd

        return pd.DataFrame(records, columns=self.csv_columns())

    def to_csv(self) -> str:
        buffer = io.StringIO()
        frame = self.to_frame()
        # Full precision in CSV: it is the machine-readable copy; rounding is for the paper renderings.
        frame.to_csv(buffer, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        return buffer.getvalue()

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write ``<name>.md``, ``<name>.tex`` and ``<name>.csv`` into ``directory``; returns the paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {
            "md": directory / f"{self.name}.md",
            "tex": directory / f"{self.name}.tex",
            "csv": directory / f"{self.name}.csv",
        }
        paths["md"].write_text(self.to_markdown(), encoding="utf-8")
        paths["tex"].write_text(self.to_latex(), encoding="utf-8")
        paths["csv"].write_text(self.to_csv(), encoding="utf-8")
        return paths

    def records(self) -> list[Mapping[str, str]]:
        """Rows as ``{column: display text}`` (for HTML and the console)."""
        return [{c: self.cell_text(v, j) for j, (c, v) in enumerate(zip(self.columns, row))} for row in self.rows]
