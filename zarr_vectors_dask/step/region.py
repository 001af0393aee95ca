"""A step restricted to chunks (a refresh), driver side: its region from
one listing of the source level's ``+1`` cells, and, once its graph ran,
the stale cells it removes and the documents it writes: the documents it
found plus the changes its writes logged (no listing of the cells).

The graph is the build's (``graph.step_graph(region=...)``); what is
recomputed and why it equals a full build is ``planning.region``'s
``chunk_region``.
"""

from __future__ import annotations

import json

import numpy as np

from ..errors import BuildError
from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import commit as cm
from ..format import documents as fdoc
from ..format import naming as nm
from ..planning.region import ChunkRegion, chunk_region
from ..storage.store import Store
from .spec import StepRegion, StepSpec, grid_coords, grid_numbers

__all__ = ["RegionNotApplicable", "RegionPlans", "changed_objects", "changed_cells",
           "plan_chunk_region", "step_region", "step_cells", "discard_stale",
           "region_documents"]


class RegionNotApplicable(BuildError):
    """The change cannot be bounded to chunks (a vertex left its chunk):
    the refresh recomputes whole levels instead, as it reports."""


def old_links(store: Store, lv, root_chunk) -> dict[tuple, set]:
    """Source chunk -> target chunks its ``+1`` cells link into, as the
    source level's ``+1`` family's documents name its cells (the step has
    not rewritten them yet: they are the finished pyramid's)."""
    return nm.link_map(((seg, chunks) for seg, (_, chunks)
                        in cm.read_family(store, lv.source_level, +1).items() if len(chunks)),
                       *lv.chunk_scales(root_chunk))


def _check_inside(store: Store, lv, info: fcells.VlenArrayInfo, changed, ndim: int,
                  dtype: str) -> None:
    """The changed chunks' vertices lie inside their chunks (a region is
    bounded by chunk boxes)."""
    listed = set(info.chunks)
    present = [c for c in sorted(changed) if c in listed]
    cells = fcells.read_cells(store, info, present)
    cs = np.asarray(lv.source_chunk_shape, dtype=np.float64)
    for c in present:
        raw = cells.get(c)
        if raw is None:
            continue
        rows = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(-1, ndim)
        if rows.size and np.any(np.floor(rows.astype(np.float64) / cs) != np.asarray(c)):
            raise RegionNotApplicable(
                f"{store.describe(info.path)} chunk {nm.chunk_key(c)}: a vertex lies outside "
                f"its chunk, so the change cannot be bounded to chunks")


def plan_chunk_region(store: Store, lv, src, changed: set, root_chunk, *, fallen=(),
                      rows=frozenset()) -> ChunkRegion:
    """The region of one step from the source chunks that changed."""
    if lv.source_level == 0:  # a coarse level's metavertices are homed by their centroid
        _check_inside(store, lv, src.vertices, changed, src.ndim, src.dtype)
    return chunk_region(sorted(changed), old_links=old_links(store, lv, root_chunk),
                        present=src.vertices.chunks, source_chunk=lv.source_chunk_shape,
                        bin_shape=lv.bin_shape, target_chunk=lv.chunk_shape, fallen=fallen,
                        rows=rows)


def step_region(lv, region: ChunkRegion, n_old: int, old_rows: int = -1) -> StepRegion:
    """``region`` as its tasks see it: grid numbers."""
    def numbers(chunks, grid):
        lin = grid_numbers(sorted(chunks), *grid)
        return np.unique(lin[lin >= 0])
    return StepRegion(numbers(region.targets, lv.target_grid),
                      numbers(region.sources, lv.source_grid), max(1, int(n_old)),
                      np.asarray(sorted(region.rows), dtype=np.int64), int(old_rows),
                      numbers(region.gone, lv.source_grid) if region.gone else
                      np.empty(0, np.int64))


def _families(spec: StepSpec) -> list[tuple[int, int, tuple]]:
    """(level, delta, grid origin) of the links families a step writes."""
    out = []
    if spec.links != "none":
        out.append((spec.source_level, +1, spec.source_origin))
    if spec.links == "explicit":
        out.append((spec.target_level, -1, spec.target_origin))
    return out


def step_cells(store: Store, spec: StepSpec, sizes: dict) -> cm.CellsAfter:
    """The chunks of the arrays a region step rewrites (the target level's
    vertex arrays, the ``+1`` family into it and its ``-1`` family): those
    their documents name (a refresh runs on a finished pyramid, whose
    documents name exactly its cells) with the step's logged changes
    (``sizes``, ``Store.logged_sizes``) applied."""
    t, cells = spec.target_level, cm.CellsAfter()
    for array in (nm.VERTICES, nm.VERTEX_FRAGMENTS):
        cells.read(store, f"{t}/{array}")
        cells.apply(sizes, f"{t}/{array}", spec.target_origin)
    for level, delta, origin in _families(spec):
        cells.read_family(store, level, delta)
        cells.apply(sizes, nm.links_family_path(level, delta), origin)
    return cells


def _region_cells(spec: StepSpec, region: StepRegion, cells: cm.CellsAfter) -> list[str]:
    """Every stored cell the region's step rewrites whole: its targets'
    vertex cells and ``-1`` cells, and the ``+1`` cells into them."""
    t = spec.target_level
    coords = grid_coords(region.targets, spec.target_origin, spec.target_grid_shape).tolist()
    targets = {nm.chunk_key(c) for c in coords}
    out = []
    for array in (nm.VERTICES, nm.VERTEX_FRAGMENTS):
        out += cells.cells_in(f"{t}/{array}", targets, spec.target_origin)
    for level, delta, origin in _families(spec):
        base = nm.links_family_path(level, delta)
        for array in sorted(a for a in cells.chunks if a.startswith(f"{base}/")):
            # a +1 cell is keyed by its source chunk: it belongs to its target
            at = targets if delta < 0 else nm.chunks_linking_to(
                coords, array[len(base) + 1:], spec.scale_source, spec.scale_target)
            out += cells.cells_in(array, at, origin)
    return out


def discard_stale(store: Store, spec: StepSpec, region: StepRegion, logged: set[str],
                  cells: cm.CellsAfter, sizes: dict) -> list[str]:
    """Remove the region's cells its step did not write (emptied chunks,
    links that vanished) and the offset arrays left without cells;
    returns what was removed (logged as changed, with its size, before it
    goes; added to ``sizes`` and taken out of ``cells``)."""
    gone = [k for k in _region_cells(spec, region, cells) if k not in logged]
    store.remove_noted(gone, sizes)
    origins = {nm.links_family_path(lv, d): o for lv, d, o in _families(spec)}
    for key in gone:
        base = key.partition("/c/")[0].rsplit("/", 1)[0]
        cells.remove(key, origins.get(base, spec.target_origin))
    for base in origins:
        for seg in store.listdir(base):
            if seg != "zarr.json" and not cells.chunks.get(f"{base}/{seg}"):
                store.note_changed([f"{base}/{seg}/zarr.json"])
                store.remove_tree(f"{base}/{seg}")
                gone.append(f"{base}/{seg}/zarr.json")
    return gone


def changed_cells(lv, sizes: dict) -> set:
    """Target chunks whose vertex cells a region step changed, wrote anew
    or removed (the refresh's size ledger, ``sizes``, after its sweep)."""
    t, origin = lv.target_level, lv.target_grid[0]
    out = set()
    for key in sizes:
        for array in (nm.VERTICES, nm.VERTEX_FRAGMENTS):
            prefix = f"{t}/{array}/c/"
            if key.startswith(prefix):
                out.add(nm.cell_chunk(key[len(prefix):], origin))
    return out


def region_documents(store: Store, spec: StepSpec, cells: cm.CellsAfter, sizes: dict) -> int:
    """The documents of the arrays the step changed (the target level's
    vertex arrays, its ``±1`` families'): chunk lists from ``cells`` (after
    the sweep), counts from the documents as the step found them moved by
    its changes (``sizes``); returns the level's vertex count.  Only
    documents whose bytes differ are written (a refresh's store)."""
    t = spec.target_level
    level = (fdoc.node_attrs(store, str(t)) or {}).get("zarr_vectors_level") or {}
    # framed float32 rows
    n_meta = int(level.get("vertex_count") or 0) + cm.cells_moved(
        sizes, f"{t}/{nm.VERTICES}", lambda size: (size - 8) // (4 * spec.ndim))
    docs = cm.vertex_documents_after(t, spec.target_origin, spec.target_grid_shape, cells)
    for lv, delta, origin in _families(spec):
        grid = spec.source_grid_shape if delta > 0 else spec.target_grid_shape
        docs.update(cm.family_documents_after(store, lv, delta, origin, grid, cells, sizes,
                                              spec.ndim))
    cm.write_documents(store, docs)
    return n_meta


class RegionPlans:
    """The regions of a refresh's steps, level by level: level 1's from
    the changed level-0 chunks and objects (``changed_objects``), each next
    one's from the chunks the last one rewrote; from ``whole_from`` on
    (rows added, survivors drawn anew), whole levels.  Each is saved under
    ``folder`` before its step writes anything, so a killed refresh's
    rerun -- which finds some ``+1`` cells already rewritten -- works on
    the same regions; a rerun that finds another change is not bounded by
    them."""

    def __init__(self, store: Store, folder: str, change: dict, root_chunk):
        self.store, self.folder, self.root_chunk = store, folder.rstrip("/"), root_chunk
        mine = {k: sorted(map(list, change[k])) if k != "rows" else sorted(map(int, change[k]))
                for k in ("chunks", "fallen", "rows")}
        mine["whole_from"] = change.get("whole_from")
        key = f"{self.folder}/source.json"
        raw = store.get(key)
        if raw is None:
            store.put(key, json.dumps(mine).encode())
        elif json.loads(raw) != mine:
            raise RegionNotApplicable("level 0 changed again since an interrupted refresh")
        self.changed = {tuple(c) for c in mine["chunks"]}
        self.fallen = {tuple(c) for c in mine["fallen"]}
        self.rows = frozenset(mine["rows"])
        self.whole_from = mine["whole_from"]
        self.history: list[tuple] = []  # (level, targets, sources, source chunks)

    def whole(self, lv) -> bool:
        """Whether the step is recomputed whole: rows were added and it
        (or a step below) draws its survivors anew."""
        if self.whole_from is None or lv.target_level < self.whole_from:
            return False
        self.history.append((lv.target_level, None, None, None))
        return True

    def region(self, lv, src) -> ChunkRegion | None:
        """The step's region; None when its source did not change (nothing
        of this level or above can)."""
        if not self.changed and not self.fallen:
            return None
        key = f"{self.folder}/{lv.target_level}.json"
        raw = self.store.get(key)
        if raw is not None:
            region = _region_from(json.loads(raw), self.rows)
        else:
            region = plan_chunk_region(self.store, lv, src, self.changed, self.root_chunk,
                                       fallen=self.fallen, rows=self.rows)
            if not region.targets:
                raise RegionNotApplicable(f"level {lv.target_level}: no chunk to rewrite")
            self.store.put(key, json.dumps({
                **{k: sorted(map(list, getattr(region, k))) for k in ("targets", "sources",
                                                                       "gone")},
                "rows": sorted(region.rows)}).encode())
        self.history.append((lv.target_level, len(region.targets), len(region.sources),
                             len(src.vertices.chunks)))
        return region

    def advance(self, changes, rows=()) -> None:
        """The chunks the last step changed (content or weights): where
        the next step's source changed; ``rows``: ids of the objects whose
        manifest row it changed (one emptied names no chunk, yet its next
        row must be recomputed too)."""
        self.changed, self.fallen = {tuple(c) for c in changes}, set()
        self.rows = self.rows | frozenset(map(int, rows))


def _region_from(doc: dict, rows: frozenset) -> ChunkRegion:
    """A step's region as saved (by an earlier attempt of this refresh)."""
    return ChunkRegion(frozenset(map(tuple, doc["targets"])), frozenset(map(tuple, doc["sources"])),
                       frozenset(doc["rows"]) if "rows" in doc else rows,
                       frozenset(map(tuple, doc.get("gone", []))))


# ------------------------------------------------- changed object rows
def changed_objects(store: Store, chunks, ndim: int, *, n_old: int,
                    ids_changed: bool) -> tuple[np.ndarray, set, set]:
    """The objects whose level-0 manifest row an edit changed or added,
    from the changed manifest chunks (``chunks``, row-chunk coordinates),
    the rows past the ``n_old`` the last build read, and the digests
    (and ids) it recorded of each kept row (a row sparsity dropped at
    level 1 reaches no coarse level).  Rows may only be appended, under
    ids sorting after every old one (so each old coarse row keeps its
    place), and no old row may change its id (``ids_changed``: the id
    table changed, so every recorded id is checked).  Returns their ids,
    the level-0 chunks their new rows name (their weights rose) and the
    level-1 chunks their old coarse rows name (the metavertices whose
    weights fell).  The recorded digests are read one bucket at a time:
    the driver holds the id table and the changed buckets, not a digest
    per object."""
    from .objects import read_object_ids, row_digests
    names = _digest_files(store)  # (no digest recorded: said first)
    path = f"0/{nm.OBJECT_INDEX}/manifests"
    arr = _open_array(store, path)
    step, n = int(arr.chunks[0]) or 1, int(arr.shape[0])
    if n < n_old:
        raise RegionNotApplicable(f"{n_old - n} object row(s) were removed")
    ids_now = read_object_ids(store, 0, n)
    wanted = sorted({int(c[0]) for c in chunks} | set(range(n_old // step, -(-n // step))))
    # The recorded digests of the rows in the changed buckets only, by row.
    check = ids_changed or n > n_old
    recorded, without_ids, moved, rec_rows, rec_digest = 0, False, None, [], []
    for part in _recorded_digests(store, names):
        rows = part["rows"]
        recorded += rows.size
        without_ids |= part.get("ids") is None
        if check and moved is None and part.get("ids") is not None:
            bad = np.flatnonzero(ids_now[rows] != part["ids"])
            moved = int(rows[bad[0]]) if bad.size else None
        sel = np.isin(rows // step, wanted)
        rec_rows.append(rows[sel])
        rec_digest.append(part["digest"][sel])
    if check:
        _check_ids(ids_now, n_old, recorded, without_ids, moved)
    rec_rows, rec_digest = np.concatenate(rec_rows), np.concatenate(rec_digest)
    order = np.argsort(rec_rows, kind="stable")
    rec_rows, rec_digest = rec_rows[order], rec_digest[order]
    # One changed bucket at a time: only changed and added rows are kept.
    changed, blobs = [], {}
    for lo, got in fcells.read_row_chunks(store, arr, path, wanted):
        a, b = np.searchsorted(rec_rows, [lo, lo + len(got)])
        rows, digest = rec_rows[a:b], rec_digest[a:b]
        differ = rows[row_digests([bytes(got[int(r) - lo]) for r in rows]) != digest] if rows.size \
            else rows
        changed.append(differ)
        for r in (*differ.tolist(), *range(max(lo, n_old), lo + len(got))):
            blobs[r] = bytes(got[r - lo])
    changed_rows = np.concatenate(changed) if changed else np.empty(0, np.int64)
    added = np.arange(n_old, n, dtype=np.int64)
    new = cdc.decode_manifest_table([blobs[int(r)] for r in (*changed_rows, *added)], ndim)
    ids, added_ids = ids_now[changed_rows], ids_now[added]
    del ids_now, blobs  # before level 1's id table is read
    return np.sort(np.concatenate([ids, added_ids])), _unique_chunks(new.coords), \
        _old_coarse_chunks(store, ids, ndim)


def _open_array(store: Store, path: str):
    import warnings

    import zarr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open_array(store.zarr_store(), path=path, mode="r")


def _digest_files(store: Store) -> list[str]:
    """The digest files of the level-0 manifest rows the last build read."""
    names = store.keys_under(nm.MANIFEST_DIGESTS)
    if not names:
        raise RegionNotApplicable("no digest of the level-0 manifest rows is recorded (built "
                                  "before zarr-vectors-dask recorded them)")
    return names


def _recorded_digests(store: Store, names: list[str]):
    """The digest files, one at a time (``rows``, ``digest`` and, since
    they were recorded, ``ids``)."""
    for name in names:
        yield cdc.unpack_columns(store.get(f"{nm.MANIFEST_DIGESTS}/{name}"),
                                 what=store.describe(nm.MANIFEST_DIGESTS))


def _check_ids(ids_now: np.ndarray, n_old: int, recorded: int, without_ids: bool,
               moved: int | None) -> None:
    """Every old row was recorded with its id and keeps it (the coarse
    rows are in id order), and the added rows' ids sort after all of
    theirs."""
    if without_ids or recorded != n_old:
        raise RegionNotApplicable("the object ids changed and the last build recorded no id "
                                  "of every row")
    if moved is not None:
        raise RegionNotApplicable(f"the object in row {moved} changed its id (the coarse rows "
                                  f"are in id order)")
    if ids_now.size > n_old and n_old and ids_now[n_old:].min() <= ids_now[:n_old].max():
        raise RegionNotApplicable("an added object's id sorts before an existing one (every "
                                  "coarse row after it moves)")


def _unique_chunks(coords) -> set:
    coords = np.asarray(coords, dtype=np.int64)
    return set(map(tuple, np.unique(coords, axis=0).tolist())) if coords.size else set()


def _old_coarse_chunks(store: Store, ids: np.ndarray, ndim: int) -> set:
    """Chunks named by the level-1 rows of ``ids`` (level-1 rows are in id
    order), each level-1 bucket holding one read once."""
    from .objects import read_object_ids
    if ids.size == 0:
        return set()
    path = f"1/{nm.OBJECT_INDEX}/manifests"
    arr = _open_array(store, path)
    n = int(arr.shape[0])
    coarse_ids = read_object_ids(store, 1, n)
    at = np.searchsorted(coarse_ids, ids)
    at = at[(at < n) & (coarse_ids[np.minimum(at, n - 1)] == ids)] if n else at[:0]
    del coarse_ids
    blobs = fcells.read_rows_at(store, arr, path, at)
    return _unique_chunks(cdc.decode_manifest_table(blobs, ndim).coords)
