"""One coarsening step: plan it from metadata and one listing, build its
graph, run it once, publish the level (or the reference's empty level)."""

from __future__ import annotations

import time
import uuid
import warnings
from typing import Callable

import numpy as np

from ..errors import cleanup
from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import commit as cm
from ..format import documents as fdoc
from ..format import naming as nm
from ..planning.plan import LevelPlan, grid_layout, runs_inline
from ..planning.region import ChunkRegion
from ..planning.runs import run_cap, shard_runs, step_layout
from ..planning.sparsity import Sparsity
from ..runtime import StepReport, execute
from ..storage.store import Store
from . import attributes as va
from . import graph as sgraph
from .cells import ShardRoute
from .exchange import drop_exchange
from .region import (RegionNotApplicable, changed_cells, discard_stale, region_documents,
                     step_cells, step_region)
from .source import SourceLevel, chunk_table, manifest_rows, read_source_level
from .spec import LevelPair, StepSpec

__all__ = ["run_step", "plan_step", "step_shard_routes", "step_graph", "unchanged_summary",
           "rewrite_attributes"]


# ---------------------------------------------------------------- one step
def run_step(client, store: Store, lv: LevelPlan, *, region: ChunkRegion | None = None,
             **kwargs) -> StepReport:
    """One coarsening step; its exchange files are scratch and go with it.
    A step that fails (its tasks already stopped by ``execute``) leaves
    nothing behind: what it wrote was unpublished, and a plain rerun must
    not find a half-written level in its way.  ``region`` (a refresh in
    place): the step restricted to it (``step/region.py``)."""
    drop_exchange(store, lv.target_level)  # leftovers of an interrupted attempt
    try:
        if region is not None:
            return _run_region_step(client, store, lv, region, **kwargs)
        return _run_step(client, store, lv, **kwargs)
    except BaseException:
        cleanup(lambda: _discard_unpublished(store, lv),
                what=f"removing the unpublished level {lv.target_level}")
        raise
    finally:
        cleanup(lambda: drop_exchange(store, lv.target_level),
                what=f"removing the exchange files of level {lv.target_level}")


def _discard_unpublished(store: Store, lv: LevelPlan) -> None:
    """The failed step's own writes, while its level is unlisted: the
    level, and the family it put under the source level towards it
    (``+k`` for target = source + k: ``coarsen_level`` may skip levels; a
    family into an unlisted level can only come from this step)."""
    if store.get(f"{lv.target_level}/zarr.json") is None:
        store.remove_tree(str(lv.target_level))
        store.remove_tree(nm.links_family_path(lv.source_level,
                                                lv.target_level - lv.source_level))


def plan_step(store: Store, lv: LevelPlan, src: SourceLevel, root_meta, *,
              sparsity_strategy: str, sparsity_seed, vertex_attributes=None,
              attribute_aggregation=None, sources: np.ndarray | None = None):
    """The step's spec, layout and graph inputs, from metadata and one
    listing (no cell is read).  ``sources`` (a region): the only source
    chunk numbers its blocks read."""
    ndim = root_meta.sid_ndim
    s_origin, s_grid = lv.source_grid
    t_origin, t_grid = lv.target_grid
    numbers, weights = chunk_table(store, src.vertices, s_origin, s_grid, ndim, src.vertex_count)
    if sources is not None:
        mine = np.isin(numbers, sources)
        numbers, weights = numbers[mine], weights[mine]
    layout = step_layout(numbers=numbers, weights=weights, source_origin=s_origin,
                         source_grid=s_grid, source_chunk_shape=lv.source_chunk_shape,
                         target_origin=t_origin, target_grid=t_grid, chunk_shape=lv.chunk_shape,
                         bin_shape=lv.bin_shape, budget=lv.max_block_vertices,
                         n_workers=lv.n_workers)
    scale_source, scale_target = lv.chunk_scales(root_meta.chunk_shape)
    strip = dict(chunks=())  # the chunk lists stay with the driver
    routes = step_shard_routes(lv, numbers, weights) if lv.shard_shape else ()
    spec = StepSpec(
        store=store, source_level=lv.source_level, target_level=lv.target_level, ndim=ndim,
        bin_shape=lv.bin_shape, chunk_shape=lv.chunk_shape, source_origin=tuple(s_origin),
        source_grid_shape=tuple(s_grid), target_origin=tuple(t_origin),
        target_grid_shape=tuple(t_grid),
        block_starts=tuple(int(x) for x in layout.block_starts),
        target_block_starts=tuple(int(x) for x in layout.target_block_starts),
        scale_source=scale_source, scale_target=scale_target,
        vertices=fcells.VlenArrayInfo(**{**src.vertices.__dict__, **strip}),
        fragments=fcells.VlenArrayInfo(**{**src.fragments.__dict__, **strip}),
        source_dtype=src.dtype, has_objects=src.has_objects,
        manifests_path=f"{lv.source_level}/{nm.OBJECT_INDEX}/manifests" if src.has_objects else None,
        links=lv.cross_level_storage,
        vertex_attributes=va.resolve(store, lv.source_level, vertex_attributes,
                                     attribute_aggregation),
        shard_shape=lv.shard_shape, shard_routes=routes)
    sparsity = Sparsity.of_level(lv, sparsity_strategy, sparsity_seed)
    return spec, layout, sparsity


def step_shard_routes(lv: LevelPlan, numbers, weights) -> tuple:
    """Routes of a sharded step's cells: the target level (vertices, ``-1``
    links), weighted by the vertices whose source chunk starts in each
    target chunk, and the source level (``+1`` links), by source chunk."""
    s_origin, s_grid = lv.source_grid
    t_origin, t_grid = lv.target_grid
    coords = np.stack(np.unravel_index(np.asarray(numbers, dtype=np.int64), tuple(s_grid)),
                      axis=1).reshape(-1, len(s_grid)) + np.asarray(s_origin, dtype=np.int64)
    cap = run_cap(float(np.sum(weights)), lv.max_block_vertices, lv.n_workers)
    home = np.floor(coords * np.asarray(lv.source_chunk_shape, dtype=np.float64) /
                    np.asarray(lv.chunk_shape, dtype=np.float64)).astype(np.int64)
    routes = [ShardRoute(lv.target_level, tuple(t_origin), tuple(t_grid), lv.shard_shape,
                            shard_runs(home, weights, t_origin, t_grid, lv.shard_shape, cap),
                            lv.target_level)]
    if lv.cross_level_storage != "none":
        routes.append(ShardRoute(
            lv.source_level, tuple(s_origin), tuple(s_grid), lv.shard_shape,
            shard_runs(coords, weights, s_origin, s_grid, lv.shard_shape, cap), lv.target_level))
    return tuple(routes)


def step_graph(store: Store, lv: LevelPlan, src: SourceLevel, root_meta, *,
               sparsity_strategy: str, sparsity_seed, token: str, vertex_attributes=None,
               attribute_aggregation=None):
    """The step's graph (not run) and its layout."""
    spec, layout, sparsity = plan_step(store, lv, src, root_meta,
                                       sparsity_strategy=sparsity_strategy,
                                       sparsity_seed=sparsity_seed,
                                       vertex_attributes=vertex_attributes,
                                       attribute_aggregation=attribute_aggregation)
    return sgraph.step_graph(spec, layout, n_rows=src.n_rows, sparsity=sparsity,
                         attribute_names=src.attribute_names, token=token), layout


def _run_step(client, store: Store, lv: LevelPlan, *, root_meta, sparsity_strategy: str,
              sparsity_seed, progress: Callable | None = None, vertex_attributes=None,
              attribute_aggregation=None) -> StepReport:
    t_start = time.perf_counter()
    report = StepReport(target_level=lv.target_level)
    src = read_source_level(store, lv.source_level, root_meta.sid_ndim)
    empty = {"vertex_count": 0, "object_count": 0, "objects_kept": 0,
             "method": "per_object", "preserves_object_ids": True}
    if not src.vertices.chunks or (src.has_objects and src.n_rows == 0):
        # An empty source level: the reference finds no vertices to coarsen
        # and no level is written.
        report.summary = empty
        return report
    token = uuid.uuid4().hex[:12]
    graph, _ = step_graph(store, lv, src, root_meta, sparsity_strategy=sparsity_strategy,
                          sparsity_seed=sparsity_seed, token=token,
                          vertex_attributes=vertex_attributes,
                          attribute_aggregation=attribute_aggregation)
    out = execute(client, graph, token, report, name=f"level {lv.target_level}",
                  progress=progress, inline=_inline(src, lv))
    n_src_objects = src.n_rows if src.has_objects else 1
    n_kept = out["objects_kept"] if src.has_objects else 1
    report.source_objects, report.objects_kept = int(n_src_objects), int(n_kept)
    n_meta = out["vertex_count"]
    report.vertex_count, report.chunks = n_meta, out["chunks"]
    if n_meta == 0:
        _write_empty_level(store, lv, src, n_src_objects, root_meta)
        report.summary = {**empty, "objects_kept": int(n_kept), "shared_fragments": True}
        report.seconds = time.perf_counter() - t_start
        return report
    t0 = time.perf_counter()
    _publish(store, lv, src, root_meta, n_meta, out.get("num_present", 0),
             vertex_attributes=bool(out.get("vertex_attributes")))
    report.stage_seconds["commit"] = time.perf_counter() - t0
    report.summary = {"vertex_count": int(n_meta), "object_count": int(n_kept),
                      "objects_kept": int(n_kept), "source_objects": int(n_src_objects),
                      "method": "per_object", "preserves_object_ids": True,
                      "shared_fragments": True}
    report.seconds = time.perf_counter() - t_start
    return report


def _inline(src: SourceLevel, lv: LevelPlan) -> bool:
    """Whether the step's graph runs in one task, on the source's real
    vertex and object counts (the plan has estimates past level 1)."""
    return runs_inline(src.vertex_count, lv.inline_vertices, src.n_rows)


def _publish(store: Store, lv: LevelPlan, src: SourceLevel, root_meta, n_meta: int,
             num_present: int, *, vertex_attributes: bool) -> None:
    """The level's groups, the level (its vertex count) and the root."""
    n_src_objects = src.n_rows if src.has_objects else 1
    object_index = None
    if src.has_objects:
        object_index = {"zv_array": "object_index", "num_objects": int(n_src_objects),
                        "num_present": int(num_present), "sid_ndim": root_meta.sid_ndim,
                        "layout": "vlen_manifests_v2", "object_ids_sorted": True}
    caps = ([nm.CAP_PRESERVED_OBJECT_IDS] if src.has_objects else []) + [nm.CAP_SHARED_FRAGMENTS]
    cm.publish_level(store, cm.LevelCommit(
        source_level=lv.source_level, target_level=lv.target_level,
        level_attrs=_level_attrs(lv, n_meta, src.has_objects, n_src_objects, root_meta,
                                 vertex_attributes=vertex_attributes),
        target_origin=lv.target_grid[0], target_grid=lv.target_grid[1], vertex_chunks=[],
        object_index=object_index, has_attributes=bool(src.attribute_names),
        bin_shape=lv.bin_shape, capabilities=caps), root_bin=root_meta.effective_bin_shape)


def _run_region_step(client, store: Store, lv: LevelPlan, region: ChunkRegion, *, root_meta,
                     sparsity_strategy: str, sparsity_seed, progress: Callable | None = None,
                     vertex_attributes=None, attribute_aggregation=None) -> StepReport:
    """The step restricted to ``region`` on a ``changes_only`` store: its
    graph, then the region's stale cells removed, the documents from those
    it found and the logged changes, and the level published (only what
    differs is written)."""
    t_start = time.perf_counter()
    report = StepReport(target_level=lv.target_level)
    src = read_source_level(store, lv.source_level, root_meta.sid_ndim)
    if vertex_attributes is not None or lv.shard_shape or not src.vertices.chunks:
        raise RegionNotApplicable(f"level {lv.target_level}: a region refresh needs an "
                                  f"unsharded level without per-vertex attributes")
    # several old_sequences tasks a worker, so the scheduler can balance them
    sreg = step_region(lv, region, n_old=4 * lv.n_workers,
                       old_rows=manifest_rows(store, lv.target_level) or 0)
    spec, layout, sparsity = plan_step(store, lv, src, root_meta,
                                       sparsity_strategy=sparsity_strategy,
                                       sparsity_seed=sparsity_seed, sources=sreg.sources)
    # Rows not recomputed keep their manifests: the count moves by the changes.
    present = int((fdoc.node_attrs(store, f"{lv.target_level}/{nm.OBJECT_INDEX}") or {})
                  .get("num_present") or 0)
    token = uuid.uuid4().hex[:12]
    graph = sgraph.step_graph(spec, layout, n_rows=src.n_rows, sparsity=sparsity,
                              attribute_names=src.attribute_names, token=token, region=sreg)
    out = execute(client, graph, token, report, name=f"level {lv.target_level} (region)",
                  progress=progress, inline=_inline(src, lv))
    t0 = time.perf_counter()
    sizes = store.logged_sizes()
    cells = step_cells(store, spec, sizes)
    discard_stale(store, spec, sreg, store.logged_keys(), cells, sizes)  # logs what it removes
    n_meta = region_documents(store, spec, cells, sizes)
    if n_meta == 0:
        raise RegionNotApplicable(f"level {lv.target_level} comes out empty")
    _publish(store, lv, src, root_meta, n_meta, present + out["present_delta"],
             vertex_attributes=False)
    report.stage_seconds["commit"] = time.perf_counter() - t0
    report.region_changes = tuple(sorted(set(map(tuple, out["reweighted"])) |
                                         changed_cells(lv, sizes)))
    report.region_rows = tuple(out["rows"])
    n_kept = out["objects_kept"] if src.has_objects else 1
    report.vertex_count, report.objects_kept = n_meta, int(n_kept)
    report.summary = {"vertex_count": int(n_meta), "object_count": int(n_kept),
                      "objects_kept": int(n_kept),
                      "source_objects": int(src.n_rows if src.has_objects else 1),
                      "method": "per_object", "preserves_object_ids": True,
                      "shared_fragments": True}
    report.seconds = time.perf_counter() - t_start
    return report


def rewrite_attributes(client, store: Store, levels: list, buckets: dict, *, n_rows: int,
                       sparsity_strategy: str, sparsity_seed, progress=None) -> None:
    """The attribute stage alone, on the dirty buckets (``{name: buckets}``)
    of the coarse ``levels`` (plans, in order), as one graph: each level's
    survivors drawn from the level-0 row count ``n_rows`` as the build
    draws them.  Only buckets whose bytes differ are written (a refresh's
    ``changes_only`` store)."""
    pairs = [LevelPair(store, lv.source_level, lv.target_level) for lv in levels]
    sparsities = [Sparsity.of_level(lv, sparsity_strategy, sparsity_seed) for lv in levels]
    token = f"attributes-{uuid.uuid4().hex[:8]}"
    graph = sgraph.attribute_refresh_graph(pairs, sparsities, n_rows=n_rows, region=buckets,
                                           token=token)
    try:
        execute(client, graph, token, StepReport(target_level=pairs[-1].target_level),
                name="object attributes", progress=progress,
                inline=levels[0].inline)
    finally:
        for p in pairs:
            cleanup(lambda p=p: drop_exchange(store, p.target_level),
                    what=f"removing the exchange files of level {p.target_level}")


def unchanged_summary(store: Store, lv: LevelPlan, sparsity_strategy: str, sparsity_seed,
                      root_meta) -> dict:
    """The summary a step gives of a level a region refresh leaves as it
    is (its source did not change), from its metadata and the survivors
    drawn as the build draws them."""
    src = read_source_level(store, lv.source_level, root_meta.sid_ndim)
    attrs = (fdoc.node_attrs(store, str(lv.target_level)) or {}).get("zarr_vectors_level") or {}
    n_src = src.n_rows if src.has_objects else 1
    n_kept = int(np.sum(Sparsity.of_level(lv, sparsity_strategy, sparsity_seed).kept(n_src))) \
        if src.has_objects else 1
    return {"vertex_count": int(attrs.get("vertex_count") or 0), "object_count": n_kept,
            "objects_kept": n_kept, "source_objects": int(n_src), "method": "per_object",
            "preserves_object_ids": True, "shared_fragments": True}


def _level_attrs(lv: LevelPlan, n_meta: int, has_objects: bool, n_src_objects: int,
                 root_meta, *, empty: bool = False, vertex_attributes: bool = False) -> dict:
    from zarr_vectors.core.metadata import LevelMetadata
    present = ["vertices", "object_index"] if (has_objects or empty) else ["vertices"]
    if vertex_attributes:  # the family readers gate on (opt-in aggregation)
        present.insert(1, nm.VERTEX_ATTRIBUTES)
    meta = LevelMetadata(
        level=lv.target_level, vertex_count=int(n_meta),
        arrays_present=present,
        bin_shape=lv.bin_shape, bin_ratio=lv.bin_ratio,
        chunk_shape=None if empty else lv.chunk_shape_override,
        object_sparsity=1.0 / lv.sparsity_factor, coarsening_method="per_object",
        parent_level=lv.source_level, preserves_object_ids=bool(has_objects or empty),
        inherited_num_objects=int(n_src_objects) if (has_objects or empty) else 0,
        shared_fragments=True)
    meta.validate()
    payload = meta.to_dict()["zarr_vectors_level"]
    payload.pop("bin_shape", None)
    payload.pop("bin_ratio", None)
    return payload


def _write_empty_level(store: Store, lv: LevelPlan, src: SourceLevel, n: int, root_meta) -> None:
    """The reference's empty ID-preserving level: no vertices, every
    manifest empty, ids 0..n-1."""
    import zarr
    t = lv.target_level
    # The step's attribute columns: the reference's empty level has none.
    store.remove_tree(f"{t}/{nm.OBJECT_ATTRIBUTES}")
    origin, grid = grid_layout(root_meta.bounds, root_meta.chunk_shape)
    docs = {f"{t}/{nm.OBJECT_INDEX}/manifests/zarr.json": fdoc.manifests_doc(n),
            f"{t}/{nm.OBJECT_INDEX}/object_ids/zarr.json": fdoc.dense_array_doc((n,), (n,), np.int64)}
    store.put_many(docs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = store.zarr_store()
        man = zarr.open_array(zs, path=f"{t}/{nm.OBJECT_INDEX}/manifests", mode="r+")
        obj = np.empty(n, dtype=object)
        obj[:] = [cdc.empty_manifest(root_meta.sid_ndim)] * n
        man[:] = obj
        zarr.open_array(zs, path=f"{t}/{nm.OBJECT_INDEX}/object_ids", mode="r+")[:] = \
            np.arange(n, dtype=np.int64)
    cm.commit_level(store, cm.LevelCommit(
        source_level=lv.source_level, target_level=t,
        level_attrs=_level_attrs(lv, 0, True, n, root_meta, empty=True),
        target_origin=origin, target_grid=grid, vertex_chunks=[],
        object_index={"zv_array": "object_index", "num_objects": int(n), "num_present": 0,
                      "sid_ndim": root_meta.sid_ndim, "layout": "vlen_manifests_v2",
                      "object_ids_sorted": True},
        has_attributes=False, bin_shape=lv.bin_shape,
        capabilities=[nm.CAP_PRESERVED_OBJECT_IDS]),
        sid_ndim=root_meta.sid_ndim, root_bin=root_meta.effective_bin_shape)
