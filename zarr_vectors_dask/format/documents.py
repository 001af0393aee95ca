"""Metadata documents (``zarr.json``), rendered as zarr-python renders them,
and reading a node's document or attributes."""

from __future__ import annotations

import contextlib
import functools
import json
import warnings
from typing import Any, Sequence

import numpy as np

from ..errors import FormatError, NotAZarrVectorsStoreError, StoreNotFoundError
from ..storage import handles
from ..storage.store import Store, check_access
from .naming import MANIFEST_BUCKET, NONEMPTY, ORIGIN, VERTEX_FRAGMENTS, chunk_key

__all__ = ["open_zarr_vectors", "opened_zarr_vectors", "vlen_array_doc", "manifests_doc",
           "dense_array_doc", "group_doc", "batched_group_doc", "read_json", "node_attrs",
           "vlen_attributes",
           "vertices_attrs", "vertex_fragments_attrs", "link_array_attrs", "link_family_attrs"]


def open_zarr_vectors(store_arg, storage_options) -> Store:
    """A ``Store`` for a path or URL (or a ``Store``), checked to be a
    zarr-vectors store with a level 0.  Handles go through :func:`opened_zarr_vectors`."""
    if isinstance(store_arg, Store):
        store = store_arg
    else:
        store = Store.from_url(store_arg, storage_options)
    if store.root_known_absent():
        raise StoreNotFoundError(f"{store.url}: no such path")
    check_access(store)
    attrs = node_attrs(store, "")
    if attrs is None or "zarr_vectors" not in attrs:
        raise NotAZarrVectorsStoreError(_not_a_store(store, attrs))
    if node_attrs(store, "0") is None:
        raise NotAZarrVectorsStoreError(f"{store.url}: zarr-vectors store has no level 0")
    return store


def _not_a_store(store: Store, attrs) -> str:
    """What is there instead: a file, a folder with no Zarr root document,
    or a Zarr node without zarr-vectors' root metadata."""
    if store.root_is_file():
        return f"{store.url}: a file, not a zarr-vectors store (a store is a folder)"
    if attrs is None:
        return f"{store.url}: not a zarr-vectors store (no zarr.json: not a Zarr group)"
    return (f"{store.url}: not a zarr-vectors store (its zarr.json has no zarr_vectors "
            f"root metadata)")


@contextlib.contextmanager
def opened_zarr_vectors(store_arg, storage_options, *, writable: bool = True):
    """:func:`open_zarr_vectors` for anything a zarr-vectors caller may pass: a path, a
    URL, a ``Store``, or an open handle (``zarr_vectors.open(...)``'s
    Dataset, ``open_store(...)``'s Group, a zarr Group or zarr store), whose
    URL and storage options come from its zarr store (``handles.py``)."""
    if isinstance(store_arg, Store):
        yield open_zarr_vectors(store_arg, storage_options)
        return
    with handles.opened(store_arg, storage_options, writable=writable) as (url, options):
        yield open_zarr_vectors(url, options)


# ------------------------------------------------------------ metadata docs
def _render(create) -> bytes:
    """Let zarr itself build a node in memory and hand back its
    ``zarr.json``, so documents match zarr's own byte for byte."""
    import zarr
    from zarr.storage import MemoryStore
    mem = MemoryStore()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create(zarr, mem)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    async def _get():
        return await mem.get("n/zarr.json", prototype=default_buffer_prototype())
    buf = sync(_get())
    return buf.to_bytes()


def vlen_array_doc(grid_shape: Sequence[int], attributes: dict,
                   shard_shape: Sequence[int] | None = None) -> bytes:
    """``zarr.json`` of a per-chunk vlen-bytes array (one cell per chunk),
    with ``shard_shape`` cells per storage object when given: what
    zarr-vectors' writers create for their ``shard_shape``.

    zarr renders the document once per grid (a pyramid has ~10^2 such
    documents, and a render costs ~1 ms); the attributes are put in its
    place and the dict dumped as zarr dumps it."""
    import zarr
    grid = tuple(int(s) for s in grid_shape)
    shards = None if shard_shape is None else tuple(int(s) for s in shard_shape)
    template = _vlen_template(grid, shards)
    doc = dict(template)
    doc["attributes"] = attributes
    return json.dumps(doc, allow_nan=True, indent=zarr.config.get("json_indent")).encode()


@functools.lru_cache(maxsize=256)
def _vlen_template(grid: tuple, shards: tuple | None) -> dict:
    """zarr's own ``zarr.json`` of a per-chunk vlen array, attributes empty
    (parsed: its key order is the one zarr writes)."""
    from zarr.codecs import VLenBytesCodec

    def create(zarr, mem):
        kw = {} if shards is None else {"shards": shards}
        zarr.create_array(mem, name="n", shape=grid, chunks=(1,) * len(grid), dtype="bytes",
                          serializer=VLenBytesCodec(), compressors=[], attributes={},
                          zarr_format=3, **kw)
    return json.loads(_render(create))


def manifests_doc(n_rows: int) -> bytes:
    """``object_index/manifests``: bucketed vlen rows, zarr's default zstd."""
    from zarr.codecs import VLenBytesCodec

    def create(zarr, mem):
        zarr.create_array(mem, name="n", shape=(n_rows,), chunks=(min(MANIFEST_BUCKET, n_rows),),
                          dtype="bytes", serializer=VLenBytesCodec(), zarr_format=3)
    return _render(create)


def dense_array_doc(shape, chunks, dtype, fill_value=None, attributes=None) -> bytes:
    """A plain typed array with zarr's default codecs (bytes + zstd)."""
    def create(zarr, mem):
        kw = {"fill_value": fill_value} if fill_value is not None else {}
        zarr.create_array(mem, name="n", shape=tuple(shape), chunks=tuple(chunks),
                          dtype=np.dtype(dtype), attributes=attributes or {}, zarr_format=3, **kw)
    return _render(create)


def group_doc(attributes: dict) -> bytes:
    def create(zarr, mem):
        zarr.create_group(mem, path="n", attributes=attributes, zarr_format=3)
    return _render(create)


def batched_group_doc(attributes: dict) -> bytes:
    """A group ``zarr.json`` as zarr-vectors' batch writer PUTs it (compact,
    its own key order), not as zarr renders one: what the reference writes
    for a ``links/<delta>`` family group.  Its own function, so the bytes
    follow the installed zarr-vectors."""
    from zarr_vectors.core._batch_writer import _group_zarr_json_bytes
    return _group_zarr_json_bytes(attributes)


def read_json(store: Store, key: str) -> dict | None:
    raw = store.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise FormatError(f"{store.describe(key)}: not valid JSON") from None


def node_attrs(store: Store, path: str) -> dict | None:
    doc = read_json(store, f"{path}/zarr.json" if path else "zarr.json")
    return None if doc is None else dict(doc.get("attributes") or {})


def vlen_attributes(origin: Sequence[int], chunks: Sequence[Sequence[int]], extra: dict) -> dict:
    """Attributes block of a per-chunk array in zarr-vectors' key order."""
    return vlen_attributes_of_keys(origin, {chunk_key(c) for c in chunks}, extra)


def vlen_attributes_of_keys(origin: Sequence[int], keys, extra: dict) -> dict:
    """:func:`vlen_attributes` of the non-empty chunks' keys (``"1.0.2"``)."""
    # zarr-vectors keeps this list sorted as strings ("-1.0" before "-2.0").
    attrs: dict[str, Any] = {NONEMPTY: sorted(set(keys))}
    if any(int(o) != 0 for o in origin):
        attrs[ORIGIN] = [int(o) for o in origin]
    attrs.update(extra)
    return attrs


def vertices_attrs() -> dict:
    return {"zv_array": "vertices", "dtype": "float32", "encoding": "raw"}


def vertex_fragments_attrs() -> dict:
    return {"zv_array": VERTEX_FRAGMENTS, "encoding": "fragment_index_v1"}


def link_array_attrs(offset: Sequence[int], delta: int) -> dict:
    return {"zv_array": "links", "dtype": "int64", "offsets": [[int(c) for c in offset]],
            "has_perm": False, "link_width": 2, "level_delta": int(delta)}


def link_family_attrs(delta: int, sid_ndim: int, num_links: int) -> dict:
    return {"zv_array": "links_family", "level_delta": int(delta), "link_width": 2,
            "directed": True, "store": "canonical", "sid_ndim": int(sid_ndim),
            "num_links": int(num_links), "num_physical_records": int(num_links)}
