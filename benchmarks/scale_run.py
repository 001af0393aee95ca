#!/usr/bin/env python
"""Out-of-core scale run: the standard streamline case at 1M .. 100M vertices,
project only, on a LocalCluster of 2 workers x 1 thread with a 2 GiB memory
limit each.

Per size: level 0 is written in bounded memory (``scale_level0.py``, the
store ``write_polylines`` would write), then ``zarr_vectors_dask.build_pyramid``
runs in a fresh process while a sampler thread records the RSS of every
worker process (with its children) every 0.5 s and a scheduler plugin counts
finished tasks and their result sizes per task prefix, then zarr-vectors'
validator checks the pyramid in a third process.  Prints a table; ``--markdown``
writes it.  See benchmarks/README.md ("Scale run").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

FACTORS = [(2, 1), (2, 2), (2, 2)]
SEED = 0
HERE = Path(__file__).resolve().parent


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


sys.path.insert(0, str(HERE))
import bench_pyramid as bp  # noqa: E402  (shared measurement helpers)


# ------------------------------------------------------------------ children
def child_write(path: str, vertices: int, seed: int, step: float,
                points: int | None = None, chunk: float | None = None,
                corner_fraction: float = 0.0) -> dict:
    """Level 0 of ``vertices // points`` random-walk lines of ``points``
    vertices (default 100) on a grid of ``chunk``-edged chunks (default
    125); ``corner_fraction`` of the lines start in one corner chunk."""
    sys.path.insert(0, str(HERE))
    from scale_level0 import (
        CHUNK_SHAPE, POINTS_PER_LINE, random_walk_batches, write_polylines_partitioned,
    )

    points = points or POINTS_PER_LINE
    chunk_shape = (float(chunk),) * 3 if chunk else CHUNK_SHAPE
    n_lines = max(1, vertices // points)
    t0, c0 = time.perf_counter(), _cpu_self()
    out = write_polylines_partitioned(
        path, random_walk_batches(n_lines, seed=seed, step=step, points=points,
                                  corner_fraction=corner_fraction,
                                  corner_size=chunk_shape[0]),
        chunk_shape=chunk_shape, spill_dir=str(Path(path).parent))
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu_self() - c0,
            "rss_mib": _maxrss_mib(), **out}


class _TaskCounter:
    """Scheduler plugin (in-process scheduler): finished tasks and result
    sizes per task prefix."""

    name = "zvdask-scale-counter"

    def __init__(self):
        self.count: dict[str, int] = {}
        self.nbytes_max: dict[str, int] = {}
        self.nbytes_sum: dict[str, int] = {}
        self.erred = 0

    def _scheduler_plugin(self, scheduler):
        from distributed.diagnostics.plugin import SchedulerPlugin
        counter = self

        class Plugin(SchedulerPlugin):
            name = counter.name

            def __init__(self):
                self.scheduler = scheduler

            def transition(self, key, start, finish, *args, **kwargs):
                if finish == "erred":
                    counter.erred += 1
                if finish != "memory" or self.scheduler is None:
                    return
                ts = self.scheduler.tasks.get(key)
                prefix = ts.prefix.name if ts is not None else str(key)
                nb = int(ts.nbytes) if ts is not None and ts.nbytes is not None else 0
                counter.count[prefix] = counter.count.get(prefix, 0) + 1
                counter.nbytes_sum[prefix] = counter.nbytes_sum.get(prefix, 0) + max(nb, 0)
                counter.nbytes_max[prefix] = max(counter.nbytes_max.get(prefix, 0), nb)

        return Plugin()


class _Sampler(threading.Thread):
    """RSS of every descendant of this process, grouped per worker
    (worker process + its children), every ``interval`` seconds; plus the
    scheduler's view of spilled bytes."""

    def __init__(self, scheduler, interval: float = 0.5):
        super().__init__(daemon=True)
        import psutil
        self.psutil = psutil
        self.me = psutil.Process()
        self.scheduler = scheduler
        self.interval = interval
        self.stop = threading.Event()
        self.worker_pids: set[int] = set()
        self.worker_cpu: dict[int, float] = {}   # last seen user+sys, per worker pid
        self.max_worker_rss = 0          # largest single worker tree
        self.max_all_children_rss = 0    # all nannies + workers together
        self.max_driver_rss = 0
        self.max_spilled_disk = 0        # summed over workers, at one instant
        self.max_managed = 0
        self.samples = 0

    def run(self):
        ps = self.psutil
        while not self.stop.is_set():
            try:
                self.max_driver_rss = max(self.max_driver_rss, self.me.memory_info().rss)
                total = 0
                for child in self.me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except ps.Error:
                        pass
                # LocalCluster's nannies live in this process; each spawns
                # its worker as a process the scheduler knows the pid of.
                for ws in list(self.scheduler.workers.values()):
                    try:
                        proc = ps.Process(ws.pid)
                        ct = proc.cpu_times()
                        self.worker_cpu[ws.pid] = (ct.user + ct.system + ct.children_user
                                                   + ct.children_system)
                        tree = proc.memory_info().rss
                        for g in proc.children(recursive=True):
                            try:
                                tree += g.memory_info().rss
                            except ps.Error:
                                pass
                    except (ps.Error, TypeError, ValueError):
                        continue
                    self.worker_pids.add(ws.pid)
                    self.max_worker_rss = max(self.max_worker_rss, tree)
                self.max_all_children_rss = max(self.max_all_children_rss, total)
                spilled = managed = 0
                for ws in list(self.scheduler.workers.values()):
                    m = ws.metrics or {}
                    spilled += int((m.get("spilled_bytes") or {}).get("disk", 0))
                    managed += int(m.get("managed_bytes", 0))
                self.max_spilled_disk = max(self.max_spilled_disk, spilled)
                self.max_managed = max(self.max_managed, managed)
                self.samples += 1
            except Exception:
                pass
            self.stop.wait(self.interval)


def child_build(path: str, n_workers: int, memory_limit: str, shard_shape: str = "") -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster
    import zarr_vectors_dask as zvd
    from zarr_vectors_dask.cli import parse_shard_shape  # the CLI's spelling: 4 or 4x4x2

    progress_log: list = []
    t_start = [0.0]
    live = Path(str(path) + ".progress")   # readable while a long build runs
    sampler_ref: list = []

    def progress(name, futures):
        progress_log.append((round(time.perf_counter() - t_start[0], 2), name, len(futures)))
        smp = sampler_ref[0] if sampler_ref else None
        with open(live, "a") as fh:
            fh.write(f"{time.strftime('%H:%M:%S')} +{progress_log[-1][0]:.1f}s {name} "
                     f"x{len(futures)}"
                     + (f" | max worker RSS {smp.max_worker_rss / 2**20:.0f} MiB, "
                        f"spilled now<= {smp.max_spilled_disk / 2**20:.0f} MiB, "
                        f"driver {_maxrss_mib():.0f} MiB" if smp else "") + "\n")

    counter = _TaskCounter()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      memory_limit=memory_limit, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(n_workers)
        client.run(lambda: __import__("zarr_vectors_dask"))  # warm imports, not timed
        cluster.scheduler.add_plugin(counter._scheduler_plugin(cluster.scheduler))
        sampler = _Sampler(cluster.scheduler)
        sampler_ref.append(sampler)
        sampler.start()
        time.sleep(1.0)  # a first CPU sample before the build: setup is not counted
        cpu_before = dict(sampler.worker_cpu)
        driver_cpu0 = _cpu_self()
        reports: list = []
        error = None
        t0 = t_start[0] = time.perf_counter()
        try:
            zvd.build_pyramid(path, factors=FACTORS, sparsity_seed=SEED, cross_level_depth=-1,
                              cross_level_storage="explicit", client=client,
                              _reports=reports, progress=progress,
                              shard_shape=parse_shard_shape(shard_shape) if shard_shape
                              else None)
        except Exception as exc:  # report what happened, with the measurements so far
            error = f"{type(exc).__name__}: {str(exc)[:2000]}"
        seconds = time.perf_counter() - t0
        driver_cpu = _cpu_self() - driver_cpu0
        time.sleep(1.0)  # one more heartbeat for the spill metrics
        sampler.stop.set()
        sampler.join()
        cum = dict(cluster.scheduler.cumulative_worker_metrics)
        worker_maxrss = bp.workers_maxrss_mib(client)
    disk_write = sum(v for k, v in cum.items()
                     if isinstance(k, tuple) and "disk-write" in k and k[-1] == "bytes")
    disk_read = sum(v for k, v in cum.items()
                    if isinstance(k, tuple) and "disk-read" in k and k[-1] == "bytes")
    steps, stages = bp.stage_totals(reports)
    return {
        "seconds": seconds, "error": error, "driver_cpu_seconds": driver_cpu,
        # Sampled every 0.5 s, so a worker that died takes at most its last
        # half second of CPU with it.
        "worker_cpu_seconds": sum(v - cpu_before.get(pid, 0.0)
                                  for pid, v in sampler.worker_cpu.items()),
        "driver_rss_mib": _maxrss_mib(),
        "driver_rss_sampled_mib": sampler.max_driver_rss / 2**20,
        "worker_rss_mib": sampler.max_worker_rss / 2**20,
        "worker_maxrss_final_mib": max(worker_maxrss.values()) if worker_maxrss else 0.0,
        "children_rss_mib": sampler.max_all_children_rss / 2**20,
        "worker_processes_seen": len(sampler.worker_pids),
        "samples": sampler.samples,
        "spilled_disk_max_mib": sampler.max_spilled_disk / 2**20,
        "managed_max_mib": sampler.max_managed / 2**20,
        "spill_write_mib": disk_write / 2**20, "spill_read_mib": disk_read / 2**20,
        "tasks": sum(r.tasks for r in steps),
        # Graphs handed to the scheduler: execute() reports each one once
        # through ``progress`` (steps and the closing composition).
        "round_trips": len(progress_log),
        "step_round_trips": sum(r.round_trips for r in steps),
        "scheduler_tasks": sum(counter.count.values()), "erred": counter.erred,
        "by_prefix": {p: {"n": counter.count[p], "nbytes_max": counter.nbytes_max[p],
                          "nbytes_sum": counter.nbytes_sum[p]} for p in sorted(counter.count)},
        "stages": stages, "progress": progress_log,
        "levels": [{"level": r.target_level, "vertices": r.vertex_count, "chunks": r.chunks,
                    "objects": r.objects_kept, "seconds": r.seconds, "tasks": r.tasks}
                   for r in steps],
    }


def child_validate(path: str, level: int) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    from zarr_vectors.validate import validate
    t0 = time.perf_counter()
    rep = validate(path, level=level)
    errors = [str(e) for e in (getattr(rep, "errors", None) or [])][:5]
    return {"ok": bool(rep.ok), "level": level, "seconds": time.perf_counter() - t0,
            "rss_mib": _maxrss_mib(), "errors": errors}


def run_child(mode: str, *args, timeout: float | None = None,
              max_rss_gib: float | None = None) -> dict:
    """Run this script in ``mode`` in a fresh interpreter; it prints one JSON
    line.  ``max_rss_gib``: kill it (and fail) once its RSS passes that —
    the machine is shared, and zarr-vectors' validator holds every link
    record of a family as Python objects."""
    import psutil
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    if max_rss_gib is not None:
        def guard():
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    return
                peak[0] = max(peak[0], rss)
                if rss > max_rss_gib * 2**30:
                    proc.kill()
                    return
                time.sleep(0.5)
        threading.Thread(target=guard, daemon=True).start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{mode} timed out after {timeout:.0f} s "
                           f"(peak RSS {peak[0] / 2**20:.0f} MiB)")
    returncode = proc.returncode
    if max_rss_gib is not None and peak[0] > max_rss_gib * 2**30:
        raise RuntimeError(f"{mode} killed at {peak[0] / 2**30:.1f} GiB RSS after "
                           f"{time.perf_counter() - t0:.0f} s (limit {max_rss_gib} GiB)")
    if returncode != 0:
        raise RuntimeError(f"{mode} failed ({returncode}):\n{stderr[-4000:]}")
    out = json.loads([ln for ln in stdout.splitlines() if ln.startswith("{")][-1])
    out["wall_with_startup"] = time.perf_counter() - t0
    # Worker restarts / memory warnings land on the child's stderr.
    out["stderr_memory_lines"] = [ln for ln in stderr.splitlines()
                                  if "memory" in ln.lower() or "restart" in ln.lower()
                                  or "killed" in ln.lower()][-20:]
    return out


# ------------------------------------------------------------------ tables
def _fmt_bytes_mib(x: float) -> str:
    return f"{x / 1024:.2f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def _fmt_validate(v: dict | None) -> str:
    if not v:
        return "-"
    if v.get("aborted"):
        return "not finished: " + v["errors"][0]
    return (("ok" if v["ok"] else "FAILED") + f" (level {v['level']}, {v['seconds']:.0f} s, "
            f"{_fmt_bytes_mib(v['rss_mib'])})")


def _ratio(r: dict, base: dict, part: str, key: str) -> str:
    a, b = r[part].get(key), base[part].get(key)
    return f"{a / b:.2f}" if a and b else "-"


def tables(results: list[dict]) -> str:
    out = []
    out.append("| vertices | objects | level-0 write s (CPU s) | write peak RSS | build wall s "
               "| build CPU s: workers / driver | worker CPU µs/vertex "
               "| driver peak RSS | largest worker peak RSS | spilled to disk (total / peak) "
               "| tasks (graph) | tasks (scheduler) | validate level 0 | validate pyramid |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in results:
        w, b, v = r["write"], r["build"], r.get("validate") or {}
        val = _fmt_validate(v)
        val0 = _fmt_validate(r.get("validate_level0"))
        status = "" if not b.get("error") else " **FAILED**"
        out.append(
            f"| {r['vertices']:,} | {w.get('polyline_count', 0):,} "
            f"| {w['seconds']:.1f} ({w.get('cpu_seconds', 0):.1f}) "
            f"| {_fmt_bytes_mib(w['rss_mib'])} | {b['seconds']:.1f}{status} "
            f"| {b.get('worker_cpu_seconds', 0):.1f} / {b.get('driver_cpu_seconds', 0):.1f} "
            f"| {1e6 * b.get('worker_cpu_seconds', 0) / r['vertices']:.2f} "
            f"| {_fmt_bytes_mib(b['driver_rss_mib'])} | {_fmt_bytes_mib(b['worker_rss_mib'])} "
            f"| {_fmt_bytes_mib(b['spill_write_mib'])} / {_fmt_bytes_mib(b['spilled_disk_max_mib'])} "
            f"| {b['tasks']:,} | {b['scheduler_tasks']:,} | {val0} | {val} |")
    out.append("")
    out.append("Per level (target level: vertices / chunks / tasks / seconds):")
    out.append("")
    levels = sorted({lv["level"] for r in results for lv in r["build"]["levels"]})
    out.append("| vertices | " + " | ".join(f"level {k}" for k in levels) + " |")
    out.append("|---:|" + "---|" * len(levels))
    for r in results:
        by = {lv["level"]: lv for lv in r["build"]["levels"]}
        cells = [f"{by[k]['vertices']:,} v / {by[k]['chunks']} ch / {by[k]['tasks']} t / "
                 f"{by[k]['seconds']:.1f} s" if k in by else "-" for k in levels]
        out.append(f"| {r['vertices']:,} | " + " | ".join(cells) + " |")
    out.append("")
    stages = sorted({s for r in results for s in r["build"]["stages"]})
    out.append("Stage seconds (summed over levels):")
    out.append("")
    out.append("| stage | " + " | ".join(f"{r['vertices']:,}" for r in results) + " |")
    out.append("|---|" + "---:|" * len(results))
    for s in stages:
        out.append(f"| {s} | " + " | ".join(f"{r['build']['stages'].get(s, 0.0):.2f}"
                                             for r in results) + " |")
    out.append("")
    prefixes = sorted({p for r in results for p in r["build"].get("by_prefix", {})})
    if prefixes:
        out.append("Finished tasks per task prefix (all levels and composition) / largest "
                   "result (MB, the scheduler's nbytes):")
        out.append("")
        out.append("| task prefix | " + " | ".join(f"{r['vertices']:,}" for r in results) + " |")
        out.append("|---|" + "---:|" * len(results))
        for p in prefixes:
            cells = []
            for r in results:
                v = r["build"].get("by_prefix", {}).get(p)
                cells.append(f"{v['n']:,} / {v['nbytes_max'] / 1e6:.1f}" if v else "-")
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
    if len(results) >= 2:
        out.append("Linearity (relative to the smallest run):")
        out.append("")
        out.append("| vertices | x vertices | x build wall s | x worker CPU s | x driver CPU s "
                   "| x tasks | x write CPU s |")
        out.append("|---:|---:|---:|---:|---:|---:|---:|")
        base = results[0]
        for r in results:
            out.append(f"| {r['vertices']:,} | {r['vertices'] / base['vertices']:.1f} "
                       f"| {r['build']['seconds'] / base['build']['seconds']:.2f} "
                       f"| {_ratio(r, base, 'build', 'worker_cpu_seconds')} "
                       f"| {_ratio(r, base, 'build', 'driver_cpu_seconds')} "
                       f"| {r['build']['tasks'] / max(1, base['build']['tasks']):.2f} "
                       f"| {_ratio(r, base, 'write', 'cpu_seconds')} |")
        out.append("")
    return "\n".join(out)


def _validate(path, args, level: int) -> dict:
    try:
        return run_child("validate", path, level, timeout=args.validate_timeout,
                         max_rss_gib=args.validate_max_rss_gib)
    except RuntimeError as exc:
        return {"ok": False, "level": level, "seconds": 0.0, "rss_mib": 0.0,
                "errors": [str(exc)[:500]], "aborted": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", default="1000000,10000000")
    ap.add_argument("--points-per-line", type=int, default=100,
                    help="vertices per random-walk line (objects = vertices / this)")
    ap.add_argument("--objects", default=None,
                    help="comma-separated object counts; replaces --vertices "
                         "(vertices = objects x --points-per-line)")
    ap.add_argument("--root", default="/tmp/zvscale")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=float, default=2.0)
    ap.add_argument("--validate-level", type=int, default=3)
    ap.add_argument("--no-validate", action="store_true")
    ap.add_argument("--validate-pyramid-level", type=int, default=None,
                    help="validator level for the built pyramid (default --validate-level)")
    ap.add_argument("--validate-timeout", type=float, default=None)
    ap.add_argument("--validate-max-rss-gib", type=float, default=8.0)
    ap.add_argument("--validate-level0", action="store_true",
                    help="also validate the level-0 store before building")
    ap.add_argument("--from-json", help="only print/write the tables of an earlier --json")
    ap.add_argument("--build-timeout", type=float, default=None,
                    help="seconds; kill the build process after this long")
    ap.add_argument("--markdown")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        mode, *rest = args._child
        if mode == "write":
            out = child_write(rest[0], int(rest[1]), int(rest[2]), float(rest[3]),
                              *([int(rest[4]), float(rest[5]), float(rest[6])]
                                if len(rest) > 4 else []))
        elif mode == "build":
            out = child_build(rest[0], int(rest[1]), rest[2], *rest[3:4])
        else:
            out = child_validate(rest[0], int(rest[1]))
        print(json.dumps(out))
        return 0

    if args.from_json:
        text = tables(json.loads(Path(args.from_json).read_text()))
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text + "\n")
        return 0

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = []
    ppl = args.points_per_line
    sizes = ([int(float(x)) * ppl for x in args.objects.split(",")] if args.objects
             else [int(float(x)) for x in args.vertices.split(",")])
    for n in sizes:
        path = root / f"scale_{n}.zv"
        shutil.rmtree(path, ignore_errors=True)
        print(f"[{time.strftime('%H:%M:%S')}] {n:,} vertices: writing level 0 -> {path}", flush=True)
        w = run_child("write", path, n, args.seed, args.step, ppl, 125.0, 0.0)
        print(f"  level 0: {w['seconds']:.1f} s, peak RSS {w['rss_mib']:.0f} MiB, "
              f"{w['chunk_count']} chunks, {w['cross_chunk_link_count']:,} bridges", flush=True)
        v0 = None
        if args.validate_level0:
            print(f"[{time.strftime('%H:%M:%S')}] validating level 0", flush=True)
            v0 = _validate(path, args, args.validate_level)
            print(f"  validate level 0: ok={v0['ok']} {v0['seconds']:.1f} s "
                  f"RSS {v0['rss_mib']:.0f} MiB {v0['errors']}", flush=True)
        print(f"[{time.strftime('%H:%M:%S')}] building", flush=True)
        b = run_child("build", path, args.workers, args.memory_limit,
                      timeout=args.build_timeout)
        print(f"  build: {b['seconds']:.1f} s (CPU workers {b['worker_cpu_seconds']:.1f} s, "
              f"driver {b['driver_cpu_seconds']:.1f} s), driver {b['driver_rss_mib']:.0f} MiB, "
              f"largest worker {b['worker_rss_mib']:.0f} MiB, spill written "
              f"{b['spill_write_mib']:.0f} MiB, tasks {b['tasks']}, error {b['error']}",
              flush=True)
        v = None
        if not args.no_validate and not b["error"]:
            print(f"[{time.strftime('%H:%M:%S')}] validating", flush=True)
            v = _validate(path, args, args.validate_pyramid_level or args.validate_level)
            print(f"  validate: ok={v['ok']} {v['seconds']:.1f} s RSS {v['rss_mib']:.0f} MiB "
                  f"{v['errors']}", flush=True)
        results.append({"vertices": n, "write": w, "build": b, "validate": v,
                        "validate_level0": v0})
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
    text = tables(results)
    print(text)
    if args.markdown:
        size_arg = (f"--objects {args.objects}" if args.objects else f"--vertices {args.vertices}")
        header = (f"Scale run: `python benchmarks/scale_run.py {size_arg} "
                  f"--points-per-line {ppl} --root {args.root}` — LocalCluster {args.workers} workers x 1 thread, "
                  f"memory_limit {args.memory_limit}, store on {args.root}; "
                  f"{os.cpu_count()} cores, {platform.python_version()}; "
                  f"{time.strftime('%Y-%m-%d %H:%M')}.\n\n")
        Path(args.markdown).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
