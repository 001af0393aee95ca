"""Cross-level link composition: ``+N``/``-N`` families (N >= 2) from the
published ``+1`` families, after every level exists.

A task owns a block of fine chunks: it decodes their ``+1`` records, then
walks the parent chain one level at a time, reading only the ``+1`` cells
of the coarser chunks its vertices' ancestors live in.
"""

from __future__ import annotations

import numpy as np

from . import format as fmt
from . import stages as st
from .store import Store


def level_geometry(store: Store, level: int, root_meta) -> dict:
    """Chunk grid, chunk scale (multiple of root's) and vertex count of a
    published level."""
    attrs = (fmt.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    chunk = attrs.get("chunk_shape") or list(root_meta.chunk_shape)
    from .plan import grid_layout
    grid = grid_layout(root_meta.bounds, chunk)
    scale = tuple(int(round(float(c) / float(r))) for c, r in zip(chunk, root_meta.chunk_shape))
    return {"grid": grid, "scale": scale, "vertex_count": int(attrs.get("vertex_count") or 0)}


def _read_parent_maps(store: Store, level: int, chunks, segs: dict, geo: dict) -> dict:
    """``{chunk: (parent_chunk (n, d), parent_vi (n,))}`` from the ``+1``
    cells of ``chunks``; vertices without a record get parent_vi -1.

    Each chunk's cells are looked up in the family's few offset arrays
    (``segs``: offset string -> array info without its chunk list; absent
    cells read as None), so the work follows the chunks asked for, not the
    family's presence lists."""
    rs = np.asarray(geo[level]["scale"], dtype=np.int64)
    rt = np.asarray(geo[level + 1]["scale"], dtype=np.int64)
    per_chunk: dict[tuple, list] = {}
    coords = np.asarray(chunks, dtype=np.int64).reshape(len(chunks), -1)
    for seg, info in segs.items():
        off = np.asarray(fmt.parse_chunk_key(seg), dtype=np.int64)
        # Read only cells whose object (cell or shard) a listing shows.
        asked = [chunks[i] for i in np.flatnonzero(fmt.present_cells(store, info, coords))]
        for c, payload in fmt.read_cells(store, info, asked).items():
            if payload is None:
                continue
            rows = fmt.decode_link_cell(payload)
            anchor = (np.asarray(c, dtype=np.int64) * rs) // rt
            per_chunk.setdefault(c, []).append((rows, anchor + off))
    out = {}
    for c, items in per_chunk.items():
        n = max(int(r[:, 0].max()) + 1 for r, _ in items if r.size) if any(r.size for r, _ in items) else 0
        pc = np.zeros((n, len(c)), dtype=np.int64)
        pv = np.full(n, -1, dtype=np.int64)
        for rows, cc in items:
            pc[rows[:, 0]] = cc
            pv[rows[:, 0]] = rows[:, 1]
        out[c] = (pc, pv)
    return out


def compose_block(store: Store, ctx: dict, fine_level: int, fine_cc: np.ndarray,
                  steps: list[int], storage: str, block: str = "") -> dict:
    """``+N`` cells (and their ``-N`` mirrors) of one run of fine chunks
    (``fine_cc``; ``block`` names the run).  ``ctx`` holds every level's
    geometry, the offset arrays of its ``+1`` family and, when sharded,
    the routes of each level's cells to the tasks writing its shards."""
    geo, segs = ctx["geo"], ctx["segs"]
    mine = [tuple(c) for c in np.asarray(fine_cc).tolist()]
    base = _read_parent_maps(store, fine_level, mine, segs[fine_level], geo)
    # Flatten: one row per fine vertex that has a +1 parent.
    f_id, f_vi, p_chunk, p_vi = [], [], [], []
    for i, c in enumerate(mine):
        if c not in base:
            continue
        pc, pv = base[c]
        ok = np.flatnonzero(pv >= 0)
        f_id.append(np.full(ok.size, i, dtype=np.int64))
        f_vi.append(ok)
        p_chunk.append(pc[ok])
        p_vi.append(pv[ok])
    nd = len(mine[0]) if mine else 0
    fine_cc = np.asarray(fine_cc, dtype=np.int64).reshape(-1, nd)
    f_id = np.concatenate(f_id) if f_id else np.empty(0, np.int64)
    f_vi = np.concatenate(f_vi) if f_vi else np.empty(0, np.int64)
    cur_c = np.concatenate(p_chunk) if p_chunk else np.empty((0, nd), np.int64)
    cur_v = np.concatenate(p_vi) if p_vi else np.empty(0, np.int64)
    out = {"plus": {}, "minus": {}}
    level = fine_level + 1
    for n in steps:
        inter = fine_level + n - 1
        if inter + 1 not in geo or not segs.get(inter):
            break
        # One more hop: the parent of each current ancestor at ``inter``.
        if cur_c.shape[0] == 0:
            break
        _, first, inv = np.unique(st.row_ids(cur_c), return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        keys = [tuple(c) for c in cur_c[first].tolist()]
        maps = _read_parent_maps(store, inter, keys, segs[inter], geo)
        # The ancestors' parent maps back to back: one gather for all vertices.
        sizes = np.array([maps[k][1].size if k in maps else 0 for k in keys], dtype=np.int64)
        starts = np.cumsum(sizes) - sizes
        all_c = np.concatenate([maps[k][0] for k in keys if k in maps] or
                               [np.empty((0, cur_c.shape[1]), np.int64)])
        all_v = np.concatenate([maps[k][1] for k in keys if k in maps] or [np.empty(0, np.int64)])
        nxt_c = np.zeros_like(cur_c)
        nxt_v = np.full(cur_v.shape, -1, dtype=np.int64)
        inside = np.flatnonzero(cur_v < sizes[inv])
        at = starts[inv[inside]] + cur_v[inside]
        nxt_c[inside] = all_c[at]
        nxt_v[inside] = all_v[at]
        ok = nxt_v >= 0
        f_id, f_vi, cur_c, cur_v = f_id[ok], f_vi[ok], nxt_c[ok], nxt_v[ok]
        level = fine_level + n
        if f_id.size == 0:
            break
        links = st._partition_links(fine_cc[f_id], f_vi, cur_c, cur_v,
                                    geo[fine_level]["scale"], geo[level]["scale"])
        routes = ctx.get("routes", ())
        out["plus"][n] = st.write_link_cells(
            store, fine_level, n, geo[fine_level]["grid"][0], links,
            route=st.route_to(routes, fine_level), sender=f"c{block}+{n}")
        if storage == "explicit":
            # Every -N cell's records come from one fine chunk of this run.
            out["minus"][n] = st.write_link_cells(
                store, level, -n, geo[level]["grid"][0],
                links.mirrored(geo[fine_level]["scale"], geo[level]["scale"]),
                route=st.route_to(routes, level), sender=f"c{block}-{n}")
    return out


def compose_summary(store: Store, geo: dict, fine_levels: list[int], sid_ndim: int,
                    shard_shape, *results: dict) -> int:
    """Reduce the composition tasks' written cells into the ``±N`` family
    documents (written by the commit module) on the cluster; returns the
    number of records.  ``results``: one per fine run (``fine_levels``),
    then the shard writers' (waited for only)."""
    from . import commit as cm
    families: dict[tuple[int, int], cm.LinkFamily] = {}

    def family(level, delta):
        return families.setdefault((level, delta), cm.LinkFamily(
            level, delta, *geo[level]["grid"], shard_shape=shard_shape))
    for f, res in zip(fine_levels, results):
        for n, written in res["plus"].items():
            family(f, n).add(written)
        for n, written in res["minus"].items():
            family(f + n, -n).add(written)
    cm.write_families(store, list(families.values()), sid_ndim=sid_ndim)
    return sum(fam.num_links for fam in families.values())
