"""Write a level-0 streamline store in bounded memory.

``zarr_vectors.types.polylines.write_polylines`` needs every polyline in one
list and queues every cell of the level in one write session, so it holds
the whole level (several times over) in memory: for 100M vertices that is
tens of GB.  zarr-vectors 0.9.2 has no writer that can do better for this
layout (``ZVWriter.append_vertices`` writes one fragment per (object, chunk)
but no cross-chunk links and a different index flow; ``ObjectIndexAppender``
writes a different object-index layout), so this module drives the same
lower-level helpers ``write_polylines`` calls, in two passes:

1. lines arrive in batches; each is split at chunk boundaries with
   zarr-vectors' own ``split_polyline_at_boundaries``.  Fragment vertices are
   appended to one spill file per chunk, each object's manifest (fragment
   numbers are running per-chunk counters, as in ``write_polylines``) is
   encoded at once, and boundary bridges are kept as small integer arrays;
2. chunks are written in ascending key order with ``write_chunk_vertices``,
   a few million vertices per ``open_write_session``, then the object index
   and the bridges (``write_links``) in a last session.

Memory: one batch of lines, one session's cells, and O(objects + bridges)
integers — never the level's vertices.  The result is the store
``write_polylines`` writes for the same lines (tests/test_scale.py compares
them file by file).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

CHUNK_SHAPE = (125.0, 125.0, 125.0)
BIN_SHAPE = (5.0, 5.0, 5.0)
BOX = 1000.0
POINTS_PER_LINE = 100


# ------------------------------------------------------------------ data
def random_walk_batches(n_lines: int, *, seed: int = 0, step: float = 2.0,
                        batch_lines: int = 16_384, points: int = POINTS_PER_LINE,
                        box: float = BOX, corner_fraction: float = 0.0,
                        corner_size: float = 125.0):
    """The lines of ``benchmarks/bench_pyramid.py``'s ``child_write``, in batches.

    That function draws all starts (``uniform``) and then all steps
    (``normal``) from one generator.  Both draws fill their output in order,
    so a second generator advanced past the ``3 * n_lines`` uniform draws
    yields the same steps batch by batch: the lines are bit-identical to the
    single-shot version for any batch size.

    ``corner_fraction`` > 0 starts that fraction of the lines (drawn from a
    third generator, so the default draws are untouched) inside the corner
    cube ``[0, corner_size)^3`` instead of the whole box: a dense region.
    """
    corner = np.random.default_rng([seed, 1]) if corner_fraction > 0 else None
    starts = np.random.default_rng(seed)
    steps = np.random.default_rng(seed)
    steps.bit_generator.advance(3 * n_lines)  # one 64-bit draw per uniform double
    top = np.nextafter(np.float32(box), np.float32(0))
    for lo in range(0, n_lines, batch_lines):
        b = min(batch_lines, n_lines - lo)
        start = starts.uniform(0.0, box, size=(b, 1, 3))
        if corner is not None:
            start[corner.random(b) < corner_fraction] *= corner_size / box
        step_b = steps.normal(0.0, step, size=(b, points - 1, 3))
        walk = np.concatenate([start, start + np.cumsum(step_b, axis=1)], axis=1)
        walk = np.abs(walk) % (2 * box)
        walk = np.where(walk >= box, 2 * box - walk, walk)
        yield np.clip(walk, 0.0, top).astype(np.float32)


# ------------------------------------------------------------------ writer
class _Spill:
    """Per-chunk append-only files of fragment vertices and lengths."""

    def __init__(self, root: Path):
        self.root = root
        self.counts: dict[tuple, int] = {}      # fragments so far, per chunk
        self.rows: dict[tuple, int] = {}        # vertex rows so far, per chunk

    def _name(self, cc) -> Path:
        return self.root / "_".join(map(str, cc))

    def append(self, cc, verts: list[np.ndarray]) -> None:
        with open(self._name(cc).with_suffix(".v"), "ab") as fh:
            fh.write(np.concatenate(verts).tobytes())
        with open(self._name(cc).with_suffix(".n"), "ab") as fh:
            fh.write(np.asarray([len(v) for v in verts], dtype=np.int64).tobytes())

    def read(self, cc, dtype, ndim) -> list[np.ndarray]:
        lengths = np.fromfile(self._name(cc).with_suffix(".n"), dtype=np.int64)
        flat = np.fromfile(self._name(cc).with_suffix(".v"), dtype=dtype).reshape(-1, ndim)
        return np.split(flat, np.cumsum(lengths)[:-1])


def write_polylines_partitioned(path: str | os.PathLike, batches: Iterable[np.ndarray], *,
                                chunk_shape=CHUNK_SHAPE, bin_shape=BIN_SHAPE,
                                bounds=([0.0, 0.0, 0.0], [BOX, BOX, BOX]),
                                dtype: str = "float32", spill_dir: str | None = None,
                                session_vertices: int = 4_000_000) -> dict:
    """Write ``write_polylines(path, lines, chunk_shape=..., bin_shape=...,
    bounds=...)`` for the lines of ``batches`` (each an ``(n, P, D)`` array or
    a list of ``(P_k, D)`` arrays, object ids in order) without holding them
    all.  ``session_vertices`` bounds the vertices queued per write session.
    """
    from zarr_vectors.constants import (
        CROSS_CHUNK_EXPLICIT, GEOM_STREAMLINE, LINKS_IMPLICIT_SEQUENTIAL, OBJIDX_STANDARD,
        VERTICES,
    )
    from zarr_vectors.core import arrays as zva
    from zarr_vectors.core.metadata import LevelMetadata
    from zarr_vectors.core.store import (
        _apply_out_of_bounds_policy, _create_or_open_store, _ensure_root_metadata_for_write,
        _finalize_write, create_resolution_level,
    )
    from zarr_vectors.encoding.fragments import (
        encode_object_manifest_blocks, encode_object_manifests_many,
    )
    from zarr_vectors.spatial.boundary import split_polyline_at_boundaries

    np_dtype = np.dtype(dtype)
    bounds_list = (list(bounds[0]), list(bounds[1]))
    tmp = Path(tempfile.mkdtemp(prefix="zv-level0-", dir=spill_dir))
    try:
        spill = _Spill(tmp)
        blobs: list[bytes] = []                  # one encoded manifest per object
        bridge_cc: list[np.ndarray] = []         # (M, 2, D) chunk coords per bridge (int32: a grid index)
        bridge_vi: list[np.ndarray] = []         # (M, 2) chunk-local vertex rows
        ndim = None
        total_vertices = 0
        n_objects = 0
        root = None

        # ---- pass 1: split, spill, manifests, bridges
        for batch in batches:
            lines = [np.asarray(p, dtype=np_dtype) for p in batch]
            if not lines:
                continue
            if ndim is None:
                ndim = lines[0].shape[1]
                root = _create_or_open_store(path, bounds=bounds_list,
                                             chunk_shape=tuple(chunk_shape), ndim=ndim)
            pts = np.concatenate(lines)
            _apply_out_of_bounds_policy(root, pts, policy="raise")
            total_vertices += len(pts)
            del pts
            per_chunk: dict[tuple, list[np.ndarray]] = {}
            manifests = []
            cc_rows, vi_rows = [], []
            for line in lines:
                manifest, ends = [], []
                for cc, seg in split_polyline_at_boundaries(line, chunk_shape):
                    frag = spill.counts.get(cc, 0)
                    first = spill.rows.get(cc, 0)
                    spill.counts[cc] = frag + 1
                    spill.rows[cc] = first + len(seg)
                    per_chunk.setdefault(cc, []).append(seg)
                    manifest.append((cc, frag))
                    ends.append((cc, first, first + len(seg) - 1))
                # A bridge for every consecutive pair of fragments (they are
                # in different chunks by construction of the split).
                for (ca, _, last_a), (cb, first_b, _) in zip(ends, ends[1:]):
                    if ca != cb:
                        cc_rows.append((ca, cb))
                        vi_rows.append((last_a, first_b))
                manifests.append(manifest)
            blobs.extend(encode_object_manifests_many(manifests, sid_ndim=ndim))
            n_objects += len(lines)
            if cc_rows:
                bridge_cc.append(np.asarray(cc_rows, dtype=np.int32).reshape(-1, 2, ndim))
                bridge_vi.append(np.asarray(vi_rows, dtype=np.int64).reshape(-1, 2))
            for cc, segs in per_chunk.items():
                spill.append(cc, segs)
            del lines, per_chunk, manifests
        if root is None:
            from zarr_vectors.exceptions import ArrayError
            raise ArrayError("Cannot write empty polyline list")

        # ---- metadata, in write_polylines' order
        _ensure_root_metadata_for_write(
            root, inferred_ndim=ndim, geometry_type=GEOM_STREAMLINE,
            base_bin_shape=bin_shape, links_convention=LINKS_IMPLICIT_SEQUENTIAL,
            object_index_convention=OBJIDX_STANDARD, cross_chunk_strategy=CROSS_CHUNK_EXPLICIT)
        level_group = create_resolution_level(root, 0, LevelMetadata(
            level=0, vertex_count=total_vertices, arrays_present=[VERTICES, "object_index"],
            chunk_dims=None, chunk_attribute_name=None, chunk_attribute_values=None))

        def session():
            return zva.open_write_session(level_group, bounds=bounds_list,
                                          chunk_shape=chunk_shape)

        # ---- pass 2: chunk cells, a bounded number of vertices per session
        keys = sorted(spill.counts)
        first = True
        i = 0
        while i < len(keys) or first:
            with session():
                if first:
                    zva.create_vertices_array(level_group, dtype=dtype)
                    zva.create_object_index_array(level_group)
                    first = False
                queued = 0
                while i < len(keys) and (queued == 0 or
                                         queued + spill.rows[keys[i]] <= session_vertices):
                    cc = keys[i]
                    zva.write_chunk_vertices(level_group, cc, spill.read(cc, np_dtype, ndim),
                                             dtype=np_dtype)
                    queued += spill.rows[cc]
                    i += 1

        # ---- object index and bridges (write_object_index with the
        # manifests already encoded in pass 1)
        with session():
            empty = encode_object_manifest_blocks([], sid_ndim=ndim)
            zva._check_object_index_size(n_objects, n_objects)
            zva._write_object_index_manifests(level_group, blobs)
            zva._write_object_id_table(level_group, range(n_objects))
            level_group.write_array_meta(zva.OBJECT_INDEX, {
                "zv_array": "object_index",
                "num_objects": n_objects,
                "num_present": sum(1 for b in blobs if b != empty),
                "sid_ndim": ndim,
                "layout": zva.OBJECT_INDEX_LAYOUT_V2,
                zva.OBJECT_IDS_SORTED_ATTR: True,
            })
            del blobs
            if bridge_vi:
                zva.write_links(level_group, [], ndim, delta=0, link_width=2,
                                _arrays=(np.concatenate(bridge_cc).astype(np.int64),
                                         np.concatenate(bridge_vi)))
        n_bridges = int(sum(len(v) for v in bridge_vi))
        zva.stamp_fragments_tile(level_group, ndim)
        _finalize_write(root, "write_polylines")
        return {"polyline_count": n_objects, "vertex_count": total_vertices,
                "chunk_count": len(keys), "cross_chunk_link_count": n_bridges}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
