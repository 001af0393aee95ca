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


def _read_parent_maps(store: Store, level: int, chunks, fam: dict, geo: dict) -> dict:
    """``{chunk: (parent_chunk (n, d), parent_vi (n,))}`` from ``+1`` cells;
    vertices without a record get parent_vi -1."""
    wanted = set(map(tuple, chunks))
    per_chunk: dict[tuple, list] = {}
    seg_of = {}
    for seg, (origin, present) in fam.items():
        hits = [c for c in map(tuple, present) if c in wanted]
        if hits:
            info = fmt.VlenArrayInfo(f"{fmt.links_family_path(level, 1)}/{seg}", origin,
                                     tuple(hits), True)
            seg_of[seg] = (info, hits)
    rs = np.asarray(geo[level]["scale"], dtype=np.int64)
    rt = np.asarray(geo[level + 1]["scale"], dtype=np.int64)
    for seg, (info, hits) in seg_of.items():
        off = np.asarray(fmt.parse_chunk_key(seg), dtype=np.int64)
        cells = fmt.read_cells(store, info, hits)
        for c, payload in cells.items():
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


def compose_block(store: Store, ctx: dict, fine_level: int, run: tuple[int, int],
                  steps: list[int], storage: str) -> dict:
    """``+N`` cells (and their ``-N`` mirrors) of one run of fine chunks.
    ``ctx`` holds every level's geometry and ``+1`` presence lists and each
    fine level's chunk table."""
    geo, plus_fams = ctx["geo"], ctx["plus_fams"]
    fine_cc = ctx["fine_chunks"][fine_level]
    lo, hi = run
    mine = [tuple(c) for c in fine_cc[lo:hi].tolist()]
    base = _read_parent_maps(store, fine_level, mine, plus_fams[fine_level], geo)
    # Flatten: one row per fine vertex that has a +1 parent.
    f_id, f_vi, p_chunk, p_vi = [], [], [], []
    for i, c in enumerate(mine):
        if c not in base:
            continue
        pc, pv = base[c]
        ok = np.flatnonzero(pv >= 0)
        f_id.append(np.full(ok.size, lo + i, dtype=np.int64))
        f_vi.append(ok)
        p_chunk.append(pc[ok])
        p_vi.append(pv[ok])
    nd = len(mine[0]) if mine else 0
    f_id = np.concatenate(f_id) if f_id else np.empty(0, np.int64)
    f_vi = np.concatenate(f_vi) if f_vi else np.empty(0, np.int64)
    cur_c = np.concatenate(p_chunk) if p_chunk else np.empty((0, nd), np.int64)
    cur_v = np.concatenate(p_vi) if p_vi else np.empty(0, np.int64)
    out = {"plus": {}, "minus": {}}
    level = fine_level + 1
    for n in steps:
        inter = fine_level + n - 1
        if inter + 1 not in geo or not plus_fams.get(inter):
            break
        # One more hop: the parent of each current ancestor at ``inter``.
        if cur_c.shape[0] == 0:
            break
        _, first, inv = np.unique(st.row_ids(cur_c), return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        keys = [tuple(c) for c in cur_c[first].tolist()]
        maps = _read_parent_maps(store, inter, keys, plus_fams[inter], geo)
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
        out["plus"][n] = st.write_link_cells(store, fine_level, n, geo[fine_level]["grid"][0], links)
        if storage == "explicit":
            # Every -N cell's records come from one fine chunk of this run.
            out["minus"][n] = st.write_link_cells(
                store, level, -n, geo[level]["grid"][0],
                links.mirrored(geo[fine_level]["scale"], geo[level]["scale"]))
    return out
