#!/usr/bin/env python
"""Driver memory and time of a refresh's planning after atomic edits, on a
store with many objects (the step that tells the changed object rows:
``step.region.changed_objects``, reached by ``refresh_pyramid(dry_run=True)``).

Writes level 0 (short random-walk lines: many objects for few vertices) in
bounded memory with ``scale_run.py``'s writer, builds the pyramid, adds a
few objects in one ``EditSession(atomic=True)`` (rows appended, as atomic
edits append them), then runs the dry run in a fresh interpreter under
``tracemalloc`` and prints its peak of Python-allocated memory, its RSS and
its wall time.  Run it with ``PYTHONPATH=<tree>`` to compare two trees on the
same store (``--keep`` keeps it; a second run reuses it).

    python benchmarks/refresh_driver_memory.py --objects 1000000 --root /dev/shm/zvdrv
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FACTORS = [(2, 1), (2, 2)]
KW = dict(factors=FACTORS, sparsity_seed=0, cross_level_depth=-1, cross_level_storage="explicit")


def prepare(path: str, objects: int, points: int, edits: int) -> None:
    import warnings

    import numpy as np
    import scale_run as sr
    import zarr_vectors_dask as zd
    from zarr_vectors.core.store import open_store
    from zarr_vectors.ops.edit import EditSession
    sr.run_child("write", path, objects * points, 0, 2.0, points, 125.0, 0.0)
    zd.build_pyramid(path, **KW)
    root = open_store(path, mode="r+")
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with EditSession(root, atomic=True) as ed:  # rows appended, as atomic edits do
            for _ in range(edits):
                start = rng.uniform(100.0, 900.0, 3)
                ed.add_object(level=0, vertices=(start + np.cumsum(
                    rng.normal(0, 2.0, (points, 3)), axis=0)).astype(np.float32))


def measure(path: str) -> dict:
    import resource
    import tracemalloc

    import zarr_vectors_dask as zd
    tracemalloc.start()
    t0 = time.perf_counter()
    report = zd.refresh_pyramid(path, dry_run=True)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    return {"seconds": seconds, "traced_peak_mib": peak / 2**20,
            "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "region": report.region.kind, "reason": report.region.reason,
            "rows": len((report.region.change or {}).get("rows", ()))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--points", type=int, default=5, help="points per line")
    ap.add_argument("--edits", type=int, default=20, help="objects added")
    ap.add_argument("--root", default="/dev/shm/zvdrv")
    ap.add_argument("--_measure")
    args = ap.parse_args()
    if args._measure:
        print(json.dumps(measure(args._measure)))
        return 0
    path = os.path.join(args.root, f"lines-{args.objects}.zv")
    if not os.path.exists(path):
        os.makedirs(args.root, exist_ok=True)
        prepare(path, args.objects, args.points, args.edits)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_measure", path],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    cmd = (f"python benchmarks/refresh_driver_memory.py --objects {args.objects} "
           f"--root {args.root}")
    print("| objects | region | changed rows | dry run s | traced peak MiB | RSS peak MiB | command |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.objects:,} | {res['region']} | {res['rows']} | {res['seconds']:.2f} | "
          f"{res['traced_peak_mib']:.0f} | {res['rss_peak_mib']:.0f} | `{cmd}` |")
    if res["region"] != "chunks":
        print(f"(region: {res['reason']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
