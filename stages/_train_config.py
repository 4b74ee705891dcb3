"""The training recipe as a typed, frozen dataclass — kept free of torch so configs load without it.

``pipeline`` validates ``[models.train]`` tables into this class at config load; ``_training`` consumes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ._errors import StageInputError

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters (all of them change the result, so all of them belong in the cache key).

    Attributes:
        epochs: passes over the training split.
        batch_size: images per step.
        lr: peak learning rate.
        momentum: SGD momentum (Adam's beta1 when ``optimizer="adam"``).
        weight_decay: weight decay of conv/linear weights (not of BatchNorm parameters or biases); L2 for
            SGD, decoupled for AdamW.
        optimizer: ``"adam"`` (AdamW) or ``"sgd"`` (Nesterov momentum).
        schedule: ``"onecycle"`` (linear warm-up from lr/25 over the first quarter of the steps, then cosine
            down to 0), ``"cosine"`` (cosine from lr to 0) or ``"constant"``; updated every step.
        label_smoothing: cross-entropy label smoothing.
        augment_flip: random horizontal flips.
        augment_shift: random translation by up to this many pixels (zero padding), 0 to disable.
        eval_batch_size: images per forward pass in validation (64: forwards of 256 images at 64 px left a
            training process ~360 MiB above its start under the pipeline's allocator settings; validation
            never changes the weights).
        interpretable_layer: make this layer interpretable (Zhang et al. 2018): its feature maps are masked
            by each filter's part template in the forward pass and the mutual-information filter loss is
            added to the task loss (see ``stages/_interpretable.py``); ``""`` = ordinary training.
        interpretable_weight: λ, the filter loss's weight (summed over the layer's filters, as the paper);
            0 = ordinary training, bit for bit (the mask is off too).
        interpretable_tau: the templates' magnitude times the map's cell count: τ = value / (H·W) (paper 0.5).
        interpretable_beta: the templates' slope β (paper 4): the mask is zero from L1 distance n/β.
        interpretable_alpha: the paper's α, the prior mass of the positive templates (p(T_μ) = α/n²,
            p(T⁻) = 1 − α); 0 = the paper's n²/(1 + n²), a uniform prior over the n² + 1 templates.
        interpretable_locate: the part location μ̂: ``"argmax"`` (paper) or ``"centroid"`` (authors' code).
        interpretable_mask_eval: apply the mask at evaluation too (it is part of the model, as in the
            authors' code; validation accuracy is then the masked network's).
        interpretable_momentum: EMA momentum of the per-class filter responses that assign filters to
            categories.

    The ``interpretable_*`` settings only enter :meth:`to_dict` (and so the cache key) when the mode is on
    (a layer and a positive weight), so turning the mode off leaves existing keys unchanged.
    """

    # Defaults: the built-in CNN reaches ≥ 95 % validation accuracy on the default synthetic world in 6 epochs
    # (about a minute per seed on 2 CPU cores); SGD and average pooling needed several times longer.
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    schedule: str = "onecycle"
    label_smoothing: float = 0.05
    augment_flip: bool = True
    augment_shift: int = 0
    eval_batch_size: int = 64
    interpretable_layer: str = ""
    interpretable_weight: float = 0.0
    interpretable_tau: float = 0.5
    interpretable_beta: float = 4.0
    interpretable_alpha: float = 0.0
    interpretable_locate: str = "argmax"
    interpretable_mask_eval: bool = True
    interpretable_momentum: float = 0.9

    def __post_init__(self) -> None:
        checks = [
            ("epochs", self.epochs >= 1 if isinstance(self.epochs, int) else False, "an integer ≥ 1"),
            ("batch_size", self.batch_size >= 2 if isinstance(self.batch_size, int) else False, "an integer ≥ 2"),
            ("eval_batch_size", self.eval_batch_size >= 1 if isinstance(self.eval_batch_size, int) else False, "an integer ≥ 1"),
            ("lr", self.lr > 0, "positive"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "≥ 0"),
            ("optimizer", self.optimizer in ("sgd", "adam"), "'sgd' or 'adam'"),
            ("schedule", self.schedule in ("onecycle", "cosine", "constant"), "'onecycle', 'cosine' or 'constant'"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("augment_shift", isinstance(self.augment_shift, int) and self.augment_shift >= 0, "an integer ≥ 0"),
            ("interpretable_layer", isinstance(self.interpretable_layer, str), "a layer name (a string)"),
            ("interpretable_weight", self.interpretable_weight >= 0, "≥ 0 (0 = ordinary training)"),
            ("interpretable_tau", self.interpretable_tau > 0, "positive (the paper's 0.5)"),
            ("interpretable_beta", self.interpretable_beta > 0, "positive (the paper's 4)"),
            ("interpretable_alpha", 0 <= self.interpretable_alpha < 1, "in [0, 1) (0 = n²/(1 + n²))"),
            ("interpretable_locate", self.interpretable_locate in ("argmax", "centroid"), "'argmax' or 'centroid'"),
            ("interpretable_momentum", 0 <= self.interpretable_momentum < 1, "in [0, 1)"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise StageInputError(f"training setting {name} must be {want}; got {getattr(self, name)!r}")
        if self.interpretable_weight > 0 and not self.interpretable_layer:
            raise StageInputError(
                f"training setting interpretable_weight = {self.interpretable_weight!r} needs interpretable_layer: "
                "name the conv layer to make interpretable (e.g. \"conv4\"), or set the weight to 0"
            )

    @property
    def interpretable(self) -> bool:
        """Whether the interpretable-CNN mode is on (a layer and a positive filter-loss weight)."""
        return bool(self.interpretable_layer) and self.interpretable_weight > 0

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> TrainConfig:
        """Build from a config table, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise StageInputError(f"unknown training setting(s) {unknown}; known settings: {sorted(known)}")
        return cls(**dict(params))

    def to_dict(self) -> dict[str, Any]:
        """Every setting that changes the result (the ``interpretable_*`` ones only when the mode is on)."""
        data = asdict(self)
        if not self.interpretable:
            data = {k: v for k, v in data.items() if not k.startswith("interpretable_")}
        return data
