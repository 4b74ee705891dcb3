"""Builds the run's DAG of :class:`Node` s from a :class:`Config`.

Shape (one node per box; keys chain through ``upstream``)::

    train[model,seed] ─► extract[instance] ─► thresholds[instance,layer] ─► iou[instance,layer]
                                         ├──► stability[instance,layer]          (datasets with landmarks)
                                         └──► moments[pair,layer] ─► compare[pair,layer]
                                         └──► cka[pair]                          (layer × layer, pooled)
    extract[every trained seed of a model] ─► sensitivity[model]                 (Ding et al. deletion test)
    stability_center[dataset]                                                    (image-centre baseline)
                                         ├──► dataset_search[instance,layer]     (top-k images per unit)
                                         ├──► activation_max[instance,layer]     ([visualise]; + train weights;
                                         │                                        layer "logits" = class models)
                                         ├──► tsne[instance,layer]
                                         └──► filters[instance]                  (first RGB convolution)

    extract, train ─► attribute[instance,layer];  iou, train ─► attribution_mass[instance,layer]   ([attribution])

Dissection nodes (thresholds, iou) exist only for datasets with concept masks, stability nodes only for
datasets with landmarks; comparison nodes for every dataset.

An *instance* is a model at one seed: trained (``cnn@s0``), untrained with the same seed
(``cnn@s0-random``) or loaded from a weights file. Pairs, by ``kind`` (:data:`PAIR_KINDS`):

* ``seed`` — every two trained seeds of a model (the comparison of interest);
* ``unrelated`` — each trained seed against *another* seed's untrained network (seed s vs the next seed's
  random init, cyclically): the null for "trained seeds are similar";
* ``random_pair`` — every two untrained networks: what the architecture alone gives;
* ``drift`` — each trained seed against its *own* initialisation: how far training moved it (not a null:
  the trained net inherits its init's weights). What goes into ``params`` is exactly what
changes results — for ``train`` and ``extract`` that includes the device class and its determinism mode
(and the CPU thread count of training, :mod:`._device_key`); execution settings go to ``exec_params``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import stages as _stages  # noqa: F401  (importing the science registers the built-in stages)
from ..core import Node, get_stage, load_dataset
from ._config import Config, ModelConfig
from ._device_key import DeviceKey, probe_device
from ._dag_attribution import attribution_nodes
from ._errors import ConfigError

__all__ = ["PAIR_KINDS", "Plan", "Instance", "build_plan"]

#: comparison pair kinds, in report order (see the module docstring)
PAIR_KINDS = ("seed", "unrelated", "random_pair", "drift")


@dataclass(frozen=True)
class Instance:
    """A concrete network: model config + seed + how its weights come about."""

    model: ModelConfig
    seed: int
    init: str  # "trained" | "random" | "weights"

    @property
    def name(self) -> str:
        suffix = "-random" if self.init == "random" and self.model.init != "random" else ""
        return f"{self.model.name}@s{self.seed}{suffix}"


@dataclass
class Plan:
    """All nodes of a run, grouped for reports and the Python API."""

    config: Config
    dataset_spec: dict[str, Any]
    dataset_digest: str
    nodes: list[Node]
    instances: list[Instance]
    pairs: list[tuple[Instance, Instance, str]]  # (a, b, kind: one of PAIR_KINDS)
    device: DeviceKey = DeviceKey()

    def by_stage(self, stage: str) -> list[Node]:
        return [n for n in self.nodes if n.stage == stage]


def _file_sha256(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key weights = {path!r}: file not found; give the path of a local state-dict file")
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _node(stage: str, label: dict[str, str], params: dict[str, Any], *, upstream: dict[str, Node] | None = None,
          digests: dict[str, str] | None = None, exec_params: dict[str, Any] | None = None) -> Node:
    return Node(stage=stage, label=label, params=params, upstream=upstream or {}, digests=digests or {},
                exec_params=exec_params or {}, version=type(get_stage(stage)).version)


def _sensitivity_nodes(config: Config, dataset: Any, instances: list[Instance], extract_of: dict[str, Node],
                       digests: dict[str, str]) -> list[Node]:
    """One ``sensitivity`` node per model with trained seeds, on a dataset with class labels (the probes' targets)."""
    sc = config.sensitivity
    if not sc.enabled or not dataset.class_names:
        return []
    nodes = []
    for model in config.models:
        trained = [i for i in instances if i.model is model and i.init == "trained"]
        if not trained:
            continue
        roles = [f"s{i.seed}" for i in trained]
        nodes.append(_node("sensitivity", {"model": model.name},
                           {"roles": roles, "layers": list(model.layers), "metrics": list(sc.metrics),
                            "orders": list(sc.orders), "steps": sc.steps, "images": sc.images,
                            "rsa_images": sc.rsa_images, "seed": sc.seed},
                           upstream={r: extract_of[i.name] for r, i in zip(roles, trained)}, digests=digests))
    return nodes


def _check_model(model: ModelConfig, classes: int | None, image_size: tuple[int, int]) -> None:
    """Build the network once, with its weights, and run one dummy batch at the dataset's image size.

    So an unknown architecture, bad ``arch`` arguments, a weights file that is not a state dict or does not
    fit, and an unknown or unusable layer all fail here, naming the model — before any task runs.
    """
    from ..stages import ModelSpec, StageInputError, build_model, layer_shapes, resolve_layers

    weights = model.weights if model.init == "weights" and Path(model.weights).is_file() else None
    try:
        spec = ModelSpec(architecture=model.architecture, arch_kwargs=dict(model.arch), num_classes=classes,
                         weights=weights, input_mean=tuple(model.input_mean), input_std=tuple(model.input_std))
        net = build_model(spec, seed=model.seeds[0])
        resolve_layers(net, list(model.layers))
        shapes = {s.name: s.shape for s in layer_shapes(net, image_size)}
    except StageInputError as exc:
        raise ConfigError(f"[[models]] {model.name!r}: {exc}") from None
    if model.init == "trained" and model.train.interpretable:
        _check_interpretable(model, net, shapes, image_size)
    unusable = {layer: shapes[layer] for layer in model.layers if shapes[layer] is None or len(shapes[layer]) not in (1, 3)}
    if unusable:
        raise ConfigError(
            f"[[models]] {model.name!r}: layer(s) {unusable} do not output (C, H, W) or (C,) tensors at "
            f"{image_size[0]}×{image_size[1]} input (None = not run or not a tensor); pick conv blocks or linear "
            "layers (see `repdissect layers`)"
        )


#: what a fresh interpreter runs for :func:`_check_model_in_child`: the check of a model given as JSON (its
#: config table, rebuilt and validated as a config file's is), its outcome written back as JSON
_CHILD_CHECK = """
import json, os, sys
from repdissect.pipeline._config import ModelConfig, _build
from repdissect.pipeline._dag import _check_model
with open(sys.argv[1], encoding="utf-8") as f:
    request = json.load(f)
try:
    model = _build(ModelConfig, request["model"], "[[models]]")
    _check_model(model, request["classes"], tuple(request["image_size"]))
    outcome = {}
except Exception as exc:
    outcome = {"type": type(exc).__name__, "message": str(exc)}
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(outcome, f)
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # skips the CUDA libraries' static destructors (they page in ~100 MiB at exit)
"""


def _check_model_in_child(model: ModelConfig, classes: int | None, image_size: tuple[int, int]) -> None:
    """:func:`_check_model` in a short-lived interpreter, so that the process that only plans and submits (the
    client of a cluster run) never loads torch: ~500 MiB resident that it would hold, doing nothing with it,
    through the whole run beside the workers that compute. Raises the check's :class:`ConfigError` (same
    message); any other failure becomes a ConfigError naming it."""
    with tempfile.TemporaryDirectory(prefix="repdissect-check-") as tmp:
        path = Path(tmp) / "check.json"
        path.write_text(json.dumps({"model": dataclasses.asdict(model), "classes": classes,
                                    "image_size": list(image_size)}), encoding="utf-8")
        done = subprocess.run([sys.executable, "-c", _CHILD_CHECK, str(path)], capture_output=True, text=True)
        try:
            outcome = json.loads(path.read_text(encoding="utf-8")) if done.returncode == 0 else None
        except ValueError:  # the child died while writing: reported like a crash below
            outcome = None
    if not isinstance(outcome, dict):
        raise ConfigError(f"[[models]] {model.name!r}: checking the network in a child process failed (exit "
                          f"{done.returncode}): {done.stderr.strip()[-1500:]}")
    if outcome.get("type") == "ConfigError":
        raise ConfigError(outcome["message"])
    if outcome:
        raise ConfigError(f"[[models]] {model.name!r}: checking the network failed ({outcome['type']}: "
                          f"{outcome['message']})")


def _check_in_child(config: Config) -> bool:
    """Whether the model checks run in a child process: when this process will only plan and submit (an
    explicit cluster scheduler) and has not loaded torch anyway."""
    return config.execution.scheduler not in ("sync", "auto") and "torch" not in sys.modules


def _tsne_method(method: str, points: int) -> str:
    """``"auto"`` resolved here, so the key names the backend that computes the embedding (they differ)."""
    if method != "auto":
        return method
    import importlib.util

    from ..stages import OPENTSNE_FROM

    return "opentsne" if points >= OPENTSNE_FROM and importlib.util.find_spec("openTSNE") is not None else "sklearn"


def _visualise_nodes(config: Config, inst: Instance, model_params: dict[str, Any], extract: Node,
                     weights: Node | None, digests: dict[str, str], images: int) -> list[Node]:
    """``dataset_search`` per layer of every instance; ``activation_max`` (trained nets), ``filters`` and ``tsne``
    for the first seed of each model unless ``[visualise].instances = "all"`` (t-SNE only from 4 images)."""
    vis = config.visualise
    if not vis.enabled:
        return []
    out = []
    chosen = vis.instances == "all" or inst.seed == inst.model.seeds[0]
    model_up = {"activations": extract, **({"weights": weights} if weights is not None else {})}
    for layer in inst.model.layers:
        label = {"instance": inst.name, "layer": layer}
        out.append(_node("dataset_search", label, {"layer": layer, "top_k": vis.top_k},
                         upstream={"activations": extract}))
        if chosen and vis.activation_max and inst.init != "random":
            out.append(_node("activation_max", label, {"layer": layer, "model": model_params,
                                                       "settings": vis.am_settings(), "batch_units": vis.am_batch_units},
                             upstream=model_up, digests=digests,
                             exec_params={"device": config.execution.device}))
        if chosen and vis.tsne and images >= 4:
            out.append(_node("tsne", label, {"layer": layer, "points": vis.tsne_points, "perplexity": vis.tsne_perplexity,
                                             "method": _tsne_method(vis.tsne_method, vis.tsne_points),
                                             "seed": vis.tsne_seed, "features": vis.tsne_features},
                             upstream={"activations": extract}, digests=digests))
    if chosen and vis.class_models and inst.init != "random" and model_params.get("num_classes"):
        out.append(_node("activation_max", {"instance": inst.name, "layer": "logits"},
                         {"layer": None, "model": model_params, "settings": vis.am_settings(),
                          "batch_units": vis.am_batch_units},
                         upstream=model_up, digests=digests, exec_params={"device": config.execution.device}))
    if chosen:
        out.append(_node("filters", {"instance": inst.name}, {"model": model_params}, upstream=model_up))
    return out


def _check_interpretable(model: ModelConfig, net: Any, shapes: dict[str, Any], image_size: tuple[int, int]) -> None:
    """``[models.train] interpretable_layer``: a conv layer of the network, and — while the mask stays on at
    evaluation — no dissected layer after it (extraction runs the plain network, so a later layer would be
    seen without the mask the trained model applies)."""
    from ..stages import StageInputError, iter_layers_after, resolve_layers

    layer = model.train.interpretable_layer
    key = f"[[models]] {model.name!r} [models.train].interpretable_layer = {layer!r}"
    try:
        resolve_layers(net, [layer])
    except StageInputError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if shapes.get(layer) is None or len(shapes[layer]) != 3:
        raise ConfigError(f"{key}: the layer outputs {shapes.get(layer)!r}, not (C, H, W) feature maps; "
                          "pick a conv layer (see `repdissect layers`)")
    if model.train.interpretable_mask_eval:
        later = sorted(set(iter_layers_after(net, layer, image_size)) & set(model.layers))
        if later:
            raise ConfigError(
                f"{key}: layer(s) {later} run after it, and the trained model masks that layer's output while "
                "extraction does not; dissect layers up to the interpretable one, or set "
                "interpretable_mask_eval = false"
            )


def build_plan(config: Config, *, is_cached: Callable[[Node], bool] | None = None,
               device: DeviceKey | None = None) -> Plan:
    """Build every node of ``config``'s run. Builds the dataset once (cheap) for its digest and shapes.

    ``device``: what the network stages' keys record about the hardware (default: probed for
    ``config.execution``, see :func:`probe_device`).

    Each model is also built once and run on a dummy batch (:func:`_check_model`) — unless ``is_cached`` says
    every one of its extraction nodes is already in the cache, so a fully cached rerun never loads torch.
    """
    dataset_spec = {"kind": config.dataset.kind, "params": dict(config.dataset.params)}
    dataset = load_dataset(dataset_spec)
    if len(dataset) == 0:
        raise ConfigError(f"[dataset] {config.dataset.kind!r} has zero images; give a dataset with at least one image")
    ds_digest = dataset.digest()
    device = device if device is not None else probe_device(config.execution)
    digests = {"dataset": ds_digest}
    ex = config.execution
    exec_common = {"shard_size": ex.shard_size, "device": ex.device}
    nodes: list[Node] = []
    instances: list[Instance] = []
    extract_of: dict[str, Node] = {}
    checks: list[tuple[ModelConfig, int | None]] = []

    for model in config.models:
        if model.num_classes:
            classes = model.num_classes
        elif model.init == "weights":
            classes = None  # the architecture's default head, as the checkpoint was saved
        else:
            classes = len(dataset.class_names) or None
        arch = {"architecture": model.architecture, "arch": dict(model.arch), "input_mean": list(model.input_mean),
                "input_std": list(model.input_std), "num_classes": classes}
        checks.append((model, classes))
        for seed in model.seeds:
            variants = [model.init] + (["random"] if model.random_baseline and model.init != "random" else [])
            for init in variants:
                inst = Instance(model, seed, init)
                instances.append(inst)
                upstream: dict[str, Node] = {}
                params = dict(arch, seed=seed, init=init, layers=sorted(model.layers), storage_dtype=config.extract.dtype,
                              batch_size=config.extract.batch_size, **device.extract_params())
                if init == "trained":
                    if not dataset.class_names:
                        raise ConfigError(
                            f"[[models]] {model.name!r} has init = \"trained\" but dataset kind "
                            f"{config.dataset.kind!r} has no class labels; use init = \"weights\" or \"random\""
                        )
                    train = _node("train", {"model": model.name, "seed": str(seed)},
                                  dict(arch, seed=seed, train=model.train.to_dict(), **device.train_params()),
                                  digests=digests,
                                  exec_params={"device": ex.device})
                    nodes.append(train)
                    upstream["weights"] = train
                elif init == "weights":
                    params["weights_sha256"] = _file_sha256(model.weights)
                    params["weights_path"] = str(Path(model.weights).resolve())
                extract = _node("extract", {"instance": inst.name}, params, upstream=upstream, digests=digests,
                                exec_params=exec_common)
                nodes.append(extract)
                extract_of[inst.name] = extract
                for layer in model.layers:
                    label = {"instance": inst.name, "layer": layer}
                    thr = _node("thresholds", label, {"layer": layer, "quantile": config.thresholds.quantile},
                                upstream={"activations": extract},
                                exec_params={"memory_budget_mb": config.thresholds.memory_budget_mb})
                    iou = _node("iou", label, {"layer": layer, "iou_threshold": config.iou.threshold,
                                              "union": config.iou.union},
                                upstream={"activations": extract, "thresholds": thr}, digests=digests,
                                exec_params=exec_common)
                    if dataset.concepts:  # a dataset without concept masks (ImageFolder) is compared, not dissected
                        nodes += [thr, iou]
                    if config.stability.enabled and dataset.landmark_names:
                        nodes.append(_node("stability", label, {"layer": layer, "top_k": config.stability.top_k},
                                           upstream={"activations": extract}, digests=digests))
                nodes += _visualise_nodes(config, inst, params, extract, upstream.get("weights"), digests,
                                         len(dataset))

    if config.stability.enabled and dataset.landmark_names:
        nodes.append(_node("stability_center", {"dataset": config.dataset.kind},
                           {"top_k": config.stability.top_k}, digests=digests, exec_params=exec_common))

    pairs: list[tuple[Instance, Instance, str]] = []
    if config.compare.pairs == "seeds":
        for model in config.models:
            main = [i for i in instances if i.model is model and i.init == model.init]
            for a, b in itertools.combinations(main, 2):
                pairs.append((a, b, "seed"))
            if model.random_baseline and model.init != "random":
                randoms = [Instance(model, a.seed, "random") for a in main]
                if len(main) > 1:
                    for k, a in enumerate(main):
                        pairs.append((a, randoms[(k + 1) % len(main)], "unrelated"))
                for a, b in itertools.combinations(randoms, 2):
                    pairs.append((a, b, "random_pair"))
                for a, b in zip(main, randoms):
                    pairs.append((a, b, "drift"))
    cc = config.compare
    for a, b, kind in pairs:
        ea, eb = extract_of[a.name], extract_of[b.name]
        for layer in a.model.layers:
            label = {"a": a.name, "b": b.name, "kind": kind, "layer": layer}
            mom = _node("moments", label, {"layer_a": layer, "layer_b": layer, "samples": cc.samples,
                                           "resize": cc.resize, "holdout": cc.holdout,
                                           "precision": cc.moments_precision},
                        upstream={"a": ea, "b": eb})
            cmp_ = _node("compare", label, {"alphas": list(cc.alphas), "match_thresholds": list(cc.match_thresholds),
                                            "svcca_keep": cc.svcca_keep, "lasso_tol": cc.lasso_tol,
                                            "lasso_max_sweeps": cc.lasso_max_sweeps},
                         upstream={"moments": mom})
            nodes += [mom, cmp_]
        if cc.cka_layers:
            nodes.append(_node("cka", {"a": a.name, "b": b.name, "kind": kind},
                               {"layers_a": list(a.model.layers), "layers_b": list(b.model.layers),
                                "precision": cc.moments_precision},
                               upstream={"a": ea, "b": eb}))
        sc = config.similarity
        if sc.enabled:
            nodes.append(_node("similarity", {"a": a.name, "b": b.name, "kind": kind},
                               {"layers_a": list(a.model.layers), "layers_b": list(b.model.layers),
                                "metrics": list(sc.metrics), "groups": sc.groups, "subset": sc.subset,
                                "permutations": sc.permutations, "seed": sc.seed},
                               upstream={"a": ea, "b": eb}))
    nodes += _sensitivity_nodes(config, dataset, instances, extract_of, digests)
    nodes += attribution_nodes(config, dataset, instances, extract_of, nodes, _node, digests, exec_common)
    for model, classes in checks:
        extracts = [extract_of[i.name] for i in instances if i.model is model]
        if is_cached is None or not all(is_cached(node) for node in extracts):
            (_check_model_in_child if _check_in_child(config) else _check_model)(model, classes, dataset.image_size)
    return Plan(config=config, dataset_spec=dataset_spec, dataset_digest=ds_digest, nodes=nodes,
                instances=instances, pairs=pairs, device=device)
