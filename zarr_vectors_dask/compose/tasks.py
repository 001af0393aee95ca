"""Cross-level link composition: ``+N``/``-N`` families (N >= 2) from the
published ``+1`` families, after every level exists.

A task owns a slab: the chunks under it of every fine level, finest
first.  For each level it decodes their ``+1`` records, then walks the
parent chain one level at a time, reading only the ``+1`` cells of the
coarser chunks its vertices' ancestors live in -- once per task: the
coarser levels' own chunks under the slab are mostly those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import commit as cm
from ..format import documents as fdoc
from ..format import naming as nm
from ..step.cells import route_to
from ..step.links import distinct_rows, partition_links, write_link_cells
from ..storage.store import Store

__all__ = ["level_geometry", "ParentMaps", "ParentCells", "compose_block", "compose_summary"]


def level_geometry(store: Store, level: int, root_meta) -> dict:
    """Chunk grid, chunk scale (multiple of root's) and vertex count of a
    published level."""
    attrs = (fdoc.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    chunk = attrs.get("chunk_shape") or list(root_meta.chunk_shape)
    from ..planning.plan import grid_layout
    grid = grid_layout(root_meta.bounds, chunk)
    scale = tuple(int(round(float(c) / float(r))) for c, r in zip(chunk, root_meta.chunk_shape))
    return {"grid": grid, "scale": scale, "vertex_count": int(attrs.get("vertex_count") or 0)}


@dataclass
class ParentMaps:
    """Parent of every vertex of some chunks (from their ``+1`` cells), back
    to back: chunk ``i``'s vertex ``v`` is row ``starts[i] + v`` when
    ``v < sizes[i]``; its parent is vertex ``parent_vi`` of chunk
    ``cell_chunk[parent_cell]`` (one row per cell read, not per vertex); a
    vertex without a record has parent_vi -1."""
    sizes: np.ndarray        # (n_chunks,) vertices per chunk (highest named + 1)
    starts: np.ndarray       # (n_chunks,)
    cell_chunk: np.ndarray   # (n_cells, d) parent chunk of each cell read
    parent_cell: np.ndarray  # (N,)
    parent_vi: np.ndarray    # (N,)


class ParentCells:
    """The decoded ``+1`` records of the chunks one task asked for, per
    level: ``(offset, rows)`` per cell of a chunk.  A task composing a slab
    at every level asks for the same coarse chunks twice (a finer level's
    hops, then that level's own chunks), so it reads each cell once."""

    def __init__(self, store: Store, segs: dict):
        self.store, self.segs, self.cells = store, segs, {}

    def of(self, level: int, chunks: list[tuple], keep: bool = True) -> list[list]:
        """Each chunk's records; ``keep=False``: not kept for a later ask
        (the finest level's, asked for once)."""
        mine = self.cells.setdefault(level, {})
        missing = [c for c in chunks if c not in mine]
        read = {c: [] for c in missing}
        if missing:
            coords = np.asarray(missing, dtype=np.int64).reshape(len(missing), -1)
            for seg, info in self.segs[level].items():
                off = nm.parse_chunk_key(seg)
                # Read only cells whose object (cell or shard) a listing shows.
                asked = [missing[i] for i in np.flatnonzero(
                    fcells.present_cells(self.store, info, coords))]
                for c, payload in fcells.read_cells(self.store, info, asked).items():
                    if payload is not None:
                        rows = cdc.decode_link_cell(payload)
                        if rows.shape[0]:
                            read[c].append((off, rows))
            if keep:
                mine.update(read)
        return [mine[c] if c in mine else read[c] for c in chunks]


def _parent_maps(cells: ParentCells, level: int, chunks: list[tuple], geo: dict,
                 keep: bool = True) -> ParentMaps:
    """The parent maps of ``chunks`` from the ``+1`` family of ``level``;
    the records are gathered with one numpy call per block, not per chunk,
    and parent chunks are kept per cell."""
    rs = np.asarray(geo[level]["scale"], dtype=np.int64)
    rt = np.asarray(geo[level + 1]["scale"], dtype=np.int64)
    d = len(rs)
    coords = np.asarray(chunks, dtype=np.int64).reshape(len(chunks), d)
    owners, offsets, counts, records = [], [], [], []
    for i, found in enumerate(cells.of(level, chunks, keep)):
        for off, rows in found:
            owners.append(i)
            offsets.append(off)
            counts.append(rows.shape[0])
            records.append(rows)
    n = len(chunks)
    if not records:
        return ParentMaps(np.zeros(n, np.int64), np.zeros(n, np.int64), np.empty((0, d), np.int64),
                          np.empty(0, np.int64), np.empty(0, np.int64))
    counts = np.asarray(counts, dtype=np.int64)
    owners = np.asarray(owners, dtype=np.int64)
    rows = np.concatenate(records)
    # A cell's parent chunk: its fine chunk's anchor on the coarse grid
    # plus the cell's offset.
    cell_chunk = (coords[owners] * rs) // rt + np.asarray(offsets, dtype=np.int64).reshape(-1, d)
    cuts = np.cumsum(counts) - counts
    sizes = np.zeros(n, dtype=np.int64)
    np.maximum.at(sizes, owners, np.maximum.reduceat(rows[:, 0], cuts) + 1)
    starts = np.cumsum(sizes) - sizes
    at = np.repeat(starts[owners], counts) + rows[:, 0]
    pcell = np.zeros(int(sizes.sum()), dtype=np.int64)
    pv = np.full(pcell.shape[0], -1, dtype=np.int64)
    pcell[at] = np.repeat(np.arange(counts.size, dtype=np.int64), counts)
    pv[at] = rows[:, 1]
    return ParentMaps(sizes, starts, cell_chunk, pcell, pv)


def _next_hop(cells: ParentCells, level: int, cur_k: np.ndarray, cur_tab: np.ndarray,
              cur_v: np.ndarray, geo: dict):
    """One more hop up the chain: the parent (``+1`` record at ``level``)
    of each vertex ``cur_v`` of chunk ``cur_tab[cur_k]``, as
    ``(cell index, chunk table, vertex)``; -1 as vertex where none."""
    used = np.zeros(cur_tab.shape[0], dtype=bool)
    used[cur_k] = True
    live = np.flatnonzero(used)
    chunks, inv_live = distinct_rows(cur_tab[live])
    distinct = np.zeros(cur_tab.shape[0], dtype=np.int64)
    distinct[live] = inv_live
    maps = _parent_maps(cells, level, [tuple(c) for c in chunks.tolist()], geo)
    inv = distinct[cur_k]
    inside = cur_v < maps.sizes[inv]
    if inside.all():  # the usual case: no vertex past its chunk's records
        at = maps.starts[inv] + cur_v
        return maps.parent_cell[at], maps.cell_chunk, maps.parent_vi[at]
    nxt_k = np.zeros_like(cur_k)
    nxt_v = np.full(cur_v.shape, -1, dtype=np.int64)
    inside = np.flatnonzero(inside)
    at = maps.starts[inv[inside]] + cur_v[inside]
    nxt_k[inside] = maps.parent_cell[at]
    nxt_v[inside] = maps.parent_vi[at]
    return nxt_k, maps.cell_chunk, nxt_v


def compose_block(store: Store, ctx: dict, run: tuple, storage: str, block: str = "") -> dict:
    """``+N`` cells (and their ``-N`` mirrors) of one run of a slab:
    ``run`` holds ``(fine level, steps, chunks)`` per fine level, finest
    first; ``block`` names the run.  ``ctx`` holds every level's
    geometry, the offset arrays of its ``+1`` family and, when sharded,
    the routes of each level's cells to the tasks writing its shards.
    Returns, per fine level, the cells written per family."""
    cells = ParentCells(store, ctx["segs"])
    out = {}
    for i, (f, steps, fine_cc) in enumerate(run):
        # the finest level's records are asked for once: not kept
        out[f] = _compose_level(cells, ctx, f, np.asarray(fine_cc, dtype=np.int64), steps,
                                storage, f"{block}.{f}", keep=i > 0)
    return {"levels": out}


def _compose_level(cells: ParentCells, ctx: dict, fine_level: int, fine_cc: np.ndarray,
                   steps: list[int], storage: str, block: str, keep: bool) -> dict:
    """The ``+N``/``-N`` cells of the chunks ``fine_cc`` of one level."""
    store, geo, segs = cells.store, ctx["geo"], ctx["segs"]
    mine = [tuple(c) for c in fine_cc.tolist()]
    fine_cc = fine_cc.reshape(len(mine), -1)
    base = _parent_maps(cells, fine_level, mine, geo, keep)
    # One row per fine vertex that has a +1 parent; each current ancestor
    # is (vertex cur_v of chunk cur_tab[cur_k]).
    f_id = np.repeat(np.arange(len(mine), dtype=np.int64), base.sizes)
    f_vi = np.arange(f_id.size, dtype=np.int64) - np.repeat(base.starts, base.sizes)
    ok = base.parent_vi >= 0
    f_id, f_vi = f_id[ok], f_vi[ok]
    cur_k, cur_tab, cur_v = base.parent_cell[ok], base.cell_chunk, base.parent_vi[ok]
    out = {"plus": {}, "minus": {}}
    for n in steps:
        inter = fine_level + n - 1
        if inter + 1 not in geo or not segs.get(inter) or cur_k.size == 0:
            break
        nxt_k, cur_tab, nxt_v = _next_hop(cells, inter, cur_k, cur_tab, cur_v, geo)
        ok = nxt_v >= 0
        f_id, f_vi, cur_k, cur_v = f_id[ok], f_vi[ok], nxt_k[ok], nxt_v[ok]
        level = fine_level + n
        if f_id.size == 0:
            break
        links = partition_links(f_id, fine_cc, f_vi, cur_k, cur_tab, cur_v,
                                geo[fine_level]["scale"], geo[level]["scale"])
        routes = ctx.get("routes", ())
        out["plus"][n] = write_link_cells(
            store, fine_level, n, geo[fine_level]["grid"][0], links,
            route=route_to(routes, fine_level), sender=f"c{block}+{n}")
        if storage == "explicit":
            # Every -N cell's records come from one fine chunk of this run.
            out["minus"][n] = write_link_cells(
                store, level, -n, geo[level]["grid"][0],
                links.mirrored(geo[fine_level]["scale"], geo[level]["scale"]),
                route=route_to(routes, level), sender=f"c{block}-{n}")
    return out


def compose_summary(store: Store, geo: dict, n_tasks: int, sid_ndim: int, shard_shape,
                    *results: dict) -> int:
    """Reduce the composition tasks' written cells into the ``±N`` family
    documents (written by the commit module) on the cluster; returns the
    number of records.  ``results``: the ``n_tasks`` composition tasks'
    (per fine level, the cells written per family), then the shard
    writers' (waited for only)."""
    families: dict[tuple[int, int], cm.LinkFamily] = {}

    def family(level, delta):
        return families.setdefault((level, delta), cm.LinkFamily(
            level, delta, *geo[level]["grid"], shard_shape=shard_shape))
    for res in results[:n_tasks]:
        for f, written in res["levels"].items():
            for n, cells in written["plus"].items():
                family(f, n).add(cells)
            for n, cells in written["minus"].items():
                family(f + n, -n).add(cells)
    cm.write_families(store, list(families.values()), sid_ndim=sid_ndim)
    return sum(fam.num_links for fam in families.values())
