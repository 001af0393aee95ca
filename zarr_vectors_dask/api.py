"""Public API: ``plan_pyramid``, ``build_pyramid``, ``coarsen_level``.

Validates everything before writing anything, takes the build lock,
decides what ``resume``/``overwrite`` keep or discard, then runs the
pipeline level by level and the closing composition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Callable

from zarr_vectors.exceptions import StoreError

from . import commit as cm
from . import format as fmt
from . import pipeline as pl
from . import handles
from . import stages
from . import vertex_attributes as va
from .errors import (BuildError, LevelNotFoundError, PlanMetadataError, StoreNotFoundError,
                     cleanup, quiet_expected_task_errors)
from .lock import BuildLock
from .plan import PlanError, PyramidPlan, plan_pyramid_from_meta, validate_factors
from .store import Store, check_access

RECORD_DIR = ".zvdask/levels"
#: The arguments of the build in progress, written before it changes
#: anything and removed after its last commit (see ``_prepare_targets``).
BUILD_RECORD = ".zvdask/build.json"


# ------------------------------------------------------------ store facts
class NotAZarrVectorsStoreError(fmt.FormatError, StoreError):
    """The path holds no zarr-vectors store (zarr-vectors: ``StoreError``)."""


def _open(store_arg, storage_options) -> Store:
    """A ``Store`` for a path or URL (or a ``Store``), checked to be a
    zarr-vectors store with a level 0.  Handles go through :func:`_opened`."""
    if isinstance(store_arg, Store):
        store = store_arg
    else:
        store = Store.from_url(store_arg, storage_options)
    if store.is_local and not os.path.exists(store.root):
        raise StoreNotFoundError(f"{store.url}: no such path")
    check_access(store)
    attrs = fmt.node_attrs(store, "")
    if attrs is None or "zarr_vectors" not in attrs:
        raise NotAZarrVectorsStoreError(f"{store.url}: not a zarr-vectors store (no "
                                        f"zarr_vectors root metadata in zarr.json)")
    if fmt.node_attrs(store, "0") is None:
        raise NotAZarrVectorsStoreError(f"{store.url}: zarr-vectors store has no level 0")
    return store


@contextlib.contextmanager
def _opened(store_arg, storage_options, *, writable: bool = True):
    """:func:`_open` for anything a zarr-vectors caller may pass: a path, a
    URL, a ``Store``, or an open handle (``zarr_vectors.open(...)``'s
    Dataset, ``open_store(...)``'s Group, a zarr Group or zarr store), whose
    URL and storage options come from its zarr store (``handles.py``)."""
    if isinstance(store_arg, Store):
        yield _open(store_arg, storage_options)
        return
    with handles.opened(store_arg, storage_options, writable=writable) as (url, options):
        yield _open(url, options)


def _check_method(method, options) -> None:
    """``method``/``options`` as zarr-vectors takes them.  Only the built-in
    ``"per_object"`` pyramid is built here, and it takes no options; any
    other name is looked up in zarr-vectors' strategy registry, which
    raises zarr-vectors' own error (naming the method and the package that
    provides it) when nothing registered it -- before the store is touched."""
    if method == "per_object":
        if options:
            raise PlanError(f"method='per_object' takes no extra options; got {sorted(options)}. "
                            f"Those keywords belong to a registered strategy -- pass method= "
                            f"as well.")
        return
    from zarr_vectors.multiresolution.registry import require_coarsen_strategy
    require_coarsen_strategy(method)


def _registered_strategy(method):
    """The strategy another package registered under ``method`` (its own
    serial code, not this package's pyramid), or None for ``per_object``."""
    if method == "per_object":
        return None
    from zarr_vectors.multiresolution.registry import require_coarsen_strategy
    return require_coarsen_strategy(method)


def _root_meta(store: Store):
    from zarr_vectors.core.metadata import RootMetadata
    return RootMetadata.from_dict(cm.read_root_attrs(store))


def _level_shapes(store: Store, level: int, root_meta) -> tuple[tuple, tuple]:
    """(bin_shape, chunk_shape) of a published level."""
    attrs = (fmt.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    chunk = tuple(float(c) for c in (attrs.get("chunk_shape") or root_meta.chunk_shape))
    if level == 0:
        return tuple(float(b) for b in root_meta.effective_bin_shape), chunk
    ms = (cm.read_root_attrs(store).get("multiscales") or [{}])[0]
    for ds in ms.get("datasets") or []:
        if ds.get("path") == str(level):
            for t in ds.get("coordinateTransformations") or []:
                if t.get("type") == "translation":
                    return tuple(2.0 * float(x) for x in t["translation"]), chunk
    if attrs.get("bin_shape"):
        return tuple(float(b) for b in attrs["bin_shape"]), chunk
    return tuple(float(b) for b in root_meta.effective_bin_shape), chunk


def _n_workers(client) -> int:
    try:
        return max(1, len(client.scheduler_info()["workers"]))
    except Exception:  # noqa: BLE001
        return 2


def _make_plan(store: Store, *, factors, chunk_scale_factors, cross_level_depth,
               cross_level_storage, sparsity_strategy, n_workers, start_level=0,
               max_block_vertices=2_000_000, shard_shape=None) -> PyramidPlan:
    validate_factors(factors)
    root_meta = _root_meta(store)
    sbin, schunk = _level_shapes(store, start_level, root_meta)
    info = fmt.vlen_array_info(store, f"{start_level}/{fmt.VERTICES}")
    if info is None:
        raise fmt.FormatError(f"{store.describe(str(start_level))}: level has no vertices array")
    lattrs = (fmt.node_attrs(store, str(start_level)) or {}).get("zarr_vectors_level") or {}
    oi = fmt.node_attrs(store, f"{start_level}/{fmt.OBJECT_INDEX}") or {}
    plan = plan_pyramid_from_meta(
        store=store.url, ndim=root_meta.sid_ndim, root_chunk_shape=tuple(root_meta.chunk_shape),
        root_bin=tuple(root_meta.effective_bin_shape), bounds=root_meta.bounds,
        level0_bin=sbin, level0_chunk_shape=schunk, level0_chunks=len(info.chunks),
        level0_vertices=int(lattrs.get("vertex_count") or 0), n_objects=int(oi.get("num_objects", 0)),
        start_level=start_level, factors=factors, chunk_scale_factors=chunk_scale_factors,
        cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
        sparsity_strategy=sparsity_strategy, n_workers=n_workers,
        max_block_vertices=max_block_vertices, shard_shape=shard_shape)
    return plan


def plan_pyramid(store, *, factors, chunk_scale_factors=None, sparsity_strategy="random",
                 cross_level_depth=1, cross_level_storage="explicit", storage_options=None,
                 n_workers: int = 2, max_block_vertices: int = 2_000_000,
                 method: str = "per_object", options: dict | None = None,
                 shard_shape=None, **_ignored) -> PyramidPlan:
    """The plan ``build_pyramid`` would run; print it to see levels, bins,
    chunk grids and task counts.  Reads metadata only.  ``store`` is
    anything ``build_pyramid`` takes."""
    _check_method(method, options)
    if method != "per_object":
        raise PlanError(f"method={method!r} is a strategy registered by another package; "
                        f"only the 'per_object' pyramid can be planned here")
    with _opened(store, storage_options, writable=False) as st:  # reads metadata only
        plan = _plan_pyramid(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                             sparsity_strategy=sparsity_strategy,
                             cross_level_depth=cross_level_depth,
                             cross_level_storage=cross_level_storage, n_workers=n_workers,
                             max_block_vertices=max_block_vertices, shard_shape=shard_shape)
        if _ignored.get("vertex_attributes"):  # aggregated arrays count in the request estimate
            n_va = len(va.resolve(st, plan.levels[0].source_level, _ignored["vertex_attributes"],
                                  _ignored.get("attribute_aggregation")))
            for lv in plan.levels:
                lv.n_vertex_attributes = n_va
        return plan


def _plan_pyramid(st: Store, *, factors, chunk_scale_factors, sparsity_strategy,
                  cross_level_depth, cross_level_storage, n_workers,
                  max_block_vertices, shard_shape=None) -> PyramidPlan:
    plan = _make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                      cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                      sparsity_strategy=sparsity_strategy, n_workers=n_workers,
                      max_block_vertices=max_block_vertices, shard_shape=shard_shape)
    # The first step's source exists: build its real graph (not run) and
    # report its task counts and blocks.
    first = plan.levels[0]
    src = pl.read_source_level(st, first.source_level, plan.ndim)
    # What the request estimate needs: the source's present chunks (in its
    # metadata), how its cells are stored, its object attribute columns.
    plan.source_chunk_coords = src.vertices.chunks
    if not src.vertices.raw_cells and src.vertices.codecs_doc is not None:
        key = tuple(int(k) for k in fmt.key_layout(src.vertices).key_shape)
        plan.source_key_shape = key if any(k > 1 for k in key) else None
    plan.source_links_group = fmt.node_attrs(st, f"{first.source_level}/{fmt.LINKS}") is not None
    for lv in plan.levels:
        lv.n_object_attributes = len(src.attribute_names) if src.has_objects else 0
    if src.vertices.chunks:
        graph, layout = pl.step_graph(st, first, src, _root_meta(st),
                                      sparsity_strategy=sparsity_strategy, sparsity_seed=None,
                                      token="plan")
        first.graph_tasks = dict(graph.stages)
        first.n_blocks, first.n_target_blocks = layout.n_blocks, layout.n_target_blocks
    return plan


# ------------------------------------------------------------ client
def _workers_in_this_process(client) -> bool:
    pids = client.run(os.getpid)
    return bool(pids) and all(p == os.getpid() for p in pids.values())


@contextlib.contextmanager
def _client_for(client, store: Store | None = None):
    """The client to build on: ``client``, else the default client, else a
    LocalCluster of worker processes for the duration of the build.

    A zarr MemoryStore lives in this process, so its build needs workers
    in this process: the caller's client if its workers are, else (no
    client given) a threads-only cluster here, made for the build."""
    in_memory = store is not None and handles.is_memory_url(store.url)
    from distributed import Client, LocalCluster
    if client is not None:
        if in_memory and not _workers_in_this_process(client):
            raise PlanError(
                "an in-memory store (zarr MemoryStore) cannot be read by worker processes: "
                "pass a client whose workers run in this process "
                "(LocalCluster(processes=False)), or no client, or write the store to a path "
                "or URL")
        yield client
        return
    from distributed import get_client
    try:
        default = get_client()
    except ValueError:  # no default client
        default = None
    # Decided before yielding: the caller's errors must not be caught here.
    if default is not None and (not in_memory or _workers_in_this_process(default)):
        yield default
        return
    if in_memory:
        cluster = LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                               dashboard_address=":0", silence_logs=40)
    else:
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0", silence_logs=40)
    c = Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()
        cluster.close()


# ------------------------------------------------------------ lock & records
@contextlib.contextmanager
def _build_lock(store: Store, *, resume: bool):
    """Hold the store's build lock (``lock.py``) for the block.  Released
    on success and on failure alike; a release that fails while an error
    is on its way out never replaces that error."""
    lock = BuildLock(store)
    lock.acquire(resume=resume)
    try:
        yield lock
    finally:
        cleanup(lock.release, what=f"releasing the build lock of {store.url}")


def _record(lv, *, sparsity_strategy, sparsity_seed, cross_level_storage) -> dict:
    return {"source_level": lv.source_level, "coarsen_factor": lv.coarsen_factor,
            "sparsity_factor": lv.sparsity_factor, "chunk_scale": list(lv.chunk_scale),
            "sparsity_strategy": sparsity_strategy, "sparsity_seed": sparsity_seed,
            "cross_level_storage": cross_level_storage}


def _build_record(plan: PyramidPlan, *, sparsity_strategy, sparsity_seed, cross_level_depth,
                  cross_level_storage) -> dict:
    """Everything that decides the finished pyramid, normalised (JSON
    round trip) so a stored record compares equal to a new request."""
    rec = {"start_level": plan.levels[0].source_level,
           "factors": [[lv.coarsen_factor, lv.sparsity_factor] for lv in plan.levels],
           "chunk_scale": [list(lv.chunk_scale) for lv in plan.levels],
           "sparsity_strategy": sparsity_strategy, "sparsity_seed": sparsity_seed,
           "cross_level_depth": cross_level_depth, "cross_level_storage": cross_level_storage}
    return json.loads(json.dumps(rec))


def _record_differences(stored: dict, asked: dict) -> list[str]:
    names = {"factors": "factors (coarsen, sparsity)", "chunk_scale": "chunk scale factors"}
    # Both ways: an opt-in the stored build used and this one omits differs too.
    keys = list(asked) + [k for k in stored if k not in asked]
    return [f"{names.get(k, k)}: {stored.get(k)!r} then, {asked.get(k)!r} now"
            for k in keys if stored.get(k) != asked.get(k)]


def _existing_coarse(store: Store, start_level: int) -> list[int]:
    out = []
    for name in store.listdir(""):
        try:
            lv = int(name)
        except ValueError:
            continue
        if lv > start_level:
            out.append(lv)
    return sorted(out)


def _discard_level(store: Store, level: int) -> None:
    """Remove a coarse level and the link families other levels hold into
    it, and drop it from the root's level lists.  Unlisted first, then
    unpublished, then deleted: a crash part-way never leaves a listed,
    published level with files missing."""
    attrs = cm.read_root_attrs(store)
    ms = attrs.get("multiscales")
    listed = isinstance(ms, list) and ms and any(
        d.get("path") == str(level) for d in (ms[0].get("datasets") or []))
    ome = attrs.get("ome")
    in_ome = isinstance(ome, dict) and any(
        n.get("name") == str(level) for n in ome.get("nodes") or [] if isinstance(n, dict))
    if listed or in_ome:
        if listed:
            entry = dict(ms[0])
            entry["datasets"] = [d for d in entry.get("datasets") or []
                                 if d.get("path") != str(level)]
            attrs["multiscales"] = [entry] + list(ms[1:])
        cm._refresh_ome_nodes(attrs, [lv for lv in cm.published_levels(store) if lv != level])
        cm.write_root_attrs(store, attrs)
    for other in store.listdir(""):
        try:
            o = int(other)
        except ValueError:
            continue
        delta = level - o
        if delta != 0:
            store.remove_tree(fmt.links_family_path(o, delta))
    store.remove_tree(f"{level}/zarr.json")
    store.remove_tree(str(level))
    store.remove_tree(f"{RECORD_DIR}/{level}.json")
    store.remove_tree(f"{RECORD_DIR}/{level}.json.summary")
    store.remove_tree(f"{fmt.EXCHANGE_DIR}/{level}")


def _listed_levels(store: Store) -> set[int]:
    """Levels both published (their zarr.json) and listed by the root."""
    ms = (cm.read_root_attrs(store).get("multiscales") or [{}])[0]
    listed = {d.get("path") for d in ms.get("datasets") or []}
    return {lv for lv in cm.published_levels(store) if str(lv) in listed}


def _nonempty_rows(store: Store, level: int, rows):
    """Which of ``rows`` of a level's object manifests are non-empty."""
    import warnings

    import numpy as np
    import zarr
    rows = np.asarray(rows, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(store.zarr_store(), path=f"{level}/{fmt.OBJECT_INDEX}/manifests",
                              mode="r")
        if rows.size and np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):
            blobs = arr[int(rows[0]):int(rows[0]) + rows.size]
        else:
            order = np.argsort(rows)
            got = arr.oindex[rows[order]] if rows.size else []
            blobs = np.empty(rows.size, dtype=object)
            blobs[order] = list(got)
    return np.fromiter((len(b or b"") > 4 for b in blobs), dtype=bool, count=rows.size)


def _finished_level(store: Store, lv, *, root_meta, sparsity_strategy, sparsity_seed,
                    cross_level_storage, vertex_attributes=None,
                    attribute_aggregation=None) -> tuple[list[str], dict]:
    """How a published level without a build record differs from what this
    request would write there (empty: it is that level), and the summary
    the build would have returned for it.  Read from the level's metadata,
    its links and, for the sparsity seed, which objects it kept (in the
    first manifest bucket: a different seed keeps different objects)."""
    import numpy as np
    t = lv.target_level
    attrs = (fmt.node_attrs(store, str(t)) or {}).get("zarr_vectors_level") or {}
    diffs = []
    if attrs.get("parent_level") != lv.source_level:
        diffs.append(f"parent level: {attrs.get('parent_level')} in the store, "
                     f"{lv.source_level} asked")
    have_sf = 1.0 / float(attrs.get("object_sparsity") or 1.0)
    if abs(have_sf - lv.sparsity_factor) > 1e-6 * lv.sparsity_factor:
        diffs.append(f"sparsity factor: {have_sf:g} in the store, {lv.sparsity_factor:g} asked")
    if attrs.get("coarsening_method", "per_object") != "per_object":
        diffs.append(f"coarsening method: {attrs.get('coarsening_method')!r} in the store")
    bin_, chunk = _level_shapes(store, t, root_meta)
    if not np.allclose(bin_, lv.bin_shape, rtol=1e-9):
        diffs.append(f"bin shape (coarsen factor): {tuple(bin_)} in the store, "
                     f"{tuple(lv.bin_shape)} asked (coarsen factor {lv.coarsen_factor:g})")
    n_meta = int(attrs.get("vertex_count") or 0)
    if n_meta and not np.allclose(chunk, lv.chunk_shape, rtol=1e-9):
        diffs.append(f"chunk shape (chunk scale): {tuple(chunk)} in the store, "
                     f"{tuple(lv.chunk_shape)} asked")
    if n_meta:
        plus = store.get(f"{fmt.links_family_path(lv.source_level, 1)}/zarr.json") is not None
        minus = store.get(f"{fmt.links_family_path(t, -1)}/zarr.json") is not None
        have = "explicit" if plus and minus else "implicit" if plus else "none"
        if have != cross_level_storage:
            diffs.append(f"cross-level storage: {have!r} in the store (links between levels "
                         f"{lv.source_level} and {t}), {cross_level_storage!r} asked")
    if n_meta:
        diffs.extend(_vertex_attribute_differences(store, lv, vertex_attributes,
                                                   attribute_aggregation))
    src = pl.read_source_level(store, lv.source_level, root_meta.sid_ndim)
    n_src = src.n_rows if src.has_objects else 1
    ranked = sparsity_strategy != "random" and lv.sparsity_factor > 1.0 and n_src > 1
    if not src.has_objects:
        keep = np.ones(1, bool)
    elif ranked:
        # Survivors that depend on geometry need a pass over the source
        # level on the cluster; the driver only knows how many there are.
        # The strategy itself is checked through the build records.
        keep = np.zeros(n_src, bool)
        keep[:stages.target_count(n_src, lv.sparsity_factor)] = True
    else:
        keep = stages.kept_rows(n_src, lv.sparsity_factor, sparsity_strategy,
                                0 if sparsity_seed is None else sparsity_seed, lv.source_bin)
    if (not diffs and src.has_objects and n_meta and sparsity_seed is not None
            and not ranked and lv.sparsity_factor > 1.0 and n_src > 1):
        # Coarse row r is source row perm[r] (coarse ids are sorted).
        ids = stages.read_object_ids(store, lv.source_level, n_src)
        perm = np.argsort(ids, kind="stable")[:fmt.MANIFEST_BUCKET]
        expected = keep[perm] & _nonempty_rows(store, lv.source_level, perm)
        held = _nonempty_rows(store, t, np.arange(perm.size))
        if not np.array_equal(expected, held):
            diffs.append(f"kept objects: level {t} keeps other objects than sparsity seed "
                         f"{sparsity_seed!r} (strategy {sparsity_strategy!r}) selects")
    k = int(keep.sum())
    if n_meta == 0:
        summary = {"vertex_count": 0, "object_count": 0, "objects_kept": k,
                   "method": "per_object", "preserves_object_ids": True, "shared_fragments": True}
    else:
        summary = {"vertex_count": n_meta, "object_count": k, "objects_kept": k,
                   "source_objects": int(n_src), "method": "per_object",
                   "preserves_object_ids": True, "shared_fragments": True}
    return diffs, summary


def _vertex_attribute_differences(store: Store, lv, vertex_attributes,
                                  attribute_aggregation) -> list[str]:
    """How a published level's per-vertex attributes differ from what the
    request would aggregate there (each array names its aggregation)."""
    want = {a.name: a.mode for a in va.resolve(store, lv.source_level, vertex_attributes,
                                               attribute_aggregation)}
    have = {}
    for name in va.names_in_level(store, lv.target_level):
        doc = fmt.node_attrs(store, f"{lv.target_level}/{fmt.VERTEX_ATTRIBUTES}/{name}") or {}
        have[name] = doc.get("aggregation")
    if want == have:
        return []
    return [f"per-vertex attributes: {have or 'none'} in the store, {want or 'none'} asked"]


class _Targets:
    """What ``_prepare_targets`` decided: levels kept as they are (with the
    summary of each), and whether the whole pyramid is already finished."""

    def __init__(self):
        self.keep: set[int] = set()
        self.summaries: dict[int, dict] = {}
        self.finished = False


def _prepare_targets(store: Store, plan: PyramidPlan, *, resume: bool, overwrite: bool,
                     records: list[dict], build_record: dict | None = None,
                     sparsity_strategy="random", sparsity_seed=None,
                     cross_level_depth=1, cross_level_storage="explicit",
                     max_block_vertices: int = 2_000_000, vertex_attributes=None,
                     attribute_aggregation=None) -> _Targets:
    """Decide what of the store's coarse levels this build keeps, refuse
    what it must not touch, record the build, then discard the rest.

    Resume is safe at every instant of an earlier build with the same
    arguments: ``.zvdask/build.json`` (the arguments) is written before
    anything changes and removed after the closing commit; per level, a
    record is written before its step and a summary after its commit.
    A published, listed level with a summary is kept; so is one whose
    records are gone (the end of a build, or a pyramid finished earlier)
    when its metadata, links and kept objects are what this request would
    write.  With no build record left and every level kept, the pyramid
    is finished: nothing is rewritten.  Arguments that differ from the
    interrupted build's, or from a finished pyramid's, are refused with
    the difference named."""
    start = plan.levels[0].source_level
    existing = _existing_coarse(store, start)
    out = _Targets()
    raw = store.get(BUILD_RECORD)
    if overwrite:
        if build_record is not None:
            store.put(BUILD_RECORD, json.dumps(build_record).encode())
        for lv in sorted(existing, reverse=True):
            _discard_level(store, lv)
        return out
    targets = {lv.target_level: rec for lv, rec in zip(plan.levels, records)}
    if existing and not resume:
        lv = existing[0]
        raise BuildError(f"{store.describe(str(lv))}: level {lv} already exists; pass "
                         f"overwrite=True (--overwrite) to rebuild the pyramid or resume=True "
                         f"(--resume) to finish an interrupted build")
    redo = "; use overwrite=True (--overwrite) to rebuild"
    stored = None
    if raw is not None and build_record is not None:
        try:
            stored = json.loads(raw)
        except ValueError:
            stored = None
        if isinstance(stored, dict):
            diff = _record_differences(stored, build_record)
            if diff:
                raise BuildError(f"{store.url}: the interrupted build used other arguments: "
                                 f"{'; '.join(diff)}{redo}")
    level_records = {lv: store.get(f"{RECORD_DIR}/{lv}.json") for lv in targets}
    interrupted = stored is not None or any(r is not None for r in level_records.values())
    listed = _listed_levels(store) if existing else set()
    root_meta = _root_meta(store) if existing else None
    run: set[int] = set()
    for t in sorted(targets):
        if t not in existing or (t - 1 not in run and t - 1 != start):
            break
        rec_raw = level_records[t]
        if rec_raw is not None:
            rec = json.loads(rec_raw)
            if rec != targets[t]:
                raise BuildError(
                    f"{store.describe(str(t))}: level {t} was committed with parameters "
                    f"{rec} but this build asks for {targets[t]}{redo}")
            # The record is written before the step and the summary after
            # it: a crash inside the commit leaves a level to rebuild.
            summary = store.get(f"{RECORD_DIR}/{t}.json.summary")
            if t in listed and summary is not None:
                run.add(t)
                out.summaries[t] = json.loads(summary)
                continue
            break
        if t not in listed:
            break
        # No record: the build that wrote it has finished (or it is
        # someone else's level); keep it only if it is what we would write.
        src = t - 1
        lv = _make_plan(store, factors=[(plan.levels[t - start - 1].coarsen_factor,
                                         plan.levels[t - start - 1].sparsity_factor)],
                        chunk_scale_factors=[plan.levels[t - start - 1].chunk_scale],
                        cross_level_depth=cross_level_depth,
                        cross_level_storage=cross_level_storage,
                        sparsity_strategy=sparsity_strategy, n_workers=1, start_level=src,
                        max_block_vertices=max_block_vertices).levels[0]
        diffs, summary = _finished_level(store, lv, root_meta=root_meta,
                                         sparsity_strategy=sparsity_strategy,
                                         sparsity_seed=sparsity_seed,
                                         cross_level_storage=cross_level_storage,
                                         vertex_attributes=vertex_attributes,
                                         attribute_aggregation=attribute_aggregation)
        if diffs:
            if interrupted:
                break  # a level the interrupted (overwriting) build replaces
            raise BuildError(f"{store.describe(str(t))}: level {t} exists but was built with "
                             f"other arguments: {'; '.join(diffs)}{redo}")
        run.add(t)
        out.summaries[t] = summary
    if not interrupted and existing:
        # A finished pyramid (or levels someone else wrote): nothing to
        # resume, so everything must already be what was asked.
        extra = [lv for lv in existing if lv not in targets]
        missing = [t for t in sorted(targets) if t not in run]
        zv = cm.read_root_attrs(store).get("zarr_vectors") or {}
        diffs = []
        if extra:
            diffs.append(f"the store has level(s) {extra} beyond the {len(targets)} asked")
        if missing:
            diffs.append(f"level(s) {missing} are missing or incomplete, yet no build of them "
                         f"was interrupted")
        for key, want in (("cross_level_depth", cross_level_depth),
                          ("cross_level_storage", cross_level_storage)):
            if zv.get(key) != want:
                diffs.append(f"{key}: {zv.get(key)!r} in the store, {want!r} asked")
        if diffs:
            raise BuildError(f"{store.url}: nothing to resume, and the pyramid in the store is "
                             f"not the one asked for: {'; '.join(diffs)}{redo}")
        out.keep, out.finished = run, True
        return out
    if build_record is not None:
        store.put(BUILD_RECORD, json.dumps(build_record).encode())
    for lv in sorted(existing, reverse=True):
        if lv not in run:
            _discard_level(store, lv)
    # Cells of families that were never published (a crash mid-step).
    for lv in [start, *sorted(run)]:
        for name in store.listdir(f"{lv}/{fmt.LINKS}"):
            if name not in ("0", "zarr.json") and store.get(
                    f"{lv}/{fmt.LINKS}/{name}/zarr.json") is None:
                store.remove_tree(f"{lv}/{fmt.LINKS}/{name}")
    out.keep = run
    return out


def _finish_records(store: Store) -> None:
    """The closing commit is done: the level records go first, the build
    record last (resume reads a partial removal as a finished build)."""
    store.remove_tree(RECORD_DIR)
    store.remove_tree(BUILD_RECORD)


# What a process killed mid-write leaves next to the object it was
# replacing: ``Store.put_many``'s ``<name>.tmp-<pid>-<hex>`` and zarr
# LocalStore's ``<name>.<uuid>.partial``.  Never part of the format.
_TEMPORARY = re.compile(r"\.tmp-\d+-[0-9a-f]{8}$|\.[0-9a-f]{32}\.partial$")
_ZARR_WRITTEN = re.compile(rf"/({fmt.OBJECT_INDEX}|{fmt.OBJECT_ATTRIBUTES})(/|$)")


def _sweep_temporaries(store: Store, source_level: int) -> None:
    """Remove temporaries a killed worker or driver left where this build
    wrote: the root, the source level's links and every coarser level.
    Object stores write whole objects, so only local stores have them."""
    if not store.is_local:
        return
    trees = [os.path.join(store.root, str(lv)) for lv in _existing_coarse(store, source_level)]
    trees.append(os.path.join(store.root, str(source_level), fmt.LINKS))
    with os.scandir(store.root) as it:
        doomed = [e.path for e in it if e.is_file() and _TEMPORARY.search(e.name)]
    for top in trees:
        for d, dirs, files in os.walk(top):
            doomed.extend(os.path.join(d, f) for f in files if _TEMPORARY.search(f))
            # Vertex and link cells are written in place (``atomic=False``),
            # so only the cells zarr writes (object index, attributes) can
            # have temporaries: skip the other cell trees, most of the files.
            if "c" in dirs and not _ZARR_WRITTEN.search(d):
                dirs.remove("c")
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def _wait_for_orphans(client, store: Store, timeout: float = 300.0) -> None:
    """Tasks a killed driver left running keep running (workers show them
    as "cancelled") and may still write into the level that resume is
    about to discard: wait until they have ended."""
    pl.wait_until_idle(client, states=("cancelled",), timeout=timeout,
                       what=f"an earlier build of {store.url} (resume once they have ended)")


# ------------------------------------------------------------ build
def build_pyramid(store, *, factors, chunk_scale_factors=None, sparsity_strategy="random",
                  sparsity_seed=None, cross_level_depth=1, cross_level_storage="explicit",
                  method: str = "per_object", options: dict | None = None,
                  client=None, storage_options=None, resume=False, overwrite=False,
                  progress: Callable | None = None, max_block_vertices: int = 2_000_000,
                  vertex_attributes: str | None = None, attribute_aggregation: dict | None = None,
                  shard_shape=None, _reports: list | None = None) -> dict:
    """Build coarser levels 1..len(factors) of ``store`` on Dask; the result
    is the pyramid ``zarr_vectors.build_pyramid`` writes with the same
    arguments, and the same summary dict is returned.

    ``store`` is a path, an fsspec URL (with ``storage_options``), or an
    open handle: ``zarr_vectors.open(url, mode="r+")`` (a Dataset), its
    ``.store`` or ``open_store(url, mode="r+")`` (a Group), a zarr Group or
    zarr store (LocalStore, FsspecStore; a MemoryStore builds on workers in
    this process).  ``method``/``options`` as in zarr-vectors: the
    ``"per_object"`` pyramid takes no options; a method another package
    registered with zarr-vectors is that package's own code and is called
    through ``zarr_vectors.build_pyramid`` unchanged.

    ``vertex_attributes="aggregate"`` (opt-in, beyond the reference) also
    writes every level-0 per-vertex attribute at each coarse level, one
    aggregate per metavertex: ``mean`` for floats and ``mode`` for
    integers unless ``attribute_aggregation={name: mode}`` names one of
    ``mean, sum, mode, count, min, max``.

    ``shard_shape`` (opt-in; an int or one per axis, in chunks, as
    zarr-vectors' writers take it) stores every array the build writes --
    coarse levels' vertex arrays and all link families -- with Zarr v3's
    sharding codec, that many cells per storage object; each shard is
    written whole by one task.  Read through zarr-vectors, the pyramid's
    content is the unsharded one's."""
    _check_method(method, options)
    if resume and overwrite:
        raise PlanError("resume and overwrite cannot both be set")
    if _registered_strategy(method) is not None:
        if shard_shape is not None:
            raise PlanError(f"shard_shape is not supported with method={method!r} (another "
                            f"package's pyramid, built by zarr-vectors)")
        return _REFERENCE_BUILD_PYRAMID(
            store, factors=factors, chunk_scale_factors=chunk_scale_factors,
            sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
            cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
            method=method, options=options)
    with _opened(store, storage_options) as st:
        return _build_pyramid(
            st, factors=factors, chunk_scale_factors=chunk_scale_factors,
            sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
            cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
            client=client, resume=resume, overwrite=overwrite, progress=progress,
            max_block_vertices=max_block_vertices, vertex_attributes=vertex_attributes,
            attribute_aggregation=attribute_aggregation, shard_shape=shard_shape,
            _reports=_reports)


def _build_pyramid(st: Store, *, factors, chunk_scale_factors, sparsity_strategy, sparsity_seed,
                   cross_level_depth, cross_level_storage, client, resume, overwrite, progress,
                   max_block_vertices, vertex_attributes, attribute_aggregation,
                   shard_shape, _reports) -> dict:
    # Validate the whole request before touching anything.
    plan = _make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                      cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                      sparsity_strategy=sparsity_strategy, n_workers=2,
                      max_block_vertices=max_block_vertices, shard_shape=shard_shape)
    shard_shape = plan.levels[0].shard_shape  # normalised: one int per axis
    va.resolve(st, plan.levels[0].source_level, vertex_attributes, attribute_aggregation)
    # Only an opt-in changes the records, so builds without it resume as before.
    va_record = {} if vertex_attributes is None else {
        "vertex_attributes": vertex_attributes,
        "attribute_aggregation": dict(sorted((attribute_aggregation or {}).items()))}
    if shard_shape is not None:
        va_record["shard_shape"] = list(shard_shape)
    with _client_for(client, st) as c:
        n_workers = _n_workers(c)
        plan = _make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                          cross_level_depth=cross_level_depth,
                          cross_level_storage=cross_level_storage,
                          sparsity_strategy=sparsity_strategy, n_workers=n_workers,
                          max_block_vertices=max_block_vertices, shard_shape=shard_shape)
        records = [{**_record(lv, sparsity_strategy=sparsity_strategy,
                              sparsity_seed=sparsity_seed,
                              cross_level_storage=cross_level_storage), **va_record}
                   for lv in plan.levels]
        quiet_expected_task_errors(c)
        with _build_lock(st, resume=resume) as lock:
            if resume:
                _wait_for_orphans(c, st)
            targets = _prepare_targets(
                st, plan, resume=resume, overwrite=overwrite, records=records,
                build_record={**_build_record(plan, sparsity_strategy=sparsity_strategy,
                                              sparsity_seed=sparsity_seed,
                                              cross_level_depth=cross_level_depth,
                                              cross_level_storage=cross_level_storage),
                              **va_record},
                sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                max_block_vertices=max_block_vertices, vertex_attributes=vertex_attributes,
                attribute_aggregation=attribute_aggregation)
            kept = targets.keep
            summaries, reports = [], []
            root_meta = _root_meta(st)
            for lv, rec in zip(plan.levels, records):
                if lv.target_level in kept:
                    summaries.append(targets.summaries.get(lv.target_level, {}))
                    continue
                lock.check()
                # Later levels' shapes depend on what the earlier ones
                # really produced: re-plan from the published source.
                lv = _make_plan(st, factors=[(lv.coarsen_factor, lv.sparsity_factor)],
                                chunk_scale_factors=[lv.chunk_scale],
                                cross_level_depth=cross_level_depth,
                                cross_level_storage=cross_level_storage,
                                sparsity_strategy=sparsity_strategy, n_workers=n_workers,
                                start_level=lv.source_level,
                                max_block_vertices=max_block_vertices,
                                shard_shape=shard_shape).levels[0]
                st.put(f"{RECORD_DIR}/{lv.target_level}.json", json.dumps(rec).encode())
                rep = pl.run_step(c, st, lv, root_meta=root_meta,
                                  sparsity_strategy=sparsity_strategy,
                                  sparsity_seed=sparsity_seed, progress=progress,
                                  vertex_attributes=vertex_attributes,
                                  attribute_aggregation=attribute_aggregation)
                reports.append(rep)
                summaries.append(rep.summary)
                st.put(f"{RECORD_DIR}/{lv.target_level}.json.summary",
                       json.dumps(rep.summary).encode())
            if targets.finished:  # nothing to do: rewrite nothing
                return {"levels_created": len(summaries), "level_specs": summaries,
                        "method": "per_object", "cross_level_depth": cross_level_depth,
                        "cross_level_storage": cross_level_storage}
            lock.check()
            t0 = time.perf_counter()
            fams, stage_s = pl.compose_links(c, st, root_meta=root_meta, depth=cross_level_depth,
                                             storage=cross_level_storage, n_workers=n_workers,
                                             progress=progress,
                                             max_block_vertices=max_block_vertices,
                                             shard_shape=shard_shape)
            levels = cm.published_levels(st)
            lock.check()
            cm.commit_cross_level(
                st, fams, sid_ndim=root_meta.sid_ndim, depth=cross_level_depth,
                storage=cross_level_storage,
                links_capability=(cross_level_storage != "none" and cross_level_depth != 0
                                  and len(levels) >= 2))
            stage_s["composition+commit"] = time.perf_counter() - t0
            _sweep_temporaries(st, plan.levels[0].source_level)
            # Published and complete: the build records have served their
            # purpose (resume), and readers should see a clean hierarchy.
            _finish_records(st)
            if _reports is not None:
                _reports.extend(reports)
                _reports.append(stage_s)
    return {"levels_created": len(summaries), "level_specs": summaries, "method": "per_object",
            "cross_level_depth": cross_level_depth, "cross_level_storage": cross_level_storage}


def coarsen_level(store, source_level: int, target_level: int, *, coarsen_factor=1.0,
                  sparsity_factor=1.0, chunk_scale_factor=1, sparsity_strategy="random",
                  sparsity_seed=None, cross_level_storage="none", method: str = "per_object",
                  options: dict | None = None, client=None, storage_options=None,
                  progress=None, vertex_attributes: str | None = None,
                  attribute_aggregation: dict | None = None, shard_shape=None) -> dict:
    """Write one coarser level, as ``zarr_vectors.coarsen_level`` does.

    ``target_level`` may skip levels (``0 -> 2`` with ``coarsen_factor``
    against the source level's bin, as zarr-vectors allows); inline links
    (``cross_level_storage`` other than ``"none"``) are written only
    between adjacent levels.  ``store``, ``method`` and ``options`` as in
    :func:`build_pyramid`; a registered method is called as zarr-vectors
    calls it."""
    _check_method(method, options)
    strategy = _registered_strategy(method)
    if strategy is not None:
        if shard_shape is not None:
            raise PlanError(f"shard_shape is not supported with method={method!r} (another "
                            f"package's strategy)")
        return strategy(store_path=store, source_level=source_level, target_level=target_level,
                        coarsen_factor=coarsen_factor, sparsity_factor=sparsity_factor,
                        chunk_scale_factor=chunk_scale_factor,
                        sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                        cross_level_storage=cross_level_storage, **(options or {}))
    if target_level <= source_level:
        raise PlanMetadataError(f"target_level must be above source_level; got "
                                f"{source_level} -> {target_level}")
    if target_level != source_level + 1 and cross_level_storage != "none":
        raise PlanError(
            f"cross_level_storage={cross_level_storage!r} writes links between adjacent levels "
            f"only; got {source_level} -> {target_level} (use cross_level_storage='none', or "
            f"build_pyramid(cross_level_depth=...) for links across several levels)")
    with _opened(store, storage_options) as st:
        if fmt.node_attrs(st, str(source_level)) is None:
            raise LevelNotFoundError(f"{st.describe(str(source_level))}: source level "
                                     f"{source_level} does not exist")
        if st.listdir(str(target_level)):
            raise BuildError(f"{st.describe(str(target_level))}: level {target_level} already "
                             f"exists")
        va.resolve(st, source_level, vertex_attributes, attribute_aggregation)
        with _client_for(client, st) as c:
            try:
                plan = _make_plan(st, factors=[(coarsen_factor, sparsity_factor)],
                                  chunk_scale_factors=[chunk_scale_factor], cross_level_depth=1,
                                  cross_level_storage=cross_level_storage,
                                  sparsity_strategy=sparsity_strategy, n_workers=_n_workers(c),
                                  start_level=source_level, shard_shape=shard_shape)
            except PlanError as exc:  # name this call's arguments, not build_pyramid's
                msg = str(exc).replace("chunk_scale_factors[0]", "chunk_scale_factor")
                msg = msg.replace("factors[0] ", "").replace(
                    f"level {source_level + 1}:", f"level {target_level}:")
                raise type(exc)(msg) from None
            lv = dataclasses.replace(plan.levels[0], target_level=int(target_level))
            with _build_lock(st, resume=False):
                rep = pl.run_step(c, st, lv, root_meta=_root_meta(st),
                                  sparsity_strategy=sparsity_strategy,
                                  sparsity_seed=sparsity_seed, progress=progress,
                                  vertex_attributes=vertex_attributes,
                                  attribute_aggregation=attribute_aggregation)
                _sweep_temporaries(st, source_level)
    return rep.summary


def _reference_build_pyramid():
    import zarr_vectors.multiresolution.coarsen as ref
    return ref.build_pyramid


#: zarr-vectors' own ``build_pyramid``, captured before
#: :func:`patch_zarr_vectors` can replace it (a registered method's
#: pyramid is built by it, and reaches ``coarsen_level`` through it).
_REFERENCE_BUILD_PYRAMID = _reference_build_pyramid()
