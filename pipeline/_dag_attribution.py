"""The ``[attribution]`` section's nodes: ``attribute`` and ``attribution_mass`` per (instance, layer).

For each model, the chosen seeds' main instances (``[attribution].seeds``, default the first seed) and layers
(``[attribution].layers``, default the model's last layer) get one ``attribute`` node (exemplar maps and
class panels) and, on datasets with concept masks, one ``attribution_mass`` node downstream of that layer's
``iou`` node (the unit labels). Every parameter that changes a map is keyed.
"""

from __future__ import annotations

from typing import Any, Callable

from ..core import Node
from ._config import Config
from ._errors import ConfigError

__all__ = ["attribution_nodes"]

_METHOD_KEYS = ("smoothgrad_samples", "smoothgrad_stdev", "occlusion_window", "occlusion_stride", "occlusion_baseline",
                "lrp_rule", "lrp_epsilon", "lime_cell", "lime_samples", "batch_size", "unit_chunk", "reduce",
                "lrp_alpha", "lime_segmentation", "lime_segments", "lime_compactness")


def attribution_nodes(config: Config, dataset: Any, instances: list[Any], extract_of: dict[str, Node],
                      nodes: list[Node], make: Callable[..., Node], digests: dict[str, str],
                      exec_common: dict[str, Any]) -> list[Node]:
    """The attribution nodes of ``config`` (none unless ``[attribution].enabled``)."""
    cfg = config.attribution
    if not cfg.enabled:
        return []
    bad = [i for i in cfg.images if i >= len(dataset)]
    if bad:
        raise ConfigError(f"config key [attribution].images = {list(cfg.images)!r} is invalid: indexes {bad} are past "
                          f"the dataset's {len(dataset)} images")
    iou_of = {(n.label["instance"], n.label["layer"]): n for n in nodes if n.stage == "iou"}
    common = {k: getattr(cfg, k) for k in _METHOD_KEYS}
    out: list[Node] = []
    for model in config.models:
        seeds = list(cfg.seeds) or [model.seeds[0]]
        missing = [s for s in seeds if s not in model.seeds]
        if missing:
            raise ConfigError(f"config key [attribution].seeds = {seeds!r} is invalid: model {model.name!r} has seeds "
                              f"{list(model.seeds)}")
        layers = list(cfg.layers) or [model.layers[-1]]
        unknown = [layer for layer in layers if layer not in model.layers]
        if unknown:
            raise ConfigError(f"config key [attribution].layers = {layers!r} is invalid: {unknown} are not among model "
                              f"{model.name!r}'s layers {list(model.layers)}")
        for inst in instances:
            if inst.model is not model or inst.seed not in seeds or inst.init != model.init:
                continue
            extract = extract_of[inst.name]
            arch = {k: v for k, v in extract.params.items() if k not in ("layers", "storage_dtype", "batch_size")}
            upstream = {"activations": extract}
            if "weights" in extract.upstream:
                upstream["weights"] = extract.upstream["weights"]
            for layer in layers:
                cam_layer = cfg.cam_layer
                if not cam_layer:
                    index = list(model.layers).index(layer)
                    cam_layer = model.layers[index - 1] if index > 0 else ""
                needs_cam = {"grad_cam", "guided_grad_cam"} & set(cfg.unit_methods)
                if needs_cam and (not cam_layer or cam_layer == layer):
                    raise ConfigError(
                        f"config key [attribution].cam_layer = {cfg.cam_layer!r} is invalid: unit Grad-CAM of {layer!r} "
                        f"needs a layer below it; set cam_layer (e.g. an earlier block) or drop {sorted(needs_cam)}"
                    )
                label = {"instance": inst.name, "layer": layer}
                params = dict(common, model=arch, layer=layer, units=sorted(cfg.units), top_k=cfg.top_k,
                              unit_methods=list(cfg.unit_methods), class_methods=list(cfg.class_methods),
                              cam_layer=cam_layer, images=list(cfg.images), classes_shown=cfg.classes_shown,
                              class_target=cfg.class_target, head="fc")
                out.append(make("attribute", label, params, upstream=upstream, digests=digests,
                                exec_params=exec_common))
                iou = iou_of.get((inst.name, layer))
                if iou is not None:
                    images = len(dataset) if cfg.mass_images == 0 else min(cfg.mass_images, len(dataset))
                    mass = dict(model=arch, layer=layer, units=sorted(cfg.units), method=cfg.mass_method,
                                reduce=cfg.reduce, images=images, batch_size=cfg.batch_size, unit_chunk=cfg.unit_chunk)
                    up = {"iou": iou, **{k: v for k, v in upstream.items() if k == "weights"}}
                    out.append(make("attribution_mass", label, mass, upstream=up, digests=digests,
                                    exec_params=exec_common))
    return out
