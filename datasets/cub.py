"""CUB-200-2011 with part landmarks, cropped to the bird's bounding box as the location-stability papers do.

Files read (the published layout; paths relative to the dataset root)::

    images.txt               <image_id> <relative path under images/>
    bounding_boxes.txt       <image_id> <x> <y> <width> <height>
    parts/parts.txt          <part_id> <part name, may contain spaces>
    parts/part_locs.txt      <image_id> <part_id> <x> <y> <visible>
    image_class_labels.txt   <image_id> <class_id>          (optional: class labels)
    classes.txt              <class_id> <class name>        (optional: class names)
    train_test_split.txt     <image_id> <is_training_image> (optional: train/val split; test → "val")

Each image is cropped to its bounding box and resized to ``size × size`` (``crop=False`` resizes the whole
image instead); landmarks follow the same map, ``x' = (x − box_x) · size / box_w`` (Zhang et al.'s
``readPartTruth.m``), treating CUB's coordinates and boxes as continuous image coordinates. A landmark is
visible when CUB marks it visible and it falls inside the output image; coordinates of invisible
landmarks are finite but meaningless. There are no concept masks. The constraint: the tables are parsed
and cross-checked once at construction (every malformed line fails with its file and line number), and
images are decoded only in :meth:`CUBDataset.load`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._base import Batch, Concept, ConceptDataset, DatasetError, register_dataset
from ._files import check_int, check_root, files_digest, read_rgb, resolve_inside, where

__all__ = ["CUBDataset"]

_TABLES = (
    "images.txt", "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt",
    "image_class_labels.txt", "classes.txt", "train_test_split.txt",
)


def _read_table(path: Path, fields: int, *, last_is_text: bool = False) -> list[tuple[int, list[str]]]:
    """Whitespace-separated rows as (line number, fields); ``last_is_text`` joins trailing words."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from exc
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.split(None, fields - 1) if last_is_text else line.split()
        if len(cells) != fields:
            raise DatasetError(
                f"{where(path, line_number)}: expected {fields} fields, got {len(cells)} in {line.strip()!r}"
            )
        rows.append((line_number, [c.strip() for c in cells]))
    return rows


def _int(text: str, path: Path, line: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise DatasetError(f"{where(path, line)}: {what} {text!r} is not an integer") from None
    return value


def _float(text: str, path: Path, line: int, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise DatasetError(f"{where(path, line)}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise DatasetError(f"{where(path, line)}: {what} {text!r} is not finite")
    return value


@register_dataset("cub")
class CUBDataset(ConceptDataset):
    """CUB-200-2011 images cropped to the bird, with part landmarks and (optionally) species labels.

    Args:
        root: the ``CUB_200_2011`` folder (holding ``images.txt``, ``images/``, ``parts/`` …).
        size: output side S; every crop is resized to S×S (default 224, as in the papers).
        parts: landmarks to keep — ``None`` (all parts in ``parts.txt``, by id), a list of part ids or
            names, or a comma-separated string such as ``"1,6,14"`` or ``"back,forehead,tail"``.
        crop: crop to the bounding box (default ``True``); ``False`` resizes the whole image.
    """

    kind = "cub"

    def __init__(self, root: str | Path, size: int = 224, parts: Any = None, crop: bool = True) -> None:
        self.root = check_root("root", root, required=("images.txt", "bounding_boxes.txt", "parts/parts.txt",
                                                        "parts/part_locs.txt"))
        self.size = check_int("size", size, low=8, high=4096)
        if not isinstance(crop, bool):
            raise DatasetError(f"dataset parameter crop={crop!r} is invalid; use true or false")
        self.crop = crop
        self._images_dir = self.root / "images"

        images_txt = self.root / "images.txt"
        self._paths: dict[int, tuple[str, int]] = {}
        for line, (image_id, rel) in _read_table(images_txt, 2, last_is_text=True):
            key = _int(image_id, images_txt, line, "image id")
            if key in self._paths:
                raise DatasetError(f"{where(images_txt, line)}: image id {key} appears twice")
            self._paths[key] = (rel, line)
        self._ids = sorted(self._paths)
        if not self._ids:
            raise DatasetError(f"{images_txt}: no images listed")
        position = {image_id: i for i, image_id in enumerate(self._ids)}

        boxes_txt = self.root / "bounding_boxes.txt"
        self._boxes = np.full((len(self._ids), 4), np.nan)
        for line, cells in _read_table(boxes_txt, 5):
            key = _int(cells[0], boxes_txt, line, "image id")
            if key not in position:
                raise DatasetError(f"{where(boxes_txt, line)}: image id {key} is not in images.txt")
            box = [_float(c, boxes_txt, line, "box value") for c in cells[1:]]
            if box[2] <= 0 or box[3] <= 0:
                raise DatasetError(f"{where(boxes_txt, line)}: box {box} has a non-positive width or height")
            self._boxes[position[key]] = box
        if np.isnan(self._boxes).any():
            missing = self._ids[int(np.flatnonzero(np.isnan(self._boxes[:, 0]))[0])]
            raise DatasetError(f"{boxes_txt}: no bounding box for image id {missing}; every image needs one")

        parts_txt = self.root / "parts" / "parts.txt"
        all_parts: dict[int, str] = {}
        for line, (part_id, name) in _read_table(parts_txt, 2, last_is_text=True):
            all_parts[_int(part_id, parts_txt, line, "part id")] = name
        self._part_ids = self._select_parts(parts, all_parts)
        self._part_names = [all_parts[p] for p in self._part_ids]
        slot = {p: i for i, p in enumerate(self._part_ids)}

        locs_txt = self.root / "parts" / "part_locs.txt"
        self._landmarks = np.zeros((len(self._ids), len(self._part_ids), 2), dtype=np.float64)
        self._visible = np.zeros((len(self._ids), len(self._part_ids)), dtype=bool)
        for line, cells in _read_table(locs_txt, 5):
            key = _int(cells[0], locs_txt, line, "image id")
            part = _int(cells[1], locs_txt, line, "part id")
            if key not in position:
                raise DatasetError(f"{where(locs_txt, line)}: image id {key} is not in images.txt")
            if part not in all_parts:
                raise DatasetError(f"{where(locs_txt, line)}: part id {part} is not in parts/parts.txt")
            x, y = _float(cells[2], locs_txt, line, "x"), _float(cells[3], locs_txt, line, "y")
            visible = cells[4]
            if visible not in ("0", "1"):
                raise DatasetError(f"{where(locs_txt, line)}: visible flag {visible!r} must be 0 or 1")
            if part in slot:
                self._landmarks[position[key], slot[part]] = (x, y)
                self._visible[position[key], slot[part]] = visible == "1"

        self._classes = np.full(len(self._ids), -1, dtype=np.int64)
        self._class_names: list[str] = []
        labels_txt, classes_txt = self.root / "image_class_labels.txt", self.root / "classes.txt"
        if labels_txt.is_file():
            names: dict[int, str] = {}
            if classes_txt.is_file():
                for line, (class_id, name) in _read_table(classes_txt, 2, last_is_text=True):
                    names[_int(class_id, classes_txt, line, "class id")] = name
            for line, cells in _read_table(labels_txt, 2):
                key, class_id = (_int(c, labels_txt, line, "id") for c in cells)
                if key not in position:
                    raise DatasetError(f"{where(labels_txt, line)}: image id {key} is not in images.txt")
                if class_id < 1 or (names and class_id not in names):
                    raise DatasetError(f"{where(labels_txt, line)}: class id {class_id} is not in classes.txt")
                self._classes[position[key]] = class_id - 1
            top = max(max(names, default=0), int(self._classes.max()) + 1)
            self._class_names = [names.get(i + 1, f"class_{i + 1}") for i in range(top)]

        self._split: np.ndarray | None = None
        split_txt = self.root / "train_test_split.txt"
        if split_txt.is_file():
            self._split = np.full(len(self._ids), "", dtype=object)
            for line, cells in _read_table(split_txt, 2):
                key = _int(cells[0], split_txt, line, "image id")
                if key not in position or cells[1] not in ("0", "1"):
                    raise DatasetError(f"{where(split_txt, line)}: expected '<known image id> <0|1>', got {cells}")
                self._split[position[key]] = "train" if cells[1] == "1" else "val"
        params = {"kind": self.kind, "size": self.size, "parts": self._part_ids, "crop": self.crop}
        self._digest = files_digest(self.root, _TABLES, params)

    @staticmethod
    def _select_parts(parts: Any, available: dict[int, str]) -> list[int]:
        if parts is None:
            return sorted(available)
        items = parts.split(",") if isinstance(parts, str) else parts
        if not isinstance(items, (list, tuple)) or not items:
            raise DatasetError(f"dataset parameter parts={parts!r} is invalid; use part ids/names, e.g. '1,6,14'")
        by_name = {name.lower(): pid for pid, name in available.items()}
        chosen = []
        for item in items:
            text = str(item).strip()
            pid = int(text) if text.isdigit() else by_name.get(text.lower())
            if pid is None or pid not in available:
                raise DatasetError(
                    f"dataset parameter parts: {item!r} is not a part; parts.txt has "
                    + ", ".join(f"{k} {v}" for k, v in sorted(available.items()))
                )
            chosen.append(pid)
        return chosen

    # --------------------------------------------------------------------------------------------- protocol

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def seg_size(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def concepts(self) -> list[Concept]:
        return []

    @property
    def landmark_names(self) -> list[str]:
        return list(self._part_names)

    @property
    def class_names(self) -> list[str]:
        return list(self._class_names)

    @property
    def image_ids(self) -> np.ndarray:
        """CUB image ids (1-based, from images.txt) of positions 0 .. len-1."""
        return np.array(self._ids, dtype=np.int64)

    def digest(self) -> str:
        """Hash of the annotation tables as read at construction, plus the parameters."""
        return self._digest

    def split_indices(self, split: str) -> np.ndarray:
        """``train_test_split.txt`` when present (test images form ``val``), else the default interleave."""
        if self._split is None:
            return super().split_indices(split)
        if split not in ("train", "val"):
            raise DatasetError(f"unknown split {split!r}; use 'train' or 'val'")
        return np.flatnonzero(self._split == split).astype(np.int64)

    def load(self, indices: np.ndarray) -> Batch:
        index = np.asarray(indices)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise DatasetError(f"indices must be a 1-D integer array, got shape {index.shape} dtype {index.dtype}")
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise DatasetError(f"index out of range for a CUB dataset of {len(self)} images: {index.tolist()[:8]}")
        n, s = index.size, self.size
        images = np.empty((n, 3, s, s), dtype=np.uint8)
        landmarks = np.empty((n, len(self._part_ids), 2), dtype=np.float32)
        images_txt = self.root / "images.txt"
        for k, position in enumerate(index.tolist()):
            rel, line = self._paths[self._ids[position]]
            path = resolve_inside(self._images_dir, rel, file=images_txt, row=line)
            image = read_rgb(path, file=images_txt, row=line)
            x, y, w, h = 0.0, 0.0, float(image.width), float(image.height)
            if self.crop:
                # Clip the box to the image (CUB boxes may overshoot the border by a fraction of a pixel).
                bx, by, bw, bh = self._boxes[position]
                x, y = max(bx, 0.0), max(by, 0.0)
                w, h = min(bx + bw, image.width) - x, min(by + bh, image.height) - y
                if w <= 0 or h <= 0:
                    raise DatasetError(
                        f"{self.root / 'bounding_boxes.txt'}: box {[bx, by, bw, bh]} of image id "
                        f"{self._ids[position]} lies outside its {image.width}×{image.height} image {path}"
                    )
            image = image.resize((s, s), Image.Resampling.BILINEAR, box=(x, y, x + w, y + h))
            images[k] = np.asarray(image).transpose(2, 0, 1)
            landmarks[k, :, 0] = (self._landmarks[position, :, 0] - x) * (s / w)
            landmarks[k, :, 1] = (self._landmarks[position, :, 1] - y) * (s / h)
        inside = (landmarks >= 0).all(axis=2) & (landmarks < s).all(axis=2)
        return Batch(
            index=index,
            images=images,
            landmarks=landmarks,
            landmark_visible=self._visible[index] & inside,
            class_label=self._classes[index].copy(),
        )
