"""Stages 1-2: bin partials per source block, and the shuffle that routes
them by bin key to a partition and reduces them into metavertices."""

from __future__ import annotations

import numpy as np

from ..errors import FormatError
from ..format import naming as nm
from . import attributes as va
from .exchange import received
from .links import distinct_rows
from .spec import (StepSpec, _lookup, _pair_key, _partition_of, _read_attribute_cells,
                   _read_source_chunks, _split_by, _target_block)

__all__ = ["bin_partials", "bin_keys", "reduce_metavertices"]


# ------------------------------------------------------------- stage 1
def bin_partials(spec: StepSpec, block: int, numbers: np.ndarray, partitions: list[int],
                 _refs_done=None) -> dict:
    """Bin every vertex of a block of source chunks.

    Each fragment instance's vertices get its bin key; a fragment's weight
    is the number of kept objects naming it (1 for an implicit object).
    Sends, per partition, the block's distinct keys with float64 partial
    sums and counts — weight-0 keys too, so their vertices can still find
    a parent — and keeps the per-vertex key index for later stages.
    ``partitions`` are the partitions the plan routes this block to (from
    geometry alone); a key outside them is an error.
    """
    ref_parts, mkeys, mvals = _fragment_weights(spec, block)
    g = _gather(spec, numbers, mkeys, mvals)
    ukeys, inverse, sums, counts = _bin_sums(spec, g["pos"], g["w"])
    exchange, part, slot = _route(spec, block, partitions, ukeys, sums, counts, inverse, g)
    # Instances in the reference's flat order: chunk by chunk, each chunk's
    # fragments in order; per chunk its id and instance count.
    state = {"chunk_ids": g["chunk_ids"], "chunk_instances": g["chunk_instances"],
             "inst_frag": g["inst_frag"], "inverse": inverse, "partition": part, "slot": slot,
             "ref_parts": ref_parts}
    return {"exchange": exchange, "state": state}


def _fragment_weights(spec: StepSpec, block: int):
    """The ``refs`` parts the buckets sent this block, and the weight of
    each named fragment (by pair key): summed over the buckets naming it."""
    ref_parts = received(spec, "refs", block) if spec.has_objects else []
    parts = [p for _, p in ref_parts]
    if parts:
        mkeys, inv = np.unique(np.concatenate([_pair_key(p["chunk"], p["frag"]) for p in parts]),
                               return_inverse=True)
        mvals = np.bincount(inv.reshape(-1), weights=np.concatenate([p["mult"] for p in parts]),
                            minlength=mkeys.size).astype(np.int64)
    else:
        mkeys = mvals = np.empty(0, dtype=np.int64)
    return ref_parts, mkeys, mvals


def _gather(spec: StepSpec, numbers: np.ndarray, mkeys: np.ndarray, mvals: np.ndarray) -> dict:
    """The block's fragment instances: positions, weights, fragment index
    and (asked for) attribute values, in the reference's flat order."""
    # Per chunk only the decode and the gather; the rest is one numpy call
    # per block (a fine grid has tens of thousands of small chunks).
    cids, n_inst, frag_lengths, all_pos = [], [], [], []
    attr_cells = _read_attribute_cells(spec, numbers)
    all_vals: list[list[np.ndarray]] = [[] for _ in spec.vertex_attributes]
    for cid, cc, rows, members, lengths in _read_source_chunks(spec, numbers):
        for i, attr in enumerate(spec.vertex_attributes):
            what = f"{spec.store.describe(attr.source.path)} chunk {nm.chunk_key(cc)}"
            all_vals[i].append(va.decode_cell(attr, attr_cells[i][cc], rows.shape[0],
                                              what=what)[members])
        cids.append(cid)
        n_inst.append(int(members.size))
        frag_lengths.append(lengths)
        all_pos.append(rows[members])
    cids_a = np.asarray(cids, dtype=np.int64)
    n_frags = np.fromiter((f.size for f in frag_lengths), dtype=np.int64, count=len(cids))
    lengths = np.concatenate(frag_lengths) if cids else np.empty(0, np.int64)
    # Each fragment's chunk and index in it; each instance's fragment.
    frag_chunk = np.repeat(cids_a, n_frags)
    frag_local = np.arange(lengths.size, dtype=np.int64) - np.repeat(np.cumsum(n_frags) - n_frags,
                                                                     n_frags)
    inst_global = np.repeat(np.arange(lengths.size, dtype=np.int64), lengths)
    w_frag = _lookup(mkeys, mvals, _pair_key(frag_chunk, frag_local)) if spec.has_objects \
        else np.ones(lengths.size, dtype=np.int64)
    if all_pos:
        pos = np.concatenate(all_pos).astype(np.float32, copy=False)
    else:
        pos = np.empty((0, spec.ndim), dtype=np.float32)
    return {"chunk_ids": cids_a, "chunk_instances": np.asarray(n_inst, dtype=np.int64),
            "w": w_frag[inst_global], "inst_frag": frag_local[inst_global], "pos": pos,
            "values": all_vals}


def _bin_sums(spec: StepSpec, pos: np.ndarray, w: np.ndarray):
    """The block's distinct bin keys, each vertex's key index, and per key
    the float64 weighted position sums and the weights' total."""
    # Any order of the distinct keys will do here (write_metavertices sorts
    # them by bytes); a block's bins span little, so they are counted.
    ukeys, inverse = distinct_rows(bin_keys(pos, spec.bin_shape))
    n_u = ukeys.shape[0]
    sums = np.empty((n_u, spec.ndim), dtype=np.float64)
    # Weights are mostly all 1 (each fragment named once): x * 1.0 == x.
    ones = bool(w.size) and int(w.min()) == 1 == int(w.max())
    wf = None if ones else w.astype(np.float64)
    buf = None if ones else np.empty(pos.shape[0], dtype=np.float64)
    for a in range(spec.ndim):
        col = pos[:, a] if ones else np.multiply(pos[:, a], wf, out=buf)
        sums[:, a] = np.bincount(inverse, weights=col, minlength=n_u)
    counts = np.bincount(inverse, minlength=n_u) if ones else \
        np.bincount(inverse, weights=w, minlength=n_u).astype(np.int64)
    return ukeys, inverse, sums, counts


def bin_keys(pos: np.ndarray, bin_shape) -> np.ndarray:
    """``floor(pos / bin_shape)`` as int64 (division in float64, as the
    reference does it), one column at a time through one reused buffer:
    the whole-array form makes three temporaries of 24 bytes per vertex
    (1.5x the time in a block; far more when they are fresh pages)."""
    n, d = pos.shape
    keys = np.empty((n, d), dtype=np.int64)
    q = np.empty(n, dtype=np.float64)
    for a in range(d):
        np.divide(pos[:, a], np.float64(bin_shape[a]), out=q, dtype=np.float64)
        np.floor(q, out=q)
        keys[:, a] = q
    return keys


def _route(spec: StepSpec, block: int, partitions: list[int], ukeys, sums, counts, inverse,
           g: dict):
    """Split the keys' partials (and attribute partials) by partition:
    the exchange, each key's partition and its slot in the part sent
    there.  A key outside the planned ``partitions`` is an error."""
    n_u = ukeys.shape[0]
    part = _partition_of(spec, ukeys)
    stray = ~np.isin(part, np.asarray(partitions, dtype=np.int64))
    if stray.any():
        bad = int(np.flatnonzero(stray)[0])
        raise FormatError(
            f"{spec.store.describe(spec.vertices.path)}: block {block} has a vertex in bin "
            f"{ukeys[bad].tolist()}, outside the chunks it is stored in (more than one target "
            f"chunk away); the level's chunk assignment is inconsistent")
    # Position of each unique key inside the part sent to its partition.
    order = np.argsort(part, kind="stable")
    slot = np.empty(n_u, dtype=np.int64)
    if n_u:
        sp = part[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sp)) + 1]
        first = np.repeat(starts, np.diff(np.r_[starts, n_u]))
        slot[order] = np.arange(n_u) - first
    columns = {"keys": ukeys, "sums": sums, "counts": counts}
    pair_parts: list[tuple[int, dict]] = []
    for i, attr in enumerate(spec.vertex_attributes):
        what = spec.store.describe(attr.source.path)
        vals = va.concat_rows(attr, g["values"][i], what=what).astype(np.dtype(attr.dtype),
                                                                      copy=False)
        per_key, pairs = va.partials(attr, vals, g["w"], inverse, n_u)
        columns.update({f"va{i}:{k}": v for k, v in per_key.items()})
        if pairs:
            # Histogram entries go to their key's partition, naming the
            # key by its slot in the part sent there.
            pk = pairs.pop("pk")
            pair_parts.append((i, _split_by(part[pk], pk=slot[pk], **pairs)))
    exchange = _split_by(part, **columns)
    for i, routed in pair_parts:
        for p, cols in routed.items():
            exchange[p].update({f"va{i}:{k}": v for k, v in cols.items()})
    return exchange, part, slot


# ------------------------------------------------------------- stage 2
def reduce_metavertices(spec: StepSpec, partition: int, sources: list[int], region,
                        *parts: dict) -> dict:
    """Sum the partials of one partition into metavertices (centroid, count)
    and route each to the target block of the chunk its centroid falls in.
    ``region`` (a ``StepRegion``): only metavertices homed in its target
    chunks are written; the others (``outside``) keep their old parents."""
    # Planned routes are a superset of the real ones: drop empty senders.
    sources = [s_ for s_, p in zip(sources, parts) if p is not None]
    parts = tuple(p for p in parts if p is not None)
    keys = np.concatenate([p["keys"] for p in parts]) if parts else np.empty((0, spec.ndim), np.int64)
    sums = np.concatenate([p["sums"] for p in parts]) if parts else np.empty((0, spec.ndim))
    counts = np.concatenate([p["counts"] for p in parts]) if parts else np.empty(0, np.int64)
    # Metavertex ids are internal to the partition: any key order works.
    ukeys, inv = distinct_rows(keys)
    n_u = ukeys.shape[0]
    total = np.bincount(inv, weights=counts, minlength=n_u).astype(np.int64)
    centroid = np.empty((n_u, spec.ndim), dtype=np.float32)
    for a in range(spec.ndim):
        centroid[:, a] = np.bincount(inv, weights=sums[:, a], minlength=n_u) / np.maximum(total, 1)
    exists = np.flatnonzero(total > 0)
    chunks = np.floor(centroid[exists] / np.asarray(spec.chunk_shape, dtype=np.float64)).astype(np.int64)
    outside = np.empty(0, dtype=np.int64)
    if region is not None:
        mine = region.has_target(spec, chunks)
        outside, exists, chunks = exists[~mine], exists[mine], chunks[mine]
    tb = _target_block(spec, chunks)
    offsets = np.cumsum([0] + [p["keys"].shape[0] for p in parts])
    attrs = {}
    for i, attr in enumerate(spec.vertex_attributes):
        pre = f"va{i}:"
        per_key = [{k[len(pre):]: v for k, v in p.items() if k.startswith(pre) and
                    not k.startswith(pre + "p")} for p in parts]
        pairs = [{k[len(pre):]: v for k, v in p.items() if k.startswith(pre + "p")}
                 for p in parts]
        rows = [np.arange(offsets[j], offsets[j + 1]) for j in range(len(parts))]
        vals = va.reduce(attr, per_key, pairs, rows, inv, n_u, total,
                         what=f"{spec.store.describe(attr.source.path)} (partition {partition})")
        attrs[f"va{i}"] = vals[exists]
    out = _split_by(tb, mv=exists, chunk=chunks, key=ukeys[exists], centroid=centroid[exists],
                    **attrs)
    return {"to_target": out, "inverse": inv, "n_unique": n_u, "outside": outside,
            "source_slices": {s: (int(offsets[i]), int(offsets[i + 1])) for i, s in enumerate(sources)}}
