"""Stage 5: the ``+1`` link cells (and ``-1`` mirrors) and the per-fragment
metavertex sequences for the manifests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..format import codecs as cdc
from ..format import naming as nm
from ..errors import FormatError
from ..storage.store import Store
from .cells import ShardRoute, put_cells, route_to
from .exchange import received, send_exchange
from .spec import StepSpec, _pair_key, _read_fragment_lengths, chunk_coords
from .vertices import OLD_PARENT

__all__ = ["LinkCells", "partition_links", "distinct_rows", "write_link_cells",
           "links_and_sequences", "send_sequences", "old_parents", "old_sequences",
           "answer_for"]


# ------------------------------------------------------------- stage 5
def _row_ids(rows: np.ndarray, lows: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """One int64 per row of small int coordinates (their bounding box
    ``lows``/``spans``), equal iff the rows are equal and ordered as the
    rows are: 1-D keys sort and group far faster than ``unique(axis=0)``."""
    if float(np.prod(spans.astype(np.float64))) >= 2.0 ** 62:
        return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return _linear_key(rows, lows, spans)


def _box(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower corner and extent of the rows' bounding box (column by column:
    numpy reduces a narrow array along axis 0 ~9x slower)."""
    lows = np.asarray([rows[:, j].min() for j in range(rows.shape[1])], dtype=np.int64)
    highs = np.asarray([rows[:, j].max() for j in range(rows.shape[1])], dtype=np.int64)
    return lows, highs - lows + 1


def _linear_key(rows: np.ndarray, lows: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Mixed-radix number of each row (row-major over the box
    ``lows``/``spans``, which must fit an int64)."""
    key = rows[:, 0] - lows[0]
    for j in range(1, rows.shape[1]):
        key = key * int(spans[j]) + (rows[:, j] - lows[j])
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


def partition_links(owner, owner_chunks, src_vi, target, target_chunks, trg_vi, scale_src,
                    scale_trg) -> LinkCells:
    """Group link records into cells: by (source chunk, target chunk's
    offset from the source's anchor), cells in row-major order of those,
    input order kept inside a cell (the reference's layout).  Record ``i``
    starts in chunk ``owner_chunks[owner[i]]`` and ends in chunk
    ``target_chunks[target[i]]``: the callers' records come grouped by a
    few source chunks and point into a few target chunks, so anchors and
    offsets are computed per chunk (or per cell), and each record's group
    key is one multiply-add of two chunk ranks."""
    owner = np.asarray(owner, dtype=np.int64)
    n = owner.size
    owner_chunks = np.asarray(owner_chunks, dtype=np.int64)
    d = owner_chunks.shape[1] if owner_chunks.ndim == 2 else 0
    if n == 0:
        return LinkCells(np.empty((0, 2), np.int64), np.zeros(1, np.int64),
                         np.empty((0, d), np.int64), np.empty((0, d), np.int64))
    target = np.asarray(target, dtype=np.int64)
    target_chunks = np.asarray(target_chunks, dtype=np.int64).reshape(-1, d)
    # Chunks' ranks in row-major order (equal chunks, equal rank).  For one
    # source chunk the anchor is fixed, so the offsets' row-major order is
    # the target chunks' one: (source rank, target rank) orders the cells
    # as (source chunk, offset) does.
    rank = distinct_rows(owner_chunks)[1]
    trank = distinct_rows(target_chunks)[1]
    group = _dense_ranks(rank[owner] * (int(trank.max()) + 1) + trank[target])
    counts = np.bincount(group)
    starts = (np.cumsum(counts) - counts)[counts > 0]
    rows = np.empty((n, 2), dtype=np.int64)
    # Records usually arrive grouped already: then skip the sort.
    if np.all(group[1:] >= group[:-1]):
        rows[:, 0], rows[:, 1] = src_vi, trg_vi
        first = starts
    else:
        order = np.argsort(group, kind="stable")  # by radix when 16-bit
        np.take(np.asarray(src_vi, dtype=np.int64), order, out=rows[:, 0])
        np.take(np.asarray(trg_vi, dtype=np.int64), order, out=rows[:, 1])
        first = order[starts]  # a cell's first record, as given
    own = owner[first]
    offsets = target_chunks[target[first]] - _anchor(owner_chunks[own], scale_src, scale_trg)
    return LinkCells(rows, np.r_[starts, n], owner_chunks[own], offsets)


def _dense_ranks(ids: np.ndarray) -> np.ndarray:
    """Ids renumbered in their order, gaps allowed, as uint16 when they fit:
    numpy's stable sort of a 16-bit array is a radix sort, ~2.5x faster
    here than the merge sort it uses for int64."""
    lo, hi = int(ids.min()), int(ids.max())
    if hi - lo < (1 << 16):
        return (ids - lo).astype(np.uint16)
    inverse = distinct_rows(ids.reshape(-1, 1))[1]
    return inverse.astype(np.uint16) if inverse.size and int(inverse.max()) < (1 << 16) \
        else inverse


def distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(distinct, inverse)``: the distinct rows of small int coordinates,
    in order, and each row's number among them -- ``np.unique(rows,
    axis=0, return_inverse=True)`` -- by counting instead of sorting when
    their bounding box is small (chunk coordinates of one level, a block's
    bin keys): the distinct rows are then the box's occupied cells, found
    without a per-row scatter."""
    rows = np.asarray(rows, dtype=np.int64)
    n = rows.shape[0]
    if n == 0:
        return rows, np.empty(0, np.int64)
    lows, spans = _box(rows)
    box = float(np.prod(spans.astype(np.float64)))
    if box > 4 * n + (1 << 20):
        _, one, inverse = np.unique(_row_ids(rows, lows, spans), return_index=True,
                                    return_inverse=True)
        return rows[one], inverse.reshape(-1)
    ids = _linear_key(rows, lows, spans)
    present = np.zeros(int(box), dtype=bool)
    present[ids] = True
    inverse = (np.cumsum(present) - 1)[ids]
    cells = np.unravel_index(np.flatnonzero(present), tuple(spans.tolist()))
    return np.stack(cells, axis=1) + lows, inverse


def write_link_cells(store: Store, level: int, delta: int, origin, links: LinkCells, *,
                     route: ShardRoute | None = None, sender: str = "") -> dict:
    """Write link cells; returns ``{offset string: [(chunk, n_records)]}``.
    ``sender`` names the calling task (unique per call) when ``route``
    sends the cells on to their shards."""
    from zarr_vectors.spatial.boundary import format_offsets
    fam = nm.links_family_path(level, delta)
    bounds = links.bounds.tolist()
    payloads = cdc.framed_link_cells(links.rows, bounds[:-1], bounds[1:])
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


def links_and_sequences(spec: StepSpec, block: int, partials: dict, region,
                        *answers: dict | None) -> dict:
    """Per source block, once every key has its metavertex:

    * ``+1`` link records (fine vertex -> parent metavertex) written as cells,
      and (explicit) their ``-1`` mirror cells at the coarse level: a
      ``-1`` cell's records all come from one fine chunk, so the block
      owning that chunk holds all of them;
    * per named fragment, its metavertex sequence (consecutive repeats
      dropped) routed to the manifest buckets that name it.

    ``region`` (a ``StepRegion``): cells are written into its target
    chunks only; keys homed elsewhere keep the parents their old ``+1``
    cells give, for the sequences.
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
    # Per instance its metavertex's key index; chunks stay per key.
    inverse = state["inverse"]
    par_frag = loc_frag[inverse]
    result: dict[str, Any] = {"plus": {}, "minus": {}, "sequences": []}
    # Instance order within a chunk is the reference's "flat" vertex order.
    sizes = state["chunk_instances"]
    inst_chunk = np.repeat(state["chunk_ids"], sizes)
    inst_local = np.arange(inst_chunk.size, dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes,
                                                                        sizes)
    if spec.links != "none":
        ok = par_frag >= 0
        chunk_ids = state["chunk_ids"]
        owner = np.repeat(np.arange(chunk_ids.size, dtype=np.int64), sizes)[ok]
        links = partition_links(owner, chunk_coords(spec, chunk_ids), inst_local[ok],
                                inverse[ok], loc_chunk, par_frag[ok], spec.scale_source,
                                spec.scale_target)
        result["plus"] = write_link_cells(
            spec.store, spec.source_level, +1, spec.source_origin, links,
            route=route_to(spec.shard_routes, spec.source_level), sender=f"l{block}+")
        if spec.links == "explicit":
            result["minus"] = write_link_cells(
                spec.store, spec.target_level, -1, spec.target_origin,
                links.mirrored(spec.scale_source, spec.scale_target),
                route=route_to(spec.shard_routes, spec.target_level), sender=f"l{block}-")
    if spec.has_objects and ref_parts:
        if region is not None and np.any(loc_frag == OLD_PARENT):
            _old_parents_of_keys(spec, region, state, loc_chunk, loc_frag)
            par_frag = loc_frag[inverse]
        # A fragment's metavertex sequence drops consecutive repeats (equal
        # chunks have equal ranks).
        chunks, rank = distinct_rows(loc_chunk)
        result["sequences"] = send_sequences(
            spec, block, _pair_key(inst_chunk, state["inst_frag"]), rank[inverse], par_frag,
            chunks, ref_parts)
    return result


def send_sequences(spec: StepSpec, sender: int, inst_key, par_rank, par_frag, chunk_table,
                   ref_parts) -> list[int]:
    """Send each manifest bucket the metavertex sequences of the fragments
    it names (``ref_parts``: ``[(bucket, {"chunk", "frag"})]``), given
    every instance's pair key (grouped by fragment, chunks and fragments
    ascending: sorted), its parent's fragment and chunk as a row of
    ``chunk_table`` (distinct chunks; one int per entry travels, not
    its coordinates).  Returns the buckets."""
    same = np.zeros(inst_key.size, dtype=bool)
    same[1:] = (inst_key[1:] == inst_key[:-1]) & (par_frag[1:] == par_frag[:-1]) & \
        (par_rank[1:] == par_rank[:-1])
    kept_pos = np.flatnonzero(~same)
    kept_key = inst_key[kept_pos]
    sequences = {}
    for bucket, part in ref_parts:
        want = _pair_key(part["chunk"], part["frag"])
        lo = np.searchsorted(kept_key, want, side="left")
        n = np.searchsorted(kept_key, want, side="right") - lo  # 0: missing or empty
        idx = kept_pos[cdc.expand_ranges(lo, n)]
        sequences[bucket] = {
            "chunk": part["chunk"], "frag": part["frag"], "ptr": np.r_[0, np.cumsum(n)],
            "seq_chunk": par_rank[idx], "seq_frag": par_frag[idx], "chunk_table": chunk_table}
    send_exchange(spec.store, sequences, spec.target_level, "sequences", sender)
    return sorted(sequences)


# ------------------------------------------------- a region's old parents
def old_parents(spec: StepSpec, region, chunk_ids: np.ndarray,
                sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each instance's parent (chunk, fragment) as the source level's
    ``+1`` cells into chunks outside ``region``'s targets say it (a
    region refresh never rewrites those); fragment -1 where none does.
    Instances are the chunks' flat order, ``sizes`` per chunk."""
    fam = nm.links_family_path(spec.source_level, +1)
    segs = [s for s in spec.store.listdir(fam) if s != "zarr.json"]
    offsets = np.asarray([nm.parse_chunk_key(s) for s in segs],
                         dtype=np.int64).reshape(len(segs), spec.ndim)
    coords = chunk_coords(spec, chunk_ids)
    anchors = _anchor(coords, spec.scale_source, spec.scale_target)
    cells = []
    for i, cc in enumerate(coords.tolist()):
        targets = anchors[i] + offsets
        outside = ~region.has_target(spec, targets)
        for seg, target, out in zip(segs, targets, outside):
            if out:  # a cell into a target is rewritten by this refresh
                cells.append((i, target, nm.cell_path(f"{fam}/{seg}", cc, spec.source_origin)))
    raw = spec.store.get_many([k for _, _, k in cells])
    base = np.cumsum(sizes) - sizes
    par_chunk = np.zeros((int(np.sum(sizes)), spec.ndim), dtype=np.int64)
    par_frag = np.full(int(np.sum(sizes)), -1, dtype=np.int64)
    for i, target, key in cells:
        if raw[key] is None:
            continue
        rec = cdc.decode_link_cell(cdc.unframe_cell(raw[key], what=spec.store.describe(key)))
        inst = base[i] + rec[:, 0]
        par_chunk[inst] = target
        par_frag[inst] = rec[:, 1]
    return par_chunk, par_frag


def _old_parents_of_keys(spec: StepSpec, region, state: dict, loc_chunk, loc_frag) -> None:
    """Fill the keys homed outside the region (``OLD_PARENT``) with the
    parent their instances' old ``+1`` records give (one metavertex per
    key: any instance will do)."""
    inverse = state["inverse"]
    pc, pf = old_parents(spec, region, state["chunk_ids"], state["chunk_instances"])
    one = np.empty(loc_frag.size, dtype=np.int64)
    one[inverse] = np.arange(inverse.size, dtype=np.int64)
    keys = np.flatnonzero(loc_frag == OLD_PARENT)
    loc_chunk[keys] = pc[one[keys]]
    loc_frag[keys] = pf[one[keys]]
    if np.any(loc_frag[keys] < 0):
        raise FormatError(f"{spec.store.describe(nm.links_family_path(spec.source_level, 1))}: "
                          f"a vertex outside the refreshed region has no +1 link: the links "
                          f"do not match the level; rebuild the pyramid")


def old_sequences(spec: StepSpec, task: int, region, *_refs_done) -> list[int]:
    """The metavertex sequences of fragments outside ``region``'s source
    chunks that its recomputed objects name (sent here by
    ``object_refs``), from their old ``+1`` records: their parents do
    not change."""
    parts = received(spec, "oldrefs", task)
    if not parts:
        return []
    chunks = np.unique(np.concatenate([p["chunk"] for _, p in parts]))
    ids, sizes, inst_frag = [], [], []
    for num, lengths in _read_fragment_lengths(spec, chunks):
        ids.append(num)
        sizes.append(int(lengths.sum()))
        inst_frag.append(np.repeat(np.arange(lengths.size, dtype=np.int64), lengths))
    ids_a, sizes_a = np.asarray(ids, dtype=np.int64), np.asarray(sizes, dtype=np.int64)
    pc, pf = old_parents(spec, region, ids_a, sizes_a)
    inst_key = _pair_key(np.repeat(ids_a, sizes_a), np.concatenate(inst_frag))
    named = np.isin(inst_key, np.concatenate([_pair_key(p["chunk"], p["frag"]) for _, p in parts]))
    if np.any(pf[named] < 0):
        raise FormatError(f"{spec.store.describe(nm.links_family_path(spec.source_level, 1))}: "
                          f"a vertex of a named fragment has no +1 link: the links do not "
                          f"match the level; rebuild the pyramid")
    chunks, rank = distinct_rows(pc)
    return send_sequences(spec, OLD_SENDER + task, inst_key, rank, pf, chunks, parts)


#: Sender number of the first ``old_sequences`` task (after every block).
OLD_SENDER = 1 << 30


def answer_for(resolved: dict, block: int, partition: int) -> dict | None:
    ans = resolved.get(block)
    return None if ans is None else {"partition": partition, **ans}
