"""Refresh: bring a pyramid up to date with its level 0 (the record and
status are ``currency.py``).

:func:`refresh_pyramid` rewrites what a changed source makes stale, and
returns at once when nothing changed.  The region (``planning/region.py``)
is decided from the level-0 fingerprint's diff:

* only intra-level links changed: nothing above level 0 is rewritten;
* only object-attribute cells changed: the attribute stage reruns on the
  dirty buckets of every coarse level (its survivors drawn as the build
  draws them), nothing else is read or written;
* only vertex, fragment and manifest cells changed, rows at most
  appended: each step restricted to the coarse chunks the changed chunks
  and objects reach (``step/region.py``), in place (from the first level
  that drops objects, when rows were added, whole levels); object-attribute
  cells changed with them add the attribute stage on their dirty buckets
  at the levels recomputed by chunks;
* anything else: every coarse level is recomputed as
  ``build_pyramid(..., overwrite=True)`` with the recorded arguments
  computes it, in place: only files whose bytes differ are written, and
  the files a full rebuild would not have are removed
  (``api._rewrite_in_place``).

Each ends equal to a full rebuild; each records the new fingerprint last.
"""

from __future__ import annotations

import dataclasses

from . import api
from . import currency as cur
from .currency import (PyramidStatus, dirty_source_chunks, read_record, request_record,
                       status_of)
from .errors import BuildError
from .format import documents as fdoc
from .format import naming as nm
from .format.cells import key_layout, vlen_array_info
from .format.documents import opened_zarr_vectors
from .planning.levels import make_plan, read_root_meta
from .planning.region import (ATTRIBUTES, CHUNK_ARRAYS, CHUNKS, LINKS, WHOLE, RefreshRegion,
                              classify, dirty_buckets)
from .resume import REWRITE_LOG, build_lock, record_differences, wait_for_orphans
from .runtime import client_for
from .step.region import RegionNotApplicable, changed_objects, plan_chunk_region
from .step.run import rewrite_attributes
from .step.source import manifest_rows, read_source_level

__all__ = ["pyramid_status", "RefreshReport", "build_keywords", "refresh_pyramid", "region_of"]


def pyramid_status(store, storage_options=None) -> PyramidStatus:
    """Whether the pyramid in ``store`` (anything ``build_pyramid`` takes)
    is current with its level 0: one listing of level 0, a read of each
    metadata document, no cell read unless a local mtime is racy."""
    with opened_zarr_vectors(store, storage_options, writable=False) as st:
        return status_of(st)



# ------------------------------------------------------------ refresh
@dataclasses.dataclass(frozen=True)
class RefreshReport:
    """What :func:`refresh_pyramid` found and did (or, ``dry_run``, would do).

    ``region``: what the change reaches (``planning.region``); ``levels``:
    per coarse level rewritten, ``(level, what, fraction)`` -- the share
    of the level's files rewritten (1.0: the whole level is rebuilt);
    ``dirty_chunks``: the changed level-0 chunks per array; ``summary``:
    the build's summary when it rebuilt levels."""

    status: PyramidStatus
    refreshed: bool
    dry_run: bool
    arguments: dict
    levels: tuple = ()
    dirty_chunks: dict = dataclasses.field(default_factory=dict)
    summary: dict | None = None
    region: RefreshRegion | None = None

    def __str__(self) -> str:
        lines = [self.status.line()]
        if self.status.current:
            lines.append("nothing to refresh: every coarse level is current")
        n = sum(len(v) for v in self.dirty_chunks.values())
        if n:
            lines.append(f"dirty level-0 chunks: {n} in {len(self.dirty_chunks)} array(s)")
        if self.region is not None and not self.status.current:
            lines.append(f"region: {self.region.kind} ({self.region.reason})")
            if not self.levels:
                verb = "would record" if self.dry_run else "recorded"
                lines.append(f"  no coarse level reads it: {verb} the new fingerprint only")
        if self.summary and str(self.summary.get("region", "")).startswith("whole"):
            lines.append(f"  recomputed {self.summary['region']}")
        if self.summary and "objects_changed" in self.summary:
            lines.append(f"  objects written or removed: {self.summary['objects_changed']} "
                         f"(the others left untouched)")
        for level, what, frac in self.levels:
            if frac >= 1.0:
                verb = "would recompute" if self.dry_run else "recomputed"
                lines.append(f"  level {level}: {verb} {what} in place (100% of a full "
                             f"build's steps; only the files that differ are written)")
            elif self.region is not None and self.region.kind == CHUNKS and not frac:
                verb = "would rewrite" if self.dry_run else "rewrote"  # attribute buckets only
                lines.append(f"  level {level}: {verb} {what}")
            elif self.region is not None and self.region.kind == CHUNKS:
                verb = "would recompute" if self.dry_run else "recomputed"
                lines.append(f"  level {level}: {verb} {what} (reads {frac:.1%} of its source "
                             f"chunks; only the files that differ are written)")
            else:
                verb = "would rewrite" if self.dry_run else "rewrote"
                lines.append(f"  level {level}: {verb} {what} ({frac:.1%} of its files)")
        return "\n".join(lines)


def build_keywords(arguments: dict) -> dict:
    """Recorded arguments as ``build_pyramid`` keywords."""
    kw = dict(arguments)
    kw["factors"] = [tuple(f) for f in kw["factors"]]
    if kw.get("chunk_scale_factors") is not None:
        kw["chunk_scale_factors"] = [tuple(c) if isinstance(c, list) else c
                                     for c in kw["chunk_scale_factors"]]
    if isinstance(kw.get("shard_shape"), list):
        kw["shard_shape"] = tuple(kw["shard_shape"])
    return kw


def _refresh_arguments(st, doc: dict | None, asked: dict) -> dict:
    """The arguments to refresh with: the recorded ones; a request that
    differs from them is refused naming the argument, as resume does."""
    asked = {k: v for k, v in asked.items() if v is not None}
    if doc is None or not isinstance(doc.get("arguments"), dict):
        if "factors" not in asked:
            raise BuildError(f"{st.url}: no build arguments are recorded (a pyramid built by "
                             f"zarr-vectors, or before zarr-vectors-dask recorded them): pass "
                             f"the build's arguments (factors=..., --factors ...) to refresh it")
        return asked
    recorded = doc["arguments"]
    if asked:
        diff = record_differences(doc.get("record") or {},
                                  request_record(st, **build_keywords({**recorded, **asked})))
        if diff:
            raise BuildError(f"{st.url}: the pyramid was built with other arguments: "
                             f"{'; '.join(diff)}; refresh rebuilds it with the recorded ones "
                             f"(omit them), or use build_pyramid(..., overwrite=True)")
    return recorded


def refresh_pyramid(store, client=None, storage_options=None, dry_run: bool = False, *,
                    progress=None, max_block_vertices: int = 2_000_000,
                    **build_arguments) -> RefreshReport:
    """Bring the pyramid in ``store`` up to date with its level 0, with the
    arguments its build recorded (``build_arguments`` may repeat them; one
    that differs is refused naming it).

    Unchanged level 0: returns at once, nothing is written.  Changed: only
    what the change reaches is rewritten (see the module's docstring); a
    change it cannot bound, or an unknown currency, rebuilds every coarse
    level exactly as ``build_pyramid(..., overwrite=True)`` with those
    arguments does.  Always under the build lock, the root marked
    ``zvdask_refresh`` while levels are rewritten, crash-safe (a refresh
    killed at any moment, then run again, ends equal to a full rebuild),
    and the new fingerprint is recorded last.  ``dry_run``: report what
    would be rewritten, write nothing."""
    with opened_zarr_vectors(store, storage_options, writable=not dry_run) as st:
        doc = read_record(st)
        args = _refresh_arguments(st, doc, build_arguments)
        status = status_of(st)
        report = RefreshReport(status, False, dry_run, args,
                               dirty_chunks=dirty_source_chunks(status.diff))
        if status.current:
            return report
        region = region_of(st, status, args)
        report = dataclasses.replace(report, region=region)
        if dry_run or region.kind != CHUNKS:  # a chunk region's own lines come from its run
            report = dataclasses.replace(report, levels=_levels(st, region, args))
        if dry_run:
            return report
        if region.kind in (WHOLE, CHUNKS):
            summary = api.build_pyramid(st, client=client, progress=progress,
                                        max_block_vertices=max_block_vertices, _refresh=True,
                                        _change=region.change if region.kind == CHUNKS else None,
                                        _source=status.source, **build_keywords(args))
            levels = report.levels
            if summary.get("region") == "chunks":
                levels = _region_lines(summary["region_levels"], region, len(args["factors"]))
            elif region.kind == CHUNKS:  # it fell back to whole levels
                levels = tuple((t, "the whole level", 1.0) for t in range(1, len(args["factors"]) + 1))
            return dataclasses.replace(report, refreshed=True, summary=summary, levels=levels)
        with client_for(client, st) as c:
            _refresh_region(st, c, args, region, status.source, progress=progress)
        return dataclasses.replace(report, refreshed=True)


# ------------------------------------------------------------ the region
def region_of(st, status: PyramidStatus, args: dict) -> RefreshRegion:
    """What a stale pyramid's level-0 change reaches (whole levels unless
    the diff says otherwise)."""
    if status.state != "stale" or status.diff is None:
        return RefreshRegion(WHOLE, status.reason)
    by_array = status.diff.by_array()
    kind, reason = classify(by_array, factors=args["factors"],
                            sparsity_strategy=args["sparsity_strategy"],
                            sparsity_seed=args["sparsity_seed"],
                            same_layout=_same_layout(st, by_array),
                            chunk_layout=_chunk_layout(args))
    if kind == CHUNKS:
        return _chunk_region(st, status, reason, args["factors"])
    if kind != ATTRIBUTES:
        return RefreshRegion(kind, reason)
    return RefreshRegion(ATTRIBUTES, reason, _attribute_buckets(st, status))


def _attribute_buckets(st, status: PyramidStatus) -> tuple:
    """The dirty buckets of each changed object-attribute array: a coarse
    level keeps a row where its source has it, so they are every level's."""
    buckets = []
    for array, chunks in sorted(status.diff.dirty_chunks().items()):
        if array.startswith(f"{nm.OBJECT_ATTRIBUTES}/"):
            name = array.split("/", 1)[1]
            n_rows, cell_rows = _attribute_rows(st, 0, name)
            buckets.append((name, dirty_buckets(chunks, cell_rows, n_rows, nm.ATTRIBUTE_BUCKET)))
    return tuple(buckets)


def _chunk_region(st, status: PyramidStatus, reason: str, factors) -> RefreshRegion:
    """The changed level-0 chunks and objects a chunk region starts from
    (whole levels when the changed objects cannot be told).  Rows added
    (appended) are drawn anew by every level that drops objects: from
    the first such level on, the levels are recomputed whole."""
    dirty = status.diff.dirty_chunks()
    chunks = set()
    by_array = status.diff.by_array()
    for array in CHUNK_ARRAYS:
        info = vlen_array_info(st, f"0/{array}")
        if dirty.get(array):
            chunks |= _chunks_of_keys(info, dirty[array])
        if array in by_array and by_array[array]["documents"]:
            if not info.raw_cells:
                return RefreshRegion(WHOLE, f"the chunk list of {array} changed and its cells "
                                            f"are compressed or sharded")
            chunks |= _unlisted_cells(st, info)
    n_old, n_new = (manifest_rows(st, level) or 0 for level in (1, 0))
    whole_from = None
    if n_new > n_old:
        drops = [t for t, (_, sf) in enumerate(factors, start=1) if float(sf) > 1.0]
        if drops and drops[0] == 1:
            return RefreshRegion(WHOLE, f"{n_new - n_old} object row(s) were added and level 1 "
                                        f"drops objects (its survivors are drawn anew)")
        whole_from = drops[0] if drops else None
    rows, fallen = (), set()
    manifests = dirty.get(f"{nm.OBJECT_INDEX}/manifests") or ()
    ids_changed = f"{nm.OBJECT_INDEX}/object_ids" in by_array
    if manifests or ids_changed or n_new != n_old:
        try:
            ids, named, fallen = changed_objects(st, manifests, read_root_meta(st).sid_ndim,
                                                 n_old=n_old, ids_changed=ids_changed)
        except RegionNotApplicable as exc:
            return RefreshRegion(WHOLE, f"object rows changed and {exc}")
        chunks |= named
        rows = tuple(int(i) for i in ids)
    buckets = _attribute_buckets(st, status)
    return RefreshRegion(CHUNKS, reason, buckets, change={
        "chunks": frozenset(chunks), "fallen": frozenset(fallen), "rows": rows,
        "whole_from": whole_from, "attributes": dict(buckets)})


def _chunks_of_keys(info, keys) -> set:
    """The chunks stored under changed storage keys' coordinates: a key
    holds one cell, or (compressed, sharded) a block of them; keys count
    from the array's grid origin."""
    import itertools
    shape = (1,) * len(info.origin) if info.raw_cells else key_layout(info).key_shape
    out = set()
    for k in keys:
        for inner in itertools.product(*(range(int(s)) for s in shape)):
            out.add(tuple(int(i) * int(s) + int(j) + int(o)
                          for i, s, j, o in zip(k, shape, inner, info.origin)))
    return out


def _unlisted_cells(st, info) -> set:
    """Chunks with a cell the array's chunk list no longer names: gone for
    a build, although their file is unchanged."""
    listed = set(info.chunks)
    origin = info.origin
    return {c for c in (nm.cell_chunk(k[2:], origin) for k in st.keys_under(info.path)
                        if k.startswith("c/")) if c not in listed}


def _chunk_layout(args: dict) -> str:
    """Why the recorded layout cannot be refreshed by chunks ("": it can)."""
    if args.get("cross_level_storage") == "none":
        return "the pyramid has no +1 links (cross_level_storage='none') to find old parents"
    if args.get("shard_shape") is not None:
        return "the pyramid is sharded (a shard is rewritten whole)"
    if args.get("vertex_attributes") is not None:
        return "per-vertex attributes are aggregated"
    return ""


def _same_layout(st, by_array: dict) -> frozenset:
    """Object-attribute arrays whose level-0 document changed but whose
    shape and dtype are still level 1's (the coarse documents' inputs)."""
    out = set()
    for array, row in by_array.items():
        if not (row["documents"] and array.startswith(f"{nm.OBJECT_ATTRIBUTES}/")):
            continue
        new = fdoc.read_json(st, f"0/{array}/zarr.json") or {}
        coarse = fdoc.read_json(st, f"1/{array}/zarr.json") or {}
        keys = ("shape", "data_type")
        if new and coarse and all(new.get(k) == coarse.get(k) for k in keys):
            out.add(array)
    return frozenset(out)


def _attribute_rows(st, level: int, name: str) -> tuple[int, int]:
    """(rows, rows per stored cell) of a level's object-attribute array
    (a sharded array's stored cell is its shard: the chunk grid's shape)."""
    key = f"{level}/{nm.OBJECT_ATTRIBUTES}/{name}/zarr.json"
    doc = fdoc.read_json(st, key)
    if not doc:
        raise BuildError(f"{st.describe(key)}: the object attribute {name!r} has no metadata")
    return int(doc["shape"][0]), int(doc["chunk_grid"]["configuration"]["chunk_shape"][0])


def _levels(st, region: RefreshRegion, args: dict) -> tuple:
    """The report's per-level lines for ``region``."""
    n_levels = len(args["factors"])
    if region.kind == WHOLE:
        return tuple((t, "the whole level", 1.0) for t in range(1, n_levels + 1))
    if region.kind == LINKS:
        return ()
    if region.kind == CHUNKS:
        return _chunk_levels(st, region, args)
    names = ", ".join(region.names)
    what = (f"{region.n_buckets} object-attribute bucket(s) of {names}" if region.n_buckets
            else f"nothing of {names} (no dirty row)")
    out = []
    for t in range(1, n_levels + 1):
        files = max(1, len(st.sizes(str(t))))
        out.append((t, what, min(0.999, region.n_buckets / files)))
    return tuple(out)


def _chunk_levels(st, region: RefreshRegion, args: dict) -> tuple:
    """Per level, the chunks a chunk region recomputes at most and the
    share of the step's source it reads: planned as the refresh plans
    them, read only, each level's source taken as changed wherever the
    step below recomputed (the refresh itself narrows that to what did
    change: ``_region_lines``)."""
    kw = build_keywords(args)
    root_meta = read_root_meta(st)
    plan = make_plan(st, factors=kw["factors"], chunk_scale_factors=kw["chunk_scale_factors"],
                     cross_level_depth=kw["cross_level_depth"],
                     cross_level_storage=kw["cross_level_storage"],
                     sparsity_strategy=kw["sparsity_strategy"], n_workers=1)
    changed, fallen = set(region.change["chunks"]), set(region.change["fallen"])
    whole_from = region.change.get("whole_from")
    history = []
    for lv in plan.levels:
        if whole_from is not None and lv.target_level >= whole_from:
            history.append((lv.target_level, None, None, None))
            continue
        src = read_source_level(st, lv.source_level, root_meta.sid_ndim)
        try:
            r = plan_chunk_region(st, lv, src, changed, root_meta.chunk_shape, fallen=fallen)
        except RegionNotApplicable as exc:
            return (*_region_lines(history, region, lv.source_level),
                    (lv.target_level, f"the whole level ({exc})", 1.0))
        history.append((lv.target_level, len(r.targets), len(r.sources), len(src.vertices.chunks)))
        changed, fallen = set(r.targets), set()
    return _region_lines(history, region, len(plan.levels))


def _region_lines(history, region: RefreshRegion, n_levels: int) -> tuple:
    """Report lines of a chunk region's levels: ``(level, targets,
    sources, source chunks)`` each; a level missing from ``history`` had
    an unchanged source (only its attribute buckets, if any, rewritten)."""
    n_rows = len(region.change["rows"])
    buckets = f"{region.n_buckets} object-attribute bucket(s) of {', '.join(region.names)}" \
        if region.n_buckets else ""
    done = {t: (n_t, n_s, n_all) for t, n_t, n_s, n_all in history}
    out = []
    for t in range(1, n_levels + 1):
        n_t, n_s, n_all = done.get(t, (0, 0, 0))
        if t not in done:
            if buckets:
                out.append((t, f"only {buckets} (its source chunks are unchanged)", 0.0))
        elif n_t is None:
            out.append((t, "the whole level (rows were added: its survivors of sparsity are "
                           "drawn anew)", 1.0))
        else:
            also = f", and {buckets}" if buckets else ""
            out.append((t, f"{n_t} chunk(s) from {n_s} of level {t - 1}'s {n_all} chunks and "
                           f"{n_rows} changed object(s){also}", min(0.999, n_s / max(1, n_all))))
    return tuple(out)


def _refresh_region(st, c, args: dict, region: RefreshRegion, source, *,
                    progress=None) -> None:
    """Rewrite ``region`` (``links`` or ``attributes``) under the build
    lock, then record ``source``, the fingerprint it was worked out from.
    A kill before that record leaves the refresh unfinished: the next one
    rebuilds every level."""
    record = request_record(st, **build_keywords(args))
    with build_lock(st, resume=True) as lock:
        wait_for_orphans(c, st)
        pending = cur.begin(st, arguments=args, record=record, resuming=False,
                            refreshing=region.kind == ATTRIBUTES, taken=source)
        if region.kind == ATTRIBUTES and region.n_buckets:
            lock.check()
            _rewrite_attributes(st, c, args, region, progress=progress)
        lock.check()
        cur.finish(st, pending)


def _rewrite_attributes(st, c, args: dict, region: RefreshRegion, *, progress=None) -> None:
    """Every coarse level's dirty attribute buckets, in one graph."""
    kw = build_keywords(args)
    plan = make_plan(st, factors=kw["factors"], chunk_scale_factors=kw["chunk_scale_factors"],
                     cross_level_depth=kw["cross_level_depth"],
                     cross_level_storage=kw["cross_level_storage"],
                     sparsity_strategy=kw["sparsity_strategy"], n_workers=1,
                     shard_shape=kw.get("shard_shape"))
    # Only the buckets whose bytes differ are written (the rest are logged, unused).
    st.remove_tree(REWRITE_LOG)
    try:
        # survivors from the manifest rows, as object_table draws them
        rewrite_attributes(c, st.changes_only(REWRITE_LOG), list(plan.levels),
                           dict(region.buckets), n_rows=manifest_rows(st, 0) or 0,
                           sparsity_strategy=kw["sparsity_strategy"],
                           sparsity_seed=kw["sparsity_seed"], progress=progress)
    finally:
        st.remove_tree(REWRITE_LOG)
