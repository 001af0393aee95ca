"""``zvdask``: build, inspect and validate zarr-vectors pyramids from a shell."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from . import __version__
from . import cli_support as manners
from .planning.plan import DEFAULT_INLINE_VERTICES, INLINE_CONFIG

__all__ = ["parse_factors", "parse_chunk_scale", "parse_aggregation", "parse_storage_options",
           "parse_shard_shape", "cmd_pyramid", "cmd_sample", "cmd_demo", "cmd_info", "cmd_validate",
           "build_parser", "main"]


def parse_factors(text: str) -> list[tuple[float, float]]:
    """``2:1,2:2,2.5:2`` -> [(2, 1), (2, 2), (2.5, 2)]; a bare ``2`` means ``2:1``."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) == 1:
            parts.append("1")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"factor {item!r} is not COARSEN:SPARSITY")
        try:
            out.append((float(parts[0]), float(parts[1])))
        except ValueError:
            raise argparse.ArgumentTypeError(f"factor {item!r} is not COARSEN:SPARSITY") from None
    return out


def parse_chunk_scale(text: str) -> list:
    """``1,2,2x2x1`` -> [1, 2, (2, 2, 1)]."""
    out = []
    for item in text.split(","):
        try:
            if "x" in item:
                out.append(tuple(int(v) for v in item.split("x")))
            else:
                out.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"chunk scale {item!r} is not an integer or AxBxC") from None
    return out


def parse_aggregation(text: str) -> dict[str, str]:
    """``fa=mean,label=mode`` -> {"fa": "mean", "label": "mode"}."""
    from .step.attributes import MODES
    out = {}
    for item in text.split(","):
        name, sep, mode = item.strip().partition("=")
        if not sep or not name or mode not in MODES:
            raise argparse.ArgumentTypeError(
                f"aggregation {item!r} is not NAME=MODE with MODE one of {', '.join(MODES)}")
        out[name] = mode
    return out


def parse_storage_options(items: list[str] | None) -> dict:
    """``KEY=VALUE`` pairs; dotted keys nest, values are JSON when they parse."""
    opts: dict = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"zvdask: --storage-option {item.split('=')[0]!r} needs KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        node = opts
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = parsed
    return opts


def parse_shard_shape(text: str):
    """``4`` (every axis) or ``4x4x2`` (one per axis), in chunks."""
    try:
        values = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard-shape {text!r}: expected N or NxNxN "
                                         f"(whole numbers of chunks)") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--shard-shape {text!r}: every axis must be >= 1")
    return values[0] if len(values) == 1 else tuple(values)


@contextlib.contextmanager
def _cluster_client(args):
    """A client on ``--scheduler``, else on a LocalCluster made from the
    cluster options; closed (with its cluster) however the block ends."""
    from distributed import Client, LocalCluster

    from .errors import cleanup
    cluster = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(n_workers=args.n_workers,
                               threads_per_worker=args.threads_per_worker,
                               memory_limit=args.memory_limit, processes=True,
                               dashboard_address=":0", silence_logs=40,
                               preload=manners.WORKER_PRELOAD)
        client = Client(cluster)
    try:
        print(f"dashboard: {client.dashboard_link}")
        yield client
    finally:
        cleanup(client.close, what="closing the Dask client")
        if cluster is not None:
            cleanup(cluster.close, what="closing the LocalCluster")


def _print_table(rows, headers):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))


def _check_before_cluster(args, opts, kw) -> None:
    """Unreachable store, bad credentials, not a zarr-vectors store, a target
    that cannot be written, a request the plan refuses: said before a
    cluster starts (or is connected to)."""
    from .format.documents import open_zarr_vectors
    from .planning.levels import make_plan
    from .step import attributes as va
    st = open_zarr_vectors(args.store, opts)
    manners.check_writable(st)
    plan = make_plan(st, factors=kw["factors"], chunk_scale_factors=kw["chunk_scale_factors"],
                     cross_level_depth=kw["cross_level_depth"],
                     cross_level_storage=kw["cross_level_storage"],
                     sparsity_strategy=kw["sparsity_strategy"], n_workers=args.n_workers,
                     shard_shape=kw.get("shard_shape"))
    va.resolve(st, plan.levels[0].source_level, kw.get("vertex_attributes"),
               kw.get("attribute_aggregation"))


def cmd_pyramid(args) -> int:
    from .api import build_pyramid, plan_pyramid
    opts = parse_storage_options(args.storage_option)
    if args.sparsity_strategy not in ("random", "length"):
        # Other names live in zarr-vectors' registry, filled by
        # zarr-vectors-tools on import; an unknown name is refused by the plan.
        import importlib.util
        if importlib.util.find_spec("zarr_vectors_tools") is not None:
            import zarr_vectors_tools  # noqa: F401
    kw = dict(factors=args.factors, chunk_scale_factors=args.chunk_scale,
              sparsity_strategy=args.sparsity_strategy,
              sparsity_seed=args.sparsity_seed, cross_level_depth=args.cross_level_depth,
              cross_level_storage=args.cross_level_storage, storage_options=opts)
    if args.aggregate and not args.vertex_attributes:
        raise SystemExit("zvdask: --aggregate needs --vertex-attributes")
    if args.vertex_attributes:
        kw.update(vertex_attributes="aggregate", attribute_aggregation=args.aggregate)
    if args.shard_shape is not None:
        kw.update(shard_shape=args.shard_shape)
    if args.dry_run:
        print(plan_pyramid(args.store, n_workers=args.n_workers, **kw))
        return 0
    _check_before_cluster(args, opts, kw)
    with _cluster_client(args) as client:
        reports: list = []
        t0 = time.perf_counter()
        summary = build_pyramid(args.store, client=client, resume=args.resume,
                                overwrite=args.overwrite, _reports=reports,
                                progress=None if args.no_progress else manners.progress, **kw)
        total = time.perf_counter() - t0
    if not reports:  # the finished-pyramid path: no step ran, nothing composed
        print(f"nothing left to build: the {summary['levels_created']} level(s) asked for "
              f"are already built")
        return 0
    rows = []
    steps = [r for r in reports if hasattr(r, "target_level")]
    for spec, rep in zip(summary["level_specs"][-len(steps):] if steps else [], steps):
        rows.append((rep.target_level, spec.get("vertex_count", 0),
                     f"{spec.get('objects_kept', 0)}/{spec.get('source_objects', spec.get('objects_kept', 0))}",
                     rep.chunks, f"{rep.seconds:.2f}"))
    if rows:
        _print_table(rows, ["level", "vertices", "objects kept", "chunks", "seconds"])
    print(f"built {summary['levels_created']} level(s) in {total:.2f} s")
    return 0


def cmd_refresh(args) -> int:
    from .refresh import refresh_pyramid
    opts = parse_storage_options(args.storage_option)
    asked = dict(factors=args.factors, chunk_scale_factors=args.chunk_scale,
                 sparsity_strategy=args.sparsity_strategy, sparsity_seed=args.sparsity_seed,
                 cross_level_depth=args.cross_level_depth,
                 cross_level_storage=args.cross_level_storage, shard_shape=args.shard_shape)
    if args.dry_run:
        print(refresh_pyramid(args.store, storage_options=opts, dry_run=True, **asked))
        return 0
    from .currency import status_of
    from .format.documents import open_zarr_vectors
    st = open_zarr_vectors(args.store, opts)
    if status_of(st).current:  # no cluster for nothing
        print(refresh_pyramid(args.store, storage_options=opts, **asked))
        return 0
    manners.check_writable(st)
    with _cluster_client(args) as client:
        t0 = time.perf_counter()
        report = refresh_pyramid(args.store, client=client, storage_options=opts,
                                 progress=None if args.no_progress else manners.progress, **asked)
        total = time.perf_counter() - t0
    print(report)
    if report.refreshed:
        print(f"refreshed {report.summary['levels_created']} level(s) in {total:.2f} s")
    return 0


def _currency_line(store) -> str:
    from .currency import status_of
    return status_of(store).line(store.url)


def cmd_sample(args) -> int:
    from .sample import write_sample
    info = write_sample(args.url, kind=args.kind, objects=args.objects, vertices=args.vertices,
                        seed=args.seed, storage_options=parse_storage_options(args.storage_option),
                        overwrite=args.overwrite)
    print(f"wrote {info['url']}: {info['objects']} {info['kind']}, {info['vertices']} vertices "
          f"({info['writer']})")
    return 0


def cmd_demo(args) -> int:
    import os

    from .api import build_pyramid, plan_pyramid
    from .sample import write_sample
    path = os.path.join(args.dir, "demo.zv")
    write_sample(path, objects=args.lines, vertices=args.lines * args.points, seed=args.seed,
                 overwrite=True)
    print(f"wrote {path}: {args.lines} streamlines x {args.points} points "
          f"(zarr-vectors write_polylines)")
    factors = [(2, 1), (2, 2), (2, 2)]
    print(plan_pyramid(path, factors=factors, cross_level_depth=-1))
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      silence_logs=40, preload=manners.WORKER_PRELOAD) as cluster, \
            Client(cluster) as client:
        print(f"LocalCluster with 2 workers; dashboard: {client.dashboard_link}")
        t0 = time.perf_counter()
        summary = build_pyramid(path, factors=factors, sparsity_seed=0, cross_level_depth=-1,
                                cross_level_storage="explicit", client=client)
        dt = time.perf_counter() - t0
    rows = [(i + 1, s["vertex_count"], s.get("objects_kept", 0)) for i, s in enumerate(summary["level_specs"])]
    _print_table(rows, ["level", "vertices", "objects kept"])
    print(f"pyramid built in {dt:.2f} s")
    from zarr_vectors.validate import validate
    report = validate(path, level=3)
    print(f"zarr_vectors.validate(level=3): {'ok' if report.ok else 'FAILED'}")
    return 0 if report.ok else 1


def cmd_info(args) -> int:
    from .format import commit as cm
    from .format.documents import open_zarr_vectors
    store = open_zarr_vectors(args.store, parse_storage_options(args.storage_option))
    root = cm.read_root_attrs(store).get("zarr_vectors", {})
    print(f"store: {store.url}")
    for k in ("chunk_shape", "base_bin_shape", "bounds", "geometry_types", "format_capabilities",
              "cross_level_depth", "cross_level_storage"):
        if k in root:
            print(f"  {k}: {root[k]}")
    from .format.cells import vlen_array_info
    from .format.documents import node_attrs
    for lv in cm.published_levels(store):
        attrs = (node_attrs(store, str(lv)) or {}).get("zarr_vectors_level", {})
        info = vlen_array_info(store, f"{lv}/vertices")
        deltas = [d for d in store.listdir(f"{lv}/links") if d != "zarr.json"]
        print(f"  level {lv}: {attrs.get('vertex_count')} vertices, "
              f"{len(info.chunks) if info else 0} chunks, sparsity {attrs.get('object_sparsity')}, "
              f"parent {attrs.get('parent_level')}, links {deltas}")
    print(f"  {_currency_line(store)}")
    return 0


def cmd_validate(args) -> int:
    from zarr_vectors.validate import validate
    opts = parse_storage_options(args.storage_option)
    target = args.store
    if opts or "://" in args.store:
        # zarr-vectors' validator reads through a zarr store object, so an
        # object store is validated in place (with our retries) rather than
        # downloaded.
        from zarr_vectors.core.store import open_store

        from .storage.store import Store, check_access
        st = Store.from_url(args.store, opts)
        check_access(st)
        target = open_store(st.zarr_store(), mode="r", require_zv=False)
    report = validate(target, level=args.level)
    print(f"{args.store}: {'ok' if report.ok else 'INVALID'}")
    for item in getattr(report, "errors", []) or []:
        print(f"  error: {item}")
    try:  # a currency line only where there is a pyramid to speak of
        from .format.documents import open_zarr_vectors
        print(f"  {_currency_line(open_zarr_vectors(args.store, opts))}")
    except Exception:  # noqa: BLE001 - the validator has said what is wrong
        pass
    return 0 if report.ok else 1


#: Every option's help ends with its default.
_HELP = argparse.ArgumentDefaultsHelpFormatter


def _cluster_options(parser) -> None:
    """Where the work runs: a scheduler, or the LocalCluster made for it."""
    parser.add_argument("--scheduler", default=None,
                        help="address of a running Dask scheduler (none: a LocalCluster made "
                             "with the next three options, closed afterwards)")
    parser.add_argument("--n-workers", type=manners.at_least_one, default=2,
                        help="worker processes of the LocalCluster")
    parser.add_argument("--threads-per-worker", type=manners.at_least_one, default=1,
                        help="threads per worker process")
    parser.add_argument("--memory-limit", type=manners.memory_limit, default="auto",
                        help="memory limit per worker: a size (2GiB), a fraction of this "
                             "machine's memory (0.5), auto (an equal share) or 0 (none)")
    parser.add_argument("--inline-vertices", type=manners.at_least_zero, metavar="N",
                        default=argparse.SUPPRESS,
                        help="run a step's whole graph in one task when its source level has "
                             "at most N vertices and at most N objects; 0 runs every graph "
                             "task by task (default: the Dask config key "
                             f"{INLINE_CONFIG} if set, else {DEFAULT_INLINE_VERTICES:,})")


def _storage_option(parser) -> None:
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="fsspec storage option, repeatable (as for pyramid)")


def _add_refresh_parser(sub, common) -> None:
    """``zvdask refresh``: the recorded build arguments, a build's cluster options."""
    rf = sub.add_parser("refresh", parents=[common], formatter_class=_HELP,
                        help="bring a pyramid up to date with its level 0 (the recorded build "
                             "arguments)")
    rf.add_argument("store", help="local path or fsspec URL (s3://bucket/store.zv)")
    rf.add_argument("--dry-run", action="store_true",
                    help="print what would be rebuilt, per level, and write nothing")
    rf.add_argument("--factors", type=parse_factors, default=None,
                    help="only for a pyramid without recorded arguments (or to confirm them): "
                         "COARSEN:SPARSITY per level (none: the recorded ones)")
    rf.add_argument("--chunk-scale", type=parse_chunk_scale, default=None,
                    help="per-level chunk scale, as for pyramid (none: the recorded one)")
    rf.add_argument("--sparsity-strategy", default=None,
                    help="as for pyramid (none: the recorded one)")
    rf.add_argument("--sparsity-seed", type=int, default=None,
                    help="as for pyramid (none: the recorded one)")
    rf.add_argument("--cross-level-depth", type=int, default=None,
                    help="as for pyramid (none: the recorded one)")
    rf.add_argument("--cross-level-storage", choices=["explicit", "implicit", "none"],
                    default=None, help="as for pyramid (none: the recorded one)")
    rf.add_argument("--shard-shape", type=parse_shard_shape, default=None, metavar="N|NxNxN",
                    help="as for pyramid (none: the recorded one)")
    _cluster_options(rf)
    _storage_option(rf)
    rf.add_argument("--no-progress", action="store_true", help="no progress lines")
    rf.set_defaults(func=cmd_refresh)


def _add_pyramid(sub, common) -> None:
    """``zvdask pyramid`` and its options."""
    py = sub.add_parser("pyramid", parents=[common],
                        formatter_class=_HELP,
                        help="build coarser levels of a store on Dask")
    py.add_argument("store", help="local path or fsspec URL (s3://bucket/store.zv)")
    py.add_argument("--factors", required=True, type=parse_factors, default=argparse.SUPPRESS,
                    help="COARSEN:SPARSITY per level, e.g. 2:1,2:2,2:2 (level 1 bins 2x "
                         "coarser, all objects; level 2 again 2x coarser, half the objects)")
    py.add_argument("--chunk-scale", type=parse_chunk_scale, default=None,
                    help="per-level chunk scale, e.g. 1,2,2x2x1 (none: zarr-vectors' default, "
                         "chunks as at level 0)")
    py.add_argument("--sparsity-strategy", default="random",
                    help="which objects a sparsified level keeps: random (the reference's, "
                         "seeded), length (the longest polylines) or a name registered in "
                         "zarr-vectors' selection registry")
    py.add_argument("--sparsity-seed", type=int, default=None,
                    help="seed of the random draw of kept objects (none: a fresh draw each "
                         "run, as in zarr-vectors)")
    py.add_argument("--cross-level-depth", type=int, default=1,
                    help="link levels this many apart (-1: every pair of levels, 0: none); 1 is "
                         "zarr_vectors.build_pyramid's default, so the same arguments give its "
                         "pyramid; the demo uses -1 to show every link family")
    py.add_argument("--cross-level-storage", choices=["explicit", "implicit", "none"],
                    default="explicit",
                    help="how cross-level links are stored (as zarr-vectors' argument)")
    _cluster_options(py)
    py.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                    help="fsspec storage option, repeatable; dotted keys nest "
                         "(client_kwargs.endpoint_url=...), values are JSON when they parse")
    py.add_argument("--dry-run", action="store_true",
                    help="print the plan (levels, tasks, memory bill) and exit")
    py.add_argument("--resume", action="store_true",
                    help="finish a build that stopped: keep the levels it finished, rebuild "
                         "the rest")
    py.add_argument("--overwrite", action="store_true",
                    help="replace existing coarse levels (level 0 is never touched)")
    py.add_argument("--no-progress", action="store_true",
                    help="no progress bars (off a terminal they are plain lines)")
    py.add_argument("--vertex-attributes", action="store_true",
                    help="also write every per-vertex attribute at each coarse level, "
                         "aggregated per metavertex (mean for floats, mode for integers)")
    py.add_argument("--aggregate", type=parse_aggregation, default=None, metavar="NAME=MODE,...",
                    help="aggregation per attribute with --vertex-attributes, e.g. "
                         "fa=mean,label=mode (modes: mean, sum, mode, count, min, max)")
    py.add_argument("--shard-shape", type=parse_shard_shape, default=None, metavar="N|NxNxN",
                    help="store every array the build writes with Zarr v3 sharding, this many "
                         "chunks per storage object (one number for every axis, or one per "
                         "axis): far fewer objects and requests on S3")
    py.set_defaults(func=cmd_pyramid)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zvdask", description=__doc__)
    p.add_argument("--version", action="version", version=__version__)
    p.add_argument("-v", "--verbose", action="store_true",
                   help="on failure, print the traceback too")
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # ``--verbose`` after the command too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="on failure, print the traceback too")

    _add_pyramid(sub, common)
    _add_refresh_parser(sub, common)

    de = sub.add_parser("demo", parents=[common], formatter_class=_HELP,
                        help="write a sample streamline store and build its pyramid")
    de.add_argument("dir", nargs="?", default="zvdask-demo",
                    help="folder for demo.zv (replaced if it exists)")
    de.add_argument("--lines", type=manners.at_least_one, default=2000,
                    help="number of streamlines")
    de.add_argument("--points", type=manners.at_least_one, default=100,
                    help="points per streamline")
    de.add_argument("--seed", type=int, default=0, help="seed of the sample's random walks")
    de.set_defaults(func=cmd_demo)

    sa = sub.add_parser("sample", parents=[common], formatter_class=_HELP,
                        help="write a small level-0 sample store (zarr-vectors writers)")
    sa.add_argument("url", help="local path or fsspec URL (s3://bucket/demo.zv)")
    sa.add_argument("--kind", choices=["streamlines", "points"], default="streamlines",
                    help="what the sample holds")
    sa.add_argument("--objects", type=int, default=50, help="number of objects")
    sa.add_argument("--vertices", type=int, default=5000, help="total number of vertices")
    sa.add_argument("--seed", type=int, default=0, help="seed of the sample's positions")
    sa.add_argument("--overwrite", action="store_true", help="replace an existing store")
    _storage_option(sa)
    sa.set_defaults(func=cmd_sample)

    info = sub.add_parser("info", parents=[common], formatter_class=_HELP,
                          help="list levels and their metadata")
    info.add_argument("store", help="local path or fsspec URL")
    _storage_option(info)
    info.set_defaults(func=cmd_info)

    va = sub.add_parser("validate", parents=[common], formatter_class=_HELP,
                        help="run zarr-vectors' validator")
    va.add_argument("store", help="local path or fsspec URL")
    va.add_argument("--level", type=int, choices=range(1, 6), default=3, metavar="1..5",
                    help="zarr-vectors' conformance level to check up to (its validator's "
                         "level argument), not a pyramid level")
    _storage_option(va)
    va.set_defaults(func=cmd_validate)
    return p


#: Failures with a message meant for the user: printed as one line, exit 2.
_EXPECTED = (ValueError, FileNotFoundError, RuntimeError, OSError)


def _one_line(exc: BaseException) -> str:
    """The first line of the message (a Dask task's error can carry
    more), with the type named when it is not one of the expected ones."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    if len(lines) > 1:
        text += " [...]"
    if not isinstance(exc, _EXPECTED) or not lines:
        text = f"{type(exc).__name__}: {text}" if lines else text
    return text


def _inline_limit(args):
    """``--inline-vertices`` as the Dask config the planner reads."""
    import dask
    limit = getattr(args, "inline_vertices", None)
    return contextlib.nullcontext() if limit is None else dask.config.set({INLINE_CONFIG: limit})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(manners.join_dash_values(argv))
    verbose = bool(getattr(args, "verbose", False))
    try:
        with manners.signals_stop_the_build(), _inline_limit(args):
            return args.func(args)
    except KeyboardInterrupt as exc:
        import signal
        name = str(exc) or "SIGINT"
        done = ("; its tasks were cancelled and its build lock released (--resume finishes "
                "it)" if args.command == "pyramid" else "")
        print(f"zvdask: interrupted ({name}){done}", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT)
    except Exception as exc:  # noqa: BLE001 - one readable line, see --verbose
        if verbose:
            import traceback
            traceback.print_exc()
        print(f"zvdask: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _EXPECTED) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
