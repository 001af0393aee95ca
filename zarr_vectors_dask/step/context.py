"""Stage 0b: per-object context (lengths, points) for sparsity strategies
other than ``random``, computed before the object table."""

from __future__ import annotations

import warnings

import numpy as np

from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import naming as nm
from .exchange import received, send_exchange
from .spec import (StepSpec, _lookup, _pair_key, _read_source_chunks, _split_by, block_of,
                   chunk_numbers)

__all__ = ["context_refs", "fragment_summaries", "object_context", "fragment_points",
           "object_points"]


def context_refs(spec: StepSpec, bucket: int, n_rows: int) -> dict:
    """Decode one bucket of source manifests (every row: survivors are not
    known yet) and ask each source block about the fragments it holds."""
    import zarr
    lo, hi = bucket * nm.MANIFEST_BUCKET, min((bucket + 1) * nm.MANIFEST_BUCKET, n_rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = zarr.open_array(spec.store.zarr_store(), path=spec.manifests_path, mode="r")
        rows = fcells.read_rows_checked(spec.store, arr, spec.manifests_path, lo, hi)
    table = cdc.decode_manifest_table([bytes(b) for b in rows], spec.ndim)
    ref_chunk = chunk_numbers(spec, table.coords)
    ok = ref_chunk >= 0  # outside the grid: skipped, as the reference skips missing fragments
    by_block: dict[int, dict[str, np.ndarray]] = {}
    if ok.any():
        uniq = np.unique(_pair_key(ref_chunk[ok], table.frags[ok]))
        chunk, frag = uniq >> 32, uniq & 0xFFFFFFFF
        by_block = _split_by(block_of(spec, chunk), chunk=chunk, frag=frag)
    send_exchange(spec.store, by_block, spec.target_level, "context_refs", bucket)
    return {"counts": table.counts, "ref_chunk": ref_chunk, "ref_frag": table.frags}


def _requested_fragments(spec: StepSpec, block: int, numbers: np.ndarray, kind: str):
    """The requests addressed to this block, and the decoded chunks they
    name (only chunks of the block that exist)."""
    requests = received(spec, kind, block)
    wanted = np.unique(np.concatenate([r["chunk"] for _, r in requests])) if requests else \
        np.empty(0, np.int64)
    present = np.intersect1d(wanted, np.asarray(numbers, dtype=np.int64))
    chunks = {num: (rows, members, lengths)
              for num, _, rows, members, lengths in _read_source_chunks(spec, present)}
    return requests, chunks


def _fragment_table(spec: StepSpec, chunks: dict) -> dict[str, np.ndarray]:
    """Every fragment of the decoded chunks, sorted by pair key: vertex
    count, first and last vertex, and the summed length of its own
    segments (float64 over the stored positions)."""
    keys, n, first, last, inner = [], [], [], [], []
    for num, (rows, members, flens) in chunks.items():
        pos = rows[members].astype(np.float64)  # fragment order
        starts = np.cumsum(flens) - flens
        nz = flens > 0
        f = np.flatnonzero(nz)
        fst = np.full((flens.size, spec.ndim), np.nan)
        lst = np.full((flens.size, spec.ndim), np.nan)
        fst[f] = pos[starts[f]]
        lst[f] = pos[starts[f] + flens[f] - 1]
        owner = np.repeat(np.arange(flens.size), flens)
        seg = np.sqrt(np.sum(np.diff(pos, axis=0) ** 2, axis=1))
        within = owner[1:] == owner[:-1]  # no segment between two fragments
        keys.append(_pair_key(np.full(flens.size, num), np.arange(flens.size)))
        n.append(flens)
        first.append(fst)
        last.append(lst)
        inner.append(np.bincount(owner[1:][within], weights=seg[within], minlength=flens.size))
    if not keys:
        e = np.empty((0, spec.ndim))
        return {"key": np.empty(0, np.int64), "n": np.empty(0, np.int64), "first": e,
                "last": e, "inner": np.empty(0)}
    key = np.concatenate(keys)
    order = np.argsort(key)
    return {"key": key[order], "n": np.concatenate(n)[order].astype(np.int64),
            "first": np.concatenate(first)[order], "last": np.concatenate(last)[order],
            "inner": np.concatenate(inner)[order]}


def fragment_summaries(spec: StepSpec, block: int, numbers: np.ndarray, _refs_done=None) -> None:
    """For every fragment a bucket named in this block: its vertex count,
    first and last vertex, and inner length.  Missing fragments (absent
    chunk, index past the chunk's fragments) have count 0."""
    requests, chunks = _requested_fragments(spec, block, numbers, "context_refs")
    table = _fragment_table(spec, chunks)
    out = {}
    for bucket, req in requests:
        want = _pair_key(req["chunk"], req["frag"])
        n = _lookup(table["key"], table["n"], want, missing=0)
        at = np.clip(np.searchsorted(table["key"], want), 0, max(table["key"].size - 1, 0))
        hit = n > 0
        first = np.full((want.size, spec.ndim), np.nan)
        last = np.full((want.size, spec.ndim), np.nan)
        inner = np.zeros(want.size)
        first[hit], last[hit], inner[hit] = (table["first"][at[hit]], table["last"][at[hit]],
                                             table["inner"][at[hit]])
        out[bucket] = {"chunk": req["chunk"], "frag": req["frag"], "n": n, "first": first,
                       "last": last, "inner": inner}
    send_exchange(spec.store, out, spec.target_level, "context_frags", block)


def object_context(spec: StepSpec, bucket: int, refs: dict, want_points: bool,
                   _summaries_done=None) -> dict:
    """Each row's polyline length: its fragments' inner lengths plus the
    jumps between consecutive non-empty fragments, in manifest order.
    With ``want_points``, asks the blocks for each row's midpoint vertex
    (index ``count // 2`` of its vertex sequence); else writes the context."""
    parts = [p for _, p in received(spec, "context_frags", bucket)]
    cat = (lambda k, shape=(0,): np.concatenate([p[k] for p in parts]) if parts
           else np.empty(shape))
    key = _pair_key(cat("chunk").astype(np.int64), cat("frag").astype(np.int64))
    order = np.argsort(key)
    key = key[order]
    n_f, inner_f = cat("n")[order].astype(np.int64), cat("inner")[order]
    first_f = cat("first", (0, spec.ndim))[order]
    last_f = cat("last", (0, spec.ndim))[order]
    counts = refs["counts"]
    n_rows = counts.size
    owner = np.repeat(np.arange(n_rows), counts)
    ok = refs["ref_chunk"] >= 0
    want = _pair_key(np.where(ok, refs["ref_chunk"], 0), refs["ref_frag"])
    at = np.zeros(want.size, dtype=np.int64)
    n_ref = np.zeros(want.size, dtype=np.int64)
    if key.size:
        at = np.clip(np.searchsorted(key, want), 0, key.size - 1)
        n_ref = np.where(ok & (key[at] == want), n_f[at], 0)
    live = np.flatnonzero(n_ref > 0)  # refs that contribute vertices, in manifest order
    o, a = owner[live], at[live]
    lengths = np.bincount(o, weights=inner_f[a], minlength=n_rows)
    same = o[1:] == o[:-1]
    jump = np.sqrt(np.sum((first_f[a[1:]] - last_f[a[:-1]]) ** 2, axis=1))
    lengths += np.bincount(o[1:][same], weights=jump[same], minlength=n_rows)
    if not want_points:
        send_exchange(spec.store, {bucket: {"lengths": lengths}}, spec.target_level, "context", 0)
        return {}
    # The midpoint vertex: the live ref whose vertex range holds index
    # total // 2 of its row, and the vertex's index inside that fragment.
    nl = n_ref[live]
    total = np.bincount(o, weights=nl, minlength=n_rows).astype(np.int64)
    cum = np.cumsum(nl)
    row_start = np.zeros(n_rows, dtype=np.int64)
    has = total > 0
    first_live = np.searchsorted(o, np.arange(n_rows))
    row_start[has] = (cum - nl)[first_live[has]]
    target = row_start + total // 2
    rows_with = np.flatnonzero(has)
    j = np.searchsorted(cum, target[rows_with], side="right")
    idx = live[j]
    local = target[rows_with] - (cum[j] - nl[j])
    chunk, frag = refs["ref_chunk"][idx], refs["ref_frag"][idx]
    send_exchange(spec.store, _split_by(block_of(spec, chunk), row=rows_with, chunk=chunk,
                                        frag=frag, local=local),
                  spec.target_level, "context_points", bucket)
    return {"lengths": lengths}


def fragment_points(spec: StepSpec, block: int, numbers: np.ndarray, _done=None) -> None:
    """The positions of the midpoint vertices the buckets asked for."""
    requests, chunks = _requested_fragments(spec, block, numbers, "context_points")
    out = {}
    for bucket, req in requests:
        pos = np.empty((req["row"].size, spec.ndim))
        for num in np.unique(req["chunk"]).tolist():
            rows, members, flens = chunks[num]
            sel = np.flatnonzero(req["chunk"] == num)
            starts = np.cumsum(flens) - flens
            pos[sel] = rows[members[starts[req["frag"][sel]] + req["local"][sel]]]
        out[bucket] = {"row": req["row"], "point": pos}
    send_exchange(spec.store, out, spec.target_level, "context_pointvals", block)


def object_points(spec: StepSpec, bucket: int, ctx: dict, _done=None) -> None:
    """Write a bucket's context: lengths and representative points (NaN
    for a row without vertices)."""
    lengths = ctx["lengths"]
    points = np.full((lengths.size, spec.ndim), np.nan)
    for _, p in received(spec, "context_pointvals", bucket):
        points[p["row"]] = p["point"]
    send_exchange(spec.store, {bucket: {"lengths": lengths, "points": points}},
                  spec.target_level, "context", 0)
