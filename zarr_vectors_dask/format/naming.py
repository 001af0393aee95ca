"""The format's names: array and group names, capabilities, bucket sizes,
chunk keys, link family paths, cell paths and exchange-file keys."""

from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import numpy as np

__all__ = ["VERTICES", "VERTEX_FRAGMENTS", "VERTEX_ATTRIBUTES", "OBJECT_INDEX",
           "OBJECT_ATTRIBUTES", "LINKS", "NONEMPTY", "ORIGIN", "MANIFEST_BUCKET",
           "ATTRIBUTE_BUCKET", "CAP_PRESERVED_OBJECT_IDS", "CAP_SHARED_FRAGMENTS",
           "CAP_MULTISCALE_LINKS", "chunk_key", "parse_chunk_key", "parse_chunk_keys",
           "format_delta", "format_offsets", "links_family_path", "cell_path", "cell_chunk",
           "anchor", "linked_chunk", "chunks_linking_to", "segment_cells", "cell_chunks",
           "linked_chunks", "link_map", "is_composed_family", "MANIFEST_DIGESTS", "EXCHANGE_DIR",
           "exchange_key"]


VERTICES = "vertices"


VERTEX_FRAGMENTS = "vertex_fragments"


VERTEX_ATTRIBUTES = "vertex_attributes"


OBJECT_INDEX = "object_index"


OBJECT_ATTRIBUTES = "object_attributes"


LINKS = "links"


NONEMPTY = "nonempty_chunks"


ORIGIN = "chunk_grid_origin"


#: Rows per zarr chunk of ``object_index/manifests`` (zarr-vectors' bucket).
MANIFEST_BUCKET = 16_384


#: Rows per zarr chunk of an object attribute column.
ATTRIBUTE_BUCKET = 65_536


CAP_PRESERVED_OBJECT_IDS = "preserved_object_ids"


CAP_SHARED_FRAGMENTS = "shared_fragments"


CAP_MULTISCALE_LINKS = "multiscale_links"


# ----------------------------------------------------------------- naming
def chunk_key(coords: Sequence[int]) -> str:
    return ".".join(str(int(c)) for c in coords)


def parse_chunk_key(key: str) -> tuple[int, ...]:
    return tuple(int(x) for x in key.split("."))


def parse_chunk_keys(keys: Sequence[str], ndim: int) -> np.ndarray:
    """:func:`parse_chunk_key` of many keys, as an ``(n, ndim)`` int64 array
    (a family's documents name ~10^4 chunks: parsed in one go)."""
    if not keys:
        return np.empty((0, ndim), dtype=np.int64)
    bad = next((k for k in keys if k.count(".") != ndim - 1), None)
    out = np.fromstring(".".join(keys), dtype=np.int64, sep=".") if bad is None else None
    if out is None or out.size != len(keys) * ndim:  # (joined, a key of another rank shifts)
        raise ValueError(f"chunk key {bad or keys[0]!r} does not name a {ndim}-d chunk")
    return out.reshape(len(keys), ndim)


def format_delta(delta: int) -> str:
    return "0" if delta == 0 else f"{delta:+d}"


def format_offsets(offset: Sequence[int]) -> str:
    return ".".join("0" if int(o) == 0 else f"{int(o):+d}" for o in offset)


def links_family_path(level: int, delta: int) -> str:
    return f"{level}/{LINKS}/{format_delta(delta)}"


def is_composed_family(name: str) -> bool:
    """Whether an entry of a level's ``links/`` folder is a composed
    ``±N`` family (N >= 2): not intra-level links, ``±1`` or a document."""
    return name not in ("0", "+1", "-1", "zarr.json")


def cell_path(array_path: str, coords: Sequence[int], origin: Sequence[int]) -> str:
    """Storage key of one cell of a per-chunk vlen array (default
    ``/``-separated chunk key encoding, indices relative to the origin)."""
    if not any(origin):  # the common case, and a pyramid names ~10^5 cells
        return f"{array_path}/c/" + "/".join(map(str, map(int, coords)))
    idx = "/".join(str(int(c) - int(o)) for c, o in zip(coords, origin))
    return f"{array_path}/c/{idx}"


def cell_chunk(cell: str, origin: Sequence[int]) -> tuple[int, ...]:
    """The chunk of a cell from its key below ``<array>/c/`` (the inverse
    of :func:`cell_path`: indices relative to the origin)."""
    if not any(origin):  # the common case: a pyramid's listings name ~10^5 cells
        return tuple(map(int, cell.split("/")))
    return tuple(int(i) + int(o) for i, o in zip(cell.split("/"), origin))


def anchor(chunk: Sequence[int], scale_from: Sequence[int],
           scale_to: Sequence[int]) -> tuple[int, ...]:
    """A chunk's anchor on another level's grid, from the two levels'
    chunk scales (multiples of the root's): a link cell is keyed by its
    own chunk and the other end's chunk minus this anchor (its offset)."""
    return tuple((int(c) * int(a)) // int(b) for c, a, b in zip(chunk, scale_from, scale_to))


def linked_chunk(chunk: Sequence[int], offset: str, scale_from: Sequence[int],
                 scale_to: Sequence[int]) -> tuple[int, ...]:
    """The other end's chunk of a link cell of ``chunk`` in the offset
    array named ``offset``."""
    return tuple(a + o for a, o in zip(anchor(chunk, scale_from, scale_to),
                                       parse_chunk_key(offset)))


def chunks_linking_to(targets: Iterable[Sequence[int]], offset: str,
                      scale_from: Sequence[int], scale_to: Sequence[int]) -> set[str]:
    """Keys of the chunks whose cell in the offset array ``offset`` links
    to one of ``targets`` (the inverse of :func:`linked_chunk`): along an
    axis, ``c * a // b == t - o`` for the ``c`` in
    ``[ceil((t - o) b / a), ceil((t - o + 1) b / a))``."""
    off = parse_chunk_key(offset)
    out = set()
    for t in targets:
        ranges = []
        for ti, o, a, b in zip(t, off, scale_from, scale_to):
            lo = -((-(int(ti) - o) * int(b)) // int(a))  # ceil
            hi = -((-(int(ti) - o + 1) * int(b)) // int(a))
            ranges.append(range(lo, hi))
        out.update(chunk_key(c) for c in itertools.product(*ranges))
    return out


def segment_cells(listing: Iterable[str]) -> dict[str, list[str]]:
    """A links family's files (paths relative to it) by offset array:
    ``{offset: [cell key below its c/]}``; documents are left out."""
    out: dict[str, list[str]] = {}
    for rel in listing:
        seg, _, cell = rel.partition("/c/")
        if cell:
            out.setdefault(seg, []).append(cell)
    return out


def cell_chunks(cells: Sequence[str], origin: Sequence[int]) -> np.ndarray:
    """:func:`cell_chunk` of many cells of one array, as an ``(n, ndim)``
    int64 array (a level's listing names ~10^5 cells: parsed in one go)."""
    nd = len(origin)
    if not cells:
        return np.empty((0, nd), dtype=np.int64)
    bad = next((c for c in cells if c.count("/") != nd - 1), None)
    if bad is not None:  # (joined, it would shift every later cell's axes)
        raise ValueError(f"cell key {bad!r} does not name a {nd}-d chunk")
    flat = np.array("/".join(cells).split("/"), dtype=np.int64)
    return flat.reshape(len(cells), nd) + np.asarray(origin, dtype=np.int64)


def linked_chunks(chunks: np.ndarray, offset: str, scale_from: Sequence[int],
                  scale_to: Sequence[int]) -> np.ndarray:
    """:func:`linked_chunk` of many chunks' cells in one offset array."""
    a = np.asarray(scale_from, dtype=np.int64)
    b = np.asarray(scale_to, dtype=np.int64)
    return (chunks * a) // b + np.asarray(parse_chunk_key(offset), dtype=np.int64)


def link_map(segments, scale_from: Sequence[int], scale_to: Sequence[int]) -> dict[tuple, set]:
    """``{chunk: {chunks its cells link to}}`` of a links family, from its
    ``(offset, chunks)`` pairs (``(n, ndim)`` int64 each)."""
    out: dict[tuple, set] = {}
    for seg, src in segments:
        dst = linked_chunks(src, seg, scale_from, scale_to)
        for c, d in zip(map(tuple, src.tolist()), map(tuple, dst.tolist())):
            out.setdefault(c, set()).add(d)
    return out


# ------------------------------------------------------------ exchange files
#: Scratch of a running build: stage-to-stage exchanges that would cost a
#: Dask task per (sender, receiver) pair travel as files here instead.
EXCHANGE_DIR = ".zvdask/exchange"

#: A digest of each kept level-0 manifest row as the first step read it,
#: per bucket: how a refresh tells which rows an edit changed.
MANIFEST_DIGESTS = ".zvdask/manifest-rows"


def exchange_key(scope, kind: str, receiver: int, sender) -> str:
    """``scope``: the target level of a step, or ``compose``."""
    return f"{EXCHANGE_DIR}/{scope}/{kind}/{int(receiver)}/{sender}"
