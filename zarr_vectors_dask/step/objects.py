"""Stage 0: the object table (survivors of sparsity, the coarse id table,
each bucket's rows) and the fragments each bucket's kept objects name."""

from __future__ import annotations

import warnings

import numpy as np

from ..errors import FormatError
from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import documents as fdoc
from ..format import naming as nm
from ..planning.sparsity import Sparsity
from ..storage.store import Store
from .exchange import read_exchange, send_exchange
from .spec import StepSpec, _pair_key, _split_by, block_of, chunk_numbers

__all__ = ["read_object_ids", "object_table", "send_keep_flags", "attribute_survivors",
           "row_digests", "object_refs"]


def read_object_ids(store: Store, level: int, n_rows: int) -> np.ndarray:
    """A level's object id table.  Only an index written without one (the
    format's first layout, where rows are ids) falls back to ``0..n-1``; a
    table that exists but cannot be read is an error, never a fallback."""
    import zarr
    path = f"{level}/{nm.OBJECT_INDEX}/object_ids"
    if fdoc.read_json(store, f"{path}/zarr.json") is None:
        return np.arange(n_rows, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(store.zarr_store(), path=path, mode="r")
        if tuple(arr.shape) != (n_rows,):
            raise FormatError(f"{store.describe(path)}: {tuple(arr.shape)} ids for "
                                  f"{n_rows} manifest rows")
        return np.asarray(fcells.read_rows_checked(store, arr, path, 0, n_rows), dtype=np.int64)


def object_table(spec: StepSpec, n_rows: int, sparsity: Sparsity, attribute_names: list[str],
                 new_digests: bool = True, *_context_done) -> int:
    """The one task that sees every object row: reads the id table, picks
    the survivors of sparsity, writes the coarse level's id table and array
    documents, and hands each manifest bucket its source rows and kept
    flags (and each attribute bucket its kept flags) as exchange files.

    A strategy that needs per-object context reads it from the
    ``context`` exchange files the ``object_context`` tasks wrote (source
    row order).
    Returns the number of kept objects."""
    import zarr
    ids = read_object_ids(spec.store, spec.source_level, n_rows)
    lengths = points = None
    if sparsity.needs_context(n_rows):
        n_buckets = -(-n_rows // nm.MANIFEST_BUCKET)
        parts = read_exchange(spec.store, [nm.exchange_key(spec.target_level, "context", k, 0)
                                           for k in range(n_buckets)])
        lengths = np.concatenate([p["lengths"] for p in parts])
        if all("points" in p for p in parts):
            points = np.concatenate([p["points"] for p in parts])
    keep = sparsity.kept(n_rows, lengths=lengths, points=points)
    if spec.source_level == 0 and new_digests:
        spec.store.remove_tree(nm.MANIFEST_DIGESTS)
    # Coarse rows are in id order: row r comes from source row perm[r].
    perm = np.argsort(ids, kind="stable")
    t = spec.target_level
    docs = {f"{t}/{nm.OBJECT_INDEX}/manifests/zarr.json": fdoc.manifests_doc(n_rows),
            f"{t}/{nm.OBJECT_INDEX}/object_ids/zarr.json":
                fdoc.dense_array_doc((n_rows,), (n_rows,), np.int64)}
    from zarr_vectors.core.arrays import _default_fill_value_for_dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zs = spec.store.zarr_store()
        for name in attribute_names:
            sarr = zarr.open_array(zs, path=f"{spec.source_level}/{nm.OBJECT_ATTRIBUTES}/{name}",
                                   mode="r")
            dtype, shape = np.dtype(sarr.dtype), tuple(sarr.shape)
            docs[f"{t}/{nm.OBJECT_ATTRIBUTES}/{name}/zarr.json"] = fdoc.dense_array_doc(
                shape, (nm.ATTRIBUTE_BUCKET, *shape[1:]), dtype,
                fill_value=_default_fill_value_for_dtype(dtype),
                attributes={"zv_array": "object_attribute", "name": name, "dtype": str(dtype),
                            "shape": list(shape), "fill_sentinel_meaning": "absent"})
        spec.store.put_many(docs)
        zarr.open_array(zs, path=f"{t}/{nm.OBJECT_INDEX}/object_ids", mode="r+")[:] = ids[perm]
    for k, a in enumerate(range(0, n_rows, nm.MANIFEST_BUCKET)):
        rows = perm[a:a + nm.MANIFEST_BUCKET]
        send_exchange(spec.store, {k: {"src_rows": rows, "kept": keep[rows], "ids": ids[rows]}},
                      t, "objects", 0)
    if attribute_names:
        send_keep_flags(spec.store, t, keep, range(-(-n_rows // nm.ATTRIBUTE_BUCKET)))
    return int(keep.sum())


def send_keep_flags(store: Store, target_level: int, keep: np.ndarray, buckets) -> None:
    """Each object-attribute bucket's kept flags, for ``write_attributes``."""
    B = nm.ATTRIBUTE_BUCKET
    for j in buckets:
        send_exchange(store, {int(j): {"kept": keep[j * B:(j + 1) * B]}}, target_level, "keep", 0)


def attribute_survivors(spec, n_rows: int, sparsity: Sparsity, buckets: tuple,
                        *_source_done) -> int:
    """A refresh's stand-in for ``object_table`` when only object
    attributes changed: the same survivors (drawn without per-object
    context, so from the row count and seed alone), sent to the attribute
    buckets being rewritten; nothing else of the level is written."""
    if sparsity.needs_context(n_rows):
        raise FormatError(f"level {spec.target_level}: survivors of sparsity "
                          f"{sparsity.strategy!r} need per-object context; rebuild the level")
    keep = sparsity.kept(n_rows)
    send_keep_flags(spec.store, spec.target_level, keep, buckets)
    return int(keep.sum())


def row_digests(blobs) -> np.ndarray:
    """An 8-byte digest of each manifest blob."""
    import hashlib
    return np.fromiter((int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")
                        for b in blobs), dtype=np.uint64, count=len(blobs))


def _digests_may_change(region, ids: np.ndarray) -> bool:
    """Whether a bucket's row digests are to be written: always in a
    build; in a region refresh only where a row changed (the digests of
    the others are what told them unchanged)."""
    return region is None or bool(np.isin(ids, region.rows).any())


def object_refs(spec: StepSpec, bucket: int, _objects_done=None, region=None) -> dict:
    """Decode one bucket of source manifests.

    The bucket's rows (coarse rows, in id order) come from the source rows
    ``object_table`` sent it, with their kept flags.  Returns the kept rows'
    fragment references (for manifest assembly) and sends, per source
    block, how many times each fragment is named (its weight in the
    centroids).  ``region`` (a ``StepRegion``): only the weights of its
    source chunks are sent; the kept rows naming one of them are the rows
    recomputed (``rc``), and their other fragments are sent to the tasks
    reading old parents (``old_sequences``).
    """
    import zarr
    (mine,) = read_exchange(spec.store, [nm.exchange_key(spec.target_level, "objects",
                                                               bucket, 0)])
    src_rows, kept = mine["src_rows"], mine["kept"]
    wanted = src_rows[kept]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(spec.store.zarr_store(), path=spec.manifests_path, mode="r")
        blobs = fcells.read_rows_at(spec.store, arr, spec.manifests_path, wanted)
    if spec.source_level == 0 and _digests_may_change(region, mine["ids"][kept]):
        # what a refresh tells changed rows (and rows given other ids) by
        spec.store.put(f"{nm.MANIFEST_DIGESTS}/{bucket}", cdc.pack_columns(
            {"rows": wanted, "digest": row_digests(blobs), "ids": mine["ids"][kept]}))
    table = cdc.decode_manifest_table(blobs, spec.ndim)
    counts, ref_frag = table.counts, table.frags
    # References to chunks outside the grid are skipped, as the reference
    # skips missing fragments (absent chunks inside it simply have none).
    ref_chunk = chunk_numbers(spec, table.coords)
    ok = ref_chunk >= 0
    out = {"kept": kept, "counts": counts, "ref_chunk": ref_chunk, "ref_frag": ref_frag}
    if region is not None:
        out["ids"] = mine["ids"][kept]
        ok, out["rc"] = _region_refs(spec, bucket, region, counts, ref_chunk, ref_frag, ok,
                                     out["ids"])
    by_block: dict[int, dict[str, np.ndarray]] = {}
    if ok.any():
        uniq, mult = np.unique(_pair_key(ref_chunk[ok], ref_frag[ok]), return_counts=True)
        chunk, frag = uniq >> 32, uniq & 0xFFFFFFFF
        by_block = _split_by(block_of(spec, chunk), chunk=chunk, frag=frag,
                             mult=mult.astype(np.int64))
    # Each block's share goes to an exchange file, not a task per pair.
    send_exchange(spec.store, by_block, spec.target_level, "refs", bucket)
    return out


def _region_refs(spec: StepSpec, bucket: int, region, counts, ref_chunk, ref_frag, ok, ids):
    """A region's references: the mask of those into its source chunks
    (the only weights its blocks need), and the rows recomputed (``rc``):
    those naming one or a chunk that is gone (``region.gone``), and the
    objects whose row changed before (``region.rows``); their fragments
    elsewhere go to ``old_sequences`` tasks by chunk (those in a gone
    chunk have no sequence, as in a build)."""
    inside = ok & region.has_source(ref_chunk)
    gone = ok & region.has_gone(ref_chunk)
    owner = np.repeat(np.arange(counts.size), counts)
    rc = (np.bincount(owner[inside | gone], minlength=counts.size) > 0) | \
        np.isin(ids, region.rows)
    other = ok & ~inside & ~gone & rc[owner]
    if other.any():
        uniq = np.unique(_pair_key(ref_chunk[other], ref_frag[other]))
        chunk = uniq >> 32
        send_exchange(spec.store, _split_by(chunk % region.n_old, chunk=chunk,
                                            frag=uniq & 0xFFFFFFFF),
                      spec.target_level, "oldrefs", bucket)
    return inside, rc
