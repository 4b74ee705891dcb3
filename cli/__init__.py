"""``repdissect`` command line: run, status, verify, clean, report, models, layers, dataset, compare.

The top floor of the package order (core ← datasets ← stages ← pipeline ← reports ← cli): it may import
every package's public API and nothing imports it. ``python -m repdissect.cli`` is the same command.

Every user error ends as one line on stderr — what is wrong, the value, the fix — and exit code 2, with
no traceback unless ``--debug``. Genuine bugs keep their traceback (exit 1).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from ..core import USER_ERRORS

__all__ = ["main", "build_parser"]


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="TOML config (default: configs/demo.toml)")
    p.add_argument("--cache", dest="cache_dir", help="cache directory (overrides [run].cache_dir)")
    p.add_argument("--out", dest="out_dir", help="output directory (overrides [run].out_dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repdissect", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for every error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the pipeline (cached stages are reused)")
    _add_run_options(p)
    p.add_argument("--scheduler", help='"auto" (default: in-process for small work, else LocalCluster), "local" (LocalCluster), '
                        '"sync" (in-process) or tcp://HOST:PORT')
    p.add_argument("--workers", type=int, help="LocalCluster worker processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device for extraction and tallies")
    p.add_argument("--no-report", action="store_true", help="skip writing tables, figures and index.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("attribute", help="run with the [attribution] section on: unit galleries, class panels, "
                                         "concept mass (cached like every stage)")
    _add_run_options(p)
    p.add_argument("--layers", help="comma-separated layers whose units are explained (overrides [attribution].layers)")
    p.add_argument("--images", help="comma-separated dataset indexes for the class panels (overrides "
                                    "[attribution].images)")
    p.add_argument("--scheduler", help='"local" (default LocalCluster), "sync" (in-process) or tcp://HOST:PORT')
    p.add_argument("--workers", type=int, help="LocalCluster worker processes")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="device for extraction and attribution")
    p.add_argument("--no-report", action="store_true", help="skip writing tables, figures and index.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("status", help="which nodes are cached, and why the others are not")
    _add_run_options(p)

    p = sub.add_parser("report", help="regenerate tables, figures and index.html from the cache")
    _add_run_options(p)

    p = sub.add_parser("visualise", help="unit visualisations (AM galleries, t-SNE, filters) and deep dream")
    _add_run_options(p)
    p.add_argument("--dream", type=int, metavar="IMAGE", help="deep-dream this dataset image index")
    p.add_argument("--layer", help="layer to dream at (default: the model's last configured layer)")
    p.add_argument("--octaves", type=int, default=4, help="deep dream octaves (default 4)")
    p.add_argument("--steps", type=int, default=10, help="deep dream steps per octave (default 10)")
    p.add_argument("--seed", type=int, default=0, help="deep dream jitter seed")

    p = sub.add_parser("verify", help="re-check sha256 of every cache entry; quarantine bad ones")
    _add_run_options(p)

    p = sub.add_parser("clean", help="remove cache entries no kept run refers to, and stale temp dirs")
    _add_run_options(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed and the bytes it would free")
    p.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="keep only the N newest runs of each config name (and the entries they use)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--newer-than", default=None, metavar="DATE",
                      help="keep runs created on or after DATE (ISO, UTC unless an offset is given)")
    when.add_argument("--keep-days", type=float, default=None, metavar="D",
                      help="keep runs created in the last D days")

    p = sub.add_parser("models", help="list architecture names (builtin:*, torchvision:*)")
    p.add_argument("pattern", nargs="?", default="*", help="glob, e.g. 'torchvision:resnet*' (default: all)")

    p = sub.add_parser("layers", help="list a model's layer names with output shapes")
    p.add_argument("model", help="builtin:cnn, torchvision:<name> or package.module:factory")
    p.add_argument("--input-size", type=int, default=64, help="square input size in pixels (default 64)")
    p.add_argument("--num-classes", type=int, default=None, help="classifier outputs (architecture default if unset)")
    p.add_argument("--weights", default=None, help="optional local state-dict file to load")

    p = sub.add_parser("dataset", help="export or preview a dataset")
    dsub = p.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    e = dsub.add_parser("export", help="write a dataset in Broden layout")
    e.add_argument("--kind", default="synthetic")
    e.add_argument("--format", dest="fmt", default="broden", choices=["broden"])
    e.add_argument("--out", required=True, type=Path)
    e.add_argument("--images", type=int, default=200)
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--seed", type=int, default=0)
    v = dsub.add_parser("preview", help="contact sheet PNG of images with mask overlays")
    v.add_argument("config", nargs="?", default=None, help="config whose [dataset] to preview (default demo)")
    v.add_argument("--out", type=Path, default=Path("preview.png"))
    v.add_argument("-n", type=int, default=24, help="number of images")

    s = sub.add_parser("sanity", help="built-in sanity test of every comparison metric on the config's own seeds "
                                      "(Kornblith et al. 2019 layer identification, Ding et al. 2021 principal-component "
                                      "deletion sensitivity); runs what is not cached")
    s.add_argument("config", nargs="?", default=None, help="config file (default: the packaged demo)")
    s.add_argument("--cache-dir", default=None)
    s.add_argument("--out-dir", default=None)

    p = sub.add_parser("compare", help="compare two activation arrays (.npy: (samples, units) or (N, C, H, W) maps)")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--metrics", default=None, help="comma-separated metric names (default: all)")
    p.add_argument("--samples", choices=["positions", "pooled"], default="positions",
                   help="for (N, C, H, W) maps: one sample per image position (default) or per image (spatial mean)")
    p.add_argument("--resize", choices=["none", "smaller"], default="none",
                   help="for maps of different H×W: 'smaller' average-pools both onto the smaller grid; "
                        "'none' (default) refuses")
    p.add_argument("--permutations", type=int, default=99,
                   help="shuffles of B's rows for the permutation null of the registry metrics (0: none)")
    p.add_argument("--groups", type=int, default=10, help="jackknife groups for the registry metrics' s.e.")
    p.add_argument("--out", type=Path, default=None,
                   help="write the metric, value, se, ci_low, ci_high, p_value table as CSV")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from ..pipeline import run

    result = run(args.config, cache_dir=args.cache_dir, out_dir=args.out_dir, scheduler=args.scheduler,
                 workers=args.workers, device=args.device, progress=False if args.no_progress else None,
                 print_summary=True)
    print(f"{len(result.results)} nodes: {result.misses} computed, {result.hits} from cache "
          f"in {result.seconds:.1f}s; run record {result.out_dir / 'run.json'}")
    if not args.no_report:
        from ..reports import summary_text, write_run_report

        write_run_report(result)
        print(summary_text(result))
    return 0


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        from ..pipeline import ConfigError

        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers; e.g. {option} 0,5,17") from None


def _cmd_attribute(args: argparse.Namespace) -> int:
    from ..pipeline import resolve_config

    cfg = resolve_config(args.config)
    section = {"enabled": True}
    if args.layers:
        section["layers"] = [v.strip() for v in args.layers.split(",") if v.strip()]
    if args.images:
        section["images"] = _int_list(args.images, "--images")
    args.config = cfg.with_overrides(attribution=section)
    return _cmd_run(args)


def _cmd_status(args: argparse.Namespace) -> int:
    from ..pipeline import status

    rows = status(args.config, cache_dir=args.cache_dir, out_dir=args.out_dir)
    width = max(len(r.node_id) for r in rows)
    for r in rows:
        note = r.reason.removeprefix("cached").strip(" ()") if r.cached else r.reason
        print(f"{'cached ' if r.cached else 'MISSING'}  {r.node_id:<{width}}  {note}".rstrip())
    cached = sum(r.cached for r in rows)
    print(f"{cached}/{len(rows)} nodes cached")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..reports import report_from_cache, summary_text

    result = report_from_cache(args.config, cache_dir=args.cache_dir, out_dir=args.out_dir)
    print(summary_text(result))
    return 0


def _cmd_visualise(args: argparse.Namespace) -> int:
    from ..pipeline import run
    from ..reports import RunData, visualise_figures

    result = run(args.config, cache_dir=args.cache_dir, out_dir=args.out_dir, progress=False)
    fig_dir = result.out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    for fig in visualise_figures(RunData(result), fig_dir):
        print(f"{fig.key}: {fig_dir / fig.path if fig.path else fig.skipped}")
    if args.dream is not None:
        import numpy as np
        from PIL import Image

        from ..stages import ModelSpec, StageInputError, build_model, load_checkpoint
        from ..stages.visualise import deep_dream

        data = RunData(result)
        trained = data.trained()
        if not trained:
            raise StageInputError("--dream needs a trained network in the run; configure init = \"trained\"")
        inst = next(i for i in result.plan.instances if i.name == trained[0].name)
        dataset = data.dataset
        if not 0 <= args.dream < len(dataset):
            raise StageInputError(f"--dream {args.dream}: the dataset has images 0..{len(dataset) - 1}; pick one of them")
        layer = args.layer or inst.model.layers[-1]
        extract = data.entry("extract", instance=inst.name)
        params = extract.manifest.get("params", {}) if extract is not None else {}
        spec = ModelSpec(architecture=inst.model.architecture, arch_kwargs=dict(inst.model.arch),
                         num_classes=params.get("num_classes") or len(dataset.class_names) or None,
                         input_mean=tuple(inst.model.input_mean), input_std=tuple(inst.model.input_std))
        train = data.entry("train", model=inst.model.name, seed=str(inst.seed))
        state = load_checkpoint(train.file("model.pt")) if train is not None else None
        model = build_model(spec, seed=inst.seed, state_dict=state)
        image = dataset.load(np.array([args.dream])).images[0]
        out = deep_dream(model, layer, image, octaves=args.octaves, steps=args.steps, seed=args.seed)
        path = fig_dir / f"dream_{args.dream}_{layer}.png"
        Image.fromarray(np.concatenate([image.transpose(1, 2, 0), out], axis=1)).resize(
            (out.shape[1] * 8, out.shape[0] * 4), Image.Resampling.NEAREST).save(path)
        print(f"deep dream of image {args.dream} at {layer} ({inst.name}): {path}")
    return 0


def _store_for(args: argparse.Namespace):
    from ..core import CacheStore
    from ..pipeline import resolve_config

    cfg = resolve_config(args.config, cache_dir=args.cache_dir)
    return CacheStore(cfg.run.cache_dir)


def _cmd_verify(args: argparse.Namespace) -> int:
    report = _store_for(args).verify()
    bad = [r for r in report if r[2]]
    for stage, key, problem in bad:
        print(f"CORRUPT  {stage}/{key[:16]}  {problem} (quarantined; it will be recomputed)")
    print(f"{len(report)} entries checked, {len(bad)} corrupt")
    return 0 if not bad else 1


def _bytes_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _cmd_clean(args: argparse.Namespace) -> int:
    import datetime as _dt

    from ..core import UserInputError, parse_when

    newer_than = None
    if args.newer_than is not None:
        newer_than = parse_when(args.newer_than)
    elif args.keep_days is not None:
        if args.keep_days < 0:
            raise UserInputError(f"--keep-days must be 0 or more, got {args.keep_days:g}; give the age in days of "
                                 "the oldest run to keep")
        newer_than = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=args.keep_days)
    store = _store_for(args)
    plan = store.plan_clean(keep_last=args.keep_last, newer_than=newer_than)
    if not args.dry_run:
        store.apply_clean(plan)
    verb = "would remove" if args.dry_run else "removed"
    for record in plan.records:
        print(f"{verb} run record {record.path.name} ({record.name}, {record.status}, {record.created:%Y-%m-%d %H:%M} UTC)")
    for path in [*plan.entries, *plan.other]:
        print(f"{verb} {path}")
    for record in plan.running:
        where = f"pid {record.pid} on {record.host}" if record.pid is not None else "recorded without a pid"
        print(f"kept running run {record.name} ({where}): its entries are untouched")
    print(f"{len(plan.records)} run records, {len(plan.entries)} entries and {len(plan.other)} other paths "
          f"{'would be ' if args.dry_run else ''}removed; {_bytes_text(plan.bytes_freed)} "
          f"{'would be ' if args.dry_run else ''}freed; {len(plan.kept_records)} run records kept")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from ..stages import list_models

    names = list_models(args.pattern)
    for name in names:
        print(name)
    if not names:
        print(f"no architecture matches {args.pattern!r}", file=sys.stderr)
    return 0


def _cmd_layers(args: argparse.Namespace) -> int:
    from ..stages import layers_command

    for name, shape in layers_command(args.model, input_size=args.input_size, num_classes=args.num_classes,
                                      weights=args.weights):
        print(f"{name:<40} {'x'.join(map(str, shape))}")
    return 0


def _cmd_dataset(args: argparse.Namespace) -> int:
    if args.dataset_command == "export":
        from ..datasets import export_command

        out = export_command(args.kind, args.fmt, args.out, args.images, args.size, args.seed)
        print(f"wrote {args.images} images in {args.fmt} layout to {out}")
        return 0
    from ..datasets import create_dataset, preview_command
    from ..pipeline import resolve_config

    cfg = resolve_config(args.config)
    dataset = create_dataset(cfg.dataset.kind, **cfg.dataset.params)
    out = preview_command(dataset, args.out, args.n)
    print(f"wrote {out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from ..stages import StageInputError

    arrays = []
    for path in (args.a, args.b):
        try:
            arrays.append(np.load(path, allow_pickle=False))
        except FileNotFoundError:
            raise StageInputError(f"activation file {str(path)!r} does not exist; give a .npy file (rows = samples)") from None
        except ValueError as exc:
            raise StageInputError(f"{str(path)!r} is not a plain numeric .npy array ({exc}); save it with numpy.save") from None
    a, b = arrays
    if a.ndim == 4 or b.ndim == 4:
        from ..stages.compare import samples_from_maps

        if a.ndim != 4 or b.ndim != 4:
            raise StageInputError(f"A has shape {a.shape} and B {b.shape}: give two (N, C, H, W) maps or two "
                                  "(samples, units) matrices")
        if args.samples == "positions" and a.shape[2:] != b.shape[2:] and args.resize == "none":
            raise StageInputError(
                f"the maps' spatial sizes differ (A is {a.shape[2]}×{a.shape[3]}, B is {b.shape[2]}×{b.shape[3]}) "
                "and no resize rule was given; pass --resize smaller to average-pool both onto the smaller grid, "
                "or --samples pooled"
            )
        a, b = samples_from_maps(a, b, mode=args.samples, resize=args.resize)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else ["all"]
    table = compare_with_shuffled(a, b, metrics, permutations=args.permutations, groups=args.groups)
    print(table.to_string(index=False))
    print("b_shuffled: the same metric with B's rows shuffled across samples — what independent data gives at "
          "this number of samples and units. samples: rows each value was computed from (held-out losses: fit "
          "on the n_train rows, scored on the n_heldout rows).")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
    return 0


def _cmd_sanity(args: argparse.Namespace) -> int:
    from ..pipeline import run
    from ..reports import sanity_tables
    from ..stages import StageInputError

    result = run(args.config, cache_dir=args.cache_dir, out_dir=args.out_dir, progress=False)
    tables = sanity_tables(result)
    if not tables:
        raise StageInputError("the sanity tests need [similarity] enabled with at least two trained seeds of a model "
                              "with two or more layers, or [sensitivity] enabled with trained seeds on a dataset "
                              "with class labels; add seeds or layers to the config")
    print("\n\n".join(table.to_markdown() for table in tables))
    return 0


def compare_with_shuffled(a: Any, b: Any, metrics: list[str], *, permutations: int = 0,
                          groups: int = 10) -> Any:
    """``compare_arrays(a, b)`` (value, jackknife s.e. and interval, permutation p-value) plus ``b_shuffled``
    (each metric on B's rows permuted, seed 1: what independent data gives at this N) and ``samples`` per metric."""
    import numpy as np

    from ..stages.compare import compare_arrays

    table = compare_arrays(a, b, metrics=metrics, permutations=permutations, groups=groups)
    shuffled = compare_arrays(a, b[np.random.default_rng(1).permutation(b.shape[0])], metrics=metrics,
                              permutations=0, groups=groups)
    table["b_shuffled"] = shuffled.set_index("metric")["value"].reindex(table["metric"]).to_numpy()
    counts = table.set_index("metric")["value"]
    n_train = int(counts.get("n_train", a.shape[0]))
    n_heldout = int(counts.get("n_heldout", 0))
    table["samples"] = [n_heldout if "heldout" in m else (n_train if m not in ("n_train", "n_heldout") else int(v))
                        for m, v in zip(table["metric"], table["value"])]
    return table


_COMMANDS = {"run": _cmd_run, "attribute": _cmd_attribute, "status": _cmd_status, "report": _cmd_report, "verify": _cmd_verify,
             "clean": _cmd_clean, "models": _cmd_models, "layers": _cmd_layers, "dataset": _cmd_dataset,
             "compare": _cmd_compare, "visualise": _cmd_visualise,
             "sanity": _cmd_sanity}


def main(argv: Sequence[str] | None = None) -> int:
    """The ``repdissect`` command; returns its exit code.

    Called as the program (``argv`` None: the console script, ``python -m repdissect.cli``) it ends the
    process itself once the command has finished and the interpreter's exit handlers have run, without the
    libraries' C++ teardown (see :func:`_leave`); called with ``argv`` (tests, other Python code) it returns.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        code = _COMMANDS[args.command](args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if argv is None:
        _leave(code)
    return code


def _leave(code: int) -> None:
    """End the process now: run the exit handlers (``atexit``: logging, temporary files, Dask), flush the
    standard streams, then ``os._exit``, skipping the interpreter's teardown and the C++ static destructors.

    Those destructors are what a finished command would otherwise wait for, and they cost memory: the CUDA
    build of torch pages in ~110–125 MB of library code and data (cuBLASLt, cuSPARSELt, libtorch_cuda) at
    exit — measured at +114 MB on top of a quick run's peak. Every file the pipeline writes is closed and
    fsynced before its command returns, so nothing is left to flush but the standard streams.
    """
    import atexit
    import os

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: leave the ordinary way
        return
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
