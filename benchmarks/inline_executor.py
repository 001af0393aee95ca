#!/usr/bin/env python
"""Small graphs in one task against task by task, at several sizes.

For each level-0 size (bench_pyramid.py's random-walk streamlines), a copy
is built ``--reps`` times each way on one LocalCluster (``--workers``
processes of ``--threads`` threads; 2 of 1 by default), alternating: with
``zarr-vectors-dask.inline-vertices`` above the size (every step's graph and the composition in one task) and at
0 (every graph task by task).  The table gives the median wall time and
CPU-seconds (driver + scheduler + workers, the processes' own counters) of
each, and their ratios: what the limit's default (planning.plan.
DEFAULT_INLINE_VERTICES) is chosen from.

    python benchmarks/inline_executor.py --vertices 3000,150000,800000,3000000 --root /dev/shm/zvinline
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pyramid import (CROSS_LEVEL_DEPTH, CROSS_LEVEL_STORAGE, FACTORS, SEED,  # noqa: E402
                           child_write, cluster_cpu_seconds, md_table)


def one_build(client, level0: Path, work: Path, inline: bool) -> tuple[float, float]:
    import dask

    import zarr_vectors_dask as zd
    from zarr_vectors_dask.planning.plan import INLINE_CONFIG
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(level0, work)
    cpu0 = sum(cluster_cpu_seconds(client).values())
    t0 = time.perf_counter()
    with dask.config.set({INLINE_CONFIG: 10 ** 12 if inline else 0}):
        zd.build_pyramid(str(work), factors=FACTORS, sparsity_seed=SEED,
                         cross_level_depth=CROSS_LEVEL_DEPTH,
                         cross_level_storage=CROSS_LEVEL_STORAGE, client=client)
    wall = time.perf_counter() - t0
    return wall, sum(cluster_cpu_seconds(client).values()) - cpu0


def measure(client, root: Path, n: int, reps: int) -> dict:
    level0 = root / f"level0-{n}.zv"
    child_write(str(level0), n, SEED, 2.0)
    got: dict = {True: [], False: []}
    one_build(client, level0, root / "warm.zv", False)  # imports and first graphs, not timed
    for _ in range(reps):
        for inline in (False, True):
            got[inline].append(one_build(client, level0, root / "work.zv", inline))
    shutil.rmtree(level0)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in got.items()}
    return {"vertices": n, "tasks": med[False], "inline": med[True]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", default="3000,150000,800000,3000000",
                    help="comma-separated level-0 sizes (lines of 100 points)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", default="/dev/shm/zvinline", help="scratch directory")
    ap.add_argument("--workers", type=int, default=2, help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rows = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=args.threads, processes=True,
                      dashboard_address=None, silence_logs=40) as lc, Client(lc) as client:
        for n in (int(float(x)) for x in args.vertices.split(",") if x.strip()):
            r = measure(client, root, n, args.reps)
            (tw, tc), (iw, ic) = r["tasks"], r["inline"]
            rows.append((f"{n:,}", f"{tw:.2f}", f"{iw:.2f}", f"{iw / tw:.2f}", f"{tc:.2f}",
                         f"{ic:.2f}", f"{ic / tc:.2f}"))
            print(*rows[-1], flush=True)
    shutil.rmtree(root, ignore_errors=True)
    cmd = "python benchmarks/inline_executor.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(f"\n`{cmd}` -- {args.workers} worker process(es) of {args.threads} thread(s), "
          f"factors {FACTORS}, explicit links, depth "
          f"{CROSS_LEVEL_DEPTH}; medians of {args.reps}\n")
    print(md_table(("level-0 vertices", "task by task s", "one task s", "wall ratio",
                    "task by task CPU-s", "one task CPU-s", "CPU ratio"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
