"""Cell payloads, byte-identical to zarr-vectors': cell framing, metavertex
and vertex cells, link cells, the columnar manifest table, and the columns
of an exchange file."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from zarr_vectors.encoding.fragments import (FRAGMENT_INDEX_MAGIC, FRAGMENT_INDEX_VERSION,
                                             decode_fragments, decode_object_manifests_many,
                                             encode_fragments, encode_object_manifest_blocks)
from zarr_vectors.encoding.ragged import decode_ragged_blob

from ..errors import CorruptChunkError
from ..storage.store import Parts

__all__ = ["frame_cell", "unframe_cell", "encode_metavertex_cell", "single_vertex_fragments",
           "decode_vertex_cell",
           "expand_ranges", "framed_link_cells", "link_cell_records", "link_cells_records",
           "decode_link_cell", "ManifestTable", "encode_manifest_table", "manifest_items",
           "empty_manifest", "decode_manifest_table", "pack_columns", "unpack_columns"]


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
    return verts, single_vertex_fragments(int(centroids.shape[0]))


#: zarr-vectors' fragment-index header: magic, version, flags, fragments, range fragments.
_FRAGMENT_HEADER = struct.Struct("<IHHII")


def single_vertex_fragments(n: int) -> bytes:
    """The ``vertex_fragments`` payload of ``n`` fragments ``(i, 1)``: the
    bytes zarr-vectors' ``encode_fragments`` writes for them (all ranges:
    the bitmap all ones, padded to 8 bytes, then the int64 table and one
    zero CSR offset), built by numpy instead of from a list of tuples."""
    if n == 0:
        return encode_fragments([])
    bitmap = np.zeros(((n + 7) // 8 + 7) & ~7, dtype=np.uint8)
    full, rem = divmod(n, 8)
    bitmap[:full] = 0xFF
    if rem:
        bitmap[full] = (1 << rem) - 1
    table = np.ones((n, 2), dtype="<i8")
    table[:, 0] = np.arange(n)
    return b"".join([_FRAGMENT_HEADER.pack(FRAGMENT_INDEX_MAGIC, FRAGMENT_INDEX_VERSION, 0, n, n),
                     bitmap.tobytes(), table.tobytes(), bytes(4)])


def _fragment_index(frag_payload: bytes, what):
    """zarr-vectors' decoded ``vertex_fragments`` cell; undecodable bytes
    are a :class:`CorruptChunkError` naming the chunk."""
    try:
        return decode_fragments(frag_payload)
    except Exception as exc:  # noqa: BLE001
        raise CorruptChunkError(f"{_named(what)}: vertex_fragments cannot be decoded: "
                                f"{exc}") from None


def fragment_lengths(frag_payload: bytes, *, what) -> np.ndarray:
    """How many rows each fragment of a chunk names (fragment order), from
    its ``vertex_fragments`` cell alone."""
    fi = _fragment_index(frag_payload, what)
    table = fi.ranges()
    if table is not None:
        return np.asarray(table[:, 1], dtype=np.int64)
    return np.fromiter((len(fi.indices(f)) for f in range(fi.num_fragments)), dtype=np.int64,
                       count=fi.num_fragments)


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
    fi = _fragment_index(frag_payload, what)
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


def framed_link_cells(rows: np.ndarray, starts, stops) -> list[Parts]:
    """``frame_cell(encode_ragged_blob([rows[a:b]], int64))`` for each
    ``(a, b)``: a header and a view of one buffer each, never copied per
    cell (a pyramid has tens of thousands of these, ~1 GB at 10^7 vertices)."""
    view = memoryview(np.ascontiguousarray(rows, dtype="<i8").reshape(-1).view(np.uint8))
    pack = _LINK_CELL_HEAD.pack
    return [Parts(pack(1, 16 + 16 * (b - a), 1, 0), view[16 * a:16 * b])
            for a, b in zip(starts, stops)]


def link_cell_records(size: int) -> int:
    """Records in a link cell of ``size`` bytes as ``framed_link_cells``
    writes it (one uncompressed group of int64 pairs)."""
    n, rem = divmod(int(size) - _LINK_CELL_HEAD.size, 16)
    if n < 0 or rem:
        raise CorruptChunkError(f"a link cell of {size} bytes is not one group of int64 pairs")
    return n


def link_cells_records(sizes) -> list[int]:
    """:func:`link_cell_records` of many cells."""
    n, rem = np.divmod(np.asarray(sizes, dtype=np.int64) - _LINK_CELL_HEAD.size, 16)
    bad = np.flatnonzero((n < 0) | (rem != 0))
    if bad.size:
        link_cell_records(int(np.asarray(sizes)[bad[0]]))  # raises, naming the size
    return n.tolist()


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
    if counts.size == 0:
        return []
    raw = _manifest_bytes(table, sid_ndim, with_lengths=False)
    ends = np.cumsum(4 + counts * (sid_ndim * 8 + 9))
    return [raw[a:b] for a, b in zip((np.r_[0, ends[:-1]]).tolist(), ends.tolist())]


def manifest_items(table: ManifestTable, sid_ndim: int, size: int) -> bytes:
    """The blobs of :func:`encode_manifest_table` as ``size`` items of
    zarr's vlen-bytes layout (a uint32 item count, then per item its
    uint32 length and bytes), padded with empty items: a manifest bucket
    before compression, built without a bytes object per row."""
    n = int(np.asarray(table.counts).size)
    if n > size:
        raise ValueError(f"{n} manifests do not fit a bucket of {size}")
    head = np.asarray(size, dtype="<u4").tobytes()
    return b"".join((head, _manifest_bytes(table, sid_ndim, True), bytes(4 * (size - n))))


def _manifest_bytes(table: ManifestTable, sid_ndim: int, with_lengths: bool) -> bytes:
    """Every object's blob back to back, each (``with_lengths``) after
    its uint32 byte length: the blocks are written as columns, and each
    object's head inserted before its first block in one pass."""
    counts = np.asarray(table.counts, dtype=np.int64)
    block = sid_ndim * 8 + 9
    total = int(counts.sum())
    rows = np.empty((total, block), dtype=np.uint8)
    if total:
        rows[:, :sid_ndim * 8] = np.ascontiguousarray(table.coords, dtype="<i8").view(
            np.uint8).reshape(total, sid_ndim * 8)
        rows[:, sid_ndim * 8] = _MODE_SINGLE
        rows[:, sid_ndim * 8 + 1:] = np.ascontiguousarray(table.frags, dtype="<i8").view(
            np.uint8).reshape(total, 8)
    heads = [4 + counts * block, counts] if with_lengths else [counts]
    head = np.stack(heads, axis=1).astype("<u4").view(np.uint8).reshape(-1)
    first = (np.cumsum(counts) - counts) * block
    return np.insert(rows.reshape(-1), np.repeat(first, 4 * len(heads)), head).tobytes()


def empty_manifest(sid_ndim: int) -> bytes:
    return encode_object_manifest_blocks([], sid_ndim=sid_ndim)


def decode_manifest_table(blobs: Sequence[bytes], sid_ndim: int) -> ManifestTable:
    """Columns of many manifest blobs.  Range and explicit-list blocks are
    expanded to one reference per fragment, as zarr-vectors' reader does."""
    n = len(blobs)
    block = sid_ndim * 8 + 9
    lengths = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=n)
    if n and int(lengths.min()) >= 4 and not np.any((lengths - 4) % block):
        counts = np.frombuffer(b"".join([b[:4] for b in blobs]), dtype="<u4").astype(np.int64)
        if np.array_equal(counts, (lengths - 4) // block):
            # The blocks back to back, read as packed records (no per-byte
            # gather: a coarse level's rows name tens of metavertices each).
            record = np.dtype([("coords", "<i8", (sid_ndim,)), ("mode", "u1"), ("frag", "<i8")])
            body = np.frombuffer(b"".join([b[4:] for b in blobs]), dtype=record)
            if not np.any(body["mode"] != _MODE_SINGLE):
                return ManifestTable(counts,
                                     body["coords"].astype(np.int64).reshape(-1, sid_ndim),
                                     body["frag"].astype(np.int64))
    # Anything else (ranges, explicit lists): zarr-vectors' general decoder.
    from zarr_vectors.core.arrays import expand_manifest_blocks
    decoded, uniform = decode_object_manifests_many(list(blobs), sid_ndim=sid_ndim)
    refs = decoded if uniform else [expand_manifest_blocks(b) for b in decoded]
    counts = np.fromiter((len(m) for m in refs), dtype=np.int64, count=n)
    flat = [r for m in refs for r in m]
    coords = np.array([c for c, _ in flat], dtype=np.int64).reshape(len(flat), sid_ndim)
    frags = np.array([f for _, f in flat], dtype=np.int64).reshape(len(flat))
    return ManifestTable(counts, coords, frags)


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
