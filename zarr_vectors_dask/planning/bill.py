"""The bill before the build: what a pyramid build costs an object store
(objects written; PUT / GET / HEAD / LIST / DELETE requests), per step, for
the composition and for the driver, unsharded and sharded -- estimated
from the plan alone (pure, no I/O), printed by ``plan_pyramid`` and
``--dry-run``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PlanError
from .runs import run_cap
from .sparsity import context_rounds, ranked
from .text import fmt_bytes, fmt_count, fmt_tuple

if TYPE_CHECKING:  # the plan imports this module (its repr is the bill's render)
    from .plan import LevelPlan, PyramidPlan

__all__ = ["LIST_PAGE", "MODEL_CHUNKS", "expected_shards", "ChunkSet", "chunk_candidates",
           "LinkEstimate", "link_estimate", "Bill", "step_bill", "compose_bill", "build_bill",
           "RequestPlan", "request_plan", "render"]


#: Keys per page of an object store listing (S3's ListObjectsV2).
LIST_PAGE = 1000


#: A level with more possible chunks than this (and no chunk list) is
#: modelled on a box of about this many chunks, and the counts scaled.
MODEL_CHUNKS = 1 << 20


def _row_keys(rows):
    """One int64 per row of int coordinates, equal iff the rows are equal."""
    import numpy as np
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape[0] == 0:
        return np.empty(0, dtype=np.int64)
    lo = rows.min(axis=0)
    span = rows.max(axis=0) - lo + 1
    if float(np.prod(span.astype(np.float64))) >= 2.0 ** 62:
        return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
    return np.ravel_multi_index(tuple((rows - lo).T), tuple(span.tolist())).astype(np.int64)


def _log_absent(p):
    """log(1 - p): summed over chunks, the log of "none of them is there"."""
    import numpy as np
    with np.errstate(divide="ignore"):
        return np.log1p(-np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0))


def expected_shards(coords, p, shard) -> float:
    """Expected number of shards (``shard`` chunks per axis) holding at
    least one present chunk, chunk ``i`` being present with probability
    ``p[i]``, independently."""
    import numpy as np
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return 0.0
    keys = _row_keys(np.floor_divide(np.asarray(coords, dtype=np.int64),
                                     np.asarray(shard, dtype=np.int64)))
    _, inv = np.unique(keys, return_inverse=True)
    s = np.bincount(inv.reshape(-1), weights=_log_absent(p))
    return float(np.sum(-np.expm1(s)))


@dataclass
class ChunkSet:
    """The chunks of one level that may hold cells: their coordinates,
    each one's probability of being present, and how many real chunks one
    modelled chunk stands for (1 unless a huge grid is modelled on a box)."""
    coords: Any   # (n, ndim) int64 chunk coordinates
    p: Any        # (n,) float64
    weight: float = 1.0

    @property
    def expected(self) -> float:
        return float(self.p.sum()) * self.weight

    def shards(self, shard) -> float:
        return expected_shards(self.coords, self.p, shard) * self.weight

    def leading(self) -> float:
        """Expected distinct leading grid indices (slabs) holding a chunk; a
        modelled box stands for ``weight ** (1 / ndim)`` times as many."""
        import numpy as np
        coords = np.asarray(self.coords, dtype=np.int64)
        if coords.shape[0] == 0:
            return 0.0
        return expected_shards(coords[:, :1], self.p, (1,)) * self.weight ** (1.0 / coords.shape[1])


def chunk_candidates(grid, present: float, *, origin=None, coords=None) -> ChunkSet:
    """Present chunks of a level: ``coords`` when they are known (level 0's
    ``nonempty_chunks``: exact), else ``present`` chunks spread evenly over
    the grid, each chunk present with probability ``present / chunks``."""
    import numpy as np
    if coords is not None:
        c = np.asarray(coords, dtype=np.int64).reshape(-1, len(grid))
        return ChunkSet(c, np.ones(c.shape[0]))
    grid = tuple(max(1, int(g)) for g in grid)
    total = math.prod(grid)
    box = grid
    if total > MODEL_CHUNKS:
        shrink = (MODEL_CHUNKS / total) ** (1.0 / len(grid))
        box = tuple(max(1, int(g * shrink)) for g in grid)
    n = math.prod(box)
    rel = np.stack(np.unravel_index(np.arange(n), box), axis=1).reshape(n, len(grid))
    c = rel + np.asarray(origin if origin is not None else (0,) * len(grid), dtype=np.int64)
    p = np.full(n, min(1.0, max(0.0, float(present) / total)))
    return ChunkSet(c, p, weight=total / n)


def _axis_groups(c: int, cs: float, b: float, ct: float,
                 extent: tuple[float, float] = (-math.inf, math.inf),
                 spread: float = 1.0) -> tuple:
    """The bins overlapping chunk ``c`` along one axis, grouped by what they
    do: ``((share of the chunk, bins, ((offset, back offset, probability),
    ...)), ...)``.  Vertices lie in the chunk's part of the data's
    ``extent``; a bin's centroid lies around the middle of the bin's part
    of the extent, evenly over ``spread`` times its width (the mean of k
    vertices strays about 1/sqrt(k) as far as one vertex), so it lands in
    a target chunk with the share of that range the chunk covers.
    ``offset`` is that target chunk minus the chunk's anchor (the ``+N``
    array it goes to), ``back offset`` the chunk minus the target's anchor
    (the mirror's)."""
    tol = 1e-9 * max(cs, b, ct)
    lo, hi = max(c * cs, extent[0]), min((c + 1) * cs, extent[1])
    if hi - lo <= tol:  # a chunk outside the extent: take all of it
        lo, hi = c * cs, (c + 1) * cs
    anchor = math.floor(c * cs / ct + 1e-9)
    groups: dict = {}
    k = math.floor(lo / b + 1e-9) - 1
    while k * b < hi - tol:
        ov = min((k + 1) * b, hi) - max(k * b, lo)
        if ov > tol:
            blo, bhi = max(k * b, extent[0]), min((k + 1) * b, extent[1])
            if bhi - blo <= tol:
                blo, bhi = k * b, (k + 1) * b
            mid, half = (blo + bhi) / 2, (bhi - blo) * min(1.0, spread) / 2
            blo, bhi = mid - half, mid + half
            if bhi - blo <= tol:
                blo, bhi = mid - tol, mid + tol
            dist = []
            t = math.floor(blo / ct + 1e-9) - 1
            while t * ct < bhi - tol:
                o = min(bhi, (t + 1) * ct) - max(blo, t * ct)
                if o > tol:
                    dist.append((t - anchor, c - math.floor(t * ct / cs + 1e-9),
                                 round(o / (bhi - blo), 12)))
                t += 1
            key = (round(ov / (hi - lo), 12), tuple(dist))
            groups[key] = groups.get(key, 0) + 1
        k += 1
    return tuple((g, n, dist) for (g, dist), n in sorted(groups.items()))


def _axis_tables(behaviours: list):
    """One axis's behaviours (``_axis_groups`` results) as padded arrays:
    bin shares and counts ``(behaviour, group)``, landing probabilities
    ``(behaviour, group, target)``, and each target's offset and back
    offset ``(behaviour, target)``."""
    import numpy as np
    nb = len(behaviours)
    targets = [sorted({(o, bo) for _, _, dist in groups for o, bo, _ in dist})
               for groups in behaviours]
    ng = max(1, max(len(g) for g in behaviours))
    nt = max(1, max(len(t) for t in targets))
    share, count = np.zeros((nb, ng)), np.zeros((nb, ng))
    prob = np.zeros((nb, ng, nt))
    off, back = np.zeros((nb, nt), np.int64), np.zeros((nb, nt), np.int64)
    for i, (groups, tg) in enumerate(zip(behaviours, targets)):
        at = {t: j for j, t in enumerate(tg)}
        for j, (o, bo) in enumerate(tg):
            off[i, j], back[i, j] = o, bo
        for gi, (g, n, dist) in enumerate(groups):
            share[i, gi], count[i, gi] = g, n
            for o, bo, pr in dist:
                prob[i, gi, at[(o, bo)]] += pr
    return share, count, prob, off, back


def _spread(x, axis: int, nd: int, first: int = 1):
    """``x`` of shape ``(n, k)`` reshaped to broadcast as axis ``axis`` of
    ``nd`` per-axis dimensions (after ``first`` leading dimensions)."""
    shape = [x.shape[0]] + [1] * (first - 1) + [1] * nd
    shape[first + axis] = x.shape[1]
    return x.reshape(shape)


def _landing(tables: list, cls, m: float):
    """For chunk classes ``cls`` (``(n, nd)`` behaviour ids per axis): the
    probability that at least one of a chunk's vertices has its parent in
    each target chunk ``(n, T1, ..., Tnd)``, given that some do, ``m``
    occupied coarse bins per chunk spread over the chunk by volume (each
    bin's centroid lands in one target chunk, by the share of the bin it
    covers)."""
    import numpy as np
    nd = len(tables)
    n = cls.shape[0]
    share = np.ones((n,) + (1,) * nd)
    count = np.ones((n,) + (1,) * nd)
    joint = np.ones((n,) + (1,) * (2 * nd))
    for a, (sh, ct, pr, _, _) in enumerate(tables):
        ids = cls[:, a]
        share = share * _spread(sh[ids], a, nd)
        count = count * _spread(ct[ids], a, nd)
        p = pr[ids]                                  # (n, G_a, T_a)
        shape = [n] + [1] * (2 * nd)
        shape[1 + a], shape[1 + nd + a] = p.shape[1], p.shape[2]
        joint = joint * p.reshape(shape)
    occupied = -np.expm1(-m * share)
    occ = occupied.reshape(occupied.shape + (1,) * nd)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.log1p(-np.clip(occ * joint, 0.0, 1.0))
    terms = np.where(joint > 0, terms, 0.0) * count.reshape(count.shape + (1,) * nd)
    # Given that the chunk has parents at all (the caller's probability),
    # at least one bin is occupied: condition on it.
    return np.minimum(1.0, -np.expm1(terms.sum(axis=tuple(range(1, 1 + nd)))) / -np.expm1(-m))


class _LogSums:
    """Sums of log(1 - p) per int row (a key: an offset, a chunk, a shard),
    merged in batches, so memory follows the distinct keys however many
    (chunk, target) pairs feed them."""

    FLUSH = 1 << 20

    def __init__(self):
        self.rows = None
        self.sums = None
        self._pending: list = []
        self._n = 0

    def add_rows(self, rows, logs) -> None:
        import numpy as np
        rows = np.asarray(rows, dtype=np.int64)
        logs = np.asarray(logs, dtype=np.float64).ravel()
        if rows.shape[0] == 0:
            return
        lo = rows.min(axis=0)
        span = rows.max(axis=0) - lo + 1
        if float(np.prod(span.astype(np.float64))) <= (1 << 21):
            # Summed per distinct row first: a bincount, no sort.
            idx = np.ravel_multi_index(tuple((rows - lo).T), tuple(span.tolist()))
            sums = np.bincount(idx, weights=logs, minlength=int(np.prod(span)))
            hit = np.flatnonzero(sums != 0)  # a zero sum: never there, nothing to count
            rows = np.stack(np.unravel_index(hit, tuple(span.tolist())), axis=1) + lo
            logs = sums[hit]
        self._pending.append((rows, logs))
        self._n += rows.shape[0]
        if self._n > self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        import numpy as np
        if not self._pending:
            return
        parts = self._pending if self.rows is None else [(self.rows, self.sums)] + self._pending
        rows = np.concatenate([r for r, _ in parts])
        sums = np.concatenate([v for _, v in parts])
        _, first, inv = np.unique(_row_keys(rows), return_index=True, return_inverse=True)
        self.rows = rows[first]
        self.sums = np.bincount(inv.reshape(-1), weights=sums, minlength=first.size)
        self._pending, self._n = [], 0

    def expected(self, weight: float = 1.0) -> float:
        """Expected number of keys with at least one member there; a box
        standing for ``weight`` times as many chunks scales the sums."""
        import numpy as np
        self._flush()
        return 0.0 if self.sums is None else float(np.sum(-np.expm1(self.sums * weight)))


@dataclass
class LinkEstimate:
    """One link family ``+N`` (fine level -> level N above) and its mirror."""
    cells: float            # expected +N cells (and -N cells: one mirror per cell)
    arrays: float           # expected +N offset arrays
    mirror_arrays: float    # expected -N offset arrays
    shards: float = 0.0     # expected +N shards (summed over its arrays), when sharded
    mirror_shards: float = 0.0
    landed: ChunkSet | None = None  # coarse chunks the parents land in
    slabs: float = 0.0      # expected (+N array, leading grid index) pairs holding a cell


#: (chunk, target) pairs per batch in ``link_estimate``: bounds its memory.
_BATCH_CELLS = 1 << 19


def link_estimate(fine: ChunkSet, *, active, fine_chunk, bin_shape, coarse_chunk, m: float,
                  coarse_grid=None, bounds=None, spread: float = 1.0, shard=None,
                  target_shards: bool = False, landed: bool = False) -> LinkEstimate:
    """Expected cells and offset arrays of a ``+N`` family (and its ``-N``
    mirror) from the fine level's chunks: chunk ``i`` holds vertices with
    ancestors with probability ``active[i]``; an ancestor is the centroid
    of the vertex's bin at the coarse level (``bin_shape``), so it lies in
    a coarse chunk that bin overlaps.  ``m``: occupied coarse bins per fine
    chunk; ``coarse_grid``: ``(origin, shape)`` of the coarse level's
    grid (a centroid lies inside the data's bounds, so in the grid);
    ``bounds``: ``(lower, upper)`` corners of the data, if known;
    ``spread``: how far a centroid strays from its bin's middle, as a share
    of the bin (1: anywhere in it; 1/sqrt(k) for k vertices a bin).  With
    ``shard``, also the shards of both families; with ``landed``, the
    coarse chunks that receive a parent (where the coarse level's vertex
    cells are)."""
    import numpy as np
    nd = len(bin_shape)
    coords = np.asarray(fine.coords, dtype=np.int64).reshape(-1, nd)
    active = np.asarray(active, dtype=np.float64)
    w = fine.weight
    if coords.shape[0] == 0 or not np.any(active > 0):
        return LinkEstimate(0.0, 0.0, 0.0, landed=ChunkSet(np.empty((0, nd), np.int64),
                                                            np.empty(0), w))
    cls, tables = _axis_classes(coords, fine_chunk, bin_shape, coarse_chunk, bounds, spread)
    ukeys, first, cls_of = np.unique(_row_keys(cls), return_index=True, return_inverse=True)
    cls_of = cls_of.reshape(-1)
    per_target = math.prod(t[2].shape[2] for t in tables)
    per_class = per_target * math.prod(t[2].shape[1] for t in tables)
    there = np.concatenate([
        _landing(tables, cls[first[i:i + max(1, _BATCH_CELLS // per_class)]], m)
        .reshape(-1, per_target)
        for i in range(0, first.size, max(1, _BATCH_CELLS // per_class))])
    shard_arr = None if shard is None else np.asarray(shard, dtype=np.int64)
    cells, sums = _link_sums(coords, cls, cls_of, there, active, tables,
                             fine_chunk=fine_chunk, coarse_chunk=coarse_chunk,
                             coarse_grid=coarse_grid, shard_arr=shard_arr,
                             target_shards=target_shards, landed=landed)
    est = LinkEstimate(cells * w, sums["arrays"].expected(w), sums["mirrors"].expected(w))
    # A box stands for w ** (1/nd) more slabs.
    est.slabs = sums["slabs"].expected() * w ** (1.0 / nd)
    if shard_arr is not None:
        est.shards = sums["plus_sh"].expected() * w
        est.mirror_shards = sums["minus_sh"].expected() * w
    if landed:
        got = sums["got"]
        got._flush()
        p = -np.expm1(got.sums)
        keep = p > 0
        est.landed = ChunkSet(got.rows[keep], p[keep], w)
    return est


def _axis_classes(coords, fine_chunk, bin_shape, coarse_chunk, bounds, spread):
    """Per axis, the distinct behaviours of the coordinates that occur
    (they repeat with the period of chunk, bin and coarse chunk): each
    chunk's class per axis, and each axis's tables (``_axis_tables``)."""
    import numpy as np
    cls = np.empty_like(coords)
    tables = []
    for a in range(coords.shape[1]):
        vals, inv = np.unique(coords[:, a], return_inverse=True)
        ids: dict = {}
        extent = (-math.inf, math.inf) if bounds is None else \
            (float(bounds[0][a]), float(bounds[1][a]))
        per_val = [ids.setdefault(_axis_groups(int(v), float(fine_chunk[a]), float(bin_shape[a]),
                                               float(coarse_chunk[a]), extent, spread),
                                  len(ids))
                   for v in vals.tolist()]
        cls[:, a] = np.asarray(per_val, dtype=np.int64)[inv.reshape(-1)]
        tables.append(_axis_tables(list(ids)))
    return cls, tables


def _link_sums(coords, cls, cls_of, there, active, tables, *, fine_chunk, coarse_chunk,
               coarse_grid, shard_arr, target_shards: bool, landed: bool):
    """Expected link cells, and the log-sums of the offset arrays, mirror
    arrays, slabs, shards and landed chunks, over batches of the fine
    chunks' (chunk, target) pairs that can happen."""
    import numpy as np
    nd = coords.shape[1]
    anchor = np.floor(coords * (np.asarray(fine_chunk, dtype=np.float64) /
                                np.asarray(coarse_chunk, dtype=np.float64)) + 1e-9
                      ).astype(np.int64)
    cells = 0.0
    sums = {k: _LogSums() for k in ("arrays", "mirrors", "got", "plus_sh", "minus_sh", "slabs")}
    per_target = there.shape[1]
    step = max(1, _BATCH_CELLS // per_target)
    tshape = tuple(t[3].shape[1] for t in tables)
    ratio = np.asarray(coarse_chunk, dtype=np.float64) / np.asarray(fine_chunk, dtype=np.float64)
    for lo in range(0, coords.shape[0], step):
        pr = there[cls_of[lo:lo + step]] * active[lo:lo + step, None]   # (chunks, targets)
        cells += float(pr.sum())
        row, col = np.nonzero(pr)  # only the (chunk, target) pairs that can happen
        logs = _log_absent(pr[row, col])
        ci = lo + row
        tix = np.unravel_index(col, tshape)
        off = np.stack([tables[a][3][cls[ci, a], tix[a]] for a in range(nd)], axis=1)
        back = np.stack([tables[a][4][cls[ci, a], tix[a]] for a in range(nd)], axis=1)
        coarse = anchor[ci] + off
        if coarse_grid is not None:
            lo_c = np.asarray(coarse_grid[0], dtype=np.int64)
            coarse = np.clip(coarse, lo_c, lo_c + np.asarray(coarse_grid[1], dtype=np.int64) - 1)
            off = coarse - anchor[ci]
            back = coords[ci] - np.floor(coarse * ratio + 1e-9).astype(np.int64)
        sums["arrays"].add_rows(off, logs)
        sums["mirrors"].add_rows(back, logs)
        sums["slabs"].add_rows(np.concatenate([off, coords[ci, :1]], axis=1), logs)
        if landed:
            sums["got"].add_rows(coarse, logs)
        if shard_arr is not None:
            sums["plus_sh"].add_rows(np.concatenate([off, coords[ci] // shard_arr], axis=1), logs)
            if target_shards:
                sums["minus_sh"].add_rows(np.concatenate([back, coarse // shard_arr], axis=1),
                                          logs)
    return cells, sums


def _pages(n_keys: float) -> float:
    """LIST requests of one listing of ``n_keys`` keys."""
    return max(1.0, math.ceil(n_keys / LIST_PAGE))


@dataclass
class Bill:
    """What one part of a build leaves in the store (objects by kind) and
    the requests it makes of an object store, as ``Store`` makes them
    through s3fs: a whole-object read sizes the object first (HEAD, then
    GET) unless a listing of its folder just did; a read of a missing key
    is a HEAD and then a LIST (s3fs checks for a folder of that name); a
    byte-range read (shards) is a GET.  ``delete`` counts objects deleted
    (S3 takes up to 1,000 in one request)."""
    name: str
    objects: dict = field(default_factory=dict)
    put: float = 0.0
    get: float = 0.0
    head: float = 0.0
    list: float = 0.0
    delete: float = 0.0

    def write(self, kind: str, n: float) -> None:
        """``n`` objects the build leaves in the store."""
        if n:
            self.objects[kind] = self.objects.get(kind, 0.0) + float(n)
            self.put += float(n)

    def scratch(self, n: float) -> None:
        """Objects written, read by other tasks, then deleted."""
        self.put += float(n)
        self.delete += float(n)

    def read(self, n: float = 1.0, *, listed: bool = False) -> None:
        """Whole reads of ``n`` existing objects."""
        self.get += float(n)
        if not listed:
            self.head += float(n)

    def miss(self, n: float = 1.0) -> None:
        """Reads of ``n`` keys that do not exist."""
        self.head += float(n)
        self.list += float(n)

    def ranged(self, n: float) -> None:
        self.get += float(n)

    def open_array(self, n: float = 1.0) -> None:
        """``zarr.open_array`` without a format: zarr.json, and the absent
        .zarray and .zattrs."""
        self.read(n)
        self.miss(2 * n)

    @property
    def n_objects(self) -> float:
        return float(sum(self.objects.values()))

    @property
    def requests(self) -> float:
        return self.put + self.get + self.head + self.list + self.delete

    def __add__(self, other: "Bill") -> "Bill":
        out = Bill(self.name, dict(self.objects), self.put + other.put, self.get + other.get,
                   self.head + other.head, self.list + other.list, self.delete + other.delete)
        for k, v in other.objects.items():
            out.objects[k] = out.objects.get(k, 0.0) + v
        return out


def _survival(n_kept: int, sparsity_factor: float, present: float, has_objects: bool) -> float:
    """Probability that a present chunk keeps at least one vertex of a kept
    object: each of its objects survives with ``1 / sparsity_factor``, and a
    chunk holds at least one object, more when there are more objects than
    chunks (a lower bound for objects that cross chunks)."""
    if not has_objects or sparsity_factor <= 1.0 or n_kept <= 1:
        return 1.0
    per_chunk = max(1.0, n_kept / max(1.0, present))
    return 1.0 - (1.0 - 1.0 / sparsity_factor) ** per_chunk


def _coarse_vertices(fine_vertices: float, active: float, *, coarsen_factor: float,
                     kept: float, fine_chunk, bin_shape) -> float:
    """Vertices of a coarse level (one per occupied bin): the fine level's,
    fewer by the coarsening factor and the share of objects kept, and never
    more than the bins of the fine level's active chunks (dense data fills
    them all)."""
    bins = active * math.prod(max(1.0, float(c) / float(b)) for b, c in zip(bin_shape, fine_chunk))
    return max(1.0, min(fine_vertices / max(1.0, coarsen_factor) * kept, bins))


def _occupied_bins(coarse_vertices: float, fine_vertices: float, active: float,
                   fine_chunk, bin_shape) -> float:
    """Coarse bins holding vertices of one active fine chunk: the coarse
    bins overlapping a chunk (``chunk / bin + 1`` per axis), times the
    share of the coarse bins of the active chunks that hold a vertex (the
    coarse level's vertices, one per occupied bin, over those bins), at
    most the chunk's own vertices."""
    ratio = [float(c) / float(b) for b, c in zip(bin_shape, fine_chunk)]
    overlapping = math.prod(r + 1.0 for r in ratio)
    per_chunk = max(1.0, active)
    filled = min(1.0, coarse_vertices / (per_chunk * math.prod(ratio)))
    return max(1e-9, min(fine_vertices / per_chunk, overlapping * filled))


def _spread_of(fine_vertices: float, coarse_vertices: float) -> float:
    """How far a centroid strays from its bin's middle (share of the bin):
    the mean of the ~``fine / coarse`` vertices it averages."""
    return 1.0 / math.sqrt(max(1.0, fine_vertices / max(1.0, coarse_vertices)))


def _packs(weight: float, shards: float, budget: int, n_workers: int) -> float:
    """``write_shards`` tasks of one sharded level: runs of its shards of at
    most the per-task weight (``run_cap``), never more than the shards."""
    cap = run_cap(weight, budget, n_workers)
    return max(1.0, min(max(1.0, shards), math.ceil(max(1.0, weight) / cap)))


def step_bill(lv: LevelPlan, *, source: ChunkSet, target: ChunkSet, links: LinkEstimate | None,
              shard=None, source_key=None, source_links_group: bool = True,
              source_vertices: float | None = None) -> Bill:
    """Objects and requests of one coarsening step (``lv``) from the
    chunks its source level holds (``source``), the coarse chunks that get
    vertices (``target``) and its ``±1`` link family (``links``).

    ``shard``: chunks per shard of the arrays this step writes (None:
    one object per cell); ``source_key``: chunks per storage key of the
    source level's cells (None: one per cell; a shard shape when the
    source is sharded); ``source_links_group``: the source level has a
    ``links`` group already (level 0 as zarr-vectors writes lines, any
    level a ``-1`` family reached); ``source_vertices``: the source
    level's vertices (the plan's when not given).

    Sharded, the writers send their cells as exchange files to one
    ``write_shards`` task per run of shards, which writes each shard whole:
    about one file per (writer, run) the writer's cells fall in."""
    b = Bill(f"{lv.source_level}->{lv.target_level}")
    c = _StepCounts.of(lv, links)
    per_array = _step_objects(b, c, lv, target, links, shard, source_links_group)
    exchange, folders, packs = _step_exchange(b, c, lv, source, shard, per_array,
                                              source_vertices)
    _step_driver(b, c, source, source_key, exchange, folders)
    _step_tasks(b, c, source, source_key, source_links_group, exchange, packs)
    return b


@dataclass(frozen=True)
class _StepCounts:
    """What a step's bill is counted from, derived once from its plan."""
    s: int  # source level
    t: int  # target level
    has_obj: bool
    k: int  # manifest buckets
    n_attr: int  # object attribute columns
    k_attr: int  # attribute buckets
    n_va: int  # aggregated per-vertex attributes
    blocks: int
    pairs: int  # (bucket, block) pairs
    ranked: bool  # survivors need per-object context
    rounds: int  # context exchange rounds
    links_on: bool
    explicit: bool

    @classmethod
    def of(cls, lv: LevelPlan, links) -> "_StepCounts":
        has_obj = lv.n_objects > 0
        k = lv.n_buckets if has_obj else 0
        n_attr = lv.n_object_attributes if has_obj else 0
        # Exchange files buckets -> blocks (fragment references) and back
        # (metavertex sequences): at most one per (bucket, block) pair, the
        # number when every bucket has objects in every block.
        by_rank = has_obj and ranked(lv.sparsity_strategy, lv.sparsity_factor, lv.n_objects)
        links_on = links is not None and lv.cross_level_storage != "none"
        return cls(s=lv.source_level, t=lv.target_level, has_obj=has_obj, k=k, n_attr=n_attr,
                   k_attr=math.ceil(lv.n_objects / 65_536) if n_attr else 0,
                   n_va=lv.n_vertex_attributes, blocks=lv.n_blocks, pairs=k * lv.n_blocks,
                   ranked=by_rank,
                   rounds=context_rounds(lv.sparsity_strategy) if by_rank else 0,
                   links_on=links_on,
                   explicit=links_on and lv.cross_level_storage == "explicit")


def _step_objects(b: Bill, c: _StepCounts, lv: LevelPlan, target: ChunkSet, links, shard,
                  source_links_group: bool) -> float:
    """Objects left in the store; returns the objects per vertex array."""
    kind = "shards" if shard is not None else "cells"
    per_array = target.shards(shard) if shard is not None else target.expected
    b.write(f"vertex {kind}", 2 * per_array)
    b.write(f"vertex attribute {kind}", c.n_va * per_array)
    if c.links_on:
        b.write(f"+1 link {kind}", links.shards if shard is not None else links.cells)
        if c.explicit:
            b.write(f"-1 link {kind}", links.mirror_shards if shard is not None else links.cells)
    b.write("manifest buckets", c.k)
    b.write("object id table", 1 if c.has_obj else 0)
    b.write("attribute buckets", c.n_attr * c.k_attr)
    docs = 2 + (c.n_va + 1 if c.n_va else 0) + (3 if c.has_obj else 0) + \
        (1 + c.n_attr if c.n_attr else 0)
    docs += 1  # the level's zarr.json
    if c.links_on:
        # Offset arrays and family groups; a links group where there is none.
        docs += links.arrays + 1 + (0 if source_links_group else 1)
        if c.explicit:
            docs += links.mirror_arrays + 1 + 1
    b.write("documents", docs)
    b.put += 1  # the root document, rewritten
    return per_array


def _task_exchange(c: _StepCounts) -> float:
    """Exchange files of the tasks (unsharded): buckets, pairs, context."""
    return c.k + c.k_attr + 2 * c.pairs + c.rounds * 2 * c.pairs + (c.k if c.ranked else 0)


def _step_exchange(b: Bill, c: _StepCounts, lv: LevelPlan, source: ChunkSet, shard,
                   per_array: float, source_vertices) -> tuple[float, float, float]:
    """Scratch: exchange files (one folder per kind and receiver) and the
    level's two build records; returns (files, folders, shard packs)."""
    exchange = _task_exchange(c)
    folders = 1 + (2 if c.has_obj else 0) + (1 if c.k_attr else 0) + (1 if c.pairs else 0) + \
        2 * c.k + c.k_attr + (c.blocks if c.pairs else 0)
    if c.ranked:
        folders += 1 + 2 * c.rounds + c.rounds * (c.blocks + c.k) + 1
    packs = 0.0
    if shard is not None:
        weight = float(lv.source_vertices if source_vertices is None else source_vertices)
        routes = [(_packs(weight, per_array, lv.max_block_vertices, lv.n_workers),
                   lv.n_target_blocks + (c.blocks if c.explicit else 0))]
        if c.links_on:
            routes.append((_packs(weight, source.shards(shard), lv.max_block_vertices,
                                  lv.n_workers), c.blocks))
        for n_packs, senders in routes:
            # Writers and runs both follow the grid's order, so a writer's
            # cells reach a run or two: about writers + runs files.
            exchange += senders + n_packs - 1
            folders += 1 + n_packs
            packs += n_packs
    b.scratch(exchange + 2)
    return exchange, folders, packs


def _step_driver(b: Bill, c: _StepCounts, source: ChunkSet, source_key, exchange: float,
                 folders: float) -> None:
    """The driver: re-plan from the published source, its shapes and one
    listing of its cells, then the commit (root, published levels)."""
    b.read(5 + (c.s > 0) + 5 + c.n_attr + (1 if c.has_obj else 0) + (1 if c.n_attr else 0) + 1
           + (c.t + 1))
    b.miss((0 if c.has_obj else 2) + (0 if c.n_attr else 1) + c.n_va)
    b.list += _pages(source.expected if source_key is None else source.shards(source_key))
    b.list += (1 if c.n_attr else 0) + 1
    # Exchange cleared before the step and removed after: s3fs lists it,
    # then walks and removes each folder.
    b.list += 4 + _pages(exchange) + 2 * folders


def _step_tasks(b: Bill, c: _StepCounts, source: ChunkSet, source_key,
                source_links_group: bool, exchange: float, packs: float) -> None:
    """The tasks' reads, opens and listings."""
    cells = source.expected
    if source_key is None:
        b.read((2 + c.n_va) * cells)                  # bin_partials: each cell
    else:  # each shard a block touches: its index, then the cells' bytes
        b.ranged((2 + c.n_va) * 2 * (source.shards(source_key) + c.blocks - 1))
    if c.has_obj:
        b.read(1 + 1)                                 # object_table: ids document, ids
        b.open_array(2 + c.n_attr)                    # ... ids, attributes, the new ids
        b.read(2 * c.k)                               # object_refs: its rows, manifests
        b.open_array(2 * c.k)                         # ... and write_manifests
        b.read(2 * c.pairs, listed=True)              # refs and sequences, found by listing
        b.list += c.blocks + c.k                      # ... their folders
        b.read(2 * c.n_attr * c.k_attr)               # write_attributes: flags, rows
        b.open_array(2 * c.n_attr * c.k_attr)
    if c.links_on:
        # Does each family's level have a links group yet?
        b.read(1 if source_links_group else 0)
        b.miss((0 if source_links_group else 1) + int(c.explicit))
    if packs:
        # write_shards: list its folder, read what the writers sent.
        b.list += packs
        b.read(exchange - _task_exchange(c), listed=True)
    if c.ranked:
        b.read(c.k)                                   # object_table reads the context
        b.read(c.k)                                   # context_refs: manifest rows
        b.open_array(c.k)
        b.read(c.rounds * 2 * c.pairs, listed=True)
        b.list += c.rounds * (c.blocks + c.k)
        if source_key is None:
            b.read(c.rounds * 2 * cells)
        else:
            b.ranged(c.rounds * 2 * 2 * (source.shards(source_key) + c.blocks - 1))


def compose_bill(sets: dict, links: dict, *, plus_one: dict, blocks: dict, shard=None,
                 packs: dict | None = None, storage: str = "explicit") -> Bill:
    """The closing composition: ``±N`` families (N >= 2).  ``links``:
    ``{(fine level, N): LinkEstimate}``; ``sets``: each level's chunks;
    ``plus_one``: ``{(level, 1): LinkEstimate}``, the ``+1`` families the
    tasks read; ``blocks``: composition tasks per fine level; ``packs``
    (sharded): ``write_shards`` tasks per level.

    A task reads the ``+1`` cells of its own chunks, then those of the
    chunks its vertices' ancestors are in, one level at a time: plain
    arrays by one listing per leading grid index (slab) the chunks span
    and array, then the cells the listing shows; sharded arrays alike on
    the shard grid, then each listed shard's index and the cells' bytes."""
    b = Bill("±N links")
    levels = sorted(sets)
    b.list += 1                                      # published levels
    b.read(len(levels))
    if not links:
        return b
    explicit = storage == "explicit"
    kind = "shards" if shard is not None else "cells"
    exchange, folders = 0.0, 1.0
    for (f, n), est in sorted(links.items()):
        b.write(f"+N link {kind}", est.shards if shard is not None else est.cells)
        docs = est.arrays + 1
        if explicit:
            b.write(f"-N link {kind}", est.mirror_shards if shard is not None else est.cells)
            docs += est.mirror_arrays + 1
        b.write("documents", docs)
        b.read(1 + int(explicit))                    # links group checks (groups exist)
        if shard is not None:
            exchange += blocks[f] + packs[f] - 1
            if explicit:
                exchange += blocks[f] + packs[f + n] - 1
    for f in sorted({f for f, _ in links}):
        deepest = max(n for g, n in links if g == f)
        for inter in range(f, f + deepest):
            fam = plus_one.get((inter, 1))
            if fam is None:
                continue
            if shard is None:
                lead = sets[inter].leading()
                asked = fam.arrays * (lead + blocks[f] - 1)
                # s3fs answers an empty listing by asking whether the
                # prefix is an object: a HEAD, and a LIST more.
                empty = asked * max(0.0, 1.0 - fam.slabs / max(1e-9, fam.arrays * lead))
                b.list += asked + fam.cells / LIST_PAGE + empty
                b.head += empty
                b.read(fam.cells, listed=True)
            else:
                # The same slab listings on the shard grid, then per
                # present shard its index and the cells' bytes.
                lead = max(1, math.ceil(sets[inter].leading() / shard[0]))
                asked = fam.arrays * (lead + blocks[f] - 1)
                empty = asked * max(0.0, 1.0 - fam.shards / max(1e-9, fam.arrays * lead))
                b.list += asked + fam.shards / LIST_PAGE + empty
                b.head += empty
                b.ranged(2 * fam.shards)
    # The driver: levels' geometry, +1 arrays (listed, each document read),
    # each level's vertex cells (sized by one listing).
    b.read(len(levels) + sum(fam.arrays for fam in plus_one.values()))
    b.list += len(levels)
    for lv in levels:
        b.read(1)
        b.list += _pages(sets[lv].expected)
    if shard is not None:
        for lv in levels:
            folders += 1 + packs[lv]
        b.list += sum(packs[lv] for lv in levels)    # write_shards list their folders
        b.read(exchange, listed=True)
        b.scratch(exchange)
    b.list += 4 + 4 + _pages(exchange) + 2 * folders  # exchange cleared before, removed after
    b.read(1)
    b.put += 1                                       # the root's cross-level settings
    return b


def build_bill(n_levels: int, *, start_level: int = 0) -> Bill:
    """The driver's work before the first step and after the composition:
    plans, the lock, the build record, the final commit and clean-up.  The
    lock is renewed once every ``ZVDASK_LOCK_LEASE / 4`` seconds (30 s by
    default) while the build runs: one PUT each, not counted here."""
    b = Bill("start, finish")
    b.read(2 * (5 + (start_level > 0)) + 1)          # two plans, the root
    b.miss(1 + 1 + n_levels)                         # lock, build record, level records
    b.put += 1 + 1                                   # lock, build record
    b.list += 1 + 1                                  # existing levels, source links
    b.read(start_level + n_levels + 1 + 1)           # published levels, root
    b.list += 1 + 4                                  # levels; records removed (walked)
    b.delete += 1 + 1                                # build record, lock
    b.read(1)                                        # the lock's token, before release
    return b


@dataclass
class RequestPlan:
    """The estimated bill of a build: one ``Bill`` per step, the ``±N``
    composition and the driver's start and finish."""
    steps: list
    compose: Bill
    build: Bill
    shard_shape: tuple | None = None

    @property
    def parts(self) -> list:
        return [*self.steps, self.compose, self.build]

    @property
    def total(self) -> Bill:
        out = Bill("total")
        for p in self.parts:
            out = out + p
        out.name = "total"
        return out


def request_plan(plan: "PyramidPlan", *, shard_shape=None, level0_chunks=None) -> RequestPlan:
    """Estimate the objects and requests of ``plan``'s build, unsharded
    (``shard_shape=None``) or with every array it writes sharded by
    ``shard_shape`` chunks.  Pure: from the plan's shapes, counts and (when
    known) the first source level's present chunk coordinates
    (``level0_chunks``, else ``plan.source_chunk_coords``).  Never run by a
    build: 64,000 chunks over 4 levels take a few seconds and a few hundred
    MiB."""
    shard = _shard_tuple(shard_shape, plan.ndim)
    return _bills(plan, _chain(plan, shard, level0_chunks), shard)


def _shard_tuple(shard_shape, ndim: int):
    from ..format.shards import normalize_shard_shape
    try:
        return normalize_shard_shape(shard_shape, ndim)
    except ValueError as exc:
        raise PlanError(str(exc)) from None


@dataclass
class _Chain:
    """The levels as the estimate follows them: each level's chunks,
    vertices and survival, the +1 and +N families (with shard sums when
    ``shard`` is set: the unsharded bill reads the same estimates)."""
    sets: dict
    verts: dict
    fams: dict
    deep: dict
    shard: tuple | None


def _chain(plan: "PyramidPlan", shard, level0_chunks=None) -> _Chain:
    first = plan.levels[0]
    s0 = first.source_level
    coords = level0_chunks if level0_chunks is not None else plan.source_chunk_coords
    sets = {s0: chunk_candidates(first.source_grid[1], first.source_chunks,
                                 origin=first.source_grid[0], coords=coords)}
    chunk = {s0: first.source_chunk_shape}
    bins = {s0: first.source_bin}
    verts = {s0: float(max(1, first.source_vertices))}
    grids = {s0: first.source_grid}
    has_obj = first.n_objects > 0
    kept = first.n_objects
    survive, fams = {}, {}
    for lv in plan.levels:
        s, t = lv.source_level, lv.target_level
        src = sets[s]
        sigma = _survival(kept, lv.sparsity_factor, src.expected, has_obj)
        active = src.p * sigma
        n_active = float(active.sum()) * src.weight
        share = 1.0 / lv.sparsity_factor if has_obj and kept > 1 else 1.0
        verts[t] = _coarse_vertices(verts[s], n_active, coarsen_factor=lv.coarsen_factor,
                                    kept=share, fine_chunk=lv.source_chunk_shape,
                                    bin_shape=lv.bin_shape)
        m = _occupied_bins(verts[t], verts[s], n_active, lv.source_chunk_shape, lv.bin_shape)
        est = link_estimate(src, active=active, fine_chunk=lv.source_chunk_shape,
                            bin_shape=lv.bin_shape, coarse_chunk=lv.chunk_shape, m=m,
                            coarse_grid=lv.target_grid, bounds=plan.bounds,
                            spread=_spread_of(verts[s], verts[t]), shard=shard,
                            target_shards=True, landed=True)
        sets[t] = est.landed
        chunk[t], bins[t], grids[t] = lv.chunk_shape, lv.bin_shape, lv.target_grid
        survive[s] = sigma
        fams[(s, 1)] = est
        if has_obj:
            kept = max(1, round(kept / lv.sparsity_factor)) if lv.sparsity_factor > 1.0 else kept
    # The composition: +N families of every fine level, N >= 2.
    top = plan.levels[-1].target_level
    max_n = (top - s0) if plan.cross_level_depth == -1 else plan.cross_level_depth
    deep = {}
    if plan.cross_level_storage != "none" and plan.cross_level_depth != 0:
        for f in range(s0, top - 1):
            p_chain = sets[f].p.copy()
            for n in range(1, min(max_n, top - f) + 1):
                p_chain = p_chain * survive[f + n - 1]
                if n < 2:
                    continue
                n_active = float(p_chain.sum()) * sets[f].weight
                m = _occupied_bins(verts[f + n], verts[f], n_active, chunk[f], bins[f + n])
                deep[(f, n)] = link_estimate(sets[f], active=p_chain, fine_chunk=chunk[f],
                                             bin_shape=bins[f + n], coarse_chunk=chunk[f + n],
                                             m=m, coarse_grid=grids[f + n],
                                             bounds=plan.bounds,
                                             spread=_spread_of(verts[f], verts[f + n]),
                                             shard=shard, target_shards=True)
    return _Chain(sets, verts, fams, deep, shard)


def _bills(plan: "PyramidPlan", chain: _Chain, shard) -> RequestPlan:
    """The bill of ``plan``'s build from ``chain``'s estimates, unsharded
    (``shard=None``) or sharded (the chain must hold that shard's sums)."""
    if shard is not None and chain.shard != shard:
        raise ValueError(f"the estimates were made for shard shape {chain.shard}, not {shard}")
    s0 = plan.levels[0].source_level
    sets, verts = chain.sets, chain.verts
    steps = []
    for lv in plan.levels:
        s, t = lv.source_level, lv.target_level
        source_key = shard if s != s0 else plan.source_key_shape
        steps.append(step_bill(lv, source=sets[s], target=sets[t],
                               links=chain.fams[(s, 1)] if lv.cross_level_storage != "none"
                               else None,
                               shard=shard, source_key=source_key,
                               source_links_group=(plan.source_links_group if s == s0 else
                                                   lv.cross_level_storage == "explicit"),
                               source_vertices=verts[s]))
    budget = plan.levels[0].max_block_vertices
    blocks = {lv: max(1.0, min(sets[lv].expected, math.ceil(
        verts[lv] / run_cap(verts[lv], budget, plan.n_workers)))) for lv in sets}
    packs = {lv: _packs(verts[lv], sets[lv].shards(shard), budget, plan.n_workers)
             for lv in sets} if shard is not None else None
    compose = compose_bill(sets, chain.deep, plus_one=chain.fams, blocks=blocks, shard=shard,
                           packs=packs, storage=plan.cross_level_storage)
    return RequestPlan(steps, compose, build_bill(len(plan.levels), start_level=s0), shard)


def render(plan: "PyramidPlan") -> str:
    """The plan as ``print(plan)`` shows it: levels, task counts, then the bill."""
    lines = [
        f"PyramidPlan for {plan.store}",
        f"  {plan.ndim}-D, root chunk {fmt_tuple(plan.root_chunk_shape)}, "
        f"root bin {fmt_tuple(plan.root_bin)}, {plan.n_workers} worker(s)",
        f"  cross-level links: {plan.cross_level_storage}, depth {plan.cross_level_depth}",
        "  level  bin            chunk          ratio    src chunks  tgt grid      blocks  tgt blocks  buckets  tasks  est. size",
    ]
    for lv in plan.levels:
        t = f"{sum(lv.tasks.values())}" + ("" if lv.graph_tasks is not None else "~")
        grid = fmt_tuple(lv.target_grid[1])
        lines.append(
            f"  {lv.source_level}->{lv.target_level}   {fmt_tuple(lv.bin_shape):<14} "
            f"{fmt_tuple(lv.chunk_shape):<14} {fmt_tuple(lv.bin_ratio):<8} "
            f"{lv.source_chunks:<11} {grid:<13} {lv.n_blocks:<7} {lv.n_target_blocks:<11} "
            f"{lv.n_buckets:<8} {t:<6} {fmt_bytes(lv.estimated_bytes)}")
    for lv in plan.levels:
        stages = ", ".join(f"{k} {v}" for k, v in lv.tasks.items() if v)
        where = (f" -- in one task (source <= {lv.inline_vertices:,} vertices and objects)"
                 if lv.inline else "")
        lines.append(f"  tasks {lv.source_level}->{lv.target_level}: {stages}{where}")
    exact = all(lv.graph_tasks is not None for lv in plan.levels)
    lines.append(f"  total tasks: {plan.total_tasks}" + (
        "" if exact else " (~: estimated; a step's graph is built once its source level "
                         "exists)"))
    lines.extend(_bill_lines(plan))
    return "\n".join(lines)


def _bill_lines(plan: "PyramidPlan") -> list[str]:
    shard = plan.levels[0].shard_shape if plan.levels else None
    chain = _chain(plan, shard)  # one pass: the unsharded bill reads the same estimates
    bills = [("unsharded", _bills(plan, chain, None))]
    if shard is not None:
        bills.append((f"sharded {fmt_tuple(shard)}", _bills(plan, chain, shard)))
    lines = ["  objects written and requests to an object store (estimated: which chunks "
             "hold cells depends on the data)"]
    for name, rp in bills:
        lines.append(f"  {name + ':':<18} {'objects':>9} {'PUT':>9} {'GET':>9} {'HEAD':>9} "
                     f"{'LIST':>9} {'DELETE':>7}")
        for part in [*rp.parts, rp.total]:
            lines.append(f"    {part.name:<16} {fmt_count(part.n_objects):>9} "
                         f"{fmt_count(part.put):>9} {fmt_count(part.get):>9} "
                         f"{fmt_count(part.head):>9} {fmt_count(part.list):>9} "
                         f"{fmt_count(part.delete):>7}")
    for part in bills[-1][1].parts:
        kinds = ", ".join(f"{k} {fmt_count(v)}" for k, v in part.objects.items())
        if kinds:
            lines.append(f"  objects {part.name}: {kinds}")
    if len(bills) == 2:
        plain, sharded = bills[0][1].total, bills[1][1].total
        lines.append(f"  sharded: {plain.n_objects / max(1.0, sharded.n_objects):.1f}x fewer "
                     f"objects, {plain.requests / max(1.0, sharded.requests):.1f}x fewer "
                     f"requests")
    return lines
