"""Graph stages of one coarsening step, one function per stage.

Each runs inside a Dask task: it gets a small picklable ``StepSpec``, its
own slice of the work and the outputs of the tasks it depends on; it reads
or writes the store itself and returns only what later stages need.

    context_refs ...   (strategies other than "random") per-object lengths and
      object_points    points, before the survivors are picked: see stage 0b
    object_table       the id table and the survivors of sparsity
    object_refs        per manifest bucket: which fragments kept objects name
    bin_partials       per source block: bin keys, partial centroid sums
                       (and per-vertex attribute partials, when asked)
    reduce_metavertices per partition: sum partials into metavertices
    write_metavertices per target block: order, encode, write vertex cells
                       (and the metavertices' attribute cells)
    resolve_parents    per partition: bin key -> (chunk, fragment) answers
    links_and_sequences per source block: +1 link cells and their -1 mirrors,
                       per-fragment metavertex sequences for manifests
    write_manifests    per bucket: object_index rows of the coarse level
    write_attributes   per attribute bucket: masked object attributes
    write_shards       (sharded) per run of shards: the cells the writers
                       above sent there, encoded into whole shards

Exchanges between stages are dicts keyed by destination; the executor
routes only non-empty (source, destination) pairs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import format as fmt
from . import vertex_attributes as va
from .store import Store


@dataclass(frozen=True)
class StepSpec:
    """Everything a task of one coarsening step needs besides its inputs:
    shapes and small per-block tables, never a per-chunk or per-object list.

    Source chunks are named by their *chunk number*, the row-major index of
    the chunk in the source grid; source blocks are runs of chunk numbers
    and target blocks runs of the target grid, each given by its starts."""

    store: Store
    source_level: int
    target_level: int
    ndim: int
    bin_shape: tuple[float, ...]
    chunk_shape: tuple[float, ...]
    source_origin: tuple[int, ...]
    source_grid_shape: tuple[int, ...]
    target_origin: tuple[int, ...]
    target_grid_shape: tuple[int, ...]
    block_starts: tuple[int, ...]         # first chunk number of each source block
    target_block_starts: tuple[int, ...]  # first target-grid index of each target block
    scale_source: tuple[int, ...]  # chunk shape as a multiple of root's
    scale_target: tuple[int, ...]
    vertices: fmt.VlenArrayInfo  # without its chunk list (``chunks=()``)
    fragments: fmt.VlenArrayInfo
    source_dtype: str
    has_objects: bool
    manifests_path: str | None
    links: str  # none | implicit | explicit
    #: Per-vertex attributes aggregated into the metavertices (opt-in).
    vertex_attributes: tuple = ()
    #: Cells per storage object of every array the step writes (None:
    #: one object per cell), and the routes of its sharded levels' cells.
    shard_shape: tuple[int, ...] | None = None
    shard_routes: tuple = ()

    def __repr__(self) -> str:
        return f"StepSpec({self.store!r}, {self.source_level}->{self.target_level})"


# ------------------------------------------------------------- helpers
def _void(keys: np.ndarray) -> np.ndarray:
    """Rows of int64 bin coordinates as raw-byte scalars: ``np.unique`` on
    these sorts byte-lexicographically, which is the reference's order."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    return keys.view(np.dtype((np.void, 8 * keys.shape[1]))).ravel()


def _target_block(spec: StepSpec, chunks: np.ndarray) -> np.ndarray:
    """Target block of coarse chunks (coordinates clipped into the grid
    against float rounding)."""
    shape = np.asarray(spec.target_grid_shape, dtype=np.int64)
    rel = np.clip(np.asarray(chunks, dtype=np.int64) - np.asarray(spec.target_origin), 0, shape - 1)
    lin = np.ravel_multi_index(tuple(rel.T), tuple(shape.tolist()))
    return np.searchsorted(np.asarray(spec.target_block_starts, dtype=np.int64), lin,
                           side="right") - 1


def _partition_of(spec: StepSpec, keys: np.ndarray) -> np.ndarray:
    """Reduce partition of a bin key: the target block of its lower corner."""
    lower = np.floor(keys.astype(np.float64) * np.asarray(spec.bin_shape) /
                     np.asarray(spec.chunk_shape)).astype(np.int64)
    return _target_block(spec, lower)


def chunk_numbers(spec: StepSpec, coords: np.ndarray) -> np.ndarray:
    """Row-major index of source chunks in the source grid; -1 outside it."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, spec.ndim)
    shape = np.asarray(spec.source_grid_shape, dtype=np.int64)
    rel = coords - np.asarray(spec.source_origin, dtype=np.int64)
    inside = np.all((rel >= 0) & (rel < shape), axis=1)
    out = np.full(coords.shape[0], -1, dtype=np.int64)
    if inside.any():
        out[inside] = np.ravel_multi_index(tuple(rel[inside].T), tuple(shape.tolist()))
    return out


def chunk_coords(spec: StepSpec, numbers: np.ndarray) -> np.ndarray:
    """Inverse of ``chunk_numbers``."""
    rel = np.unravel_index(np.asarray(numbers, dtype=np.int64), tuple(spec.source_grid_shape))
    return np.stack(rel, axis=1).reshape(-1, spec.ndim) + np.asarray(spec.source_origin, np.int64)


def block_of(spec: StepSpec, numbers: np.ndarray) -> np.ndarray:
    """Source block owning each chunk number."""
    return np.searchsorted(np.asarray(spec.block_starts, dtype=np.int64), numbers,
                           side="right") - 1


def send_exchange(store: Store, routed: dict[int, dict[str, np.ndarray]], scope, kind: str,
                  sender) -> None:
    """Write each destination's columns to its exchange file."""
    store.put_many({fmt.exchange_key(scope, kind, d, sender): fmt.pack_columns(cols)
                    for d, cols in routed.items()})


def read_exchange(store: Store, keys: list[str]) -> list[dict[str, np.ndarray]]:
    """The columns of exchange files, in ``keys`` order; every one must exist."""
    raw = store.get_many(keys)
    out = []
    for k in keys:
        if raw[k] is None:
            raise fmt.CorruptChunkError(f"{store.describe(k)}: exchange file is missing")
        out.append(fmt.unpack_columns(raw[k], what=store.describe(k)))
    return out


def received(spec: StepSpec, kind: str, receiver: int) -> list[tuple[int, dict]]:
    """Every exchange file addressed to ``receiver``, by sender.  Which
    senders wrote one depends on the data, so the receiver lists its own
    folder (it runs after a join on all senders) instead of being told."""
    folder = fmt.exchange_key(spec.target_level, kind, receiver, "").rstrip("/")
    senders = sorted(int(s) for s in spec.store.listdir(folder) if s.isdigit())
    keys = [fmt.exchange_key(spec.target_level, kind, receiver, s) for s in senders]
    return list(zip(senders, read_exchange(spec.store, keys)))


# ------------------------------------------------------------- cells and shards
@dataclass(frozen=True)
class ShardRoute:
    """How the cells one graph writes into a sharded level reach their
    shards.  A shard must be written whole by one task, but its cells come
    from several writers (a ``-1`` cell's records come from whichever
    source block holds its fine chunk), so writers send cells to the
    ``write_shards`` task owning their shard (runs of shard numbers,
    ``pack_starts``), as exchange files; that task encodes and writes each
    of its shards once."""

    level: int
    origin: tuple[int, ...]
    grid: tuple[int, ...]
    shard_shape: tuple[int, ...]
    pack_starts: tuple[int, ...]  # first shard number of each write_shards task
    scope: Any  # the graph's exchange scope (a step's target level, or "compose")

    @property
    def shard_grid(self) -> tuple[int, ...]:
        return tuple(-(-g // s) for g, s in zip(self.grid, self.shard_shape))

    def packs_of(self, where: np.ndarray) -> np.ndarray:
        """``write_shards`` task of cells at grid indices ``where``."""
        shard = np.asarray(where, dtype=np.int64) // np.asarray(self.shard_shape, dtype=np.int64)
        number = np.ravel_multi_index(tuple(shard.T), self.shard_grid)
        return np.searchsorted(np.asarray(self.pack_starts, dtype=np.int64), number,
                               side="right") - 1

    def folder(self, pack: int) -> str:
        return fmt.exchange_key(self.scope, f"cells-{self.level}", pack, "").rstrip("/")


def route_to(routes, level: int) -> ShardRoute | None:
    for r in routes:
        if r.level == level:
            return r
    return None


def put_cells(store: Store, cells: dict[tuple[str, tuple], bytes], *, origin,
              route: ShardRoute | None, sender: str) -> None:
    """Write framed cells ``{(array path, chunk): bytes}`` of one level: as
    objects of their own, or (sharded) to the tasks that write their
    shards.  Nothing is visible until the commit writes the documents."""
    if not cells:
        return
    if route is None:
        store.put_many({fmt.cell_path(a, c, origin): b for (a, c), b in cells.items()},
                       atomic=False)
        return
    items = list(cells.items())
    where = np.asarray([c for (_, c), _ in items], dtype=np.int64).reshape(len(items), -1) - \
        np.asarray(origin, dtype=np.int64)
    packs = route.packs_of(where)
    files = {}
    for k in np.unique(packs).tolist():
        sel = np.flatnonzero(packs == k).tolist()
        files[fmt.exchange_key(route.scope, f"cells-{route.level}", k, sender)] = fmt.pack_cells(
            [items[i][0][0] for i in sel], where[sel], [items[i][1] for i in sel])
    store.put_many(files)


def write_shards(store: Store, route: ShardRoute, pack: int, *_done) -> int:
    """Encode and write every shard of one run that received cells (after
    every writer of the graph has finished); returns how many."""
    folder = route.folder(pack)
    keys = [f"{folder}/{s}" for s in sorted(store.listdir(folder))]
    raw = store.get_many(keys)
    shards: dict[tuple[str, tuple], list] = {}
    ss = route.shard_shape
    for k in keys:
        if raw[k] is None:
            raise fmt.CorruptChunkError(f"{store.describe(k)}: exchange file is missing")
        for path, where, blob in fmt.unpack_cells(raw[k], what=store.describe(k)):
            shard = tuple(w // s for w, s in zip(where, ss))
            shards.setdefault((path, shard), []).append(
                (tuple(w % s for w, s in zip(where, ss)), blob))
    blobs = fmt.encode_shards(ss, list(shards.values()))
    store.put_many({fmt.shard_key(path, shard): blob
                    for (path, shard), blob in zip(shards, blobs)}, atomic=False)
    return len(shards)


def join(*_done) -> None:
    """A barrier: its dependents start once every sender has finished."""
    return None


def _split_by(dest: np.ndarray, **columns: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    if dest.size == 0:
        return out
    order = np.argsort(dest, kind="stable")
    d = dest[order]
    cuts = np.flatnonzero(np.diff(d)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, d.size]):
        sel = order[lo:hi]
        out[int(d[lo])] = {k: v[sel] for k, v in columns.items()}
    return out


def _read_source_chunks(spec: StepSpec, numbers: np.ndarray):
    coords = [tuple(c) for c in chunk_coords(spec, numbers).tolist()]
    verts = fmt.read_cells(spec.store, spec.vertices, coords)
    frags = fmt.read_cells(spec.store, spec.fragments, coords)
    dtype = np.dtype(spec.source_dtype)
    for num, cc in zip(np.asarray(numbers).tolist(), coords):
        def what(cc=cc):  # built only for a message
            return f"{spec.store.describe(spec.vertices.path)} chunk {fmt.chunk_key(cc)}"
        v, f = verts[cc], frags[cc]
        if v is None or f is None:
            raise fmt.CorruptChunkError(f"{what()}: listed as present but its cell is missing")
        rows, members, lengths = fmt.decode_vertex_cell(v, f, dtype=dtype, ndim=spec.ndim,
                                                        what=what)
        yield int(num), cc, rows, members, lengths


def _read_attribute_cells(spec: StepSpec, numbers: np.ndarray) -> list[dict]:
    """Each per-vertex attribute's cells for a block's chunks."""
    if not spec.vertex_attributes:
        return []
    coords = [tuple(c) for c in chunk_coords(spec, numbers).tolist()]
    return [fmt.read_cells(spec.store, a.source, coords) for a in spec.vertex_attributes]


def _pair_key(chunk_id: np.ndarray, frag: np.ndarray) -> np.ndarray:
    """One sortable int64 per (source chunk id, fragment index) pair."""
    return (np.asarray(chunk_id, dtype=np.int64) << 32) | np.asarray(frag, dtype=np.int64)


def _lookup(keys: np.ndarray, values: np.ndarray, want: np.ndarray, missing=0) -> np.ndarray:
    """``values`` at the positions of ``want`` in sorted ``keys``; ``missing``
    where absent."""
    if keys.size == 0:
        return np.full(want.shape, missing, dtype=values.dtype)
    at = np.clip(np.searchsorted(keys, want), 0, keys.size - 1)
    return np.where(keys[at] == want, values[at], missing)


# ------------------------------------------------------------- stage 0
#: Strategies this project implements itself; any other name except the
#: reference's "random" is looked up in zarr-vectors' selection registry.
BUILTIN_STRATEGIES = ("random", "length")


def target_count(n_rows: int, sparsity_factor: float) -> int:
    """How many rows a sparsified level keeps: the reference's
    ``max(1, round(n * (1 / factor)))``, for every strategy."""
    return max(1, round(n_rows * (1.0 / sparsity_factor)))


def needs_context(sparsity: tuple, n_rows: int) -> bool:
    """Whether this step's survivors depend on the objects' geometry (so
    per-object lengths / points must be computed before ``object_table``)."""
    factor, strategy = sparsity[0], sparsity[1]
    return strategy != "random" and factor > 1.0 and n_rows > 1


def kept_rows(n_rows: int, sparsity_factor: float, strategy: str, seed, base_bin, *,
              lengths: np.ndarray | None = None, points: np.ndarray | None = None,
              select=None) -> np.ndarray:
    """Survivors of sparsity as a row mask.

    ``random`` is the reference's seeded selection (same seed, same rows).
    ``length`` keeps the ``target_count`` rows of greatest polyline length,
    ties to the lower row.  Any other name is a strategy registered in
    zarr-vectors' registry, resolved on the driver (``select``, so workers
    need not have imported the package that registered it) and called with
    the reference's contract and the per-object context it documents."""
    keep = np.zeros(n_rows, dtype=bool)
    if not (sparsity_factor > 1.0 and n_rows > 1):
        keep[:] = True
        return keep
    if strategy == "random":
        from zarr_vectors.multiresolution.object_selection import apply_sparsity
        kept = apply_sparsity(n_rows, 1.0 / sparsity_factor, strategy, seed=seed,
                              representative_points=None, bin_shape=tuple(base_bin))
    elif strategy == "length":
        if lengths is None or lengths.shape != (n_rows,):
            raise ValueError(f"sparsity_strategy 'length' needs one length per row "
                             f"({n_rows}); got {None if lengths is None else lengths.shape}")
        # A stable sort of the negated lengths puts equal lengths in row order.
        kept = np.argsort(-np.asarray(lengths, dtype=np.float64),
                          kind="stable")[:target_count(n_rows, sparsity_factor)]
    else:
        if select is None:
            from zarr_vectors.multiresolution.registry import require_selection_strategy
            select = require_selection_strategy(strategy)
        kept = select(n_rows, target_count(n_rows, sparsity_factor), seed=seed,
                      lengths=lengths, attribute_values=None, attribute_mode="max",
                      representative_points=points, bin_shape=tuple(base_bin))
        kept = np.asarray(kept, dtype=np.int64).reshape(-1)
        if kept.size and (kept.min() < 0 or kept.max() >= n_rows):
            raise ValueError(f"sparsity_strategy {strategy!r} returned row indices outside "
                             f"0..{n_rows - 1}")
    keep[np.asarray(kept, dtype=np.int64)] = True
    return keep


def read_object_ids(store: Store, level: int, n_rows: int) -> np.ndarray:
    """A level's object id table.  Only an index written without one (the
    format's first layout, where rows are ids) falls back to ``0..n-1``; a
    table that exists but cannot be read is an error, never a fallback."""
    import zarr
    path = f"{level}/{fmt.OBJECT_INDEX}/object_ids"
    if fmt.read_json(store, f"{path}/zarr.json") is None:
        return np.arange(n_rows, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(store.zarr_store(), path=path, mode="r")
        if tuple(arr.shape) != (n_rows,):
            raise fmt.FormatError(f"{store.describe(path)}: {tuple(arr.shape)} ids for "
                                  f"{n_rows} manifest rows")
        return np.asarray(fmt.read_rows_checked(store, arr, path, 0, n_rows), dtype=np.int64)


def object_table(spec: StepSpec, n_rows: int, sparsity: tuple, attribute_names: list[str],
                 *_context_done) -> int:
    """The one task that sees every object row: reads the id table, picks
    the survivors of sparsity, writes the coarse level's id table and array
    documents, and hands each manifest bucket its source rows and kept
    flags (and each attribute bucket its kept flags) as exchange files.

    ``sparsity`` is ``(factor, strategy, seed, source_bin, select)``; a
    strategy that needs per-object context reads it from the ``context``
    exchange files the ``object_context`` tasks wrote (source row order).
    Returns the number of kept objects."""
    import zarr
    ids = read_object_ids(spec.store, spec.source_level, n_rows)
    factor, strategy, seed, source_bin, select = sparsity
    lengths = points = None
    if needs_context(sparsity, n_rows):
        n_buckets = -(-n_rows // fmt.MANIFEST_BUCKET)
        parts = read_exchange(spec.store, [fmt.exchange_key(spec.target_level, "context", k, 0)
                                           for k in range(n_buckets)])
        lengths = np.concatenate([p["lengths"] for p in parts])
        if all("points" in p for p in parts):
            points = np.concatenate([p["points"] for p in parts])
    keep = kept_rows(n_rows, factor, strategy, seed, source_bin, lengths=lengths, points=points,
                     select=select)
    # Coarse rows are in id order: row r comes from source row perm[r].
    perm = np.argsort(ids, kind="stable")
    t = spec.target_level
    docs = {f"{t}/{fmt.OBJECT_INDEX}/manifests/zarr.json": fmt.manifests_doc(n_rows),
            f"{t}/{fmt.OBJECT_INDEX}/object_ids/zarr.json":
                fmt.dense_array_doc((n_rows,), (n_rows,), np.int64)}
    from zarr_vectors.core.arrays import _default_fill_value_for_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = spec.store.zarr_store()
        for name in attribute_names:
            sarr = zarr.open_array(zs, path=f"{spec.source_level}/{fmt.OBJECT_ATTRIBUTES}/{name}",
                                   mode="r")
            dtype, shape = np.dtype(sarr.dtype), tuple(sarr.shape)
            docs[f"{t}/{fmt.OBJECT_ATTRIBUTES}/{name}/zarr.json"] = fmt.dense_array_doc(
                shape, (fmt.ATTRIBUTE_BUCKET, *shape[1:]), dtype,
                fill_value=_default_fill_value_for_dtype(dtype),
                attributes={"zv_array": "object_attribute", "name": name, "dtype": str(dtype),
                            "shape": list(shape), "fill_sentinel_meaning": "absent"})
        spec.store.put_many(docs)
        zarr.open_array(zs, path=f"{t}/{fmt.OBJECT_INDEX}/object_ids", mode="r+")[:] = ids[perm]
    for k, a in enumerate(range(0, n_rows, fmt.MANIFEST_BUCKET)):
        rows = perm[a:a + fmt.MANIFEST_BUCKET]
        send_exchange(spec.store, {k: {"src_rows": rows, "kept": keep[rows]}}, t, "objects", 0)
    if attribute_names:
        for j, a in enumerate(range(0, n_rows, fmt.ATTRIBUTE_BUCKET)):
            send_exchange(spec.store, {j: {"kept": keep[a:a + fmt.ATTRIBUTE_BUCKET]}}, t,
                          "keep", 0)
    return int(keep.sum())


def object_refs(spec: StepSpec, bucket: int, _objects_done=None) -> dict:
    """Decode one bucket of source manifests.

    The bucket's rows (coarse rows, in id order) come from the source rows
    ``object_table`` sent it, with their kept flags.  Returns the kept rows'
    fragment references (for manifest assembly) and sends, per source
    block, how many times each fragment is named (its weight in the
    centroids).
    """
    import zarr
    (mine,) = read_exchange(spec.store, [fmt.exchange_key(spec.target_level, "objects",
                                                               bucket, 0)])
    src_rows, kept = mine["src_rows"], mine["kept"]
    wanted = src_rows[kept]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(spec.store.zarr_store(), path=spec.manifests_path, mode="r")
        blobs = [b""] * wanted.size
        # Chunk by chunk (rows of unsorted ids can be anywhere), each read
        # through the checked reader so a damaged chunk is named.
        step = int(arr.chunks[0]) or 1
        which = wanted // step
        for c in np.unique(which).tolist():
            lo, hi = c * step, min((c + 1) * step, int(arr.shape[0]))
            rows = fmt.read_rows_checked(spec.store, arr, spec.manifests_path, lo, hi)
            for i in np.flatnonzero(which == c).tolist():
                blobs[i] = bytes(rows[int(wanted[i]) - lo])
    table = fmt.decode_manifest_table(blobs, spec.ndim)
    counts, ref_frag = table.counts, table.frags
    # References to chunks outside the grid are skipped, as the reference
    # skips missing fragments (absent chunks inside it simply have none).
    ref_chunk = chunk_numbers(spec, table.coords)
    ok = ref_chunk >= 0
    by_block: dict[int, dict[str, np.ndarray]] = {}
    if ok.any():
        uniq, mult = np.unique(_pair_key(ref_chunk[ok], ref_frag[ok]), return_counts=True)
        chunk, frag = uniq >> 32, uniq & 0xFFFFFFFF
        by_block = _split_by(block_of(spec, chunk), chunk=chunk, frag=frag,
                             mult=mult.astype(np.int64))
    # Each block's share goes to an exchange file, not a task per pair.
    send_exchange(spec.store, by_block, spec.target_level, "refs", bucket)
    return {"kept": kept, "counts": counts, "ref_chunk": ref_chunk, "ref_frag": ref_frag}


# ------------------------------------------------------------- stage 0b
# Per-object context for strategies other than "random", computed before
# ``object_table`` picks survivors.  Object buckets here are runs of
# *source* rows (the order strategies index), not the coarse id order.
#
#   context_refs       per bucket: which fragments each row names
#   fragment_summaries per source block: vertex count, first and last
#                      vertex and inner polyline length of each named fragment
#   object_context     per bucket: each row's length (and, for registered
#                      strategies, which vertex is its midpoint)
#   fragment_points / object_points: fetch those midpoints (registered
#                      strategies only)

def context_refs(spec: StepSpec, bucket: int, n_rows: int) -> dict:
    """Decode one bucket of source manifests (every row: survivors are not
    known yet) and ask each source block about the fragments it holds."""
    import zarr
    lo, hi = bucket * fmt.MANIFEST_BUCKET, min((bucket + 1) * fmt.MANIFEST_BUCKET, n_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(spec.store.zarr_store(), path=spec.manifests_path, mode="r")
        rows = fmt.read_rows_checked(spec.store, arr, spec.manifests_path, lo, hi)
    table = fmt.decode_manifest_table([bytes(b) for b in rows], spec.ndim)
    ref_chunk = chunk_numbers(spec, table.coords)
    ok = ref_chunk >= 0  # outside the grid: skipped, as the reference skips missing fragments
    by_block: dict[int, dict[str, np.ndarray]] = {}
    if ok.any():
        uniq = np.unique(_pair_key(ref_chunk[ok], table.frags[ok]))
        chunk, frag = uniq >> 32, uniq & 0xFFFFFFFF
        by_block = _split_by(block_of(spec, chunk), chunk=chunk, frag=frag)
    send_exchange(spec.store, by_block, spec.target_level, "context_refs", bucket)
    return {"counts": table.counts, "ref_chunk": ref_chunk, "ref_frag": table.frags}


def _requested_fragments(spec: StepSpec, block: int, numbers: np.ndarray, kind: str):
    """The requests addressed to this block, and the decoded chunks they
    name (only chunks of the block that exist)."""
    requests = received(spec, kind, block)
    wanted = np.unique(np.concatenate([r["chunk"] for _, r in requests])) if requests else \
        np.empty(0, np.int64)
    present = np.intersect1d(wanted, np.asarray(numbers, dtype=np.int64))
    chunks = {num: (rows, members, lengths)
              for num, _, rows, members, lengths in _read_source_chunks(spec, present)}
    return requests, chunks


def _fragment_table(spec: StepSpec, chunks: dict) -> dict[str, np.ndarray]:
    """Every fragment of the decoded chunks, sorted by pair key: vertex
    count, first and last vertex, and the summed length of its own
    segments (float64 over the stored positions)."""
    keys, n, first, last, inner = [], [], [], [], []
    for num, (rows, members, flens) in chunks.items():
        pos = rows[members].astype(np.float64)  # fragment order
        starts = np.cumsum(flens) - flens
        nz = flens > 0
        f = np.flatnonzero(nz)
        fst = np.full((flens.size, spec.ndim), np.nan)
        lst = np.full((flens.size, spec.ndim), np.nan)
        fst[f] = pos[starts[f]]
        lst[f] = pos[starts[f] + flens[f] - 1]
        owner = np.repeat(np.arange(flens.size), flens)
        seg = np.sqrt(np.sum(np.diff(pos, axis=0) ** 2, axis=1))
        within = owner[1:] == owner[:-1]  # no segment between two fragments
        keys.append(_pair_key(np.full(flens.size, num), np.arange(flens.size)))
        n.append(flens)
        first.append(fst)
        last.append(lst)
        inner.append(np.bincount(owner[1:][within], weights=seg[within], minlength=flens.size))
    if not keys:
        e = np.empty((0, spec.ndim))
        return {"key": np.empty(0, np.int64), "n": np.empty(0, np.int64), "first": e,
                "last": e, "inner": np.empty(0)}
    key = np.concatenate(keys)
    order = np.argsort(key)
    return {"key": key[order], "n": np.concatenate(n)[order].astype(np.int64),
            "first": np.concatenate(first)[order], "last": np.concatenate(last)[order],
            "inner": np.concatenate(inner)[order]}


def fragment_summaries(spec: StepSpec, block: int, numbers: np.ndarray, _refs_done=None) -> None:
    """For every fragment a bucket named in this block: its vertex count,
    first and last vertex, and inner length.  Missing fragments (absent
    chunk, index past the chunk's fragments) have count 0."""
    requests, chunks = _requested_fragments(spec, block, numbers, "context_refs")
    table = _fragment_table(spec, chunks)
    out = {}
    for bucket, req in requests:
        want = _pair_key(req["chunk"], req["frag"])
        n = _lookup(table["key"], table["n"], want, missing=0)
        at = np.clip(np.searchsorted(table["key"], want), 0, max(table["key"].size - 1, 0))
        hit = n > 0
        first = np.full((want.size, spec.ndim), np.nan)
        last = np.full((want.size, spec.ndim), np.nan)
        inner = np.zeros(want.size)
        first[hit], last[hit], inner[hit] = (table["first"][at[hit]], table["last"][at[hit]],
                                             table["inner"][at[hit]])
        out[bucket] = {"chunk": req["chunk"], "frag": req["frag"], "n": n, "first": first,
                       "last": last, "inner": inner}
    send_exchange(spec.store, out, spec.target_level, "context_frags", block)


def object_context(spec: StepSpec, bucket: int, refs: dict, want_points: bool,
                   _summaries_done=None) -> dict:
    """Each row's polyline length: its fragments' inner lengths plus the
    jumps between consecutive non-empty fragments, in manifest order.
    With ``want_points``, asks the blocks for each row's midpoint vertex
    (index ``count // 2`` of its vertex sequence); else writes the context."""
    parts = [p for _, p in received(spec, "context_frags", bucket)]
    cat = (lambda k, shape=(0,): np.concatenate([p[k] for p in parts]) if parts
           else np.empty(shape))
    key = _pair_key(cat("chunk").astype(np.int64), cat("frag").astype(np.int64))
    order = np.argsort(key)
    key = key[order]
    n_f, inner_f = cat("n")[order].astype(np.int64), cat("inner")[order]
    first_f = cat("first", (0, spec.ndim))[order]
    last_f = cat("last", (0, spec.ndim))[order]
    counts = refs["counts"]
    n_rows = counts.size
    owner = np.repeat(np.arange(n_rows), counts)
    ok = refs["ref_chunk"] >= 0
    want = _pair_key(np.where(ok, refs["ref_chunk"], 0), refs["ref_frag"])
    at = np.zeros(want.size, dtype=np.int64)
    n_ref = np.zeros(want.size, dtype=np.int64)
    if key.size:
        at = np.clip(np.searchsorted(key, want), 0, key.size - 1)
        n_ref = np.where(ok & (key[at] == want), n_f[at], 0)
    live = np.flatnonzero(n_ref > 0)  # refs that contribute vertices, in manifest order
    o, a = owner[live], at[live]
    lengths = np.bincount(o, weights=inner_f[a], minlength=n_rows)
    same = o[1:] == o[:-1]
    jump = np.sqrt(np.sum((first_f[a[1:]] - last_f[a[:-1]]) ** 2, axis=1))
    lengths += np.bincount(o[1:][same], weights=jump[same], minlength=n_rows)
    if not want_points:
        send_exchange(spec.store, {bucket: {"lengths": lengths}}, spec.target_level, "context", 0)
        return {}
    # The midpoint vertex: the live ref whose vertex range holds index
    # total // 2 of its row, and the vertex's index inside that fragment.
    nl = n_ref[live]
    total = np.bincount(o, weights=nl, minlength=n_rows).astype(np.int64)
    cum = np.cumsum(nl)
    row_start = np.zeros(n_rows, dtype=np.int64)
    has = total > 0
    first_live = np.searchsorted(o, np.arange(n_rows))
    row_start[has] = (cum - nl)[first_live[has]]
    target = row_start + total // 2
    rows_with = np.flatnonzero(has)
    j = np.searchsorted(cum, target[rows_with], side="right")
    idx = live[j]
    local = target[rows_with] - (cum[j] - nl[j])
    chunk, frag = refs["ref_chunk"][idx], refs["ref_frag"][idx]
    send_exchange(spec.store, _split_by(block_of(spec, chunk), row=rows_with, chunk=chunk,
                                        frag=frag, local=local),
                  spec.target_level, "context_points", bucket)
    return {"lengths": lengths}


def fragment_points(spec: StepSpec, block: int, numbers: np.ndarray, _done=None) -> None:
    """The positions of the midpoint vertices the buckets asked for."""
    requests, chunks = _requested_fragments(spec, block, numbers, "context_points")
    out = {}
    for bucket, req in requests:
        pos = np.empty((req["row"].size, spec.ndim))
        for num in np.unique(req["chunk"]).tolist():
            rows, members, flens = chunks[num]
            sel = np.flatnonzero(req["chunk"] == num)
            starts = np.cumsum(flens) - flens
            pos[sel] = rows[members[starts[req["frag"][sel]] + req["local"][sel]]]
        out[bucket] = {"row": req["row"], "point": pos}
    send_exchange(spec.store, out, spec.target_level, "context_pointvals", block)


def object_points(spec: StepSpec, bucket: int, ctx: dict, _done=None) -> None:
    """Write a bucket's context: lengths and representative points (NaN
    for a row without vertices)."""
    lengths = ctx["lengths"]
    points = np.full((lengths.size, spec.ndim), np.nan)
    for _, p in received(spec, "context_pointvals", bucket):
        points[p["row"]] = p["point"]
    send_exchange(spec.store, {bucket: {"lengths": lengths, "points": points}},
                  spec.target_level, "context", 0)


# ------------------------------------------------------------- stage 1
def bin_partials(spec: StepSpec, block: int, numbers: np.ndarray, partitions: list[int],
                 _refs_done=None) -> dict:
    """Bin every vertex of a block of source chunks.

    Each fragment instance's vertices get its bin key; a fragment's weight
    is the number of kept objects naming it (1 for an implicit object).
    Sends, per partition, the block's distinct keys with float64 partial
    sums and counts — weight-0 keys too, so their vertices can still find
    a parent — and keeps the per-vertex key index for later stages.
    ``partitions`` are the partitions the plan routes this block to (from
    geometry alone); a key outside them is an error.
    """
    bin_arr = np.asarray(spec.bin_shape, dtype=np.float64)
    # Weight of each named fragment: summed over the buckets naming it.
    ref_parts = received(spec, "refs", block) if spec.has_objects else []
    parts = [p for _, p in ref_parts]
    if parts:
        mkeys, inv = np.unique(np.concatenate([_pair_key(p["chunk"], p["frag"]) for p in parts]),
                               return_inverse=True)
        mvals = np.bincount(inv.reshape(-1), weights=np.concatenate([p["mult"] for p in parts]),
                            minlength=mkeys.size).astype(np.int64)
    else:
        mkeys = mvals = np.empty(0, dtype=np.int64)
    # Per chunk only the decode and the gather; the rest is one numpy call
    # per block (a fine grid has tens of thousands of small chunks).
    cids, n_inst, frag_lengths, all_pos = [], [], [], []
    attr_cells = _read_attribute_cells(spec, numbers)
    all_vals: list[list[np.ndarray]] = [[] for _ in spec.vertex_attributes]
    for cid, cc, rows, members, lengths in _read_source_chunks(spec, numbers):
        for i, attr in enumerate(spec.vertex_attributes):
            what = f"{spec.store.describe(attr.source.path)} chunk {fmt.chunk_key(cc)}"
            all_vals[i].append(va.decode_cell(attr, attr_cells[i][cc], rows.shape[0],
                                              what=what)[members])
        cids.append(cid)
        n_inst.append(int(members.size))
        frag_lengths.append(lengths)
        all_pos.append(rows[members])
    cids_a = np.asarray(cids, dtype=np.int64)
    n_frags = np.fromiter((f.size for f in frag_lengths), dtype=np.int64, count=len(cids))
    lengths = np.concatenate(frag_lengths) if cids else np.empty(0, np.int64)
    # Each fragment's chunk and index in it; each instance's fragment.
    frag_chunk = np.repeat(cids_a, n_frags)
    frag_local = np.arange(lengths.size, dtype=np.int64) - np.repeat(np.cumsum(n_frags) - n_frags,
                                                                     n_frags)
    inst_global = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    w_frag = _lookup(mkeys, mvals, _pair_key(frag_chunk, frag_local)) if spec.has_objects \
        else np.ones(lengths.size, dtype=np.int64)
    w = w_frag[inst_global]
    inst_frag = frag_local[inst_global]
    if all_pos:
        pos = np.concatenate(all_pos).astype(np.float32, copy=False)
    else:
        pos = np.empty((0, spec.ndim), dtype=np.float32)
    keys = np.floor(pos / bin_arr).astype(np.int64)
    if keys.shape[0]:
        # Any order of the distinct keys will do here (write_metavertices
        # sorts them by bytes); one int64 per key sorts far faster than rows.
        _, first, inverse = np.unique(row_ids(keys), return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        ukeys = keys[first]
    else:
        ukeys = np.empty((0, spec.ndim), dtype=np.int64)
        inverse = np.empty(0, dtype=np.int64)
    n_u = ukeys.shape[0]
    sums = np.empty((n_u, spec.ndim), dtype=np.float64)
    wf = w.astype(np.float64)
    for a in range(spec.ndim):
        sums[:, a] = np.bincount(inverse, weights=pos[:, a].astype(np.float64) * wf, minlength=n_u)
    counts = np.bincount(inverse, weights=w, minlength=n_u).astype(np.int64)
    part = _partition_of(spec, ukeys)
    stray = ~np.isin(part, np.asarray(partitions, dtype=np.int64))
    if stray.any():
        bad = int(np.flatnonzero(stray)[0])
        raise fmt.FormatError(
            f"{spec.store.describe(spec.vertices.path)}: block {block} has a vertex in bin "
            f"{ukeys[bad].tolist()}, outside the chunks it is stored in (more than one target "
            f"chunk away); the level's chunk assignment is inconsistent")
    # Position of each unique key inside the part sent to its partition.
    order = np.argsort(part, kind="stable")
    slot = np.empty(n_u, dtype=np.int64)
    if n_u:
        sp = part[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
        first = np.repeat(starts, np.diff(np.r_[starts, n_u]))
        slot[order] = np.arange(n_u) - first
    columns = {"keys": ukeys, "sums": sums, "counts": counts}
    pair_parts: list[tuple[int, dict]] = []
    for i, attr in enumerate(spec.vertex_attributes):
        what = spec.store.describe(attr.source.path)
        vals = va.concat_rows(attr, all_vals[i], what=what).astype(np.dtype(attr.dtype),
                                                                   copy=False)
        per_key, pairs = va.partials(attr, vals, w, inverse, n_u)
        columns.update({f"va{i}:{k}": v for k, v in per_key.items()})
        if pairs:
            # Histogram entries go to their key's partition, naming the
            # key by its slot in the part sent there.
            pk = pairs.pop("pk")
            pair_parts.append((i, _split_by(part[pk], pk=slot[pk], **pairs)))
    exchange = _split_by(part, **columns)
    for i, routed in pair_parts:
        for p, cols in routed.items():
            exchange[p].update({f"va{i}:{k}": v for k, v in cols.items()})
    # Instances in the reference's flat order: chunk by chunk, each chunk's
    # fragments in order; per chunk its id and instance count.
    state = {"chunk_ids": cids_a, "chunk_instances": np.asarray(n_inst, dtype=np.int64),
             "inst_frag": inst_frag, "inverse": inverse, "partition": part, "slot": slot,
             "ref_parts": ref_parts}
    return {"exchange": exchange, "state": state}


def pick(result: dict, *path):
    for p in path:
        result = result.get(p) if isinstance(result, dict) else None
        if result is None:
            return None
    return result


# ------------------------------------------------------------- stage 2
def reduce_metavertices(spec: StepSpec, partition: int, sources: list[int], *parts: dict) -> dict:
    """Sum the partials of one partition into metavertices (centroid, count)
    and route each to the target block of the chunk its centroid falls in."""
    # Planned routes are a superset of the real ones: drop empty senders.
    sources = [s_ for s_, p in zip(sources, parts) if p is not None]
    parts = tuple(p for p in parts if p is not None)
    keys = np.concatenate([p["keys"] for p in parts]) if parts else np.empty((0, spec.ndim), np.int64)
    sums = np.concatenate([p["sums"] for p in parts]) if parts else np.empty((0, spec.ndim))
    counts = np.concatenate([p["counts"] for p in parts]) if parts else np.empty(0, np.int64)
    if keys.shape[0]:
        # Metavertex ids are internal to the partition: any key order works.
        _, first, inv = np.unique(row_ids(keys), return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        ukeys = keys[first]
    else:
        ukeys, inv = keys, np.empty(0, np.int64)
    n_u = ukeys.shape[0]
    total = np.bincount(inv, weights=counts, minlength=n_u).astype(np.int64)
    centroid = np.empty((n_u, spec.ndim), dtype=np.float32)
    for a in range(spec.ndim):
        centroid[:, a] = np.bincount(inv, weights=sums[:, a], minlength=n_u) / np.maximum(total, 1)
    exists = np.flatnonzero(total > 0)
    chunks = np.floor(centroid[exists] / np.asarray(spec.chunk_shape, dtype=np.float64)).astype(np.int64)
    tb = _target_block(spec, chunks)
    offsets = np.cumsum([0] + [p["keys"].shape[0] for p in parts])
    attrs = {}
    for i, attr in enumerate(spec.vertex_attributes):
        pre = f"va{i}:"
        per_key = [{k[len(pre):]: v for k, v in p.items() if k.startswith(pre) and
                    not k.startswith(pre + "p")} for p in parts]
        pairs = [{k[len(pre):]: v for k, v in p.items() if k.startswith(pre + "p")}
                 for p in parts]
        rows = [np.arange(offsets[j], offsets[j + 1]) for j in range(len(parts))]
        vals = va.reduce(attr, per_key, pairs, rows, inv, n_u, total,
                         what=f"{spec.store.describe(attr.source.path)} (partition {partition})")
        attrs[f"va{i}"] = vals[exists]
    out = _split_by(tb, mv=exists, chunk=chunks, key=ukeys[exists], centroid=centroid[exists],
                    **attrs)
    return {"to_target": out, "inverse": inv, "n_unique": n_u,
            "source_slices": {s: (int(offsets[i]), int(offsets[i + 1])) for i, s in enumerate(sources)}}


# ------------------------------------------------------------- stage 3
def write_metavertices(spec: StepSpec, target_block: int, partitions: list[int], *parts: dict) -> dict:
    """Order one target block's metavertices as the reference does (within
    a chunk, by the raw bytes of their bin keys), write their ``vertices``
    and ``vertex_fragments`` cells, and report where each one landed."""
    partitions = [p for p, part in zip(partitions, parts) if part is not None]
    parts = tuple(part for part in parts if part is not None)
    if not parts:
        return {"chunks": [], "located": {}}
    chunk = np.concatenate([p["chunk"] for p in parts])
    key = np.concatenate([p["key"] for p in parts])
    centroid = np.concatenate([p["centroid"] for p in parts])
    attr_vals = [va.concat_rows(a, [p[f"va{i}"] for p in parts],
                            what=f"{spec.store.describe(a.source.path)} (target block "
                                 f"{target_block})").astype(np.dtype(a.out_dtype), copy=False)
                 for i, a in enumerate(spec.vertex_attributes)]
    src = np.concatenate([np.full(p["chunk"].shape[0], i) for i, p in enumerate(parts)])
    # Sort by chunk (numeric), then by key bytes inside each chunk.
    _, key_rank = np.unique(_void(key), return_inverse=True)
    order = np.lexsort(np.vstack([key_rank.reshape(-1), chunk.T[::-1]]))
    chunk, centroid = chunk[order], centroid[order]
    attr_vals = [v[order] for v in attr_vals]
    cuts = np.flatnonzero(np.any(np.diff(chunk, axis=0) != 0, axis=1)) + 1 if chunk.shape[0] > 1 \
        else np.empty(0, dtype=np.int64)
    starts, stops = np.r_[0, cuts], np.r_[cuts, chunk.shape[0]]
    frag = np.empty(chunk.shape[0], dtype=np.int64)
    cells: dict[tuple[str, tuple], bytes] = {}
    written = []
    for lo, hi in zip(starts.tolist(), stops.tolist()):
        cc = tuple(int(c) for c in chunk[lo])
        frag[lo:hi] = np.arange(hi - lo)
        v, f = fmt.encode_metavertex_cell(centroid[lo:hi])
        cells[(f"{spec.target_level}/{fmt.VERTICES}", cc)] = fmt.frame_cell(v)
        cells[(f"{spec.target_level}/{fmt.VERTEX_FRAGMENTS}", cc)] = fmt.frame_cell(f)
        for a, vals in zip(spec.vertex_attributes, attr_vals):
            # One row per metavertex, in the vertices cell's order.
            cells[(f"{spec.target_level}/{a.path_in_level}", cc)] = \
                fmt.frame_cell(np.ascontiguousarray(vals[lo:hi]).tobytes())
        written.append((cc, hi - lo))
    # The level is published at commit.
    put_cells(spec.store, cells, origin=spec.target_origin,
              route=route_to(spec.shard_routes, spec.target_level), sender=f"v{target_block}")
    # Back to each partition, aligned with the part it sent.
    unsorted_frag = np.empty_like(frag)
    unsorted_frag[order] = frag
    unsorted_chunk = np.empty_like(chunk)
    unsorted_chunk[order] = chunk
    located = {}
    for i, (p, part) in enumerate(zip(partitions, parts)):
        sel = src == i
        located[p] = {"mv": part["mv"], "chunk": unsorted_chunk[sel], "frag": unsorted_frag[sel]}
    return {"chunks": written, "located": located,
            "widths": {a.name: int(v.shape[1]) for a, v in zip(spec.vertex_attributes, attr_vals)}}


# ------------------------------------------------------------- stage 4
def resolve_parents(spec: StepSpec, partition: int, reduced: dict, *located: dict | None) -> dict:
    """Answer every source block that asked this partition: for each of
    its keys, the (chunk, fragment) of the metavertex with that key, or
    fragment -1 when no kept vertex made one."""
    n_u = reduced["n_unique"]
    loc_chunk = np.zeros((n_u, spec.ndim), dtype=np.int64)
    loc_frag = np.full(n_u, -1, dtype=np.int64)
    for part in located:
        if part is None:
            continue
        loc_chunk[part["mv"]] = part["chunk"]
        loc_frag[part["mv"]] = part["frag"]
    inv = reduced["inverse"]
    out = {}
    for s, (lo, hi) in reduced["source_slices"].items():
        sel = inv[lo:hi]
        out[s] = {"chunk": loc_chunk[sel], "frag": loc_frag[sel]}
    return out


# ------------------------------------------------------------- stage 5
def row_ids(rows: np.ndarray) -> np.ndarray:
    """One int64 per row of small int coordinates, equal iff the rows are
    equal: 1-D keys sort and group far faster than ``unique(axis=0)``."""
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    return _linear_key([rows[:, j] for j in range(rows.shape[1])])


def _linear_key(columns: list[np.ndarray]) -> np.ndarray:
    """Mixed-radix number of each row of int columns (row-major over their
    bounding box); falls back to ranks when the box exceeds int64."""
    lows = [int(c.min()) for c in columns]
    spans = [int(c.max()) - lo + 1 for c, lo in zip(columns, lows)]
    if float(np.prod(np.asarray(spans, dtype=np.float64))) >= 2.0 ** 62:
        stacked = np.stack(columns, axis=1)
        return np.unique(stacked, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    key = columns[0] - lows[0]
    for c, lo, span in zip(columns[1:], lows[1:], spans[1:]):
        key = key * span + (c - lo)
    return np.asarray(key, dtype=np.int64)


def _anchor(chunks: np.ndarray, scale_own, scale_other) -> np.ndarray:
    """Chunk of the other level's grid a chunk's links are anchored at:
    ``floor(c * r_own / r_other)`` per axis (a multiply when it divides)."""
    out = np.empty_like(chunks)
    for j, (ro, rt) in enumerate(zip(scale_own, scale_other)):
        ro, rt = int(ro), int(rt)
        out[:, j] = chunks[:, j] * (ro // rt) if ro % rt == 0 else (chunks[:, j] * ro) // rt
    return out


@dataclass
class LinkCells:
    """Link records of one family grouped into cells: cell ``i`` holds
    ``rows[bounds[i]:bounds[i + 1]]`` ([own vertex, other vertex]) and is
    keyed by its own ``chunk[i]`` and the other end's chunk minus that
    chunk's anchor, ``offset[i]`` (which names the segment array)."""
    rows: np.ndarray
    bounds: np.ndarray
    chunk: np.ndarray
    offset: np.ndarray

    def mirrored(self, scale_own, scale_other) -> "LinkCells":
        """The same cells seen from the other end (the ``-delta`` family of a
        ``+delta`` one).  A cell's records share both chunks, so each cell
        maps to exactly one mirror cell; its rows keep their order (by own
        vertex), which is the reference's order for the mirror too."""
        other = _anchor(self.chunk, scale_own, scale_other) + self.offset
        back = self.chunk - _anchor(other, scale_other, scale_own)
        return LinkCells(np.ascontiguousarray(self.rows[:, ::-1]), self.bounds, other, back)


def _partition_links(src_chunks, src_vi, trg_chunks, trg_vi, scale_src, scale_trg) -> LinkCells:
    """Group link records into cells: by (source chunk, target chunk's
    offset from the source's anchor), input order kept inside a cell (the
    reference's layout)."""
    src_chunks = np.asarray(src_chunks, dtype=np.int64)
    n = src_chunks.shape[0]
    d = src_chunks.shape[1] if src_chunks.ndim == 2 else 0
    if n == 0:
        return LinkCells(np.empty((0, 2), np.int64), np.zeros(1, np.int64),
                         np.empty((0, d), np.int64), np.empty((0, d), np.int64))
    offsets = np.asarray(trg_chunks, dtype=np.int64) - _anchor(src_chunks, scale_src, scale_trg)
    gid = _linear_key([src_chunks[:, j] for j in range(d)] + [offsets[:, j] for j in range(d)])
    rows = np.stack([np.asarray(src_vi, dtype=np.int64), np.asarray(trg_vi, dtype=np.int64)],
                    axis=1)
    # Records usually arrive grouped already: then skip the sort.
    if not np.all(gid[1:] >= gid[:-1]):
        order = np.argsort(gid, kind="stable")
        gid, rows, src_chunks, offsets = gid[order], rows[order], src_chunks[order], offsets[order]
    starts = np.flatnonzero(np.r_[True, gid[1:] != gid[:-1]])
    return LinkCells(rows, np.r_[starts, n], src_chunks[starts], offsets[starts])


def write_link_cells(store: Store, level: int, delta: int, origin, links: LinkCells, *,
                     route: ShardRoute | None = None, sender: str = "") -> dict:
    """Write link cells; returns ``{offset string: [(chunk, n_records)]}``.
    ``sender`` names the calling task (unique per call) when ``route``
    sends the cells on to their shards."""
    from zarr_vectors.spatial.boundary import format_offsets
    fam = fmt.links_family_path(level, delta)
    bounds = links.bounds.tolist()
    payloads = fmt.framed_link_cells(links.rows, bounds[:-1], bounds[1:])
    segs: dict[tuple, str] = {}
    cells, written = {}, {}
    for chunk, off, a, b, payload in zip(map(tuple, links.chunk.tolist()),
                                         map(tuple, links.offset.tolist()),
                                         bounds[:-1], bounds[1:], payloads):
        seg = segs.get(off)
        if seg is None:
            seg = segs[off] = format_offsets((off,))
        cells[(f"{fam}/{seg}", chunk)] = payload
        written.setdefault(seg, []).append((chunk, b - a))
    # The family is published at commit.
    put_cells(store, cells, origin=origin, route=route, sender=sender)
    return written


def links_and_sequences(spec: StepSpec, block: int, partials: dict,
                        *answers: dict | None) -> dict:
    """Per source block, once every key has its metavertex:

    * ``+1`` link records (fine vertex -> parent metavertex) written as cells,
      and (explicit) their ``-1`` mirror cells at the coarse level: a
      ``-1`` cell's records all come from one fine chunk, so the block
      owning that chunk holds all of them;
    * per named fragment, its metavertex sequence (consecutive repeats
      dropped) routed to the manifest buckets that name it.
    """
    state = partials["state"]
    ref_parts = state["ref_parts"]
    n_u = state["partition"].shape[0]
    loc_chunk = np.zeros((n_u, spec.ndim), dtype=np.int64)
    loc_frag = np.full(n_u, -1, dtype=np.int64)
    by_part: dict[int, np.ndarray] = {}
    for p in np.unique(state["partition"]).tolist():
        by_part[p] = np.flatnonzero(state["partition"] == p)
    for ans in answers:
        if ans is None:
            continue
        p = ans["partition"]
        idx = by_part[p]
        slots = state["slot"][idx]
        loc_chunk[idx] = ans["chunk"][slots]
        loc_frag[idx] = ans["frag"][slots]
    inverse = state["inverse"]
    par_chunk, par_frag = loc_chunk[inverse], loc_frag[inverse]
    result: dict[str, Any] = {"plus": {}, "minus": {}, "sequences": []}
    # Instance order within a chunk is the reference's "flat" vertex order.
    sizes = state["chunk_instances"]
    inst_chunk = np.repeat(state["chunk_ids"], sizes)
    inst_local = np.arange(inst_chunk.size, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes,
                                                                        sizes)
    if spec.links != "none":
        ok = par_frag >= 0
        fine_cc = chunk_coords(spec, inst_chunk[ok])
        links = _partition_links(fine_cc, inst_local[ok], par_chunk[ok], par_frag[ok],
                                 spec.scale_source, spec.scale_target)
        result["plus"] = write_link_cells(
            spec.store, spec.source_level, +1, spec.source_origin, links,
            route=route_to(spec.shard_routes, spec.source_level), sender=f"l{block}+")
        if spec.links == "explicit":
            result["minus"] = write_link_cells(
                spec.store, spec.target_level, -1, spec.target_origin,
                links.mirrored(spec.scale_source, spec.scale_target),
                route=route_to(spec.shard_routes, spec.target_level), sender=f"l{block}-")
    if spec.has_objects and ref_parts:
        # Instances are grouped by fragment, chunks and fragments ascending,
        # so the pair keys of the flat order are sorted.
        inst_key = _pair_key(inst_chunk, state["inst_frag"])
        # A fragment's metavertex sequence drops consecutive repeats.
        same = np.zeros(inst_key.size, dtype=bool)
        same[1:] = (inst_key[1:] == inst_key[:-1]) & (par_frag[1:] == par_frag[:-1]) & \
            np.all(par_chunk[1:] == par_chunk[:-1], axis=1)
        kept_pos = np.flatnonzero(~same)
        kept_key = inst_key[kept_pos]
        sequences = {}
        for bucket, part in ref_parts:
            want = _pair_key(part["chunk"], part["frag"])
            lo = np.searchsorted(kept_key, want, side="left")
            n = np.searchsorted(kept_key, want, side="right") - lo  # 0: missing or empty
            idx = kept_pos[fmt.expand_ranges(lo, n)]
            sequences[bucket] = {
                "chunk": part["chunk"], "frag": part["frag"], "ptr": np.r_[0, np.cumsum(n)],
                "seq_chunk": par_chunk[idx], "seq_frag": par_frag[idx]}
        send_exchange(spec.store, sequences, spec.target_level, "sequences", block)
        result["sequences"] = sorted(sequences)
    return result


def answer_for(resolved: dict, block: int, partition: int) -> dict | None:
    ans = resolved.get(block)
    return None if ans is None else {"partition": partition, **ans}


# ------------------------------------------------------------- stage 7
def write_manifests(spec: StepSpec, bucket: int, refs: dict, target_rows: tuple[int, int],
                    _sequences_done=None) -> int:
    """Assemble and write one bucket of the coarse level's object_index
    manifests; returns how many rows are non-empty."""
    parts = [p for _, p in received(spec, "sequences", bucket)]
    # Every named fragment's metavertex sequence, as a slice of seq_*.
    seq_c = np.concatenate([p["seq_chunk"] for p in parts]) if parts else \
        np.empty((0, spec.ndim), np.int64)
    seq_f = np.concatenate([p["seq_frag"] for p in parts]) if parts else np.empty(0, np.int64)
    base = np.cumsum([0] + [int(p["ptr"][-1]) for p in parts])
    frag_key = np.concatenate([_pair_key(p["chunk"], p["frag"]) for p in parts]) if parts else \
        np.empty(0, np.int64)
    frag_start = np.concatenate([p["ptr"][:-1] + base[i] for i, p in enumerate(parts)]) if parts \
        else np.empty(0, np.int64)
    frag_len = np.concatenate([np.diff(p["ptr"]) for p in parts]) if parts else np.empty(0, np.int64)
    order = np.argsort(frag_key, kind="stable")
    frag_key, frag_start, frag_len = frag_key[order], frag_start[order], frag_len[order]
    # Each kept object's references, in manifest order, expanded to the
    # metavertex sequences of their fragments (missing fragments: none).
    kept, counts = refs["kept"], refs["counts"]
    ref_key = _pair_key(refs["ref_chunk"], refs["ref_frag"])
    n_ref = _lookup(frag_key, frag_len, ref_key)
    start = _lookup(frag_key, frag_start, ref_key)
    entry = fmt.expand_ranges(start, n_ref)
    owner = np.repeat(np.repeat(np.arange(counts.size), counts), n_ref)
    ec, ef = seq_c[entry], seq_f[entry]
    # Metavertices shared by consecutive fragments appear once.
    keep = np.ones(entry.size, dtype=bool)
    keep[1:] = (owner[1:] != owner[:-1]) | (ef[1:] != ef[:-1]) | np.any(ec[1:] != ec[:-1], axis=1)
    row_counts = np.zeros(kept.size, dtype=np.int64)
    row_counts[np.flatnonzero(kept)] = np.bincount(owner[keep], minlength=counts.size)
    blobs = fmt.encode_manifest_table(fmt.ManifestTable(row_counts, ec[keep], ef[keep]), spec.ndim)
    import zarr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(spec.store.zarr_store(),
                              path=f"{spec.target_level}/{fmt.OBJECT_INDEX}/manifests", mode="r+")
        obj = np.empty(len(blobs), dtype=object)
        obj[:] = blobs
        arr[target_rows[0]:target_rows[1]] = obj
    return int(np.count_nonzero(row_counts))


# ------------------------------------------------------------- stage 8
def write_attributes(spec: StepSpec, name: str, bucket: int, _objects_done=None) -> None:
    """Copy the kept rows of one object-attribute bucket; the rest become
    the column's fill value (absent)."""
    import zarr
    (mine,) = read_exchange(spec.store, [fmt.exchange_key(spec.target_level, "keep", bucket, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = spec.store.zarr_store()
        src = zarr.open_array(zs, path=f"{spec.source_level}/{fmt.OBJECT_ATTRIBUTES}/{name}",
                              mode="r")
        dst = zarr.open_array(zs, path=f"{spec.target_level}/{fmt.OBJECT_ATTRIBUTES}/{name}",
                              mode="r+")
        lo = bucket * fmt.ATTRIBUTE_BUCKET
        hi = min(lo + fmt.ATTRIBUTE_BUCKET, src.shape[0])
        path = f"{spec.source_level}/{fmt.OBJECT_ATTRIBUTES}/{name}"
        data = np.asarray(fmt.read_rows_checked(spec.store, src, path, lo, hi)) if hi > lo \
            else np.empty((0, *src.shape[1:]), src.dtype)
        out = np.zeros_like(data)
        k = mine["kept"][: data.shape[0]]
        out[k] = data[k]
        out[~k] = dst.fill_value
        dst[lo:hi] = out


# ------------------------------------------------------------- stage 9
def level_summary(spec: StepSpec, objects_kept: int | None, n_vertex_writers: int,
                  n_link_writers: int, n_manifest_writers: int, *results) -> dict:
    """Reduce the writers' bookkeeping on the cluster (chunk lists, link
    cells, present rows) into the coarse level's array documents, written
    by the commit module, and return only counts to the driver.

    ``results``: the vertex writers', then the link writers', then the
    manifest writers' results (then the attribute writers', waited for only)."""
    from . import commit as cm
    writes = results[:n_vertex_writers]
    links = results[n_vertex_writers:n_vertex_writers + n_link_writers]
    at = n_vertex_writers + n_link_writers
    present = results[at:at + n_manifest_writers]
    vertex_chunks = sorted(c for w in writes for c in (w or {}).get("chunks", []))
    n_meta = int(sum(n for _, n in vertex_chunks))
    families = []
    if spec.links != "none":
        plus = cm.LinkFamily(spec.source_level, +1, spec.source_origin, spec.source_grid_shape,
                             shard_shape=spec.shard_shape)
        minus = cm.LinkFamily(spec.target_level, -1, spec.target_origin, spec.target_grid_shape,
                              shard_shape=spec.shard_shape)
        for r in links:
            plus.add(r["plus"])
            minus.add(r["minus"])
        families = [plus] + ([minus] if spec.links == "explicit" else [])
    vertex_attrs = {}
    for a in spec.vertex_attributes:
        widths = {w["widths"][a.name] for w in writes if w and w.get("widths")}
        if len(widths) > 1:
            raise fmt.FormatError(f"{spec.store.describe(a.source.path)}: per-vertex attribute "
                                  f"rows of {sorted(widths)} columns in different chunks")
        if widths:
            vertex_attrs[a.name] = va.array_attributes(a, widths.pop())
    if n_meta:
        cm.write_level_arrays(spec.store, spec.target_level, spec.target_origin,
                              spec.target_grid_shape, vertex_chunks, families, sid_ndim=spec.ndim,
                              vertex_attributes=vertex_attrs, shard_shape=spec.shard_shape)
    return {"vertex_count": n_meta, "chunks": len(vertex_chunks), "objects_kept": objects_kept,
            "num_present": int(sum(present)),
            "links": sum(f.num_links for f in families),
            "vertex_attributes": sorted(vertex_attrs) if n_meta else []}
