"""One graph per step: the graph is data (runs serially without a
cluster), the plan reports its real task counts, the driver hands each
step to the scheduler once, and a failing task stops the whole build
before the error reaches the caller."""

from __future__ import annotations

import itertools
import os
import shutil
import time

import dask
import numpy as np
import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

import zarr_vectors_dask as zd
from zarr_vectors_dask import runtime
from zarr_vectors_dask.step import shuffle
from zarr_vectors_dask.planning.runs import slab_runs, step_layout, weighted_runs
from equivalence import compare_raw_files
from stores import make_streamlines

KW = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
          cross_level_storage="explicit")


# ---------------------------------------------------------------- pure planning
def test_slab_runs_cover_every_level_once_and_split_a_dense_slab():
    """The composition's runs: each item of each level in exactly one run,
    levels sharing a run where their keys (anchor numbers) meet, runs at
    most ``cap`` heavy, and a run made heavy by one item split so that its
    first level composes apart from the coarser ones."""
    rng = np.random.default_rng(3)
    keys = [np.arange(64), np.arange(0, 64, 2), np.arange(0, 64, 4)]
    weights = [rng.integers(1, 20, 64).astype(float), rng.integers(1, 10, 32).astype(float),
               rng.integers(1, 5, 16).astype(float)]
    runs = slab_runs(keys, weights, cap=120.0)
    for lv in range(3):
        got = np.sort(np.concatenate([idx for run in runs for i, idx in run if i == lv]))
        assert got.tolist() == list(range(keys[lv].size))
    for run in runs:
        assert sum(weights[i][idx].sum() for i, idx in run) <= 120.0
        spans = [(keys[i][idx].min(), keys[i][idx].max()) for i, idx in run]
        assert max(lo for lo, _ in spans) <= min(hi for _, hi in spans) + 4  # one slab
    assert len(runs) > 1 and any(len(run) == 3 for run in runs)
    # One item heavier than the cap: its level alone, the coarser ones apart.
    weights[0][10] = 1000.0
    heavy = slab_runs(keys, weights, cap=120.0)
    alone = [run for run in heavy if any(i == 0 and 10 in idx.tolist() for i, idx in run)]
    assert len(alone) == 1 and [i for i, _ in alone[0]] == [0]
    # Heavy items of several levels sharing one key: one run per level.
    shared = slab_runs([np.array([5]), np.array([5]), np.array([5])],
                       [np.array([16.0]), np.array([16.0]), np.array([18.0])], cap=5.0)
    assert sorted(i for run in shared for i, _ in run) == [0, 1, 2]
    assert all(len(run) == 1 for run in shared)
    for run in heavy:
        assert len(run) == 1 or sum(weights[i][idx].sum() for i, idx in run) <= 120.0
    assert slab_runs([], [], 1.0) == []


def test_weighted_runs_split_a_dense_chunk_off():
    w = np.array([10, 10, 500, 10, 10, 10])
    starts = weighted_runs(w, 100)
    assert starts.tolist() == [0, 2, 3]  # the heavy chunk stands alone
    runs = np.split(w, starts[1:])
    assert all(r.sum() <= 100 or r.size == 1 for r in runs)


def test_layout_routes_cover_every_neighbour():
    """A source block's partitions cover every target chunk its vertices'
    bins can start in; a partition's targets cover every chunk a centroid
    can land in (one bin further, plus margin)."""
    grid = (8, 8, 8)
    numbers = np.arange(0, 512, 3)
    lay = step_layout(numbers=numbers, weights=np.ones(numbers.size), source_origin=(0, 0, 0),
                      source_grid=grid, source_chunk_shape=(10.0,) * 3, target_origin=(0, 0, 0),
                      target_grid=grid, chunk_shape=(10.0,) * 3, bin_shape=(4.0,) * 3,
                      budget=20, n_workers=2)
    assert lay.n_blocks == len(lay.block_chunks) > 4 and lay.n_target_blocks > 4
    assert np.concatenate(lay.block_chunks).tolist() == numbers.tolist()
    tbs = np.asarray(lay.target_block_starts)
    for chunks, parts in zip(lay.block_chunks, lay.block_partitions):
        cc = np.stack(np.unravel_index(chunks, grid), axis=1)
        for d in itertools.product((-1, 0, 1), repeat=3):
            lin = np.ravel_multi_index(tuple(np.clip(cc + d, 0, 7).T), grid)
            part = np.searchsorted(tbs, lin, side="right") - 1
            assert set(part.tolist()) <= set(parts)
        # ... and no more than the box around its chunks (two chunks each way).
        near = {int(p) for c in cc for d in itertools.product(range(-2, 3), repeat=3)
                for p in [np.searchsorted(tbs, np.ravel_multi_index(
                    tuple(np.clip(c + d, 0, 7)), grid), side="right") - 1]}
        assert set(parts) <= near


def test_layout_routes_do_not_depend_on_the_route_batch():
    """Routes are expanded a batch of source chunks at a time (bounded
    driver memory): any batch size gives the same layout as one batch."""
    grid = (12, 12, 12)
    numbers = np.sort(np.random.default_rng(3).choice(1728, 900, replace=False))
    kw = dict(numbers=numbers, weights=np.random.default_rng(4).integers(1, 50, numbers.size),
              source_origin=(0, 0, 0), source_grid=grid, source_chunk_shape=(10.0,) * 3,
              target_origin=(0, 0, 0), target_grid=(6, 6, 6), chunk_shape=(20.0,) * 3,
              bin_shape=(5.0,) * 3, budget=2000, n_workers=2)
    whole = step_layout(**kw, route_batch=numbers.size)
    assert whole.n_blocks > 3 and whole.n_target_blocks > 3
    for batch in (1, 7, 256):
        lay = step_layout(**kw, route_batch=batch)
        assert lay.block_partitions == whole.block_partitions
        assert lay.partition_targets == whole.partition_targets
        assert np.array_equal(lay.target_block_starts, whole.target_block_starts)


# ---------------------------------------------------------------- serial executor
def test_step_graph_runs_serially_and_matches_the_reference(tmp_path):
    """The graph is plain data: dask's synchronous scheduler runs it in
    this process (no cluster), and the level it writes is the reference's."""
    base, ref, ours = tmp_path / "b.zv", tmp_path / "r.zv", tmp_path / "o.zv"
    make_streamlines(str(base), seed=4, n_objects=40)
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    reference_build_pyramid(str(ref), factors=[(2, 2)], sparsity_seed=1,
                            cross_level_storage="explicit")

    class SerialClient:  # what ``execute`` needs of a client, run synchronously
        def get(self, dsk, key, sync=False):
            out = dask.get(dsk, key)
            return type("Done", (), {"result": lambda self: out, "release": lambda self: None,
                                     "cancel": lambda self: None, "status": "finished",
                                     "key": key})()

    import distributed
    real_wait = distributed.wait
    distributed.wait = lambda futures: None
    try:
        zd.build_pyramid(str(ours), client=SerialClient(), factors=[(2, 2)], sparsity_seed=1,
                         cross_level_storage="explicit")
    finally:
        distributed.wait = real_wait
    assert compare_raw_files(ref, ours).identical


# ---------------------------------------------------------------- on a cluster
def test_plan_counts_are_the_graphs_and_one_round_trip_per_step(local_client, tmp_path):
    base = tmp_path / "b.zv"
    make_streamlines(str(base), seed=2, n_objects=60)
    plan = zd.plan_pyramid(str(base), **{k: v for k, v in KW.items() if k != "sparsity_seed"},
                           max_block_vertices=300)
    reports: list = []
    zd.build_pyramid(str(base), client=local_client, max_block_vertices=300, _reports=reports,
                     **KW)
    steps = [r for r in reports if isinstance(r, runtime.StepReport)]
    assert steps[0].stage_tasks == plan.levels[0].tasks
    assert steps[0].tasks == sum(plan.levels[0].tasks.values())
    assert plan.levels[0].n_blocks > 1
    assert [r.round_trips for r in steps] == [1, 1]
    assert "~" not in repr(plan).splitlines()[4]  # the first step's count is exact


def test_failing_task_stops_its_siblings_before_the_error_returns(tmp_path, monkeypatch):
    """One block fails at once while a sibling is still working: the
    build must not return its error until the sibling has ended, so no
    file changes after the caller sees the error (an overwrite rerun can
    safely start then)."""
    from distributed import Client, LocalCluster
    base = tmp_path / "b.zv"
    make_streamlines(str(base), seed=5, n_objects=80)
    real = shuffle.bin_partials
    late = tmp_path / "late-write"

    def flaky(spec, block, *args, **kwargs):
        if block == 0:
            raise RuntimeError("block 0 is broken")
        time.sleep(1.5)
        out = real(spec, block, *args, **kwargs)
        late.write_text("written")  # the write an unfinished sibling makes
        return out

    monkeypatch.setattr(shuffle, "bin_partials", flaky)
    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                      dashboard_address=":0", silence_logs=50) as cluster, Client(cluster) as c:
        with pytest.raises(RuntimeError, match="block 0 is broken"):
            zd.build_pyramid(str(base), client=c, max_block_vertices=200, **KW)
        returned = time.time()
        assert late.exists(), "the error returned while a sibling task was still running"
        snapshot = {p: os.stat(p).st_mtime for p in _files(base)}
        time.sleep(2.0)
        assert {p: os.stat(p).st_mtime for p in _files(base)} == snapshot
        assert all(m <= returned for m in snapshot.values())
    assert not (base / "1" / "zarr.json").exists()  # nothing published


def _files(root):
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


@pytest.mark.parametrize("shape", ["dense", "sparse", "wide"])
def test_distinct_rows_and_link_groups_are_what_sorting_gives(shape):
    """The counting paths (small boxes) and the sorting ones (a sparse box,
    a box past int64) give ``np.unique``'s rows and inverse; link cells
    grouped by the radix sort keep the records' order within a cell."""
    from zarr_vectors_dask.step.links import distinct_rows, partition_links
    rng = np.random.default_rng(len(shape))
    rows = rng.integers(-3, 5, size=(5000, 3))
    if shape == "sparse":
        rows[::7] *= 100_000
    if shape == "wide":
        rows[::5, 0] = rng.integers(-(1 << 40), 1 << 40, size=1000)
        rows[::5, 1] = rng.integers(-(1 << 40), 1 << 40, size=1000)
    want, want_inv = np.unique(rows, axis=0, return_inverse=True)
    got, inv = distinct_rows(rows)
    assert np.array_equal(got, want) and np.array_equal(inv, want_inv.reshape(-1))
    assert distinct_rows(rows[:0])[0].shape == (0, 3)
    # records of a few source chunks into target chunks, interleaved
    # (sparse: more (source, target) pairs than a 16-bit group number holds)
    n_src = 250 if shape == "sparse" else 4
    owner = np.repeat(np.arange(n_src), 5000 // n_src)
    target = rng.integers(0, 300 if shape != "dense" else 3, size=owner.size)
    t_chunks = rows[:300] if shape != "dense" else rows[:3]
    cells = partition_links(owner, rows[:n_src], np.arange(owner.size), target, t_chunks,
                            np.arange(owner.size) + 7, (1, 1, 1), (1, 1, 1))
    for i in range(cells.chunk.shape[0]):
        got_rows = cells.rows[cells.bounds[i]:cells.bounds[i + 1]]
        a = got_rows[:, 0]
        assert np.all(np.diff(a) > 0)  # input order kept within a cell
        assert np.all(got_rows[:, 1] == a + 7)
        assert np.all(rows[owner[a]] == rows[owner[a[0]]])  # (owner chunks may repeat)
        assert np.all(t_chunks[target[a]] == t_chunks[target[a[0]]])
        assert np.array_equal(cells.chunk[i], rows[owner[a[0]]])
    key = [tuple(c) + tuple(o) for c, o in zip(cells.chunk.tolist(), cells.offset.tolist())]
    assert key == sorted(key) and len(set(key)) == len(key)
    assert cells.bounds[-1] == owner.size
