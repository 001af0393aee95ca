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
import socket
import time
from typing import Callable

from . import commit as cm
from . import format as fmt
from . import pipeline as pl
from .plan import PlanError, PyramidPlan, plan_pyramid_from_meta, validate_factors
from .store import Store, check_access

LOCK_KEY = ".zvdask/lock.json"
RECORD_DIR = ".zvdask/levels"


class BuildError(RuntimeError):
    """The store's state forbids the requested build (existing levels,
    a concurrent build, parameters that differ from a committed level)."""


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
def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _build_lock(store: Store, *, resume: bool):
    existing = store.get(LOCK_KEY)
    if existing is not None and not resume:
        try:
            owner = json.loads(existing).get("owner", "?")
        except ValueError:
            owner = "?"
        host, _, pid = str(owner).rpartition(":")
        hint = "if that build crashed"
        if host == socket.gethostname() and pid.isdigit() and not _process_alive(int(pid)):
            hint = f"its process {pid} on this host has ended, so that build crashed"
        raise BuildError(f"{store.url}: another pyramid build holds the lock ({owner}); {hint}: "
                         f"run again with resume=True (--resume) to take it over")
    token = {"owner": f"{socket.gethostname()}:{os.getpid()}", "started": time.time()}
    store.put(LOCK_KEY, json.dumps(token).encode())
    try:
        yield
    finally:
        store.remove_tree(LOCK_KEY)
        if not store.listdir(".zvdask"):
            store.remove_tree(".zvdask")


def _record(lv, *, sparsity_strategy, sparsity_seed, cross_level_storage) -> dict:
    return {"source_level": lv.source_level, "coarsen_factor": lv.coarsen_factor,
            "sparsity_factor": lv.sparsity_factor, "chunk_scale": list(lv.chunk_scale),
            "sparsity_strategy": sparsity_strategy, "sparsity_seed": sparsity_seed,
            "cross_level_storage": cross_level_storage}


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
    it, and drop it from the root's level lists."""
    store.remove_tree(str(level))
    store.remove_tree(f"{RECORD_DIR}/{level}.json")
    store.remove_tree(f"{fmt.EXCHANGE_DIR}/{level}")
    for other in store.listdir(""):
        try:
            o = int(other)
        except ValueError:
            continue
        delta = level - o
        if delta != 0:
            store.remove_tree(fmt.links_family_path(o, delta))
    attrs = cm.read_root_attrs(store)
    ms = attrs.get("multiscales")
    if isinstance(ms, list) and ms:
        entry = dict(ms[0])
        entry["datasets"] = [d for d in entry.get("datasets") or [] if d.get("path") != str(level)]
        attrs["multiscales"] = [entry] + list(ms[1:])
    cm._refresh_ome_nodes(attrs, [lv for lv in cm.published_levels(store) if lv != level])
    cm.write_root_attrs(store, attrs)


def _prepare_targets(store: Store, plan: PyramidPlan, *, resume: bool, overwrite: bool,
                     records: list[dict]) -> set[int]:
    """Levels to keep (committed with the same parameters) under resume;
    raises for anything else that already exists."""
    existing = _existing_coarse(store, plan.levels[0].source_level)
    keep: set[int] = set()
    if overwrite:
        for lv in sorted(existing, reverse=True):
            _discard_level(store, lv)
        return keep
    targets = {lv.target_level: rec for lv, rec in zip(plan.levels, records)}
    if existing and not resume:
        lv = existing[0]
        raise BuildError(f"{store.describe(str(lv))}: level {lv} already exists; pass "
                         f"overwrite=True (--overwrite) to rebuild the pyramid or resume=True "
                         f"(--resume) to finish an interrupted build")
    published = set(cm.published_levels(store))
    ms = (cm.read_root_attrs(store).get("multiscales") or [{}])[0]
    listed = {d.get("path") for d in ms.get("datasets") or []}
    for lv in existing:
        if lv in published and lv in targets:
            raw = store.get(f"{RECORD_DIR}/{lv}.json")
            rec = json.loads(raw) if raw else None
            if rec is None:
                raise BuildError(
                    f"{store.describe(str(lv))}: level {lv} exists but has no record of an "
                    f"interrupted build to resume; use overwrite=True (--overwrite) to rebuild")
            if rec != targets[lv]:
                raise BuildError(
                    f"{store.describe(str(lv))}: level {lv} was committed with parameters "
                    f"{rec} but this build asks for {targets[lv]}; use overwrite=True "
                    f"(--overwrite) to rebuild")
            # The record is written before the step and the summary after
            # it: a crash inside the commit leaves a level to rebuild.
            if str(lv) in listed and store.get(f"{RECORD_DIR}/{lv}.json.summary") is not None:
                keep.add(lv)
    # Keep only an unbroken run from the bottom; rebuild everything above.
    run = set()
    for lv in sorted(targets):
        if lv in keep and (lv - 1 in run or lv - 1 == plan.levels[0].source_level):
            run.add(lv)
        else:
            break
    for lv in sorted(existing, reverse=True):
        if lv not in run:
            _discard_level(store, lv)
    # Cells of families that were never published (a crash mid-step).
    for lv in [plan.levels[0].source_level, *sorted(run)]:
        for name in store.listdir(f"{lv}/{fmt.LINKS}"):
            if name not in ("0", "zarr.json") and store.get(
                    f"{lv}/{fmt.LINKS}/{name}/zarr.json") is None:
                store.remove_tree(f"{lv}/{fmt.LINKS}/{name}")
    return run


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


def _orphans_on_worker(dask_worker) -> int:
    return sum(ts.state == "cancelled" for ts in dask_worker.state.tasks.values())


def _wait_for_orphans(client, store: Store, timeout: float = 300.0) -> None:
    """Tasks a killed driver left running keep running (Dask cannot stop a
    thread; workers show them as "cancelled") and may still write into the
    level that resume is about to discard: wait until they have ended."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = sum(client.run(_orphans_on_worker).values())
        except Exception:  # noqa: BLE001 - no worker state to ask: best effort
            return
        if n == 0:
            return
        if time.monotonic() > deadline:
            raise BuildError(f"{store.url}: {n} task(s) of an earlier build are still running "
                             f"on the cluster after {timeout:.0f} s; resume once they have ended")
        time.sleep(0.2)


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
        with _build_lock(st, resume=resume):
            if resume:
                _wait_for_orphans(c, st)
            kept = _prepare_targets(st, plan, resume=resume, overwrite=overwrite, records=records)
            summaries, reports = [], []
            root_meta = _root_meta(st)
            for lv, rec in zip(plan.levels, records):
                if lv.target_level in kept:
                    raw = st.get(f"{RECORD_DIR}/{lv.target_level}.json.summary")
                    summaries.append(json.loads(raw) if raw else {})
                    continue
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
            t0 = time.perf_counter()
            fams, stage_s = pl.compose_links(c, st, root_meta=root_meta, depth=cross_level_depth,
                                             storage=cross_level_storage, n_workers=n_workers,
                                             progress=progress,
                                             max_block_vertices=max_block_vertices)
            levels = cm.published_levels(st)
            cm.commit_cross_level(
                st, fams, sid_ndim=root_meta.sid_ndim, depth=cross_level_depth,
                storage=cross_level_storage,
                links_capability=(cross_level_storage != "none" and cross_level_depth != 0
                                  and len(levels) >= 2))
            stage_s["composition+commit"] = time.perf_counter() - t0
            _sweep_temporaries(st, plan.levels[0].source_level)
            # Published and complete: the build records have served their
            # purpose (resume), and readers should see a clean hierarchy.
            st.remove_tree(RECORD_DIR)
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
