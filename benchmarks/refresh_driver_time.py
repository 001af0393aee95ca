#!/usr/bin/env python
"""Where a refresh's driver spends its wall time, function by function.

``refresh_repeat.py`` says how much of a refresh is the driver's (about a
third at 10M); this names it.  The standard pyramid under ``--root`` (built
once, kept, shared with ``refresh_repeat.py``) is copied, edited (a
clustered vertex edit of ``--fraction`` of the level-0 chunks) and
refreshed ``--reps`` times on one LocalCluster, after one warm-up refresh.
The driver functions below are wrapped with a wall clock where their
callers look them up; the table gives milliseconds a refresh (mean over
the reps) and calls a refresh.  ``execute`` is the time inside the
graphs (the steps' and the composition's); everything else is the
driver's own work between them.

    PYTHONPATH=$PWD python benchmarks/refresh_driver_time.py --vertices 1e7 --fraction 0.01 --root /dev/shm/zvrep
"""

from __future__ import annotations

import argparse
import collections
import importlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refresh_repeat import built_pyramid, edited_copy  # noqa: E402

#: (module, attribute path) of each function timed, where its caller looks it up.
TIMED = [
    ("zarr_vectors_dask.refresh", "status_of"), ("zarr_vectors_dask.refresh", "region_of"),
    ("zarr_vectors_dask.api", "cur.begin"), ("zarr_vectors_dask.api", "cur.finish"),
    ("zarr_vectors_dask.api", "make_plan"), ("zarr_vectors_dask.api", "compose_links"),
    ("zarr_vectors_dask.api", "recompose_region"), ("zarr_vectors_dask.api", "discard_recomposed"),
    ("zarr_vectors_dask.api", "cm.commit_cross_level"),
    ("zarr_vectors_dask.api", "sweep_temporaries"), ("zarr_vectors_dask.api", "discard_unwritten"),
    ("zarr_vectors_dask.step.run", "read_source_level"),
    ("zarr_vectors_dask.step.run", "plan_step"), ("zarr_vectors_dask.step.run", "step_cells"),
    ("zarr_vectors_dask.step.run", "discard_stale"),
    ("zarr_vectors_dask.step.run", "region_documents"), ("zarr_vectors_dask.step.run", "_publish"),
    ("zarr_vectors_dask.step.region", "RegionPlans.region"),
]
#: ``runtime.execute`` as the steps and the composition call it (one row).
EXECUTE = [("zarr_vectors_dask.step.run", "execute"), ("zarr_vectors_dask.compose.run", "execute")]


def _wrap(spent, calls, module: str, path: str, label: str) -> None:
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t
            calls[label] += 1
    setattr(owner, name, timed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=float, default=1e7, help="level-0 vertices (lines of 100)")
    ap.add_argument("--fraction", type=float, default=0.01, help="share of level-0 chunks edited")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--root", default="/dev/shm/zvrep",
                    help="scratch directory (the built pyramid is kept)")
    args = ap.parse_args(argv)
    import zarr_vectors_dask as zd
    from distributed import Client, LocalCluster
    spent: dict = collections.defaultdict(float)
    calls: collections.Counter = collections.Counter()
    for module, path in TIMED:
        _wrap(spent, calls, module, path, path)
    for module, path in EXECUTE:
        _wrap(spent, calls, module, path, "execute (graphs)")
    root = Path(args.root)
    walls = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as lc, Client(lc) as client:
        built = built_pyramid(client, root, int(args.vertices))
        work = root / "driver-time.zv"
        for rep in range(args.reps + 1):
            edited_copy(built, work, args.fraction)
            client.run(lambda: None)
            if rep == 0:  # warm-up: imports, first graphs
                zd.refresh_pyramid(str(work), client=client)
                spent.clear()
                calls.clear()
                continue
            t = time.perf_counter()
            zd.refresh_pyramid(str(work), client=client)
            walls.append(time.perf_counter() - t)
        shutil.rmtree(work, ignore_errors=True)
    n = len(walls)
    cmd = "python benchmarks/refresh_driver_time.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    print(f"`{cmd}` ({zd.__file__}); refresh wall s: "
          f"{', '.join(f'{w:.2f}' for w in walls)}\n")
    print("| function | ms a refresh | calls a refresh |")
    print("|---|---|---|")
    for label, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"| `{label}` | {1000 * s / n:.0f} | {calls[label] / n:g} |")
    graphs = spent.get("execute (graphs)", 0.0) / n
    print(f"| (driver, outside the graphs) | {1000 * (sum(walls) / n - graphs):.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
