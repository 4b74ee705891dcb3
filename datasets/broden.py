"""Broden: a loader for the published dataset layout and an exporter that writes any concept dataset in it.

Layout (NetDissect's ``joinseg.py`` writer, read by NetDissect, NetDissect-Lite and quick-netdissect)::

    ROOT/index.csv        image,split,ih,iw,sh,sw,<one column per category, any order>
    ROOT/category.csv     name,first,last,count,frequency
    ROOT/label.csv        number,name,category,frequency,coverage,syns   (category = "cat(n);cat(m)")
    ROOT/c_<category>.csv code,number,name,frequency,coverage
    ROOT/images/...       images, and label PNGs of sh×sw with label = R + 256·G

A category cell holds zero or more ``;``-separated items: a decimal integer is a whole-image label (a
*global* label number), anything else a label PNG path relative to ``images/`` (one layer each). A label's
primary category is the selected category where its ``c_<category>.csv`` coverage is largest.

The constraints that shaped it: the index is parsed and validated once, up front (so a malformed row fails
at construction with its line number, not in the middle of a Dask shard), images are decoded only in
:meth:`BrodenDataset.load`, and every path is proven to stay inside ``images/`` before it is opened. The
exporter writes to a temporary sibling folder and renames it into place, so a crash never leaves a
half-written dataset that looks complete.
"""

from __future__ import annotations

import csv
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from ._base import Batch, Concept, ConceptDataset, DatasetError, register_dataset
from ._files import (
    check_choice,
    check_root,
    check_size,
    files_digest,
    read_label_png,
    read_rgb,
    resize_rgb,
    resolve_inside,
    where,
)

__all__ = ["BrodenDataset", "export_broden"]

_INDEX_FIXED = ("image", "split", "ih", "iw", "sh", "sw")
_CATEGORY_FIELDS = ("name", "first", "last", "count", "frequency")
_LABEL_FIELDS = ("number", "name", "category", "frequency", "coverage", "syns")
_CODE_FIELDS = ("code", "number", "name", "frequency", "coverage")
_CATEGORY_ITEM = re.compile(r"^([^(]*)\(([^)]*)\)$")
_INTEGER = re.compile(r"^\d+$")
_MAX_LABEL = 256 * 256 - 1  # R + 256·G


@dataclass(frozen=True)
class _Row:
    line: int  # 1-based line number in index.csv
    image: str
    split: str
    image_size: tuple[int, int]  # (ih, iw)
    seg_size: tuple[int, int]  # (sh, sw)
    pngs: dict[str, tuple[str, ...]]  # category -> label PNG paths (layers)
    scalars: dict[str, tuple[int, ...]]  # category -> whole-image label numbers


def _read_csv(path: Path, required: Iterable[str]) -> tuple[list[dict[str, str]], list[int], list[str]]:
    """Rows (dicts), their line numbers and the header of a CSV file; malformed rows raise with the line."""
    if not path.is_file():
        raise DatasetError(f"{path}: required file is missing; a Broden folder needs index.csv, category.csv, "
                           "label.csv and c_<category>.csv")
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot open ({exc})") from exc
    with handle:
        reader = csv.reader(handle)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{path}: file is empty; it needs a header row") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{where(path, 1)}: unreadable CSV header ({exc})") from exc
        missing = [name for name in required if name not in header]
        if missing:
            raise DatasetError(f"{where(path, 1)}: header lacks column(s) {', '.join(missing)}; found {header}")
        rows, lines = [], []
        try:
            for cells in reader:
                line = reader.line_num
                if not cells or all(not c.strip() for c in cells):
                    continue
                if len(cells) != len(header):
                    raise DatasetError(
                        f"{where(path, line)}: row has {len(cells)} fields but the header has {len(header)}; "
                        "fix the row (quote cells that contain commas)"
                    )
                rows.append(dict(zip(header, cells)))
                lines.append(line)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{where(path, reader.line_num)}: malformed CSV ({exc})") from exc
    return rows, lines, header


def _positive_int(text: str, column: str, path: Path, line: int, *, allow_zero: bool = False) -> int:
    value = text.strip()
    if not _INTEGER.match(value) or (int(value) == 0 and not allow_zero):
        raise DatasetError(
            f"{where(path, line)}: column {column!r} holds {text!r}; it must be a positive integer"
        )
    return int(value)


def _check_relative(text: str, path: Path, line: int) -> str:
    """Lexical safety check of an index path (no disk access): relative, never climbing out."""
    pure = PurePosixPath(text.replace("\\", "/"))
    if pure.is_absolute() or (len(text) > 1 and text[1] == ":") or ".." in pure.parts:
        raise DatasetError(
            f"{where(path, line)}: path {text!r} must be relative to images/ and may not contain '..'; "
            "fix the index row"
        )
    return text


@register_dataset("broden")
class BrodenDataset(ConceptDataset):
    """A dataset in Broden layout (the real ``broden1_224``/``_227``/``_384`` or an export of ours).

    Args:
        root: the folder holding ``index.csv``, ``category.csv``, ``label.csv``, ``c_<category>.csv`` and
            ``images/``.
        categories: categories to load — ``None`` (all of category.csv), a list of names, or a
            comma-separated string such as ``"object,part,color"``. Rows with no data in any selected
            category are dropped, as NetDissect does.
        split: ``None`` keeps every row; ``"train"``/``"val"`` keep rows whose ``split`` column matches.
        image_size: target ``(H, W)`` of the images — an integer, ``[H, W]`` or ``"HxW"``; ``None`` takes the
            first row's ``ih × iw``. The label-map size follows at the first row's ``sh/ih`` ratio.
        resize: what to do with an image (or row) of another size: ``"reject"`` raises a DatasetError
            naming the file and row; ``"resize"`` resizes images bilinearly and label maps by nearest
            neighbour.

    Concepts are the labels listed in the selected categories' ``c_<category>.csv``, each with its primary
    category (:attr:`primary_category`; per-category coverages in :attr:`category_coverage`); labels in
    no selected category are left out. :attr:`layers` gives the label-map depth per category (the deepest
    ``;`` list in index.csv; shallower rows are zero-padded). A category holding PNG paths appears in
    ``Batch.pixel_labels``, one holding integers in ``Batch.image_labels`` (a mixed one in both). Label
    values inside PNGs are checked against the largest number in label.csv. There are no landmarks or
    class labels (``class_label`` is ``None``).
    """

    kind = "broden"

    def __init__(
        self,
        root: str | Path,
        categories: str | list[str] | None = None,
        split: str | None = None,
        image_size: int | str | list[int] | None = None,
        resize: str = "reject",
    ) -> None:
        self.root = check_root("root", root)
        self.resize = check_choice("resize", resize, ("reject", "resize"))
        if split is not None and (not isinstance(split, str) or not split.strip()):
            raise DatasetError(f"dataset parameter split={split!r} is invalid; use None, 'train' or 'val'")
        self.split = split
        self._image_size_param = None if image_size is None else check_size("image_size", image_size)
        self._images_dir = self.root / "images"

        category_rows, category_lines, _ = _read_csv(self.root / "category.csv", ("name",))
        all_categories = [row["name"].strip() for row in category_rows]
        self._selected = self._select_categories(categories, all_categories)

        label_rows, label_lines, _ = _read_csv(self.root / "label.csv", ("number", "name", "category"))
        self._label_names: dict[int, str] = {}
        for row, line in zip(label_rows, label_lines):
            number = _positive_int(row["number"], "number", self.root / "label.csv", line)
            if number in self._label_names:
                raise DatasetError(f"{where(self.root / 'label.csv', line)}: label number {number} appears twice")
            for item in filter(None, (s.strip() for s in row["category"].split(";"))):
                if not _CATEGORY_ITEM.match(item):
                    raise DatasetError(
                        f"{where(self.root / 'label.csv', line)}: category item {item!r} is not 'name(count)'"
                    )
            self._label_names[number] = row["name"].strip()
        self._max_label = max(self._label_names, default=0)

        # Per-category coverage decides each label's primary category (NetDissect-Lite's rule).
        self.category_coverage: dict[int, dict[str, float]] = {}
        for category in self._selected:
            path = self.root / f"c_{category}.csv"
            code_rows, code_lines, _ = _read_csv(path, ("number", "coverage"))
            for row, line in zip(code_rows, code_lines):
                number = _positive_int(row["number"], "number", path, line)
                if number not in self._label_names:
                    raise DatasetError(f"{where(path, line)}: label number {number} is not in label.csv")
                try:
                    coverage = float(row["coverage"])
                except ValueError:
                    raise DatasetError(f"{where(path, line)}: coverage {row['coverage']!r} is not a number") from None
                self.category_coverage.setdefault(number, {})[category] = coverage

        self._rows = self._read_index()
        if not self._rows:
            raise DatasetError(
                f"{self.root / 'index.csv'}: no rows left with data in categories {self._selected}"
                + (f" and split {split!r}" if split else "")
                + "; check the category names and the split column"
            )
        self._layers = {c: max(len(r.pngs.get(c, ())) for r in self._rows) for c in self._selected}
        self._scalar_width = {c: max(len(r.scalars.get(c, ())) for r in self._rows) for c in self._selected}
        self._sizes()

        order = {c: i for i, c in enumerate(self._selected)}
        self.primary_category: dict[int, str] = {}
        for number, by_category in self.category_coverage.items():
            # Largest coverage wins; ties go to the later category in category.csv order, as in NetDissect's
            # max over (coverage, category index).
            self.primary_category[number] = max(by_category, key=lambda c: (by_category[c], order[c]))
        self._concepts = [
            Concept(number, self._label_names[number], category, self._layers[category] > 0)
            for number, category in sorted(self.primary_category.items())
        ]
        # Snapshot at construction: the digest describes what was parsed, even if the files change later.
        files = ["index.csv", "category.csv", "label.csv"] + [f"c_{c}.csv" for c in self._selected]
        params = {
            "kind": self.kind, "categories": self._selected, "split": self.split,
            "image_size": list(self._image_size), "seg_size": list(self._seg_size), "resize": self.resize,
        }
        self._digest = files_digest(self.root, files, params)

    # ------------------------------------------------------------------------------------------------ parsing

    def _select_categories(self, categories: Any, available: list[str]) -> list[str]:
        if categories is None:
            return list(available)
        if isinstance(categories, str):
            wanted = [c.strip() for c in categories.split(",") if c.strip()]
        elif isinstance(categories, (list, tuple)) and all(isinstance(c, str) for c in categories):
            wanted = [c.strip() for c in categories]
        else:
            raise DatasetError(
                f"dataset parameter categories={categories!r} is invalid; use a list of names or 'a,b,c'"
            )
        unknown = [c for c in wanted if c not in available]
        if unknown or not wanted:
            raise DatasetError(
                f"dataset parameter categories={categories!r}: unknown {unknown or 'empty selection'}; "
                f"category.csv lists {available}"
            )
        return [c for c in available if c in wanted]  # category.csv order, as NetDissect keeps it

    def _read_index(self) -> list[_Row]:
        path = self.root / "index.csv"
        rows, lines, header = _read_csv(path, _INDEX_FIXED)
        missing = [c for c in self._selected if c not in header]
        if missing:
            raise DatasetError(
                f"{where(path, 1)}: no column for selected categor{'y' if len(missing) == 1 else 'ies'} "
                f"{', '.join(missing)}; header is {header}"
            )
        parsed = []
        for row, line in zip(rows, lines):
            image = _check_relative(row["image"].strip(), path, line)
            if not image:
                raise DatasetError(f"{where(path, line)}: empty 'image' cell; every row needs an image path")
            sizes = [_positive_int(row[k], k, path, line) for k in ("ih", "iw", "sh", "sw")]
            pngs: dict[str, tuple[str, ...]] = {}
            scalars: dict[str, tuple[int, ...]] = {}
            for category in self._selected:
                items = [item.strip() for item in row[category].split(";") if item.strip()]
                numbers = [int(item) for item in items if _INTEGER.match(item)]
                files = [_check_relative(item, path, line) for item in items if not _INTEGER.match(item)]
                for number in numbers:
                    if number not in self._label_names:
                        raise DatasetError(
                            f"{where(path, line)}: category {category!r} lists whole-image label {number}, "
                            "which label.csv does not define"
                        )
                for name in files:
                    if not name.lower().endswith(".png"):
                        raise DatasetError(
                            f"{where(path, line)}: category {category!r} holds {name!r}, neither a label number "
                            "nor a .png label map"
                        )
                if files:
                    pngs[category] = tuple(files)
                if numbers:
                    scalars[category] = tuple(numbers)
            if not pngs and not scalars:
                continue  # NetDissect drops rows without data in the selected categories
            if self.split is not None and row["split"].strip() != self.split:
                continue
            parsed.append(
                _Row(line, image, row["split"].strip(), (sizes[0], sizes[1]), (sizes[2], sizes[3]), pngs, scalars)
            )
        return parsed

    def _sizes(self) -> None:
        first = self._rows[0]
        if self._image_size_param is None:
            self._image_size, self._seg_size = first.image_size, first.seg_size
        else:
            h, w = self._image_size_param
            self._image_size = (h, w)
            self._seg_size = (
                max(1, round(h * first.seg_size[0] / first.image_size[0])),
                max(1, round(w * first.seg_size[1] / first.image_size[1])),
            )
        if self.resize == "reject":
            for row in self._rows:
                if row.image_size != self._image_size or row.seg_size != self._seg_size:
                    raise DatasetError(
                        f"{where(self.root / 'index.csv', row.line)}: image {row.image} is "
                        f"{row.image_size[0]}×{row.image_size[1]} (labels {row.seg_size[0]}×{row.seg_size[1]}), "
                        f"expected {self._image_size[0]}×{self._image_size[1]} "
                        f"(labels {self._seg_size[0]}×{self._seg_size[1]}); pass resize='resize' to resize"
                    )

    # ----------------------------------------------------------------------------------------------- protocol

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def image_size(self) -> tuple[int, int]:
        return self._image_size

    @property
    def seg_size(self) -> tuple[int, int]:
        return self._seg_size

    @property
    def concepts(self) -> list[Concept]:
        return list(self._concepts)

    @property
    def categories(self) -> list[str]:
        """Selected categories in category.csv order (including ones whose labels are all elsewhere)."""
        return list(self._selected)

    @property
    def layers(self) -> dict[str, int]:
        """Label-map layers per category (0 for whole-image-only categories)."""
        return dict(self._layers)

    def digest(self) -> str:
        """Hash of index.csv, category.csv, label.csv and the selected c_*.csv as read, plus the parameters."""
        return self._digest

    def split_indices(self, split: str) -> np.ndarray:
        """Positions whose ``split`` column equals ``split`` (Broden uses ``train``/``val``)."""
        labels = np.array([row.split for row in self._rows])
        if split not in set(labels.tolist()) | {"train", "val"}:
            raise DatasetError(f"unknown split {split!r}; index.csv uses {sorted(set(labels.tolist()))}")
        return np.flatnonzero(labels == split).astype(np.int64)

    def load(self, indices: np.ndarray) -> Batch:
        index = np.asarray(indices)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise DatasetError(f"indices must be a 1-D integer array, got shape {index.shape} dtype {index.dtype}")
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise DatasetError(f"index out of range for a Broden dataset of {len(self)} rows: {index.tolist()[:8]}")
        n, (h, w), (sh, sw) = index.size, self._image_size, self._seg_size
        images = np.empty((n, 3, h, w), dtype=np.uint8)
        pixel = {c: np.zeros((n, layers, sh, sw), np.int32) for c, layers in self._layers.items() if layers}
        scalar = {c: np.zeros((n, k), np.int32) for c, k in self._scalar_width.items() if k}
        index_csv = self.root / "index.csv"
        for k, position in enumerate(index.tolist()):
            row = self._rows[position]
            path = resolve_inside(self._images_dir, row.image, file=index_csv, row=row.line)
            image = read_rgb(path, file=index_csv, row=row.line)
            if image.size != (w, h):
                if self.resize == "reject":
                    raise DatasetError(
                        f"{where(index_csv, row.line)}: image {path} is {image.height}×{image.width}, expected "
                        f"{h}×{w}; pass resize='resize' or fix the image"
                    )
                image = resize_rgb(image, (h, w), "resize")
            images[k] = np.asarray(image).transpose(2, 0, 1)
            for category, files in row.pngs.items():
                for layer, name in enumerate(files):
                    png = resolve_inside(self._images_dir, name, file=index_csv, row=row.line)
                    labels = read_label_png(png, row.seg_size, self._max_label, file=index_csv, row=row.line)
                    if labels.shape != (sh, sw):
                        labels = _nearest(labels, (sh, sw))
                    pixel[category][k, layer] = labels
            for category, numbers in row.scalars.items():
                scalar[category][k, : len(numbers)] = numbers
        return Batch(index=index, images=images, pixel_labels=pixel, image_labels=scalar)


def _nearest(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map (sample at target pixel centres)."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * labels.shape[0] / shape[0]).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * labels.shape[1] / shape[1]).astype(np.int64), labels.shape[1] - 1)
    return labels[rows[:, None], cols[None, :]]


# ---------------------------------------------------------------------------------------------------- export


def _label_png(labels: np.ndarray) -> Image.Image:
    rgb = np.zeros(labels.shape + (3,), dtype=np.uint8)
    rgb[..., 0] = labels & 0xFF
    rgb[..., 1] = labels >> 8
    return Image.fromarray(rgb, mode="RGB")


def _decimal(value: float) -> str:
    """A float as a plain decimal (never exponent notation, which NetDissect's readers do not parse)."""
    return np.format_float_positional(float(value), trim="0")


def export_broden(
    dataset: ConceptDataset,
    out_dir: str | Path,
    *,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``dataset`` in Broden layout under ``out_dir`` (which must not exist or be empty).

    Images become RGB PNGs ``images/<kind>/<index>.png``; each pixel category's label maps become
    ``<index>_<category>.png`` (or ``<index>_<category>_<k>.png``, k = 1, 2, … for categories with several
    layers; trailing all-zero layers and all-zero maps are not written, as in Broden); whole-image labels
    become integer cells. The ``split`` column is the dataset's own :meth:`~ConceptDataset.split_indices`.
    ``category.csv``, ``label.csv`` and ``c_<category>.csv`` carry the frequencies (images with the label)
    and coverages (summed image fraction; 1.0 per image for whole-image labels) measured while writing.

    Args:
        dataset: any concept dataset whose label numbers fit in R + 256·G (< 65536).
        out_dir: destination folder.
        batch_size: items loaded per ``dataset.load`` call.
        progress: optional ``callback(done, total)``.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"export: {out} already exists and is not an empty folder; choose a new --out folder")
    concepts = dataset.concepts
    numbers = [c.label for c in concepts]
    if len(set(numbers)) != len(numbers) or (numbers and (min(numbers) < 1 or max(numbers) > _MAX_LABEL)):
        raise DatasetError(f"export: label numbers must be unique and in 1..{_MAX_LABEL} for Broden PNGs")
    if len(set(c.name for c in concepts)) != len(concepts):
        raise DatasetError("export: concept names must be unique (Broden's label.csv is keyed by name)")
    if batch_size < 1:
        raise DatasetError(f"export: batch_size={batch_size} is invalid; use a positive integer")

    categories = list(dataset.categories)
    prefix = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset.kind) or "data"
    n = len(dataset)
    digits = max(6, len(str(max(n - 1, 0))))
    train = np.zeros(n, dtype=bool)
    train[dataset.split_indices("train")] = True
    top = max(numbers, default=0)
    frequency = {c: np.zeros(top + 1, np.int64) for c in categories}  # images with the label, per category
    coverage = {c: np.zeros(top + 1, np.float64) for c in categories}
    any_frequency = np.zeros(top + 1, np.int64)
    any_coverage = np.zeros(top + 1, np.float64)

    staging = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    (staging / "images" / prefix).mkdir(parents=True)
    try:
        rows = []
        for shard in dataset.shards(batch_size):
            batch = dataset.load(np.arange(shard.start, shard.stop, dtype=np.int64))
            for k in range(len(batch)):
                item = int(batch.index[k])
                stem = f"{prefix}/{item:0{digits}d}"
                Image.fromarray(batch.images[k].transpose(1, 2, 0), mode="RGB").save(
                    staging / "images" / f"{stem}.png", compress_level=3
                )
                _, ih, iw = batch.images[k].shape
                sh, sw = ih, iw
                cells: dict[str, str] = {}
                seen = np.zeros(top + 1, dtype=bool)
                for category in categories:
                    items: list[str] = []
                    if category in batch.pixel_labels:
                        layers = batch.pixel_labels[category][k]
                        sh, sw = layers.shape[1:]
                        filled = [i for i in range(layers.shape[0]) if layers[i].any()]
                        count = filled[-1] + 1 if filled else 0
                        for i in range(count):
                            suffix = "" if layers.shape[0] == 1 else f"_{i + 1}"
                            name = f"{stem}_{category}{suffix}.png"
                            _label_png(layers[i]).save(staging / "images" / name, compress_level=3)
                            items.append(name)
                        counts = np.bincount(layers.reshape(-1), minlength=top + 1)[: top + 1]
                        counts[0] = 0
                        present = counts > 0
                        frequency[category] += present
                        coverage[category] += counts / float(sh * sw)
                        seen |= present
                        any_coverage += counts / float(sh * sw)
                    if category in batch.image_labels:
                        values = [int(v) for v in batch.image_labels[category][k] if v > 0]
                        items += [str(v) for v in values]
                        for v in set(values):
                            frequency[category][v] += 1
                            coverage[category][v] += 1.0
                            any_coverage[v] += 1.0
                            seen[v] = True
                    cells[category] = ";".join(items)
                any_frequency += seen
                rows.append(([f"{stem}.png", "train" if train[item] else "val", ih, iw, sh, sw], cells))
            if progress is not None:
                progress(shard.stop, n)
        _write_tables(staging, dataset, categories, rows, frequency, coverage, any_frequency, any_coverage)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _write_tables(
    root: Path,
    dataset: ConceptDataset,
    categories: list[str],
    rows: list[tuple[list[Any], dict[str, str]]],
    frequency: dict[str, np.ndarray],
    coverage: dict[str, np.ndarray],
    any_frequency: np.ndarray,
    any_coverage: np.ndarray,
) -> None:
    concepts = {c.label: c for c in dataset.concepts}

    def members(category: str) -> list[int]:
        """Labels listed in c_<category>: seen there, or declared in it (even if never seen)."""
        return sorted(n for n, c in concepts.items() if frequency[category][n] > 0 or c.category == category)

    # Broden orders categories by their lowest label number; categories without any label are left out.
    categories = sorted((c for c in categories if members(c)), key=lambda c: members(c)[0])
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(list(_INDEX_FIXED) + categories)
        writer.writerows(fixed + [cells[c] for c in categories] for fixed, cells in rows)
    with open(root / "category.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(_CATEGORY_FIELDS)
        for category in categories:
            labels = members(category)
            writer.writerow([category, min(labels), max(labels), len(labels), int(frequency[category][labels].sum())])
    with open(root / "label.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(_LABEL_FIELDS)
        for number, concept in sorted(concepts.items()):
            counts = [(int(frequency[c][number]), c) for c in categories if frequency[c][number] > 0]
            counts.sort(key=lambda item: -item[0])
            field = ";".join(f"{c}({k})" for k, c in counts) or f"{concept.category}(0)"
            writer.writerow([number, concept.name, field, int(any_frequency[number]), f"{any_coverage[number]:f}", ""])
    for category in categories:
        labels = members(category)
        labels.sort(key=lambda n: (-frequency[category][n], -coverage[category][n], n))
        with open(root / f"c_{category}.csv", "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(_CODE_FIELDS)
            for code, number in enumerate(labels, start=1):
                writer.writerow(
                    [code, number, concepts[number].name, int(frequency[category][number]),
                     _decimal(coverage[category][number])]
                )
    (root / "README.txt").write_text(
        f"Broden-format export of a repdissect '{dataset.kind}' dataset.\n"
        f"images: {len(rows)}\nimage_size: {tuple(dataset.image_size)}\nsegmentation_size: {tuple(dataset.seg_size)}\n"
        f"digest: {dataset.digest()}\n"
        "Label maps are RGB PNGs with label = R + 256*G; integer cells are whole-image labels.\n"
    )
