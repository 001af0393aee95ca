"""Stages 3-4: writing the metavertices of a target block in the
reference's order, and telling every source vertex its parent."""

from __future__ import annotations

import numpy as np

from ..format import codecs as cdc
from ..format import naming as nm
from . import attributes as va
from .cells import put_cells, route_to
from .spec import StepSpec, _void

__all__ = ["write_metavertices", "resolve_parents", "OLD_PARENT"]

#: The parent fragment of a key whose metavertex a region refresh leaves
#: as it is: read from the old ``+1`` cells.
OLD_PARENT = -2


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
        v, f = cdc.encode_metavertex_cell(centroid[lo:hi])
        cells[(f"{spec.target_level}/{nm.VERTICES}", cc)] = cdc.frame_cell(v)
        cells[(f"{spec.target_level}/{nm.VERTEX_FRAGMENTS}", cc)] = cdc.frame_cell(f)
        for a, vals in zip(spec.vertex_attributes, attr_vals):
            # One row per metavertex, in the vertices cell's order.
            cells[(f"{spec.target_level}/{a.path_in_level}", cc)] = \
                cdc.frame_cell(np.ascontiguousarray(vals[lo:hi]).tobytes())
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
    fragment -1 when no kept vertex made one (-2: homed outside the
    region being refreshed, so its old parent stands)."""
    n_u = reduced["n_unique"]
    loc_chunk = np.zeros((n_u, spec.ndim), dtype=np.int64)
    loc_frag = np.full(n_u, -1, dtype=np.int64)
    for part in located:
        if part is None:
            continue
        loc_chunk[part["mv"]] = part["chunk"]
        loc_frag[part["mv"]] = part["frag"]
    loc_frag[reduced["outside"]] = OLD_PARENT
    inv = reduced["inverse"]
    out = {}
    for s, (lo, hi) in reduced["source_slices"].items():
        sel = inv[lo:hi]
        out[s] = {"chunk": loc_chunk[sel], "frag": loc_frag[sel]}
    return out
