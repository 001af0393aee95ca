"""Bounded work per task, small-scale (issue 3): a regression to a
gather-everything design fails here, without timing anything.

Stores of N and 2N vertices share one chunk grid.  With a small per-task
vertex budget, the largest task result the scheduler ever holds and the
bytes the driver gathers must not grow with N; with the default budget the
task count must not change at all (it follows chunks, not vertices).
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.types.polylines import write_polylines

import zarr_vectors_dask as zd
from equivalence import compare_raw_files

BOX = 100.0
KW = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
          cross_level_storage="explicit")


def _walks(path, n_vertices: int, seed: int = 0, chunk: float = 25.0) -> None:
    """Random-walk streamlines of 50 points in a 100^3 box, bin 2.5."""
    rng = np.random.default_rng(seed)
    n_lines = n_vertices // 50
    start = rng.uniform(5, BOX - 5, size=(n_lines, 1, 3))
    walk = start + np.cumsum(rng.normal(0, 0.6, size=(n_lines, 50, 3)), axis=1)
    walk = np.clip(walk, 0, np.nextafter(np.float32(BOX), np.float32(0))).astype(np.float32)
    write_polylines(str(path), list(walk), chunk_shape=(chunk,) * 3, bin_shape=(2.5,) * 3,
                    bounds=([0.0] * 3, [BOX] * 3))


class _ResultSizes(SchedulerPlugin):
    """Largest task result the scheduler records while a build runs."""

    name = "zvdask-test-result-sizes"

    def __init__(self):
        self.largest = 0

    async def start(self, scheduler):
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "memory":
            ts = self.scheduler.tasks.get(key)
            if ts is not None:
                self.largest = max(self.largest, int(ts.nbytes or 0))


def _build_measured(client, path, monkeypatch, **kw):
    """Build; return (largest task result bytes, bytes gathered to the driver, reports)."""
    plugin = _ResultSizes()
    client.register_plugin(plugin)
    gathered = []
    real_gather = type(client).gather

    def counting_gather(self, futures, *a, **k):
        out = real_gather(self, futures, *a, **k)
        gathered.append(len(pickle.dumps(out)))
        return out

    monkeypatch.setattr(type(client), "gather", counting_gather)
    reports: list = []
    try:
        zd.build_pyramid(str(path), client=client, _reports=reports, **KW, **kw)
    finally:
        monkeypatch.undo()
    largest = client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins[_ResultSizes.name].largest)
    client.unregister_scheduler_plugin(_ResultSizes.name)
    return largest, sum(gathered), [r for r in reports if not isinstance(r, dict)]


@pytest.fixture(scope="module")
def level0_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    small, large = root / "n.zv", root / "2n.zv"
    _walks(small, 10_000, seed=1)
    _walks(large, 20_000, seed=2)
    return small, large


def test_task_results_and_driver_traffic_do_not_grow_with_vertices(local_client, level0_pair,
                                                                   tmp_path, monkeypatch):
    sizes = {}
    for name, src in zip(("n", "2n"), level0_pair):
        ours = tmp_path / f"{name}.zv"
        shutil.copytree(src, ours)
        sizes[name] = _build_measured(local_client, ours, monkeypatch, max_block_vertices=1_500)
    (big_n, drv_n, rep_n), (big_2n, drv_2n, rep_2n) = sizes["n"], sizes["2n"]
    # Twice the vertices, same chunks: per-task results stay the same order
    # of size (a task holding a whole level would double).
    assert big_2n < 1.5 * big_n, (big_n, big_2n)
    # The driver gathers per-task bookkeeping (chunk lists, counts), a small
    # fraction of the level's vertex bytes, never per-vertex data.
    level0_bytes = 20_000 * 3 * 4
    assert drv_2n < level0_bytes / 8, (drv_n, drv_2n, level0_bytes)
    # The budget really split the work: more tasks for more vertices.
    assert sum(r.tasks for r in rep_2n) > sum(r.tasks for r in rep_n)


def test_task_count_follows_chunks_not_vertices(local_client, tmp_path):
    tasks = {}
    for n in (10_000, 20_000):
        ours = tmp_path / f"{n}.zv"
        # Chunks of 50: every chunk of every level holds data at both sizes.
        _walks(ours, n, seed=n, chunk=50.0)
        reports: list = []
        zd.build_pyramid(str(ours), client=local_client, _reports=reports,
                         **{**KW, "factors": [(2, 1), (2, 1)]})
        tasks[n] = [(r.chunks, r.tasks) for r in reports if not isinstance(r, dict)]
    assert [c for c, _ in tasks[10_000]] == [c for c, _ in tasks[20_000]]
    # Exchanges are routed to non-empty (source, destination) pairs, so a
    # few helper tasks depend on where data falls; the graph does not
    # scale with the vertex count.
    for (_, a), (_, b) in zip(tasks[10_000], tasks[20_000]):
        assert abs(a - b) <= 0.1 * a, tasks


def test_tiny_budget_still_byte_identical(local_client, tmp_path):
    """Many blocks, partitions and -N writers: the output does not change."""
    base, ref, ours = tmp_path / "b.zv", tmp_path / "r.zv", tmp_path / "o.zv"
    _walks(base, 6_000, seed=3)
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    reference_build_pyramid(str(ref), **KW)
    reports: list = []
    zd.build_pyramid(str(ours), client=local_client, max_block_vertices=400, _reports=reports,
                     **KW)
    assert compare_raw_files(ref, ours).identical
    plan = zd.plan_pyramid(str(base), factors=KW["factors"], max_block_vertices=400)
    assert plan.levels[0].n_blocks > 4 and plan.levels[0].n_target_blocks > 4
