"""The ``[attribution]`` config section: which attribution maps the run computes and caches.

Off by default (``enabled = false``); ``repdissect attribute CONFIG`` turns it on for one run. Every field
but ``enabled`` and ``seeds`` is part of the attribution stages' cache keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ._errors import ConfigError

__all__ = ["AttributionConfig", "UNIT_METHODS", "CLASS_METHODS"]

#: methods for a unit's exemplars (CAM is class-only: it needs the classifier head)
UNIT_METHODS = ("saliency", "smoothgrad", "guided_backprop", "deconvnet", "grad_cam", "guided_grad_cam",
                "occlusion", "lrp", "lime")
CLASS_METHODS = UNIT_METHODS + ("cam",)


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key} = {value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class AttributionConfig:
    """Attribution maps per unit (each unit's top-k exemplars) and per class (a user image list or one image of
    each class), plus the dataset-wide concept mass of guided backprop inside each unit's IoU-label mask.

    ``layers``: layers whose units are explained (each must be one of the model's ``layers``; empty = the
    model's last layer). ``units``: which units (empty = every unit). ``cam_layer``: where unit Grad-CAM is
    taken (a layer below; empty = the layer before it in the model's ``layers``, or the input's first conv).
    ``images``: dataset indexes for the per-class panels (empty = the first image of each class, at most
    ``classes_shown``). ``occlusion_baseline`` is a pixel value on the 0..1 scale, converted through the
    model's normalisation. ``mass_images``: images of the concept-mass pass (0 = the whole dataset).
    ``lrp_rule = "alphabeta"`` uses ``lrp_alpha`` (β = α − 1). ``lime_segmentation``: ``"grid"`` (squares of
    ``lime_cell`` pixels) or ``"slic"`` (``lime_segments`` SLIC superpixels of compactness ``lime_compactness``).
    """

    enabled: bool = False
    seeds: list[int] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    unit_methods: list[str] = field(default_factory=lambda: ["guided_backprop", "grad_cam"])
    class_methods: list[str] = field(default_factory=lambda: ["saliency", "guided_backprop", "grad_cam", "occlusion"])
    reduce: Literal["max", "mean"] = "max"
    top_k: int = 4
    cam_layer: str = ""
    images: list[int] = field(default_factory=list)
    classes_shown: int = 10
    class_target: Literal["label", "predicted"] = "label"
    smoothgrad_samples: int = 16
    smoothgrad_stdev: float = 0.15
    occlusion_window: int = 8
    occlusion_stride: int = 4
    occlusion_baseline: float = 0.5
    lrp_rule: Literal["epsilon", "zplus", "alphabeta"] = "epsilon"
    lrp_epsilon: float = 1e-6
    lime_cell: int = 8
    lime_samples: int = 256
    mass_method: Literal["saliency", "guided_backprop", "deconvnet"] = "guided_backprop"
    mass_images: int = 512
    batch_size: int = 16
    unit_chunk: int = 16
    lrp_alpha: float = 2.0
    lime_segmentation: Literal["grid", "slic"] = "grid"
    lime_segments: int = 64
    lime_compactness: float = 2.0

    def validate(self, key: str) -> None:
        for name, allowed in (("unit_methods", UNIT_METHODS), ("class_methods", CLASS_METHODS)):
            values = getattr(self, name)
            bad = [m for m in values if m not in allowed]
            _check(not bad and len(set(values)) == len(values), f"{key}.{name}", values,
                   f"give distinct methods from {', '.join(allowed)}")
        _check(self.top_k >= 1, f"{key}.top_k", self.top_k, "must be an integer ≥ 1")
        _check(all(u >= 0 for u in self.units), f"{key}.units", self.units, "unit indexes are ≥ 0")
        _check(all(i >= 0 for i in self.images), f"{key}.images", self.images, "image indexes are ≥ 0")
        _check(self.classes_shown >= 0, f"{key}.classes_shown", self.classes_shown, "must be ≥ 0")
        _check(self.smoothgrad_samples >= 1, f"{key}.smoothgrad_samples", self.smoothgrad_samples, "must be ≥ 1")
        _check(self.smoothgrad_stdev >= 0, f"{key}.smoothgrad_stdev", self.smoothgrad_stdev, "must be ≥ 0")
        _check(1 <= self.occlusion_stride <= self.occlusion_window, f"{key}.occlusion_stride", self.occlusion_stride,
               f"must be between 1 and occlusion_window ({self.occlusion_window})")
        _check(0 <= self.occlusion_baseline <= 1, f"{key}.occlusion_baseline", self.occlusion_baseline,
               "a pixel value on the 0..1 scale, e.g. 0.5 (grey)")
        _check(self.lrp_epsilon > 0, f"{key}.lrp_epsilon", self.lrp_epsilon, "must be > 0, e.g. 1e-6")
        _check(self.lime_cell >= 1, f"{key}.lime_cell", self.lime_cell, "superpixel size in pixels, ≥ 1")
        _check(self.lime_samples >= 2, f"{key}.lime_samples", self.lime_samples, "must be ≥ 2")
        _check(self.mass_images >= 0, f"{key}.mass_images", self.mass_images, "must be ≥ 0 (0 = every image)")
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "must be ≥ 1")
        _check(self.unit_chunk >= 1, f"{key}.unit_chunk", self.unit_chunk, "must be ≥ 1")
        _check(self.lrp_alpha >= 1, f"{key}.lrp_alpha", self.lrp_alpha,
               "the αβ rule's α, ≥ 1 (β = α − 1 ≥ 0), e.g. 2 (α2β1) or 1 (α1β0)")
        _check(self.lime_segmentation in ("grid", "slic"), f"{key}.lime_segmentation", self.lime_segmentation,
               "use 'grid' (lime_cell) or 'slic' (lime_segments, lime_compactness)")
        _check(self.lime_segments >= 1, f"{key}.lime_segments", self.lime_segments, "SLIC superpixel count, ≥ 1")
        _check(self.lime_compactness >= 0, f"{key}.lime_compactness", self.lime_compactness, "must be ≥ 0, e.g. 2")
