#!/usr/bin/env python
"""Profile one project run of the standard benchmark case.

Writes level 0 (same data as bench_pyramid.py), starts a LocalCluster,
attaches ``py-spy record --format raw`` to the driver and every worker while
``build_pyramid`` runs, and prints the hottest functions (inclusive and self
samples) per process.  Optionally also writes a ``distributed``
performance_report HTML.

    python benchmarks/profile_pyramid.py --vertices 1000000 --root /dev/shm/zvprof \
        --py-spy /path/to/py-spy --out /tmp/zvprof
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pyramid as bp  # noqa: E402


def summarize(raw: Path, top: int, focus: str | None) -> str:
    incl, self_ = collections.Counter(), collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        frames = stack.split(";")
        if focus and not any(focus in f for f in frames):
            continue
        total += n
        for f in set(frames):
            incl[f] += n
        self_[frames[-1]] += n
    out = [f"{raw.name}: {total} samples"]
    out.append("  inclusive:")
    for f, n in incl.most_common(top):
        out.append(f"    {100 * n / max(total, 1):5.1f}%  {f}")
    out.append("  self:")
    for f, n in self_.most_common(top):
        out.append(f"    {100 * n / max(total, 1):5.1f}%  {f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vertices", type=int, default=1_000_000)
    ap.add_argument("--root", default="/dev/shm/zvprof")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--py-spy", default=shutil.which("py-spy"))
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--out", default="/tmp/zvprof")
    ap.add_argument("--html", default=None, help="also write a performance_report here")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()

    import warnings
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster, performance_report
    import zarr_vectors_dask as zvd

    root = Path(args.root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    store = root / "project.zv"
    bp.run_child("write", store, args.vertices, 0, 2.0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0" if args.html else None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(args.workers)
        client.run(lambda: __import__("zarr_vectors_dask"))
        pids = {"driver": os.getpid()}
        for i, pid in enumerate(client.run(os.getpid).values()):
            pids[f"worker{i}"] = pid
        spies = {}
        if args.py_spy:
            for name, pid in pids.items():
                spies[name] = subprocess.Popen(
                    [args.py_spy, "record", "-p", str(pid), "-r", str(args.rate), "--format", "raw",
                     "-o", str(out / f"{name}.txt"), "--nonblocking"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        reports: list = []
        t0 = time.perf_counter()
        if args.html:
            with performance_report(filename=args.html):
                zvd.build_pyramid(str(store), factors=bp.FACTORS, sparsity_seed=0,
                                  cross_level_depth=-1, cross_level_storage="explicit",
                                  client=client, _reports=reports)
        else:
            zvd.build_pyramid(str(store), factors=bp.FACTORS, sparsity_seed=0,
                              cross_level_depth=-1, cross_level_storage="explicit",
                              client=client, _reports=reports)
        seconds = time.perf_counter() - t0
        for p in spies.values():
            p.send_signal(signal.SIGINT)
        for p in spies.values():
            p.wait(timeout=60)
    print(f"build_pyramid: {seconds:.2f}s")
    for r in reports:
        if isinstance(r, dict):
            print("  compose:", {k: round(v, 2) for k, v in r.items()})
        else:
            print(f"  level {r.target_level}: {r.seconds:.2f}s tasks={r.tasks} "
                  + str({k: round(v, 2) for k, v in r.stage_seconds.items()}))
    for name in pids:
        f = out / f"{name}.txt"
        if f.exists():
            print(summarize(f, args.top, None))
    shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
