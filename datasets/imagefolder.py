"""A plain folder of images, ``root/<class>/<image>``: class labels from folder names, no masks.

For training and activation extraction on user data that carries no concept annotations (torchvision's
``ImageFolder`` layout). Classes are the sorted immediate sub-folders; images are found recursively inside
each, sorted, with the usual image extensions; hidden files and folders are skipped. The constraint: the
cache digest must not read every image, so it covers the file list with sizes and modification times.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._base import Batch, Concept, ConceptDataset, DatasetError, register_dataset
from ._files import IMAGE_EXTENSIONS, canonical_digest, check_choice, check_root, check_size, read_rgb, resize_rgb

__all__ = ["ImageFolderDataset"]


@register_dataset("imagefolder")
class ImageFolderDataset(ConceptDataset):
    """Images in ``root/<class>/…`` folders, resized to one size, labelled by their class folder.

    Args:
        root: folder whose sub-folders are the classes.
        size: output size — an integer S (S×S), ``[H, W]`` or ``"HxW"`` (default 64).
        resize: images of another size are ``"resize"``d (stretched, bilinear; the default), ``"crop"``ped
            (short side scaled to fit, then centre-cropped), or ``"reject"``ed with a DatasetError.
    """

    kind = "imagefolder"

    def __init__(self, root: str | Path, size: int | str | list[int] = 64, resize: str = "resize") -> None:
        self.root = check_root("root", root)
        self.size = check_size("size", size)
        self.resize = check_choice("resize", resize, ("resize", "crop", "reject"))
        resolved_root = self.root.resolve()
        classes = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        files: list[tuple[str, int, int, int]] = []
        for label, name in enumerate(classes):
            for folder, dirs, names in os.walk(self.root / name):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for file in sorted(names):
                    if file.startswith(".") or not file.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    path = Path(folder) / file
                    if not path.resolve().is_relative_to(resolved_root):
                        raise DatasetError(
                            f"{path}: resolves to {path.resolve()}, outside the dataset folder {resolved_root} "
                            "(a symbolic link?); copy the file into the dataset"
                        )
                    stat = path.stat()
                    files.append((path.relative_to(self.root).as_posix(), label, stat.st_size, stat.st_mtime_ns))
        if not files:
            raise DatasetError(
                f"{self.root}: no images found; expected root/<class>/<image> with extensions "
                + ", ".join(IMAGE_EXTENSIONS)
            )
        self._classes = classes
        self._files = [f[0] for f in files]
        self._labels = np.array([f[1] for f in files], dtype=np.int64)
        # File list with sizes and modification times: changes are noticed without reading any image.
        listing = [[rel, size, mtime] for rel, _, size, mtime in files]
        params = {"size": list(self.size), "resize": self.resize}
        self._digest = canonical_digest({"kind": self.kind, "classes": classes, "files": listing, "params": params})

    def __len__(self) -> int:
        return len(self._files)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size

    @property
    def seg_size(self) -> tuple[int, int]:
        return self.size

    @property
    def concepts(self) -> list[Concept]:
        return []

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def files(self) -> list[str]:
        """Image paths relative to the root, in index order."""
        return list(self._files)

    def digest(self) -> str:
        """Hash of the file list (paths, sizes, modification times) at construction, plus the parameters."""
        return self._digest

    def load(self, indices: np.ndarray) -> Batch:
        index = np.asarray(indices)
        if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
            raise DatasetError(f"indices must be a 1-D integer array, got shape {index.shape} dtype {index.dtype}")
        index = index.astype(np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise DatasetError(f"index out of range for an image folder of {len(self)} images: {index.tolist()[:8]}")
        h, w = self.size
        images = np.empty((index.size, 3, h, w), dtype=np.uint8)
        for k, position in enumerate(index.tolist()):
            path = self.root / self._files[position]
            image = read_rgb(path, file=path, row=None)
            if image.size != (w, h):
                if self.resize == "reject":
                    raise DatasetError(
                        f"{path}: image is {image.height}×{image.width}, expected {h}×{w}; "
                        "pass resize='resize' or 'crop', or fix the image"
                    )
                image = resize_rgb(image, (h, w), self.resize)
            images[k] = np.asarray(image).transpose(2, 0, 1)
        return Batch(index=index, images=images, class_label=self._labels[index].copy())
