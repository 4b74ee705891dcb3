"""The ground floor every other package builds on: stage contract, statistic protocol, cache store, hashing.

Package order (imports flow one way, down)::

    cli        the ``repdissect`` command: may import everything
    reports    tables, figures, HTML from cached results (public APIs of pipeline, stages, datasets, core)
    pipeline   config, DAG, Dask executor, run/status (public APIs of stages, datasets, core)
    stages     the science and its stage declarations (public APIs of datasets, core)
    datasets   data adapters (core only)
    core       this package: imports none of the above

What lives here: the stage contract (:class:`Stage`, :class:`ShardedStage`, :class:`StageOutput`, the
stage registry), :class:`Node` and its cache key, :class:`Context` (what a running stage may use), the
mergeable-statistic protocol (:class:`StreamingStatistic`, ``pack_arrays``/``unpack_arrays``,
``bundle``/``unbundle``), the content-addressed :class:`CacheStore` with its atomic writers, the
canonical hasher, the Parquet part writers and the shared user-error types. Nothing here knows a model,
a dataset or a stage by name: the packages above fill the registries (stages, the dataset factory).
"""

from ._atomic import (AtomicParquetWriter, AtomicPartFile, sha256_file, write_bytes_atomic,
                      write_parquet_atomic)
from ._bundle import bundle, unbundle
from ._crash import CRASH_ENV, CRASH_ONCE_ENV, CRASH_POINTS, crash_point
from ._context import Context, load_dataset, set_dataset_factory
from ._errors import USER_ERRORS, CacheError, PipelineError, UserInputError
from ._hashing import CACHE_FORMAT_VERSION, UnhashableValueError, canonical_json, digest, normalize
from ._node import Node
from ._part_writers import (PARQUET_ENGINES, PartWriter, PolarsParquetWriter, open_part_writer, parquet_engine,
                            polars_unavailable_reason)
from ._source import source_fingerprint
from ._stage import ShardedStage, Stage, StageOutput, get_stage, list_stages, register_stage
from ._statistic import ShardRanges, StreamingStatistic, pack_arrays, unpack_arrays
from ._statistic_stage import StatisticStage, StatisticState
from ._retention import CleanPlan, RunRecord, parse_when, process_alive, this_host
from ._store import MANIFEST, MANIFEST_SCHEMA, REPORTS, CacheStore, Entry

__all__ = [
    "AtomicParquetWriter", "AtomicPartFile", "CRASH_ENV", "CRASH_ONCE_ENV", "CRASH_POINTS", "crash_point", "CleanPlan", "REPORTS", "RunRecord", "parse_when", "process_alive",
    "this_host", "CACHE_FORMAT_VERSION", "CacheError", "CacheStore", "Context",
    "Entry", "MANIFEST", "MANIFEST_SCHEMA", "Node", "PARQUET_ENGINES", "PartWriter", "PipelineError",
    "PolarsParquetWriter", "ShardRanges", "ShardedStage", "Stage", "StageOutput", "StatisticStage", "StatisticState", "StreamingStatistic", "USER_ERRORS",
    "UnhashableValueError", "UserInputError", "bundle", "canonical_json", "digest", "get_stage",
    "list_stages", "load_dataset", "normalize", "open_part_writer", "pack_arrays", "parquet_engine",
    "polars_unavailable_reason", "register_stage", "sha256_file", "set_dataset_factory", "source_fingerprint", "unbundle",
    "unpack_arrays", "write_bytes_atomic", "write_parquet_atomic",
]
