#!/usr/bin/env python
"""Same-server S3 benchmark: zarr-vectors' ``build_pyramid`` and ours on one
SeaweedFS server, with the objects each build adds and the S3 requests it
makes, counted by the server.

Per size, level 0 (random-walk streamlines, as ``bench_pyramid.py`` writes
them) is written once locally and uploaded to one fresh bucket per build:

* ``reference``: ``zarr_vectors.multiresolution.coarsen.build_pyramid`` given
  ``zarr_vectors.open_store("s3://…", mode="r+", storage_options=…)``;
* ``project``: ``zarr_vectors_dask.build_pyramid("s3://…", storage_options=…)``
  on a LocalCluster (2 workers x 1 thread by default);
* ``project, shard_shape=S`` for every ``--shard-shape`` (where this version
  of the package has no ``shard_shape``, the row says so and nothing runs).

Requests are counted on the server, the same way for both sides:

* SeaweedFS's Prometheus counter ``SeaweedFS_s3_request_total{type=…}``
  (``-metricsPort``), scraped before and after each build: PUT, GET, LIST,
  DELETE.  Its ``GET`` includes HEAD requests (object and bucket).
* SeaweedFS's S3 audit log (``-s3.auditLogConfig``), which posts one record
  per request (``REST.HEAD.OBJECT``, ``REST.GET.OBJECT``…) to a Fluentd
  endpoint; this script is that endpoint (a small msgpack reader).  It splits
  HEAD out of GET, and its per-key records show repeated requests and reads
  of keys the build itself wrote.

Objects added = keys in the bucket after the build minus before (a full
listing each time, outside the counted window).  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pyramid as bp  # noqa: E402  (shared workload, child writer, tree comparison)

STORE = "store.zv"  # the store's prefix inside each build's bucket
KINDS = ["PUT", "GET", "HEAD", "LIST", "DELETE"]


# ------------------------------------------------------------------ children
def child_reference(url: str) -> dict:
    """zarr-vectors on S3: its own store handle, its own build."""
    from zarr_vectors import open_store
    from zarr_vectors.multiresolution.coarsen import build_pyramid
    so = json.loads(os.environ["ZVBENCH_STORAGE_OPTIONS"])
    trace = bool(os.environ.get("ZVBENCH_TRACE"))
    if trace:
        install_tracer()
    t0 = time.perf_counter()
    group = open_store(url, mode="r+", storage_options=so)
    build_pyramid(group, factors=bp.FACTORS, sparsity_seed=bp.SEED,
                  cross_level_depth=bp.CROSS_LEVEL_DEPTH,
                  cross_level_storage=bp.CROSS_LEVEL_STORAGE)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": bp._cpu_seconds(),
            "rss_mib": bp._maxrss_mib(), "trace": _merge_traces([collect_trace()]) if trace else None}


def child_project(url: str, workers: int, threads: int, shard_json: str) -> dict:
    """Ours on S3, as bench_pyramid runs it (cluster started and warmed
    before the clock starts); ``shard_shape`` only when one is asked for."""
    import warnings
    warnings.filterwarnings("ignore")
    from distributed import Client, LocalCluster
    import zarr_vectors_dask as zvd
    so = json.loads(os.environ["ZVBENCH_STORAGE_OPTIONS"])
    shard = json.loads(shard_json)
    extra = {} if shard is None else {"shard_shape": shard if isinstance(shard, int) else tuple(shard)}
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.wait_for_workers(workers)
        client.run(lambda: __import__("zarr_vectors_dask"))  # warm imports, not timed
        trace = bool(os.environ.get("ZVBENCH_TRACE"))
        if trace:
            install_tracer()
            client.run(install_tracer)
        reports: list = []
        t0 = time.perf_counter()
        try:
            zvd.build_pyramid(url, factors=bp.FACTORS, sparsity_seed=bp.SEED,
                              cross_level_depth=bp.CROSS_LEVEL_DEPTH,
                              cross_level_storage=bp.CROSS_LEVEL_STORAGE,
                              client=client, storage_options=so, _reports=reports, **extra)
        except TypeError as e:
            if "shard_shape" in str(e):  # an older package: say so, don't crash the run
                return {"unsupported": str(e)}
            raise
        seconds = time.perf_counter() - t0
        worker_rss = bp.workers_maxrss_mib(client)
        traces = ([collect_trace(), *client.run(collect_trace).values()] if trace else None)
    steps = [r for r in reports if not isinstance(r, dict)]
    return {"seconds": seconds, "driver_rss_mib": bp._maxrss_mib(),
            "worker_rss_mib": max(worker_rss.values()) if worker_rss else 0.0,
            "tasks": sum(r.tasks for r in steps),
            "trace": _merge_traces(traces) if trace else None}


def run_child(mode: str, *args, env: dict, timeout: float | None = None) -> dict:
    """This script in ``mode`` in a fresh interpreter, in its own process
    group so that a timed-out reference is killed whole, by its pid."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"killed_after": timeout}
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


# ------------------------------------------------------------------ client-side trace (--trace)
def install_tracer() -> None:
    """Count this process's S3 calls by (call, key pattern, calling site).

    Diagnostic only (the table's counts come from the server): s3fs runs
    its requests on an event-loop thread, so the caller is found in the
    other threads' stacks -- the innermost frame of zarr_vectors_dask or
    zarr_vectors (with one thread per worker there is one such stack)."""
    import s3fs
    if hasattr(s3fs.S3FileSystem, "_zvbench_trace"):
        return
    calls: collections.Counter = collections.Counter()
    orig = s3fs.S3FileSystem._call_s3

    def site() -> str:
        me = threading.get_ident()
        for tid, frame in sys._current_frames().items():
            f, waiting = (frame if tid != me else None), False
            while f is not None:
                path = f.f_code.co_filename
                # only a thread blocked on an event loop (fsspec's or zarr's sync)
                waiting = waiting or (f.f_code.co_name == "sync" and path.endswith(
                    ("fsspec/asyn.py", "zarr/core/sync.py")))
                for pkg in ("/zarr_vectors_dask/", "/zarr_vectors/"):
                    # the caller of the I/O layer (store.py), not the layer itself
                    if waiting and pkg in path and not path.endswith("/store.py"):
                        return f"{pkg.strip('/')}/{path.rsplit(pkg, 1)[1]}:{f.f_code.co_name}"
                f = f.f_back
        return "?"

    async def traced(self, method, *a, **kw):
        calls[(str(method), key_pattern(str(kw.get("Key", kw.get("Prefix", "")))), site())] += 1
        return await orig(self, method, *a, **kw)

    s3fs.S3FileSystem._call_s3 = traced
    s3fs.S3FileSystem._zvbench_trace = calls


def collect_trace() -> list:
    import s3fs
    calls = getattr(s3fs.S3FileSystem, "_zvbench_trace", {})
    return [[*k, n] for k, n in calls.items()]


def _merge_traces(parts) -> list:
    total: collections.Counter = collections.Counter()
    for part in parts:
        for *k, n in part:
            total[tuple(k)] += n
    return [[*k, n] for k, n in total.most_common()]


# ------------------------------------------------------------------ counting on the server
def scrape_requests(metrics_url: str) -> dict[tuple[str, str], float]:
    """``SeaweedFS_s3_request_total`` as {(type, code): count}, all buckets."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[tuple[str, str], float] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("SeaweedFS_s3_request_total{"):
            labels, value = line.rsplit(" ", 1)
            lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            out[(lab.get("type", "?"), lab.get("code", "?"))] += float(value)
    return out


def _by_type(counts: dict[tuple[str, str], float]) -> collections.Counter:
    out = collections.Counter()
    for (kind, _code), n in counts.items():
        out[kind] += int(n)
    return out


def audit_type(op: str, key: str) -> str | None:
    """The Prometheus ``type`` SeaweedFS gives the request an audit record
    describes (HEAD is counted as GET there), or None for records that are
    not requests of their own (the per-key lines of a batch delete)."""
    method = op.split(".")[1] if op.count(".") >= 2 else ""
    if method in ("HEAD", "GET"):
        return "GET" if (key or method == "HEAD") else "LIST"
    if method == "POST":  # batch delete: one keyless record per request
        return None if key else "DELETE"
    return method or None


class AuditReceiver:
    """The Fluentd endpoint SeaweedFS's audit log posts to (forward
    protocol, msgpack ``[tag, time, record, option]``, no acks)."""

    def __init__(self) -> None:
        import msgpack  # a dependency of distributed
        self._msgpack = msgpack
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.received = 0  # records ever received
        self.window: list | None = None  # (kind, status, key) while a build runs
        threading.Thread(target=self._accept, daemon=True).start()

    def config(self, path: Path) -> Path:
        path.write_text(json.dumps({"fluent_host": "127.0.0.1", "fluent_port": self.port}))
        return path

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        # EventTime (ext type 0) is kept opaque: only the record is used.
        unpacker = self._msgpack.Unpacker(raw=False, strict_map_key=False,
                                          ext_hook=lambda code, data: None)
        while True:
            data = conn.recv(1 << 16)
            if not data:
                return
            unpacker.feed(data)
            for msg in unpacker:
                rec = msg[2] if isinstance(msg, list) and len(msg) > 2 else {}
                if not isinstance(rec, dict):
                    continue
                op, key = str(rec.get("operation", "")), str(rec.get("key", ""))
                with self.lock:
                    self.received += 1
                    if self.window is not None:
                        self.window.append((op, int(rec.get("status") or 0), key))

    def quiet(self, still: float = 0.5, timeout: float = 15.0) -> None:
        """Wait until no record has arrived for ``still`` seconds: the
        upload's and listing's records are in before a window opens."""
        deadline = time.monotonic() + timeout
        last = -1
        while time.monotonic() < deadline:
            with self.lock:
                n = self.received
            if n == last:
                return
            last = n
            time.sleep(still)

    def window_matches(self, expected: collections.Counter, timeout: float = 30.0) -> bool:
        """Wait until the window's records add up, per type, to the
        server's counters over the same window (the log is posted
        asynchronously); False if they never do."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                got = collections.Counter(audit_type(op, key) for op, _s, key in self.window or [])
            got.pop(None, None)
            if got == expected:
                return True
            if time.monotonic() > deadline:
                print(f"  audit records {dict(got)} != server counters {dict(expected)}",
                      file=sys.stderr)
                return False
            time.sleep(0.2)

    def start_window(self) -> None:
        with self.lock:
            self.window = []

    def stop_window(self) -> list:
        with self.lock:
            out, self.window = self.window or [], None
        return out

    def close(self) -> None:
        self.sock.close()


# chunk coordinates, level numbers, link offsets (-1.0.0), but not a link
# family's name (+1, -2), which is worth seeing
_NUM = re.compile(r"^([0-9]+|[+-]?[0-9]+(\.[+-]?[0-9]+)+)$")


def key_pattern(key: str) -> str:
    """A key with its numeric components (chunk coordinates, bucket
    numbers) as ``*``, and without the bucket and store prefix."""
    parts = [p for p in key.split("/") if p]
    if STORE in parts:
        parts = parts[parts.index(STORE) + 1:]
    return "/".join("*" if _NUM.match(p) else p for p in parts) or "(bucket)"


def analyse(window: list) -> dict:
    """What the per-request records say: kinds, absent keys, repeats,
    reads of keys written earlier in the same build, top key patterns."""
    kinds = collections.Counter()
    not_found = collections.Counter()
    patterns: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    seen: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    written: set[str] = set()
    read_back = collections.Counter()
    for op, status, key in window:
        method = op.split(".")[1] if op.count(".") >= 2 else "?"
        if method == "POST":
            if key:
                continue  # per-key line of a batch delete
            kind = "DELETE"
        elif method == "GET" and not key:
            kind = "LIST"
        else:
            kind = method
        kinds[kind] += 1
        if status == 404:
            not_found[kind] += 1
        patterns[kind][key_pattern(key)] += 1
        if key:
            seen[kind][key] += 1
        if kind in ("GET", "HEAD") and key in written:
            read_back[kind] += 1
        if kind == "PUT" and key:
            written.add(key)
    return {
        "kinds": dict(kinds),
        "not_found": dict(not_found),
        "repeats": {k: sum(c.values()) - len(c) for k, c in seen.items()},
        "read_back_after_put": dict(read_back),
        "top_patterns": {k: c.most_common(6) for k, c in patterns.items()},
    }


# ------------------------------------------------------------------ one build
class Server:
    """One SeaweedFS server for the whole run: Prometheus metrics on, the
    audit log posting to this process."""

    def __init__(self, data_dir: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from servers import free_port
        self.audit = AuditReceiver()
        metrics_port = free_port()
        conf = self.audit.config(data_dir.parent / "audit-fluent.json")
        self.srv = bp._seaweedfs()(data_dir, extra_args=[
            f"-metricsPort={metrics_port}", f"-s3.auditLogConfig={conf}"])
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"

    def scrape(self) -> dict:
        return scrape_requests(self.metrics_url)

    def stop(self) -> None:
        self.srv.stop()  # by its process group id (= the pid it was started with)
        self.audit.close()


def list_keys(fs, bucket: str) -> list[str]:
    fs.invalidate_cache()
    return fs.find(bucket)


def measure_build(server: Server, level0: Path, label: str, mode: str, args_: list,
                  timeout: float | None, trace: bool = False,
                  extra_options: dict | None = None) -> dict:
    """Upload level 0 to a fresh bucket, then run one build with the
    server's counters and the audit window around it."""
    srv = server.srv
    extra_options = extra_options or {}
    bucket = srv.new_bucket("zvs3")
    fs = srv.fs()
    fs.put(str(level0), f"{bucket}/{STORE}", recursive=True)
    before = set(list_keys(fs, bucket))
    server.audit.quiet()
    load_before = os.getloadavg()
    c0 = server.scrape()
    server.audit.start_window()
    env = {"ZVBENCH_STORAGE_OPTIONS": json.dumps({**srv.storage_options, **extra_options}),
           "ZVBENCH_TRACE": "1" if trace else ""}
    t0 = time.perf_counter()
    out = run_child(mode, f"s3://{bucket}/{STORE}", *args_, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    c1 = server.scrape()
    delta = collections.Counter({k: c1[k] - c0.get(k, 0) for k in c1 if c1[k] - c0.get(k, 0)})
    by_type = _by_type(delta)
    complete = server.audit.window_matches(by_type)
    window = server.audit.stop_window()
    after = list_keys(fs, bucket)
    added = [k for k in after if k not in before]
    audit = analyse(window)
    heads = audit["kinds"].get("HEAD", 0) if complete else None
    requests = {"PUT": by_type["PUT"], "LIST": by_type["LIST"], "DELETE": by_type["DELETE"],
                "GET": by_type["GET"] - (heads or 0), "HEAD": heads,
                "GET+HEAD": by_type["GET"], "total": sum(by_type.values()),
                "errors": sum(int(n) for (t, code), n in delta.items() if not code.startswith("2"))}
    added_bookkeeping = sum(1 for k in added if "/.zvdask/" in k)
    print(f"[{label}] {out.get('seconds', out.get('killed_after'))} s, {len(added):,} objects, "
          f"{requests['total']:,} requests", file=sys.stderr)
    return {"label": label, "bucket": bucket, "child": out, "child_wall": wall,
            "objects_before": len(before), "objects_added": len(added),
            "objects_added_bookkeeping": added_bookkeeping, "requests": requests,
            "requests_raw": {f"{t} {c}": int(n) for (t, c), n in sorted(delta.items())},
            "audit_complete": complete, "audit": audit,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in load_after]}


def shard_supported() -> bool:
    import zarr_vectors_dask as zvd
    return "shard_shape" in inspect.signature(zvd.build_pyramid).parameters


def parse_shard(text: str):
    """``4`` -> 4; ``4x4x2`` (the CLI's spelling) or ``4,4,2`` -> [4, 4, 2]
    (per axis, in chunks)."""
    vals = [int(v) for v in re.split(r"[x,]", text.lower()) if v.strip()]
    return vals[0] if len(vals) == 1 else vals


def parse_option(text: str) -> dict:
    """``key=value`` (value read as JSON when it parses: 1, true, "x")."""
    key, _, value = text.partition("=")
    try:
        return {key: json.loads(value)}
    except ValueError:
        return {key: value}


def fetch_store(fs, bucket: str, dest: Path) -> Path:
    fs.get(f"{bucket}/{STORE}", str(dest), recursive=True)
    return dest


def bench_size(server: Server, root: Path, vertices: int, args) -> list[dict]:
    case = root / f"v{vertices}"
    if case.exists():
        import shutil
        shutil.rmtree(case)
    case.mkdir(parents=True)
    level0 = case / "level0.zv"
    w = bp.run_child("write", level0, vertices, args.seed, args.step)
    print(f"[{vertices:,}] level 0 written in {w['seconds']:.1f}s", file=sys.stderr)
    rows = []
    ref = None
    if args.no_reference_above is None or vertices <= args.no_reference_above:
        ref = measure_build(server, level0, f"reference {vertices:,}", "reference", [],
                            args.reference_timeout, args.trace, args.storage_option)
        ref["build"] = "reference"
    else:
        ref = {"label": f"reference {vertices:,}", "build": "reference", "skipped": True}
    rows.append(ref)
    cluster = [args.workers, args.threads_per_worker]
    proj = measure_build(server, level0, f"project {vertices:,}", "project",
                         cluster + [json.dumps(None)], None, args.trace,
                         args.storage_option)
    proj["build"] = "project"
    rows.append(proj)
    for shard in args.shard_shape:
        label = f"project {vertices:,} shard_shape={shard}"
        if not shard_supported():
            rows.append({"label": label, "build": "project", "shard_shape": shard,
                         "unsupported": True})
            continue
        r = measure_build(server, level0, label, "project", cluster + [json.dumps(shard)], None,
                          args.trace, args.storage_option)
        r["build"], r["shard_shape"] = "project", shard
        r["unsupported"] = "unsupported" in r["child"]
        rows.append(r)
    # Same output as the reference? (downloaded after the counted windows)
    if not args.no_compare and ref.get("child", {}).get("seconds") is not None:
        fs = server.srv.fs()
        a = fetch_store(fs, ref["bucket"], case / "reference.zv")
        b = fetch_store(fs, proj["bucket"], case / "project.zv")
        ok, problems = bp.trees_equivalent(a, b)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        proj["equivalent"] = "yes" if ok else "no"
        # A sharded pyramid has other files: compare what zarr-vectors'
        # reader sees (tests/equivalence.py, validate(level=3) included).
        for r in rows[2:]:
            if r.get("unsupported") or "seconds" not in r.get("child", {}):
                continue
            from equivalence import assert_equivalent  # tests/ is on sys.path (Server)
            c = fetch_store(fs, r["bucket"], case / f"sharded-{r['bucket']}.zv")
            try:
                assert_equivalent(a, c)
                r["equivalent"] = "yes (reader)"
            except AssertionError as e:
                print(f"  {r['label']}: {e}", file=sys.stderr)
                r["equivalent"] = "no"
    if args.floor and proj.get("child", {}).get("seconds") is not None:
        # What the unsharded output costs this server at best: bench_pyramid's
        # S3 floor (one process, batches of 256 concurrent requests).
        fs = server.srv.fs()
        b = case / "project.zv"
        if not b.exists():
            fetch_store(fs, proj["bucket"], b)
        proj["floor"] = bp.io_floor_s3(fs, f"{proj['bucket']}/{STORE}", level0,
                                       bp.output_files(level0, b), f"{proj['bucket']}/floor")
    for r in rows:
        r["vertices"] = w["vertices"]
    if not args.keep:
        import shutil
        shutil.rmtree(case)
    return rows


# ------------------------------------------------------------------ tables
HEADER = ["vertices", "build", "shard shape", "wall s", "time ours / reference",
          "objects added", "objects sharded / unsharded", "PUT", "GET", "HEAD", "LIST",
          "DELETE", "requests", "404s", "equivalent", "load before / after"]


def _n(v) -> str:
    return "-" if v is None else f"{v:,}"


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    by_size: dict[int, dict] = collections.defaultdict(dict)
    for r in rows:
        if r["build"] == "reference":
            by_size[r["vertices"]]["ref"] = r
        elif r.get("shard_shape") is None:
            by_size[r["vertices"]]["proj"] = r
    for r in rows:
        size = by_size[r["vertices"]]
        shard = r.get("shard_shape")
        shard_txt = "-" if shard is None else (str(shard) if isinstance(shard, int)
                                               else "x".join(map(str, shard)))
        head = [f"{r['vertices']:,}", r["build"], shard_txt]
        if r.get("skipped"):
            out.append(head + ["not run"] + ["-"] * (len(HEADER) - 4))
            continue
        if r.get("unsupported"):
            out.append(head + ["n/a (not supported by this version)"] + ["-"] * (len(HEADER) - 4))
            continue
        child = r["child"]
        if "killed_after" in child:
            wall = f"killed after {child['killed_after']:.0f} s"
        else:
            wall = f"{child['seconds']:.1f}"
        ratio = "-"
        ref = size.get("ref")
        if r["build"] == "project" and ref and ref.get("child", {}).get("seconds"):
            x = child["seconds"] / ref["child"]["seconds"]
            ratio = f"{x:.2f} ({1 / x:.1f}x faster)"
        objs = "-"
        base = size.get("proj")
        if shard is not None and base and base.get("objects_added"):
            x = r["objects_added"] / base["objects_added"]
            objs = f"{x:.3f} ({1 / x:.1f}x fewer)"
        q = r["requests"]
        nf = sum(r["audit"]["not_found"].values()) if r.get("audit_complete") else None
        load = f"{' '.join(map(str, r['load_before']))} / {' '.join(map(str, r['load_after']))}"
        out.append(head + [wall, ratio, _n(r["objects_added"]), objs, _n(q["PUT"]),
                           _n(q["GET"]) if q["HEAD"] is not None else f"{q['GET+HEAD']:,} (incl. HEAD)",
                           _n(q["HEAD"]), _n(q["LIST"]), _n(q["DELETE"]), _n(q["total"]),
                           _n(nf), r.get("equivalent", "-"), load])
    return out


def pattern_lines(rows: list[dict], top: int = 4) -> list[str]:
    """Where each build's requests went (from the audit records)."""
    lines = []
    for r in rows:
        a = r.get("audit")
        if not a or not r.get("audit_complete"):
            continue
        extras = []
        if a["read_back_after_put"]:
            extras.append("reads of keys it wrote earlier: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(a["read_back_after_put"].items())))
        if a["repeats"]:
            extras.append("repeated requests for one key: " + ", ".join(
                f"{k} {v:,}" for k, v in sorted(a["repeats"].items()) if v))
        if a["not_found"]:
            extras.append("404s: " + ", ".join(f"{k} {v:,}" for k, v in sorted(a["not_found"].items())))
        lines.append(f"- **{r['label']}** — " + "; ".join(extras))
        for kind in KINDS:
            pats = a["top_patterns"].get(kind)
            if pats:
                lines.append(f"  - {kind}: " + ", ".join(f"`{p}` {n:,}" for p, n in pats[:top]))
    return lines


def trace_lines(rows: list[dict], top: int = 12) -> list[str]:
    """The client-side trace (--trace): the calls each build made most."""
    lines = []
    for r in rows:
        tr = (r.get("child") or {}).get("trace")
        if not tr:
            continue
        lines += [f"- **{r['label']}** ({sum(n for *_k, n in tr):,} calls)"]
        lines += [f"  - {n:,} `{call}` `{pat}` from `{where}`" for call, pat, where, n in tr[:top]]
    return lines


def floor_lines(rows: list[dict]) -> list[str]:
    return [f"- S3 I/O floor at {r['vertices']:,} vertices: {r['floor']['seconds']:.1f} s "
            f"(GET {r['floor']['read_files']:,} level-0 objects, PUT "
            f"{r['floor']['write_files']:,} objects of the unsharded output's sizes, one process, "
            f"batches of 256)" for r in rows if r.get("floor")]


def report(rows: list[dict], meta: dict) -> str:
    return "\n".join([
        f"`{meta['command']}` (at `{meta['commit']}`)", "",
        f"{meta['what']}", "",
        bp.md_table(HEADER, table_rows(rows)), "", *floor_lines(rows), "",
        "Where the requests went (audit records; `*` = numeric key components):", "",
        *pattern_lines(rows), "",
        *(["Calls by site (client-side, `--trace`):", "", *trace_lines(rows), ""]
          if any((r.get("child") or {}).get("trace") for r in rows) else [])])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vertices", default="100000", help="comma-separated vertex counts")
    ap.add_argument("--root", default="/tmp/zvs3bench",
                    help="local folder for level 0 and the SeaweedFS server's data")
    ap.add_argument("--shard-shape", action="append", type=parse_shard, default=[],
                    help="also build sharded with this shard_shape (N, or per axis 4x4x2 or 4,4,2; "
                         "in chunks); repeat the flag for several sharded rows")
    ap.add_argument("--storage-option", action="append", type=parse_option, default=[],
                    help="an extra s3fs option for every build, both sides (e.g. "
                         "max_concurrency=1); repeatable")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--reference-timeout", type=float, default=900.0,
                    help="kill the reference after this many seconds (reported as such)")
    ap.add_argument("--no-reference-above", type=int, default=None,
                    help="skip the reference above this many vertices")
    ap.add_argument("--seed", type=int, default=0, help="data generation seed")
    ap.add_argument("--step", type=float, default=2.0, help="random-walk step sigma")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip downloading both outputs to compare them")
    ap.add_argument("--trace", action="store_true",
                    help="also count each build's S3 calls client-side by key pattern and calling "
                         "function (diagnostic; slows the builds a little)")
    ap.add_argument("--floor", action="store_true",
                    help="also time the S3 I/O floor of the unsharded output (bench_pyramid's: "
                         "get level 0, put as many objects of the output's sizes, batches of 256)")
    ap.add_argument("--keep", action="store_true", help="keep level 0 and the server's data")
    ap.add_argument("--json", default=None, help="write raw results as JSON here")
    ap.add_argument("--markdown", default=None, help="write the table as Markdown here")
    args = ap.parse_args(argv)

    args.storage_option = {k: v for d in args.storage_option for k, v in d.items()}
    sizes = [int(float(s)) for s in args.vertices.split(",") if s.strip()]
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    server = Server(root / "weed-data")
    rows: list[dict] = []
    try:
        for n in sizes:
            rows += bench_size(server, root, n, args)
    finally:
        server.stop()
        if not args.keep:
            import shutil
            shutil.rmtree(root / "weed-data", ignore_errors=True)
    here = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "-C", str(here), "log", "-1", "--format=%h %cs"],
                            capture_output=True, text=True).stdout.strip()
    meta = {
        "commit": commit,
        "command": "python " + " ".join(shlex.quote(a) for a in
                                        ["benchmarks/bench_s3.py", *(argv or sys.argv[1:])]),
        "what": (f"One SeaweedFS `weed mini` on 127.0.0.1 (same machine, {os.cpu_count()} cores); "
                 f"random-walk streamlines, factors {bp.FACTORS}, cross_level_storage="
                 f"{bp.CROSS_LEVEL_STORAGE!r}, cross_level_depth={bp.CROSS_LEVEL_DEPTH}; "
                 f"project on LocalCluster({args.workers} workers x {args.threads_per_worker} "
                 f"thread(s)); s3fs options beyond the endpoint and keys: "
                 f"{json.dumps(args.storage_option) if args.storage_option else 'none'} "
                 f"(both sides); wall s = the build call (the reference's includes `open_store`); "
                 f"requests counted by the server (Prometheus `SeaweedFS_s3_request_total`, "
                 f"HEAD split out of GET by the S3 audit log); objects = keys added to the "
                 f"bucket (`.zvdask/` bookkeeping included)."),
    }
    md = report(rows, meta)
    print(bp.text_table(HEADER, table_rows(rows)))
    print()
    print("\n".join(floor_lines(rows)))
    print("\n".join(pattern_lines(rows)))
    print("\n".join(trace_lines(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_child":
        mode, rest = sys.argv[2], sys.argv[3:]
        if mode == "reference":
            result = child_reference(rest[0])
        elif mode == "project":
            result = child_project(rest[0], int(rest[1]), int(rest[2]), rest[3])
        else:
            raise SystemExit(f"unknown child mode {mode}")
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
