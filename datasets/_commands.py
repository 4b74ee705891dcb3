"""Plain functions behind the ``repdissect dataset …`` sub-commands (the CLI itself lives in the pipeline).

They take already-parsed arguments, raise :class:`DatasetError` on bad input (the CLI maps it to exit
code 2) and return the path they wrote, so the argparse layer stays a thin shell.
"""

from __future__ import annotations

from pathlib import Path

from ._base import ConceptDataset, DatasetError
from .broden import export_broden
from .preview import contact_sheet
from .synthetic import SyntheticWorld

__all__ = ["EXPORT_FORMATS", "EXPORT_KINDS", "export_command", "preview_command"]

EXPORT_KINDS = ("synthetic",)
EXPORT_FORMATS = ("broden",)


def export_command(kind: str, fmt: str, out: Path, images: int, size: int, seed: int) -> Path:
    """``repdissect dataset export --kind synthetic --format broden --out DIR [--images N] [--size S] [--seed K]``.

    Builds the generated dataset and writes it in the requested on-disk format; returns the output folder.
    """
    if kind not in EXPORT_KINDS:
        raise DatasetError(f"export: --kind {kind!r} cannot be exported; use one of {', '.join(EXPORT_KINDS)}")
    if fmt not in EXPORT_FORMATS:
        raise DatasetError(f"export: --format {fmt!r} is not supported; use one of {', '.join(EXPORT_FORMATS)}")
    dataset = SyntheticWorld(images=images, size=size, seed=seed)
    return export_broden(dataset, Path(out))


def preview_command(dataset: ConceptDataset, out: Path, n: int) -> Path:
    """``repdissect dataset preview``: a contact sheet of the first ``n`` items with mask overlays."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DatasetError(f"preview: --n {n!r} is invalid; use a positive number of images")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise DatasetError(f"preview: --out {str(out)!r} must be a .png file path")
    return contact_sheet(dataset, out, n=n)
