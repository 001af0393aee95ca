"""The source level of a step: its arrays, object rows and one listing of
its cells' sizes (the weights tasks are sized by)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FormatError
from ..format import cells as fcells
from ..format import documents as fdoc
from ..format import naming as nm
from ..planning.runs import ravel
from ..storage.store import Store

__all__ = ["SourceLevel", "manifest_rows", "read_source_level", "chunk_table"]


# ---------------------------------------------------------------- source info
@dataclass
class SourceLevel:
    store: Store
    level: int
    ndim: int
    vertices: fcells.VlenArrayInfo
    fragments: fcells.VlenArrayInfo
    dtype: str
    has_objects: bool
    n_rows: int
    attribute_names: list[str]
    vertex_count: int


def manifest_rows(store: Store, level: int) -> int | None:
    """How many object rows a level's manifests hold (None: it has none)."""
    doc = fdoc.read_json(store, f"{level}/{nm.OBJECT_INDEX}/manifests/zarr.json")
    return None if doc is None else int((doc.get("shape") or [0])[0])


def read_source_level(store: Store, level: int, ndim: int) -> SourceLevel:
    """A level's shapes and names (metadata only: no per-object data)."""
    vi = fcells.vlen_array_info(store, f"{level}/{nm.VERTICES}")
    fi = fcells.vlen_array_info(store, f"{level}/{nm.VERTEX_FRAGMENTS}")
    if vi is None or fi is None:
        raise FormatError(f"{store.describe(str(level))}: level has no vertices array")
    vdoc = fdoc.read_json(store, f"{level}/{nm.VERTICES}/zarr.json") or {}
    vattrs = vdoc.get("attributes") or {}
    if vattrs.get("encoding", "raw") != "raw":
        raise FormatError(f"{store.describe(str(level))}/vertices: encoding "
                              f"{vattrs.get('encoding')!r} is not supported (raw only)")
    level_attrs = (fdoc.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    rows = manifest_rows(store, level) \
        if fdoc.node_attrs(store, f"{level}/{nm.OBJECT_INDEX}") is not None else None
    has_objects = rows is not None
    n_rows = rows or 0
    attr_names = []
    if fdoc.node_attrs(store, f"{level}/{nm.OBJECT_ATTRIBUTES}") is not None:
        for name in store.listdir(f"{level}/{nm.OBJECT_ATTRIBUTES}"):
            if name == "zarr.json":
                continue
            doc = fdoc.read_json(store, f"{level}/{nm.OBJECT_ATTRIBUTES}/{name}/zarr.json")
            if doc and doc.get("node_type") == "array":
                attr_names.append(name)
    return SourceLevel(store, level, ndim, vi, fi, str(vattrs.get("dtype", "float32")), has_objects,
                       n_rows, attr_names, int(level_attrs.get("vertex_count") or 0))


def chunk_table(store: Store, info: fcells.VlenArrayInfo, origin, grid, ndim: int,
                vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """Present chunks of a per-chunk array as sorted row-major chunk
    numbers, with each one's estimated vertex count from one listing of
    its cell sizes (where cells are not plain files: see
    :func:`_stored_weights`)."""
    coords = np.asarray(info.chunks, dtype=np.int64).reshape(-1, ndim)
    numbers = ravel(coords, origin, grid)
    order = np.argsort(numbers, kind="stable")
    numbers = numbers[order]
    mean = max(1.0, vertex_count / max(1, numbers.size))
    weights = np.full(numbers.size, mean)
    if info.raw_cells and numbers.size:
        sizes = store.sizes(f"{info.path}/c")
        if sizes:
            rel = np.asarray([[int(x) for x in k.split("/")] for k in sizes
                              if k.count("/") == ndim - 1 and k.replace("/", "").isdigit()],
                             dtype=np.int64).reshape(-1, ndim)
            nbytes = np.asarray([v for k, v in sizes.items()
                                 if k.count("/") == ndim - 1 and k.replace("/", "").isdigit()],
                                dtype=np.float64)
            lin = ravel(rel + np.asarray(info.origin, dtype=np.int64), origin, grid)
            at = np.searchsorted(numbers, lin)
            hit = (at < numbers.size) & (numbers[np.minimum(at, numbers.size - 1)] == lin)
            # A cell is its framing plus float rows of ``ndim`` coordinates.
            weights[at[hit]] = np.maximum(1.0, (nbytes[hit] - 8) / (4.0 * ndim))
    elif numbers.size:
        weights = _stored_weights(store, info, coords[order], vertex_count, weights)
    return numbers, weights


def _stored_weights(store: Store, info: fcells.VlenArrayInfo, coords: np.ndarray,
                    vertex_count: int, fallback: np.ndarray) -> np.ndarray:
    """Vertex estimates of compressed or sharded cells, from one listing:
    each storage key's bytes shared by the present cells it holds, scaled
    so the level's vertex count adds up (compression shrinks every cell
    alike, closely enough to split a dense shard from a sparse one)."""
    lay = fcells.key_layout(info)
    sizes = store.sizes(info.path)
    if not sizes or vertex_count <= 0:
        return fallback
    rel = coords - np.asarray(info.origin, dtype=np.int64)
    kc = rel // np.asarray(lay.key_shape, dtype=np.int64)
    uniq, inv = np.unique(kc, axis=0, return_inverse=True)
    inv = inv.reshape(-1)
    prefix = len(info.path) + 1
    nbytes = np.asarray([sizes.get(lay.key(info.path, k)[prefix:], 0) for k in uniq.tolist()],
                        dtype=np.float64)
    share = nbytes[inv] / np.bincount(inv, minlength=uniq.shape[0])[inv]
    if share.sum() <= 0:
        return fallback
    return np.maximum(1.0, share * (float(vertex_count) / float(share.sum())))
