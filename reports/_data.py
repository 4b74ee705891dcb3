"""Read access to a finished run for the report: stage tables with their node labels, instances, pairs.

The constraint: reports read cached stage outputs only — they never recompute a statistic — and a run may
lack whole stages (no landmarks → no stability; ``compare.pairs = "none"`` → no comparisons). So every
table the report needs comes through :class:`RunData`, which returns an *empty* frame for an absent stage
or table (the builders then skip that table or figure with a note) and knows, for each instance name, its
model, seed and role: ``"trained"`` (the configured network) or ``"random"`` (the same seed's untrained
network, the null baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # pandas loads on the first table read, not when a report's cached pieces are served
    import pandas as pd

__all__ = ["RunData", "InstanceInfo"]


@dataclass(frozen=True)
class InstanceInfo:
    """An instance of the plan as the report sees it."""

    name: str
    model: str
    seed: int
    role: str  # "trained" | "random"
    init: str  # "trained" | "random" | "weights"


class RunData:
    """Tables and metadata of a :class:`~repdissect.pipeline.RunResult`, with empty frames for what is absent.

    Args:
        result: the run (``plan``, per-node ``results`` with cache entries, ``out_dir``).
    """

    def __init__(self, result: Any) -> None:
        self.result = result
        self.plan = result.plan
        self.config = result.plan.config
        self._cache: dict[tuple[str, str | None], pd.DataFrame] = {}

    # -- structure ------------------------------------------------------------------------------
    @cached_property
    def instances(self) -> list[InstanceInfo]:
        out = []
        for inst in self.plan.instances:
            role = "random" if (inst.init == "random" and inst.model.init != "random") else "trained"
            out.append(InstanceInfo(inst.name, inst.model.name, int(inst.seed), role, inst.init))
        return out

    def instance(self, name: str) -> InstanceInfo | None:
        return next((i for i in self.instances if i.name == name), None)

    def trained(self, model: str | None = None) -> list[InstanceInfo]:
        return [i for i in self.instances if i.role == "trained" and (model is None or i.model == model)]

    @cached_property
    def models(self) -> list[tuple[str, list[str]]]:
        """``(model name, layers in config order)`` for every configured model."""
        return [(m.name, list(m.layers)) for m in self.config.models]

    @property
    def multi_model(self) -> bool:
        return len(self.models) > 1

    def layer_title(self, model: str, layer: str) -> str:
        return f"{model} {layer}" if self.multi_model else layer

    def model_layers(self) -> Iterator[tuple[str, str]]:
        for model, layers in self.models:
            for layer in layers:
                yield model, layer

    @property
    def iou_threshold(self) -> float:
        return float(self.config.iou.threshold)

    # -- tables ---------------------------------------------------------------------------------
    def has_stage(self, stage: str) -> bool:
        return bool(self.plan.by_stage(stage))

    def table(self, stage: str, table: str | None = None) -> pd.DataFrame:
        """``RunResult.tables(stage, table)`` with node labels first; empty when the stage/table is absent."""
        import pandas as pd

        key = (stage, table)
        if key not in self._cache:
            frame = pd.DataFrame()
            if self.has_stage(stage):
                frame = self.result.tables(stage, table)
            info = {i.name: i for i in self.instances}
            # Label-derived columns go right after the node labels (the stage's own columns win on a clash).
            if not frame.empty and "instance" in frame.columns:
                for pos, (col, get) in enumerate((("model", lambda i: i.model), ("seed", lambda i: i.seed),
                                                  ("role", lambda i: i.role)), 1):
                    if col not in frame.columns:
                        frame.insert(pos, col, [get(info[n]) if n in info else None for n in frame["instance"]])
            if not frame.empty and "a" in frame.columns and "kind" in frame.columns and "model" not in frame.columns:
                frame.insert(0, "model", [info[n].model if n in info else "" for n in frame["a"]])
            self._cache[key] = frame
        return self._cache[key]

    def entries(self, stage: str) -> list[tuple[dict[str, str], Any]]:
        """``[(label, Entry)]`` of a stage (empty when absent)."""
        if not self.has_stage(stage):
            return []
        return [(dict(label), entry) for label, entry in self.result.entries(stage)]

    def entry(self, stage: str, **label: str) -> Any | None:
        """The cache entry of the node of ``stage`` whose label contains ``label``, or ``None``."""
        for node_label, entry in self.entries(stage):
            if all(node_label.get(k) == v for k, v in label.items()):
                return entry
        return None

    def node_table(self, stage: str, table: str, **label: str) -> pd.DataFrame:
        """One node's table (no label columns); empty when the node or table is absent."""
        import pandas as pd

        entry = self.entry(stage, **label)
        if entry is None or table not in entry.manifest.get("tables", {}):
            return pd.DataFrame()
        return entry.frame(table)

    @cached_property
    def dataset(self) -> Any:
        """The run's dataset (built from its spec; only needed for exemplar images)."""
        from ..datasets import create_dataset

        spec = self.plan.dataset_spec
        return create_dataset(spec["kind"], **dict(spec.get("params", {})))

    def seed_pairs(self, model: str | None = None) -> list[tuple[str, str]]:
        return [(a.name, b.name) for a, b, kind in self.plan.pairs
                if kind == "seed" and (model is None or a.model.name == model)]
