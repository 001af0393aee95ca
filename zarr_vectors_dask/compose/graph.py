"""The composition graph: runs of slabs (the chunks of every fine level
under each), the shard writers, one summary task."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..format import cells as fcells
from ..format import naming as nm
from ..planning.runs import run_cap, shard_runs, slab_runs
from ..runtime import Graph
from ..step.cells import ShardRoute
from ..step.exchange import join
from ..step.graph import shard_writers
from ..step.source import chunk_table
from ..storage.store import Store

__all__ = ["COMPOSE_SCOPE", "compose_graph"]


#: Exchange scope of the composition graph (a step's is its target level).
COMPOSE_SCOPE = "compose"


def _plus_one_arrays(store: Store, level: int) -> dict:
    """The offset arrays of a level's ``+1`` family, as read cells need them
    (plain, compressed or sharded), without their chunk lists."""
    fam = nm.links_family_path(level, 1)
    out = {}
    for seg in store.listdir(fam):
        if seg == "zarr.json":
            continue
        info = fcells.vlen_array_info(store, f"{fam}/{seg}")
        if info is None:
            raise FormatError(f"{store.describe(f'{fam}/{seg}')}: link array has no "
                                  f"readable zarr.json")
        out[seg] = fcells.VlenArrayInfo(**{**info.__dict__, "chunks": ()})
    return out


def _anchor_numbers(coords: np.ndarray, scale, base: dict) -> np.ndarray:
    """Row-major number, in the finest composed level's grid (``base``:
    its geometry), of the chunk at each chunk's lower corner: scaling
    keeps row-major order, so a run of these numbers is a slab of every
    level at once."""
    bs = np.asarray(base["scale"], dtype=np.int64)
    origin, grid = base["grid"]
    rel = coords * np.asarray(scale, dtype=np.int64) // bs - np.asarray(origin, dtype=np.int64)
    rel = np.clip(rel, 0, np.asarray(grid, dtype=np.int64) - 1)
    return np.ravel_multi_index(tuple(rel.T), tuple(int(g) for g in grid)).astype(np.int64)


def _column_runs(plans: list, geo: dict, cap: float) -> list[list[tuple]]:
    """The composition's tasks: ``(level, steps, chunks)`` per fine level
    under each run of slabs (``planning.runs.slab_runs``).  One task
    composing a slab at every level reads each coarse ``+1`` cell once,
    for a finer level's hops and its own level alike."""
    base = geo[plans[0][0]]
    keys = [_anchor_numbers(coords, geo[f]["scale"], base) for f, _, coords, _ in plans]
    return [[(plans[i][0], plans[i][1], plans[i][2][idx]) for i, idx in run]
            for run in slab_runs(keys, [w for *_, w in plans], cap)]


def compose_graph(store: Store, levels: list[int], max_delta: int, *, root_meta, storage: str,
                  n_workers: int, max_block_vertices: int, token: str, shard_shape=None,
                  only: dict | None = None):
    """The composition graph: runs of slabs (every fine level's chunks
    under each, :func:`_column_runs`) sized by the vertex budget, then
    (sharded) the shard writers, then one summary task.  ``only`` (a
    refresh): per level, the chunks to compose; the graph then ends in a
    join and the families' documents are the caller's to write (from what
    is on disk)."""
    from .tasks import compose_block, compose_summary, level_geometry
    geo = {lv: level_geometry(store, lv, root_meta) for lv in levels}
    segs = {lv: _plus_one_arrays(store, lv) for lv in levels}
    g = Graph({})
    routes = []
    ndim = root_meta.sid_ndim
    plans, total = [], 0.0
    for f in levels:
        info = fcells.vlen_array_info(store, f"{f}/{nm.VERTICES}")
        if info is None or not info.chunks:
            continue
        origin, grid = geo[f]["grid"]
        numbers, weights = chunk_table(store, info, origin, grid, ndim, geo[f]["vertex_count"])
        coords = np.stack(np.unravel_index(numbers, tuple(grid)), axis=1).reshape(-1, ndim) + \
            np.asarray(origin, dtype=np.int64)
        if only is not None:
            keep = np.fromiter((tuple(c) in only.get(f, ()) for c in coords.tolist()),
                               dtype=bool, count=coords.shape[0])
            coords, weights = coords[keep], weights[keep]
        if shard_shape is not None:  # any level may receive a +N or -N family
            cap = run_cap(float(weights.sum()), max_block_vertices, n_workers)
            routes.append(ShardRoute(f, tuple(origin), tuple(grid), tuple(shard_shape),
                                        shard_runs(coords, weights, origin, grid, shard_shape,
                                                   cap), COMPOSE_SCOPE))
        steps = [n for n in range(2, max_delta + 1) if f + n in geo]
        if steps and segs[f] and coords.shape[0]:
            plans.append((f, steps, coords, np.asarray(weights, dtype=np.float64)))
            total += float(weights.sum())
    ctx = {"geo": geo, "segs": segs, "routes": tuple(routes)}
    runs = _column_runs(plans, geo, run_cap(total, max_block_vertices, n_workers)) \
        if plans else []
    tasks = [g.add(token, compose_block, str(t), store, ctx, tuple(run), storage, str(t))
             for t, run in enumerate(runs)]
    if not tasks:
        return None, geo
    shards = shard_writers(g, token, store, ctx["routes"], tasks)
    if only is not None:
        g.output = g.add(token, join, "composed", *tasks, *shards)
        return g, geo
    g.output = g.add(token, compose_summary, 0, store, geo, len(tasks), ndim, shard_shape,
                     *tasks, *shards)
    return g, geo
