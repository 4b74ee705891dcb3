"""``scheduler = "auto"``: run in-process when a Dask cluster cannot pay off, and say why.

Starting a LocalCluster costs seconds (worker processes importing torch, pandas and pyarrow, plus one
pickled context per task), and with one worker nothing runs in parallel at all. On a small config the
in-process scheduler therefore wins outright: on the quick config (240 images of 32 px, 2 seeds × 1
epoch) the sync scheduler beat a 2-worker LocalCluster, which was no faster than 1 worker. The decision is
made from the work that is still *missing* from the cache, measured in pixel-passes of the networks:

    work = Σ_train-nodes  images · H · W · epochs · 3   (forward + backward ≈ 3 forward passes)
         + Σ_extract-nodes images · H · W                (one forward pass)

Rules, in order (the first that applies decides):

1. ``workers == 1`` → sync: one worker process cannot beat the same work done in this process.
2. fewer than two missing train/extract nodes → sync: the heavy work cannot run side by side.
3. ``work < threshold`` (default :data:`PAYOFF_MEGAPIXEL_PASSES` million) → sync: the run would be over
   before a cluster's start-up is repaid.
4. otherwise → a LocalCluster with the configured workers.

The threshold is deliberately conservative (about ten times the quick config's work); the demo config
(4000 images of 64 px, 3 seeds × 6 epochs) is about forty times above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Workload", "SchedulerChoice", "estimate_workload", "workload_of", "choose_scheduler",
           "PAYOFF_MEGAPIXEL_PASSES"]

#: below this much missing work (millions of pixel-passes), ``auto`` runs in-process
PAYOFF_MEGAPIXEL_PASSES = 25.0

#: a training step (forward + backward + update) costs about three forward passes
TRAIN_PASS_FACTOR = 3


@dataclass(frozen=True)
class Workload:
    """What is still to compute: missing train and extract nodes and their cost in pixel-passes."""

    train_nodes: int
    extract_nodes: int
    pixel_passes: float

    @property
    def heavy_nodes(self) -> int:
        return self.train_nodes + self.extract_nodes

    @property
    def megapixel_passes(self) -> float:
        return self.pixel_passes / 1e6


@dataclass(frozen=True)
class SchedulerChoice:
    """The scheduler a run uses, and a one-line reason (logged and recorded in ``run.json``)."""

    scheduler: str
    reason: str


def estimate_workload(nodes: Iterable[Any], *, images: int, image_size: tuple[int, int]) -> Workload:
    """Work of the given (missing) nodes; only ``train`` and ``extract`` nodes count.

    Args:
        nodes: objects with ``.stage`` (str) and ``.params`` (mapping); train nodes carry
            ``params["train"]["epochs"]``.
        images: number of dataset images; ``image_size``: ``(H, W)`` in pixels.
    """
    pixels = float(images) * image_size[0] * image_size[1]
    train = extract = 0
    passes = 0.0
    for node in nodes:
        if node.stage == "train":
            train += 1
            epochs = int(dict(node.params.get("train", {})).get("epochs", 1))
            passes += pixels * epochs * TRAIN_PASS_FACTOR
        elif node.stage == "extract":
            extract += 1
            passes += pixels
    return Workload(train_nodes=train, extract_nodes=extract, pixel_passes=passes)


def choose_scheduler(requested: str, workload: Workload, *, workers: int,
                     threshold_megapixel_passes: float = PAYOFF_MEGAPIXEL_PASSES) -> SchedulerChoice:
    """Resolve ``requested``: anything but ``"auto"`` is kept as given; ``"auto"`` follows the module's rules."""
    if requested != "auto":
        return SchedulerChoice(requested, f"scheduler {requested!r} as configured")
    work = f"{workload.megapixel_passes:.1f} M pixel-passes in {workload.train_nodes} train + " \
           f"{workload.extract_nodes} extract nodes"
    if workers <= 1:
        return SchedulerChoice("sync", "auto → sync: with 1 worker a cluster adds start-up cost and no parallelism")
    if workload.heavy_nodes < 2:
        return SchedulerChoice("sync", f"auto → sync: {work}; nothing heavy can run side by side")
    if workload.megapixel_passes < threshold_megapixel_passes:
        return SchedulerChoice(
            "sync", f"auto → sync: {work} is below the {threshold_megapixel_passes:g} M where {workers} Dask "
                    "workers repay their start-up; set [execution].scheduler = \"local\" to force a cluster")
    return SchedulerChoice("local", f"auto → local ({workers} workers): {work}")


def workload_of(nodes: Iterable[Any], dataset: Any) -> Workload:
    """:func:`estimate_workload` for a built dataset (its length and ``image_size``)."""
    height, width = dataset.image_size
    return estimate_workload(nodes, images=len(dataset), image_size=(int(height), int(width)))
