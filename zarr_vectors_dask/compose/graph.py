"""The composition graph: per fine level, runs of its vertex chunks, the
shard writers, one summary task."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..format import cells as fcells
from ..format import naming as nm
from ..planning.runs import run_cap, shard_runs
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


def compose_graph(store: Store, levels: list[int], max_delta: int, *, root_meta, storage: str,
                  n_workers: int, max_block_vertices: int, token: str, shard_shape=None,
                  only: dict | None = None):
    """The composition graph: per fine level, runs of its vertex chunks
    sized by the vertex budget, then (sharded) the shard writers, then one
    summary task.  ``only`` (a refresh): per level, the chunks to compose;
    the graph then ends in a join and the families' documents are the
    caller's to write (from what is on disk)."""
    from ..planning.runs import weighted_runs
    from .tasks import compose_block, compose_summary, level_geometry
    geo = {lv: level_geometry(store, lv, root_meta) for lv in levels}
    segs = {lv: _plus_one_arrays(store, lv) for lv in levels}
    g = Graph({})
    tasks, owners, routes = [], [], []
    ndim = root_meta.sid_ndim
    plans = []
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
        cap = run_cap(float(weights.sum()), max_block_vertices, n_workers)
        if shard_shape is not None:  # any level may receive a +N or -N family
            routes.append(ShardRoute(f, tuple(origin), tuple(grid), tuple(shard_shape),
                                        shard_runs(coords, weights, origin, grid, shard_shape,
                                                   cap), COMPOSE_SCOPE))
        steps = [n for n in range(2, max_delta + 1) if f + n in geo]
        if steps and segs[f] and coords.shape[0]:
            plans.append((f, steps, coords, weighted_runs(weights, cap)))
    ctx = {"geo": geo, "segs": segs, "routes": tuple(routes)}
    for f, steps, coords, starts in plans:
        for a, b in zip(starts.tolist(), np.r_[starts[1:], coords.shape[0]].tolist()):
            tasks.append(g.add(token, compose_block, f"{f}:{a}", store, ctx, f, coords[a:b],
                               steps, storage, f"{f}.{a}"))
            owners.append(f)
    if not tasks:
        return None, geo
    shards = shard_writers(g, token, store, ctx["routes"], tasks)
    if only is not None:
        g.output = g.add(token, join, "composed", *tasks, *shards)
        return g, geo
    g.output = g.add(token, compose_summary, 0, store, geo, owners, ndim, shard_shape,
                     *tasks, *shards)
    return g, geo
