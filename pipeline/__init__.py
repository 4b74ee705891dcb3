"""Orchestration: typed config, the DAG of cached nodes, the Dask executor, ``run`` and ``status``.

Public API::

    from repdissect.pipeline import run, status, load_config
    result = run("configs/quick.toml")            # or a Config object
    result.tables("iou", "units")                  # one DataFrame over every (model, layer)

Layering: this package imports :mod:`repdissect.core` and the public APIs of :mod:`repdissect.stages`
and :mod:`repdissect.datasets` (importing it registers the built-in stages); it never imports reports or
the CLI. The report of a run is written by :func:`repdissect.reports.write_run_report`. The core names
(``Stage``, ``CacheStore``, …) are re-exported here for convenience; their home is :mod:`repdissect.core`.
"""

from ..core import (CacheError, CacheStore, Context, Entry, Node, PipelineError, ShardedStage, Stage, StageOutput,
                    canonical_json, digest, get_stage, list_stages, register_stage)
from ._config import Config, load_config
from ._dag import Instance, Plan, build_plan
from ._errors import ConfigError
from ._executor import NodeResult
from ._memory_profile import PROFILE_ENV, read_profile
from ._run import NodeStatus, RunResult, resolve_config, run, status
from ._workload import PAYOFF_MEGAPIXEL_PASSES, SchedulerChoice, Workload, choose_scheduler, estimate_workload

__all__ = [
    "CacheError", "CacheStore", "Config", "ConfigError", "Context", "Entry", "Instance", "Node", "NodeResult",
    "NodeStatus", "PipelineError", "Plan", "RunResult", "ShardedStage", "Stage", "StageOutput", "build_plan",
    "canonical_json", "digest", "get_stage", "list_stages", "load_config", "register_stage", "resolve_config",
    "run", "status",
    "PAYOFF_MEGAPIXEL_PASSES", "SchedulerChoice", "Workload", "choose_scheduler", "estimate_workload",
    "PROFILE_ENV", "read_profile",
]
