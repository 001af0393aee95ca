#!/usr/bin/env python
"""One edit, refreshed several times: an A/B of the refresh code.

``bench_refresh.py`` times each case once, next to a rebuild, and a single
refresh moves by +-15 % on a shared machine.  This script builds the
standard pyramid once under ``--root`` (kept for the next run: pass the
same root to compare two trees on the same bytes), then ``--reps`` times
copies it, makes the same clustered vertex edit and refreshes it on one
LocalCluster.  Per rep: wall time, CPU seconds (driver, scheduler,
workers), and how much of the wall time the driver spent between the
graphs it handed to the scheduler.  Run the old tree with
``PYTHONPATH=<its checkout>`` from outside the repository, alternately.

    PYTHONPATH=$PWD python benchmarks/refresh_repeat.py --vertices 1e7 --fraction 0.01 --root /dev/shm/zvrep
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_refresh import KW, edit_vertices, timed, write_level0  # noqa: E402


def _count_graph_time(spent: list):
    """Wrap ``runtime.execute`` (and the modules that imported it) so the
    time inside each graph's execution is added to ``spent``."""
    import zarr_vectors_dask.compose.run as crun
    import zarr_vectors_dask.runtime as rt
    import zarr_vectors_dask.step.run as srun
    inner = rt.execute

    def execute(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t)
    for mod in (rt, srun, crun):
        if getattr(mod, "execute", None) is inner:
            mod.execute = execute


def built_pyramid(client, root: Path, vertices: int) -> Path:
    """The standard pyramid of ``vertices`` under ``root``, built once and
    kept (rebuilt when missing or no longer current)."""
    import zarr_vectors_dask as zd
    built = root / f"built-{vertices}.zv"
    if not (built / "zarr.json").exists() or zd.pyramid_status(str(built)).state != "current":
        shutil.rmtree(built, ignore_errors=True)
        write_level0(built, vertices, 0)
        zd.build_pyramid(str(built), client=client, **KW)
    return built


def edited_copy(built: Path, work: Path, fraction: float, clustered: bool = True) -> None:
    """``work``: a fresh copy of ``built`` with the same vertex edit each time."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(built, work)
    edit_vertices(work, fraction, clustered, np.random.default_rng(0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=float, default=1e7, help="level-0 vertices (lines of 100)")
    ap.add_argument("--fraction", type=float, default=0.01, help="share of level-0 chunks edited")
    ap.add_argument("--scattered", action="store_true", help="edit chunks anywhere, not clustered")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", default="/dev/shm/zvrep",
                    help="scratch directory (the built pyramid is kept)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    import zarr_vectors_dask as zd
    from distributed import Client, LocalCluster
    root = Path(args.root)
    spent: list = []
    _count_graph_time(spent)
    rows = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as lc, Client(lc) as client:
        built = built_pyramid(client, root, int(args.vertices))
        work = root / "work.zv"
        for rep in range(args.reps):
            edited_copy(built, work, args.fraction, not args.scattered)
            client.run(lambda: None)  # workers awake before the clock starts
            spent.clear()
            wall, cpu = timed(client, lambda: zd.refresh_pyramid(str(work), client=client))
            rows.append((wall, cpu, sum(spent)))
        shutil.rmtree(work, ignore_errors=True)
    cmd = "python benchmarks/refresh_repeat.py " + " ".join(argv if argv is not None
                                                            else sys.argv[1:])
    print(f"`{cmd}` ({zd.__file__})\n")
    print("| rep | refresh wall s | CPU-s | in graphs s | driver s |")
    print("|---|---|---|---|---|")
    for i, (wall, cpu, graphs) in enumerate(rows):
        print(f"| {i} | {wall:.2f} | {cpu:.2f} | {graphs:.2f} | {wall - graphs:.2f} |")
    med = [statistics.median(r[i] for r in rows) for i in range(3)]
    print(f"| median | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | {med[0] - med[2]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
