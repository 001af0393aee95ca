"""``format.buckets``: manifest buckets encoded and decoded without zarr's
array machinery must be zarr's own bytes and rows."""

import json
import os
import warnings

import numpy as np
import pytest
import zarr

from zarr_vectors_dask.errors import CorruptChunkError
from zarr_vectors_dask.format import cells as fcells
from zarr_vectors_dask.format import documents as fdoc
from zarr_vectors_dask.format.buckets import BucketCodec
from zarr_vectors_dask.storage.store import Store

SIZE = 16_384  # naming.MANIFEST_BUCKET: manifests_doc's chunk


def _rows(rng, n):
    """Manifest-like rows: empty ones, rows ending in NUL bytes (numpy's
    fixed-width bytes would drop them), long and short ones."""
    out = []
    for i in range(n):
        k = int(rng.integers(0, 6))
        out.append(b"" if k == 0 else rng.bytes(int(rng.integers(1, 200))) + b"\0" * (k == 1))
    return out


def _zarr_array(tmp_path, n_rows):
    root = str(tmp_path / "s")
    os.makedirs(f"{root}/m", exist_ok=True)
    with open(f"{root}/m/zarr.json", "wb") as fh:
        fh.write(fdoc.manifests_doc(n_rows))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return root, zarr.open_array(root, path="m", mode="r+")


def _write_with_zarr(arr, lo, rows):
    obj = np.empty(len(rows), dtype=object)
    obj[:] = rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr[lo:lo + len(rows)] = obj


@pytest.mark.parametrize("n_rows", [SIZE + 1000, 700])  # a partial last bucket; one small bucket
def test_encoded_buckets_are_zarrs_bytes_and_decode_to_its_rows(tmp_path, n_rows):
    rng = np.random.default_rng(n_rows)
    root, arr = _zarr_array(tmp_path, n_rows)
    rows = _rows(rng, n_rows)
    _write_with_zarr(arr, 0, rows)
    codec = BucketCodec.of(json.loads(fdoc.manifests_doc(n_rows)))
    assert codec is not None and codec.size == min(SIZE, n_rows)
    for k in range(-(-n_rows // codec.size)):
        lo = k * codec.size
        mine = rows[lo:lo + codec.size]
        with open(f"{root}/m/c/{k}", "rb") as fh:
            stored = fh.read()
        assert codec.encode(mine) == stored
        assert codec.decode(stored, k).tolist() == mine
        # zarr's metadata dict (tuples, not lists) gives the same codec
        assert BucketCodec.of(arr.metadata.to_dict()).encode(mine) == stored


@pytest.mark.parametrize("ndim,n", [(3, 700), (2, SIZE)])  # a partial bucket; a full one
def test_a_manifest_table_encoded_as_a_bucket_is_its_blobs_bucket(ndim, n):
    """The bucket built straight from a table (no bytes object per row)
    is the one its blobs make: empty manifests, long ones, padding."""
    from zarr_vectors_dask.format import codecs as cdc
    rng = np.random.default_rng(n)
    counts = rng.integers(0, 9, size=n)
    counts[:2] = 0
    total = int(counts.sum())
    table = cdc.ManifestTable(counts, rng.integers(-4, 90, size=(total, ndim)),
                              rng.integers(0, 1 << 40, size=total))
    codec = BucketCodec.of(json.loads(fdoc.manifests_doc(SIZE)))
    blobs = cdc.encode_manifest_table(table, ndim)
    assert codec.encode_items(cdc.manifest_items(table, ndim, codec.size)) == codec.encode(blobs)
    with pytest.raises(ValueError, match="do not fit"):
        cdc.manifest_items(table, ndim, n - 1)


def test_a_bucket_of_empty_rows_is_no_key_as_zarr_writes_none(tmp_path):
    root, arr = _zarr_array(tmp_path, SIZE + 10)
    _write_with_zarr(arr, SIZE, [b"x"] * 10)
    _write_with_zarr(arr, SIZE, [b""] * 10)  # zarr removes the stored chunk
    assert not os.path.exists(f"{root}/m/c/1")
    codec = BucketCodec.of(arr.metadata.to_dict())
    assert codec.encode([b""] * 10) is None
    assert codec.decode(None, 1).tolist() == [b""] * 10  # absent: zarr's fill value
    assert codec.decode(None, 0).tolist() == [b""] * SIZE


def test_other_layouts_are_left_to_zarr():
    doc = json.loads(fdoc.manifests_doc(100))
    assert BucketCodec.of(doc) is not None
    wide = BucketCodec.of(json.loads(fdoc.manifests_doc(3 * SIZE)))
    runs = ((0, SIZE), (SIZE, 2 * SIZE), (2 * SIZE, 2 * SIZE + 5))
    assert [wide.bucket_of(lo, hi) for lo, hi in runs] == [0, 1, 2]
    # rows not one bucket's (misaligned, or spanning two) are zarr's to write
    assert wide.bucket_of(1, SIZE) is None and wide.bucket_of(0, SIZE + 1) is None
    gzip = dict(doc, codecs=[doc["codecs"][0], {"name": "gzip", "configuration": {"level": 5}}])
    dotted = dict(doc, chunk_key_encoding={"name": "default", "configuration": {"separator": "."}})
    sharded = dict(doc, codecs=[{"name": "sharding_indexed", "configuration": {}}])
    plain = dict(doc, codecs=doc["codecs"][:1])
    dense = json.loads(fdoc.dense_array_doc((100,), (100,), np.int64))
    for other in (gzip, dotted, sharded, plain, dense, {}):
        assert BucketCodec.of(other) is None


def test_read_rows_reads_buckets_directly_and_names_a_damaged_one(tmp_path):
    n_rows = 2 * SIZE + 5
    rng = np.random.default_rng(1)
    root, arr = _zarr_array(tmp_path, n_rows)
    rows = _rows(rng, n_rows)
    _write_with_zarr(arr, 0, rows)
    store = Store.from_url(root)
    lo, hi = SIZE - 3, 2 * SIZE + 4  # across three buckets
    assert list(fcells.read_rows_checked(store, arr, "m", lo, hi)) == rows[lo:hi]
    got = fcells.read_rows_at(store, arr, "m", [2 * SIZE + 4, 3, SIZE])
    assert got == [rows[2 * SIZE + 4], rows[3], rows[SIZE]]
    with open(f"{root}/m/c/1", "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(CorruptChunkError, match="m chunk 1: cannot be read"):
        fcells.read_rows_checked(store, arr, "m", lo, hi)
