#!/usr/bin/env python
"""Build a zarr-vectors pyramid on a SLURM cluster with dask-jobqueue.

The script runs the Dask scheduler in *this* process (typically a small
SLURM job, see ``pyramid.sbatch``, or a login node where that is allowed),
submits ``--jobs`` worker jobs through :class:`dask_jobqueue.SLURMCluster`,
and calls :func:`zarr_vectors_dask.build_pyramid` with a client on that
cluster.  Workers must see the store: a shared filesystem path (Lustre,
GPFS, NFS) or object storage (``s3://...`` with ``--storage-option``).

Requires the optional extra ``dask-jobqueue`` (``pip install dask-jobqueue``)
in the same environment on the submit host and on the compute nodes.

Example::

    python deploy/slurm/pyramid_slurm.py /scratch/$USER/cells.zv \\
        --factors 2:1,2:2,2:2 --jobs 4 --cores 8 --processes 4 \\
        --memory 32GiB --walltime 02:00:00 --queue compute --account myproj
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence


def parse_factors(text: str) -> list[tuple[float, float]]:
    """``"2:1,2:2"`` -> ``[(2.0, 1.0), (2.0, 2.0)]`` (coarsen:sparsity per level)."""
    out: list[tuple[float, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"factor {item!r} is not COARSEN:SPARSITY")
        try:
            out.append((float(parts[0]), float(parts[1])))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"factor {item!r}: {e}") from None
    if not out:
        raise argparse.ArgumentTypeError("no factors given")
    return out


def parse_storage_options(items: Sequence[str]) -> dict[str, Any]:
    """``["key=a", "client_kwargs.endpoint_url=http://h:1"]`` -> nested dict.

    Same convention as ``zvdask --storage-option``: dotted keys nest, values
    are JSON when they parse as JSON, else strings.
    """
    opts: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"storage option {item!r} is not KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        *parents, leaf = key.split(".")
        node = opts
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise argparse.ArgumentTypeError(f"storage option {key!r} conflicts with an earlier value")
        node[leaf] = value
    return opts


def parse_shard_shape(text: str):
    """``4`` or ``4x4x2`` (chunks per shard), parsed as ``zvdask --shard-shape``."""
    from zarr_vectors_dask.cli import parse_shard_shape as parse
    return parse(text)


def parse_aggregation(text: str) -> dict[str, str]:
    """``fa=mean,label=mode``, parsed as ``zvdask --aggregate``."""
    from zarr_vectors_dask.cli import parse_aggregation as parse
    return parse(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", help="store path or URL (shared filesystem or object storage)")
    p.add_argument("--factors", required=True, type=parse_factors,
                   help="per level COARSEN:SPARSITY, comma separated, e.g. 2:1,2:2,2:2")
    p.add_argument("--sparsity-strategy", default="random",
                   help="which objects a sparsified level keeps: random (zarr-vectors'), "
                        "length (the longest polylines) or a name in zarr-vectors' registry")
    p.add_argument("--sparsity-seed", type=int, default=None)
    p.add_argument("--cross-level-depth", type=int, default=1)
    p.add_argument("--cross-level-storage", choices=["explicit", "implicit", "none"], default="explicit")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--vertex-attributes", action="store_true",
                   help="also write every per-vertex attribute at each coarse level")
    p.add_argument("--aggregate", type=parse_aggregation, default=None, metavar="NAME=MODE,...",
                   help="aggregation per attribute with --vertex-attributes, e.g. fa=mean")
    p.add_argument("--shard-shape", type=parse_shard_shape, default=None, metavar="N|NxNxN",
                   help="Zarr v3 sharding of every array the build writes, chunks per shard")
    g = p.add_argument_group("SLURM / dask-jobqueue")
    g.add_argument("--jobs", type=int, default=2, help="number of SLURM worker jobs")
    g.add_argument("--cores", type=int, default=4, help="cores per job")
    g.add_argument("--processes", type=int, default=None,
                   help="worker processes per job (default: one per core, single-threaded)")
    g.add_argument("--memory", default="16GiB", help="memory per job")
    g.add_argument("--walltime", default="01:00:00")
    g.add_argument("--queue", default=None, help="partition (#SBATCH -p)")
    g.add_argument("--account", default=None, help="account (#SBATCH -A)")
    g.add_argument("--job-extra", action="append", default=[], metavar="DIRECTIVE",
                   help="extra #SBATCH directive, e.g. --job-extra=--constraint=haswell")
    g.add_argument("--prologue", action="append", default=[], metavar="LINE",
                   help="shell line run before the worker starts, e.g. 'module load python'")
    g.add_argument("--local-directory", default=os.environ.get("TMPDIR", "/tmp"),
                   help="node-local scratch for worker spill files")
    g.add_argument("--log-directory", default="dask-logs")
    g.add_argument("--interface", default=None, help="network interface, e.g. ib0")
    g.add_argument("--wait-timeout", type=float, default=1800.0,
                   help="seconds to wait for the first worker job to start")
    g.add_argument("--print-job-script", action="store_true",
                   help="print the generated worker job script and exit")
    return p


def make_cluster(args: argparse.Namespace):
    """A :class:`dask_jobqueue.SLURMCluster` (imported lazily: optional extra)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("dask-jobqueue is required: pip install dask-jobqueue") from e

    processes = args.processes or args.cores
    kwargs: dict[str, Any] = dict(
        cores=args.cores,
        processes=processes,
        memory=args.memory,
        walltime=args.walltime,
        job_extra_directives=list(args.job_extra),
        job_script_prologue=list(args.prologue),
        local_directory=args.local_directory,
        log_directory=args.log_directory,
        python=sys.executable,
        job_name="zvdask-worker",
    )
    if args.queue:
        kwargs["queue"] = args.queue
    if args.account:
        kwargs["account"] = args.account
    if args.interface:
        kwargs["interface"] = args.interface
    return SLURMCluster(**kwargs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from distributed import Client

    import zarr_vectors_dask

    if args.aggregate and not args.vertex_attributes:
        raise SystemExit("--aggregate needs --vertex-attributes")
    if args.sparsity_strategy not in ("random", "length"):
        # Other names are registered by zarr-vectors-tools on import (as zvdask does).
        import importlib.util
        if importlib.util.find_spec("zarr_vectors_tools") is not None:
            import zarr_vectors_tools  # noqa: F401
    cluster = make_cluster(args)
    if args.print_job_script:
        print(cluster.job_script())
        cluster.close()
        return {}
    try:
        cluster.scale(jobs=args.jobs)
        with Client(cluster) as client:
            print(f"scheduler {cluster.scheduler_address}, dashboard {cluster.dashboard_link}", flush=True)
            client.wait_for_workers(1, timeout=args.wait_timeout)
            return zarr_vectors_dask.build_pyramid(
                args.store,
                factors=args.factors,
                sparsity_strategy=args.sparsity_strategy,
                sparsity_seed=args.sparsity_seed,
                cross_level_depth=args.cross_level_depth,
                cross_level_storage=args.cross_level_storage,
                client=client,
                storage_options=parse_storage_options(args.storage_option) or None,
                resume=args.resume,
                overwrite=args.overwrite,
                vertex_attributes="aggregate" if args.vertex_attributes else None,
                attribute_aggregation=args.aggregate,
                shard_shape=args.shard_shape,
            )
    finally:
        cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = run(args)
    if summary:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
