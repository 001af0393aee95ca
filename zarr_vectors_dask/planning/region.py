"""The region a refresh rewrites, from what changed in level 0: pure
functions over array names, cell coordinates and row counts (no I/O).

A level-0 change reaches the coarse levels in one of three ways:

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
* ``whole``: anything else -- vertices, fragments, manifests, ids,
  per-vertex attributes, any metadata document: every coarse level is
  rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

from .sparsity import ranked

__all__ = ["LINKS", "ATTRIBUTES", "WHOLE", "INTRA_LEVEL_LINK_ARRAYS", "RefreshRegion",
           "classify", "dirty_buckets", "recompose_chunks"]

LINKS = "links"
ATTRIBUTES = "attributes"
WHOLE = "whole"

#: Level-0 arrays no coarsening step reads (array names as
#: ``fingerprint.array_of`` gives them, by their first component).
INTRA_LEVEL_LINK_ARRAYS = ("links/0", "link_fragments", "link_attributes")

_OBJECT_ATTRIBUTES = "object_attributes/"


@dataclass(frozen=True)
class RefreshRegion:
    """What a refresh rewrites: ``kind`` (``links``, ``attributes`` or
    ``whole``), why in words, and for ``attributes`` the dirty buckets of
    each object-attribute array (``((name, (bucket, ...)), ...)``)."""

    kind: str
    reason: str
    buckets: tuple = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.buckets)

    @property
    def n_buckets(self) -> int:
        return sum(len(b) for _, b in self.buckets)


def _is_intra_level_link(array: str) -> bool:
    return any(array == a or array.startswith(a + "/") for a in INTRA_LEVEL_LINK_ARRAYS)


def classify(by_array: dict[str, dict[str, int]], *, factors, sparsity_strategy: str,
             sparsity_seed, same_layout=frozenset()) -> tuple[str, str]:
    """``(kind, reason)`` of a level-0 change, given per array its changed,
    added and removed cells and changed documents (``SourceDiff.by_array``)
    and the pyramid's recorded sparsity.  ``same_layout``: object-attribute
    arrays whose document changed but not their shape or dtype, all a
    coarse level's document takes from it (zarr-vectors' EditSession
    rewrites the array, compressed, when it edits one value)."""
    arrays = sorted(by_array)
    if not arrays:
        return WHOLE, "no fingerprint to compare with"
    if all(_is_intra_level_link(a) for a in arrays):
        return LINKS, "only intra-level links changed, which no coarse level reads"
    moved = [a for a in arrays
             if not (a.startswith(_OBJECT_ATTRIBUTES) or _is_intra_level_link(a))]
    if moved:
        return WHOLE, f"{', '.join(moved)} changed"
    docs = [a for a in arrays if a.startswith(_OBJECT_ATTRIBUTES) and by_array[a]["documents"]
            and a not in same_layout]
    if docs:
        return WHOLE, f"the metadata of {', '.join(docs)} changed (shape or dtype)"
    drops = [float(sf) for _, sf in factors if float(sf) > 1.0]
    if any(ranked(sparsity_strategy, sf, 2) for sf in drops):
        return WHOLE, (f"object attributes changed and sparsity {sparsity_strategy!r} "
                       f"ranks objects by their geometry (survivors not stored)")
    if drops and sparsity_seed is None:
        return WHOLE, ("object attributes changed and the survivors were drawn without a "
                       "seed (sparsity_seed=None): there is no redraw to be equal to")
    return ATTRIBUTES, "only object-attribute cells changed"


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
