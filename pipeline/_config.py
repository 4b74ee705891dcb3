"""Run configuration: one TOML file → typed, frozen dataclasses, validated once at load.

The constraint: configuration is the recipe the cache keys are derived from, so it must be explicit
(every field declared, typed, with a default here and nowhere else), immutable after load, and any
mistake must be caught before a single task runs — with a message naming the key (``[section].field``),
the value received and what is allowed. Free-form sub-tables exist only where a registry validates them
(dataset parameters, architecture keyword arguments).

Sections: ``[run]``, ``[dataset]``, ``[[models]]`` (with ``[models.train]``), ``[extract]``, ``[thresholds]``, ``[iou]``,
``[stability]``, ``[compare]``, ``[execution]``, ``[visualise]``, ``[attribution]``, ``[similarity]``, ``[sensitivity]``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from ..core import polars_unavailable_reason
from ..stages import StageInputError, TrainConfig
from ._config_attribution import AttributionConfig
from ._errors import ConfigError

__all__ = [
    "Config",
    "RunConfig",
    "DatasetConfig",
    "TrainConfig",
    "ModelConfig",
    "ExtractConfig",
    "ThresholdsConfig",
    "IoUConfig",
    "StabilityConfig",
    "CompareConfig",
    "ExecutionConfig",
    "VisualiseConfig",
    "AttributionConfig",
    "load_config",
    "config_from_dict",
    "default_config_path",
]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key} = {value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class RunConfig:
    """Where results go. Relative paths are resolved against the directory the command runs in."""

    name: str = "demo"
    cache_dir: str = ".repdissect/cache"
    out_dir: str = "runs/{name}"

    def validate(self, key: str) -> None:
        _check(bool(_NAME_RE.match(self.name)), f"{key}.name", self.name,
               "use 1-64 characters from letters, digits, '_', '-', '.'")
        _check(bool(self.cache_dir.strip()), f"{key}.cache_dir", self.cache_dir, "give a directory path")
        _check(bool(self.out_dir.strip()), f"{key}.out_dir", self.out_dir, "give a directory path")

    @property
    def out_path(self) -> Path:
        return Path(self.out_dir.replace("{name}", self.name))


@dataclass(frozen=True)
class DatasetConfig:
    """Which dataset kind to build and its parameters (validated by the dataset's own factory)."""

    kind: str = "synthetic"
    params: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        from ..datasets import list_datasets

        kinds = list_datasets()
        _check(self.kind in kinds, f"{key}.kind", self.kind, f"choose one of {', '.join(kinds)}")


@dataclass(frozen=True)
class ModelConfig:
    """One architecture, instantiated once per seed.

    ``init``: ``"trained"`` trains on the dataset's class labels; ``"random"`` keeps the seeded initial
    weights; ``"weights"`` loads ``weights`` (a local state dict / checkpoint file). ``random_baseline``
    adds, for every seed, the untrained network with the same seed (dissected as the random-init baseline,
    compared in the null and drift pairs).
    """

    name: str = "cnn"
    architecture: str = "builtin:cnn"
    arch: dict = field(default_factory=dict)
    init: Literal["trained", "random", "weights"] = "trained"
    weights: str = ""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    layers: list[str] = field(default_factory=lambda: ["conv1", "conv2", "conv3", "conv4"])
    random_baseline: bool = True
    input_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    input_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_classes: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, key: str) -> None:
        _check(bool(_NAME_RE.match(self.name)), f"{key}.name", self.name,
               "use 1-64 characters from letters, digits, '_', '-', '.'")
        _check(bool(self.architecture.strip()), f"{key}.architecture", self.architecture,
               "give 'builtin:cnn', 'torchvision:<name>' or 'package.module:factory'")
        _check(len(self.seeds) > 0, f"{key}.seeds", self.seeds, "give at least one seed, e.g. seeds = [0, 1, 2]")
        _check(len(set(self.seeds)) == len(self.seeds), f"{key}.seeds", self.seeds, "seeds must be distinct")
        _check(all(s >= 0 for s in self.seeds), f"{key}.seeds", self.seeds, "seeds must be integers ≥ 0")
        _check(len(self.layers) > 0, f"{key}.layers", self.layers, "list at least one layer name")
        _check(len(set(self.layers)) == len(self.layers), f"{key}.layers", self.layers, "layer names must be distinct")
        _check(self.init != "weights" or bool(self.weights), f"{key}.weights", self.weights,
               "init = \"weights\" needs weights = \"path/to/state_dict.pt\"")
        _check(self.init == "weights" or not self.weights, f"{key}.weights", self.weights,
               "weights is only used with init = \"weights\"; remove it or set init = \"weights\"")
        _check(len(self.input_mean) == 3, f"{key}.input_mean", self.input_mean, "give three numbers (RGB)")
        _check(len(self.input_std) == 3 and all(s > 0 for s in self.input_std), f"{key}.input_std",
               self.input_std, "give three positive numbers (RGB)")
        _check(self.num_classes >= 0, f"{key}.num_classes", self.num_classes,
               "must be ≥ 0 (0 = the dataset's class count, or the architecture's default for init = \"weights\")")


@dataclass(frozen=True)
class ExtractConfig:
    """Activation extraction: ``dtype`` is the storage type of cached activations (float16 halves the cache
    and I/O; thresholds are then exact quantiles of the float16 values).

    ``batch_size`` is the number of images per forward pass, and it is part of the cache key: convolutions are
    not bit-identical across batch sizes (oneDNN on the CPU picks its blocking by batch size, cuDNN its
    algorithm), so the batch composition is fixed by the dataset, not by the shard layout. Image ``i`` is
    always computed in batch ``i // batch_size``, and extraction shards are cut at multiples of
    ``batch_size``, so ``[execution].shard_size`` and the number of workers never change a result.
    """

    dtype: Literal["float32", "float16"] = "float32"
    batch_size: int = 64

    def validate(self, key: str) -> None:
        _check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "must be an integer ≥ 1, e.g. 64")


@dataclass(frozen=True)
class ThresholdsConfig:
    """Per-unit activation threshold: the top ``quantile`` fraction of all values lies above it."""

    quantile: float = 0.005
    memory_budget_mb: int = 256

    def validate(self, key: str) -> None:
        _check(0 < self.quantile < 1, f"{key}.quantile", self.quantile, "must be strictly between 0 and 1, e.g. 0.005")
        _check(self.memory_budget_mb >= 1, f"{key}.memory_budget_mb", self.memory_budget_mb, "must be ≥ 1")


@dataclass(frozen=True)
class IoUConfig:
    """IoU tally; a unit is interpretable when its best IoU exceeds ``threshold``.

    ``union``: which images a unit's on-pixels count in for a category's union (keyed).
    ``"category-images"`` (the original NetDissect ``makeresult.py``, which produced Bau et al.'s CVPR 2017
    numbers): every image containing a label of the category. ``"lite"`` (NetDissect-Lite): only images where
    the unit's on-pixels touch a label of the category, so IoUs are higher or equal. Pick the one of the
    numbers you compare with; see ``repdissect.stages.IoUTally``.
    """

    threshold: float = 0.04
    union: Literal["category-images", "lite"] = "category-images"

    def validate(self, key: str) -> None:
        _check(0 <= self.threshold < 1, f"{key}.threshold", self.threshold, "must be in [0, 1), e.g. 0.04")


@dataclass(frozen=True)
class StabilityConfig:
    """Location instability: top-K images per (unit, landmark)."""

    top_k: int = 100
    enabled: bool = True

    def validate(self, key: str) -> None:
        _check(self.top_k >= 2, f"{key}.top_k", self.top_k, "must be an integer ≥ 2 (a standard deviation needs 2)")


@dataclass(frozen=True)
class CompareConfig:
    """Representation comparison between model pairs.

    ``pairs``: ``"seeds"`` = every pair of trained seeds of each model, plus (with ``random_baseline``) the
    null pairs — each seed vs another seed's untrained net (``unrelated``), untrained vs untrained
    (``random_pair``) — and each seed vs its own init (``drift``); ``"none"`` disables comparisons. ``samples``: ``"positions"`` (image × position samples,
    grids resized per ``resize``) or ``"pooled"`` (one spatially averaged sample per image).

    ``lasso_tol`` and ``lasso_max_sweeps`` are the L1 regression's coordinate-descent stopping rule (stop when
    every target's duality gap ≤ ``lasso_tol`` · its squared norm, scikit-learn's criterion, or after
    ``lasso_max_sweeps`` full sweeps). Both are keyed; a fit that hits the sweep limit is reported as not
    converged in the run summary and the report.

    ``moments_precision``: ``"float64"`` (default) forms every co-moment product in float64; ``"float32"``
    forms each chunk's product in float32, sums the chunk products in float32 over at most ~16,000 samples
    (of 512 channels) and those sums in float64 — about 2× faster on CPUs, with covariance errors of up to a
    few 1e-6 of σᵢσⱼ and metric errors of 1e-8 to 2e-5 (relative; largest for PWCCA on ill-conditioned
    layers). Keyed (``moments`` and ``cka`` nodes).
    """

    pairs: Literal["seeds", "none"] = "seeds"
    samples: Literal["positions", "pooled"] = "positions"
    resize: Literal["smaller", "none"] = "smaller"
    holdout: float = 0.2
    alphas: list[float] = field(default_factory=lambda: [0.0, 1e-3, 3e-3, 1e-2, 3e-2, 0.1])
    match_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    svcca_keep: float = 0.99
    cka_layers: bool = True
    lasso_tol: float = 1e-6
    lasso_max_sweeps: int = 2000
    moments_precision: Literal["float64", "float32"] = "float64"

    def validate(self, key: str) -> None:
        _check(0 < self.holdout < 1, f"{key}.holdout", self.holdout, "must be strictly between 0 and 1, e.g. 0.2")
        _check(len(self.alphas) > 0 and all(a >= 0 and math.isfinite(a) for a in self.alphas), f"{key}.alphas",
               self.alphas, "give a non-empty list of numbers ≥ 0")
        _check(all(-1 <= t <= 1 for t in self.match_thresholds), f"{key}.match_thresholds", self.match_thresholds,
               "correlation thresholds must lie in [-1, 1]")
        _check(0 < self.svcca_keep <= 1, f"{key}.svcca_keep", self.svcca_keep, "must be in (0, 1], e.g. 0.99")
        _check(0 < self.lasso_tol < 1, f"{key}.lasso_tol", self.lasso_tol,
               "must be strictly between 0 and 1, e.g. 1e-6 (relative duality gap)")
        _check(self.lasso_max_sweeps >= 1, f"{key}.lasso_max_sweeps", self.lasso_max_sweeps,
               "must be an integer ≥ 1, e.g. 2000")


#: the metrics of the layer × layer comparison and of the deletion test (the compare registry's moment and RSA
#: metrics), in report order
SIMILARITY_METRICS = ("linear_cka", "debiased_cka", "cca_mean", "svcca", "pwcca", "pwcca_morcos", "procrustes",
                      "shape_alpha1", "shape_alpha0.5", "shape_alpha0", "frechet", "rsa")


def _check_metrics(key: str, metrics: list[str]) -> None:
    unknown = [m for m in metrics if m not in SIMILARITY_METRICS]
    _check(bool(metrics) and not unknown, f"{key}.metrics", metrics,
           f"choose a non-empty list from {list(SIMILARITY_METRICS)}")


@dataclass(frozen=True)
class SimilarityConfig:
    """Layer × layer comparison with every registered metric, jackknife s.e. and a permutation null.

    ``metrics``: registry names (default all: linear_cka, debiased_cka, cca_mean, svcca, pwcca, pwcca_morcos,
    procrustes, shape_alpha1, shape_alpha0.5, shape_alpha0, frechet, rsa). ``groups``: jackknife groups (images
    assigned by a seeded hash of their index). ``subset``: images in the fixed seeded subset for RSA and the
    null; ``permutations``: shuffles of net B's images for the null (0: none). One sample per image (pooled).
    """

    enabled: bool = True
    metrics: list[str] = field(default_factory=lambda: list(SIMILARITY_METRICS))
    groups: int = 10
    subset: int = 300
    permutations: int = 99
    seed: int = 0

    def validate(self, key: str) -> None:
        _check_metrics(key, self.metrics)
        _check(self.groups >= 2, f"{key}.groups", self.groups, "must be an integer ≥ 2 (10 recommended)")
        _check(self.subset >= 4, f"{key}.subset", self.subset, "must be an integer ≥ 4 (RSA needs 4 images)")
        _check(self.permutations >= 0, f"{key}.permutations", self.permutations, "must be an integer ≥ 0")


@dataclass(frozen=True)
class SensitivityConfig:
    """Ding et al. 2021's sensitivity test (``repdissect sanity``): delete principal components of one seed's
    layer, rank-correlate each metric's dissimilarity with a linear probe's accuracy change.

    Runs for every model with trained seeds on a dataset with class labels. ``metrics``: registry names (as
    ``[similarity].metrics``). ``orders``: ``"low"`` deletes the lowest-variance components first (Ding et al.),
    ``"high"`` the highest first. ``steps``: about how many deletion counts from 0 to units − 1. ``images``: at
    most this many images (a seeded hash picks them; probes train on the dataset's train split, everything is
    measured on its held-out split). ``rsa_images``: held-out images RSA uses (its cost grows as their square).
    """

    enabled: bool = True
    metrics: list[str] = field(default_factory=lambda: list(SIMILARITY_METRICS))
    orders: list[str] = field(default_factory=lambda: ["low", "high"])
    steps: int = 12
    images: int = 5000
    rsa_images: int = 300
    seed: int = 0

    def validate(self, key: str) -> None:
        _check_metrics(key, self.metrics)
        bad = [o for o in self.orders if o not in ("low", "high")]
        _check(bool(self.orders) and not bad and len(set(self.orders)) == len(self.orders), f"{key}.orders",
               self.orders, 'choose a non-empty list of distinct orders from ["low", "high"]')
        _check(self.steps >= 2, f"{key}.steps", self.steps, "must be an integer ≥ 2 (12 recommended)")
        _check(self.images >= 8, f"{key}.images", self.images, "must be an integer ≥ 8")
        _check(self.rsa_images >= 4, f"{key}.rsa_images", self.rsa_images, "must be an integer ≥ 4 (RSA needs 4 images)")


@dataclass(frozen=True)
class ExecutionConfig:
    """How work runs: these fields change speed, not results, with two exceptions the keys capture.

    ``device`` decides the device class (``"cpu"``, ``"cuda:<name> (sm_XY)"``) that the ``train`` and
    ``extract`` keys record with its determinism mode, because networks give different bits on different
    device classes; ``threads_per_worker`` is the torch thread count that CPU training's key records
    (training's bits depend on it; extraction's do not, tested). The other fields are never keyed.

    ``scheduler``: ``"auto"`` (the default: in-process when the missing work is too small for a cluster to
    pay off, else a LocalCluster; the choice and its reason are logged and recorded in ``run.json``),
    ``"local"`` (a LocalCluster), ``"sync"`` (in-process) or a scheduler address such as
    ``"tcp://10.0.0.5:8786"``. ``parquet_engine``: the encoder of activation parts —
    ``"auto"`` (polars when installed, else pyarrow), ``"polars"`` or ``"pyarrow"``; the files read back
    the same either way.
    """

    scheduler: str = "auto"
    workers: int = 2
    threads_per_worker: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shard_size: int = 512
    verify_checksums: bool = False
    progress: bool = True
    parquet_engine: Literal["auto", "polars", "pyarrow"] = "auto"

    def validate(self, key: str) -> None:
        _check(bool(self.scheduler.strip()), f"{key}.scheduler", self.scheduler,
               "use \"auto\", \"local\", \"sync\" or a scheduler address like \"tcp://host:8786\"")
        _check(self.workers >= 1, f"{key}.workers", self.workers, "must be an integer ≥ 1")
        _check(self.threads_per_worker >= 1, f"{key}.threads_per_worker", self.threads_per_worker, "must be ≥ 1")
        _check(self.shard_size >= 1, f"{key}.shard_size", self.shard_size, "must be an integer ≥ 1")
        if self.parquet_engine == "polars":
            problem = polars_unavailable_reason()
            _check(problem is None, f"{key}.parquet_engine", self.parquet_engine,
                   f"{problem}; install polars>=2.1 or use \"auto\" or \"pyarrow\"")


@dataclass(frozen=True)
class VisualiseConfig:
    """Unit visualisation: dataset search, activation maximisation (AM), first-layer filters, t-SNE.

    ``instances``: ``"first"`` = the first seed of each model (and its random-init baseline for filters
    and t-SNE), ``"all"`` = every seed. AM fields are :class:`~repdissect.stages.visualise.AMSettings`;
    ``class_models``: also one image per class logit (Simonyan et al.'s class-model visualisation, same
    settings). ``am_batch_units`` = units optimised together (0 = every unit of the layer in one batch; the result does
    not depend on it up to rounding, so it is keyed). The default, 16, bounds the optimisation's working set: the
    demo's 128 conv4 units in one batch added +419 MiB for the forward/backward passes, in batches of 16 +62 MiB,
    at 1.3× less CPU time (smaller convolutions stay in cache; ``benchmarks/bench_visualise.py``). ``tsne_method``: ``"sklearn"``, ``"opentsne"``
    (optional package) or ``"auto"``; ``tsne_features``: each image's per-unit spatial ``"max"`` (what a
    max-pooling head sees; the built-in CNN's) or ``"mean"``.
    """

    enabled: bool = True
    instances: Literal["first", "all"] = "first"
    top_k: int = 10
    activation_max: bool = True
    class_models: bool = True
    am_steps: int = 256
    am_lr: float = 0.05
    am_parameterisation: Literal["fourier", "pixel"] = "fourier"
    am_decorrelate: bool = True
    am_objective: Literal["neuron", "channel"] = "neuron"
    am_jitter: int = 3
    am_blur_every: int = 0
    am_blur_sigma: float = 0.5
    am_decay: float = 5.0
    am_seed: int = 0
    am_batch_units: int = 16
    tsne: bool = True
    tsne_points: int = 2000
    tsne_features: Literal["max", "mean"] = "max"
    tsne_perplexity: float = 30.0
    tsne_method: Literal["sklearn", "opentsne", "auto"] = "sklearn"
    tsne_seed: int = 0

    def validate(self, key: str) -> None:
        _check(self.top_k >= 1, f"{key}.top_k", self.top_k, "must be an integer ≥ 1")
        _check(self.am_steps >= 1, f"{key}.am_steps", self.am_steps, "must be an integer ≥ 1")
        _check(self.am_lr > 0, f"{key}.am_lr", self.am_lr, "must be a positive number, e.g. 0.05")
        _check(self.am_jitter >= 0, f"{key}.am_jitter", self.am_jitter, "must be an integer ≥ 0")
        _check(self.am_blur_every >= 0, f"{key}.am_blur_every", self.am_blur_every, "must be an integer ≥ 0 (0 = no blur)")
        _check(self.am_blur_sigma > 0, f"{key}.am_blur_sigma", self.am_blur_sigma, "must be a positive number")
        _check(self.am_decay >= 0, f"{key}.am_decay", self.am_decay, "must be a number ≥ 0")
        _check(self.am_batch_units >= 0, f"{key}.am_batch_units", self.am_batch_units, "must be ≥ 0 (0 = all units)")
        _check(self.tsne_points >= 4, f"{key}.tsne_points", self.tsne_points, "must be an integer ≥ 4")
        _check(self.tsne_perplexity > 0, f"{key}.tsne_perplexity", self.tsne_perplexity, "must be a positive number")

    def am_settings(self) -> dict[str, Any]:
        """The keyword arguments of ``AMSettings``."""
        return {"steps": self.am_steps, "lr": self.am_lr, "parameterisation": self.am_parameterisation,
                "decorrelate": self.am_decorrelate, "objective": self.am_objective, "jitter": self.am_jitter,
                "blur_every": self.am_blur_every, "blur_sigma": self.am_blur_sigma, "decay": self.am_decay,
                "seed": self.am_seed}


@dataclass(frozen=True)
class Config:
    """The whole run recipe."""

    run: RunConfig = field(default_factory=RunConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    models: list[ModelConfig] = field(default_factory=lambda: [ModelConfig()])
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    thresholds: ThresholdsConfig = field(default_factory=ThresholdsConfig)
    iou: IoUConfig = field(default_factory=IoUConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    visualise: VisualiseConfig = field(default_factory=VisualiseConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)

    def validate(self, key: str = "") -> None:
        self.run.validate("[run]")
        self.dataset.validate("[dataset]")
        self.extract.validate("[extract]")
        self.thresholds.validate("[thresholds]")
        self.iou.validate("[iou]")
        self.stability.validate("[stability]")
        self.compare.validate("[compare]")
        self.execution.validate("[execution]")
        self.visualise.validate("[visualise]")
        self.attribution.validate("[attribution]")
        self.similarity.validate("[similarity]")
        self.sensitivity.validate("[sensitivity]")
        _check(len(self.models) > 0, "[[models]]", [], "define at least one [[models]] table")
        names = [m.name for m in self.models]
        for i, model in enumerate(self.models):
            model.validate(f"[[models]][{i}]")
        _check(len(set(names)) == len(names), "[[models]].name", names, "model names must be distinct")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **sections: Mapping[str, Any]) -> "Config":
        """A copy with fields of named sections replaced, re-validated (e.g. CLI ``--workers``)."""
        data = self.to_dict()
        for section, values in sections.items():
            data[section].update({k: v for k, v in values.items() if v is not None})
        return config_from_dict(data)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key {key} = {value!r} is invalid: choose one of {', '.join(map(repr, allowed))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected {_type_name(tp)}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected a table")
        return _build(tp, value, key)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected a table")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"config key {key} = {value!r} is invalid: must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key} = {value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")  # a bug in this module, not user input


#: keys a past version accepted, with what to write instead
_MOVED_KEYS = {
    ("ExecutionConfig", "batch_size"): "the forward-pass batch size changes results, so it is now the keyed "
                                       "[extract].batch_size; move the line there",
}


def _build(cls: type, data: Mapping[str, Any], key: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    moved = _MOVED_KEYS.get((cls.__name__, unknown[0])) if unknown else None
    if moved:
        raise ConfigError(f"config key {key}.{unknown[0]} = {data[unknown[0]]!r} has moved: {moved}")
    if unknown:
        where = key or "the top level"
        raise ConfigError(
            f"unknown config key {unknown[0]!r} in {where}: allowed keys are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else f"[{name}]"
        if cls is Config and name == "models":
            if not isinstance(value, list):
                raise ConfigError(f"config key [[models]] = {value!r} has the wrong type: expected [[models]] tables")
            kwargs[name] = [_coerce(v, ModelConfig, f"[[models]][{i}]") for i, v in enumerate(value)]
            continue
        kwargs[name] = _coerce(value, hints[name], sub)
    try:
        return cls(**kwargs)
    except StageInputError as exc:  # dataclasses shared with the stages validate in __post_init__
        raise ConfigError(f"config table {key or 'top level'}: {exc}") from None


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from parsed TOML (or an equivalent dict)."""
    config = _build(Config, data, "")
    config.validate()
    return config


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate a TOML config; ``None`` loads the packaged ``demo.toml``."""
    path = default_config_path() if path is None else Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: give the path of a .toml file, e.g. configs/demo.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML ({exc}); fix the syntax at that position") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8 TOML") from None
    return config_from_dict(data)


def default_config_path(name: str = "demo") -> Path:
    """``configs/<name>.toml`` in the working directory if present, else the copy shipped in the package."""
    local = Path("configs") / f"{name}.toml"
    if local.is_file():
        return local
    from importlib import resources

    return Path(str(resources.files("repdissect.configs").joinpath(f"{name}.toml")))
