"""Resume and overwrite: the build lock, the build records, and what a
build keeps, refuses and discards of the coarse levels already in a store."""

from __future__ import annotations

import contextlib
import json
import os
import re

from .errors import BuildError, cleanup
from .format import commit as cm
from .format import documents as fdoc
from .format import naming as nm
from .options import BuildOptions
from .planning.levels import level_shapes, make_plan, read_root_meta
from .planning.plan import PyramidPlan
from .planning.sparsity import kept_rows, ranked, target_count
from .runtime import wait_until_idle
from .step import attributes as va
from .step.objects import read_object_ids
from .step.source import read_source_level
from .storage.lock import BuildLock
from .storage.store import TEMPORARY, Store

__all__ = ["RECORD_DIR", "BUILD_RECORD", "REWRITE_LOG", "build_lock", "step_trees", "pyramid_trees",
           "composed_trees", "discard_unwritten", "level_record", "build_record_for",
           "Targets", "prepare_targets", "finish_records", "sweep_temporaries", "wait_for_orphans",
           "record_differences", "existing_coarse"]


RECORD_DIR = ".zvdask/levels"


#: The arguments of the build in progress, written before it changes
#: anything and removed after its last commit (see ``prepare_targets``).
BUILD_RECORD = ".zvdask/build.json"


# ------------------------------------------------------------ lock & records
@contextlib.contextmanager
def build_lock(store: Store, *, resume: bool):
    """Hold the store's build lock (``storage/lock.py``) for the block.  Released
    on success and on failure alike; a release that fails while an error
    is on its way out never replaces that error."""
    lock = BuildLock(store)
    lock.acquire(resume=resume)
    try:
        yield lock
    finally:
        cleanup(lock.release, what=f"releasing the build lock of {store.url}")


def level_record(lv, *, sparsity_strategy, sparsity_seed, cross_level_storage) -> dict:
    return {"source_level": lv.source_level, "coarsen_factor": lv.coarsen_factor,
            "sparsity_factor": lv.sparsity_factor, "chunk_scale": list(lv.chunk_scale),
            "sparsity_strategy": sparsity_strategy, "sparsity_seed": sparsity_seed,
            "cross_level_storage": cross_level_storage}


def build_record_for(plan: PyramidPlan, *, sparsity_strategy, sparsity_seed, cross_level_depth,
                     cross_level_storage) -> dict:
    """Everything that decides the finished pyramid, normalised (JSON
    round trip) so a stored record compares equal to a new request."""
    rec = {"start_level": plan.levels[0].source_level,
           "factors": [[lv.coarsen_factor, lv.sparsity_factor] for lv in plan.levels],
           "chunk_scale": [list(lv.chunk_scale) for lv in plan.levels],
           "sparsity_strategy": sparsity_strategy, "sparsity_seed": sparsity_seed,
           "cross_level_depth": cross_level_depth, "cross_level_storage": cross_level_storage}
    return json.loads(json.dumps(rec))


def record_differences(stored: dict, asked: dict) -> list[str]:
    names = {"factors": "factors (coarsen, sparsity)", "chunk_scale": "chunk scale factors"}
    # Both ways: an opt-in the stored build used and this one omits differs too.
    keys = list(asked) + [k for k in stored if k not in asked]
    return [f"{names.get(k, k)}: {stored.get(k)!r} then, {asked.get(k)!r} now"
            for k in keys if stored.get(k) != asked.get(k)]


def existing_coarse(store: Store, start_level: int) -> list[int]:
    return sorted(lv for lv, _ in cm.level_dirs(store) if lv > start_level)


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
        cm.refresh_ome_nodes(attrs, [lv for lv in cm.published_levels(store) if lv != level])
        cm.write_root_attrs(store, attrs)
    for o, _ in cm.level_dirs(store):
        delta = level - o
        if delta != 0:
            store.remove_tree(nm.links_family_path(o, delta))
    store.remove_tree(f"{level}/zarr.json")
    store.remove_tree(str(level))
    store.remove_tree(f"{RECORD_DIR}/{level}.json")
    store.remove_tree(f"{RECORD_DIR}/{level}.json.summary")
    store.remove_tree(f"{nm.EXCHANGE_DIR}/{level}")


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
        arr = zarr.open_array(store.zarr_store(), path=f"{level}/{nm.OBJECT_INDEX}/manifests",
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
    attrs = (fdoc.node_attrs(store, str(t)) or {}).get("zarr_vectors_level") or {}
    diffs = []
    if attrs.get("parent_level") != lv.source_level:
        diffs.append(f"parent level: {attrs.get('parent_level')} in the store, "
                     f"{lv.source_level} asked")
    have_sf = 1.0 / float(attrs.get("object_sparsity") or 1.0)
    if abs(have_sf - lv.sparsity_factor) > 1e-6 * lv.sparsity_factor:
        diffs.append(f"sparsity factor: {have_sf:g} in the store, {lv.sparsity_factor:g} asked")
    if attrs.get("coarsening_method", "per_object") != "per_object":
        diffs.append(f"coarsening method: {attrs.get('coarsening_method')!r} in the store")
    bin_, chunk = level_shapes(store, t, root_meta)
    if not np.allclose(bin_, lv.bin_shape, rtol=1e-9):
        diffs.append(f"bin shape (coarsen factor): {tuple(bin_)} in the store, "
                     f"{tuple(lv.bin_shape)} asked (coarsen factor {lv.coarsen_factor:g})")
    n_meta = int(attrs.get("vertex_count") or 0)
    if n_meta and not np.allclose(chunk, lv.chunk_shape, rtol=1e-9):
        diffs.append(f"chunk shape (chunk scale): {tuple(chunk)} in the store, "
                     f"{tuple(lv.chunk_shape)} asked")
    if n_meta:
        plus = store.get(f"{nm.links_family_path(lv.source_level, 1)}/zarr.json") is not None
        minus = store.get(f"{nm.links_family_path(t, -1)}/zarr.json") is not None
        have = "explicit" if plus and minus else "implicit" if plus else "none"
        if have != cross_level_storage:
            diffs.append(f"cross-level storage: {have!r} in the store (links between levels "
                         f"{lv.source_level} and {t}), {cross_level_storage!r} asked")
    if n_meta:
        diffs.extend(_vertex_attribute_differences(store, lv, vertex_attributes,
                                                   attribute_aggregation))
    src = read_source_level(store, lv.source_level, root_meta.sid_ndim)
    n_src = src.n_rows if src.has_objects else 1
    by_rank = ranked(sparsity_strategy, lv.sparsity_factor, n_src)
    if not src.has_objects:
        keep = np.ones(1, bool)
    elif by_rank:
        # Survivors that depend on geometry need a pass over the source
        # level on the cluster; the driver only knows how many there are.
        # The strategy itself is checked through the build records.
        keep = np.zeros(n_src, bool)
        keep[:target_count(n_src, lv.sparsity_factor)] = True
    else:
        keep = kept_rows(n_src, lv.sparsity_factor, sparsity_strategy,
                                0 if sparsity_seed is None else sparsity_seed, lv.source_bin)
    if (not diffs and src.has_objects and n_meta and sparsity_seed is not None
            and not by_rank and lv.sparsity_factor > 1.0 and n_src > 1):
        # Coarse row r is source row perm[r] (coarse ids are sorted).
        ids = read_object_ids(store, lv.source_level, n_src)
        perm = np.argsort(ids, kind="stable")[:nm.MANIFEST_BUCKET]
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
        doc = fdoc.node_attrs(store, f"{lv.target_level}/{nm.VERTEX_ATTRIBUTES}/{name}") or {}
        have[name] = doc.get("aggregation")
    if want == have:
        return []
    return [f"per-vertex attributes: {have or 'none'} in the store, {want or 'none'} asked"]


class Targets:
    """What ``prepare_targets`` decided: levels kept as they are (with the
    summary of each), and whether the whole pyramid is already finished."""

    def __init__(self):
        self.keep: set[int] = set()
        self.summaries: dict[int, dict] = {}
        self.finished = False


def prepare_targets(store: Store, plan: PyramidPlan, *, resume: bool, overwrite: bool,
                    records: list[dict], build_record: dict | None = None,
                    options: BuildOptions = BuildOptions()) -> Targets:
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
    existing = existing_coarse(store, start)
    raw = store.get(BUILD_RECORD)
    if overwrite:
        _discard_rest(store, build_record, existing, keep=set(), start=None)
        return Targets()
    targets = {lv.target_level: rec for lv, rec in zip(plan.levels, records)}
    if existing and not resume:
        lv = existing[0]
        raise BuildError(f"{store.describe(str(lv))}: level {lv} already exists; pass "
                         f"overwrite=True (--overwrite) to rebuild the pyramid, resume=True "
                         f"(--resume) to finish an interrupted build, or call "
                         f"refresh_pyramid(store) (zvdask refresh) to bring it up to date "
                         f"with level 0")
    stored = _check_interrupted(store, raw, build_record)
    level_records = {lv: store.get(f"{RECORD_DIR}/{lv}.json") for lv in targets}
    interrupted = stored is not None or any(r is not None for r in level_records.values())
    out = _kept_levels(store, plan, targets, existing, level_records,
                       interrupted=interrupted, request=options)
    if not interrupted and existing:
        _check_finished(store, targets, existing, out.keep,
                        cross_level_depth=options.cross_level_depth,
                        cross_level_storage=options.cross_level_storage)
        out.finished = True
        return out
    _discard_rest(store, build_record, existing, keep=out.keep, start=start)
    return out


#: How a refusal ends: the way past it.
_REDO = "; use overwrite=True (--overwrite) to rebuild"


def _check_interrupted(store: Store, raw: bytes | None, build_record: dict | None):
    """The interrupted build's record (None if there is none, or it cannot
    be read); refused if it asked for other arguments than this build."""
    if raw is None or build_record is None:
        return None
    try:
        stored = json.loads(raw)
    except ValueError:
        return None
    if isinstance(stored, dict):
        diff = record_differences(stored, build_record)
        if diff:
            raise BuildError(f"{store.url}: the interrupted build used other arguments: "
                             f"{'; '.join(diff)}{_REDO}")
    return stored


def _kept_levels(store: Store, plan: PyramidPlan, targets: dict, existing: list[int],
                 level_records: dict, *, interrupted: bool, request: BuildOptions) -> Targets:
    """The run of target levels from the start that is kept as it is: each
    finished by this build's records, or (no record) already what this
    request would write there."""
    start = plan.levels[0].source_level
    listed = _listed_levels(store) if existing else set()
    root_meta = read_root_meta(store) if existing else None
    out = Targets()
    for t in sorted(targets):
        if t not in existing or (t - 1 not in out.keep and t - 1 != start):
            break
        rec_raw = level_records[t]
        if rec_raw is not None:
            rec = json.loads(rec_raw)
            if rec != targets[t]:
                raise BuildError(
                    f"{store.describe(str(t))}: level {t} was committed with parameters "
                    f"{rec} but this build asks for {targets[t]}{_REDO}")
            # The record is written before the step and the summary after
            # it: a crash inside the commit leaves a level to rebuild.
            summary = store.get(f"{RECORD_DIR}/{t}.json.summary")
            if t in listed and summary is not None:
                out.keep.add(t)
                out.summaries[t] = json.loads(summary)
                continue
            break
        if t not in listed:
            break
        # No record: the build that wrote it has finished (or it is
        # someone else's level); keep it only if it is what we would write.
        diffs, summary = _unrecorded_level(store, plan.levels[t - start - 1], t, root_meta,
                                           request)
        if diffs:
            if interrupted:
                break  # a level the interrupted (overwriting) build replaces
            raise BuildError(f"{store.describe(str(t))}: level {t} exists but was built with "
                             f"other arguments: {'; '.join(diffs)}{_REDO}")
        out.keep.add(t)
        out.summaries[t] = summary
    return out


def _unrecorded_level(store: Store, asked, t: int, root_meta, request: BuildOptions):
    """How published level ``t`` (no build record) differs from the level
    ``asked`` plans there, re-planned from its published source, and its
    summary (:func:`_finished_level`)."""
    lv = make_plan(store, factors=[(asked.coarsen_factor, asked.sparsity_factor)],
                   chunk_scale_factors=[asked.chunk_scale],
                   cross_level_depth=request.cross_level_depth,
                   cross_level_storage=request.cross_level_storage,
                   sparsity_strategy=request.sparsity_strategy, n_workers=1, start_level=t - 1,
                   max_block_vertices=request.max_block_vertices).levels[0]
    return _finished_level(store, lv, root_meta=root_meta,
                           sparsity_strategy=request.sparsity_strategy,
                           sparsity_seed=request.sparsity_seed,
                           cross_level_storage=request.cross_level_storage,
                           vertex_attributes=request.vertex_attributes,
                           attribute_aggregation=request.attribute_aggregation)


def _check_finished(store: Store, targets: dict, existing: list[int], kept: set[int], *,
                    cross_level_depth, cross_level_storage) -> None:
    """A finished pyramid (or levels someone else wrote): nothing to
    resume, so everything must already be what was asked."""
    extra = [lv for lv in existing if lv not in targets]
    missing = [t for t in sorted(targets) if t not in kept]
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
                         f"not the one asked for: {'; '.join(diffs)}{_REDO}")


def _discard_rest(store: Store, build_record: dict | None, existing: list[int], *,
                  keep: set[int], start: int | None) -> None:
    """Record the build, then remove every coarse level it does not keep
    (highest first) and, below ``start`` and the kept levels, the cells
    of link families that were never published (a crash mid-step)."""
    if build_record is not None:
        store.put(BUILD_RECORD, json.dumps(build_record).encode())
    for lv in sorted(existing, reverse=True):
        if lv not in keep:
            _discard_level(store, lv)
    if start is None:  # overwrite: every coarse level went, nothing to sweep
        return
    for lv in [start, *sorted(keep)]:
        for name in store.listdir(f"{lv}/{nm.LINKS}"):
            if name not in ("0", "zarr.json") and store.get(
                    f"{lv}/{nm.LINKS}/{name}/zarr.json") is None:
                store.remove_tree(f"{lv}/{nm.LINKS}/{name}")


# ------------------------------------------------------------ rewrite in place
#: Where a rewrite in place (a refresh) logs every key it writes or finds
#: equal, and every key it changed (``Store.changes_only``); what it did
#: not log is stale.
REWRITE_LOG = ".zvdask/refresh"


def step_trees(source_level: int, target_level: int) -> list[tuple[str, tuple[str, ...]]]:
    """What a coarsening step writes, as ``(tree, excluded subtrees)``: the
    target level but for the link families other stages write there, its
    ``-1`` family, and the source level's ``+1`` family."""
    t = str(target_level)
    return [(t, (f"{t}/{nm.LINKS}/",)), (nm.links_family_path(target_level, -1), ()),
            (nm.links_family_path(source_level, 1), ())]


def pyramid_trees(store: Store, start_level: int, *,
                  composed: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    """Everything a build writes: every coarse level, and the start level's
    link families but its own intra-level ``links/0``; without the
    composed ``±N`` families (N >= 2) unless ``composed``."""
    levels = [start_level, *existing_coarse(store, start_level)]
    deep = () if composed else tuple(f"{t}/" for t, _ in composed_trees(store, start_level))
    out = [(str(lv), deep) for lv in levels[1:]]
    out += [(f"{start_level}/{nm.LINKS}/{name}", ())
            for name in store.listdir(f"{start_level}/{nm.LINKS}")
            if name not in ("0", "zarr.json") and f"{start_level}/{nm.LINKS}/{name}/" not in deep]
    return out


def composed_trees(store: Store, start_level: int) -> list[tuple[str, tuple[str, ...]]]:
    """The composed ``±N`` families (N >= 2) of every level, as trees."""
    levels = [start_level, *existing_coarse(store, start_level)]
    return [(f"{lv}/{nm.LINKS}/{name}", ()) for lv in levels
            for name in store.listdir(f"{lv}/{nm.LINKS}") if nm.is_composed_family(name)]


def discard_unwritten(store: Store, trees, logged: set[str]) -> list[str]:
    """Remove what a rewrite in place did not write in ``trees`` (see
    :func:`step_trees`): objects whose key ``logged`` lacks, and then the
    unlogged documents left with nothing beside them (an array or family
    that is gone).  A coarse level of which nothing was written (its
    source came out empty) is discarded whole, unlisted first.  Returns
    the keys removed (logged as changed before they go)."""
    removed = []
    for tree, excluded in trees:
        level = tree.split("/", 1)[0]
        if "/" not in tree and not any(k.startswith(f"{tree}/") for k in logged):
            if store.get(f"{tree}/zarr.json") is not None:
                _discard_level(store, int(level))
            continue
        keys = [f"{tree}/{k}" for k in store.keys_under(tree)]
        keys = [k for k in keys if not k.startswith(excluded) and k not in logged]
        cells = [k for k in keys if k.rsplit("/", 1)[-1] != "zarr.json"]
        store.remove_noted(cells)
        removed += cells
        removed += _discard_lone_documents(store, tree,
                                           [k for k in keys if k.endswith("zarr.json")])
        _remove_emptied_folders(store, tree, keys)
    return removed


def _remove_emptied_folders(store: Store, tree: str, keys: list[str]) -> None:
    """The folders of removed ``keys`` (below ``tree``) left empty, deepest
    first: a reader lists an array's folder as the array."""
    folders = set()
    for k in keys:
        parts = k.split("/")[:-1]
        while len(parts) > tree.count("/") + 1:
            folders.add("/".join(parts))
            parts.pop()
    for f in sorted(folders, key=lambda d: -d.count("/")):
        store.remove_empty_dir(f)


def _discard_lone_documents(store: Store, tree: str, docs: list[str]) -> list[str]:
    """The unlogged ``zarr.json`` of ``docs`` whose folder holds nothing
    else any more, deepest first (a group emptied by the ones below);
    returns them."""
    left = {f"{tree}/{k}" for k in store.keys_under(tree)}
    gone = []
    for doc in sorted(docs, key=lambda d: -d.count("/")):
        folder = doc[:-len("zarr.json")]
        if not any(k.startswith(folder) and k != doc for k in left):
            store.remove_noted([doc])
            left.discard(doc)
            gone.append(doc)
    return gone


def finish_records(store: Store) -> None:
    """The closing commit is done: the level records go first, the build
    record last (resume reads a partial removal as a finished build)."""
    store.remove_tree(RECORD_DIR)
    store.remove_tree(BUILD_RECORD)


_ZARR_WRITTEN = re.compile(rf"/({nm.OBJECT_INDEX}|{nm.OBJECT_ATTRIBUTES})(/|$)")


def sweep_temporaries(store: Store, source_level: int) -> None:
    """Remove temporaries a killed worker or driver left where this build
    wrote: the root, the source level's links and every coarser level.
    Object stores write whole objects, so only local stores have them."""
    if not store.leaves_temporaries:
        return
    trees = [os.path.join(store.root, str(lv)) for lv in existing_coarse(store, source_level)]
    trees.append(os.path.join(store.root, str(source_level), nm.LINKS))
    doomed = []
    for top in (store.root, os.path.join(store.root, ".zvdask")):  # the records' own
        with contextlib.suppress(FileNotFoundError), os.scandir(top) as it:
            doomed.extend(e.path for e in it if e.is_file() and TEMPORARY.search(e.name))
    for top in trees:
        for d, dirs, files in os.walk(top):
            doomed.extend(os.path.join(d, f) for f in files if TEMPORARY.search(f))
            # Vertex and link cells are written in place (``atomic=False``),
            # so only the cells zarr writes (object index, attributes) can
            # have temporaries: skip the other cell trees, most of the files.
            if "c" in dirs and not _ZARR_WRITTEN.search(d):
                dirs.remove("c")
    for p in doomed:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def wait_for_orphans(client, store: Store, timeout: float = 300.0) -> None:
    """Tasks a killed driver left running keep running (workers show them
    as "cancelled") and may still write into the level that resume is
    about to discard: wait until they have ended."""
    wait_until_idle(client, states=("cancelled",), timeout=timeout,
                       what=f"an earlier build of {store.url} (resume once they have ended)")
