"""Stages 7-8: the coarse level's object manifests and object attributes."""

from __future__ import annotations

import warnings

import numpy as np

from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import documents as fdoc
from ..format import naming as nm
from ..format.buckets import BucketCodec
from .exchange import read_exchange, received
from .links import distinct_rows
from .spec import StepSpec, _lookup, _pair_key

__all__ = ["write_manifests", "write_attributes"]


# ------------------------------------------------------------- stage 7
def write_manifests(spec: StepSpec, bucket: int, refs: dict, target_rows: tuple[int, int],
                    _sequences_done=None, region=None) -> int:
    """Assemble and write one bucket of the coarse level's object_index
    manifests; returns how many rows are non-empty (a region's: see
    ``_write_region_rows``)."""
    kept, counts = refs["kept"], refs["counts"]
    ref_chunk, ref_frag = refs["ref_chunk"], refs["ref_frag"]
    if "rc" in refs:  # a region: only the recomputed rows are encoded
        rc = refs["rc"]
        named = np.repeat(rc, counts)
        ref_chunk, ref_frag, counts = ref_chunk[named], ref_frag[named], counts[rc]
        blobs = cdc.encode_manifest_table(
            _manifest_table(spec, bucket, counts, ref_chunk, ref_frag), spec.ndim)
        return _write_region_rows(spec, target_rows, np.flatnonzero(kept)[rc], refs["ids"][rc],
                                  blobs, region.old_rows)
    row_counts = np.zeros(kept.size, dtype=np.int64)
    table = _manifest_table(spec, bucket, counts, ref_chunk, ref_frag, row_counts,
                            np.flatnonzero(kept))
    _put_table(spec, target_rows, table)
    return int(np.count_nonzero(row_counts))


def _manifests_path(spec: StepSpec) -> str:
    return f"{spec.target_level}/{nm.OBJECT_INDEX}/manifests"


def _manifests_doc(spec: StepSpec) -> dict:
    """The coarse manifests array's document, as the step wrote it."""
    return fdoc.read_json(spec.store, f"{_manifests_path(spec)}/zarr.json") or {}


def _put_rows(spec: StepSpec, target_rows: tuple[int, int], rows, doc: dict | None = None
              ) -> None:
    """Write one bucket's rows: its stored key encoded directly where the
    array's document (``doc``, read when not given) allows
    (:mod:`format.buckets`), else through zarr.  Either way zarr's bytes,
    and no key for a bucket of empty rows."""
    path = _manifests_path(spec)
    lo, hi = target_rows
    codec = BucketCodec.of(_manifests_doc(spec) if doc is None else doc)
    k = codec.bucket_of(lo, hi) if codec is not None else None
    stored = codec.encode(rows) if k is not None else None
    if stored is not None:
        spec.store.put(codec.key(path, k), stored)
        return
    import zarr
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(spec.store.zarr_store(), path=path, mode="r+")
        obj = np.empty(len(rows), dtype=object)
        obj[:] = rows
        arr[lo:hi] = obj


def _put_table(spec: StepSpec, target_rows: tuple[int, int], table: cdc.ManifestTable) -> None:
    """Write one bucket's rows given as a table: straight to the bucket's
    vlen-bytes items where the array's layout allows, else as blobs."""
    doc = _manifests_doc(spec)
    codec = BucketCodec.of(doc)
    k = codec.bucket_of(*target_rows) if codec is not None else None
    if k is not None and table.counts.size:  # (rows of 4 bytes at least: not all empty)
        spec.store.put(codec.key(_manifests_path(spec), k),
                       codec.encode_items(cdc.manifest_items(table, spec.ndim, codec.size)))
        return
    _put_rows(spec, target_rows, cdc.encode_manifest_table(table, spec.ndim), doc)


def _manifest_table(spec: StepSpec, bucket: int, counts, ref_chunk, ref_frag, row_counts=None,
                    at=None) -> cdc.ManifestTable:
    """Manifests of objects naming ``counts`` fragment references each:
    every named fragment expanded to its metavertex sequence (the
    ``sequences`` sent to this bucket; a missing fragment has none).
    With ``row_counts`` (the bucket's rows, zeros), each object's count
    is put at its row ``at`` and every row is in the table, empty or not."""
    parts = [p for _, p in received(spec, "sequences", bucket)]
    chunks, seq_c = _parent_chunks(spec, parts)
    seq_f = np.concatenate([p["seq_frag"] for p in parts]) if parts else np.empty(0, np.int64)
    base = np.cumsum([0] + [int(p["ptr"][-1]) for p in parts])
    frag_key = np.concatenate([_pair_key(p["chunk"], p["frag"]) for p in parts]) if parts else \
        np.empty(0, np.int64)
    frag_start = np.concatenate([p["ptr"][:-1] + base[i] for i, p in enumerate(parts)]) if parts \
        else np.empty(0, np.int64)
    frag_len = np.concatenate([np.diff(p["ptr"]) for p in parts]) if parts else np.empty(0, np.int64)
    order = np.argsort(frag_key, kind="stable")
    frag_key, frag_start, frag_len = frag_key[order], frag_start[order], frag_len[order]
    ref_key = _pair_key(ref_chunk, ref_frag)
    n_ref, start = _lookup(frag_key, (frag_len, frag_start), ref_key)
    entry = cdc.expand_ranges(start, n_ref)
    owner = np.repeat(np.repeat(np.arange(counts.size), counts), n_ref)
    ec, ef = seq_c[entry], seq_f[entry]
    # Metavertices shared by consecutive fragments appear once.
    keep = np.ones(entry.size, dtype=bool)
    keep[1:] = (owner[1:] != owner[:-1]) | (ef[1:] != ef[:-1]) | (ec[1:] != ec[:-1])
    per_object = np.bincount(owner[keep], minlength=counts.size)
    if row_counts is None:
        row_counts = per_object
    else:
        row_counts[at] = per_object
    return cdc.ManifestTable(row_counts, chunks[ec[keep]], ef[keep])


def _parent_chunks(spec: StepSpec, parts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """``(chunks, ids)``: the distinct chunks of the sequences' metavertices
    and each sequence entry's index in them.  A sender names its entries'
    chunks by index into its own ``chunk_table``; equal chunks from two
    senders get one id here, so consecutive entries compare as ints."""
    tables = [np.asarray(p["chunk_table"], dtype=np.int64).reshape(-1, spec.ndim) for p in parts]
    shift = np.cumsum([0] + [t.shape[0] for t in tables])
    both = np.concatenate(tables) if parts else np.empty((0, spec.ndim), np.int64)
    chunks, ids = distinct_rows(both)
    seq = np.concatenate([p["seq_chunk"] + shift[i] for i, p in enumerate(parts)]) if parts \
        else np.empty(0, np.int64)
    return chunks, ids[seq]


def _write_region_rows(spec: StepSpec, target_rows, rows: np.ndarray, ids: np.ndarray, blobs,
                       old_rows: int) -> dict:
    """A region's bucket: the recomputed rows (``rows``, bucket positions;
    ``ids``, their objects') as ``blobs``, spliced into the stored bucket,
    which is written only if one of them changed.  Returns the change in
    non-empty rows, the chunks the changed rows name, before or after
    (their metavertices' weights in the next step may have changed), and
    the changed rows' ids (recomputed in the next step: an emptied row
    names no chunk there)."""
    none = {"present_delta": 0, "reweighted": np.empty((0, spec.ndim), np.int64),
            "ids": np.empty(0, np.int64)}
    if rows.size == 0:
        return none
    doc = _manifests_doc(spec)
    old = _stored_rows(spec, target_rows, old_rows, doc)
    changed = [(r, i, b) for r, i, b in zip(rows.tolist(), ids.tolist(), blobs) if b != old[r]]
    if not changed:
        return none
    # (a row added by the edit has no stored blob)
    named = cdc.decode_manifest_table([b for _, _, b in changed] +
                                      [old[r] for r, _, _ in changed if old[r]],
                                      spec.ndim).coords
    delta = sum((len(b) > 4) - (len(old[r]) > 4) for r, _, b in changed)  # 0 rows: 4 bytes
    for r, _, b in changed:
        old[r] = b
    _put_rows(spec, target_rows, old, doc)
    return {"present_delta": int(delta), "reweighted": np.unique(named, axis=0),
            "ids": np.asarray([i for _, i, _ in changed], np.int64)}


def _stored_rows(spec: StepSpec, target_rows: tuple[int, int], old_rows: int, doc: dict
                 ) -> list:
    """The bucket's rows ``lo:hi`` as stored before this step; rows past
    ``old_rows`` are empty.  When rows were added, the array's document
    (``doc``) is already the new one, whose chunk (``min(bucket, rows)``)
    may not be the stored one: the stored chunks are decoded with the
    layout of the old row count."""
    import json
    lo, hi = target_rows
    path = _manifests_path(spec)
    same = old_rows < 0 or old_rows == int(doc.get("shape", [-1])[0])
    if not same:
        doc = json.loads(fdoc.manifests_doc(old_rows))
    codec = BucketCodec.of(doc)
    k = codec.bucket_of(lo, hi) if codec is not None else None
    if k is not None:
        raw = spec.store.get(codec.key(path, k))  # (the store retries its own errors)
        old = fcells.read_chunk_checked(spec.store, path, f"chunk {k}",
                                        lambda: codec.decode(raw, k)).tolist()
        return old + [b""] * (hi - lo - len(old))
    if same:
        import zarr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = zarr.open_array(spec.store.zarr_store(), path=path, mode="r")
            return [bytes(b) for b in fcells.read_rows_checked(spec.store, arr, path, lo, hi)]
    lay = fcells.KeyLayout(json.dumps({k: v for k, v in doc.items() if k != "attributes"},
                                      sort_keys=True))
    size, n_old = lay.key_shape[0], int(doc["shape"][0])
    out = [b""] * (hi - lo)
    for k in range(lo // size, -(-min(hi, n_old) // size)):
        key = lay.key(path, (k,))
        raw = spec.store.get(key)
        if raw is None:
            continue
        cells = fcells.read_chunk_checked(spec.store, path, f"chunk {k}",
                                          lambda raw=raw: lay.decode_inner([raw])[0])
        for r in range(max(lo, k * size), min(hi, n_old, (k + 1) * size)):
            out[r - lo] = bytes(cells[r - k * size])
    return out


# ------------------------------------------------------------- stage 8
def write_attributes(spec: StepSpec, name: str, bucket: int, _objects_done=None) -> None:
    """Copy the kept rows of one object-attribute bucket; the rest become
    the column's fill value (absent)."""
    import zarr
    (mine,) = read_exchange(spec.store, [nm.exchange_key(spec.target_level, "keep", bucket, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = spec.store.zarr_store()
        src = zarr.open_array(zs, path=f"{spec.source_level}/{nm.OBJECT_ATTRIBUTES}/{name}",
                              mode="r")
        dst = zarr.open_array(zs, path=f"{spec.target_level}/{nm.OBJECT_ATTRIBUTES}/{name}",
                              mode="r+")
        lo = bucket * nm.ATTRIBUTE_BUCKET
        hi = min(lo + nm.ATTRIBUTE_BUCKET, src.shape[0])
        path = f"{spec.source_level}/{nm.OBJECT_ATTRIBUTES}/{name}"
        data = np.asarray(fcells.read_rows_checked(spec.store, src, path, lo, hi)) if hi > lo \
            else np.empty((0, *src.shape[1:]), src.dtype)
        out = np.zeros_like(data)
        k = mine["kept"][: data.shape[0]]
        out[k] = data[k]
        out[~k] = dst.fill_value
        dst[lo:hi] = out  # a refresh's changes_only store skips equal bytes
