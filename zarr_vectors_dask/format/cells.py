"""Reading a level's cells as its arrays' ``zarr.json`` declares them:
plain, compressed (zarr's own codecs) or sharded; a damaged cell or shard
is an error naming the array, chunk and key."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import CorruptChunkError, FormatError
from ..storage.store import Store
from .buckets import BucketCodec
from .codecs import unframe_cell
from .documents import read_json
from .naming import NONEMPTY, ORIGIN, cell_path, chunk_key, parse_chunk_keys

__all__ = ["VlenArrayInfo", "vlen_array_info", "KeyLayout", "key_layout", "read_cells",
           "present_cells", "read_chunk_checked", "read_rows_checked", "read_row_chunks",
           "read_rows_at"]


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
    parsed = parse_chunk_keys(attrs.get(NONEMPTY) or [], ndim)
    parsed = parsed[np.lexsort(parsed.T[::-1])] if len(parsed) else parsed  # row order
    chunks = tuple(map(tuple, parsed.tolist()))
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
    whole = store.get_many(keys) if store.prefers_whole_reads else None
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


def read_chunk_checked(store: Store, path: str, where: str, read):
    """``read()`` (a zarr read of one chunk's worth of ``path``), with its
    failures told apart: transient store errors are retried (object stores
    already retried them inside the zarr store) and re-raised as they are;
    access errors are re-raised as they are; anything else means the
    stored bytes cannot be decoded: :class:`CorruptChunkError` naming the
    array and ``where`` (the chunk)."""
    from ..storage.store import StoreAccessError, is_transient, with_retries
    try:
        return with_retries(read, what=store.describe(path),
                            attempts=store.zarr_read_attempts)
    except (StoreAccessError, PermissionError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - classified here
        if is_transient(exc):
            raise
        raise CorruptChunkError(f"{store.describe(path)} {where}: cannot be read or decoded "
                                f"({type(exc).__name__}: {exc})") from exc


def read_rows_checked(store: Store, arr, path: str, lo: int, hi: int):
    """Rows ``lo:hi`` of a 1-D-chunked zarr array, chunk by chunk through
    :func:`read_chunk_checked`, so a damaged chunk is named."""
    step = int(arr.chunks[0]) or 1
    codec = BucketCodec.of(arr.metadata.to_dict())
    parts = []
    a = lo
    while a < hi:
        b = min(hi, (a // step + 1) * step)
        if codec is None:
            read = (lambda a=a, b=b: arr[a:b])
        else:  # zarr's own codecs, called directly (format.buckets)
            k = a // step
            raw = store.get(codec.key(path, k))  # (the store retries its own errors)
            read = (lambda a=a, b=b, k=k, raw=raw:
                    codec.decode(raw, k)[a - k * step:b - k * step])
        parts.append(read_chunk_checked(store, path, f"chunk {a // step}", read))
        a = b
    if not parts:
        return arr[lo:hi]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def read_row_chunks(store: Store, arr, path: str, chunks):
    """``(first row, rows)`` of each of the given row chunks of a
    1-D-chunked zarr array, in order, one read each through
    :func:`read_rows_checked`."""
    step, n = int(arr.chunks[0]) or 1, int(arr.shape[0])
    for c in sorted(set(chunks)):
        lo, hi = c * step, min(n, (c + 1) * step)
        if hi > lo:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rows = read_rows_checked(store, arr, path, lo, hi)
            yield lo, rows


def read_rows_at(store: Store, arr, path: str, rows) -> list[bytes]:
    """The values (as bytes) at the row numbers ``rows``, in their order:
    each row chunk holding one read once (rows of unsorted ids can be
    anywhere)."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(rows.size, dtype=object)
    out[:] = [b""] * rows.size
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    step = int(arr.chunks[0]) or 1
    for lo, got in read_row_chunks(store, arr, path, np.unique(ordered // step).tolist()):
        a, b = np.searchsorted(ordered, [lo, lo + len(got)])
        out[order[a:b]] = np.asarray(got, dtype=object)[ordered[a:b] - lo]
    # zarr may hand back other bytes-like values (see _cell_value)
    return [v if type(v) is bytes else bytes(v) for v in out.tolist()]
