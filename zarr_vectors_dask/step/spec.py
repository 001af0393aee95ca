"""A step's spec (everything its tasks share, shipped once in the graph) and
the small helpers every stage uses: chunk numbers, blocks, partitions,
reading source chunks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CorruptChunkError
from ..format import cells as fcells
from ..format import codecs as cdc
from ..format import naming as nm
from ..storage.store import Store

__all__ = ["StepSpec", "LevelPair", "StepRegion", "chunk_numbers", "chunk_coords", "block_of",
           "target_numbers", "grid_numbers", "grid_coords"]


@dataclass(frozen=True)
class StepSpec:
    """Everything a task of one coarsening step needs besides its inputs:
    shapes and small per-block tables, never a per-chunk or per-object list.

    Source chunks are named by their *chunk number*, the row-major index of
    the chunk in the source grid; source blocks are runs of chunk numbers
    and target blocks runs of the target grid, each given by its starts."""

    store: Store
    source_level: int
    target_level: int
    ndim: int
    bin_shape: tuple[float, ...]
    chunk_shape: tuple[float, ...]
    source_origin: tuple[int, ...]
    source_grid_shape: tuple[int, ...]
    target_origin: tuple[int, ...]
    target_grid_shape: tuple[int, ...]
    block_starts: tuple[int, ...]         # first chunk number of each source block
    target_block_starts: tuple[int, ...]  # first target-grid index of each target block
    scale_source: tuple[int, ...]  # chunk shape as a multiple of root's
    scale_target: tuple[int, ...]
    vertices: fcells.VlenArrayInfo  # without its chunk list (``chunks=()``)
    fragments: fcells.VlenArrayInfo
    source_dtype: str
    has_objects: bool
    manifests_path: str | None
    links: str  # none | implicit | explicit
    #: Per-vertex attributes aggregated into the metavertices (opt-in).
    vertex_attributes: tuple = ()
    #: Cells per storage object of every array the step writes (None:
    #: one object per cell), and the routes of its sharded levels' cells.
    shard_shape: tuple[int, ...] | None = None
    shard_routes: tuple = ()

    def __repr__(self) -> str:
        return f"StepSpec({self.store!r}, {self.source_level}->{self.target_level})"


@dataclass(frozen=True)
class LevelPair:
    """What the object-level stages a refresh reruns alone
    (``attribute_survivors``, ``write_attributes``) read of a step: its
    store and its two levels -- a ``StepSpec`` without the vertex layout."""

    store: Store
    source_level: int
    target_level: int


@dataclass(frozen=True)
class StepRegion:
    """A step restricted to a region (a refresh; ``planning.region``), as
    its tasks see it: the target chunks recomputed whole (``targets``,
    target-grid numbers) and the source chunks read (``sources``, chunk
    numbers), both sorted; ``n_old`` tasks read the old parents of the
    fragments outside ``sources`` that objects crossing it name;
    ``rows``: ids of the objects recomputed whatever they name;
    ``old_rows``: the target level's manifest rows before the refresh
    (their stored layout when rows were added; -1: as many as now);
    ``gone``: source chunks that changed and no longer exist (numbers)."""

    targets: np.ndarray
    sources: np.ndarray
    n_old: int = 1
    rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    old_rows: int = -1
    gone: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def has_target(self, spec: "StepSpec", chunks: np.ndarray) -> np.ndarray:
        return _member(self.targets, target_numbers(spec, chunks))

    def has_source(self, numbers: np.ndarray) -> np.ndarray:
        return _member(self.sources, np.asarray(numbers, dtype=np.int64))

    def has_gone(self, numbers: np.ndarray) -> np.ndarray:
        return _member(self.gone, np.asarray(numbers, dtype=np.int64))


def _member(sorted_set: np.ndarray, values: np.ndarray) -> np.ndarray:
    if sorted_set.size == 0:
        return np.zeros(values.shape, dtype=bool)
    at = np.clip(np.searchsorted(sorted_set, values), 0, sorted_set.size - 1)
    return (sorted_set[at] == values) & (values >= 0)


def target_numbers(spec: "StepSpec", chunks: np.ndarray) -> np.ndarray:
    """Row-major index of target chunks in the target grid; -1 outside it."""
    return grid_numbers(chunks, spec.target_origin, spec.target_grid_shape)


def grid_numbers(coords, origin, grid) -> np.ndarray:
    """Row-major index of chunks in a grid (``origin``, ``grid`` shape);
    -1 outside it.  Column by column (a coarse bucket names ~10^6 chunks)."""
    shape = [int(s) for s in grid]
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, len(shape))
    out = np.zeros(coords.shape[0], dtype=np.int64)
    inside = np.ones(coords.shape[0], dtype=bool)
    for d, (o, s) in enumerate(zip(origin, shape)):
        rel = coords[:, d] - int(o)
        inside &= rel.view(np.uint64) < s  # a negative offset wraps to a huge one
        out *= s
        out += rel
    out[~inside] = -1
    return out


def grid_coords(numbers, origin, grid) -> np.ndarray:
    """Inverse of :func:`grid_numbers`."""
    rel = np.unravel_index(np.asarray(numbers, dtype=np.int64), tuple(grid))
    return np.stack(rel, axis=1).reshape(-1, len(grid)) + np.asarray(origin, np.int64)


# ------------------------------------------------------------- helpers
def _void(keys: np.ndarray) -> np.ndarray:
    """Rows of int64 bin coordinates as raw-byte scalars: ``np.unique`` on
    these sorts byte-lexicographically, which is the reference's order."""
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    return keys.view(np.dtype((np.void, 8 * keys.shape[1]))).ravel()


def _target_block(spec: StepSpec, chunks: np.ndarray) -> np.ndarray:
    """Target block of coarse chunks (coordinates clipped into the grid
    against float rounding)."""
    shape = np.asarray(spec.target_grid_shape, dtype=np.int64)
    rel = np.clip(np.asarray(chunks, dtype=np.int64) - np.asarray(spec.target_origin), 0, shape - 1)
    lin = np.ravel_multi_index(tuple(rel.T), tuple(shape.tolist()))
    return np.searchsorted(np.asarray(spec.target_block_starts, dtype=np.int64), lin,
                           side="right") - 1


def _partition_of(spec: StepSpec, keys: np.ndarray) -> np.ndarray:
    """Reduce partition of a bin key: the target block of its lower corner."""
    lower = np.floor(keys.astype(np.float64) * np.asarray(spec.bin_shape) /
                     np.asarray(spec.chunk_shape)).astype(np.int64)
    return _target_block(spec, lower)


def chunk_numbers(spec: StepSpec, coords: np.ndarray) -> np.ndarray:
    """Row-major index of source chunks in the source grid; -1 outside it."""
    return grid_numbers(coords, spec.source_origin, spec.source_grid_shape)


def chunk_coords(spec: StepSpec, numbers: np.ndarray) -> np.ndarray:
    """Inverse of ``chunk_numbers``."""
    return grid_coords(numbers, spec.source_origin, spec.source_grid_shape)


def block_of(spec: StepSpec, numbers: np.ndarray) -> np.ndarray:
    """Source block owning each chunk number."""
    return np.searchsorted(np.asarray(spec.block_starts, dtype=np.int64), numbers,
                           side="right") - 1


def _split_by(dest: np.ndarray, **columns: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    out: dict[int, dict[str, np.ndarray]] = {}
    if dest.size == 0:
        return out
    order = np.argsort(dest, kind="stable")
    d = dest[order]
    cuts = np.flatnonzero(np.diff(d)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, d.size]):
        sel = order[lo:hi]
        out[int(d[lo])] = {k: v[sel] for k, v in columns.items()}
    return out


def _read_source_chunks(spec: StepSpec, numbers: np.ndarray):
    coords = [tuple(c) for c in chunk_coords(spec, numbers).tolist()]
    verts = fcells.read_cells(spec.store, spec.vertices, coords)
    frags = fcells.read_cells(spec.store, spec.fragments, coords)
    dtype = np.dtype(spec.source_dtype)
    for num, cc in zip(np.asarray(numbers).tolist(), coords):
        def what(cc=cc):  # built only for a message
            return f"{spec.store.describe(spec.vertices.path)} chunk {nm.chunk_key(cc)}"
        v, f = verts[cc], frags[cc]
        if v is None or f is None:
            raise CorruptChunkError(f"{what()}: listed as present but its cell is missing")
        rows, members, lengths = cdc.decode_vertex_cell(v, f, dtype=dtype, ndim=spec.ndim,
                                                        what=what)
        yield int(num), cc, rows, members, lengths


def _read_fragment_lengths(spec: StepSpec, numbers: np.ndarray):
    """``(chunk id, fragment lengths)`` of source chunks, from their
    ``vertex_fragments`` cells only (no vertex rows are needed)."""
    coords = [tuple(c) for c in chunk_coords(spec, numbers).tolist()]
    frags = fcells.read_cells(spec.store, spec.fragments, coords)
    for num, cc in zip(np.asarray(numbers).tolist(), coords):
        def what(cc=cc):  # built only for a message
            return f"{spec.store.describe(spec.fragments.path)} chunk {nm.chunk_key(cc)}"
        if frags[cc] is None:
            raise CorruptChunkError(f"{what()}: listed as present but its cell is missing")
        yield int(num), cdc.fragment_lengths(frags[cc], what=what)


def _read_attribute_cells(spec: StepSpec, numbers: np.ndarray) -> list[dict]:
    """Each per-vertex attribute's cells for a block's chunks."""
    if not spec.vertex_attributes:
        return []
    coords = [tuple(c) for c in chunk_coords(spec, numbers).tolist()]
    return [fcells.read_cells(spec.store, a.source, coords) for a in spec.vertex_attributes]


def _pair_key(chunk_id: np.ndarray, frag: np.ndarray) -> np.ndarray:
    """One sortable int64 per (source chunk id, fragment index) pair."""
    return (np.asarray(chunk_id, dtype=np.int64) << 32) | np.asarray(frag, dtype=np.int64)


def _lookup(keys: np.ndarray, values, want: np.ndarray, missing=0):
    """``values`` at the positions of ``want`` in sorted ``keys``; ``missing``
    where absent.  ``values`` may be a tuple of arrays: one search serves
    them all (a tuple comes back)."""
    several = isinstance(values, tuple)
    columns = values if several else (values,)
    if keys.size == 0:
        out = tuple(np.full(want.shape, missing, dtype=v.dtype) for v in columns)
    else:
        at = np.clip(np.searchsorted(keys, want), 0, keys.size - 1)
        found = keys[at] == want
        out = tuple(np.where(found, v[at], missing) for v in columns)
    return out if several else out[0]
