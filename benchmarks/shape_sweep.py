#!/usr/bin/env python
"""Shape sweep (issue 11): the same vertex count in four shapes, project and
zarr-vectors side by side.

Shapes (random-walk streamlines in a 1000^3 box, bin 5, factors
(2,1),(2,2),(2,2), explicit links, depth -1):

* ``base``   - lines of 100 points, chunk 125 (8^3 = 512 chunks);
* ``fine``   - lines of 100 points, chunk 25 (40^3 = 64,000 chunks);
* ``short``  - lines of 5 points (20x the objects), chunk 125;
* ``corner`` - lines of 100 points, chunk 125, 90% of them starting in the
  corner chunk [0, 125)^3 (a dense region).

Per (size, shape): level 0 is written once in bounded memory
(``scale_run.py``'s writer, the store ``write_polylines`` writes) and copied;
the project builds on ``LocalCluster(2 workers x 1 thread, 2 GiB)`` in a
fresh process (``scale_run.py``'s build child: RSS of the driver and of every
worker, finished tasks, graphs submitted), the reference in another fresh
process (``bench_pyramid.py``'s reference child, killed after
``--reference-timeout``), and the two trees are compared
(``bench_pyramid.trees_equivalent``).  Prints a table with the command that
reproduces each row; ``--markdown`` / ``--json`` write it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_pyramid as bp  # noqa: E402  (reference child, equivalence check)
import scale_run as sr  # noqa: E402  (bounded-memory level 0, measured build child)

# name -> (points per line, chunk edge, fraction of lines in the corner chunk)
SHAPES = {
    "base": (100, 125.0, 0.0),
    "fine": (100, 25.0, 0.0),
    "short": (5, 125.0, 0.0),
    "corner": (100, 125.0, 0.9),
}
DESCRIBE = {
    "base": "lines of 100 points, chunk 125 (512 chunks)",
    "fine": "lines of 100 points, chunk 25 (64,000 chunks)",
    "short": "lines of 5 points, chunk 125",
    "corner": "90% of the lines start in one corner chunk, chunk 125",
}


def load() -> str:
    """The 1/5/15-minute load averages (the machine is shared)."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command(args, shape: str, vertices: int) -> str:
    cmd = (f"python benchmarks/shape_sweep.py --shapes {shape} --vertices {vertices} "
           f"--root {args.root}")
    if args.no_reference_above is not None and vertices > args.no_reference_above:
        cmd += f" --no-reference-above {args.no_reference_above}"
    if args.shard_shape:
        cmd += f" --shard-shape {args.shard_shape}"
    if args.floor:
        cmd += " --floor"
    return cmd


def run_case(args, shape: str, vertices: int) -> dict:
    points, chunk, corner = SHAPES[shape]
    case = Path(args.root) / f"{shape}_{vertices}"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir(parents=True)
    level0, ref_dir, proj_dir = case / "level0.zv", case / "reference.zv", case / "project.zv"
    tag = f"[{time.strftime('%H:%M:%S')} {shape} {vertices:,}]"
    out = {"shape": shape, "vertices": vertices, "load_before": load(),
           "command": command(args, shape, vertices), "shard_shape": args.shard_shape}
    try:
        w = sr.run_child("write", level0, vertices, args.seed, args.step, points, chunk, corner)
        out["write"] = w
        print(f"{tag} level 0: {w['seconds']:.1f} s, {w['polyline_count']:,} objects, "
              f"{w['chunk_count']:,} chunks", flush=True)
        run_ref = args.no_reference_above is None or vertices <= args.no_reference_above
        if run_ref:
            shutil.copytree(level0, ref_dir)
        shutil.copytree(level0, proj_dir)
        if not args.floor:
            shutil.rmtree(level0)
        b = sr.run_child("build", proj_dir, args.workers, args.memory_limit,
                         args.shard_shape or "", timeout=args.build_timeout)
        out["build"] = b
        print(f"{tag} project {b['seconds']:.1f} s, driver {b['driver_rss_mib']:.0f} MiB, "
              f"worker {b['worker_rss_mib']:.0f} MiB, error {b['error']}", flush=True)
        floor_files = bp.output_files(level0, proj_dir) \
            if args.floor and not b["error"] else None
        ref = None
        if run_ref:
            try:
                ref = bp.run_child("reference", ref_dir, timeout=args.reference_timeout)
                print(f"{tag} reference {ref['seconds']:.1f} s", flush=True)
            except subprocess.TimeoutExpired:
                out["reference_skipped"] = f"killed after {args.reference_timeout:.0f} s"
                print(f"{tag} reference {out['reference_skipped']}", flush=True)
        else:
            out["reference_skipped"] = f"not run (> {args.no_reference_above:,} vertices)"
        out["reference"] = ref
        out["equivalent"] = "n/a (sharded)" if args.shard_shape else \
            bp._verdict(ref, ref_dir, proj_dir) if ref and not b["error"] \
            else "n/a"
        if floor_files is not None:
            # The file-system floor of this shape: read level 0 and write
            # every file the build wrote (same paths and sizes), one thread;
            # the built trees go first, so the disk holds one copy at a time.
            for d in (ref_dir, proj_dir):
                if not args.keep:
                    shutil.rmtree(d, ignore_errors=True)
            out["floor"] = f = bp.io_floor(level0, floor_files, case / "floor-scratch")
            print(f"{tag} I/O floor {f['seconds']:.1f} s (read {f['read_files']:,} files, "
                  f"write {f['write_files']:,})", flush=True)
        out["load_after"] = load()
    finally:
        if not args.keep:
            shutil.rmtree(case, ignore_errors=True)
    return out


# ------------------------------------------------------------------ table
COLUMNS = ["shape", "vertices", "objects", "chunks", "project s", "x base", "reference s",
           "reference / project", "CPU s: project (workers + driver) / reference",
           "x base (CPU)", "I/O floor s (1 thread; files written)", "floor / 2x base",
           "driver peak RSS MiB", "largest worker peak RSS MiB",
           "tasks (graph / finished)", "driver round trips", "equivalent", "load before / after",
           "command"]


def cpu(build: dict) -> float:
    """CPU seconds of a build (workers + driver): on a shared machine, the
    figure that the other agents' load disturbs least."""
    return build["worker_cpu_seconds"] + build["driver_cpu_seconds"]


def rows(results: list[dict]) -> list[list[str]]:
    ok_base = [r for r in results
               if r["shape"] == "base" and "build" in r and not r["build"]["error"]]
    # Each row against the base shape built the same way (sharded or not).
    def case(r):
        return r["vertices"], r.get("shard_shape")
    base = {case(r): r["build"]["seconds"] for r in ok_base}
    base_cpu = {case(r): cpu(r["build"]) for r in ok_base}
    out = []
    for r in results:
        b, w, ref = r.get("build"), r.get("write") or {}, r.get("reference")
        if b is None:
            continue
        # Peak of the 0.5 s samples (worker and its children) or the
        # worker's own ru_maxrss, whichever is larger.
        worker = max(b["worker_rss_mib"], b.get("worker_maxrss_final_mib", 0.0))
        secs = f"{b['seconds']:.1f}" + (" FAILED" if b["error"] else "")
        xb = f"{b['seconds'] / base[case(r)]:.2f}" if case(r) in base else "-"
        xc = f"{cpu(b) / base_cpu[case(r)]:.2f}" if case(r) in base_cpu else "-"
        ref_cpu = f"{ref['cpu_seconds']:.1f}" if ref and "cpu_seconds" in ref else "-"
        fl = r.get("floor")
        floor = f"{fl['seconds']:.1f} ({fl['write_files']:,})" if fl else "-"
        # Above 1: the shape's file I/O alone, on one core, takes longer
        # than twice the base shape's whole build.
        over = f"{fl['seconds'] / (2 * base[case(r)]):.2f}" if fl and case(r) in base else "-"
        shape = r["shape"] + (f" (shard {r['shard_shape']})" if r.get("shard_shape") else "")
        out.append([
            shape, f"{r['vertices']:,}", f"{w.get('polyline_count', 0):,}",
            f"{w.get('chunk_count', 0):,}", secs, xb,
            f"{ref['seconds']:.1f}" if ref else r.get("reference_skipped", "-"),
            f"{ref['seconds'] / b['seconds']:.1f}x" if ref else "-",
            f"{cpu(b):.1f} ({b['worker_cpu_seconds']:.1f} + {b['driver_cpu_seconds']:.1f}) "
            f"/ {ref_cpu}", xc, floor, over,
            f"{b['driver_rss_mib']:.0f}", f"{worker:.0f}",
            f"{b['tasks']:,} / {b['scheduler_tasks']:,}", str(b.get("round_trips", "-")),
            r.get("equivalent", "n/a"), f"{r['load_before']} / {r.get('load_after', '-')}",
            f"`{r['command']}`"])
    return out


def report(results: list[dict], args) -> str:
    head = (f"LocalCluster({args.workers} workers x 1 thread, memory_limit {args.memory_limit}), "
            f"store on {args.root}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{time.strftime('%Y-%m-%d %H:%M')} UTC. Shapes: "
            + "; ".join(f"`{k}` {v}" for k, v in DESCRIBE.items()) + ".")
    return head + "\n\n" + bp.md_table(COLUMNS, rows(results)) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", default="3000000",
                    help="comma-separated vertex counts (objects scale with vertices)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--root", default="/tmp/zvsweep")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="2GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step", type=float, default=2.0)
    ap.add_argument("--no-reference-above", type=int, default=None,
                    help="skip the reference above this many vertices")
    ap.add_argument("--reference-timeout", type=float, default=900.0,
                    help="seconds; kill the reference after this long (reported as such)")
    ap.add_argument("--build-timeout", type=float, default=None)
    ap.add_argument("--json", help="raw results; appended to if it exists")
    ap.add_argument("--from-json", help="only print/write the table of an earlier --json")
    ap.add_argument("--markdown")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--floor", action="store_true",
                    help="also time the shape's file-system floor (bench_pyramid.io_floor): "
                         "read level 0 and write the build's files, one thread")
    ap.add_argument("--shard-shape", default=None,
                    help="build with shard_shape (e.g. 4 or 4x4x2); the reference is unsharded")
    args = ap.parse_args(argv)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown shape(s) {unknown}; known: {list(SHAPES)}")
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = json.loads(Path(args.json).read_text()) \
            if args.json and Path(args.json).exists() else []
        for n in [int(float(x)) for x in args.vertices.split(",")]:
            for shape in shapes:
                results.append(run_case(args, shape, n))
                if args.json:
                    Path(args.json).write_text(json.dumps(results, indent=1))
    print(bp.text_table(COLUMNS, rows(results)))
    if args.markdown:
        Path(args.markdown).write_text(report(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
