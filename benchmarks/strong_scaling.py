#!/usr/bin/env python
"""Strong scaling: the same build on 1, 2, 4, ... workers.

Level 0 (random-walk streamlines, the standard case of bench_pyramid.py) is
written once; for each worker count a fresh copy is built on a fresh
LocalCluster of that many single-threaded worker processes, and the table
gives wall time, CPU-seconds (driver + scheduler + workers, from the
processes' own counters), speed-up over the smallest count and parallel
efficiency (speed-up / workers x smallest count).  On a bigger machine pass
more counts; on this 2-core one, 1 and 2.

    python benchmarks/strong_scaling.py --vertices 1000000 --workers 1,2 --root /dev/shm/zvscale
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pyramid import (CROSS_LEVEL_DEPTH, CROSS_LEVEL_STORAGE, FACTORS, SEED,  # noqa: E402
                           child_write, cluster_cpu_seconds, md_table)


def build_on(path: Path, n_workers: int) -> dict:
    """One build on a fresh LocalCluster of ``n_workers`` processes."""
    import zarr_vectors_dask as zd
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as lc, Client(lc) as client:
        client.wait_for_workers(n_workers)
        client.run(lambda: __import__("zarr_vectors_dask"))  # warm imports, not timed
        cpu0 = sum(cluster_cpu_seconds(client).values())
        t0 = time.perf_counter()
        zd.build_pyramid(str(path), factors=FACTORS, sparsity_seed=SEED,
                         cross_level_depth=CROSS_LEVEL_DEPTH,
                         cross_level_storage=CROSS_LEVEL_STORAGE, client=client)
        wall = time.perf_counter() - t0
        cpu = sum(cluster_cpu_seconds(client).values()) - cpu0
    return {"workers": n_workers, "seconds": wall, "cpu": cpu}


def table(rows: list[dict], vertices: int) -> str:
    base = rows[0]

    def line(r):
        speedup = base["seconds"] / r["seconds"]
        return (r["workers"], f"{r['seconds']:.2f}", f"{r['cpu']:.2f}",
                f"{r['cpu'] / (vertices / 1e6):.2f}", f"{speedup:.2f}x",
                f"{speedup * base['workers'] / r['workers']:.0%}")
    return md_table(("workers", "wall s", "CPU-s", "CPU-s / M vertices", "speed-up",
                     "efficiency"), [line(r) for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=float, default=1e6, help="level-0 vertices (lines of 100)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--root", default="/dev/shm/zvscale", help="scratch directory")
    ap.add_argument("--step", type=float, default=2.0, help="random-walk step sigma")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    level0 = root / "level0.zv"
    n = int(args.vertices)
    child_write(str(level0), n, SEED, args.step)
    rows = []
    for w in sorted(int(x) for x in args.workers.split(",") if x.strip()):
        store = root / f"w{w}.zv"
        shutil.copytree(level0, store)
        rows.append(build_on(store, w))
        shutil.rmtree(store)
        print(f"{w} worker(s): {rows[-1]['seconds']:.2f} s, {rows[-1]['cpu']:.2f} CPU-s",
              flush=True)
    cmd = "python benchmarks/strong_scaling.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(f"\n`{cmd}` -- {n:,} vertices, factors {FACTORS}, explicit links, depth "
          f"{CROSS_LEVEL_DEPTH}\n")
    print(table(rows, n))
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
