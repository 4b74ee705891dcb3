"""The ``train`` stage: one model spec trained from one seed on the dataset's class labels.

Tables: ``history`` (epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds; interpretable runs add
filter_loss, filter_inter_category, filter_spatial) and, for interpretable runs, ``filter_categories`` (unit,
category, category_name, response); file ``model.pt``; extras ``weights_sha256``, ``final_val_acc``,
``final_train_acc``, ``epochs``, ``train_seconds`` (and ``interpretable_layer`` when on).
"""

from __future__ import annotations

import io
import time
from typing import TYPE_CHECKING, Any

from ..core import Context, Stage, StageOutput, register_stage
from ._lazy import LazyModule, torch

if TYPE_CHECKING:  # the module itself is imported lazily (it pulls in torch)
    from ._models import ModelSpec

__all__ = ["TrainStage", "model_spec_from_params"]

_models = LazyModule("._models")
_training = LazyModule("._training")
_device = LazyModule("._device")


def model_spec_from_params(params: dict[str, Any], weights: str | None = None) -> ModelSpec:
    """The :class:`ModelSpec` a ``train``/``extract`` node's params describe."""
    return _models.ModelSpec(architecture=params["architecture"], arch_kwargs=dict(params["arch"]),
                             num_classes=params.get("num_classes"), weights=weights,
                             input_mean=tuple(params["input_mean"]), input_std=tuple(params["input_std"]))


@register_stage
class TrainStage(Stage):
    """Train one model spec from one seed on the dataset's class labels (deterministic on the CPU)."""

    name = "train"
    version = 2  # 2: the interpretable filter loss's prior is the paper's (p(T⁻) = 1 − α, not α)
    depends_on = ("._training", "._train_config", "._models", "._cnn", "._model_registry", "._checkpoints",
                  "._device", "._cpu_kernels", "._torch_build", "._interpretable", "._optim")
    uses_device = True

    def run(self, ctx: Context) -> StageOutput:
        params = ctx.params
        spec = model_spec_from_params(params)
        config = _training.TrainConfig.from_dict(params["train"])
        started = time.time()
        _device.check_device_params(dict(params), ctx.device(), training=True)
        # CPU training is keyed on its torch thread count (the weights' bits depend on it): the key decides.
        threads = int(params.get("threads") or ctx.execution.get("torch_threads") or 0) or None
        state, history, categories = _training.train_model_full(spec, ctx.dataset(), seed=int(params["seed"]),
                                                                config=config, device=ctx.device(), num_threads=threads)
        buffer = io.BytesIO()
        torch().save({k: v.detach().cpu().contiguous() for k, v in state.items()}, buffer)
        final = history.iloc[-1]
        tables = {"history": history}
        extras = {"weights_sha256": _training.state_dict_digest(state), "final_val_acc": float(final["val_acc"]),
                  "final_train_acc": float(final["train_acc"]), "epochs": int(len(history)),
                  "train_seconds": time.time() - started}
        if categories is not None:
            tables["filter_categories"] = categories
            extras["interpretable_layer"] = config.interpretable_layer
        return StageOutput(tables=tables, files={"model.pt": buffer.getvalue()}, extras=extras)
