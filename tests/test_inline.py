"""Small graphs in one task: a step (or the composition) whose source level
has at most ``zarr-vectors-dask.inline-vertices`` vertices runs its whole
graph inside one worker task (``runtime.run_inline``), by Dask's
synchronous scheduler.  The bytes are the distributed graph's; an error
inside returns as itself with nothing published; a driver killed mid-way
is resumed.  (The rest of our suite runs every graph task by task:
conftest sets the limit to 0.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import dask
import numpy as np
import pytest
from zarr_vectors.core.store import open_store
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.ops.edit import EditSession
from zarr_vectors.ops.refs import VertexRef

import zarr_vectors_dask as zd
from distributed import get_task_stream
from conftest import INLINE_ENV
from equivalence import compare_raw_files, scratch_left
from servers import subprocess_env
from stores import make_streamlines
from zarr_vectors_dask.errors import PlanError
from zarr_vectors_dask.planning.plan import (DEFAULT_INLINE_VERTICES, INLINE_CONFIG, inline_limit,
                                             plan_pyramid_from_meta, runs_inline)
from zarr_vectors_dask.step import shuffle

KW = dict(factors=[(2, 1), (2, 2), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
          cross_level_storage="explicit")
ALL_INLINE = {INLINE_CONFIG: 10 ** 9}


def _function(key) -> str:
    name = key[0] if isinstance(key, tuple) else key
    return str(name).rsplit("-", 1)[0]


def _sidecar(rel: str) -> bool:
    return rel.split(os.sep)[0] == ".zvdask"


# ------------------------------------------------------------ the choice
def test_runs_inline_is_a_limit_on_the_source_vertices():
    assert runs_inline(10, 10) and runs_inline(1, 10)
    assert not runs_inline(11, 10)
    assert not runs_inline(5, 0)  # 0: never
    assert not runs_inline(0, 10)  # nothing to run


def test_a_level_with_more_objects_than_the_limit_runs_task_by_task():
    """A small level can index millions of objects: their manifests would
    all sit in one task, so objects count against the limit too."""
    assert runs_inline(10, 10, 10) and runs_inline(10, 10)
    assert not runs_inline(10, 10, 11)
    assert not runs_inline(1, 10, 11)


def test_the_plan_says_which_steps_run_in_one_task():
    """Steps planned from a source estimate under the limit run inline,
    and the printed plan says so, with the graph's own task counts."""
    plan = plan_pyramid_from_meta(
        store="mem://x", ndim=3, root_chunk_shape=(10.0,) * 3, root_bin=(1.0,) * 3,
        bounds=((0.0,) * 3, (99.0,) * 3), level0_chunks=1000, level0_vertices=3_000_000,
        n_objects=50_000, factors=[(2, 1), (4, 1), (4, 1)], n_workers=2,
        inline_vertices=1_000_000)
    flags = [lv.inline for lv in plan.levels]
    assert flags == [lv.source_vertices <= 1_000_000 for lv in plan.levels]
    assert flags[0] is False and flags[-1] is True, [lv.source_vertices for lv in plan.levels]
    task_lines = [ln for ln in str(plan).splitlines() if ln.startswith("  tasks ")]
    assert ["in one task" in ln for ln in task_lines] == flags
    total = sum(sum(lv.tasks.values()) for lv in plan.levels)
    assert f"total tasks: {total}" in str(plan)  # the same graphs, counted as before


def test_the_limit_is_dask_config_and_bad_values_are_refused():
    with dask.config.set({INLINE_CONFIG: 12345}):
        assert inline_limit() == 12345
    for bad in ("many", -1, 2.5, True):
        with dask.config.set({INLINE_CONFIG: bad}):
            with pytest.raises(PlanError, match=INLINE_CONFIG):
                inline_limit()
    saved = os.environ.pop(INLINE_ENV)
    try:
        dask.config.refresh()
        assert inline_limit() == DEFAULT_INLINE_VERTICES
    finally:
        os.environ[INLINE_ENV] = saved
        dask.config.refresh()


# ------------------------------------------------------------ the same bytes
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("inline") / "base.zv"
    make_streamlines(str(path), seed=23, n_objects=300, max_len=120)
    return path


def _edit(path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = open_store(str(path), mode="r+")
        with EditSession(root, atomic=False) as ed:
            ref = VertexRef.from_object(root, level=0, object_id=5, vertex_index=3)
            ed.edit_vertex(ref, new_pos=np.array([15.0, -20.0, 30.0]) + ref.local)


def test_inline_build_and_refresh_equal_the_distributed_ones(base, tmp_path, local_client):
    """Built inline (every step and the composition in one task each), the
    pyramid is the distributed build's (the reference's, as the rest of the
    suite shows), file for file; so is a refresh after an EditSession edit,
    run inline, and a full rebuild of the edited store."""
    ours, theirs = tmp_path / "inline.zv", tmp_path / "dist.zv"
    for p in (ours, theirs):
        shutil.copytree(base, p)
    reports: list = []
    with dask.config.set(ALL_INLINE), get_task_stream(client=local_client) as ts:
        zd.build_pyramid(str(ours), client=local_client, _reports=reports, **KW)
    steps = [r for r in reports if not isinstance(r, dict)]
    assert [r.inline_graphs for r in steps] == [1, 1, 1], steps
    # three steps and the composition, each one task
    assert sorted(_function(t["key"]) for t in ts.data) == ["run_inline"] * 4, ts.data
    dist_reports: list = []
    zd.build_pyramid(str(theirs), client=local_client, _reports=dist_reports, **KW)
    dist_steps = [r for r in dist_reports if not isinstance(r, dict)]
    assert [r.inline_graphs for r in dist_steps] == [0, 0, 0]
    assert [r.tasks for r in steps] == [r.tasks for r in dist_steps]  # the same graphs
    diff = compare_raw_files(theirs, ours, ignore=_sidecar)
    assert diff.identical, diff.summary()

    _edit(ours)
    _edit(theirs)
    with dask.config.set(ALL_INLINE):
        report = zd.refresh_pyramid(str(ours), client=local_client)
    assert report.refreshed and report.region.kind == "chunks", report
    zd.build_pyramid(str(theirs), client=local_client, overwrite=True, **KW)
    diff = compare_raw_files(theirs, ours, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(str(ours)).state == "current"


def test_many_objects_on_few_vertices_keep_their_steps_task_by_task(tmp_path, local_client):
    """2,000 short lines: levels 1 and 2 have fewer vertices than objects.
    With the limit between the two, every step runs task by task; with it
    at the object count, the steps reading those levels run in one task.
    The bytes are the same either way."""
    paths = {n: tmp_path / f"limit{n}.zv" for n in (1000, 2000)}
    make_streamlines(str(paths[1000]), seed=3, n_objects=2000, min_len=2, max_len=4,
                     with_attributes=False)
    shutil.copytree(paths[1000], paths[2000])
    flags = {}
    for n, path in paths.items():
        reports: list = []
        with dask.config.set({INLINE_CONFIG: n}):
            zd.build_pyramid(str(path), client=local_client, _reports=reports, **KW)
        steps = [r for r in reports if not isinstance(r, dict)]
        assert all(r.source_objects == 2000 for r in steps), steps
        flags[n] = [r.inline_graphs for r in steps]
        counts = [r.vertex_count for r in steps]
    # levels 1 and 2 fit under 1,000 vertices: only their 2,000 objects keep
    # steps 2 and 3 distributed
    assert max(counts[:2]) <= 1000 < 2000, counts
    assert flags == {1000: [0, 0, 0], 2000: [0, 1, 1]}, flags
    diff = compare_raw_files(paths[1000], paths[2000], ignore=_sidecar)
    assert diff.identical, diff.summary()


# ------------------------------------------------------------ failures
def test_an_error_inside_an_inline_graph_returns_as_itself_with_nothing_published(
        base, tmp_path, monkeypatch):
    """A task of the one-task graph fails: the build raises that error (not
    a wrapper), level 1 is not published, no exchange file is left, and
    resume builds the reference's pyramid."""
    from distributed import Client, LocalCluster
    store, ref = tmp_path / "s.zv", tmp_path / "ref.zv"
    shutil.copytree(base, store)
    shutil.copytree(base, ref)
    real = shuffle.bin_partials

    def broken(spec, block, *args, **kwargs):
        if block == 0:
            raise RuntimeError("block 0 is broken")
        return real(spec, block, *args, **kwargs)

    monkeypatch.setattr(shuffle, "bin_partials", broken)  # workers in this process see it
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0", silence_logs=50) as cluster, Client(cluster) as c:
        with dask.config.set(ALL_INLINE):
            with pytest.raises(RuntimeError, match="block 0 is broken"):
                zd.build_pyramid(str(store), client=c, **KW)
            assert not (store / "1" / "zarr.json").exists()
            assert not (store / "1").exists()
            assert not [p for p in scratch_left(store) if "exchange" in p]
            monkeypatch.setattr(shuffle, "bin_partials", real)
            zd.build_pyramid(str(store), client=c, resume=True, **KW)
    reference_build_pyramid(str(ref), **KW)
    diff = compare_raw_files(ref, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


def _mid_level_2(store) -> bool:
    return ((store / ".zvdask" / "levels" / "1.json.summary").exists()
            and (store / "2" / "vertices").is_dir() and not (store / "2" / "zarr.json").exists())


@pytest.mark.integration
def test_driver_killed_inside_an_inline_graph_then_resumed(private_dask_cluster, tmp_path):
    """``zvdask pyramid`` (graphs inline) SIGKILLed while level 2's one task
    writes: the orphaned task runs on, ``--resume`` waits for it, discards
    the partial level and ends with the reference's pyramid."""
    store, ref = tmp_path / "s.zv", tmp_path / "ref.zv"
    make_streamlines(str(store), seed=11, n_objects=800, max_len=200)
    shutil.copytree(store, ref)
    cli = [sys.executable, "-m", "zarr_vectors_dask.cli", "pyramid", str(store), "--scheduler",
           private_dask_cluster.address, "--factors", "2:1,2:2,2:2", "--sparsity-seed", "0",
           "--cross-level-depth", "-1", "--cross-level-storage", "explicit", "--no-progress"]
    env = subprocess_env({INLINE_ENV: str(10 ** 9)})
    p = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, hit = time.monotonic() + 120, False
        while time.monotonic() < deadline and p.poll() is None:
            if _mid_level_2(store):
                hit = True
                break
            time.sleep(0.001)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
    assert hit, p.stderr.read()[-2000:]
    assert not (store / "2" / "zarr.json").exists()
    resumed = subprocess.run([*cli, "--resume"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    reference_build_pyramid(str(ref), **KW)
    diff = compare_raw_files(ref, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert not scratch_left(store)


def test_cli_inline_vertices_sets_the_limit_and_dry_run_shows_it(base, capsys):
    """``--inline-vertices`` is the config the planner reads: the dry run
    marks the steps that run in one task, none at 0; a negative value is
    refused while parsing."""
    from zarr_vectors_dask.cli import main
    args = ["pyramid", str(base), "--factors", "2:1,2:2", "--dry-run"]
    assert main([*args, "--inline-vertices", "1000000"]) == 0
    marked = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  tasks ")]
    assert len(marked) == 2 and all("in one task (source <= 1,000,000" in ln for ln in marked)
    assert main([*args, "--inline-vertices", "0"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  tasks ")]
    assert len(lines) == 2 and not any("in one task" in ln for ln in lines)
    with pytest.raises(SystemExit) as exc:
        main([*args, "--inline-vertices", "-1"])
    assert exc.value.code == 2 and "must be at least 0" in capsys.readouterr().err


@pytest.mark.integration
def test_inline_build_on_s3_equals_the_local_one(s3_server, tmp_path, local_client):
    """On S3 every read and write of the one-task graphs goes through the
    workers' fsspec store, as task by task: the pyramid downloaded equals
    the one built locally."""
    small = tmp_path / "small.zv"
    make_streamlines(str(small), seed=29, n_objects=15, max_len=40)
    fs = s3_server.fs()
    bucket = s3_server.new_bucket()
    fs.put(str(small), f"{bucket}/x.zv", recursive=True)
    url = s3_server.url(bucket, "x.zv")
    with dask.config.set(ALL_INLINE):
        zd.build_pyramid(url, client=local_client, storage_options=s3_server.storage_options,
                         **KW)
    got, local = tmp_path / "got.zv", tmp_path / "local.zv"
    fs.invalidate_cache()
    fs.get(f"{bucket}/x.zv", str(got), recursive=True)
    shutil.copytree(small, local)
    zd.build_pyramid(str(local), client=local_client, **KW)
    diff = compare_raw_files(local, got, ignore=_sidecar)
    assert diff.identical, diff.summary()


_BARRIERS: dict = {}  # by name: a graph is serialised even for workers in this process
_EVENTS: dict = {}  # the same


def _meet(name: str):
    import threading
    _BARRIERS[name].wait()  # both tasks at once, or a BrokenBarrierError after its timeout
    return threading.get_ident()


def test_one_task_uses_every_thread_of_its_worker():
    """On a worker of several threads the one-task graph runs its
    independent tasks at once (two tasks that must meet do); on a worker
    of one thread, one after the other."""
    import threading

    from distributed import Client, LocalCluster

    from zarr_vectors_dask.runtime import run_inline
    for threads in (2, 1):
        _BARRIERS[f"t{threads}"] = threading.Barrier(threads, timeout=10)
        dsk = {"a": (_meet, f"t{threads}"), "b": (_meet, f"t{threads}")}
        with LocalCluster(n_workers=1, threads_per_worker=threads, processes=False,
                          dashboard_address=":0", silence_logs=50) as cluster, \
                Client(cluster) as c:
            a, b = c.submit(run_inline, dsk, ["a", "b"], pure=False).result()
        assert (a != b) == (threads == 2)


def _write_later(path: str, name: str) -> str:
    _EVENTS[name].set()
    time.sleep(0.5)
    with open(path, "w") as f:
        f.write("late")
    return path


def _fail_after(name: str) -> None:
    _EVENTS[name].wait(10)
    raise RuntimeError("this task is broken")


def test_a_failed_one_task_graph_returns_after_its_running_siblings(tmp_path):
    """Dask's threaded scheduler raises a task's error at once, while a
    sibling may still be writing; the one task returns only when that
    sibling has ended, so the cleanup after the failure is the last
    writer (CI once found level 1 re-created after the cleanup)."""
    import threading

    from distributed import Client, LocalCluster

    from zarr_vectors_dask.runtime import run_inline
    late, _EVENTS["started"] = tmp_path / "late", threading.Event()
    dsk = {"write": (_write_later, str(late), "started"), "fail": (_fail_after, "started")}
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0", silence_logs=50) as cluster, Client(cluster) as c:
        with pytest.raises(RuntimeError, match="this task is broken"):
            c.submit(run_inline, dsk, ["write", "fail"], pure=False).result()
        assert late.exists()  # the sibling ended before the one task did
