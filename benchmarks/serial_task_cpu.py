#!/usr/bin/env python
"""CPU seconds per task function of one serial, in-process build.

Writes level 0 of the standard case (bench_pyramid.py's data) once under
``--root``, copies it, and builds the pyramid with every graph run by
``dask.get`` in this thread (a stand-in client, no cluster), timing each
task call with ``time.thread_time``.  No scheduler, comms or second
worker: an A/B of the task code alone, steadier than a cluster run on a
shared machine (run the old tree with ``PYTHONPATH=<its checkout>``).

    PYTHONPATH=$PWD python benchmarks/serial_task_cpu.py --vertices 3000000 --root /dev/shm/zvserial
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_pyramid as bp  # noqa: E402

CPU: collections.Counter = collections.Counter()


def timed(fn):
    def call(*args):
        c0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            CPU[fn.__name__] += time.thread_time() - c0
    return call


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        pass

    def release(self):
        pass


class SerialClient:
    """What the build asks of a client, with every graph run here by dask.get."""

    def get(self, dsk, output, sync=False):
        import dask
        dsk = {k: (timed(v[0]), *v[1:]) if isinstance(v, tuple) and v and callable(v[0]) else v
               for k, v in dsk.items()}
        return _Done(dask.get(dsk, output))

    def scheduler_info(self):
        return {"workers": {"a": {}, "b": {}}}  # plan for the benchmark's 2 workers

    def run(self, fn, *args, **kwargs):
        return {"here": os.getpid()} if fn is os.getpid else {}

    def register_plugin(self, *args, **kwargs):
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vertices", type=int, default=1_000_000)
    ap.add_argument("--root", default="/dev/shm/zvserial")
    args = ap.parse_args()
    import zarr_vectors_dask as zvd
    print(f"package: {zvd.__file__}")
    src = os.path.join(args.root, f"level0-{args.vertices}.zv")
    if not os.path.exists(src):
        os.makedirs(args.root, exist_ok=True)
        bp.child_write(src, args.vertices, 0, 2.0)
    work = os.path.join(args.root, "work.zv")
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(src, work)
    c0 = time.process_time()
    zvd.build_pyramid(work, factors=bp.FACTORS, sparsity_seed=bp.SEED,
                      cross_level_depth=bp.CROSS_LEVEL_DEPTH,
                      cross_level_storage=bp.CROSS_LEVEL_STORAGE, client=SerialClient())
    print(f"build CPU-s {time.process_time() - c0:.2f}")
    for name, s in CPU.most_common():
        print(f"  {name:24s} {s:.2f}")
    print(f"  {'(all tasks)':24s} {sum(CPU.values()):.2f}")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
