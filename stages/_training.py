"""Seeded, bit-reproducible training of a :class:`~repdissect.stages._models.ModelSpec` on a dataset's class labels.

Public names: :class:`TrainConfig`, :func:`train_model`, :func:`train_model_full` (with the interpretable
layer's filter→category map), :func:`state_dict_digest`, :func:`save_checkpoint`, :func:`load_checkpoint`,
:func:`training_environment`.

With ``config.interpretable`` (Zhang et al.'s interpretable CNN, ``_interpretable``), a forward hook on the
chosen layer masks its feature maps and keeps the pre-mask maps, whose mutual-information filter loss (times
``interpretable_weight``, summed over filters) is added to the task loss; the history gains the columns
:data:`~repdissect.stages._interpretable.FILTER_LOSS_COLUMNS`. With the mode off nothing of it runs, so the
weights are bit-identical to a run without those settings.

The constraint that shaped it: a trained checkpoint is a cache entry whose digest keys every downstream stage,
and the convergent-learning comparison needs models that differ *only* by their seed. So training is a pure
function of ``(spec, dataset, seed, config)``: the initial weights come from ``build_model(spec, seed=seed)``,
the data order and augmentation from a numpy ``Generator`` seeded with ``(seed, purpose)``, dropout from a
forked torch RNG seeded with the same seed, and ``torch.use_deterministic_algorithms(True)`` holds for the
whole run (restored afterwards). On the CPU that gives bit-identical weights for a fixed torch thread count
(checked for 1 and 2 threads); different thread counts give different bits (measured: 1 vs 2 threads on the
built-in CNN), so pass ``num_threads`` to pin it — the pipeline keys CPU training on it. On CUDA the same
recipe is used with TF32 off; bit-identity also needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the
environment before CUDA starts (then deterministic algorithms are enforced, else only warned about).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import nn

from ._errors import StageInputError
from ._train_config import TrainConfig
from ._device import determinism_mode, reproducible_kernels, resolve_device, set_deterministic_algorithms
from ._checkpoints import read_state_dict
from ._models import ModelSpec, build_model, unwrap
from ._optim import PlainAdam, PlainSGD
from . import _interpretable

__all__ = [
    "TrainConfig",
    "train_model",
    "train_model_full",
    "TrainResult",
    "state_dict_digest",
    "save_checkpoint",
    "load_checkpoint",
    "training_environment",
    "HISTORY_COLUMNS",
]

HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")

# Purposes for the per-seed numpy streams, so adding one never shifts another.
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


# --------------------------------------------------------------------------------------------- checkpoints


def _canonical(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted tensor names with each tensor's dtype, shape and raw bytes (layout-independent)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{str(tensor.dtype)}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def save_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Save a plain ``name -> tensor`` dict (CPU, contiguous) with ``torch.save``; readable with ``weights_only``."""
    path = Path(path)
    torch.save(_canonical(state_dict), path)
    return path


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint written by :func:`save_checkpoint` (or any state dict file) with ``weights_only=True``."""
    return read_state_dict(path)


def training_environment() -> dict[str, Any]:
    """What bit-reproducibility of training depends on, for the run manifest."""
    return {
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


# --------------------------------------------------------------------------------------------- training


@contextmanager
def _deterministic(device: torch.device, seed: int, num_threads: int | None) -> Iterator[None]:
    """Seeded, deterministic torch for the duration; every global setting is restored afterwards.

    Deterministic algorithms are enforced (an error on a non-deterministic operation) wherever
    :func:`determinism_mode` says the device can be deterministic, and only warned about elsewhere (CUDA
    without ``CUBLAS_WORKSPACE_CONFIG``); TF32 is off and cuDNN deterministic (:func:`reproducible_kernels`).
    """
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.get_num_threads(),
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    devices = [device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), reproducible_kernels():
            torch.default_generator.manual_seed(seed)
            if device.type == "cuda":
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)  # fork_rng restores this device's state afterwards
            set_deterministic_algorithms(True, warn_only=determinism_mode(device, training=True) != "deterministic")
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            yield
    finally:
        set_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.set_num_threads(previous[2])


#: images per ``dataset.load`` while a split is read for training: only the images and class labels are kept,
#: never the whole split's masks (at 2,400 images of 32 px those and their rendering cost 110 MB at once)
_LOAD_CHUNK = 256


def _labelled_split(dataset: Any, split: str, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(indices, images, labels)`` of a split, keeping only items with a class label (read in chunks)."""
    indices = np.asarray(dataset.split_indices(split), dtype=np.int64)
    if indices.size == 0:
        return indices, np.zeros((0, 3, *dataset.image_size), np.uint8), np.zeros(0, np.int64)
    kept_indices = np.empty(indices.size, np.int64)
    labels = np.empty(indices.size, np.int64)
    images: np.ndarray | None = None
    kept = 0
    for start in range(0, indices.size, _LOAD_CHUNK):
        chunk = indices[start:start + _LOAD_CHUNK]
        batch = dataset.load(chunk)
        if batch.class_label is None:
            raise StageInputError(f"dataset {dataset.kind!r} has no class labels; training needs a dataset with classes")
        chunk_labels = np.asarray(batch.class_label, dtype=np.int64)
        bad = chunk_labels >= num_classes
        if bad.any():
            raise StageInputError(
                f"dataset {dataset.kind!r} split {split!r}: class label {int(chunk_labels[bad][0])} is out of range "
                f"for {num_classes} class names"
            )
        keep = chunk_labels >= 0
        if images is None:
            images = np.empty((indices.size, *batch.images.shape[1:]), batch.images.dtype)
        n = int(keep.sum())
        images[kept:kept + n] = batch.images[keep]
        labels[kept:kept + n] = chunk_labels[keep]
        kept_indices[kept:kept + n] = chunk[keep]
        kept += n
        del batch
    assert images is not None
    return kept_indices[:kept], images[:kept], labels[:kept]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _augment(images: torch.Tensor, rng: np.random.Generator, config: TrainConfig) -> torch.Tensor:
    """Random flips and shifts of a uint8 batch, drawn from ``rng`` (deterministic, device independent)."""
    n = images.shape[0]
    if config.augment_flip:
        flip = torch.from_numpy(rng.random(n) < 0.5).to(images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    s = config.augment_shift
    if s:
        h, w = images.shape[-2:]
        padded = torch.nn.functional.pad(images, (s, s, s, s))
        dy, dx = rng.integers(0, 2 * s + 1, size=(2, n))
        rows = torch.arange(h, device=images.device).view(1, h) + torch.from_numpy(dy).to(images.device).view(n, 1)
        cols = torch.arange(w, device=images.device).view(1, w) + torch.from_numpy(dx).to(images.device).view(n, 1)
        batch_index = torch.arange(n, device=images.device).view(n, 1, 1, 1)
        channel_index = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
        images = padded[batch_index, channel_index, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
    return images


def _evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device, batch_size: int) -> tuple[float, float]:
    if len(labels) == 0:
        return math.nan, math.nan
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            x = torch.from_numpy(images[start : start + batch_size]).to(device)
            y = torch.from_numpy(labels[start : start + batch_size]).to(device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    return loss_sum / len(labels), correct / len(labels)


def _lr_factor(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``config.lr`` at each step (a closed form, so any step count works, even 1)."""
    if config.schedule == "constant":
        return lambda _step: 1.0
    warmup = max(1, round(0.25 * total_steps)) if config.schedule == "onecycle" else 0
    start = 1.0 / 25.0  # one-cycle convention: warm up from lr / 25

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class TrainResult(NamedTuple):
    """What :func:`train_model_full` returns."""

    state_dict: dict[str, torch.Tensor]
    history: pd.DataFrame
    #: the interpretable layer's ``unit, category, category_name, response`` table (``None`` when off)
    filter_categories: pd.DataFrame | None


def train_model(
    spec: ModelSpec,
    dataset: Any,
    *,
    seed: int,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, float]], None] | None = None,
    num_threads: int | None = None,
) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """:func:`train_model_full` without the filter→category table: ``(state_dict, history)``."""
    result = train_model_full(spec, dataset, seed=seed, config=config, device=device, progress=progress,
                              num_threads=num_threads)
    return result.state_dict, result.history


def train_model_full(
    spec: ModelSpec,
    dataset: Any,
    *,
    seed: int,
    config: TrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[dict[str, float]], None] | None = None,
    num_threads: int | None = None,
) -> TrainResult:
    """Train ``spec`` from its seeded initialisation on the dataset's class labels.

    The whole training and validation split (uint8) is held in memory: at the demo scale that is 50 MB.

    Args:
        spec: the model (``num_classes`` defaults to ``len(dataset.class_names)``; ``spec.weights``, if set,
            is the starting point, i.e. fine-tuning).
        dataset: a ``ConceptDataset`` with class labels; its ``"train"``/``"val"`` splits are used, items
            labelled −1 are skipped.
        seed: the seed of initialisation, data order, augmentation and dropout.
        config: hyperparameters (``TrainConfig()`` when omitted).
        device: ``"cpu"``, ``"auto"``, ``"cuda"``, ``"cuda:1"`` … (the CPU is the bit-reproducible one).
        progress: called after every epoch with that epoch's history row.
        num_threads: torch intra-op threads during training (restored after); pin it for bit-identical
            results across machines with different core counts.

    Returns:
        ``TrainResult(state_dict, history, filter_categories)``: the trained network's plain CPU state dict (keys as in the unwrapped
        network, loadable with ``build_model(spec, seed=…, state_dict=…)``) and a DataFrame with one row per
        epoch and columns :data:`HISTORY_COLUMNS` (losses are mean cross-entropy without label smoothing for
        validation; ``lr`` is the rate at the epoch's last step; ``seconds`` is that epoch's wall time;
        interpretable runs add the filter-loss columns) and the filter→category table (``None`` when the
        interpretable mode is off).
    """
    config = config or TrainConfig()
    device = resolve_device(device)
    num_classes = spec.num_classes or len(dataset.class_names)
    if num_classes < 2:
        raise StageInputError(
            f"dataset {dataset.kind!r} has {len(dataset.class_names)} class names; training needs at least 2 classes"
        )
    _, train_images, train_labels = _labelled_split(dataset, "train", num_classes)
    _, val_images, val_labels = _labelled_split(dataset, "val", num_classes)
    if len(train_labels) < 2:
        raise StageInputError(f"dataset {dataset.kind!r} has {len(train_labels)} labelled training images; need ≥ 2")
    if len(val_labels) == 0:  # validation loss/accuracy would be NaN in the history table
        raise StageInputError(
            f"dataset {dataset.kind!r} has {len(dataset)} images and none in its 'val' split, so validation loss "
            "and accuracy are undefined; use more images (the built-in split holds out every 5th: at least 5)"
        )

    history: list[dict[str, float]] = []
    with _deterministic(device, int(seed), num_threads):
        model = build_model(spec, seed=seed, num_classes=num_classes).to(device)
        order_rng = np.random.default_rng([int(seed), _ORDER_STREAM])
        augment_rng = np.random.default_rng([int(seed), _AUGMENT_STREAM])
        n = len(train_labels)
        steps_per_epoch = n // config.batch_size + (1 if n % config.batch_size >= 2 else 0)
        groups = _param_groups(model, config.weight_decay)
        # torch.optim's SGD / AdamW update rules without torch.optim.Optimizer, whose methods import
        # torch._dynamo (+150 MB resident); the same bits (see _optim)
        optimizer: PlainSGD | PlainAdam
        if config.optimizer == "sgd":
            optimizer = PlainSGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
        else:
            optimizer = PlainAdam(groups, lr=config.lr, betas=(config.momentum, 0.999), decoupled=True)
        lr_factor = _lr_factor(config, config.epochs * steps_per_epoch)
        optimizer.set_lr_factor(lr_factor(0))  # a LambdaLR schedule, one step per optimizer step
        steps_done = 0
        criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        images_all = torch.from_numpy(train_images)
        labels_all = torch.from_numpy(train_labels)
        icnn = _InterpretableTraining(model, config, num_classes) if config.interpretable else None
        for epoch in range(1, config.epochs + 1):
            start = time.perf_counter()
            model.train()
            order = order_rng.permutation(n)
            loss_sum, correct, seen = 0.0, 0, 0
            if icnn is not None:
                icnn.start_epoch()
            for step in range(steps_per_epoch):
                # Sorted batch members keep gathering cache-friendly; the set, not the order, is random.
                members = torch.from_numpy(np.sort(order[step * config.batch_size : (step + 1) * config.batch_size]))
                x = _augment(images_all[members].to(device), augment_rng, config)
                y = labels_all[members].to(device)
                logits = model(x)
                loss = criterion(logits, y)
                if icnn is not None:
                    loss = loss + icnn.loss(y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps_done += 1
                optimizer.set_lr_factor(lr_factor(steps_done))
                loss_sum += float(loss.detach()) * len(members)
                correct += int((logits.detach().argmax(1) == y).sum())
                seen += len(members)
            val_loss, val_acc = _evaluate(model, val_images, val_labels, device, config.eval_batch_size)
            row = {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "val_loss": val_loss,
                "val_acc": val_acc,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "seconds": time.perf_counter() - start,
            }
            if icnn is not None:
                row.update(icnn.epoch_means())
            history.append(row)
            if progress is not None:
                progress(dict(row))
        categories = None
        if icnn is not None:
            icnn.close()
            categories = icnn.categories.table(list(dataset.class_names))
    model.eval()
    state = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in unwrap(model).state_dict().items()}
    columns = list(HISTORY_COLUMNS) + (list(_interpretable.FILTER_LOSS_COLUMNS) if icnn is not None else [])
    frame = pd.DataFrame(history, columns=columns).astype({"epoch": "int64"})
    return TrainResult(state, frame, categories)


class _InterpretableTraining:
    """The interpretable layer's hook, filter categories and filter loss during one training run."""

    def __init__(self, model: nn.Module, config: TrainConfig, num_classes: int) -> None:
        self.config = config
        self.hook = _interpretable.InterpretableLayer(model, config.interpretable_layer, beta=config.interpretable_beta,
                                                      locate=config.interpretable_locate,
                                                      mask_eval=config.interpretable_mask_eval)
        self.num_classes = num_classes
        self.categories: _interpretable.FilterCategories | None = None
        self._templates: torch.Tensor | None = None
        self._sums: dict[str, float] = {}
        self._steps = 0

    def start_epoch(self) -> None:
        self._sums = {k: 0.0 for k in _interpretable.FILTER_LOSS_COLUMNS}
        self._steps = 0

    def loss(self, labels: torch.Tensor) -> torch.Tensor:
        """λ · Σ_f Loss_f on the batch the hook just saw (categories updated from it first)."""
        x = self.hook.features
        if x is None:
            raise StageInputError(
                f"interpretable_layer {self.config.interpretable_layer!r} did not run in the forward pass; "
                "name a layer the network uses (see `repdissect layers`)"
            )
        if self.categories is None:
            self.categories = _interpretable.FilterCategories(self.num_classes, x.shape[1],
                                                              self.config.interpretable_momentum)
        self.categories.update(x, labels)
        h, w = x.shape[-2:]
        if self._templates is None or self._templates.shape[-2:] != (h, w):
            self._templates = _interpretable.positive_templates(h, w, self.config.interpretable_tau / (h * w),
                                                                self.config.interpretable_beta, device=x.device)
        terms = _interpretable.filter_mi_terms(x, self.categories.positives(labels), tau=self.config.interpretable_tau,
                                              beta=self.config.interpretable_beta,
                                              alpha=self.config.interpretable_alpha, templates=self._templates)
        total = terms["loss"].sum()
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(f"interpretable filter loss is not finite ({float(total)}) at layer "
                                     f"{self.config.interpretable_layer!r}")
        self._sums["filter_loss"] += float(total.detach())
        self._sums["filter_inter_category"] += float(terms["inter_category"].detach().sum())
        self._sums["filter_spatial"] += float(terms["spatial"].detach().sum())
        self._steps += 1
        self.hook.features = None
        return self.config.interpretable_weight * total

    def epoch_means(self) -> dict[str, float]:
        return {k: v / max(1, self._steps) for k, v in self._sums.items()}

    def close(self) -> None:
        self.hook.close()
