"""What a store's published levels say (root metadata, a level's bin and
chunk shapes), and the plan of a build read from them."""

from __future__ import annotations

from ..errors import FormatError
from ..format import cells as fcells
from ..format import commit as cm
from ..format import documents as fdoc
from ..format import naming as nm
from ..storage.store import Store
from .plan import PyramidPlan, inline_limit, plan_pyramid_from_meta, validate_factors

__all__ = ["read_root_meta", "level_shapes", "make_plan"]


def read_root_meta(store: Store):
    from zarr_vectors.core.metadata import RootMetadata
    return RootMetadata.from_dict(cm.read_root_attrs(store))


def level_shapes(store: Store, level: int, root_meta) -> tuple[tuple, tuple]:
    """(bin_shape, chunk_shape) of a published level."""
    attrs = (fdoc.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    chunk = tuple(float(c) for c in (attrs.get("chunk_shape") or root_meta.chunk_shape))
    if level == 0:
        return tuple(float(b) for b in root_meta.effective_bin_shape), chunk
    ms = (cm.read_root_attrs(store).get("multiscales") or [{}])[0]
    for ds in ms.get("datasets") or []:
        if ds.get("path") == str(level):
            for t in ds.get("coordinateTransformations") or []:
                if t.get("type") == "translation":
                    return tuple(2.0 * float(x) for x in t["translation"]), chunk
    if attrs.get("bin_shape"):
        return tuple(float(b) for b in attrs["bin_shape"]), chunk
    return tuple(float(b) for b in root_meta.effective_bin_shape), chunk


def make_plan(store: Store, *, factors, chunk_scale_factors, cross_level_depth,
              cross_level_storage, sparsity_strategy, n_workers, start_level=0,
              max_block_vertices=2_000_000, shard_shape=None) -> PyramidPlan:
    validate_factors(factors)
    inline_vertices = inline_limit()
    root_meta = read_root_meta(store)
    sbin, schunk = level_shapes(store, start_level, root_meta)
    info = fcells.vlen_array_info(store, f"{start_level}/{nm.VERTICES}")
    if info is None:
        raise FormatError(f"{store.describe(str(start_level))}: level has no vertices array")
    lattrs = (fdoc.node_attrs(store, str(start_level)) or {}).get("zarr_vectors_level") or {}
    oi = fdoc.node_attrs(store, f"{start_level}/{nm.OBJECT_INDEX}") or {}
    plan = plan_pyramid_from_meta(
        store=store.url, ndim=root_meta.sid_ndim, root_chunk_shape=tuple(root_meta.chunk_shape),
        root_bin=tuple(root_meta.effective_bin_shape), bounds=root_meta.bounds,
        level0_bin=sbin, level0_chunk_shape=schunk, level0_chunks=len(info.chunks),
        level0_vertices=int(lattrs.get("vertex_count") or 0), n_objects=int(oi.get("num_objects", 0)),
        start_level=start_level, factors=factors, chunk_scale_factors=chunk_scale_factors,
        cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
        sparsity_strategy=sparsity_strategy, n_workers=n_workers,
        max_block_vertices=max_block_vertices, shard_shape=shard_shape,
        inline_vertices=inline_vertices)
    return plan
