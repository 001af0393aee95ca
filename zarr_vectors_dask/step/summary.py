"""Stage 9: the level's array documents and counts, reduced on the cluster."""

from __future__ import annotations

from ..errors import FormatError
from ..format import commit as cm
from . import attributes as va
from .spec import StepSpec

__all__ = ["level_summary", "region_summary"]


# ------------------------------------------------------------- stage 9
def level_summary(spec: StepSpec, objects_kept: int | None, n_vertex_writers: int,
                  n_link_writers: int, n_manifest_writers: int, *results) -> dict:
    """Reduce the writers' bookkeeping on the cluster (chunk lists, link
    cells, present rows) into the coarse level's array documents, written
    by the commit module, and return only counts to the driver.

    ``results``: the vertex writers', then the link writers', then the
    manifest writers' results (then the attribute writers', waited for only)."""
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
            raise FormatError(f"{spec.store.describe(a.source.path)}: per-vertex attribute "
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


def region_summary(objects_kept: int | None, n_manifest_writers: int, *results) -> dict:
    """A region step's counts (its documents are the driver's, from a
    listing once the stale cells are gone): kept objects, the change in
    non-empty manifest rows, the target chunks changed rows name
    (``reweighted``) and those rows' ids; ``results``: the manifest
    writers', then the rest's (waited for only)."""
    mans = results[:n_manifest_writers]
    chunks = {tuple(c) for m in mans for c in m["reweighted"].tolist()}
    return {"objects_kept": objects_kept,
            "present_delta": int(sum(m["present_delta"] for m in mans)),
            "reweighted": sorted(chunks),
            "rows": sorted({int(i) for m in mans for i in m["ids"].tolist()})}
