"""Public API: ``plan_pyramid``, ``build_pyramid``, ``coarsen_level``.

Validates everything before writing anything, takes the build lock,
decides what ``resume``/``overwrite`` keep or discard, then runs the
pipeline level by level and the closing composition.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Callable

from . import currency as cur
from .compose.run import compose_links, discard_recomposed, recompose_region
from .errors import (BuildError, LevelNotFoundError, PlanError, PlanMetadataError,
                     quiet_expected_task_errors)
from .format import cells as fcells
from .format import commit as cm
from .format import documents as fdoc
from .format import naming as nm
from .format.documents import opened_zarr_vectors
from .options import BuildOptions
from .planning.levels import make_plan, read_root_meta
from .planning.plan import PyramidPlan, check_method, registered_strategy
from .resume import (BUILD_RECORD, RECORD_DIR, REWRITE_LOG, Targets, build_lock, build_record_for,
                     composed_trees, discard_unwritten, finish_records, level_record, prepare_targets,
                     pyramid_trees, step_trees, sweep_temporaries, wait_for_orphans)
from .runtime import client_for, count_workers, tuned_workers
from .step import attributes as va
from .step.region import RegionNotApplicable, RegionPlans
from .step.run import rewrite_attributes, run_step, step_graph, unchanged_summary
from .step.source import manifest_rows, read_source_level
from .storage.store import Store

__all__ = ["plan_pyramid", "build_pyramid", "coarsen_level"]


def plan_pyramid(store, *, factors, chunk_scale_factors=None, sparsity_strategy="random",
                 cross_level_depth=1, cross_level_storage="explicit", storage_options=None,
                 n_workers: int = 2, max_block_vertices: int = 2_000_000,
                 method: str = "per_object", options: dict | None = None,
                 shard_shape=None, **_ignored) -> PyramidPlan:
    """The plan ``build_pyramid`` would run; print it to see levels, bins,
    chunk grids and task counts.  Reads metadata only.  ``store`` is
    anything ``build_pyramid`` takes."""
    check_method(method, options)
    if method != "per_object":
        raise PlanError(f"method={method!r} is a strategy registered by another package; "
                        f"only the 'per_object' pyramid can be planned here")
    with opened_zarr_vectors(store, storage_options, writable=False) as st:  # reads metadata only
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
    plan = make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                     cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                     sparsity_strategy=sparsity_strategy, n_workers=n_workers,
                     max_block_vertices=max_block_vertices, shard_shape=shard_shape)
    # The first step's source exists: build its real graph (not run) and
    # report its task counts and blocks.
    first = plan.levels[0]
    src = read_source_level(st, first.source_level, plan.ndim)
    # What the request estimate needs: the source's present chunks (in its
    # metadata), how its cells are stored, its object attribute columns.
    plan.source_chunk_coords = src.vertices.chunks
    if not src.vertices.raw_cells and src.vertices.codecs_doc is not None:
        key = tuple(int(k) for k in fcells.key_layout(src.vertices).key_shape)
        plan.source_key_shape = key if any(k > 1 for k in key) else None
    plan.source_links_group = fdoc.node_attrs(st, f"{first.source_level}/{nm.LINKS}") is not None
    for lv in plan.levels:
        lv.n_object_attributes = len(src.attribute_names) if src.has_objects else 0
    if src.vertices.chunks:
        graph, layout = step_graph(st, first, src, read_root_meta(st),
                                      sparsity_strategy=sparsity_strategy, sparsity_seed=None,
                                      token="plan")
        first.graph_tasks = dict(graph.stages)
        first.n_blocks, first.n_target_blocks = layout.n_blocks, layout.n_target_blocks
    return plan


# ------------------------------------------------------------ build
def build_pyramid(store, *, factors, chunk_scale_factors=None, sparsity_strategy="random",
                  sparsity_seed=None, cross_level_depth=1, cross_level_storage="explicit",
                  method: str = "per_object", options: dict | None = None,
                  client=None, storage_options=None, resume=False, overwrite=False,
                  progress: Callable | None = None, max_block_vertices: int = 2_000_000,
                  vertex_attributes: str | None = None, attribute_aggregation: dict | None = None,
                  shard_shape=None, _reports: list | None = None, _refresh: bool = False,
                  _change=None, _source=None) -> dict:
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
    check_method(method, options)
    if resume and overwrite:
        raise PlanError("resume and overwrite cannot both be set")
    if registered_strategy(method) is not None:
        if shard_shape is not None:
            raise PlanError(f"shard_shape is not supported with method={method!r} (another "
                            f"package's pyramid, built by zarr-vectors)")
        return _REFERENCE_BUILD_PYRAMID(
            store, factors=factors, chunk_scale_factors=chunk_scale_factors,
            sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
            cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
            method=method, options=options)
    with opened_zarr_vectors(store, storage_options) as st:
        return _build_pyramid(
            st, factors=factors, chunk_scale_factors=chunk_scale_factors,
            sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
            cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
            client=client, resume=resume, overwrite=overwrite, progress=progress,
            max_block_vertices=max_block_vertices, vertex_attributes=vertex_attributes,
            attribute_aggregation=attribute_aggregation, shard_shape=shard_shape,
            _reports=_reports, _refresh=_refresh, _change=_change, _source=_source)


def _build_pyramid(st: Store, *, factors, chunk_scale_factors, sparsity_strategy, sparsity_seed,
                   cross_level_depth, cross_level_storage, client, resume, overwrite, progress,
                   max_block_vertices, vertex_attributes, attribute_aggregation,
                   shard_shape, _reports, _refresh=False, _change=None, _source=None) -> dict:
    request = BuildOptions(sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                           cross_level_depth=cross_level_depth,
                           cross_level_storage=cross_level_storage,
                           max_block_vertices=max_block_vertices,
                           vertex_attributes=vertex_attributes,
                           attribute_aggregation=attribute_aggregation)
    planned = dict(factors=factors, chunk_scale_factors=chunk_scale_factors,
                   cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                   sparsity_strategy=sparsity_strategy, max_block_vertices=max_block_vertices)
    # Validate the whole request before touching anything.
    plan = make_plan(st, n_workers=2, shard_shape=shard_shape, **planned)
    shard_shape = plan.levels[0].shard_shape  # normalised: one int per axis
    va.resolve(st, plan.levels[0].source_level, vertex_attributes, attribute_aggregation)
    with client_for(client, st) as c:
        n_workers = count_workers(c)
        plan = make_plan(st, n_workers=n_workers, shard_shape=shard_shape, **planned)
        records, build_record = _records(plan, request, shard_shape)
        quiet_expected_task_errors(c)
        # A refresh takes over the lock of a killed one, as resume does.
        with build_lock(st, resume=resume or _refresh) as lock, tuned_workers(c):
            if resume or _refresh:
                wait_for_orphans(c, st)
            interrupted = st.get(BUILD_RECORD) is not None
            if resume and not interrupted:
                cur.refuse_if_stale(st, build_record)  # never report a stale pyramid finished
                # A killed refresh left levels half rewritten: redo it.
                _refresh = cur.interrupted_refresh(st, build_record)
            arguments = cur.arguments_for(plan, request, shard_shape)
            if _refresh:
                summaries, changed = _rewrite_in_place(
                    c, st, lock, plan, records, arguments=arguments, build_record=build_record,
                    n_workers=n_workers, progress=progress, shard_shape=shard_shape,
                    request=request, reports=_reports, change=_change, source=_source)
                return {**_result(summaries, cross_level_depth, cross_level_storage),
                        **changed}
            pending = None
            if overwrite:  # rebuilds everything: recorded before any discard
                pending = cur.begin(st, arguments=arguments, record=build_record,
                                    resuming=False)
            targets = prepare_targets(st, plan, resume=resume, overwrite=overwrite,
                                      records=records, build_record=build_record, options=request)
            if targets.finished:
                cur.finish_interrupted(st, build_record)
            elif pending is None:
                pending = cur.begin(st, arguments=arguments, record=build_record,
                                    resuming=interrupted)
            root_meta = read_root_meta(st)
            summaries, reports = _build_levels(c, st, plan, records, targets, lock,
                                               root_meta=root_meta, n_workers=n_workers,
                                               progress=progress, shard_shape=shard_shape,
                                               request=request)
            if targets.finished:  # nothing to do: rewrite nothing
                return _result(summaries, cross_level_depth, cross_level_storage)
            stage_s = _close(c, st, lock, plan, root_meta=root_meta, n_workers=n_workers,
                             progress=progress, shard_shape=shard_shape, request=request)
            cur.finish(st, pending)  # the record's last write: currency known from here
            if _reports is not None:
                _reports.extend(reports)
                _reports.append(stage_s)
    return _result(summaries, cross_level_depth, cross_level_storage)


def _result(summaries: list, cross_level_depth, cross_level_storage) -> dict:
    return {"levels_created": len(summaries), "level_specs": summaries, "method": "per_object",
            "cross_level_depth": cross_level_depth, "cross_level_storage": cross_level_storage}


def _records(plan: PyramidPlan, request: BuildOptions, shard_shape) -> tuple[list[dict], dict]:
    """Each level's record and the build's (``resume.py`` compares them)."""
    vertex_attributes = request.vertex_attributes
    # Only an opt-in changes the records, so builds without it resume as before.
    va_record = {} if vertex_attributes is None else {
        "vertex_attributes": vertex_attributes,
        "attribute_aggregation": dict(sorted((request.attribute_aggregation or {}).items()))}
    if shard_shape is not None:
        va_record["shard_shape"] = list(shard_shape)
    strategy = request.strategy_record
    records = [{**level_record(lv, **strategy), **va_record} for lv in plan.levels]
    build = {**build_record_for(plan, cross_level_depth=request.cross_level_depth, **strategy),
             **va_record}
    return records, build


def _rewrite_in_place(c, st: Store, lock, plan: PyramidPlan, records: list[dict], *,
                      arguments: dict, build_record: dict, n_workers: int, progress,
                      shard_shape, request: BuildOptions, reports: list | None,
                      change: dict | None = None, source=None) -> tuple[list, dict]:
    """A refresh of whole levels: the build's steps and composition run
    over the published pyramid, writing only the objects whose bytes
    differ (``Store.changes_only``); after each step, and at the end, what
    the rewrite did not write is removed.  The root is marked and the
    record says ``refreshing`` throughout: a kill at any instant leaves a
    pyramid whose next refresh (or ``resume=True``) does this again.

    ``change`` (the changed level-0 chunks and objects, ``RegionPlans``):
    each step restricted to the region they reach (``step/region.py``),
    unless the change cannot be bounded so (then whole levels, and the
    result says why).  ``source``: the fingerprint of level 0 the refresh
    was worked out from, recorded as the one it read (None: taken now)."""
    composed_current = _composed_current(st)
    pending = cur.begin(st, arguments=arguments, record=build_record, resuming=False,
                        refreshing=True, taken=source)
    # A killed attempt's written keys go (this one writes all again); the
    # keys it changed stay: this attempt finds them equal, yet they changed.
    st.remove_tree(f"{REWRITE_LOG}/written")
    wst = st.changes_only(REWRITE_LOG)
    root_meta = read_root_meta(st)
    kw = dict(root_meta=root_meta, n_workers=n_workers, progress=progress,
              shard_shape=shard_shape, request=request, in_place=True)
    extra: dict = {}
    regions = None
    try:
        if change is not None:
            regions = RegionPlans(wst, f"{REWRITE_LOG}/region", change, root_meta.chunk_shape)
            summaries, step_reports = _build_levels(
                c, wst, plan, records, Targets(), lock, regions=regions,
                attributes=lambda: _region_attributes(c, wst, lock, plan, change, request,
                                                      progress), **kw)
            extra["region"], extra["region_levels"] = "chunks", list(regions.history)
    except RegionNotApplicable as exc:
        regions, extra["region"] = None, f"whole levels: {exc}"
    if regions is None:
        summaries, step_reports = _build_levels(c, wst, plan, records, Targets(), lock, **kw)
    # Only the chunks whose +1 chains changed are composed again, when the
    # composed families matched the +1 cells before (sharded: all of them).
    only = None if shard_shape is not None or not composed_current else \
        recompose_region(st, root_meta, wst.logged_keys("changed"))
    stage_s = _close(c, wst, lock, plan, root_meta=root_meta, n_workers=n_workers,
                     progress=progress, shard_shape=shard_shape, request=request, only=only)
    lock.check()
    # A region's steps removed their stale cells already; a whole
    # composition leaves its stale cells to this sweep.
    trees = pyramid_trees(st, plan.levels[0].source_level, composed=only is None) \
        if regions is None else [] if only is not None else \
        composed_trees(st, plan.levels[0].source_level)
    discard_unwritten(wst, trees, wst.logged_keys())  # logs what it removes
    extra["objects_changed"] = len(wst.logged_keys("changed"))  # written or removed objects
    st.remove_tree(REWRITE_LOG)
    cur.finish(st, pending)
    if reports is not None:
        reports.extend(step_reports)
        reports.append(stage_s)
    return summaries, extra


def _region_attributes(c, wst: Store, lock, plan: PyramidPlan, change: dict,
                       request: BuildOptions, progress) -> None:
    """The object-attribute buckets that changed with a chunk region's
    cells, at the levels it recomputed by chunks (a whole level wrote
    them all)."""
    whole_from = change.get("whole_from")
    levels = [lv for lv in plan.levels if whole_from is None or lv.target_level < whole_from]
    if not change.get("attributes") or not levels:
        return
    lock.check()
    rewrite_attributes(c, wst, levels, change["attributes"],
                       n_rows=manifest_rows(wst, levels[0].source_level) or 0,
                       sparsity_strategy=request.sparsity_strategy,
                       sparsity_seed=request.sparsity_seed, progress=progress)


def _composed_current(st: Store) -> bool:
    """Whether the pyramid's composed ``±N`` families match its ``+1`` cells
    and their documents, as a rewrite in place starts: a finished build's
    or refresh's do, and its first attempt then recomposes only the chunks
    whose chains changed (``discard_recomposed``).  A killed attempt's
    rerun, which finds the mark this leaves with the rewrite's logs,
    composes everything: the first attempt may have rewritten documents
    that the rerun's logs would then count twice."""
    key = f"{REWRITE_LOG}/base.json"
    if st.get(key) is not None:
        return False
    doc = cur.read_record(st)
    ok = bool(doc and doc.get("state") == "finished" and st.get(BUILD_RECORD) is None)
    st.remove_tree(REWRITE_LOG)  # an attribute refresh's leftovers: not this rewrite's
    st.put(key, json.dumps({"composed_current": ok}).encode())
    return ok


def _build_levels(c, st: Store, plan: PyramidPlan, records: list[dict], targets, lock, *,
                  root_meta, n_workers: int, progress, shard_shape, request: BuildOptions,
                  in_place: bool = False, regions: RegionPlans | None = None,
                  attributes: Callable | None = None):
    """Run the steps of the levels not kept, in order; each level's record
    goes before its step and its summary after its commit.  ``in_place``
    (a rewrite, ``_rewrite_in_place``): no records; after each step, what
    it did not write of its trees is removed (the next step lists them)
    and logged as changed.  ``regions``: each step restricted to its
    region (which removes its own stale cells), but those it says are
    whole; ``attributes``: called once the region levels are done, before
    a whole level reads their object attributes."""
    summaries, reports = [], []
    for lv, rec in zip(plan.levels, records):
        if lv.target_level in targets.keep:
            summaries.append(targets.summaries.get(lv.target_level, {}))
            continue
        lock.check()
        # Later levels' shapes depend on what the earlier ones
        # really produced: re-plan from the published source.
        lv = make_plan(st, factors=[(lv.coarsen_factor, lv.sparsity_factor)],
                       chunk_scale_factors=[lv.chunk_scale],
                       cross_level_depth=request.cross_level_depth,
                       cross_level_storage=request.cross_level_storage,
                       sparsity_strategy=request.sparsity_strategy, n_workers=n_workers,
                       start_level=lv.source_level,
                       max_block_vertices=request.max_block_vertices,
                       shard_shape=shard_shape).levels[0]
        if not in_place:
            st.put(f"{RECORD_DIR}/{lv.target_level}.json", json.dumps(rec).encode())
        whole = regions is None or regions.whole(lv)
        if whole and attributes is not None:
            attributes()
            attributes = None
        region = None if whole else \
            regions.region(lv, read_source_level(st, lv.source_level, root_meta.sid_ndim))
        if not whole and region is None:  # its source is unchanged: so is it
            summaries.append(unchanged_summary(st, lv, request.sparsity_strategy,
                                               request.sparsity_seed, root_meta))
            continue
        rep = run_step(c, st, lv, region=region, root_meta=root_meta,
                       sparsity_strategy=request.sparsity_strategy,
                       sparsity_seed=request.sparsity_seed, progress=progress,
                       vertex_attributes=request.vertex_attributes,
                       attribute_aggregation=request.attribute_aggregation)
        reports.append(rep)
        summaries.append(rep.summary)
        if region is not None:
            regions.advance(rep.region_changes, rep.region_rows)
        if in_place and whole:
            lock.check()
            # (it logs what it removes before removing it)
            discard_unwritten(st, step_trees(lv.source_level, lv.target_level), st.logged_keys())
        if in_place:
            continue
        st.put(f"{RECORD_DIR}/{lv.target_level}.json.summary", json.dumps(rep.summary).encode())
    if attributes is not None:
        attributes()
    return summaries, reports


def _close(c, st: Store, lock, plan: PyramidPlan, *, root_meta, n_workers: int, progress,
           shard_shape, request: BuildOptions, only: dict | None = None) -> dict:
    """The closing stage: compose the link families, commit them, sweep
    temporaries, drop the build records; returns the stage timings.
    ``only`` (a rewrite in place): compose those chunks, remove their
    cells it did not write, and commit every family as it is on disk."""
    depth, storage = request.cross_level_depth, request.cross_level_storage
    lock.check()
    t0 = time.perf_counter()
    fams, stage_s = compose_links(c, st, root_meta=root_meta, depth=depth, storage=storage,
                                  n_workers=n_workers, progress=progress,
                                  max_block_vertices=request.max_block_vertices,
                                  shard_shape=shard_shape, only=only,
                                  inline_vertices=plan.levels[0].inline_vertices)
    if only is not None:
        lock.check()
        discard_recomposed(st, root_meta, only, st.logged_keys())  # writes its documents
    levels = cm.published_levels(st)
    lock.check()
    cm.commit_cross_level(
        st, fams, sid_ndim=root_meta.sid_ndim, depth=depth, storage=storage,
        links_capability=(storage != "none" and depth != 0 and len(levels) >= 2))
    stage_s["composition+commit"] = time.perf_counter() - t0
    sweep_temporaries(st, plan.levels[0].source_level)
    # Published and complete: the build records have served their
    # purpose (resume), and readers should see a clean hierarchy.
    finish_records(st)
    return stage_s


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
    check_method(method, options)
    strategy = registered_strategy(method)
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
    with opened_zarr_vectors(store, storage_options) as st:
        if fdoc.node_attrs(st, str(source_level)) is None:
            raise LevelNotFoundError(f"{st.describe(str(source_level))}: source level "
                                     f"{source_level} does not exist")
        if st.listdir(str(target_level)):
            raise BuildError(f"{st.describe(str(target_level))}: level {target_level} already "
                             f"exists")
        va.resolve(st, source_level, vertex_attributes, attribute_aggregation)
        with client_for(client, st) as c:
            try:
                plan = make_plan(st, factors=[(coarsen_factor, sparsity_factor)],
                                 chunk_scale_factors=[chunk_scale_factor], cross_level_depth=1,
                                 cross_level_storage=cross_level_storage,
                                 sparsity_strategy=sparsity_strategy, n_workers=count_workers(c),
                                 start_level=source_level, shard_shape=shard_shape)
            except PlanError as exc:  # name this call's arguments, not build_pyramid's
                msg = str(exc).replace("chunk_scale_factors[0]", "chunk_scale_factor")
                msg = msg.replace("factors[0] ", "").replace(
                    f"level {source_level + 1}:", f"level {target_level}:")
                raise type(exc)(msg) from None
            lv = dataclasses.replace(plan.levels[0], target_level=int(target_level))
            with build_lock(st, resume=False):
                rep = run_step(c, st, lv, root_meta=read_root_meta(st),
                                  sparsity_strategy=sparsity_strategy,
                                  sparsity_seed=sparsity_seed, progress=progress,
                                  vertex_attributes=vertex_attributes,
                                  attribute_aggregation=attribute_aggregation)
                sweep_temporaries(st, source_level)
    return rep.summary


def _reference_build_pyramid():
    import zarr_vectors.multiresolution.coarsen as ref
    return ref.build_pyramid


#: zarr-vectors' own ``build_pyramid``, captured before
#: :func:`patch_zarr_vectors` can replace it (a registered method's
#: pyramid is built by it, and reaches ``coarsen_level`` through it).
_REFERENCE_BUILD_PYRAMID = _reference_build_pyramid()
