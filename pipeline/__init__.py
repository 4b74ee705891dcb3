"""Orchestration: typed config, content-addressed Parquet cache, stage contract, DAG on Dask, CLI.

Public API::

    from repdissect.pipeline import run, status, load_config
    result = run("configs/quick.toml")            # or a Config object
    result.tables("iou", "units")                  # one DataFrame over every (model, layer)
"""

from ._config import Config, load_config
from ._errors import CacheError, ConfigError, PipelineError
from ._hashing import canonical_json, digest
from ._run import RunResult, run, status
from ._stage import Context, Node, ShardedStage, Stage, StageOutput, get_stage, list_stages, register_stage
from ._store import CacheStore, Entry

__all__ = [
    "CacheError", "CacheStore", "Config", "ConfigError", "Context", "Entry", "Node", "PipelineError",
    "RunResult", "ShardedStage", "Stage", "StageOutput", "canonical_json", "digest", "get_stage",
    "list_stages", "load_config", "register_stage", "run", "status",
]
