#!/usr/bin/env python
"""Benchmark ``refresh_pyramid`` against a full rebuild after level-0 edits.

One pyramid of random-walk streamlines (with an object attribute) is built;
each case copies it, edits level 0, refreshes, and rebuilds a second copy
with ``overwrite=True`` in the same run.  Per case: wall and CPU seconds
(driver + scheduler + workers, from the processes' own counters) of both,
pyramid files the refresh rewrote against files that really differ between
the old pyramid and the full rebuild, and whether refresh == rebuild byte
for byte.  Plus change detection on an unedited pyramid against one
listing of level 0.

    python benchmarks/bench_refresh.py --vertices 1000000 --root /dev/shm/zvbench-refresh
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pyramid import (BIN_SHAPE, BOX, CHUNK_SHAPE, CROSS_LEVEL_DEPTH,  # noqa: E402
                           CROSS_LEVEL_STORAGE, FACTORS, POINTS_PER_LINE, SEED,
                           cluster_cpu_seconds, md_table, random_walk_lines)

KW = dict(factors=FACTORS, sparsity_seed=SEED, cross_level_depth=CROSS_LEVEL_DEPTH,
          cross_level_storage=CROSS_LEVEL_STORAGE)
CHUNK = CHUNK_SHAPE[0]
SIDECAR = ".zvdask"


def write_level0(path: Path, vertices: int, seed: int) -> int:
    """bench_pyramid's lines (step 2.0) with an object attribute ``weight``."""
    from zarr_vectors.types.polylines import write_polylines
    n = max(1, vertices // POINTS_PER_LINE)
    rng = np.random.default_rng(seed)
    lines = list(random_walk_lines(rng, n, 2.0))
    write_polylines(str(path), lines, chunk_shape=CHUNK_SHAPE, bin_shape=BIN_SHAPE,
                    bounds=([0.0] * 3, [BOX] * 3),
                    object_attributes={"weight": rng.random(n).astype(np.float32)})
    return n


def timed(client, fn) -> tuple[float, float]:
    """Wall and CPU seconds (driver, scheduler, workers) of ``fn()``."""
    c0, t0 = sum(cluster_cpu_seconds(client).values()), time.perf_counter()
    fn()
    return time.perf_counter() - t0, sum(cluster_cpu_seconds(client).values()) - c0


# ------------------------------------------------------------------ files
def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Pyramid files (level 0 and the sidecar excluded): (mtime_ns, size)."""
    out = {}
    for d, _, files in os.walk(root):
        rel = os.path.relpath(d, root)
        top = rel.split(os.sep)[0]
        if top in ("0", SIDECAR):
            continue
        for f in files:
            st = os.stat(os.path.join(d, f))
            out[os.path.normpath(os.path.join(rel, f))] = (st.st_mtime_ns, st.st_size)
    return out


def _bytes(root: Path, rel: str) -> bytes | None:
    try:
        return (root / rel).read_bytes()
    except FileNotFoundError:
        return None


def differing(a: Path, b: Path, keys) -> set[str]:
    return {k for k in keys if _bytes(a, k) != _bytes(b, k)}


# ------------------------------------------------------------------ edits
def edit_attributes(path: Path, fraction: float, clustered: bool, rng) -> str:
    import zarr
    arr = zarr.open_array(str(path / "0" / "object_attributes" / "weight"), mode="r+")
    n = arr.shape[0]
    k = max(1, int(round(n * fraction)))
    rows = np.arange(k) + rng.integers(0, n - k + 1) if clustered else \
        np.sort(rng.choice(n, k, replace=False))
    vals = arr[:]
    vals[rows] += 1.0
    arr[:] = vals
    return f"{k} rows"


def edit_vertices(path: Path, fraction: float, clustered: bool, rng, atomic=False) -> str:
    """EditSession(atomic=False).edit_vertex of one vertex in each edited
    chunk, moved by a small step within its chunk (no row-count change;
    ``atomic``: copy-on-write, each edited object appended as a new row)."""
    from zarr_vectors.core.store import open_store
    from zarr_vectors.ops.edit import EditSession
    from zarr_vectors.ops.refs import VertexRef
    cells = sorted(p.relative_to(path / "0" / "vertices" / "c")
                   for p in (path / "0" / "vertices" / "c").glob("*/*/*"))
    chunks = [tuple(int(x) for x in c.parts) for c in cells]
    k = max(1, int(round(len(chunks) * fraction)))
    if clustered:  # the k chunks nearest one chunk, as a proofreading session is
        centre = np.asarray(chunks[rng.integers(len(chunks))])
        order = np.argsort(np.abs(np.asarray(chunks) - centre).sum(axis=1), kind="stable")
        chosen = [chunks[i] for i in order[:k]]
    else:
        chosen = [chunks[i] for i in rng.choice(len(chunks), k, replace=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = open_store(str(path), mode="r+")
        with EditSession(root, atomic=atomic) as ed:
            for cc in chosen:
                ref = VertexRef(level=0, chunk=cc, fragment=0, local=0)
                lo = np.asarray(cc, dtype=np.float64) * CHUNK
                ed.edit_vertex(ref, new_pos=lo + CHUNK / 2 + rng.uniform(-1, 1, 3))
    return f"{k} chunks"


def edit_vertices_atomic(path: Path, fraction: float, clustered: bool, rng) -> str:
    """As :func:`edit_vertices`, copy-on-write: the row count changes."""
    return edit_vertices(path, fraction, clustered, rng, atomic=True) + ", atomic"


def edit_combined(path: Path, fraction: float, clustered: bool, rng) -> str:
    """:func:`edit_vertices` in place, then :func:`edit_attributes` of as
    many rows: geometry and object attributes changed together."""
    return edit_vertices(path, fraction, clustered, rng) + ", " + \
        edit_attributes(path, fraction, clustered, rng)


CASES = {"attributes": edit_attributes, "vertices": edit_vertices,
         "vertices-atomic": edit_vertices_atomic, "combined": edit_combined}


# ------------------------------------------------------------------ run
def run_case(client, built: Path, work: Path, kind: str, fraction: float, clustered: bool,
             seed: int) -> dict:
    import zarr_vectors_dask as zd
    store, full = work / "refresh.zv", work / "full.zv"
    for p in (store, full):
        shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(built, store)
    what = CASES[kind](store, fraction, clustered, np.random.default_rng(seed))
    shutil.copytree(store, full)
    before = tree(store)
    time.sleep(0.01)
    report = []
    r_wall, r_cpu = timed(client, lambda: report.append(zd.refresh_pyramid(str(store),
                                                                           client=client)))
    f_wall, f_cpu = timed(client, lambda: zd.build_pyramid(str(full), client=client,
                                                           overwrite=True, **KW))
    after, rebuilt = tree(store), tree(full)
    rewritten = {k for k in {*before, *after} if before.get(k) != after.get(k)}
    differ = differing(built, full, {*tree(built), *rebuilt})
    equal = not differing(store, full, {*after, *rebuilt})
    return {"case": f"{kind}, {fraction:.1%} {'clustered' if clustered else 'scattered'}",
            "edit": what, "region": report[0].region.kind, "refresh_s": r_wall,
            "refresh_cpu": r_cpu, "full_s": f_wall, "full_cpu": f_cpu,
            "rewritten": len(rewritten), "differ": len(differ), "files": len(rebuilt),
            "equal": equal}


def detection(client, built: Path) -> dict:
    import zarr_vectors_dask as zd
    t0 = time.perf_counter()
    for _ in range(5):
        assert zd.pyramid_status(str(built)).current
    status = (time.perf_counter() - t0) / 5
    t0 = time.perf_counter()
    for _ in range(5):
        n = sum(len(f) for _, _, f in os.walk(built / "0"))
    return {"status_s": status, "listing_s": (time.perf_counter() - t0) / 5, "objects": n}


def table(rows: list[dict]) -> str:
    head = ("case", "edit", "region", "refresh s (cpu)", "full rebuild s (cpu)", "ratio",
            "files rewritten / differ / total", "equal")
    return md_table(head, [
        (r["case"], r["edit"], r["region"], f"{r['refresh_s']:.2f} ({r['refresh_cpu']:.2f})",
         f"{r['full_s']:.2f} ({r['full_cpu']:.2f})", f"{r['refresh_s'] / r['full_s']:.1%}",
         f"{r['rewritten']} / {r['differ']} / {r['files']}", "yes" if r["equal"] else "NO")
        for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", type=float, default=1e6, help="level-0 vertices (lines of 100)")
    ap.add_argument("--root", default="/dev/shm/zvbench-refresh", help="scratch directory")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--fractions", default="0.001,0.01,0.1",
                    help="edited share of rows (attributes) or chunks (vertices)")
    ap.add_argument("--kinds", default="attributes,vertices", help="edit kinds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import zarr_vectors_dask as zd
    from distributed import Client, LocalCluster
    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    built = root / "built.zv"
    n = write_level0(built, int(args.vertices), args.seed)
    rows = []
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as lc, Client(lc) as client:
        b_wall, b_cpu = timed(client, lambda: zd.build_pyramid(str(built), client=client, **KW))
        det = detection(client, built)
        fractions = [float(f) for f in args.fractions.split(",")]
        for kind in args.kinds.split(","):
            for frac in fractions:
                for clustered in (True, False):
                    rows.append(run_case(client, built, root, kind, frac, clustered, args.seed))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    cmd = "python benchmarks/bench_refresh.py " + " ".join(argv if argv is not None
                                                          else sys.argv[1:])
    print(f"\n`{cmd}` -- {int(args.vertices):,} vertices, {n:,} objects, {args.workers} "
          f"workers, factors {FACTORS}; first build {b_wall:.2f} s ({b_cpu:.2f} CPU-s)\n")
    print(table(rows))
    print(f"\nchange detection, unedited: pyramid_status {det['status_s'] * 1e3:.1f} ms; one "
          f"listing of level 0 ({det['objects']:,} objects) {det['listing_s'] * 1e3:.1f} ms")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
