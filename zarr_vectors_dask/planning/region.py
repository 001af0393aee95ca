"""The region a refresh rewrites, from what changed in level 0: pure
functions over array names, cell coordinates and row counts (no I/O).

A level-0 change reaches the coarse levels in one of four ways:

* ``links``: only intra-level links (``links/0``, ``link_fragments``,
  ``link_attributes``) changed.  No coarse level reads them (zarr-vectors'
  ``coarsen_level`` reads level 0's ``+1`` links only, which the build
  writes), so nothing above level 0 is rewritten; the refresh records the
  new fingerprint.
* ``attributes``: only cells of object-attribute arrays changed (their
  documents, hence shapes and dtypes, did not).  A coarse level's object
  attributes are its source level's rows, index for index, with the rows
  sparsity dropped set to the fill value; the survivors do not depend on
  attribute values when they are drawn at random (or nothing is dropped),
  so only the attribute buckets holding changed rows are rewritten, level
  by level.
* ``chunks``: only cells of the vertex arrays and the object index
  changed, rows at most appended (edits in place, and copy-on-write
  edits, which file an edited object anew): a step is restricted to the
  coarse chunks whose metavertices can differ (``chunk_region``), each
  next step to what the last one changed; with rows added, the levels
  from the first that drops objects on are recomputed whole (their
  survivors are drawn anew);
* ``whole``: anything else -- ids changed, per-vertex attributes, rows
  removed, other metadata documents, a sharded pyramid: every coarse
  level is recomputed.

Why a chunk region equals a full build: a metavertex's centroid lies
between its bin's vertices, so inside its bin; a bin touching a changed
chunk is homed in a target chunk meeting it (``reachable_targets``), and
every vertex of a bin homed in a target lies in a source chunk meeting
that bin (``supporting_sources``).  Recomputing the targets from those
sources recomputes each of their metavertices whole; metavertices homed
elsewhere are unchanged and keep their old parents.  A vertex outside its
chunk is found from the old ``+1`` links, a changed object's old weights
from its old coarse row (``fallen``).
"""

from __future__ import annotations

from dataclasses import dataclass

from .sparsity import ranked

__all__ = ["LINKS", "ATTRIBUTES", "WHOLE", "INTRA_LEVEL_LINK_ARRAYS", "RefreshRegion",
           "classify", "dirty_buckets", "recompose_chunks", "CHUNKS", "CHUNK_ARRAYS", "reachable_targets",
           "supporting_sources", "dilate", "ChunkRegion", "chunk_region"]

LINKS = "links"
ATTRIBUTES = "attributes"
WHOLE = "whole"
CHUNKS = "chunks"

#: Level-0 arrays no coarsening step reads (array names as
#: ``fingerprint.array_of`` gives them, by their first component).
INTRA_LEVEL_LINK_ARRAYS = ("links/0", "link_fragments", "link_attributes")

_OBJECT_ATTRIBUTES = "object_attributes/"


@dataclass(frozen=True)
class RefreshRegion:
    """What a refresh rewrites: ``kind`` (``links``, ``attributes`` or
    ``whole``), why in words, and for ``attributes`` and ``chunks`` the
    dirty buckets of each object-attribute array
    (``((name, (bucket, ...)), ...)``)."""

    kind: str
    reason: str
    buckets: tuple = ()
    #: ``chunks``: the changed level-0 chunks (``chunks``), the level-1
    #: chunks whose weights fell (``fallen``), the changed objects (``rows``).
    change: dict | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.buckets)

    @property
    def n_buckets(self) -> int:
        return sum(len(b) for _, b in self.buckets)


def _is_intra_level_link(array: str) -> bool:
    return any(array == a or array.startswith(a + "/") for a in INTRA_LEVEL_LINK_ARRAYS)


#: Level-0 arrays whose changed cells a refresh bounds to chunks.
CHUNK_ARRAYS = ("vertices", "vertex_fragments")


def classify(by_array: dict[str, dict[str, int]], *, factors, sparsity_strategy: str,
             sparsity_seed, same_layout=frozenset(), chunk_layout: str = "") -> tuple[str, str]:
    """``(kind, reason)`` of a level-0 change, given per array its changed,
    added and removed cells and changed documents (``SourceDiff.by_array``)
    and the pyramid's recorded sparsity.  ``same_layout``: object-attribute
    arrays whose document changed but not their shape or dtype, all a
    coarse level's document takes from it (zarr-vectors' EditSession
    rewrites the array, compressed, when it edits one value).
    ``chunk_layout``: why the pyramid's layout cannot be refreshed by
    chunks ("" when it can: unsharded, with ``+1`` links, no per-vertex
    attributes)."""
    arrays = sorted(by_array)
    if not arrays:
        return WHOLE, "no fingerprint to compare with"
    if all(_is_intra_level_link(a) for a in arrays):
        return LINKS, "only intra-level links changed, which no coarse level reads"
    moved = [a for a in arrays
             if not (a.startswith(_OBJECT_ATTRIBUTES) or _is_intra_level_link(a))]
    cells = [a for a in moved if a in (*CHUNK_ARRAYS, "object_index/manifests")]
    bounded = cells and all(_bounded_by_chunks(a, by_array[a]) for a in moved)
    if moved and not bounded:
        return WHOLE, f"{', '.join(moved)} changed"
    docs = [a for a in arrays if a.startswith(_OBJECT_ATTRIBUTES) and by_array[a]["documents"]
            and a not in same_layout]
    if docs:
        return WHOLE, f"the metadata of {', '.join(docs)} changed (shape or dtype)"
    if bounded:
        # Object-attribute cells changed with them are rewritten by bucket
        # after the chunk region's steps (the survivors are the build's).
        return _chunks_or_whole(moved, factors, sparsity_strategy, sparsity_seed, chunk_layout,
                                [a for a in arrays if a.startswith(_OBJECT_ATTRIBUTES)])
    why = _survivors_not_kept(factors, sparsity_strategy, sparsity_seed)
    if why:
        return WHOLE, f"object attributes changed and {why}"
    return ATTRIBUTES, "only object-attribute cells changed"


def _survivors_not_kept(factors, sparsity_strategy: str, sparsity_seed) -> str:
    """Why a region refresh cannot keep the survivors of sparsity of the
    rows it does not recompute ("" when it can: they depend on the row
    count and the seed alone, or nothing is dropped)."""
    drops = [float(sf) for _, sf in factors if float(sf) > 1.0]
    if any(ranked(sparsity_strategy, sf, 2) for sf in drops):
        return (f"sparsity {sparsity_strategy!r} ranks objects by their geometry (survivors "
                f"not stored)")
    if drops and sparsity_seed is None:
        return ("the survivors were drawn without a seed (sparsity_seed=None): there is no "
                "redraw to be equal to")
    return ""


def _bounded_by_chunks(array: str, row: dict) -> bool:
    """A change a chunk region bounds: cells of the vertex arrays (and
    their documents, whose chunk list EditSession rewrites when a chunk
    appears or empties), the object index if rows were only appended
    (the refresh checks), and the
    documents EditSession rewrites with the same content for the build
    (the level group drops ``fragments_tile``; the object index group is
    re-serialised)."""
    if array in CHUNK_ARRAYS:  # a document change: its chunk list (see refresh)
        return True
    if array in ("object_index/manifests", "object_index/object_ids"):
        return True  # rows appended, ids kept: the refresh checks both (step.region)
    return array in ("level metadata", "object_index") and not \
        (row["changed"] or row["added"] or row["removed"])


def _chunks_or_whole(moved, factors, sparsity_strategy: str, sparsity_seed, chunk_layout: str,
                     attributes=()):
    what = f"only cells of {', '.join([*moved, *attributes])} changed"
    if chunk_layout:
        return WHOLE, f"{what}, but {chunk_layout}"
    why = _survivors_not_kept(factors, sparsity_strategy, sparsity_seed)
    if why:
        return WHOLE, f"{what}, and {why}"
    also = " (and the object-attribute buckets holding changed rows)" if attributes else ""
    return CHUNKS, f"{what}: the coarse chunks they reach are recomputed{also}"


def dirty_buckets(chunks, cell_rows: int, n_rows: int, bucket: int) -> tuple[int, ...]:
    """The buckets (runs of ``bucket`` rows) holding a row of any of the
    level-0 cells ``chunks`` (coordinates whose first is the cell's row
    index; ``cell_rows`` rows a cell) of an array of ``n_rows`` rows."""
    out = set()
    for c in chunks:
        lo = int(c[0]) * int(cell_rows)
        hi = min(lo + int(cell_rows), int(n_rows))
        if hi > lo:
            out.update(range(lo // bucket, (hi - 1) // bucket + 1))
    return tuple(sorted(out))


def recompose_chunks(changed: dict[int, set], parents: dict[int, dict]) -> dict[int, set]:
    """The chunks of each level whose composed ``+N``/``-N`` cells (N >= 2)
    can differ after a rewrite: those whose ``+1`` cell changed, appeared
    or vanished (``changed[level]``), and, from the top level down, those
    with a parent chunk (``parents[level][chunk]``: the chunks of the next
    level its ``+1`` cell points into) among the next level's.  A ``+N``
    record composes the ``+1`` records along its chain, so a chunk none of
    whose chains meets a changed ``+1`` cell composes to the same cells."""
    out: dict[int, set] = {}
    above: set = set()
    for level in sorted(set(changed) | set(parents), reverse=True):
        mine = set(changed.get(level, ()))
        mine.update(c for c, ps in parents.get(level, {}).items() if not above.isdisjoint(ps))
        out[level] = mine
        above = mine
    return out


# ------------------------------------------------- a step restricted to chunks
def _box_cells(lo, hi) -> "np.ndarray":
    """Every integer coordinate of the boxes ``[lo[i], hi[i]]`` (inclusive),
    as rows (duplicates kept)."""
    import numpy as np
    lo, hi = np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64)
    if lo.shape[0] == 0:
        return np.empty((0, lo.shape[1] if lo.ndim == 2 else 0), np.int64)
    span = (hi - lo + 1).max(axis=0)
    offsets = np.stack(np.unravel_index(np.arange(int(np.prod(span))), tuple(span.tolist())),
                       axis=1)
    cells = lo[:, None, :] + offsets[None, :, :]
    inside = np.all(cells <= hi[:, None, :], axis=2)
    return cells[inside]


def _unique_rows(rows) -> set:
    import numpy as np
    rows = np.asarray(rows, dtype=np.int64)
    return set(map(tuple, np.unique(rows, axis=0).tolist())) if rows.size else set()


def _spans(lo_edge, hi_edge, size) -> tuple:
    """Cells of width ``size`` meeting ``[lo_edge, hi_edge)``: first, last."""
    import numpy as np
    return (np.floor(lo_edge / size).astype(np.int64),
            np.ceil(hi_edge / size).astype(np.int64) - 1)


def _through_bins(chunks, own, bin_shape, other) -> set:
    """Chunks of width ``other`` meeting a bin that meets one of
    ``chunks`` (width ``own``).  Tight: a vertex ``p`` of chunk ``c`` has
    ``c*own <= p < (c+1)*own``, its bin ``k`` ``k*b <= p < (k+1)*b``."""
    import numpy as np
    c = np.asarray(sorted(chunks), dtype=np.int64).reshape(len(chunks), -1)
    return _unique_rows(_box_cells(*_reach_boxes(c, own, bin_shape, other)))


def _reach_boxes(c, own, bin_shape, other) -> tuple:
    """Per row of ``c`` (chunks of width ``own``), the first and last
    chunk of width ``other`` meeting a bin that meets it."""
    import numpy as np
    own, b, other = (np.asarray(x, dtype=np.float64) for x in (own, bin_shape, other))
    k_lo, k_hi = _spans(c * own, (c + 1) * own, b)
    return _spans(k_lo * b, (k_hi + 1) * b, other)


def reachable_targets(chunks, source_chunk, bin_shape, target_chunk) -> set:
    """Target chunks a metavertex can be homed in when a vertex of one of
    the source ``chunks`` (lying inside its chunk) is in its bin: the
    target chunks meeting the bins that meet the chunk.  A centroid lies
    between its bin's vertices, so inside the bin."""
    return _through_bins(chunks, source_chunk, bin_shape, target_chunk)


def supporting_sources(targets, target_chunk, bin_shape, source_chunk) -> set:
    """Source chunks whose (well placed) vertices can fall in a bin that
    meets one of the target chunks: everything a metavertex homed there
    is summed from."""
    return _through_bins(targets, target_chunk, bin_shape, source_chunk)


def dilate(chunks, by) -> set:
    """The chunks within ``by`` chunks (per axis) of any of ``chunks``."""
    import numpy as np
    c = np.asarray(sorted(chunks), dtype=np.int64).reshape(len(chunks), -1)
    by = np.asarray(by, dtype=np.int64)
    return _unique_rows(_box_cells(c - by, c + by))


@dataclass(frozen=True)
class ChunkRegion:
    """One step restricted to chunks: ``targets``, the coarse chunks whose
    cells (vertices, fragments, ``-1`` links, and the ``+1`` cells into
    them) are recomputed whole, and ``sources``, the source chunks read to
    do so -- every chunk with a vertex in a bin homed in a target;
    ``rows``: ids of the objects recomputed whatever chunks they name
    (their manifest row changed at level 0 or at the step before);
    ``gone``: changed source chunks that no longer exist -- a row naming
    one is recomputed too (its fragment there is gone), though no vertex
    is read there."""

    targets: frozenset
    sources: frozenset
    rows: frozenset = frozenset()
    gone: frozenset = frozenset()


def chunk_region(changed, *, old_links: dict, present, source_chunk, bin_shape,
                 target_chunk, fallen=(), rows=frozenset()) -> ChunkRegion:
    """The region of one step, from the source chunks whose content
    changed (``changed``: their vertices, fragments or weights; their new
    vertices inside their chunks) and the source level's ``+1`` cells as
    they were (``old_links``: source chunk -> target chunks it links into).
    ``fallen``: target chunks holding metavertices whose weights fell (an
    object no longer names their fragments): their bins' centroids move,
    within the bins.

    Targets: those a changed chunk reaches now or did before.  Sources:
    the present chunks supporting the targets' bins, and any chunk whose
    old links leave its own reach (a vertex outside its chunk) towards the
    targets' neighbours, where a bin meeting a target can be homed."""
    targets = reachable_targets(changed, source_chunk, bin_shape, target_chunk) if changed \
        else set()
    for c in changed:
        targets.update(old_links.get(tuple(c), ()))
    if fallen:
        targets |= _through_bins(fallen, target_chunk, bin_shape, target_chunk)
    if not targets:
        return ChunkRegion(frozenset(), frozenset(), frozenset(rows))
    present = {tuple(c) for c in present}
    gone = frozenset(tuple(c) for c in changed) - present
    sources = supporting_sources(targets, target_chunk, bin_shape, source_chunk) & present
    import math
    reach = [int(math.ceil(b / t)) for b, t in zip(bin_shape, target_chunk)]
    near = dilate(targets, reach)
    sources |= _strays_near(old_links, sources, present, near, source_chunk, bin_shape,
                            target_chunk)
    return ChunkRegion(frozenset(targets), frozenset(sources), frozenset(rows), gone)


def _strays_near(old_links: dict, sources, present, near, source_chunk, bin_shape,
                 target_chunk) -> set:
    """Present chunks, not yet sources, whose old links leave their own
    reach (a vertex outside its chunk) into ``near``."""
    import numpy as np
    todo = [c for c in old_links if c not in sources and c in present]
    if not todo:
        return set()
    lo, hi = _reach_boxes(np.asarray(todo, dtype=np.int64), source_chunk, bin_shape,
                          target_chunk)
    out = set()
    for c, a, b in zip(todo, lo.tolist(), hi.tolist()):
        if any(t in near and not all(x <= y <= z for x, y, z in zip(a, t, b))
               for t in old_links[c]):
            out.add(c)
    return out
