"""Public API: ``plan_pyramid``, ``build_pyramid``, ``coarsen_level``.

Validates everything before writing anything, takes the build lock,
decides what ``resume``/``overwrite`` keep or discard, then runs the
pipeline level by level and the closing composition.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import Callable

from . import commit as cm
from . import format as fmt
from . import pipeline as pl
from . import stages
from .errors import BuildError, cleanup, quiet_expected_task_errors
from .lock import LOCK_KEY, BuildLock, remove_empty_scratch
from .plan import PlanError, PyramidPlan, plan_pyramid_from_meta, validate_factors
from .store import Store, check_access

RECORD_DIR = ".zvdask/levels"
#: The arguments of the build in progress, written before it changes
#: anything and removed after its last commit (see ``_prepare_targets``).
BUILD_RECORD = ".zvdask/build.json"


# ------------------------------------------------------------ store facts
def _open(store_arg, storage_options) -> Store:
    store = store_arg if isinstance(store_arg, Store) else Store.from_url(store_arg, storage_options)
    if store.is_local and not os.path.exists(store.root):
        raise FileNotFoundError(f"{store.url}: no such path")
    check_access(store)
    attrs = fmt.node_attrs(store, "")
    if attrs is None or "zarr_vectors" not in attrs:
        raise fmt.FormatError(f"{store.url}: not a zarr-vectors store (no zarr_vectors "
                              f"root metadata in zarr.json)")
    if fmt.node_attrs(store, "0") is None:
        raise fmt.FormatError(f"{store.url}: zarr-vectors store has no level 0")
    return store


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
               max_block_vertices=2_000_000) -> PyramidPlan:
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
        max_block_vertices=max_block_vertices)
    return plan


def plan_pyramid(store, *, factors, chunk_scale_factors=None, sparsity_strategy="random",
                 cross_level_depth=1, cross_level_storage="explicit", storage_options=None,
                 n_workers: int = 2, max_block_vertices: int = 2_000_000, **_ignored) -> PyramidPlan:
    """The plan ``build_pyramid`` would run; print it to see levels, bins,
    chunk grids and task counts.  Reads metadata only."""
    st = _open(store, storage_options)
    plan = _make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                      cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                      sparsity_strategy=sparsity_strategy, n_workers=n_workers,
                      max_block_vertices=max_block_vertices)
    # The first step's source exists: build its real graph (not run) and
    # report its task counts and blocks.
    first = plan.levels[0]
    src = pl.read_source_level(st, first.source_level, plan.ndim)
    if src.vertices.chunks:
        graph, layout = pl.step_graph(st, first, src, _root_meta(st),
                                      sparsity_strategy=sparsity_strategy, sparsity_seed=None,
                                      token="plan")
        first.graph_tasks = dict(graph.stages)
        first.n_blocks, first.n_target_blocks = layout.n_blocks, layout.n_target_blocks
    return plan


# ------------------------------------------------------------ client
@contextlib.contextmanager
def _client_for(client):
    if client is not None:
        yield client
        return
    from distributed import Client, LocalCluster
    try:
        from distributed import get_client
        yield get_client()
        return
    except ValueError:
        pass
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=":0", silence_logs=40)
    c = Client(cluster)
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
    return [f"{names.get(k, k)}: {stored.get(k)!r} then, {asked.get(k)!r} now"
            for k in asked if stored.get(k) != asked.get(k)]


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


def _nonempty_rows(store: Store, level: int, rows) -> "np.ndarray":
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
                    cross_level_storage) -> tuple[list[str], dict]:
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
                     max_block_vertices: int = 2_000_000) -> _Targets:
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
                                         cross_level_storage=cross_level_storage)
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
                  client=None, storage_options=None, resume=False, overwrite=False,
                  progress: Callable | None = None, max_block_vertices: int = 2_000_000,
                  _reports: list | None = None) -> dict:
    """Build coarser levels 1..len(factors) of ``store`` on Dask; the result
    is the pyramid ``zarr_vectors.build_pyramid`` writes with the same
    arguments, and the same summary dict is returned."""
    if resume and overwrite:
        raise PlanError("resume and overwrite cannot both be set")
    st = _open(store, storage_options)
    # Validate the whole request before touching anything.
    plan = _make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                      cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                      sparsity_strategy=sparsity_strategy, n_workers=2,
                      max_block_vertices=max_block_vertices)
    with _client_for(client) as c:
        n_workers = _n_workers(c)
        plan = _make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                          cross_level_depth=cross_level_depth,
                          cross_level_storage=cross_level_storage,
                          sparsity_strategy=sparsity_strategy, n_workers=n_workers,
                          max_block_vertices=max_block_vertices)
        records = [_record(lv, sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                           cross_level_storage=cross_level_storage) for lv in plan.levels]
        quiet_expected_task_errors(c)
        with _build_lock(st, resume=resume) as lock:
            if resume:
                _wait_for_orphans(c, st)
            targets = _prepare_targets(
                st, plan, resume=resume, overwrite=overwrite, records=records,
                build_record=_build_record(plan, sparsity_strategy=sparsity_strategy,
                                           sparsity_seed=sparsity_seed,
                                           cross_level_depth=cross_level_depth,
                                           cross_level_storage=cross_level_storage),
                sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                max_block_vertices=max_block_vertices)
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
                                max_block_vertices=max_block_vertices).levels[0]
                st.put(f"{RECORD_DIR}/{lv.target_level}.json", json.dumps(rec).encode())
                rep = pl.run_step(c, st, lv, root_meta=root_meta,
                                  sparsity_strategy=sparsity_strategy,
                                  sparsity_seed=sparsity_seed, progress=progress)
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
                                             max_block_vertices=max_block_vertices)
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
                  sparsity_seed=None, cross_level_storage="none", client=None,
                  storage_options=None, progress=None) -> dict:
    """Write one coarser level, as ``zarr_vectors.coarsen_level`` does
    (inline ``±1`` links when ``cross_level_storage`` is not ``"none"``)."""
    if target_level != source_level + 1:
        raise PlanError(f"target_level must be source_level + 1; got {source_level} -> {target_level}")
    st = _open(store, storage_options)
    if fmt.node_attrs(st, str(source_level)) is None:
        raise PlanError(f"{st.describe(str(source_level))}: source level {source_level} does not exist")
    if st.listdir(str(target_level)):
        raise BuildError(f"{st.describe(str(target_level))}: level {target_level} already exists")
    with _client_for(client) as c:
        plan = _make_plan(st, factors=[(coarsen_factor, sparsity_factor)],
                          chunk_scale_factors=[chunk_scale_factor], cross_level_depth=1,
                          cross_level_storage=cross_level_storage,
                          sparsity_strategy=sparsity_strategy, n_workers=_n_workers(c),
                          start_level=source_level)
        with _build_lock(st, resume=False):
            rep = pl.run_step(c, st, plan.levels[0], root_meta=_root_meta(st),
                              sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                              progress=progress)
            _sweep_temporaries(st, source_level)
    return rep.summary
