"""Executor: wires the stages of one coarsening step (and the closing link
composition) into Dask tasks on a ``distributed.Client``.

Task outputs stay on the workers; the driver only gathers per-chunk and
per-object bookkeeping (which destinations a task has data for, chunk
counts, link cell lists) to route the next exchange and to commit.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import commit as cm
from . import format as fmt
from . import stages as st
from .plan import LevelPlan, chunks_per_block, grid_layout, split_runs
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
    stage_seconds: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)


class _Stages:
    """Submits and counts tasks, times stages; optional progress callback."""

    def __init__(self, client, report: StepReport, progress: Callable | None):
        self.client, self.report, self.progress = client, report, progress

    def submit(self, fn, *args, **kwargs):
        self.report.tasks += 1
        return self.client.submit(fn, *args, **kwargs)

    def run(self, name: str, futures: list, *, summary: Callable | None = None,
            gather: bool = False):
        """Wait for a stage.  With ``summary``, a small task per future
        extracts what the driver needs to route the next stage and only
        those results travel back: one round trip per stage."""
        t0 = time.perf_counter()
        if self.progress is not None and futures:
            self.progress(name, futures)
        if summary is not None:
            out = self.client.gather([self.submit(summary, f) for f in futures])
        elif gather:
            out = self.client.gather(futures)
        else:
            from distributed import wait
            wait(futures)
            bad = [f for f in futures if f.status == "error"]
            if bad:
                bad[0].result()  # re-raises the task's own error
            out = futures
        self.report.stage_seconds[name] = self.report.stage_seconds.get(name, 0.0) + \
            time.perf_counter() - t0
        return out


def _identity(value):
    return value


def share(client, value):
    """A future for ``value`` that many tasks read.  Not ``client.scatter``:
    scattered data has no recipe, so a worker dying during the scatter, or
    holding the last copy, cancels every task that needs it ("lost
    dependencies").  As a task it is recomputed like any other result."""
    return client.submit(_identity, value, pure=False)


def _keys_of(name: str) -> Callable[[dict], list[int]]:
    return lambda result: sorted(result[name].keys())


def _refs_route(refs: dict) -> list[int]:
    return refs["blocks"]


def _written_chunks(result: dict) -> list:
    return result["chunks"]


def _by_destination(routes) -> dict[int, list[int]]:
    """Invert ``(sender, destinations)`` routes into ``{destination: senders}``."""
    out: dict[int, list[int]] = {}
    for sender, dests in routes:
        for d in dests:
            out.setdefault(d, []).append(sender)
    return out


def _drop_exchange(store: Store, scope) -> None:
    """Remove a stage's exchange files (scratch), and their folder once empty."""
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
    object_ids: np.ndarray | None
    n_rows: int
    attribute_names: list[str]
    vertex_count: int


def _read_object_ids(store: Store, zs, level: int, n_rows: int) -> np.ndarray:
    """The id table of a level's object index.  Only an index without the
    array (its document absent: the V1 layout) means "rows are ids"; a
    damaged table fails, naming the array and chunk, as does one whose
    length disagrees with the manifests."""
    import zarr
    path = f"{level}/{fmt.OBJECT_INDEX}/object_ids"
    if fmt.read_json(store, f"{path}/zarr.json") is None:
        return np.arange(n_rows, dtype=np.int64)
    arr = zarr.open_array(zs, path=path, mode="r")
    if arr.ndim != 1 or int(arr.shape[0]) != n_rows:
        raise fmt.FormatError(f"{store.describe(path)}: {tuple(arr.shape)} ids for {n_rows} "
                              f"manifest rows")
    return np.asarray(fmt.read_rows_checked(store, arr, path, 0, n_rows), dtype=np.int64)


def read_source_level(store: Store, level: int, ndim: int) -> SourceLevel:
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
    has_objects = oi is not None and fmt.read_json(
        store, f"{level}/{fmt.OBJECT_INDEX}/manifests/zarr.json") is not None
    ids, n_rows = None, 0
    if has_objects:
        import zarr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zs = store.zarr_store()
            man = zarr.open_array(zs, path=f"{level}/{fmt.OBJECT_INDEX}/manifests", mode="r")
            n_rows = int(man.shape[0])
            ids = _read_object_ids(store, zs, level, n_rows)
    attr_names = []
    if fmt.node_attrs(store, f"{level}/{fmt.OBJECT_ATTRIBUTES}") is not None:
        for name in store.listdir(f"{level}/{fmt.OBJECT_ATTRIBUTES}"):
            if name == "zarr.json":
                continue
            doc = fmt.read_json(store, f"{level}/{fmt.OBJECT_ATTRIBUTES}/{name}/zarr.json")
            if doc and doc.get("node_type") == "array":
                attr_names.append(name)
    return SourceLevel(store, level, ndim, vi, fi, str(vattrs.get("dtype", "float32")), has_objects,
                       ids, n_rows, attr_names, int(level_attrs.get("vertex_count") or 0))


def kept_rows(n_rows: int, sparsity_factor: float, strategy: str, seed, base_bin) -> np.ndarray:
    """The reference's survivors: seeded selection, same seed same rows."""
    keep = np.zeros(n_rows, dtype=bool)
    if sparsity_factor > 1.0 and n_rows > 1:
        from zarr_vectors.multiresolution.object_selection import apply_sparsity
        kept = apply_sparsity(n_rows, 1.0 / sparsity_factor, strategy, seed=seed,
                              representative_points=None, bin_shape=tuple(base_bin))
        keep[np.asarray(kept, dtype=np.int64)] = True
    else:
        keep[:] = True
    return keep


# ---------------------------------------------------------------- one step
def run_step(client, store: Store, lv: LevelPlan, **kwargs) -> StepReport:
    """One coarsening step; its exchange files are scratch and go with it."""
    try:
        return _run_step(client, store, lv, **kwargs)
    finally:
        _drop_exchange(store, lv.target_level)


def _run_step(client, store: Store, lv: LevelPlan, *, root_meta, sparsity_strategy: str,
              sparsity_seed, progress: Callable | None = None) -> StepReport:
    # Block sizes (the memory budget) are already in ``lv``: see plan.py.
    t_start = time.perf_counter()
    report = StepReport(target_level=lv.target_level)
    S = _Stages(client, report, progress)
    ndim = root_meta.sid_ndim
    src = read_source_level(store, lv.source_level, ndim)
    chunks = src.vertices.chunks
    if not chunks:
        # The reference enumerates fragments; with none there is nothing
        # to coarsen and no level is written.
        report.summary = {"vertex_count": 0, "object_count": 0, "objects_kept": 0,
                          "method": "per_object", "preserves_object_ids": True}
        return report
    n_src_objects = src.n_rows if src.has_objects else 1
    if src.has_objects and n_src_objects == 0:
        report.summary = {"vertex_count": 0, "object_count": 0, "objects_kept": 0,
                          "method": "per_object", "preserves_object_ids": True}
        return report
    keep = kept_rows(n_src_objects, lv.sparsity_factor, sparsity_strategy, sparsity_seed,
                     lv.source_bin) if src.has_objects else np.ones(1, bool)
    report.source_objects, report.objects_kept = int(n_src_objects), int(keep.sum())

    root_chunk = tuple(root_meta.chunk_shape)
    scale_src = tuple(int(round(c / r)) for c, r in zip(lv.source_chunk_shape, root_chunk))
    scale_trg = tuple(int(round(c / r)) for c, r in zip(lv.chunk_shape, root_chunk))
    n_chunks = len(chunks)
    runs = split_runs(n_chunks, lv.chunks_per_block)
    block_of_chunk = np.repeat(np.arange(len(runs)), [hi - lo for lo, hi in runs])
    spec = st.StepSpec(
        store=store, source_level=lv.source_level, target_level=lv.target_level, ndim=ndim,
        bin_shape=lv.bin_shape, chunk_shape=lv.chunk_shape, source_origin=lv.source_grid[0],
        target_origin=lv.target_grid[0], target_chunks_per_block=lv.target_chunks_per_block,
        n_partitions=lv.n_target_blocks, target_grid_shape=tuple(lv.target_grid[1]),
        scale_source=scale_src, scale_target=scale_trg,
        source_chunks=chunks, vertices=src.vertices, fragments=src.fragments,
        source_dtype=src.dtype, has_objects=src.has_objects,
        manifests_path=f"{lv.source_level}/{fmt.OBJECT_INDEX}/manifests" if src.has_objects else None,
        links=lv.cross_level_storage)
    spec_f = share(client, spec)

    # -- object refs (per manifest bucket)
    buckets: list[tuple[int, int]] = []
    refs_f: list = []
    refs_routes: list[list[int]] = []
    if src.has_objects:
        perm = np.argsort(src.object_ids, kind="stable")
        bucket_rows = min(fmt.MANIFEST_BUCKET, n_src_objects)
        buckets = split_runs(n_src_objects, bucket_rows)
        boc_f = share(client, block_of_chunk)
        refs_f = [S.submit(st.object_refs, spec_f, k, a, perm[a:b], keep[perm[a:b]],
                           boc_f, pure=False) for k, (a, b) in enumerate(buckets)]
        refs_routes = S.run("object refs", refs_f, summary=_refs_route)

    # -- bin partials (per source block)
    # Which buckets left a refs exchange file for each block.
    block_buckets = _by_destination(enumerate(refs_routes))
    partial_f = [S.submit(st.bin_partials, spec_f, b, np.arange(lo, hi),
                          block_buckets.get(b, []), pure=False)
                 for b, (lo, hi) in enumerate(runs)]
    routes = S.run("bin partials", partial_f, summary=_keys_of("exchange"))

    # -- shuffle partials by bin key into metavertices (per partition)
    senders = _by_destination(enumerate(routes))
    reduce_f = {p: S.submit(st.reduce_metavertices, spec_f, p, blocks,
                            *[S.submit(st.pick, partial_f[b], "exchange", p) for b in blocks])
                for p, blocks in sorted(senders.items())}
    troutes = dict(zip(reduce_f, S.run("shuffle", list(reduce_f.values()),
                                       summary=_keys_of("to_target"))))

    # -- write metavertices (per target block)
    receivers = _by_destination(troutes.items())
    write_f = {tb: S.submit(st.write_metavertices, spec_f, tb, parts,
                            *[S.submit(st.pick, reduce_f[p], "to_target", tb) for p in parts],
                            pure=False)
               for tb, parts in sorted(receivers.items())}
    written_f = [S.submit(_written_chunks, f) for f in write_f.values()]

    # -- resolve parents (per partition), then links + sequences (per block).
    # Routing is already known, so there is no round trip in between: with
    # no metavertex at all every vertex is parentless and nothing is written.
    resolve_f = {}
    for p, rf in reduce_f.items():
        located = [S.submit(st.pick, write_f[tb], "located", p) for tb in troutes[p]]
        resolve_f[p] = S.submit(st.resolve_parents, spec_f, p, rf, *located)
    link_f = []
    for b in range(len(runs)):
        answers = [S.submit(st.answer_for, resolve_f[p], b, p) for p in routes[b]]
        link_f.append(S.submit(st.links_and_sequences, spec_f, b, partial_f[b], *answers,
                               pure=False))
    # Their results are small (written cells, record counts, buckets served).
    link_sum = S.run("write vertices + links", link_f, gather=True)
    vertex_chunks = sorted(c for w in client.gather(written_f) for c in (w or []))
    n_meta = sum(n for _, n in vertex_chunks)
    report.vertex_count, report.chunks = n_meta, len(vertex_chunks)

    t_origin, t_grid = lv.target_grid
    if n_meta == 0:
        _write_empty_level(store, lv, src, n_src_objects, root_meta)
        report.summary = {"vertex_count": 0, "object_count": 0, "objects_kept": int(keep.sum()),
                          "method": "per_object", "preserves_object_ids": True,
                          "shared_fragments": True}
        report.seconds = time.perf_counter() - t_start
        return report

    # -- the coarse level's object index and attributes: independent of each
    # other, so they run together and return in one round trip.
    families: list[cm.LinkFamily] = []
    if lv.cross_level_storage != "none":
        plus = cm.LinkFamily(lv.source_level, 1, *lv.source_grid)
        for s_ in link_sum:
            plus.add(s_["plus"])
        families.append(plus)
    # Manifest buckets first: the longest single tasks should start first.
    man_f, attr_f = [], []
    if src.has_objects:
        _prepare_object_arrays(store, lv, src, n_src_objects)
        seq_blocks = _by_destination((b, s_["sequences"]) for b, s_ in enumerate(link_sum))
        man_f = [S.submit(st.write_manifests, spec_f, k, refs_f[k], buckets[k],
                          seq_blocks.get(k, []), pure=False) for k in range(len(buckets))]
        attr_f = []
        for name in src.attribute_names:
            for a, b in split_runs(n_src_objects, fmt.ATTRIBUTE_BUCKET):
                attr_f.append(S.submit(
                    st.write_attributes, store, f"{lv.source_level}/{fmt.OBJECT_ATTRIBUTES}/{name}",
                    f"{lv.target_level}/{fmt.OBJECT_ATTRIBUTES}/{name}", (a, b), keep[a:b], pure=False))
    done = S.run("manifests", man_f + attr_f, gather=True)
    if lv.cross_level_storage == "explicit":
        minus = cm.LinkFamily(lv.target_level, -1, t_origin, t_grid)
        for s_ in link_sum:
            minus.add(s_["minus"])
        families.append(minus)
    object_index = None
    if src.has_objects:
        present = done[:len(man_f)]
        object_index = {"zv_array": "object_index", "num_objects": int(n_src_objects),
                        "num_present": int(sum(present)), "sid_ndim": ndim,
                        "layout": "vlen_manifests_v2", "object_ids_sorted": True}

    # -- commit
    t0 = time.perf_counter()
    level_attrs = _level_attrs(lv, n_meta, src.has_objects, n_src_objects, root_meta)
    caps = ([fmt.CAP_PRESERVED_OBJECT_IDS] if src.has_objects else []) + [fmt.CAP_SHARED_FRAGMENTS]
    cm.commit_level(store, cm.LevelCommit(
        source_level=lv.source_level, target_level=lv.target_level, level_attrs=level_attrs,
        target_origin=t_origin, target_grid=t_grid, vertex_chunks=vertex_chunks,
        object_index=object_index, has_attributes=bool(src.attribute_names),
        bin_shape=lv.bin_shape, capabilities=caps, families=families),
        sid_ndim=ndim, root_bin=root_meta.effective_bin_shape)
    report.stage_seconds["commit"] = time.perf_counter() - t0
    report.summary = {"vertex_count": int(n_meta), "object_count": int(keep.sum()),
                      "objects_kept": int(keep.sum()), "source_objects": int(n_src_objects),
                      "method": "per_object", "preserves_object_ids": True,
                      "shared_fragments": True}
    report.seconds = time.perf_counter() - t_start
    for f in (refs_f + partial_f + list(reduce_f.values()) + list(write_f.values())
              + list(resolve_f.values()) + link_f):
        f.release()
    return report


def _level_attrs(lv: LevelPlan, n_meta: int, has_objects: bool, n_src_objects: int,
                 root_meta, *, empty: bool = False) -> dict:
    from zarr_vectors.core.metadata import LevelMetadata
    meta = LevelMetadata(
        level=lv.target_level, vertex_count=int(n_meta),
        arrays_present=["vertices", "object_index"] if (has_objects or empty) else ["vertices"],
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


def _prepare_object_arrays(store: Store, lv: LevelPlan, src: SourceLevel, n: int) -> None:
    """Array documents and the id table of the coarse object index, plus
    empty attribute columns, under the still-unpublished level."""
    import zarr
    t = lv.target_level
    ids = np.sort(src.object_ids)
    docs = {f"{t}/{fmt.OBJECT_INDEX}/manifests/zarr.json": fmt.manifests_doc(n),
            f"{t}/{fmt.OBJECT_INDEX}/object_ids/zarr.json": fmt.dense_array_doc((n,), (n,), np.int64)}
    from zarr_vectors.core.arrays import _default_fill_value_for_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = store.zarr_store()
        for name in src.attribute_names:
            sarr = zarr.open_array(zs, path=f"{src.level}/{fmt.OBJECT_ATTRIBUTES}/{name}", mode="r")
            dtype = np.dtype(sarr.dtype)
            fill = _default_fill_value_for_dtype(dtype)
            shape = tuple(sarr.shape)
            docs[f"{t}/{fmt.OBJECT_ATTRIBUTES}/{name}/zarr.json"] = fmt.dense_array_doc(
                shape, (fmt.ATTRIBUTE_BUCKET, *shape[1:]), dtype, fill_value=fill,
                attributes={"zv_array": "object_attribute", "name": name, "dtype": str(dtype),
                            "shape": list(shape), "fill_sentinel_meaning": "absent"})
        store.put_many(docs)
        zarr.open_array(zs, path=f"{t}/{fmt.OBJECT_INDEX}/object_ids", mode="r+")[:] = ids


def _write_empty_level(store: Store, lv: LevelPlan, src: SourceLevel, n: int, root_meta) -> None:
    """The reference's empty ID-preserving level: no vertices, every
    manifest empty, ids 0..n-1."""
    import zarr
    t = lv.target_level
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
                 max_block_vertices: int = 2_000_000) -> tuple[list, dict]:
    """The closing stage: ``±N`` families (N >= 2) composed from the
    published ``+1`` families, one task per block of fine chunks."""
    from .compose import compose_block, level_geometry
    report = StepReport(target_level=-1)
    S = _Stages(client, report, progress)
    levels = cm.published_levels(store)
    if storage == "none" or depth == 0 or len(levels) < 2:
        return [], report.stage_seconds
    max_delta = (max(levels) - min(levels)) if depth == -1 else int(depth)
    if max_delta < 2:
        return [], report.stage_seconds
    geo = {lv: level_geometry(store, lv, root_meta) for lv in levels}
    plus_fams = {lv: cm.read_family(store, lv, 1) for lv in levels}
    families: dict[tuple[int, int], cm.LinkFamily] = {}
    fine_chunks = {f: np.asarray(sorted({tuple(c) for _, (_, cs) in plus_fams[f].items() for c in cs}),
                                 dtype=np.int64).reshape(-1, root_meta.sid_ndim)
                   for f in levels[:-1]}
    # What every task reads (grids, +1 presence lists, fine chunk tables)
    # is one task result each worker fetches once, not an argument of every task.
    ctx_f = share(client, {"geo": geo, "plus_fams": plus_fams, "fine_chunks": fine_chunks})
    tasks = []
    for f in levels[:-1]:
        steps = [n for n in range(2, max_delta + 1) if f + n in geo]
        if not len(fine_chunks[f]) or not steps:
            continue
        per = chunks_per_block(len(fine_chunks[f]), geo[f]["vertex_count"], n_workers,
                               max_block_vertices)
        for a, b in split_runs(len(fine_chunks[f]), per):
            tasks.append((f, S.submit(compose_block, store, ctx_f, f, (a, b), steps, storage,
                                      pure=False)))
    # Their results are small: the cells written, per family.
    summaries = S.run("compose", [t for _, t in tasks], gather=True)
    for (f, _), s_ in zip(tasks, summaries):
        for n, written in s_["plus"].items():
            families.setdefault((f, n), cm.LinkFamily(f, n, *geo[f]["grid"])).add(written)
        for n, written in s_["minus"].items():
            families.setdefault((f + n, -n), cm.LinkFamily(f + n, -n, *geo[f + n]["grid"])).add(written)
    return list(families.values()), report.stage_seconds
