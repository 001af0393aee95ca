"""The zarr-vectors 0.9.2 on-disk format, as far as a pyramid touches it.

Everything that knows a path, a byte layout or a metadata document lives
here: chunk-cell paths and framing, payload encode/decode (via zarr-vectors'
own pure codec helpers), and rendering of ``zarr.json`` documents.  Graph
stages call these; they never build paths or bytes themselves.
"""

from __future__ import annotations

import functools
import json
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from zarr_vectors.encoding.fragments import (
    decode_fragments,
    decode_object_manifests_many,
    encode_fragments,
    encode_object_manifest_blocks,
)
from zarr_vectors.encoding.ragged import decode_ragged_blob
from zarr_vectors.exceptions import ArrayError

from .store import Store

VERTICES = "vertices"
VERTEX_FRAGMENTS = "vertex_fragments"
VERTEX_ATTRIBUTES = "vertex_attributes"
OBJECT_INDEX = "object_index"
OBJECT_ATTRIBUTES = "object_attributes"
LINKS = "links"
NONEMPTY = "nonempty_chunks"
ORIGIN = "chunk_grid_origin"

#: Rows per zarr chunk of ``object_index/manifests`` (zarr-vectors' bucket).
MANIFEST_BUCKET = 16_384
#: Rows per zarr chunk of an object attribute column.
ATTRIBUTE_BUCKET = 65_536

CAP_PRESERVED_OBJECT_IDS = "preserved_object_ids"
CAP_SHARED_FRAGMENTS = "shared_fragments"
CAP_MULTISCALE_LINKS = "multiscale_links"


class FormatError(ValueError):
    """The store does not look like what zarr-vectors writes."""


class CorruptChunkError(FormatError, ArrayError):
    """A chunk cell could not be decoded; names the array and chunk."""


# ----------------------------------------------------------------- naming
def chunk_key(coords: Sequence[int]) -> str:
    return ".".join(str(int(c)) for c in coords)


def parse_chunk_key(key: str) -> tuple[int, ...]:
    return tuple(int(x) for x in key.split("."))


def format_delta(delta: int) -> str:
    return "0" if delta == 0 else f"{delta:+d}"


def format_offsets(offset: Sequence[int]) -> str:
    return ".".join("0" if int(o) == 0 else f"{int(o):+d}" for o in offset)


def links_family_path(level: int, delta: int) -> str:
    return f"{level}/{LINKS}/{format_delta(delta)}"


def cell_path(array_path: str, coords: Sequence[int], origin: Sequence[int]) -> str:
    """Storage key of one cell of a per-chunk vlen array (default
    ``/``-separated chunk key encoding, indices relative to the origin)."""
    if not any(origin):  # the common case, and a pyramid names ~10^5 cells
        return f"{array_path}/c/" + "/".join(map(str, map(int, coords)))
    idx = "/".join(str(int(c) - int(o)) for c, o in zip(coords, origin))
    return f"{array_path}/c/{idx}"


def _named(what) -> str:
    """A message's subject: given as text, or as a callable that builds it
    (per-cell names are only needed when something is wrong)."""
    return what() if callable(what) else what


# ------------------------------------------------------------ cell framing
def frame_cell(payload: bytes) -> bytes:
    """One element of zarr's ``vlen-bytes`` codec: count, length, bytes."""
    return struct.pack("<II", 1, len(payload)) + payload


def unframe_cell(raw: bytes, *, what) -> bytes:
    if len(raw) < 8:
        raise CorruptChunkError(f"{_named(what)}: truncated cell ({len(raw)} bytes)")
    n, length = struct.unpack_from("<II", raw, 0)
    if n != 1 or len(raw) != 8 + length:
        raise CorruptChunkError(
            f"{_named(what)}: corrupt cell (declares {n} item(s) of {length} bytes, "
            f"holds {len(raw) - 8})")
    return raw[8:]


# ------------------------------------------------------------ payloads
def encode_metavertex_cell(centroids: np.ndarray) -> tuple[bytes, bytes]:
    """``vertices`` and ``vertex_fragments`` payloads of a coarse chunk:
    one single-vertex fragment per metavertex, in the given order."""
    verts = np.ascontiguousarray(centroids, dtype=np.float32).tobytes()
    n = int(centroids.shape[0])
    frags = encode_fragments([(i, 1) for i in range(n)])
    return verts, frags


def decode_vertex_cell(vert_payload: bytes, frag_payload: bytes, *, dtype: np.dtype,
                       ndim: int, what) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a chunk and its fragments in CSR form: ``members`` holds the
    row indices of every fragment back to back, ``lengths`` how many each
    fragment names (fragment order)."""
    itemsize = np.dtype(dtype).itemsize
    if len(vert_payload) % (itemsize * ndim):
        raise CorruptChunkError(
            f"{_named(what)}: vertices payload of {len(vert_payload)} bytes is not a "
            f"whole number of {ndim}-D {np.dtype(dtype)} rows")
    rows = np.frombuffer(vert_payload, dtype=dtype).reshape(-1, ndim)
    try:
        fi = decode_fragments(frag_payload)
    except Exception as exc:  # noqa: BLE001
        raise CorruptChunkError(f"{_named(what)}: vertex_fragments cannot be decoded: "
                                f"{exc}") from None
    table = fi.ranges()
    if table is not None:  # every fragment a (start, count) range: no per-fragment loop
        starts = np.asarray(table[:, 0], dtype=np.int64)
        lengths = np.asarray(table[:, 1], dtype=np.int64)
        members = expand_ranges(starts, lengths)
    else:
        parts = [np.asarray(fi.indices(f), dtype=np.int64) for f in range(fi.num_fragments)]
        lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
        members = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if members.size and (members.min() < 0 or members.max() >= rows.shape[0]):
        bad = int(np.searchsorted(np.cumsum(lengths),
                                  int(np.flatnonzero((members < 0) | (members >= rows.shape[0]))[0]),
                                  side="right"))
        raise CorruptChunkError(
            f"{_named(what)}: fragment {bad} names rows beyond the chunk's {rows.shape[0]}")
    return rows, members, lengths


def expand_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``
    without the Python loop."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    first = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - first, lengths) + np.arange(total)


# A framed link cell: vlen count and length, then the ragged blob of one
# group (group count 1, byte offset 0) and its int64 (vertex, vertex) rows.
_LINK_CELL_HEAD = struct.Struct("<IIqq")


def framed_link_cells(rows: np.ndarray, starts, stops) -> list[bytes]:
    """``frame_cell(encode_ragged_blob([rows[a:b]], int64))`` for each
    ``(a, b)``, from one buffer: a pyramid has tens of thousands of these."""
    buf = np.ascontiguousarray(rows, dtype=np.int64).tobytes()
    pack = _LINK_CELL_HEAD.pack
    return [pack(1, 16 + 16 * (b - a), 1, 0) + buf[16 * a:16 * b]
            for a, b in zip(starts, stops)]


_ONE_GROUP = struct.Struct("<qq")


def decode_link_cell(payload: bytes) -> np.ndarray:
    """A link cell's records, (n, 2) int64 (read-only when it is one group)."""
    if len(payload) >= 16 and len(payload) % 16 == 0 and _ONE_GROUP.unpack_from(payload) == (1, 0):
        # One group from byte 0 (what both writers emit): the records are
        # the rest of the payload.
        return np.frombuffer(payload, dtype="<i8", offset=16).reshape(-1, 2)
    groups = decode_ragged_blob(payload, np.dtype(np.int64), ncols=2)
    if not groups:
        return np.empty((0, 2), dtype=np.int64)
    return np.concatenate([np.asarray(g).reshape(-1, 2) for g in groups]).astype(np.int64)


@dataclass
class ManifestTable:
    """Many objects' manifests as columns: object ``i`` names
    ``counts[i]`` (chunk coords, fragment index) references, stored back to
    back in ``coords``/``frags`` (the mode-0 blocks bulk writers emit)."""

    counts: np.ndarray  # (n,) int64
    coords: np.ndarray  # (T, sid_ndim) int64
    frags: np.ndarray   # (T,) int64


_MODE_SINGLE = 0  # zarr-vectors' manifest block mode for one fragment index


def encode_manifest_table(table: ManifestTable, sid_ndim: int) -> list[bytes]:
    """One manifest blob per object, byte for byte what zarr-vectors'
    encoder writes for single-fragment blocks: a little-endian uint32
    block count, then per block the int64 chunk coords, the mode byte and
    the int64 fragment index."""
    counts = np.asarray(table.counts, dtype=np.int64)
    n = counts.size
    if n == 0:
        return []
    block = sid_ndim * 8 + 9
    sizes = 4 + counts * block
    ends = np.cumsum(sizes)
    starts = ends - sizes
    buf = np.zeros(int(ends[-1]), dtype=np.uint8)
    buf[starts[:, None] + np.arange(4)] = counts.astype("<u4").view(np.uint8).reshape(n, 4)
    total = int(counts.sum())
    if total:
        obj = np.repeat(np.arange(n), counts)
        within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
        at = starts[obj] + 4 + within * block
        rows = np.empty((total, block), dtype=np.uint8)
        rows[:, :sid_ndim * 8] = np.ascontiguousarray(table.coords, dtype="<i8").view(
            np.uint8).reshape(total, sid_ndim * 8)
        rows[:, sid_ndim * 8] = _MODE_SINGLE
        rows[:, sid_ndim * 8 + 1:] = np.ascontiguousarray(table.frags, dtype="<i8").view(
            np.uint8).reshape(total, 8)
        buf[at[:, None] + np.arange(block)] = rows
    raw = buf.tobytes()
    return [raw[a:b] for a, b in zip(starts.tolist(), ends.tolist())]


def empty_manifest(sid_ndim: int) -> bytes:
    return encode_object_manifest_blocks([], sid_ndim=sid_ndim)


def decode_manifest_table(blobs: Sequence[bytes], sid_ndim: int) -> ManifestTable:
    """Columns of many manifest blobs.  Range and explicit-list blocks are
    expanded to one reference per fragment, as zarr-vectors' reader does."""
    n = len(blobs)
    block = sid_ndim * 8 + 9
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=n)
    if n and int(lengths.min()) >= 4 and not np.any((lengths - 4) % block):
        buf = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        starts = np.cumsum(lengths) - lengths
        counts = buf[starts[:, None] + np.arange(4)].copy().view("<u4").reshape(n).astype(np.int64)
        if np.array_equal(counts, (lengths - 4) // block):
            total = int(counts.sum())
            obj = np.repeat(np.arange(n), counts)
            within = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
            at = starts[obj] + 4 + within * block
            if not np.any(buf[at + sid_ndim * 8] != _MODE_SINGLE):
                coords = buf[at[:, None] + np.arange(sid_ndim * 8)].copy().view("<i8").reshape(
                    total, sid_ndim).astype(np.int64)
                frags = buf[at[:, None] + (sid_ndim * 8 + 1) + np.arange(8)].copy().view(
                    "<i8").reshape(total).astype(np.int64)
                return ManifestTable(counts, coords, frags)
    # Anything else (ranges, explicit lists): zarr-vectors' general decoder.
    from zarr_vectors.core.arrays import expand_manifest_blocks
    decoded, uniform = decode_object_manifests_many(list(blobs), sid_ndim=sid_ndim)
    refs = decoded if uniform else [expand_manifest_blocks(b) for b in decoded]
    counts = np.fromiter((len(m) for m in refs), dtype=np.int64, count=n)
    flat = [r for m in refs for r in m]
    coords = np.array([c for c, _ in flat], dtype=np.int64).reshape(len(flat), sid_ndim)
    frags = np.array([f for _, f in flat], dtype=np.int64).reshape(len(flat))
    return ManifestTable(counts, coords, frags)


# ------------------------------------------------------------ exchange files
#: Scratch of a running build: stage-to-stage exchanges that would cost a
#: Dask task per (sender, receiver) pair travel as files here instead.
EXCHANGE_DIR = ".zvdask/exchange"


def exchange_key(scope, kind: str, receiver: int, sender) -> str:
    """``scope``: the target level of a step, or ``compose``."""
    return f"{EXCHANGE_DIR}/{scope}/{kind}/{int(receiver)}/{sender}"


def pack_columns(columns: dict[str, np.ndarray]) -> bytes:
    """Named numeric arrays as one deterministic blob: a JSON header
    (name, dtype, shape) then the raw bytes, in order."""
    arrays = {k: np.ascontiguousarray(v) for k, v in columns.items()}
    header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]).encode()
    return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for a in arrays.values())


def unpack_columns(raw: bytes, *, what: str) -> dict[str, np.ndarray]:
    try:
        (n,) = struct.unpack_from("<I", raw, 0)
        spec = json.loads(raw[4:4 + n])
        out, at = {}, 4 + n
        for name, dtype, shape in spec:
            dt = np.dtype(dtype)
            size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            out[name] = np.frombuffer(raw, dtype=dt, count=size // dt.itemsize if dt.itemsize else 0,
                                      offset=at).reshape(shape)
            at += size
        if at != len(raw):
            raise ValueError(f"{len(raw) - at} trailing bytes")
        return out
    except Exception as exc:  # noqa: BLE001
        raise CorruptChunkError(f"{what}: exchange file cannot be decoded: {exc}") from None


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
    zarr-vectors' writers create for their ``shard_shape``."""
    from zarr.codecs import VLenBytesCodec

    def create(zarr, mem):
        kw = {} if shard_shape is None else {"shards": tuple(int(s) for s in shard_shape)}
        zarr.create_array(mem, name="n", shape=tuple(int(s) for s in grid_shape),
                          chunks=(1,) * len(grid_shape), dtype="bytes",
                          serializer=VLenBytesCodec(), compressors=[],
                          attributes=attributes, zarr_format=3, **kw)
    return _render(create)


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
    # zarr-vectors keeps this list sorted as strings ("-1.0" before "-2.0").
    attrs: dict[str, Any] = {NONEMPTY: sorted({chunk_key(c) for c in chunks})}
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


# ---------------------------------------------------------- source levels
@dataclass(frozen=True)
class VlenArrayInfo:
    """What a reader needs to fetch cells of a per-chunk array."""

    path: str
    origin: tuple[int, ...]
    chunks: tuple[tuple[int, ...], ...]  # present chunks, sorted
    raw_cells: bool  # vlen-bytes only, unsharded: cells can be read as files
    #: Where cells are not plain files (compressed, sharded): the array's
    #: ``zarr.json`` without its attributes, decoded by :class:`KeyLayout`.
    codecs_doc: str | None = None


def vlen_array_info(store: Store, path: str) -> VlenArrayInfo | None:
    doc = read_json(store, f"{path}/zarr.json")
    if doc is None or doc.get("node_type") != "array":
        return None
    attrs = doc.get("attributes") or {}
    ndim = len(doc.get("shape") or [])
    origin = tuple(int(o) for o in attrs.get(ORIGIN, [0] * ndim))
    chunks = tuple(sorted(parse_chunk_key(k) for k in attrs.get(NONEMPTY, [])))
    codecs = [c.get("name") for c in doc.get("codecs") or []]
    enc = (doc.get("chunk_key_encoding") or {})
    grid = ((doc.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
    raw = (codecs == ["vlen-bytes"] and enc.get("name") == "default"
           and (enc.get("configuration") or {}).get("separator", "/") == "/"
           and grid is not None and all(int(g) == 1 for g in grid))
    layout = None if raw else json.dumps({k: v for k, v in doc.items() if k != "attributes"},
                                         sort_keys=True)
    return VlenArrayInfo(path, origin, chunks, raw, layout)


# ------------------------------------------------- compressed / sharded cells
_EMPTY_SLOT = 2 ** 64 - 1  # a shard index entry for an absent inner chunk


class KeyLayout:
    """How the cells of a per-chunk array that are not plain files are
    stored: each storage key holds one zarr chunk of ``key_shape`` cells,
    either encoded by the array's codecs (compressed) or, with
    ``sharding_indexed``, a shard of inner chunks and its index.

    Every decode is zarr's own codec pipeline as the ``zarr.json``
    declares it (bytes, crc32c, vlen-bytes, zstd, blosc, gzip, ...), or for
    the common vlen-bytes + compressor chains the numcodecs codecs zarr
    itself wraps; only the shard's framing -- where the index sits, which
    byte range is which inner chunk -- is read here, so that each range
    can be checked."""

    def __init__(self, doc: str):
        from zarr.codecs import ShardingCodec
        from zarr.core.array_spec import ArrayConfig, ArraySpec
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.dtype import UInt64
        from zarr.core.metadata.v3 import ArrayV3Metadata
        from zarr.registry import get_pipeline_class

        with warnings.catch_warnings():  # vlen-bytes' "unstable specification" note
            warnings.simplefilter("ignore")
            self.meta = meta = ArrayV3Metadata.from_dict(json.loads(doc))
        self.key_shape = tuple(int(s) for s in meta.chunk_grid.chunk_shape)
        config = ArrayConfig(order="C", write_empty_chunks=False)
        proto = default_buffer_prototype()
        pipeline = get_pipeline_class()
        sharding = meta.codecs[0] if len(meta.codecs) == 1 and isinstance(
            meta.codecs[0], ShardingCodec) else None
        self.sharded = sharding is not None
        self.index_direct = None
        if sharding is None:
            self.inner_shape = self.key_shape
            self.inner = pipeline.from_codecs(meta.codecs)
        else:
            self.inner_shape = tuple(int(s) for s in sharding.chunk_shape)
            self.inner = pipeline.from_codecs(sharding.codecs)
            self.per_shard = tuple(k // i for k, i in zip(self.key_shape, self.inner_shape))
            self.index_spec = ArraySpec(shape=self.per_shard + (2,),
                                        dtype=UInt64(endianness="little"),
                                        fill_value=_EMPTY_SLOT, config=config, prototype=proto)
            self.index = pipeline.from_codecs(sharding.index_codecs)
            self.index_size = int(self.index.compute_encoded_size(
                16 * int(np.prod(self.per_shard)), self.index_spec))
            self.index_at_end = str(getattr(sharding.index_location, "value",
                                            sharding.index_location)) == "end"
            # zarr's default index codecs (little-endian bytes, crc32c), as
            # zarr-vectors and we write them: numcodecs' CRC32C, which zarr
            # wraps, in this thread (zarr's pipeline costs ~60 us an index).
            index_names = [c.to_dict() for c in sharding.index_codecs]
            if index_names == [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "crc32c"}]:
                import numcodecs
                self.index_direct = numcodecs.CRC32C()
        self.inner_spec = ArraySpec(shape=self.inner_shape, dtype=meta.data_type,
                                    fill_value=meta.fill_value, config=config, prototype=proto)
        # zarr's pipeline hops threads per chunk (~0.5 ms a cell); for the
        # codecs zarr-vectors writes, whose decode needs no configuration
        # (the frames describe themselves), call the same numcodecs codecs
        # zarr wraps, in this thread.
        names = [c.to_dict()["name"] for c in (sharding.codecs if sharding else meta.codecs)]
        self.direct = None
        if names and names[0] == "vlen-bytes" and all(n in _DIRECT for n in names[1:]):
            import numcodecs
            self.direct = (numcodecs.VLenBytes(),
                           [getattr(numcodecs, _DIRECT[n])() for n in reversed(names[1:])])

    def decode_indexes(self, heads: list[bytes]) -> list[np.ndarray]:
        """Shard indexes (per_shard + (2,) uint64) from their stored bytes;
        a checksum mismatch raises."""
        if self.index_direct is None:
            return self.decode_chunks(self.index, self.index_spec, heads)
        return [np.frombuffer(self.index_direct.decode(h), dtype="<u8").reshape(
            self.per_shard + (2,)) for h in heads]

    def encode_indexes(self, indexes: list[np.ndarray]) -> list[bytes]:
        """Stored bytes of shard indexes (per_shard + (2,) uint64)."""
        if self.index_direct is not None:
            return [bytes(self.index_direct.encode(np.ascontiguousarray(i, dtype="<u8")))
                    for i in indexes]
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync
        make = default_buffer_prototype().nd_buffer.from_numpy_array
        heads = sync(self.index.encode([(make(i), self.index_spec) for i in indexes]))
        return [h.to_bytes() for h in heads]

    def key(self, array_path: str, key_coords: Sequence[int]) -> str:
        return f"{array_path}/{self.meta.encode_chunk_key(tuple(int(c) for c in key_coords))}"

    def decode_inner(self, blobs: list[bytes]) -> list:
        """Cells of several encoded (inner) chunks, each shaped ``inner_shape``."""
        if self.direct is None:
            return self.decode_chunks(self.inner, self.inner_spec, blobs)
        vlen, compressors = self.direct
        out = []
        for b in blobs:
            for c in compressors:
                b = c.decode(b)
            out.append(np.asarray(vlen.decode(b), dtype=object).reshape(self.inner_shape))
        return out

    def decode_chunks(self, pipeline, spec, blobs: list[bytes]) -> list:
        """zarr's decode of several encoded chunks (None for a chunk that
        decodes to nothing)."""
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync
        buf = default_buffer_prototype().buffer
        out = sync(pipeline.decode([(buf.from_bytes(b), spec) for b in blobs]))
        return [None if a is None else a.as_numpy_array() for a in out]


#: Compressors whose decode needs no configuration -> numcodecs class.
_DIRECT = {"zstd": "Zstd", "blosc": "Blosc", "gzip": "GZip"}

_LAYOUTS: dict[str, KeyLayout] = {}


def key_layout(info: VlenArrayInfo) -> KeyLayout:
    """The (per process, cached) decoder of ``info``'s stored keys."""
    if info.codecs_doc is None:
        raise FormatError(f"{info.path}: no array document to decode its cells with")
    lay = _LAYOUTS.get(info.codecs_doc)
    if lay is None:
        try:
            lay = KeyLayout(info.codecs_doc)
        except Exception as exc:  # noqa: BLE001 - an unsupported or broken document
            raise FormatError(f"{info.path}/zarr.json: cannot set up its codecs "
                              f"({type(exc).__name__}: {exc})") from None
        _LAYOUTS[info.codecs_doc] = lay
    return lay


def _cell_value(v) -> bytes | None:
    """One decoded vlen element as bytes; the fill value (empty) as None.
    zarr may nest a 0-d array per element, or return a 0-d fixed-width
    ``S`` array whose ``item()`` drops trailing NUL bytes (a cell ending in
    float 0.0 would lose them): those are read with ``tobytes()``."""
    if v is None:
        return None
    while isinstance(v, np.ndarray):
        if v.dtype.kind == "S":
            v = v.tobytes()
            break
        v = v.item()
    if isinstance(v, str):
        v = v.encode()
    v = bytes(v)
    return v or None


def read_cells(store: Store, info: VlenArrayInfo, coords: Sequence[Sequence[int]]) -> dict[tuple, bytes | None]:
    """Payloads of several cells of a per-chunk array (None where absent).

    Plain cells are read as files; otherwise each storage key (a zarr
    chunk, or a shard) that holds requested cells is read once, and only
    the cells asked for are decoded."""
    coords = [tuple(int(x) for x in c) for c in coords]
    if info.raw_cells:
        keys = {c: cell_path(info.path, c, info.origin) for c in coords}
        raw = store.get_many(list(keys.values()))
        out: dict[tuple, bytes | None] = {}
        for c, k in keys.items():
            v = raw[k]
            out[c] = None if v is None else unframe_cell(
                v, what=lambda c=c: f"{store.describe(info.path)} chunk {chunk_key(c)}")
        return out
    lay = key_layout(info)
    out = dict.fromkeys(coords)
    if not coords:
        return out
    origin = np.asarray(info.origin, dtype=np.int64)
    idx = np.asarray(coords, dtype=np.int64).reshape(len(coords), -1) - origin
    shape = np.asarray(lay.meta.shape, dtype=np.int64)
    # Cells outside the array's grid are absent, as for plain cells.
    ok = np.flatnonzero(np.all((idx >= 0) & (idx < shape), axis=1))
    if ok.size == 0:
        return out
    # Group the cells by storage key with numpy: a reader may ask for
    # ~10^6 candidate cells, most of them absent (see present_cells).
    ks = np.asarray(lay.key_shape, dtype=np.int64)
    kc, loc = idx[ok] // ks, idx[ok] % ks
    kid = np.ravel_multi_index(tuple(kc.T), tuple((-(-shape // ks)).tolist()))
    order = np.argsort(kid, kind="stable")
    cuts = np.flatnonzero(np.diff(kid[order])) + 1
    groups: dict[tuple, _Cells] = {}
    for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, order.size].tolist()):
        sel = order[lo:hi]
        groups[tuple(kc[sel[0]].tolist())] = _Cells(coords, ok[sel], loc[sel])
    if lay.sharded:
        _read_sharded(store, info, lay, groups, out)
    else:
        _read_chunked(store, info, lay, groups, out)
    return out


class _Cells:
    """Cells asked for in one storage key: positions in the caller's
    coordinate list and positions within the key, as arrays; iterating
    gives ``(chunk coords, local index)`` pairs."""

    def __init__(self, coords: list, pos: np.ndarray, loc: np.ndarray):
        self.coords, self.pos, self.loc = coords, pos, loc

    def __len__(self) -> int:
        return int(self.pos.size)

    def __iter__(self):
        coords = self.coords
        return iter([(coords[p], tuple(l)) for p, l in zip(self.pos.tolist(),
                                                           self.loc.tolist())])

    def __getitem__(self, item: slice) -> list:
        return list(_Cells(self.coords, self.pos[item], self.loc[item]))

    def subset(self, mask: np.ndarray) -> "_Cells":
        return _Cells(self.coords, self.pos[mask], self.loc[mask])


def present_cells(store: Store, info: VlenArrayInfo, coords: np.ndarray) -> np.ndarray:
    """Which chunks ``coords`` (n, d) may have a cell, as a mask, from one
    listing per leading index of the storage keys they fall in: a reader
    probing cells it cannot know exist (a chunk's links may sit in any of
    ~3^d offset arrays) pays a listing per slab, not a request per cell
    (plain arrays) or a shard-index read per shard (sharded ones: a chunk
    whose shard exists is kept; its index says the rest)."""
    rel = np.asarray(coords, dtype=np.int64).reshape(len(coords), -1) - \
        np.asarray(info.origin, dtype=np.int64)
    n, ndim = rel.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if not info.raw_cells:
        rel = rel // np.asarray(key_layout(info).key_shape, dtype=np.int64)
    found: list[list[int]] = []
    leads = [None] if ndim == 1 else np.unique(rel[:, 0]).tolist()
    for lead in leads:
        if lead is not None and lead < 0:
            continue
        under = f"{info.path}/c" if lead is None else f"{info.path}/c/{lead}"
        for key in store.keys_under(under):
            parts = key.split("/")
            if len(parts) == ndim - (lead is not None) and all(p.isdigit() for p in parts):
                found.append(([] if lead is None else [lead]) + [int(p) for p in parts])
    if not found:
        return np.zeros(n, dtype=bool)
    both = np.vstack([rel, np.asarray(found, dtype=np.int64)])
    both -= both.min(axis=0)
    spans = both.max(axis=0) + 1
    if float(np.prod(spans.astype(np.float64))) < 2.0 ** 62:
        key = np.ravel_multi_index(tuple(both.T), tuple(spans.tolist()))
    else:  # a huge sparse grid: rank the rows instead
        key = np.unique(both, axis=0, return_inverse=True)[1].reshape(-1)
    return np.isin(key[:n], key[n:])


def _where(store: Store, info: VlenArrayInfo, cells, key: str | None = None) -> str:
    """``<array> chunk(s) <keys> (key <storage key>)`` for messages."""
    names = ", ".join(chunk_key(c) for c, _ in cells[:3]) + (" ..." if len(cells) > 3 else "")
    plural = "s" if len(cells) > 1 else ""
    stored = f" (key {key[len(info.path) + 1:]})" if key else ""
    return f"{store.describe(info.path)} chunk{plural} {names}{stored}"


def _decode_checked(store, info, lay, blobs, cells_of, keys) -> list:
    """Decode inner chunks ``blobs`` in one batch; when the batch fails,
    again one by one so the error names the chunk whose bytes are damaged."""
    try:
        return lay.decode_inner(blobs)
    except Exception:  # noqa: BLE001 - located below
        pass
    out = []
    for b, cells, key in zip(blobs, cells_of, keys):
        try:
            out.extend(lay.decode_inner([b]))
        except Exception as exc:  # noqa: BLE001
            raise CorruptChunkError(f"{_where(store, info, cells, key)}: cannot be decoded "
                                    f"({type(exc).__name__}: {exc})") from None
    raise CorruptChunkError(f"{store.describe(info.path)}: a batch of chunks cannot be "
                            f"decoded, though each one alone can")


def _read_chunked(store, info, lay, groups, out) -> None:
    """Compressed (unsharded) cells: one zarr chunk per key."""
    kcs = list(groups)
    keys = [lay.key(info.path, kc) for kc in kcs]
    raw = store.get_many(keys)
    have = [(kc, k) for kc, k in zip(kcs, keys) if raw[k] is not None]
    arrays = _decode_checked(store, info, lay, [raw[k] for _, k in have],
                             [groups[kc] for kc, _ in have], [k for _, k in have])
    for (kc, _), arr in zip(have, arrays):
        for c, local in groups[kc]:
            out[c] = None if arr is None else _cell_value(arr[local])


def _read_sharded(store, info, lay, groups, out) -> None:
    """Sharded cells: per shard, its index (one ranged read), then the
    byte ranges of just the inner chunks asked for, adjacent ones merged
    (one more ranged read each), decoded in one batch."""
    kcs = list(groups)
    keys = [lay.key(info.path, kc) for kc in kcs]
    span = (-lay.index_size, None) if lay.index_at_end else (0, lay.index_size)
    # On a local disk a whole shard is one open and read, cheaper than its
    # index and then its ranges; on an object store, ranged reads.
    whole = store.get_many(keys) if store.is_local else None
    heads = [None if whole[k] is None else whole[k][slice(*span)] for k in keys] \
        if whole is not None else store.get_ranges([(k, *span) for k in keys])
    present = []  # (shard coords, key, index bytes) of the shards that exist
    for kc, key, head in zip(kcs, keys, heads):
        if head is None:
            continue  # no shard: its cells are absent
        if len(head) != lay.index_size:
            raise CorruptChunkError(
                f"{_where(store, info, groups[kc], key)}: shard is truncated ({len(head)} bytes, "
                f"shorter than its {lay.index_size}-byte index)")
        present.append((kc, key, head))
    indexes = _decode_indexes(store, info, lay, groups, present)
    wanted: list[tuple] = []  # (shard key, cells, inner chunk coords, start, stop)
    inner_shape = np.asarray(lay.inner_shape, dtype=np.int64)
    for (kc, key, _), index in zip(present, indexes):
        index = np.asarray(index, dtype=np.uint64).reshape(lay.per_shard + (2,))
        # Drop the cells whose inner chunk the index says is absent, all at
        # once; only the present ones go through the loop below.
        asked = groups[kc]
        entry = index[tuple((asked.loc // inner_shape).T)]
        cells = asked.subset((entry[:, 0] != _EMPTY_SLOT) | (entry[:, 1] != _EMPTY_SLOT))
        by_inner: dict[tuple, list] = {}
        for c, local in cells:
            ic = tuple(a // i for a, i in zip(local, lay.inner_shape))
            by_inner.setdefault(ic, []).append((c, local))
        for ic, members in by_inner.items():
            off, n = (int(x) for x in index[ic])
            if off == _EMPTY_SLOT and n == _EMPTY_SLOT:
                continue  # no inner chunk: absent cells
            lo = lay.index_size if not lay.index_at_end else 0
            if off == _EMPTY_SLOT or n == _EMPTY_SLOT or off < lo or n > 2 ** 48:
                raise CorruptChunkError(
                    f"{_where(store, info, members, key)}: shard index entry "
                    f"(offset {off}, length {n}) is not a valid byte range")
            wanted.append((key, members, ic, off, off + n))
    if not wanted:
        return
    # Merge touching ranges of one shard into one read.
    wanted.sort(key=lambda w: (w[0], w[3]))
    reads: list[list] = []  # [key, start, stop]
    at: list[int] = []
    for key, _m, _ic, a, b in wanted:
        if reads and reads[-1][0] == key and a <= reads[-1][2]:
            reads[-1][2] = max(reads[-1][2], b)
        else:
            reads.append([key, a, b])
        at.append(len(reads) - 1)
    got = [whole[k][a:b] for k, a, b in reads] if whole is not None \
        else store.get_ranges([tuple(r) for r in reads])
    blobs = []
    for (key, members, _ic, a, b), r in zip(wanted, at):
        data, (_, ra, rb) = got[r], reads[r]
        if data is None or len(data) != rb - ra:
            raise CorruptChunkError(
                f"{_where(store, info, members, key)}: shard is truncated (bytes {ra}..{rb} "
                f"asked for, {0 if data is None else len(data)} read)")
        blobs.append(data[a - ra:b - ra])
    arrays = _decode_checked(store, info, lay, blobs,
                             [w[1] for w in wanted], [w[0] for w in wanted])
    for (key, members, ic, _a, _b), arr in zip(wanted, arrays):
        for c, local in members:
            within = tuple(a % i for a, i in zip(local, lay.inner_shape))
            out[c] = None if arr is None else _cell_value(arr[within])


def _decode_indexes(store, info, lay, groups, present) -> list:
    """Every shard index of ``present`` (shard coords, key, bytes), decoded
    in one call; when that fails, one by one, to name the damaged shard."""
    try:
        return lay.decode_indexes([h for _, _, h in present]) if present else []
    except Exception:  # noqa: BLE001 - find which shard, below
        pass
    out = []
    for kc, key, head in present:
        try:
            (index,) = lay.decode_indexes([head])
        except Exception as exc:  # noqa: BLE001
            raise CorruptChunkError(f"{_where(store, info, groups[kc], key)}: shard index cannot "
                                    f"be decoded ({type(exc).__name__}: {exc})") from None
        out.append(index)
    return out


# ------------------------------------------------------------ writing shards
def normalize_shard_shape(shard_shape, ndim: int) -> tuple[int, ...] | None:
    """``None``, an int (every axis) or one int per axis, in chunks."""
    if shard_shape is None:
        return None
    values = [shard_shape] * ndim if isinstance(shard_shape, (int, np.integer)) \
        else list(shard_shape)
    if len(values) != ndim:
        raise ValueError(f"shard_shape {tuple(values)} has {len(values)} axes; the store's "
                         f"chunk grid has {ndim}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise ValueError(f"shard_shape {tuple(values)}: every axis must be a whole number "
                             f"of chunks >= 1 (got {v!r})")
        out.append(int(v))
    return tuple(out)


def shard_key(array_path: str, shard: Sequence[int]) -> str:
    """Storage key of one shard of a sharded per-chunk array."""
    return f"{array_path}/c/" + "/".join(str(int(i)) for i in shard)


@functools.lru_cache(maxsize=16)
def _shard_layout(shard_shape: tuple[int, ...]) -> KeyLayout:
    """The codecs of a sharded per-chunk array as :func:`vlen_array_doc`
    declares them (they do not depend on the grid's size).  Cached: zarr
    builds an array to render them, ~1 ms, and a task encodes thousands."""
    doc = json.loads(vlen_array_doc(shard_shape, {}, shard_shape))
    return key_layout(VlenArrayInfo("(shard layout)", (0,) * len(shard_shape), (), False,
                                    json.dumps({k: v for k, v in doc.items()
                                                if k != "attributes"}, sort_keys=True)))


def encode_shard(shard_shape: tuple[int, ...], cells: Sequence[tuple[tuple, bytes]]) -> bytes:
    """One shard of a sharded per-chunk array (see :func:`encode_shards`)."""
    return encode_shards(shard_shape, [cells])[0]


def encode_shards(shard_shape: tuple[int, ...],
                  shards: Sequence[Sequence[tuple[tuple, bytes]]]) -> list[bytes]:
    """Shards of a sharded per-chunk array: each present cell's inner
    chunk (one vlen-bytes element: exactly :func:`frame_cell`), back to
    back, then the index of (offset, length) per inner chunk, encoded by
    the array's own index codecs (zarr's: bytes + crc32c) and placed where
    its ``index_location`` says.  ``shards``: per shard, its cells as
    (position in the shard, framed payload)."""
    lay = _shard_layout(tuple(int(s) for s in shard_shape))
    indexes, bodies = [], []
    for cells in shards:
        index = np.full(tuple(shard_shape) + (2,), _EMPTY_SLOT, dtype=np.uint64)
        at = lay.index_size if not lay.index_at_end else 0
        parts = []
        for local, blob in sorted(cells, key=lambda c: tuple(c[0])):
            index[tuple(int(i) for i in local)] = (at, len(blob))
            parts.append(blob)
            at += len(blob)
        indexes.append(index)
        bodies.append(b"".join(parts))
    heads = lay.encode_indexes(indexes)
    return [body + head if lay.index_at_end else head + body
            for body, head in zip(bodies, heads)]


def pack_cells(paths: Sequence[str], where: np.ndarray, payloads: Sequence[bytes]) -> bytes:
    """Framed cells bound for shards, as one exchange file: the array path
    of each (an index into ``paths``), its grid index and its bytes."""
    lengths = np.fromiter((len(p) for p in payloads), dtype=np.int64, count=len(payloads))
    names = sorted(set(paths))
    number = {n: i for i, n in enumerate(names)}
    return pack_columns({
        "names": np.frombuffer(json.dumps(names).encode(), dtype=np.uint8),
        "array": np.fromiter((number[p] for p in paths), dtype=np.int32, count=len(paths)),
        "where": np.asarray(where, dtype=np.int64),
        "bounds": np.r_[0, np.cumsum(lengths)].astype(np.int64),
        "data": np.frombuffer(b"".join(payloads), dtype=np.uint8)})


def unpack_cells(raw: bytes, *, what: str) -> list[tuple[str, tuple, bytes]]:
    """Inverse of :func:`pack_cells`: (array path, grid index, framed bytes)."""
    cols = unpack_columns(raw, what=what)
    try:
        names = json.loads(cols["names"].tobytes())
        data, b = cols["data"].tobytes(), cols["bounds"].tolist()
        return [(names[a], tuple(w), data[b[i]:b[i + 1]])
                for i, (a, w) in enumerate(zip(cols["array"].tolist(), cols["where"].tolist()))]
    except Exception as exc:  # noqa: BLE001
        raise CorruptChunkError(f"{what}: exchange file cannot be decoded: {exc}") from None


def read_chunk_checked(store: Store, path: str, where: str, read):
    """``read()`` (a zarr read of one chunk's worth of ``path``), with its
    failures told apart: transient store errors are retried (object stores
    already retried them inside the zarr store) and re-raised as they are;
    access errors are re-raised as they are; anything else means the
    stored bytes cannot be decoded: :class:`CorruptChunkError` naming the
    array and ``where`` (the chunk)."""
    from .store import StoreAccessError, _is_transient, with_retries
    try:
        return with_retries(read, what=store.describe(path),
                            attempts=8 if store.is_local else 1)
    except (StoreAccessError, PermissionError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - classified here
        if _is_transient(exc):
            raise
        raise CorruptChunkError(f"{store.describe(path)} {where}: cannot be read or decoded "
                                f"({type(exc).__name__}: {exc})") from exc


def read_rows_checked(store: Store, arr, path: str, lo: int, hi: int):
    """Rows ``lo:hi`` of a 1-D-chunked zarr array, chunk by chunk through
    :func:`read_chunk_checked`, so a damaged chunk is named."""
    import numpy as np
    step = int(arr.chunks[0]) or 1
    parts = []
    a = lo
    while a < hi:
        b = min(hi, (a // step + 1) * step)
        parts.append(read_chunk_checked(store, path, f"chunk {a // step}",
                                        lambda a=a, b=b: arr[a:b]))
        a = b
    if not parts:
        return arr[lo:hi]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
