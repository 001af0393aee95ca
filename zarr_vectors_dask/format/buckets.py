"""Buckets of a 1-D variable-length array (the object manifests), read and
written as stored keys, without zarr's array machinery.

A bucket is one stored chunk: zarr's vlen-bytes layout of ``size`` items
(padded with empty ones past the array's end), then zstd.  zarr's own
write of one costs about twice the two codecs it calls (a coarse level's
bucket holds ~22 MB of rows: 52 ms against 27 ms), so for the chain this
project writes, the same numcodecs codecs zarr wraps are called here
directly.  :meth:`BucketCodec.of` is None for any other layout (sharded,
another compressor, other keys): the caller uses zarr then.  The bytes are
zarr's own, which the tests check."""

from __future__ import annotations

import numpy as np

__all__ = ["BucketCodec"]


class BucketCodec:
    """Decode and encode the buckets of one array, as its ``zarr.json``
    declares them."""

    def __init__(self, size: int, n_rows: int, level: int, checksum: bool):
        import numcodecs
        self.size, self.n_rows = size, n_rows
        self.vlen = numcodecs.VLenBytes()
        self.zstd = numcodecs.Zstd(level=level, checksum=checksum)

    @classmethod
    def of(cls, doc: dict) -> "BucketCodec | None":
        """The codec for an array document (a dict, as ``zarr.json`` or
        zarr's ``metadata.to_dict()`` has it), or None when its layout is
        not exactly the one handled here."""
        try:
            codecs = [dict(c) for c in doc["codecs"]]
            (size,) = doc["chunk_grid"]["configuration"]["chunk_shape"]
            (n_rows,) = doc["shape"]
            ok = (doc.get("node_type") == "array"
                  and doc["data_type"] == "variable_length_bytes"
                  and doc["fill_value"] == ""
                  and doc["chunk_grid"]["name"] == "regular"
                  and dict(doc["chunk_key_encoding"]) == {"name": "default",
                                                           "configuration": {"separator": "/"}}
                  and not doc.get("storage_transformers")
                  and len(codecs) == 2 and codecs[0] == {"name": "vlen-bytes",
                                                         "configuration": {}}
                  and codecs[1]["name"] == "zstd"
                  and set(codecs[1]["configuration"]) == {"level", "checksum"})
        except (KeyError, TypeError, ValueError):
            return None
        if not ok or int(size) < 1:
            return None
        cfg = codecs[1]["configuration"]
        return cls(int(size), int(n_rows), int(cfg["level"]), bool(cfg["checksum"]))

    def key(self, array_path: str, bucket: int) -> str:
        return f"{array_path}/c/{int(bucket)}"

    def bucket_of(self, lo: int, hi: int) -> int | None:
        """The bucket that rows ``lo:hi`` are (part of, from its first row),
        or None when they are not one bucket's: then zarr reads or writes
        them."""
        return lo // self.size if lo % self.size == 0 and hi - lo <= self.size else None

    def rows_in(self, bucket: int) -> int:
        """How many of the array's rows bucket ``bucket`` holds."""
        return max(0, min(self.size, self.n_rows - bucket * self.size))

    def decode(self, stored: bytes | None, bucket: int) -> np.ndarray:
        """The array's rows in a bucket (an object array of bytes); an
        absent bucket (None) is all empty rows.  ValueError when the
        stored bytes are not ``size`` items of the layout."""
        n = self.rows_in(bucket)
        if stored is None:
            out = np.empty(n, dtype=object)
            out[:] = [b""] * n
            return out
        items = self.vlen.decode(self.zstd.decode(stored))
        if items.shape != (self.size,):
            raise ValueError(f"{items.size} items in the chunk, expected {self.size}")
        return items[:n]

    def encode(self, rows) -> bytes | None:
        """The stored bytes of a bucket whose first rows are ``rows`` (bytes
        each); None when every row is empty: zarr writes no chunk then
        (``write_empty_chunks`` is off), and removes a stored one."""
        items = np.empty(self.size, dtype=object)
        items[:len(rows)] = rows
        items[len(rows):] = [b""] * (self.size - len(rows))
        if not any(len(r) for r in items[:len(rows)].tolist()):
            return None
        return bytes(self.zstd.encode(self.vlen.encode(items)))

    def encode_items(self, items: bytes) -> bytes:
        """The stored bytes of a bucket already in the vlen-bytes layout
        (``size`` items, see ``codecs.manifest_items``), not all empty."""
        return bytes(self.zstd.encode(items))
