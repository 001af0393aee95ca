"""Crash safety on a real multi-process cluster: a worker SIGKILLed
mid-build, the driver SIGKILLed mid-level and resumed, readers polling a
store while it is built, and a second build racing the first.

Every finished pyramid is compared file for file with the one
``zarr_vectors.build_pyramid`` writes for the same arguments.
"""

from __future__ import annotations

import hashlib
import json
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
from equivalence import compare_raw_files, scratch_left
from servers import subprocess_env
from stores import make_streamlines
from zarr_vectors_dask.errors import BuildError
from zarr_vectors_dask.storage.lock import LOCK_KEY

pytestmark = pytest.mark.integration

# Big enough that a 3-level build runs for a few seconds on 2 workers.
KW = dict(factors=[(2, 1), (2, 2), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
          cross_level_storage="explicit")
CLI_ARGS = ["--factors", "2:1,2:2,2:2", "--sparsity-seed", "0", "--cross-level-depth", "-1",
            "--cross-level-storage", "explicit", "--no-progress"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """(level-0 store, its reference pyramid), shared by the module."""
    d = tmp_path_factory.mktemp("crash-inputs")
    base, ref = d / "base.zv", d / "ref.zv"
    make_streamlines(str(base), seed=11, n_objects=800, max_len=200)
    shutil.copytree(base, ref)
    reference_build_pyramid(str(ref), **KW)
    return base, ref


@pytest.fixture
def store(inputs, tmp_path):
    path = tmp_path / "ours.zv"
    shutil.copytree(inputs[0], path)
    return path


def mid_level_2(store) -> bool:
    """Level 1 is summarised and level 2's cells are being written, but
    level 2 is not published yet."""
    return (os.path.exists(os.path.join(store, ".zvdask", "levels", "1.json.summary"))
            and os.path.isdir(os.path.join(store, "2", "vertices"))
            and not os.path.exists(os.path.join(store, "2", "zarr.json")))


def _files_digest(root, prune=lambda rel: False) -> dict[str, str]:
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


def _level0_arrays(store) -> dict[str, str]:
    """Level 0 minus its links group (the pyramid adds link families there)."""
    return _files_digest(os.path.join(store, "0"), prune=lambda rel: rel.split(os.sep)[0] == "links")


def _listed_levels(store) -> list[str]:
    with open(os.path.join(store, "zarr.json")) as fh:
        ms = json.load(fh)["attributes"].get("multiscales") or [{}]
    return [d["path"] for d in ms[0].get("datasets") or []]


def _assert_matches_reference(ref, store) -> None:
    diff = compare_raw_files(ref, store)
    assert diff.identical, diff.summary()


def _run_in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target():
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            out["error"] = exc
    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def _wait_for(cond, *, alive, timeout=120.0, interval=0.002) -> bool:
    """Poll ``cond`` while ``alive()``; True when it became true in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if cond():
            return True
        time.sleep(interval)
    return False


# ----------------------------------------------------------------- worker loss
def test_worker_killed_mid_build(private_dask_cluster, inputs, store):
    """A worker process SIGKILLed while level 1 is being written: Dask
    recomputes what it held, the rewrites are byte-identical, and the build
    finishes with the reference's pyramid; level 0's arrays are untouched."""
    cluster = private_dask_cluster
    level0 = _level0_arrays(store)
    with cluster.client() as client:
        t, out = _run_in_thread(lambda: zd.build_pyramid(str(store), client=client, **KW))
        started = _wait_for(lambda: os.path.isdir(os.path.join(store, "1")), alive=t.is_alive)
        assert started and t.is_alive(), out.get("error") or "build ended before level 1 began"
        assert not os.path.exists(os.path.join(store, "1", "zarr.json"))
        victim = cluster.worker_pids[0]
        cluster.kill_worker(0)
        assert cluster.worker_pids[0] is None and victim is not None
        cluster.add_worker()  # the cluster keeps two workers
        t.join(timeout=180)
        assert not t.is_alive(), "build hung after a worker was killed"
        if "error" in out:
            raise out["error"]
        assert out["result"]["levels_created"] == 3
    _assert_matches_reference(inputs[1], store)
    assert _level0_arrays(store) == level0


# ----------------------------------------------------------------- driver loss
def _cli(store, address, *extra, timeout=300):
    return subprocess.run([sys.executable, "-m", "zarr_vectors_dask.cli", "pyramid", str(store),
                           "--scheduler", address, *CLI_ARGS, *extra],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def test_driver_killed_mid_level_then_resume(private_dask_cluster, inputs, store):
    """``zvdask pyramid`` SIGKILLed while level 2 is being written (level 1
    committed): a plain rerun is refused by the crashed build's lock,
    ``--resume`` keeps level 1 as it is, discards the partial level 2,
    rebuilds and ends with the reference's pyramid and no build state."""
    address = private_dask_cluster.address
    level0 = _level0_arrays(store)
    p = subprocess.Popen([sys.executable, "-m", "zarr_vectors_dask.cli", "pyramid", str(store),
                          "--scheduler", address, *CLI_ARGS], env=subprocess_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        hit = _wait_for(lambda: mid_level_2(store), alive=lambda: p.poll() is None, interval=0.001)
        os.kill(p.pid, signal.SIGKILL)  # the CLI has no children: --scheduler
    finally:
        p.wait(timeout=30)
    assert hit, f"never saw level 2 in progress (exit {p.returncode}): {p.stderr.read()[-2000:]}"
    assert p.returncode == -signal.SIGKILL

    # What the crash left: level 1 published, level 2 partial and unlisted.
    assert os.path.exists(os.path.join(store, "1", "zarr.json"))
    assert not os.path.exists(os.path.join(store, "2", "zarr.json"))
    assert _listed_levels(store) == ["0", "1"]
    assert os.path.exists(os.path.join(store, LOCK_KEY))
    assert _level0_arrays(store) == level0
    lock = open(os.path.join(store, LOCK_KEY), "rb").read()
    st1 = os.stat(os.path.join(store, "1", "zarr.json"))
    kept_cells = {rel: os.stat(os.path.join(store, "1", rel)).st_ino
                  for rel in _files_digest(os.path.join(store, "1"),
                                           prune=lambda rel: rel.split(os.sep)[0] == "links")}
    # Something only a discard removes.
    marker = os.path.join(store, "2", "vertices", "left-by-the-crash")
    open(marker, "wb").close()
    # What a writer killed between its temporary write and the rename
    # leaves (ours, then zarr's), in a kept level and at the root.
    for rel in (os.path.join("1", "vertices", "zarr.json.tmp-99999-0badf00d"),
                "zarr.json.tmp-99999-0badf00d",
                os.path.join("1", "object_index", "manifests", "c", "0." + "ab" * 16 + ".partial")):
        os.makedirs(os.path.dirname(os.path.join(store, rel)), exist_ok=True)
        open(os.path.join(store, rel), "wb").close()

    # (a) no flag: the crashed build's lock refuses, naming its owner and --resume.
    plain = _cli(store, address)
    assert plain.returncode == 2, plain.stdout + plain.stderr
    assert "holds the lock" in plain.stderr and "--resume" in plain.stderr, plain.stderr
    assert f"its process {p.pid} on this host has ended" in plain.stderr, plain.stderr
    assert str(store) in plain.stderr
    assert open(os.path.join(store, LOCK_KEY), "rb").read() == lock
    assert os.path.exists(marker)

    # (b) --resume takes the lock over and finishes; orphaned tasks of the
    # killed driver may still be running now (they write the same bytes).
    resumed = _cli(store, address, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "built 3 level(s)" in resumed.stdout
    assert not os.path.exists(marker)
    after1 = os.stat(os.path.join(store, "1", "zarr.json"))
    assert (after1.st_ino, after1.st_mtime_ns) == (st1.st_ino, st1.st_mtime_ns), \
        "committed level 1 was rewritten"
    for rel, ino in kept_cells.items():
        assert os.stat(os.path.join(store, "1", rel)).st_ino == ino, f"1/{rel} was rewritten"
    assert not scratch_left(store)
    _assert_matches_reference(inputs[1], store)
    assert _level0_arrays(store) == level0


class _DriverKilled(BaseException):
    pass


def test_crash_inside_a_level_commit_is_resumed(local_client, twin_stores, monkeypatch):
    """The driver dies after level 2's group document is written but before
    the root lists it: resume rebuilds level 2 instead of refusing it."""
    from zarr_vectors_dask.format import commit as cm
    _, ref, store = twin_stores(make_streamlines, seed=8)
    kw = dict(factors=[(2, 1), (2, 2)], sparsity_seed=2, cross_level_depth=-1,
              cross_level_storage="explicit")
    reference_build_pyramid(str(ref), **kw)
    real = cm.write_root_attrs

    def dies_publishing_level_2(st, attrs):
        if os.path.exists(os.path.join(store, "2", "zarr.json")):
            raise _DriverKilled
        real(st, attrs)
    monkeypatch.setattr(cm, "write_root_attrs", dies_publishing_level_2)
    with pytest.raises(_DriverKilled):
        zd.build_pyramid(str(store), client=local_client, **kw)
    monkeypatch.setattr(cm, "write_root_attrs", real)
    assert os.path.exists(os.path.join(store, "2", "zarr.json"))
    assert _listed_levels(store) == ["0", "1"]
    zd.build_pyramid(str(store), client=local_client, resume=True, **kw)
    _assert_matches_reference(ref, store)


def test_resume_waits_for_a_killed_drivers_running_tasks(local_client):
    """Tasks already running when their driver died go on running (and
    writing); resume must not start discarding before they end."""
    from zarr_vectors_dask.resume import wait_for_orphans
    from zarr_vectors_dask.runtime import _live_tasks

    def orphans():
        return sum(local_client.run(_live_tasks, "", ("cancelled",)).values())
    from zarr_vectors_dask.storage.store import Store
    code = ("import sys, time\nfrom distributed import Client\n"
            f"c = Client({local_client.scheduler.address!r})\n"
            "fs = [c.submit(time.sleep, 3, pure=False) for _ in range(2)]\n"
            "while not any(c.processing().values()): time.sleep(0.01)\n"
            "print('running', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                         env=subprocess_env())
    try:
        assert p.stdout.readline().strip() == "running"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    assert _wait_for(lambda: orphans() > 0,
                     alive=lambda: True, timeout=10), "no orphaned task seen"
    wait_for_orphans(local_client, Store.from_url("memory://unused"))
    assert orphans() == 0


# ----------------------------------------------------------------- publication
def _level_snapshot(store, level: str) -> dict[str, str]:
    """A level's files, minus link families not yet published (their cells
    are written before the family's zarr.json by later steps)."""
    root = os.path.join(store, level)

    def prune(rel):
        parts = rel.split(os.sep)
        if parts[0] != "links" or len(parts) == 1 or parts[1] == "zarr.json":
            return False
        return not os.path.exists(os.path.join(root, "links", parts[1], "zarr.json"))
    return _files_digest(root, prune=prune)


def test_during_a_build_readers_see_complete_levels_and_a_second_build_is_refused(
        local_client, inputs, store):
    """While a build runs: every level the root lists is readable in full
    with zarr-vectors' own reader, and what a reader saw is what the
    finished store holds; a real second build (also with overwrite) is
    refused naming the lock's owner, and disturbs nothing."""
    from zarr_vectors.types.polylines import read_polylines
    level0 = _level0_arrays(store)
    seen: dict[str, dict[str, str]] = {}
    t, out = _run_in_thread(lambda: zd.build_pyramid(str(store), client=local_client, **KW))
    assert _wait_for(lambda: os.path.exists(os.path.join(store, LOCK_KEY)), alive=t.is_alive)
    with pytest.raises(BuildError, match=r"another pyramid build holds the lock \(.+:\d+\).*resume"):
        zd.build_pyramid(str(store), client=local_client, **KW)
    with pytest.raises(BuildError, match="holds the lock"):
        zd.build_pyramid(str(store), client=local_client, overwrite=True, **KW)
    refused_mid_build = t.is_alive()
    observations, max_listed = 0, 0
    while t.is_alive():
        listed = _listed_levels(store)
        for level in listed:
            assert os.path.exists(os.path.join(store, level, "zarr.json")), level
            if level in seen:
                continue
            # First sight of a level: read it in full, note what it holds.
            snap = _level_snapshot(store, level)
            res = read_polylines(str(store), level=int(level))
            assert res["polyline_count"] > 0, level
            seen[level] = snap
        observations += 1
        max_listed = max(max_listed, len(listed))
        time.sleep(0.02)
    t.join()
    if "error" in out:
        raise out["error"]
    assert refused_mid_build, "the first build ended before the second one was tried"
    assert observations >= 3 and max_listed >= 2, (observations, max_listed)
    for level, files in seen.items():
        final = _files_digest(os.path.join(store, level))
        changed = [rel for rel, d in files.items() if final.get(rel) != d]
        assert not changed, f"level {level}: a reader saw content that changed later: {changed[:5]}"
    assert not scratch_left(store)
    _assert_matches_reference(inputs[1], store)
    assert _level0_arrays(store) == level0
