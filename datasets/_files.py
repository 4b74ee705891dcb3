"""Shared file helpers for the on-disk dataset kinds: safe path resolution, image decoding, digests.

The constraint: every path comes from an index file someone else wrote, so nothing may be opened before
it is proven to stay inside the dataset root, and every failure must name the file (and the index row it
came from) — a bare ``PIL.UnidentifiedImageError`` halfway through a Dask shard helps nobody. Digests
hash the small index/label files plus the loader parameters, never the images themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

import numpy as np
from PIL import Image

from ._base import DatasetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "canonical_digest",
    "check_choice",
    "check_int",
    "check_root",
    "check_size",
    "files_digest",
    "read_label_png",
    "read_rgb",
    "resize_rgb",
    "resolve_inside",
    "where",
]

#: file name endings treated as images by the folder-walking loaders (lower case)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")


def where(file: Path | str, row: int | None = None) -> str:
    """``"file"`` or ``"file, line N"`` for error messages (``row`` is the 1-based line number)."""
    return f"{file}, line {row}" if row is not None else str(file)


def canonical_digest(payload: Any) -> str:
    """SHA-256 of the canonical JSON of ``payload`` (sorted keys, no whitespace), as hex."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def files_digest(root: Path, relative_paths: Iterable[str], params: dict[str, Any]) -> str:
    """Digest over the bytes of the given small files (missing ones count as absent) plus ``params``."""
    hasher = hashlib.sha256()
    for rel in relative_paths:
        path = root / rel
        hasher.update(rel.encode() + b"\0")
        if path.is_file():
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(chunk)
        else:
            hasher.update(b"<absent>")
        hasher.update(b"\0")
    hasher.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode())
    return hasher.hexdigest()


def resolve_inside(base: Path, relative: str, *, file: Path | str, row: int | None) -> Path:
    """Resolve ``relative`` (a POSIX path from an index file) under ``base``; refuse anything escaping it.

    Checked twice: lexically (absolute paths, ``..`` climbing out) and after resolving symlinks, so a link
    inside the dataset that points outside is refused too.
    """
    text = relative.strip()
    if not text:
        raise DatasetError(f"{where(file, row)}: empty path; every image/label cell needs a relative path")
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":"):
        raise DatasetError(
            f"{where(file, row)}: path {text!r} is absolute; paths must be relative to {base}"
        )
    depth = 0
    for part in pure.parts:
        depth += -1 if part == ".." else (0 if part == "." else 1)
        if depth < 0:
            raise DatasetError(
                f"{where(file, row)}: path {text!r} escapes the dataset folder {base}; "
                "remove the '..' components"
            )
    candidate = base.joinpath(*pure.parts)
    resolved_base = base.resolve()
    resolved = candidate.resolve()
    if resolved != resolved_base and not resolved.is_relative_to(resolved_base):
        raise DatasetError(
            f"{where(file, row)}: path {text!r} resolves to {resolved}, outside the dataset folder "
            f"{resolved_base} (a symbolic link?); copy the file into the dataset"
        )
    return candidate


def _open_image(path: Path, *, file: Path | str, row: int | None) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"{where(file, row)}: file {path} does not exist; check the path or restore the file")
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{where(file, row)}: cannot decode image {path} ({type(exc).__name__}: {exc}); "
            "the file is corrupt or not an image — replace it"
        ) from exc
    return image


def read_rgb(path: Path, *, file: Path | str, row: int | None) -> Image.Image:
    """Open an image as RGB (grayscale/paletted/alpha images converted), errors naming file and row."""
    image = _open_image(path, file=file, row=row)
    return image if image.mode == "RGB" else image.convert("RGB")


def read_label_png(
    path: Path, expected: tuple[int, int], max_label: int, *, file: Path | str, row: int | None
) -> np.ndarray:
    """Decode a Broden label PNG as ``R + 256·G`` int32 ``(h, w)``; must be RGB(A) of shape ``expected``."""
    image = _open_image(path, file=file, row=row)
    if image.mode not in ("RGB", "RGBA"):
        raise DatasetError(
            f"{where(file, row)}: label map {path} has PNG mode {image.mode!r}; Broden label maps must be "
            "3-channel RGB with label = R + 256·G — re-save it as RGB"
        )
    pixels = np.asarray(image)
    if pixels.shape[:2] != tuple(expected):
        raise DatasetError(
            f"{where(file, row)}: label map {path} is {pixels.shape[0]}×{pixels.shape[1]}, but the row says "
            f"sh×sw = {expected[0]}×{expected[1]}; fix the row's sh/sw or the PNG"
        )
    labels = pixels[:, :, 0].astype(np.int32) + 256 * pixels[:, :, 1].astype(np.int32)
    top = int(labels.max()) if labels.size else 0
    if top > max_label:
        raise DatasetError(
            f"{where(file, row)}: label map {path} holds label {top}, above the largest number in label.csv "
            f"({max_label}); add the label to label.csv or fix the PNG"
        )
    return labels


def resize_rgb(image: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    """Resize to ``size = (H, W)``: ``"resize"`` stretches, ``"crop"`` scales the short side and centre-crops."""
    height, width = size
    if image.size == (width, height):
        return image
    if mode == "crop":
        scale = max(width / image.width, height / image.height)
        crop_w, crop_h = width / scale, height / scale
        left, top = (image.width - crop_w) / 2, (image.height - crop_h) / 2
        return image.resize((width, height), Image.Resampling.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
    return image.resize((width, height), Image.Resampling.BILINEAR)


# ----------------------------------------------------------------------------------------------------------------
# Parameter validation shared by every kind (params arrive straight from the TOML [dataset] section).


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None, fix: str = "") -> int:
    """Validate an integer parameter (bools and non-integral floats rejected)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        ok, value = True, int(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high):
        bounds = f"an integer ≥ {low}" if high is None else f"an integer in [{low}, {high}]"
        raise DatasetError(f"dataset parameter {name}={value!r} is invalid; use {bounds}{'; ' + fix if fix else ''}")
    return int(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate a string parameter against its allowed values."""
    if value not in choices:
        raise DatasetError(f"dataset parameter {name}={value!r} is invalid; use one of {', '.join(map(repr, choices))}")
    return str(value)


def check_size(name: str, value: Any, *, low: int = 1) -> tuple[int, int]:
    """An image size given as ``S`` (square), ``[H, W]`` or ``"HxW"`` → ``(H, W)``."""
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            value = [int(p) for p in parts] if len(parts) == 2 else int(value)
        except ValueError:
            raise DatasetError(f"dataset parameter {name}={value!r} is invalid; use an integer S or 'HxW'") from None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise DatasetError(f"dataset parameter {name}={value!r} is invalid; give [H, W] (two integers)")
        return (check_int(name, value[0], low=low), check_int(name, value[1], low=low))
    side = check_int(name, value, low=low)
    return side, side


def check_root(name: str, value: Any, *, required: Iterable[str] = ()) -> Path:
    """A dataset root folder that exists and holds the ``required`` files."""
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise DatasetError(f"dataset parameter {name}={value!r} is invalid; give the dataset folder path")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset parameter {name}={str(root)!r}: no such folder; point it at the dataset folder")
    for rel in required:
        if not (root / rel).is_file():
            raise DatasetError(f"{root / rel}: required file is missing; is {root} the right dataset folder?")
    return root
