"""Safe at every instant (issue 13).

* A crash sweep: the driver (``zvdask pyramid`` on a long-lived scheduler
  with worker processes) SIGKILLed at moments spread over a 3-level
  explicit build, and once after the build returned; ``resume`` with the
  same arguments always ends with the reference's pyramid and no scratch,
  and on a finished pyramid rewrites nothing.  Locally and on S3.
* The lock: exclusive (two builds at once, one proceeds), owner-checked
  release, lease-based take-over.
* Damaged level-0 data fails the build naming array and chunk, before
  anything is published; transient errors are not called corruption.
* Errors a person can read: one CLI line, no worker log spill.
"""

from __future__ import annotations

import hashlib
import json
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

import zarr_vectors_dask as zd
from equivalence import MANIFEST_DIGESTS, SOURCE_RECORD, compare_raw_files, scratch_left
from servers import subprocess_env
from stores import make_streamlines
from zarr_vectors_dask.errors import CorruptChunkError
from zarr_vectors_dask.format import cells as fcells
from zarr_vectors_dask.storage.lock import BuildLock, LOCK_KEY
from zarr_vectors_dask.storage.store import Store

KW = dict(factors=[(2, 1), (2, 2), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
          cross_level_storage="explicit")
CLI_ARGS = ["--factors", "2:1,2:2,2:2", "--sparsity-seed", "0", "--cross-level-depth", "-1",
            "--cross-level-storage", "explicit", "--no-progress"]


def _digest(root, prune=lambda rel: False) -> dict[str, str]:
    out = {}
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not prune(os.path.relpath(os.path.join(d, x), root))]
        for f in files:
            p = os.path.join(d, f)
            rel = os.path.relpath(p, root)
            if not prune(rel):
                with open(p, "rb") as fh:
                    out[rel] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _level0(store) -> dict[str, str]:
    return _digest(os.path.join(store, "0"), prune=lambda rel: rel.split(os.sep)[0] == "links")


def _mtimes(root) -> dict[str, int]:
    return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, fs in os.walk(root) for f in fs}


def _levels_listed(read_root_doc) -> int:
    """How many levels the root's multiscales lists (-1: no readable root
    document); ``read_root_doc()`` returns its bytes."""
    try:
        ms = json.loads(read_root_doc())["attributes"].get("multiscales") or [{}]
        return len(ms[0].get("datasets") or [])
    except (OSError, ValueError):
        return -1


def _listed(store) -> int:
    def read():
        with open(os.path.join(store, "zarr.json"), "rb") as fh:
            return fh.read()
    return _levels_listed(read)


def _driver(store, address, *extra_args, env_extra=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zarr_vectors_dask.cli", "pyramid", str(store),
                             "--scheduler", address, *CLI_ARGS, *extra_args],
                            env=subprocess_env(env_extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait(cond, alive, timeout=120.0, interval=0.002) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if not alive():
            return cond()
        time.sleep(interval)
    return False


class _Sweep:
    """Kill moments placed by phase.  A phase is the number of levels the
    root lists while the lock is held (1 = building level 1, ..., 4 = the
    closing composition); its length is measured on a clean run.  A moment
    is (phase, offset): wait for the phase to begin, then ``offset`` s.
    Placing moments by phase rather than by a fraction of the whole span
    keeps every phase swept when a loaded machine slows a kill run down."""

    def __init__(self, exists, phase, poll: float = 0.002):
        self.exists = exists  # exists(relative key) on the store
        self.phase = phase  # levels the root lists now
        self.poll = poll  # s between probes (an S3 probe is a request)

    def clean_run(self, start_driver) -> dict[int, float]:
        """Length in seconds of every phase of a clean build."""
        p = start_driver()
        begun: dict[int, float] = {}
        try:
            assert _wait(lambda: self.exists(LOCK_KEY), alive=lambda: p.poll() is None,
                         interval=self.poll), p.stderr.read()[-2000:]

            def done() -> bool:
                begun.setdefault(self.phase(), time.monotonic())
                return not self.exists(LOCK_KEY)
            assert _wait(done, alive=lambda: p.poll() is None, timeout=900,
                         interval=max(self.poll, 0.01))
            end = time.monotonic()
            assert p.wait(timeout=120) == 0, p.stderr.read()[-2000:]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        starts = sorted(begun.items())
        return {k: (starts[i + 1][1] if i + 1 < len(starts) else end) - t
                for i, (k, t) in enumerate(starts)}

    def moments(self, lengths: dict[int, float], per_phase: int) -> list[tuple[int, float]]:
        """``per_phase`` moments spread over each phase, the first at its start."""
        return [(k, length * j / per_phase) for k, length in sorted(lengths.items())
                for j in range(per_phase)]

    def kill_at(self, start_driver, moment: tuple[int, float] | None, probe) -> dict:
        """Start a driver; SIGKILL it at ``moment`` (None: right after its
        build returned).  What it saw at the kill."""
        p = start_driver()
        seen: dict = {}
        try:
            assert _wait(lambda: self.exists(LOCK_KEY), alive=lambda: p.poll() is None,
                         interval=self.poll), p.stderr.read()[-2000:]
            if moment is None:
                _wait(lambda: not self.exists(LOCK_KEY), alive=lambda: p.poll() is None,
                      interval=self.poll / 2)
            else:
                phase, offset = moment
                _wait(lambda: self.phase() >= phase, alive=lambda: p.poll() is None,
                      timeout=900, interval=self.poll)
                time.sleep(offset)
            seen = probe()
            seen["alive"] = p.poll() is None
            seen["moment"] = moment
            # A late moment can fall just after the driver exited: then it
            # is a kill after the build returned, still a moment to resume from.
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        finally:
            p.wait(timeout=30)
        return seen


# ------------------------------------------------------------------ crash sweep
def _sweep_store(tmp_path_factory, name, **kw):
    """A level-0 store and the reference's pyramid of a copy of it."""
    d = tmp_path_factory.mktemp(name)
    base, ref = d / "base.zv", d / "ref.zv"
    make_streamlines(str(base), **kw)
    shutil.copytree(base, ref)
    reference_build_pyramid(str(ref), **KW)
    return base, ref


@pytest.fixture(scope="module")
def sweep_inputs(tmp_path_factory):
    return _sweep_store(tmp_path_factory, "sweep-inputs", seed=11, n_objects=500, max_len=150)


@pytest.fixture(scope="module")
def small_sweep_inputs(tmp_path_factory):
    """A smaller store for the S3 sweep, whose every request is a round trip:
    chunks twice as wide, so a fifth of the objects."""
    return _sweep_store(tmp_path_factory, "small-sweep-inputs", seed=12, n_objects=80,
                        max_len=60, chunk_shape=50.0)


@pytest.mark.integration
def test_crash_sweep_local(dask_cluster, sweep_inputs, tmp_path):
    """SIGKILL the driver at three moments in each phase of the build (each
    level, the composition) and once after it returned; each time
    ``resume`` finishes with the reference's pyramid, no scratch and level 0
    untouched.  Resume on the finished pyramid rewrites nothing; the CLI's
    ``--resume`` on it succeeds."""
    base, ref = sweep_inputs
    address = dask_cluster.address
    clean = tmp_path / "clean.zv"
    shutil.copytree(base, clean)
    sweep = _Sweep(lambda key: os.path.exists(os.path.join(clean, key)),
                   phase=lambda: _listed(clean))
    lengths = sweep.clean_run(lambda: _driver(clean, address))
    assert sorted(lengths) == [1, 2, 3, 4], lengths
    assert compare_raw_files(ref, clean).identical
    level0 = _level0(base)

    moments = sweep.moments(lengths, per_phase=3)
    seen = []
    with dask_cluster.client() as client:
        for i, m in enumerate([*moments, None]):
            store = tmp_path / f"kill-{i}.zv"
            shutil.copytree(base, store)
            sweep.exists = lambda key, s=store: os.path.exists(os.path.join(s, key))
            sweep.phase = lambda s=store: _listed(s)
            s = sweep.kill_at(lambda s=store: _driver(s, address), m,
                              lambda s=store: {"lock": os.path.exists(os.path.join(s, LOCK_KEY)),
                                               "listed": _listed(s)})
            seen.append(s)
            zd.build_pyramid(str(store), client=client, resume=True, **KW)
            diff = compare_raw_files(ref, store)
            assert diff.identical, f"kill {i} (moment {m}, saw {s}):\n{diff.summary()}"
            assert not scratch_left(store), f"kill {i}: scratch left"
            assert _level0(store) == level0
            if i < len(moments):
                shutil.rmtree(store)
    # The kills really landed inside the build, in every phase of it.
    print(f"clean build phases {lengths}; kills saw {seen}")
    mid = [s for s in seen[:-1] if s["lock"] and s["alive"]]
    assert len(mid) >= len(moments) - 2, (lengths, seen)
    assert {s["listed"] for s in mid} == {1, 2, 3, 4}, (lengths, seen)
    assert seen[-1]["alive"] and not seen[-1]["lock"], seen[-1]

    # Resume on a finished pyramid: a no-op (nothing rewritten), in process
    # and from the CLI, and it still equals the reference.
    before = _mtimes(store)
    with dask_cluster.client() as client:
        out = zd.build_pyramid(str(store), client=client, resume=True, **KW)
    assert out["levels_created"] == 3
    cli = _driver(store, address, "--resume")
    _, err = cli.communicate(timeout=120)
    assert cli.returncode == 0, err
    assert _mtimes(store) == before
    assert compare_raw_files(ref, store).identical
    assert not scratch_left(store)


@pytest.mark.integration
def test_crash_sweep_s3(dask_cluster, s3_server, small_sweep_inputs, tmp_path):
    """The same sweep on S3 (SeaweedFS), at fewer moments, on a smaller store."""
    base, ref = small_sweep_inputs
    address = dask_cluster.address
    fs = s3_server.fs()
    opts = s3_server.storage_options
    cli_opts = ["--storage-option", f"key={opts['key']}", "--storage-option",
                f"secret={opts['secret']}", "--storage-option",
                f"client_kwargs.endpoint_url={opts['client_kwargs']['endpoint_url']}"]

    def upload():
        bucket = s3_server.new_bucket()
        fs.put(str(base), f"{bucket}/x.zv", recursive=True)
        return bucket, s3_server.url(bucket, "x.zv")

    def exists_in(bucket):
        def exists(key):
            fs.invalidate_cache()
            return fs.exists(f"{bucket}/x.zv/{key}")
        return exists

    def listed_in(bucket):
        return lambda: _levels_listed(lambda: fs.cat(f"{bucket}/x.zv/zarr.json"))

    bucket, url = upload()
    sweep = _Sweep(exists_in(bucket), listed_in(bucket), poll=0.05)
    lengths = sweep.clean_run(lambda: _driver(url, address, *cli_opts))
    assert sorted(lengths) == [1, 2, 3, 4], lengths
    # Into level 1, at the start of level 3, into the composition.
    moments = [(1, lengths[1] / 2), (3, 0.0), (4, lengths[4] / 2)]
    seen = []
    with dask_cluster.client() as client:
        for i, m in enumerate([*moments, None]):
            bucket, url = upload()
            sweep.exists, sweep.phase = exists_in(bucket), listed_in(bucket)
            s = sweep.kill_at(lambda u=url: _driver(u, address, *cli_opts), m,
                              lambda b=bucket: {"lock": exists_in(b)(LOCK_KEY)})
            seen.append(s)
            zd.build_pyramid(url, client=client, resume=True, storage_options=opts, **KW)
            fs.invalidate_cache()
            left = [p for p in fs.find(f"{bucket}/x.zv/.zvdask")
                    if not p.endswith("/" + SOURCE_RECORD) and f"/{MANIFEST_DIGESTS}/" not in p]
            assert not left, f"kill {i} (moment {m}): scratch left {left}"
            local = tmp_path / f"s3-{i}.zv"
            fs.get(f"{bucket}/x.zv", str(local), recursive=True)
            diff = compare_raw_files(ref, local)
            assert diff.identical, f"kill {i} (moment {m}, saw {s}):\n{diff.summary()}"
        assert sum(1 for s in seen[:-1] if s["lock"] and s["alive"]) >= 2, (lengths, seen)
        # no-op on the finished pyramid
        keys = {p: fs.info(p)["LastModified"] for p in fs.find(f"{bucket}/x.zv")}
        zd.build_pyramid(url, client=client, resume=True, storage_options=opts, **KW)
        fs.invalidate_cache()
        assert {p: fs.info(p)["LastModified"] for p in fs.find(f"{bucket}/x.zv")} == keys


# ------------------------------------------------------------------ the lock
def _race(store: Store, n: int = 6, rounds: int = 10) -> None:
    """``n`` threads take the lock at the same instant, ``rounds`` times:
    exactly one wins each time; the winner's release frees it."""
    for _ in range(rounds):
        barrier = threading.Barrier(n)
        won, lost = [], []

        def contender():
            lock = BuildLock(store)
            barrier.wait()
            try:
                lock.acquire(resume=False)
                won.append(lock)
            except zd.BuildError:
                lost.append(lock)
        threads = [threading.Thread(target=contender) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(won) == 1 and len(lost) == n - 1, (len(won), len(lost))
        won[0].release()
        assert store.get(LOCK_KEY) is None


def test_lock_is_exclusive_locally(tmp_path):
    (tmp_path / "s.zv").mkdir()
    _race(Store.from_url(str(tmp_path / "s.zv")))


@pytest.mark.integration
def test_lock_is_exclusive_on_s3(s3_server):
    store = Store.from_url(s3_server.url(s3_server.new_bucket(), "s.zv"),
                           s3_server.storage_options)
    _race(store, n=4, rounds=5)


def _store_dir(tmp_path) -> Store:
    (tmp_path / "s.zv").mkdir(exist_ok=True)
    return Store.from_url(str(tmp_path / "s.zv"))


def _take_over_once_expired(store, timeout: float = 60.0) -> BuildLock:
    """A resuming build's lock, taken as soon as the holder's lease has
    expired as the lock itself judges it (retrying its "within its lease"
    refusal), not after a guessed sleep."""
    b = BuildLock(store)
    deadline = time.monotonic() + timeout
    while True:
        try:
            b.acquire(resume=True)
            return b
        except zd.BuildError as exc:
            if "within its" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def test_release_never_removes_a_successors_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("ZVDASK_LOCK_LEASE", "1")
    store = _store_dir(tmp_path)
    a = BuildLock(store)
    a.acquire(resume=False)
    a._stop.set()  # A hangs: no more heartbeats
    a._thread.join()
    a._stop.clear()
    b = _take_over_once_expired(store)  # A's lease has expired: B takes over
    assert b.took_over["token"] == a.token
    assert not a.renew() and "taken over" in a.lost
    with pytest.raises(zd.BuildError, match="taken over"):
        a.check()
    a.release()
    assert json.loads(store.get(LOCK_KEY))["token"] == b.token  # still B's
    b.release()
    assert store.get(LOCK_KEY) is None and not os.path.exists(store.path(".zvdask"))


def test_resume_refuses_a_live_lease_and_takes_over_a_dead_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("ZVDASK_LOCK_LEASE", "2")
    store = _store_dir(tmp_path)
    a = BuildLock(store)
    renewed = threading.Event()
    beat = a.renew

    def renew():  # the heartbeat thread looks ``renew`` up on the instance
        ok = beat()
        if time.time() - a._started > a.lease:
            renewed.set()
        return ok

    a.renew = renew
    a.acquire(resume=False)
    try:
        # Longer than the lease since A took the lock, but A has renewed it.
        assert renewed.wait(60), "A's heartbeat never ran past its first lease"
        with pytest.raises(zd.BuildError, match=r"holds the lock \(.+:\d+\) and its last "
                                                r"heartbeat is \d+ s old, within its 2 s lease"):
            BuildLock(store).acquire(resume=True)
    finally:
        a.release()
    # A dead process on this host: taken over at once, lease or not.
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    doc = {"owner": f"{os.uname().nodename}:{p.pid}", "host": os.uname().nodename,
           "pid": p.pid, "token": "dead", "heartbeat": time.time(), "lease": 600}
    store.put(LOCK_KEY, json.dumps(doc).encode())
    with pytest.raises(zd.BuildError, match=f"its process {p.pid} on this host has ended"):
        BuildLock(store).acquire(resume=False)
    c = BuildLock(store)
    c.acquire(resume=True)
    assert c.took_over["token"] == "dead"
    c.release()


def test_a_killed_owners_lock_temporaries_are_removed_a_live_ones_kept(tmp_path):
    """A driver killed between renaming its lock aside and unlinking it
    (the last instant of a release) leaves ``lock.json.old-*``; the next
    lock holder removes it.  A live contender's ``.new-*`` stays."""
    store = _store_dir(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    host = os.uname().nodename

    def doc(pid, token):
        return json.dumps({"owner": f"{host}:{pid}", "host": host, "pid": pid, "token": token,
                           "heartbeat": time.time(), "lease": 600}).encode()
    os.makedirs(store.path(".zvdask"))
    dead = store.path(".zvdask/lock.json.old-" + "a" * 32)
    live = store.path(".zvdask/lock.json.new-" + "b" * 32)
    open(dead, "wb").write(doc(p.pid, "dead"))
    open(live, "wb").write(doc(os.getpid(), "live"))
    lock = BuildLock(store)
    lock.acquire(resume=False)
    lock.release()
    assert not os.path.exists(dead)
    assert os.path.exists(live)


def _race_two_builds(url, client, **storage) -> list:
    """Two real builds of one store started at the same instant."""
    kw = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
              cross_level_storage="explicit")
    barrier = threading.Barrier(2)
    results: list = []

    def build():
        barrier.wait()
        try:
            results.append(zd.build_pyramid(url, client=client, **kw, **storage))
        except zd.BuildError as exc:
            results.append(exc)
    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) == 2 and len(errors) == 1, results
    assert "holds the lock" in str(errors[0]) or "already exists" in str(errors[0])
    return kw


def test_two_builds_at_once_one_proceeds(local_client, twin_stores):
    """Two real builds started at the same instant on one store: one
    builds the reference's pyramid, the other is refused by the lock."""
    _, ref, store = twin_stores(make_streamlines, seed=3, n_objects=60)
    kw = _race_two_builds(store, local_client)
    reference_build_pyramid(ref, **kw)
    assert compare_raw_files(ref, store).identical
    assert not scratch_left(store)


@pytest.mark.integration
@pytest.mark.slow  # S3 variant; the local race and test_lock_is_exclusive_on_s3 run in CI
def test_two_builds_at_once_on_s3_one_proceeds(local_client, twin_stores, s3_server, tmp_path):
    """The same race on S3 (SeaweedFS): the conditional put lets one in."""
    base, ref, _ = twin_stores(make_streamlines, seed=3, n_objects=60)
    fs = s3_server.fs()
    bucket = s3_server.new_bucket()
    fs.put(base, f"{bucket}/x.zv", recursive=True)
    kw = _race_two_builds(s3_server.url(bucket, "x.zv"), local_client,
                          storage_options=s3_server.storage_options)
    reference_build_pyramid(ref, **kw)
    got = tmp_path / "got.zv"
    fs.invalidate_cache()
    fs.get(f"{bucket}/x.zv", str(got), recursive=True)
    assert compare_raw_files(ref, got).identical
    assert not scratch_left(got)


# ------------------------------------------------------------------ damaged data
@pytest.mark.parametrize("array", ["object_ids", "manifests"])
def test_truncated_index_cell_fails_naming_array_and_chunk(local_client, twin_stores, array):
    _, _, store = twin_stores(make_streamlines, seed=4, n_objects=40)
    cell = os.path.join(store, "0", "object_index", array, "c", "0")
    with open(cell, "r+b") as fh:
        fh.truncate(max(1, os.path.getsize(cell) // 2))
    level0 = _level0(store)
    root = open(os.path.join(store, "zarr.json"), "rb").read()
    with pytest.raises(CorruptChunkError,
                       match=rf"0/object_index/{array} chunk 0: cannot be read or decoded"):
        zd.build_pyramid(store, factors=[(2, 1)], client=local_client)
    assert _level0(store) == level0
    assert open(os.path.join(store, "zarr.json"), "rb").read() == root  # nothing published
    assert not os.path.exists(os.path.join(store, "1", "zarr.json"))
    assert not os.path.exists(os.path.join(store, LOCK_KEY))


def test_only_a_missing_id_array_means_rows_are_ids(twin_stores):
    from zarr_vectors_dask.step.source import read_source_level
    from zarr_vectors_dask.step.objects import read_object_ids
    _, _, store = twin_stores(make_streamlines, seed=4, n_objects=40)
    st = Store.from_url(store)
    shutil.rmtree(os.path.join(store, "0", "object_index", "object_ids"))
    src = read_source_level(st, 0, 3)
    assert read_object_ids(st, 0, src.n_rows).tolist() == list(range(src.n_rows))


def test_transient_read_errors_are_retried_not_called_corruption(monkeypatch):
    import zarr_vectors_dask.storage.store as store_mod
    monkeypatch.setattr(store_mod, "_backoff", lambda attempt: 0.0)
    local = Store.from_url("/tmp")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return b"ok"
    assert fcells.read_chunk_checked(local, "0/x", "chunk 0", flaky) == b"ok"
    remote = Store.from_url("memory://zv")  # object stores retry inside the zarr store

    def down():
        raise ConnectionResetError("connection reset by peer")
    with pytest.raises(ConnectionResetError):
        fcells.read_chunk_checked(remote, "0/x", "chunk 0", down)

    def garbage():
        raise ValueError("zstd: corrupted block")
    with pytest.raises(CorruptChunkError, match="0/x chunk 3: cannot be read"):
        fcells.read_chunk_checked(local, "0/x", "chunk 3", garbage)


def test_failing_cleanup_never_masks_the_error(local_client, twin_stores, monkeypatch):
    _, _, store = twin_stores(make_streamlines, seed=4, n_objects=40)
    cell = os.path.join(store, "0", "object_index", "manifests", "c", "0")
    with open(cell, "r+b") as fh:
        fh.truncate(3)

    def broken_release(self):
        raise OSError("store went away during cleanup")
    monkeypatch.setattr(BuildLock, "release", broken_release)
    with pytest.raises(CorruptChunkError) as info:
        zd.build_pyramid(store, factors=[(2, 1)], client=local_client)
    assert "store went away during cleanup" in "".join(getattr(info.value, "__notes__", []))


# ------------------------------------------------------------------ readable errors
@pytest.mark.integration
def test_cli_failure_is_one_line_without_worker_logs(twin_stores):
    _, _, store = twin_stores(make_streamlines, seed=4, n_objects=40)
    with open(os.path.join(store, "0", "object_index", "manifests", "c", "0"), "r+b") as fh:
        fh.truncate(3)
    cmd = [sys.executable, "-m", "zarr_vectors_dask.cli", "pyramid", store, "--factors", "2:1",
           "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("zvdask: error: ") and "0/object_index/manifests chunk 0" in lines[0]
    assert "Compute Failed" not in r.stdout + r.stderr and "Traceback" not in r.stderr
    v = subprocess.run(cmd + ["--verbose"], capture_output=True, text=True, timeout=300,
                       env=subprocess_env())
    assert v.returncode == 2 and "Traceback" in v.stderr and "CorruptChunkError" in v.stderr
