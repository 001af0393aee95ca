"""Executor: runs one coarsening step (and the closing link composition)
as one Dask graph on a ``distributed.Client``.

The driver reads the source level's shapes and one listing of its cells,
plans the step (``plan.step_layout``), builds the graph (``graph.py``),
hands it to the scheduler once and waits for its one small output; then it
publishes the level (``commit.py``).  It never routes data between stages.
"""

from __future__ import annotations

import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import commit as cm
from . import format as fmt
from . import graph as gr
from .errors import BuildError, cleanup
from . import stages as st
from . import vertex_attributes as va
from .plan import LevelPlan, grid_layout, ravel, run_cap, shard_runs, step_layout
from .store import Store


@dataclass
class StepReport:
    target_level: int
    vertex_count: int = 0
    objects_kept: int = 0
    source_objects: int = 0
    chunks: int = 0
    seconds: float = 0.0
    tasks: int = 0
    round_trips: int = 0  # graphs handed to the scheduler (one per step)
    stage_tasks: dict = field(default_factory=dict)  # task function -> tasks
    stage_seconds: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------- executor
#: Task states in which a worker thread may still be running a task (a
#: cancelled task keeps running until it returns: Dask cannot stop a thread).
RUNNING = ("executing", "long-running", "cancelled", "resumed")


def _live_tasks(token: str, states: tuple, dask_worker=None) -> int:
    return sum(1 for key, ts in dask_worker.state.tasks.items()
               if ts.state in states and token in str(key))


def wait_until_idle(client, *, token: str = "", states: tuple = RUNNING,
                    timeout: float = 300.0, what: str) -> None:
    """Wait until no worker runs a task whose key contains ``token`` (in
    one of ``states``); ``what`` names them in the timeout error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = sum(client.run(_live_tasks, token, states).values())
        except Exception:  # noqa: BLE001 - no worker state to ask: nothing to wait for
            return
        if n == 0:
            return
        if time.monotonic() > deadline:
            raise BuildError(f"{n} task(s) of {what} are still running on the cluster after "
                             f"{timeout:.0f} s")
        time.sleep(0.1)


def execute(client, graph: gr.Graph, token: str, report: StepReport, *, name: str,
            progress: Callable | None = None):
    """Hand ``graph`` to the scheduler once and return its output.  Only
    the output is held, so every intermediate is released as soon as its
    consumers have finished.  On any failure the graph's tasks are
    cancelled and waited for, so nothing writes after the error returns."""
    t0 = time.perf_counter()
    report.tasks += graph.tasks
    report.round_trips += 1
    for k, n in graph.stages.items():
        report.stage_tasks[k] = report.stage_tasks.get(k, 0) + n
    fut = client.get(graph.dsk, graph.output, sync=False)
    try:
        if progress is not None:
            progress(name, [fut])
        return fut.result()  # the future's own client: it need not be the default
    except BaseException:
        fut.cancel()
        wait_until_idle(client, token=token, what="the failed step")
        raise
    finally:
        fut.release()
        report.stage_seconds[name] = report.stage_seconds.get(name, 0.0) + \
            time.perf_counter() - t0


def _drop_exchange(store: Store, scope) -> None:
    """Remove a step's exchange files (scratch), and their folder once empty."""
    store.remove_tree(f"{fmt.EXCHANGE_DIR}/{scope}")
    if not store.listdir(fmt.EXCHANGE_DIR):
        store.remove_tree(fmt.EXCHANGE_DIR)


# ---------------------------------------------------------------- source info
@dataclass
class SourceLevel:
    store: Store
    level: int
    ndim: int
    vertices: fmt.VlenArrayInfo
    fragments: fmt.VlenArrayInfo
    dtype: str
    has_objects: bool
    n_rows: int
    attribute_names: list[str]
    vertex_count: int


def read_source_level(store: Store, level: int, ndim: int) -> SourceLevel:
    """A level's shapes and names (metadata only: no per-object data)."""
    vi = fmt.vlen_array_info(store, f"{level}/{fmt.VERTICES}")
    fi = fmt.vlen_array_info(store, f"{level}/{fmt.VERTEX_FRAGMENTS}")
    if vi is None or fi is None:
        raise fmt.FormatError(f"{store.describe(str(level))}: level has no vertices array")
    vdoc = fmt.read_json(store, f"{level}/{fmt.VERTICES}/zarr.json") or {}
    vattrs = vdoc.get("attributes") or {}
    if vattrs.get("encoding", "raw") != "raw":
        raise fmt.FormatError(f"{store.describe(str(level))}/vertices: encoding "
                              f"{vattrs.get('encoding')!r} is not supported (raw only)")
    level_attrs = (fmt.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    oi = fmt.node_attrs(store, f"{level}/{fmt.OBJECT_INDEX}")
    mdoc = fmt.read_json(store, f"{level}/{fmt.OBJECT_INDEX}/manifests/zarr.json") \
        if oi is not None else None
    has_objects = mdoc is not None
    n_rows = int((mdoc.get("shape") or [0])[0]) if has_objects else 0
    attr_names = []
    if fmt.node_attrs(store, f"{level}/{fmt.OBJECT_ATTRIBUTES}") is not None:
        for name in store.listdir(f"{level}/{fmt.OBJECT_ATTRIBUTES}"):
            if name == "zarr.json":
                continue
            doc = fmt.read_json(store, f"{level}/{fmt.OBJECT_ATTRIBUTES}/{name}/zarr.json")
            if doc and doc.get("node_type") == "array":
                attr_names.append(name)
    return SourceLevel(store, level, ndim, vi, fi, str(vattrs.get("dtype", "float32")), has_objects,
                       n_rows, attr_names, int(level_attrs.get("vertex_count") or 0))


def chunk_table(store: Store, info: fmt.VlenArrayInfo, origin, grid, ndim: int,
                vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Present chunks of a per-chunk array as sorted row-major chunk
    numbers, with each one's estimated vertex count from one listing of
    its cell sizes (where cells are not plain files: see
    :func:`_stored_weights`)."""
    coords = np.asarray(info.chunks, dtype=np.int64).reshape(-1, ndim)
    numbers = ravel(coords, origin, grid)
    order = np.argsort(numbers, kind="stable")
    numbers = numbers[order]
    mean = max(1.0, vertex_count / max(1, numbers.size))
    weights = np.full(numbers.size, mean)
    if info.raw_cells and numbers.size:
        sizes = store.sizes(f"{info.path}/c")
        if sizes:
            rel = np.asarray([[int(x) for x in k.split("/")] for k in sizes
                              if k.count("/") == ndim - 1 and k.replace("/", "").isdigit()],
                             dtype=np.int64).reshape(-1, ndim)
            nbytes = np.asarray([v for k, v in sizes.items()
                                 if k.count("/") == ndim - 1 and k.replace("/", "").isdigit()],
                                dtype=np.float64)
            lin = ravel(rel + np.asarray(info.origin, dtype=np.int64), origin, grid)
            at = np.searchsorted(numbers, lin)
            hit = (at < numbers.size) & (numbers[np.minimum(at, numbers.size - 1)] == lin)
            # A cell is its framing plus float rows of ``ndim`` coordinates.
            weights[at[hit]] = np.maximum(1.0, (nbytes[hit] - 8) / (4.0 * ndim))
    elif numbers.size:
        weights = _stored_weights(store, info, coords[order], vertex_count, weights)
    return numbers, weights


def _stored_weights(store: Store, info: fmt.VlenArrayInfo, coords: np.ndarray,
                    vertex_count: int, fallback: np.ndarray) -> np.ndarray:
    """Vertex estimates of compressed or sharded cells, from one listing:
    each storage key's bytes shared by the present cells it holds, scaled
    so the level's vertex count adds up (compression shrinks every cell
    alike, closely enough to split a dense shard from a sparse one)."""
    lay = fmt.key_layout(info)
    sizes = store.sizes(info.path)
    if not sizes or vertex_count <= 0:
        return fallback
    rel = coords - np.asarray(info.origin, dtype=np.int64)
    kc = rel // np.asarray(lay.key_shape, dtype=np.int64)
    uniq, inv = np.unique(kc, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    prefix = len(info.path) + 1
    nbytes = np.asarray([sizes.get(lay.key(info.path, k)[prefix:], 0) for k in uniq.tolist()],
                        dtype=np.float64)
    share = nbytes[inv] / np.bincount(inv, minlength=uniq.shape[0])[inv]
    if share.sum() <= 0:
        return fallback
    return np.maximum(1.0, share * (float(vertex_count) / float(share.sum())))


# ---------------------------------------------------------------- one step
def run_step(client, store: Store, lv: LevelPlan, **kwargs) -> StepReport:
    """One coarsening step; its exchange files are scratch and go with it.
    A step that fails (its tasks already stopped by ``execute``) leaves
    nothing behind: what it wrote was unpublished, and a plain rerun must
    not find a half-written level in its way."""
    _drop_exchange(store, lv.target_level)  # leftovers of an interrupted attempt
    try:
        return _run_step(client, store, lv, **kwargs)
    except BaseException:
        cleanup(lambda: _discard_unpublished(store, lv),
                what=f"removing the unpublished level {lv.target_level}")
        raise
    finally:
        cleanup(lambda: _drop_exchange(store, lv.target_level),
                what=f"removing the exchange files of level {lv.target_level}")


def _discard_unpublished(store: Store, lv: LevelPlan) -> None:
    """The failed step's own writes, while its level is unlisted: the
    level, and the family it put under the source level towards it
    (``+k`` for target = source + k: ``coarsen_level`` may skip levels; a
    family into an unlisted level can only come from this step)."""
    if store.get(f"{lv.target_level}/zarr.json") is None:
        store.remove_tree(str(lv.target_level))
        store.remove_tree(fmt.links_family_path(lv.source_level,
                                                lv.target_level - lv.source_level))


def selection_function(strategy: str):
    """A registered selection strategy, resolved where it was registered
    (the driver) and shipped in the graph: workers need not have imported
    the package that registers it.  None for the built-in strategies."""
    if strategy in st.BUILTIN_STRATEGIES:
        return None
    from zarr_vectors.multiresolution.registry import require_selection_strategy
    return require_selection_strategy(strategy)


def plan_step(store: Store, lv: LevelPlan, src: SourceLevel, root_meta, *,
              sparsity_strategy: str, sparsity_seed, vertex_attributes=None,
              attribute_aggregation=None):
    """The step's spec, layout and graph inputs, from metadata and one
    listing (no cell is read)."""
    ndim = root_meta.sid_ndim
    s_origin, s_grid = lv.source_grid
    t_origin, t_grid = lv.target_grid
    numbers, weights = chunk_table(store, src.vertices, s_origin, s_grid, ndim, src.vertex_count)
    layout = step_layout(numbers=numbers, weights=weights, source_origin=s_origin,
                         source_grid=s_grid, source_chunk_shape=lv.source_chunk_shape,
                         target_origin=t_origin, target_grid=t_grid, chunk_shape=lv.chunk_shape,
                         bin_shape=lv.bin_shape, budget=lv.max_block_vertices,
                         n_workers=lv.n_workers)
    root_chunk = tuple(root_meta.chunk_shape)
    strip = dict(chunks=())  # the chunk lists stay with the driver
    routes = step_shard_routes(lv, numbers, weights) if lv.shard_shape else ()
    spec = st.StepSpec(
        store=store, source_level=lv.source_level, target_level=lv.target_level, ndim=ndim,
        bin_shape=lv.bin_shape, chunk_shape=lv.chunk_shape, source_origin=tuple(s_origin),
        source_grid_shape=tuple(s_grid), target_origin=tuple(t_origin),
        target_grid_shape=tuple(t_grid),
        block_starts=tuple(int(x) for x in layout.block_starts),
        target_block_starts=tuple(int(x) for x in layout.target_block_starts),
        scale_source=tuple(int(round(c / r)) for c, r in zip(lv.source_chunk_shape, root_chunk)),
        scale_target=tuple(int(round(c / r)) for c, r in zip(lv.chunk_shape, root_chunk)),
        vertices=fmt.VlenArrayInfo(**{**src.vertices.__dict__, **strip}),
        fragments=fmt.VlenArrayInfo(**{**src.fragments.__dict__, **strip}),
        source_dtype=src.dtype, has_objects=src.has_objects,
        manifests_path=f"{lv.source_level}/{fmt.OBJECT_INDEX}/manifests" if src.has_objects else None,
        links=lv.cross_level_storage,
        vertex_attributes=va.resolve(store, lv.source_level, vertex_attributes,
                                     attribute_aggregation),
        shard_shape=lv.shard_shape, shard_routes=routes)
    sparsity = (lv.sparsity_factor, sparsity_strategy, sparsity_seed, tuple(lv.source_bin),
                selection_function(sparsity_strategy))
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
    routes = [st.ShardRoute(lv.target_level, tuple(t_origin), tuple(t_grid), lv.shard_shape,
                            shard_runs(home, weights, t_origin, t_grid, lv.shard_shape, cap),
                            lv.target_level)]
    if lv.cross_level_storage != "none":
        routes.append(st.ShardRoute(
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
    return gr.step_graph(spec, layout, n_rows=src.n_rows, sparsity=sparsity,
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
                  progress=progress)
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
    object_index = None
    if src.has_objects:
        object_index = {"zv_array": "object_index", "num_objects": int(n_src_objects),
                        "num_present": int(out["num_present"]), "sid_ndim": root_meta.sid_ndim,
                        "layout": "vlen_manifests_v2", "object_ids_sorted": True}
    caps = ([fmt.CAP_PRESERVED_OBJECT_IDS] if src.has_objects else []) + [fmt.CAP_SHARED_FRAGMENTS]
    cm.publish_level(store, cm.LevelCommit(
        source_level=lv.source_level, target_level=lv.target_level,
        level_attrs=_level_attrs(lv, n_meta, src.has_objects, n_src_objects, root_meta,
                                 vertex_attributes=bool(out.get("vertex_attributes"))),
        target_origin=lv.target_grid[0], target_grid=lv.target_grid[1], vertex_chunks=[],
        object_index=object_index, has_attributes=bool(src.attribute_names),
        bin_shape=lv.bin_shape, capabilities=caps), root_bin=root_meta.effective_bin_shape)
    report.stage_seconds["commit"] = time.perf_counter() - t0
    report.summary = {"vertex_count": int(n_meta), "object_count": int(n_kept),
                      "objects_kept": int(n_kept), "source_objects": int(n_src_objects),
                      "method": "per_object", "preserves_object_ids": True,
                      "shared_fragments": True}
    report.seconds = time.perf_counter() - t_start
    return report


def _level_attrs(lv: LevelPlan, n_meta: int, has_objects: bool, n_src_objects: int,
                 root_meta, *, empty: bool = False, vertex_attributes: bool = False) -> dict:
    from zarr_vectors.core.metadata import LevelMetadata
    present = ["vertices", "object_index"] if (has_objects or empty) else ["vertices"]
    if vertex_attributes:  # the family readers gate on (opt-in aggregation)
        present.insert(1, fmt.VERTEX_ATTRIBUTES)
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
    store.remove_tree(f"{t}/{fmt.OBJECT_ATTRIBUTES}")
    origin, grid = grid_layout(root_meta.bounds, root_meta.chunk_shape)
    docs = {f"{t}/{fmt.OBJECT_INDEX}/manifests/zarr.json": fmt.manifests_doc(n),
            f"{t}/{fmt.OBJECT_INDEX}/object_ids/zarr.json": fmt.dense_array_doc((n,), (n,), np.int64)}
    store.put_many(docs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = store.zarr_store()
        man = zarr.open_array(zs, path=f"{t}/{fmt.OBJECT_INDEX}/manifests", mode="r+")
        obj = np.empty(n, dtype=object)
        obj[:] = [fmt.empty_manifest(root_meta.sid_ndim)] * n
        man[:] = obj
        zarr.open_array(zs, path=f"{t}/{fmt.OBJECT_INDEX}/object_ids", mode="r+")[:] = \
            np.arange(n, dtype=np.int64)
    cm.commit_level(store, cm.LevelCommit(
        source_level=lv.source_level, target_level=t,
        level_attrs=_level_attrs(lv, 0, True, n, root_meta, empty=True),
        target_origin=origin, target_grid=grid, vertex_chunks=[],
        object_index={"zv_array": "object_index", "num_objects": int(n), "num_present": 0,
                      "sid_ndim": root_meta.sid_ndim, "layout": "vlen_manifests_v2",
                      "object_ids_sorted": True},
        has_attributes=False, bin_shape=lv.bin_shape,
        capabilities=[fmt.CAP_PRESERVED_OBJECT_IDS]),
        sid_ndim=root_meta.sid_ndim, root_bin=root_meta.effective_bin_shape)


# ---------------------------------------------------------------- composition
def compose_links(client, store: Store, *, root_meta, depth: int, storage: str,
                  n_workers: int, progress: Callable | None = None,
                  max_block_vertices: int = 2_000_000, shard_shape=None) -> tuple[list, dict]:
    """The closing stage, one graph: ``±N`` families (N >= 2) composed
    from the published ``+1`` families by one task per run of fine
    chunks; their documents are written on the cluster by its last task.
    Returns the families left for the driver to commit (none) and the
    stage timings."""
    report = StepReport(target_level=-1)
    levels = cm.published_levels(store)
    if storage == "none" or depth == 0 or len(levels) < 2:
        return [], report.stage_seconds
    max_delta = (max(levels) - min(levels)) if depth == -1 else int(depth)
    if max_delta < 2:
        return [], report.stage_seconds
    token = uuid.uuid4().hex[:12]
    _drop_exchange(store, COMPOSE_SCOPE)  # leftovers of an interrupted attempt
    try:
        graph, _ = compose_graph(store, levels, max_delta, root_meta=root_meta, storage=storage,
                                 n_workers=n_workers, max_block_vertices=max_block_vertices,
                                 token=token, shard_shape=shard_shape)
        if graph is not None:
            execute(client, graph, token, report, name="compose", progress=progress)
    finally:
        cleanup(lambda: _drop_exchange(store, COMPOSE_SCOPE),
                what="removing the exchange files of the composition")
    return [], report.stage_seconds


#: Exchange scope of the composition graph (a step's is its target level).
COMPOSE_SCOPE = "compose"


def _plus_one_arrays(store: Store, level: int) -> dict:
    """The offset arrays of a level's ``+1`` family, as read cells need them
    (plain, compressed or sharded), without their chunk lists."""
    fam = fmt.links_family_path(level, 1)
    out = {}
    for seg in store.listdir(fam):
        if seg == "zarr.json":
            continue
        info = fmt.vlen_array_info(store, f"{fam}/{seg}")
        if info is None:
            raise fmt.FormatError(f"{store.describe(f'{fam}/{seg}')}: link array has no "
                                  f"readable zarr.json")
        out[seg] = fmt.VlenArrayInfo(**{**info.__dict__, "chunks": ()})
    return out


def compose_graph(store: Store, levels: list[int], max_delta: int, *, root_meta, storage: str,
                  n_workers: int, max_block_vertices: int, token: str, shard_shape=None):
    """The composition graph: per fine level, runs of its vertex chunks
    sized by the vertex budget, then (sharded) the shard writers, then one
    summary task."""
    from .compose import compose_block, compose_summary, level_geometry
    from .plan import weighted_runs
    geo = {lv: level_geometry(store, lv, root_meta) for lv in levels}
    segs = {lv: _plus_one_arrays(store, lv) for lv in levels}
    g = gr.Graph({})
    tasks, owners, routes = [], [], []
    ndim = root_meta.sid_ndim
    plans = []
    for f in levels:
        info = fmt.vlen_array_info(store, f"{f}/{fmt.VERTICES}")
        if info is None or not info.chunks:
            continue
        origin, grid = geo[f]["grid"]
        numbers, weights = chunk_table(store, info, origin, grid, ndim, geo[f]["vertex_count"])
        coords = np.stack(np.unravel_index(numbers, tuple(grid)), axis=1).reshape(-1, ndim) + \
            np.asarray(origin, dtype=np.int64)
        cap = run_cap(float(weights.sum()), max_block_vertices, n_workers)
        if shard_shape is not None:  # any level may receive a +N or -N family
            routes.append(st.ShardRoute(f, tuple(origin), tuple(grid), tuple(shard_shape),
                                        shard_runs(coords, weights, origin, grid, shard_shape,
                                                   cap), COMPOSE_SCOPE))
        steps = [n for n in range(2, max_delta + 1) if f + n in geo]
        if steps and segs[f]:
            plans.append((f, steps, coords, weighted_runs(weights, cap)))
    ctx = {"geo": geo, "segs": segs, "routes": tuple(routes)}
    for f, steps, coords, starts in plans:
        for a, b in zip(starts.tolist(), np.r_[starts[1:], coords.shape[0]].tolist()):
            tasks.append(g.add(token, compose_block, f"{f}:{a}", store, ctx, f, coords[a:b],
                               steps, storage, f"{f}.{a}"))
            owners.append(f)
    if not tasks:
        return None, geo
    shards = gr.shard_writers(g, token, store, ctx["routes"], tasks)
    g.output = g.add(token, compose_summary, 0, store, geo, owners, ndim, shard_shape,
                     *tasks, *shards)
    return g, geo
