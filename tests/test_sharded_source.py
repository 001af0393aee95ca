"""Sharded and compressed level-0 stores (issue 12): stores written by
zarr-vectors' own writers with ``shard_shape=`` and ``compressor=``, each
pyramid equal to the reference's, file for file.

What the reference writes above a sharded source: its coarse levels'
per-chunk arrays (vertices, vertex_fragments, every link family, the
level-0 ``+N`` families too) are plain one-cell-per-file ``vlen-bytes``
arrays, and its object arrays use zarr's default zstd, whatever the
source's shards and compressor -- the same documents and bytes as above
an unsharded source, so the raw-file comparison holds unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

import zarr_vectors_dask as zd
from equivalence import assert_same_pyramid
from stores import make_graphs, make_points, make_points_with_ids, make_streamlines
from zarr_vectors_dask import errors
from zarr_vectors_dask.format import cells as fcells, naming as nm, shards as fshards
from zarr_vectors_dask.storage.lock import LOCK_KEY
from zarr_vectors_dask.storage.store import LocalStore, Store

KW = dict(factors=[(2, 1), (2, 3)], sparsity_seed=7, cross_level_depth=-1,
          cross_level_storage="explicit")


def _twins(tmp_path, make, prepare=None, **kw):
    base, ref, ours = tmp_path / "b.zv", tmp_path / "r.zv", tmp_path / "o.zv"
    make(str(base), **kw)
    if prepare is not None:
        prepare(base)
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    return ref, ours


def _check(ref, ours, client, **kw):
    expected = reference_build_pyramid(str(ref), **KW)
    got = zd.build_pyramid(str(ours), client=client, **KW, **kw)
    assert got == expected
    assert_same_pyramid(ref, ours)


def _codecs(store, array: str) -> list:
    with open(os.path.join(store, *array.split("/"), "zarr.json")) as fh:
        return json.load(fh)["codecs"]


def _assert_sharded(store, shard: int, compressor):
    """The source really is what the test claims: sharded vertices with
    the compressor inside the shards."""
    for array in ("0/vertices", "0/vertex_fragments"):
        (codec,) = _codecs(store, array)
        assert codec["name"] == "sharding_indexed"
        inner = [c["name"] for c in codec["configuration"]["codecs"]]
        assert inner == ["vlen-bytes"] + ([compressor] if compressor else [])
        with open(os.path.join(store, *array.split("/"), "zarr.json")) as fh:
            grid = json.load(fh)["chunk_grid"]["configuration"]["chunk_shape"]
        assert set(grid) == {shard}


SHARDS = [(2, None), (2, "zstd"), (3, None), (3, "zstd")]


#: Points without ids (one implicit object); streamlines crossing chunk
#: edges, with object attributes; graphs.
SHARDED_KINDS = {"points": (make_points, dict(seed=3, n_points=2_000)),
                 "streamlines": (make_streamlines, dict(seed=5, n_objects=60)),
                 "graphs": (make_graphs, dict(seed=2))}


@pytest.mark.parametrize("kind", sorted(SHARDED_KINDS))
@pytest.mark.parametrize("shard,compressor", SHARDS)
def test_sharded_source(local_client, tmp_path, kind, shard, compressor):
    make, kw = SHARDED_KINDS[kind]
    wk = {"shard_shape": shard, **({"compressor": compressor} if compressor else {})}
    ref, ours = _twins(tmp_path, make, writer_kw=wk, **kw)
    _assert_sharded(ours, shard, compressor)
    _check(ref, ours, local_client)


@pytest.mark.slow  # scale run
def test_sharded_many_chunks_small_blocks(local_client, tmp_path):
    """A few hundred chunks in 3x3x3 shards and a per-task budget far below
    a level: blocks (runs of chunks) cut through shards, so a task reads
    only part of a shard, and several tasks read the same one."""
    ref, ours = _twins(tmp_path, make_streamlines, seed=11, n_objects=150, chunk_shape=12.5,
                       bin_shape=2.5, writer_kw={"shard_shape": 3, "compressor": "zstd"})
    info = fcells.vlen_array_info(Store.from_url(str(ours)), "0/vertices")
    assert len(info.chunks) > 300
    _check(ref, ours, local_client, max_block_vertices=1_500)


@pytest.mark.parametrize("compressor", ["zstd", "blosc"])
def test_compressed_unsharded(local_client, tmp_path, compressor):
    """Compressed, unsharded cells: one zarr chunk per file."""
    ref, ours = _twins(tmp_path, make_points_with_ids, seed=1, writer_kw={"compressor": compressor})
    assert [c["name"] for c in _codecs(ours, "0/vertices")] == ["vlen-bytes", compressor]
    _check(ref, ours, local_client)


def _reencode(store, array: str, *, chunks, codecs, inner=None, index_location="end"):
    """Rewrite a level-0 per-chunk array of a zarr-vectors store with
    another layout zarr supports (the cells themselves unchanged): the
    reference reads it through zarr, so its pyramid says what is right."""
    import zarr
    from zarr.codecs import ShardingCodec, VLenBytesCodec
    from zarr_vectors.core.store import get_resolution_level, open_store
    name = array.split("/", 1)[1]
    level = get_resolution_level(open_store(str(store), mode="r"), 0)
    path = os.path.join(store, *array.split("/"))
    old = zarr.open_array(path, mode="r")
    attrs = dict(old.attrs)
    origin = attrs.get(nm.ORIGIN, [0] * len(old.shape))
    cells = {k: bytes(level.read_bytes(name, k)) for k in attrs[nm.NONEMPTY]}
    if inner is not None:
        kw = dict(serializer=ShardingCodec(chunk_shape=inner, codecs=[VLenBytesCodec(), *codecs],
                                           index_location=index_location), compressors=None)
    else:
        kw = dict(serializer=VLenBytesCodec(), compressors=codecs)
    new = zarr.create_array(store=path, shape=old.shape, chunks=chunks, dtype="bytes",
                            fill_value=old.fill_value, attributes=attrs, overwrite=True,
                            zarr_format=3, **kw)
    for k, v in cells.items():
        idx = tuple(int(x) - int(o) for x, o in zip(k.split("."), origin))
        one = np.empty((1,) * len(idx), dtype=object)
        one.flat[0] = v
        new[tuple(slice(i, i + 1) for i in idx)] = one
    assert {k: bytes(get_resolution_level(open_store(str(store), mode="r"), 0).read_bytes(name, k))
            for k in cells} == cells


def test_other_zarr_layouts(local_client, tmp_path):
    """Layouts zarr-vectors' writers do not make but zarr (and so the
    reference) reads: the shard index at the start, gzip inside shards of
    several-cell inner chunks, non-cubic shards; and unsharded zarr chunks
    of several cells, blosc-compressed."""
    from zarr.codecs import BloscCodec, GzipCodec

    def prepare(store):
        _reencode(store, "0/vertices", chunks=(2, 3, 2), inner=(1, 1, 2),
                  codecs=[GzipCodec(level=5)], index_location="start")
        _reencode(store, "0/vertex_fragments", chunks=(2, 2, 2), codecs=[BloscCodec()])
    ref, ours = _twins(tmp_path, make_streamlines, prepare, seed=8, n_objects=50)
    assert _codecs(ours, "0/vertices")[0]["configuration"]["index_location"] == "start"
    _check(ref, ours, local_client)


# --------------------------------------------------------------- reads
class _CountingStore(LocalStore):
    """A local Store that records every storage key it reads."""

    def get_many(self, keys):
        _READS.extend(keys)
        return super().get_many(keys)

    def get_ranges(self, requests):
        _READS.extend(k for k, _, _ in requests)
        return super().get_ranges(requests)


_READS: list = []


def test_a_shard_is_read_once_per_call(tmp_path):
    """Reading many cells of a sharded array on a local disk: one read
    per shard (the whole file; object stores read its index, then the
    merged ranges asked for) -- not one per cell -- and every cell equals
    what zarr-vectors' reader returns."""
    from zarr_vectors.core.store import get_resolution_level, open_store
    path = tmp_path / "s.zv"
    make_streamlines(str(path), seed=5, n_objects=60, writer_kw={"shard_shape": 3,
                                                                 "compressor": "zstd"})
    st = _CountingStore(str(path))
    level = get_resolution_level(open_store(str(path), mode="r"), 0)
    for array in (nm.VERTICES, nm.VERTEX_FRAGMENTS):
        info = fcells.vlen_array_info(st, f"0/{array}")
        _READS.clear()
        got = fcells.read_cells(st, info, info.chunks)
        shards = {tuple((np.asarray(c) - info.origin) // 3) for c in info.chunks}
        assert len(info.chunks) > 2 * len(shards)
        assert sorted(_READS) == sorted({fshards.shard_key(f"0/{array}", s) for s in shards})
        for c in info.chunks:
            assert got[c] == bytes(level.read_bytes(array, nm.chunk_key(c)))


# --------------------------------------------------------------- damage
def _digest(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _a_shard(store, array: str) -> str:
    top = os.path.join(store, *array.split("/"), "c")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(top) for f in fs)
    return max(files, key=os.path.getsize)  # the fullest shard: surely read


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_fails_naming_array_and_chunk(local_client, tmp_path, damage):
    """A truncated shard (its index at the end no longer is one) or a
    flipped byte inside a compressed inner chunk: the build fails with an
    error naming the array, the chunk and the shard's key; nothing is
    published and the store is as it was."""
    _, ours = _twins(tmp_path, make_streamlines, seed=4, n_objects=40,
                     writer_kw={"shard_shape": 2, "compressor": "zstd"})
    shard = _a_shard(ours, "0/vertices")
    key = os.path.relpath(shard, os.path.join(ours, "0", "vertices")).replace(os.sep, "/")
    with open(shard, "r+b") as fh:
        if damage == "truncate":
            fh.truncate(os.path.getsize(shard) - 7)
        else:  # the first inner chunk's zstd frame (index at the end)
            fh.seek(6)
            b = fh.read(1)
            fh.seek(6)
            fh.write(bytes([b[0] ^ 0xFF]))
    # The build's own records under .zvdask/ stay for a resume; the rest
    # of the store (level 0, the root document) is as it was.
    before = _digest(ours)
    what = "shard index cannot be decoded" if damage == "truncate" else "cannot be decoded"
    with pytest.raises(errors.CorruptChunkError) as info:
        zd.build_pyramid(str(ours), client=local_client, **KW)
    msg = str(info.value)
    assert "0/vertices chunk" in msg and f"(key {key})" in msg and what in msg, msg
    after = {k: v for k, v in _digest(ours).items() if not k.startswith(".zvdask")}
    assert after == before
    assert not os.path.exists(os.path.join(ours, "1"))
    assert not os.path.exists(os.path.join(ours, LOCK_KEY))


def test_short_inner_chunk_fails(tmp_path):
    """Index at the start and the shard cut inside its last inner chunk:
    the index is intact but a range it names is not there."""
    from zarr.codecs import GzipCodec
    path = tmp_path / "s.zv"
    make_streamlines(str(path), seed=5, n_objects=30)
    _reencode(path, "0/vertices", chunks=(2, 2, 2), inner=(1, 1, 1), codecs=[GzipCodec()],
              index_location="start")
    shard = _a_shard(path, "0/vertices")
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 3)
    st = Store.from_url(str(path))
    info = fcells.vlen_array_info(st, "0/vertices")
    with pytest.raises(errors.CorruptChunkError, match=r"0/vertices chunks? .*shard is truncated"):
        fcells.read_cells(st, info, info.chunks)


# --------------------------------------------------------------- S3
@pytest.mark.integration
def test_sharded_source_on_s3(s3_server, local_client, tmp_path):
    """On an object store the shard indexes come from suffix range requests
    and the inner chunks from ranged reads (SeaweedFS): the pyramid built
    in the bucket equals the reference's, file for file."""
    base, ref = tmp_path / "b.zv", tmp_path / "r.zv"
    make_streamlines(str(base), seed=6, n_objects=30, chunk_shape=40.0,
                     writer_kw={"shard_shape": 2, "compressor": "zstd"})
    shutil.copytree(base, ref)
    expected = reference_build_pyramid(str(ref), **KW)
    bucket = s3_server.new_bucket()
    fs = s3_server.fs()
    fs.put(str(base), f"{bucket}/x.zv", recursive=True)
    got = zd.build_pyramid(s3_server.url(bucket, "x.zv"),
                           storage_options=s3_server.storage_options, client=local_client, **KW)
    assert got == expected
    ours = tmp_path / "o.zv"
    fs.get(f"{bucket}/x.zv", str(ours), recursive=True)
    assert_same_pyramid(ref, ours)
