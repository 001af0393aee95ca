"""Writing shards (Zarr v3's sharding codec, as zarr writes them) and the
packed cells a shard writer receives."""

from __future__ import annotations

import functools
import json
from typing import Sequence

import numpy as np

from ..errors import CorruptChunkError
from ..storage.store import joined
from .cells import _EMPTY_SLOT, KeyLayout, VlenArrayInfo, key_layout
from .codecs import pack_columns, unpack_columns
from .documents import vlen_array_doc

__all__ = ["normalize_shard_shape", "shard_key", "shard_layout", "encode_shard", "encode_shards",
           "pack_cells", "unpack_cells"]


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
def shard_layout(shard_shape: tuple[int, ...]) -> KeyLayout:
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
    lay = shard_layout(tuple(int(s) for s in shard_shape))
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
    payloads = [joined(p) for p in payloads]
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
