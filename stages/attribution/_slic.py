"""SLIC superpixels (Achanta et al. 2012, "SLIC superpixels compared to state-of-the-art superpixel methods") on
tensors, for LIME's interpretable features.

Algorithm, for one image ``(C, H, W)`` and a requested count ``n``:

1. grid step ``S = √(HW/n)``; ``ny × nx`` cluster centres (``ny = round(H/S)``, ``nx = round(W/S)``, so
   ``ny·nx ≈ n``) at the cell centres, each with the colour of its cell's mean;
2. assignment: each pixel is compared with the centres of the 3 × 3 grid cells around its own cell (the
   paper's 2S × 2S search window, indexed by the centres' grid slots) by
   ``D² = d_colour² + (m · d_xy / S)²`` and joins the nearest (ties: the lowest slot);
3. update: every centre moves to the mean position and colour of its pixels (an empty cluster keeps its
   centre); steps 2–3 run ``iterations`` times (the paper's 10);
4. connectivity (the paper's post-processing): every segment keeps its largest 4-connected piece; other
   pieces, and pieces smaller than ``min_size_factor · HW/n`` pixels, join the neighbouring segment they share
   the longest border with (smallest first); labels are renumbered ``0..S'−1`` in row-major order of first
   appearance.

Colour distance is taken on the image standardised by its own overall mean and standard deviation, so the
compactness ``m`` does not depend on the input's scale (pixels 0..1, 0..255 or normalised): ``m = 1`` weighs one
standard deviation of colour like one grid step of distance. Deviations from the paper, stated: no Lab
conversion (the input may be in any normalised space) and no move of the initial centres to the lowest
gradient in their 3 × 3 neighbourhood. Everything is deterministic (no random state).

Cost per image: ``iterations × 9 × HW`` distance evaluations plus one connected-component labelling per segment
(scipy), small next to LIME's model evaluations.
"""

from __future__ import annotations

import numpy as np
import torch

from .._errors import StageInputError

__all__ = ["slic_segments"]


def _connect(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Step 4 of the module docstring on an ``(H, W)`` int label map."""
    from scipy import ndimage

    h, w = labels.shape
    comp = np.zeros((h, w), np.int64)
    owner: list[int] = []
    for lab in np.unique(labels):
        cc, k = ndimage.label(labels == lab)
        comp[cc > 0] = cc[cc > 0] + len(owner) - 1
        owner.extend([int(lab)] * k)
    sizes = np.bincount(comp.ravel(), minlength=len(owner))
    largest: dict[int, int] = {}
    for c, lab in enumerate(owner):
        if lab not in largest or sizes[c] > sizes[largest[lab]]:
            largest[lab] = c
    small = [c for c in range(len(owner)) if largest[owner[c]] != c or sizes[c] < min_size]
    if len(small) == len(owner):  # everything is small (a tiny image): keep the single largest piece
        small.remove(int(np.argmax(sizes)))
    pending = np.zeros(len(owner), bool)
    pending[small] = True
    # bounding boxes (y0, y1, x0, x1) of every piece, grown as pieces merge, so each merge looks at a small window
    boxes = [[sl[0].start, sl[0].stop, sl[1].start, sl[1].stop] for sl in ndimage.find_objects(comp + 1)]
    for c in sorted(small, key=lambda c: (sizes[c], c)):
        y0, y1, x0, x1 = boxes[c]
        y0, x0, y1, x1 = max(y0 - 1, 0), max(x0 - 1, 0), min(y1 + 1, h), min(x1 + 1, w)
        window = comp[y0:y1, x0:x1]
        mask = window == c
        ring = ndimage.binary_dilation(mask) & ~mask
        around = window[ring]
        settled = around[~pending[around]]
        around = settled if settled.size else around
        if around.size == 0:
            continue
        target = int(np.bincount(around).argmax())
        window[mask] = target
        sizes[target] += sizes[c]
        pending[c] = False
        tb = boxes[target]
        boxes[target] = [min(tb[0], boxes[c][0]), max(tb[1], boxes[c][1]), min(tb[2], boxes[c][2]), max(tb[3], boxes[c][3])]
    present, first = np.unique(comp.ravel(), return_index=True)
    renumber = np.empty(int(comp.max()) + 1, np.int64)
    renumber[present[np.argsort(first, kind="stable")]] = np.arange(present.size)
    return renumber[comp]


def slic_segments(image: torch.Tensor, n_segments: int, *, compactness: float = 2.0, iterations: int = 10,
                  min_size_factor: float = 0.25, connectivity: bool = True) -> torch.Tensor:
    """``(H, W)`` int64 SLIC labels ``0..S'−1`` (``S' ≈ n_segments``) of one ``(C, H, W)`` image.

    Args:
        n_segments: requested number of superpixels n.
        compactness: m; larger = squarer segments (spatial distance weighs more), smaller = colour-following.
        iterations: assignment/update rounds (the paper's 10).
        min_size_factor: pieces smaller than this fraction of ``HW/n`` are merged into a neighbour.
        connectivity: run step 4 (each segment one connected piece); off, segments may be fragmented.
    """
    if image.ndim != 3:
        raise StageInputError(f"SLIC takes one (C, H, W) image; got shape {tuple(image.shape)}")
    if n_segments < 1 or compactness < 0 or iterations < 1:
        raise StageInputError(f"SLIC needs n_segments ≥ 1, compactness ≥ 0 and iterations ≥ 1; got n_segments="
                              f"{n_segments}, compactness={compactness}, iterations={iterations}")
    img = image.detach().to("cpu", torch.float64)
    c, h, w = img.shape
    feat = (img - img.mean()) / img.std().clamp(min=1e-12) if img.numel() > 1 else img
    feat = feat.reshape(c, -1).T  # (HW, C)
    step = (h * w / n_segments) ** 0.5
    ny, nx = max(1, min(h, round(h / step))), max(1, min(w, round(w / step)))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ys, xs = yy.reshape(-1), xx.reshape(-1)
    cell_y = (ys * ny / h).long().clamp(max=ny - 1)
    cell_x = (xs * nx / w).long().clamp(max=nx - 1)
    home = cell_y * nx + cell_x
    k = ny * nx
    # initial centres: each grid cell's mean position and colour
    counts = torch.bincount(home, minlength=k).to(torch.float64)
    centre_xy = torch.stack([torch.zeros(k, dtype=torch.float64).index_add_(0, home, ys),
                             torch.zeros(k, dtype=torch.float64).index_add_(0, home, xs)], 1) / counts[:, None]
    centre_col = torch.zeros(k, c, dtype=torch.float64).index_add_(0, home, feat) / counts[:, None]
    # candidate slots: the 3 × 3 grid cells around each pixel's own cell (invalid ones masked)
    dy, dx = torch.meshgrid(torch.arange(-1, 2), torch.arange(-1, 2), indexing="ij")
    cy, cx = cell_y[:, None] + dy.reshape(1, -1), cell_x[:, None] + dx.reshape(1, -1)
    valid = (cy >= 0) & (cy < ny) & (cx >= 0) & (cx < nx)
    cand = (cy.clamp(0, ny - 1) * nx + cx.clamp(0, nx - 1))  # (HW, 9)
    spatial = (float(compactness) / step) ** 2
    pos = torch.stack([ys, xs], 1)
    label = home
    for _ in range(int(iterations)):
        d_col = ((feat[:, None, :] - centre_col[cand]) ** 2).sum(2)
        d_xy = ((pos[:, None, :] - centre_xy[cand]) ** 2).sum(2)
        dist = torch.where(valid, d_col + spatial * d_xy, torch.inf)
        label = cand.gather(1, dist.argmin(1, keepdim=True))[:, 0]
        n = torch.bincount(label, minlength=k).to(torch.float64)
        filled = n > 0
        sum_xy = torch.zeros(k, 2, dtype=torch.float64).index_add_(0, label, pos)
        sum_col = torch.zeros(k, c, dtype=torch.float64).index_add_(0, label, feat)
        centre_xy = torch.where(filled[:, None], sum_xy / n.clamp(min=1)[:, None], centre_xy)
        centre_col = torch.where(filled[:, None], sum_col / n.clamp(min=1)[:, None], centre_col)
    labels = label.reshape(h, w).numpy()
    if connectivity:
        labels = _connect(labels, max(1, int(min_size_factor * h * w / n_segments)))
    else:
        labels = np.unique(labels, return_inverse=True)[1].reshape(h, w)
    return torch.as_tensor(labels, dtype=torch.int64)
