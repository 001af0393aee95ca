"""Planning: pure functions over shapes and factors.

Nothing here touches a store.  ``validate_*`` reject bad requests before
anything is written; ``plan_level``/``plan_pyramid_from_meta`` turn the
root's shapes plus the requested factors into per-level bins, chunk grids,
block layouts and task counts that both ``--dry-run`` and the executor use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import PlanError, PlanMetadataError

VALID_CROSS_LEVEL_STORAGE = ("none", "implicit", "explicit")

# ------------------------------------------------------------ validation
def validate_factors(factors: Any) -> list[tuple[float, float]]:
    if not isinstance(factors, (list, tuple)) or len(factors) == 0:
        raise PlanError(f"factors must be a non-empty list of (coarsen, sparsity) pairs; got {factors!r}")
    out = []
    for i, fac in enumerate(factors):
        if not isinstance(fac, (list, tuple)) or len(fac) != 2:
            raise PlanError(f"factors[{i}] must be a (coarsen_factor, sparsity_factor) pair; got {fac!r}")
        pair = []
        for name, v in zip(("coarsen_factor", "sparsity_factor"), fac):
            try:
                fv = float(v)
            except (TypeError, ValueError):
                raise PlanError(f"factors[{i}] {name} must be a number; got {v!r}") from None
            if math.isnan(fv) or math.isinf(fv):
                raise PlanError(f"factors[{i}] {name} must be finite; got {v!r}")
            if fv < 1.0:
                # zarr-vectors rejects a sparsity below 1 as level metadata
                # (object_sparsity outside (0, 1]).
                cls = PlanMetadataError if name == "sparsity_factor" else PlanError
                raise cls(f"factors[{i}] {name} must be >= 1; got {v!r}")
            pair.append(fv)
        out.append((pair[0], pair[1]))
    return out


def normalize_chunk_scale(scale: Any, ndim: int, *, where: str) -> tuple[int, ...]:
    """A scalar or per-axis chunk-scale factor as positive ints per axis."""
    items = list(scale) if isinstance(scale, (list, tuple)) else [scale] * ndim
    if len(items) != ndim:
        raise PlanError(f"{where} has {len(items)} entries (rank {len(items)}) but the store "
                        f"is {ndim}-D (sid_ndim {ndim})")
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (
                isinstance(v, float) and not v.is_integer()):
            raise PlanError(f"{where} entries must be positive integers; got {scale!r}")
        if int(v) < 1:
            raise PlanError(f"{where} entries must be positive integers; got {scale!r}")
        out.append(int(v))
    return tuple(out)


def validate_options(*, cross_level_storage: str, cross_level_depth: Any,
                     sparsity_strategy: str) -> None:
    if cross_level_storage not in VALID_CROSS_LEVEL_STORAGE:
        raise PlanError(f"cross_level_storage={cross_level_storage!r} is not one of "
                        f"{list(VALID_CROSS_LEVEL_STORAGE)}")
    if isinstance(cross_level_depth, bool) or not isinstance(cross_level_depth, int) \
            or cross_level_depth < -1:
        raise PlanError(f"cross_level_depth must be an integer >= -1; got {cross_level_depth!r}")
    if sparsity_strategy not in ("random", "length"):
        # Checked before anything is written (the reference finds out only
        # when a step first sparsifies); PlanError is a ValueError, the
        # class the reference's registry raises.
        from zarr_vectors.multiresolution import registry
        if not isinstance(sparsity_strategy, str) or \
                registry.get_selection_strategy(sparsity_strategy) is None:
            raise PlanError(
                f"unknown sparsity_strategy {sparsity_strategy!r}: built in are 'random' (the "
                f"reference's) and 'length'; registered in zarr-vectors' selection registry: "
                f"{registry.registered_selection_strategies()} (zarr-vectors-tools registers "
                f"more on import)")


# ------------------------------------------------------------ geometry
def target_bin(source_bin: Sequence[float], coarsen_factor: float) -> tuple[float, ...]:
    """Bins compound: the target bin is the *source level's* bin times the factor."""
    return tuple(float(b) * float(coarsen_factor) for b in source_bin)


def bin_ratio(bin_shape: Sequence[float], root_bin: Sequence[float]) -> tuple[int, ...]:
    return tuple(max(1, int(round(float(t) / float(r)))) for t, r in zip(bin_shape, root_bin))


def grid_layout(bounds, chunk_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(origin, grid_shape)``: origin = floor(min/chunk), extent to floor(max/chunk)."""
    origin = tuple(int(math.floor(float(lo) / float(c))) for lo, c in zip(bounds[0], chunk_shape))
    upper = tuple(int(math.floor(float(hi) / float(c))) for hi, c in zip(bounds[1], chunk_shape))
    return origin, tuple(u - o + 1 for u, o in zip(upper, origin))


def split_runs(n_items: int, per_run: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of at most ``per_run`` items."""
    per_run = max(1, int(per_run))
    return [(a, min(a + per_run, n_items)) for a in range(0, n_items, per_run)]


def chunks_per_block(n_chunks: int, n_vertices: int, n_workers: int,
                     max_block_vertices: int) -> int:
    """How many consecutive source chunks one task reads.

    Enough blocks to keep every worker busy, few enough that scheduler
    overhead stays small, and never more than ``max_block_vertices`` per
    task so memory per task is bounded whatever the level's size.
    """
    if n_chunks <= 0:
        return 1
    per_chunk = max(1.0, n_vertices / n_chunks)
    by_memory = max(1, int(max_block_vertices // per_chunk))
    by_parallelism = max(1, math.ceil(n_chunks / max(1, 2 * n_workers)))
    return max(1, min(by_memory, by_parallelism))


# ------------------------------------------------------------ plan objects
@dataclass
class LevelPlan:
    source_level: int
    target_level: int
    coarsen_factor: float
    sparsity_factor: float
    chunk_scale: tuple[int, ...]
    source_bin: tuple[float, ...]
    bin_shape: tuple[float, ...]
    bin_ratio: tuple[int, ...]
    source_chunk_shape: tuple[float, ...]
    chunk_shape: tuple[float, ...]
    chunk_shape_override: tuple[float, ...] | None
    source_grid: tuple[tuple[int, ...], tuple[int, ...]]
    target_grid: tuple[tuple[int, ...], tuple[int, ...]]
    source_chunks: int  # exact for level 0, an upper bound after
    source_vertices: int  # exact for level 0, an estimate after
    n_objects: int
    chunks_per_block: int
    n_blocks: int
    target_chunks_per_block: int  # target blocks: runs of the row-major target grid
    n_target_blocks: int
    n_buckets: int
    cross_level_storage: str
    max_block_vertices: int = 2_000_000  # the per-task vertex budget
    n_workers: int = 2
    sparsity_strategy: str = "random"
    shard_shape: tuple[int, ...] | None = None  # cells per storage object (None: one)

    #: Tasks per task function of the step's real graph, when the source
    #: level exists (``api.plan_pyramid`` builds the graph for the first
    #: step); ``None`` for later steps, whose source is not written yet.
    graph_tasks: dict | None = None
    #: Object attribute columns and per-vertex attribute arrays the step
    #: writes (they count in its objects and requests).
    n_object_attributes: int = 0
    n_vertex_attributes: int = 0

    @property
    def tasks(self) -> dict[str, int]:
        """Tasks per task function: the graph's own counts when known, else
        an estimate with every block routed to two partitions."""
        if self.graph_tasks is not None:
            return dict(self.graph_tasks)
        b, tb, k = self.n_blocks, self.n_target_blocks, self.n_buckets
        out = {"object_table": int(k > 0), "object_refs": k, "bin_partials": b,
               "reduce_metavertices": tb, "write_metavertices": tb, "resolve_parents": tb,
               "links_and_sequences": b, "write_manifests": k,
               "pick": 2 * b * 2 + 2 * tb * 2, "answer_for": 2 * b,
               "join": 2 * int(k > 0), "level_summary": 1}
        if self.shard_shape is not None:
            # One run of shards per target block and level written (the
            # target level; the source level's +1 family too).
            levels = 1 + int(self.cross_level_storage != "none")
            out.update(write_shards=levels * tb, join=out["join"] + 1)
        if self.sparsity_strategy != "random" and self.sparsity_factor > 1.0 \
                and self.n_objects > 1:
            # Per-object context before object_table (stages.needs_context).
            rounds = 1 if self.sparsity_strategy == "length" else 2
            out.update(context_refs=k, fragment_summaries=b, object_context=k,
                       join=out["join"] + 2 * rounds)
            if rounds == 2:
                out.update(fragment_points=b, object_points=k)
        return {name: n for name, n in out.items() if n}

    @property
    def estimated_vertices(self) -> int:
        # Streamlines lose about one factor per level, volumes more; this
        # is the conservative (larger) of the two.
        return max(1, int(self.source_vertices / max(1.0, self.coarsen_factor)))

    @property
    def estimated_bytes(self) -> int:
        v = self.estimated_vertices
        nd = len(self.bin_shape)
        per_vertex = 4 * nd + 12  # position + fragment index share
        links = {"none": 0, "implicit": 16, "explicit": 32}[self.cross_level_storage]
        return v * per_vertex + self.source_vertices * links


def _fmt_tuple(t) -> str:
    return "x".join(f"{x:g}" if isinstance(x, float) else str(x) for x in t)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _fmt_count(x: float) -> str:
    return f"{int(round(x)):,}"


@dataclass
class PyramidPlan:
    store: str
    ndim: int
    root_chunk_shape: tuple[float, ...]
    root_bin: tuple[float, ...]
    levels: list[LevelPlan]
    cross_level_depth: int
    cross_level_storage: str
    n_workers: int
    extra: dict = field(default_factory=dict)
    #: The first source level's present chunks (its ``nonempty_chunks``)
    #: and, when its cells are sharded, chunks per storage key: they make
    #: the first step's request estimate exact where geometry decides.
    source_chunk_coords: Any = None
    source_key_shape: tuple | None = None
    #: The data's ``(lower, upper)`` corners (the root's ``bounds``).
    bounds: Any = None
    #: Whether the first source level has a ``links`` group already.
    source_links_group: bool = True

    @property
    def total_tasks(self) -> int:
        return sum(sum(lv.tasks.values()) for lv in self.levels)

    def __repr__(self) -> str:
        lines = [
            f"PyramidPlan for {self.store}",
            f"  {self.ndim}-D, root chunk {_fmt_tuple(self.root_chunk_shape)}, "
            f"root bin {_fmt_tuple(self.root_bin)}, {self.n_workers} worker(s)",
            f"  cross-level links: {self.cross_level_storage}, depth {self.cross_level_depth}",
            "  level  bin            chunk          ratio    src chunks  tgt grid      blocks  tgt blocks  buckets  tasks  est. size",
        ]
        for lv in self.levels:
            t = f"{sum(lv.tasks.values())}" + ("" if lv.graph_tasks is not None else "~")
            grid = _fmt_tuple(lv.target_grid[1])
            lines.append(
                f"  {lv.source_level}->{lv.target_level}   {_fmt_tuple(lv.bin_shape):<14} "
                f"{_fmt_tuple(lv.chunk_shape):<14} {_fmt_tuple(lv.bin_ratio):<8} "
                f"{lv.source_chunks:<11} {grid:<13} {lv.n_blocks:<7} {lv.n_target_blocks:<11} "
                f"{lv.n_buckets:<8} {t:<6} {_fmt_bytes(lv.estimated_bytes)}")
        for lv in self.levels:
            stages = ", ".join(f"{k} {v}" for k, v in lv.tasks.items() if v)
            lines.append(f"  tasks {lv.source_level}->{lv.target_level}: {stages}")
        exact = all(lv.graph_tasks is not None for lv in self.levels)
        lines.append(f"  total tasks: {self.total_tasks}" + (
            "" if exact else " (~: estimated; a step's graph is built once its source level "
                             "exists)"))
        lines.extend(self._bill_lines())
        return "\n".join(lines)

    def requests(self, shard_shape=None):
        """The estimated objects and requests of this build
        (:func:`bill.request_plan`)."""
        from .bill import request_plan
        return request_plan(self, shard_shape=shard_shape)

    def _bill_lines(self) -> list[str]:
        from .bill import _bills, _chain
        shard = self.levels[0].shard_shape if self.levels else None
        chain = _chain(self, shard)  # one pass: the unsharded bill reads the same estimates
        bills = [("unsharded", _bills(self, chain, None))]
        if shard is not None:
            bills.append((f"sharded {_fmt_tuple(shard)}", _bills(self, chain, shard)))
        lines = ["  objects written and requests to an object store (estimated: which chunks "
                 "hold cells depends on the data)"]
        for name, rp in bills:
            lines.append(f"  {name + ':':<18} {'objects':>9} {'PUT':>9} {'GET':>9} {'HEAD':>9} "
                         f"{'LIST':>9} {'DELETE':>7}")
            for part in [*rp.parts, rp.total]:
                lines.append(f"    {part.name:<16} {_fmt_count(part.n_objects):>9} "
                             f"{_fmt_count(part.put):>9} {_fmt_count(part.get):>9} "
                             f"{_fmt_count(part.head):>9} {_fmt_count(part.list):>9} "
                             f"{_fmt_count(part.delete):>7}")
        for part in bills[-1][1].parts:
            kinds = ", ".join(f"{k} {_fmt_count(v)}" for k, v in part.objects.items())
            if kinds:
                lines.append(f"  objects {part.name}: {kinds}")
        if len(bills) == 2:
            plain, sharded = bills[0][1].total, bills[1][1].total
            lines.append(f"  sharded: {plain.n_objects / max(1.0, sharded.n_objects):.1f}x fewer "
                         f"objects, {plain.requests / max(1.0, sharded.requests):.1f}x fewer "
                         f"requests")
        return lines

    __str__ = __repr__


def plan_level(*, source_level: int, coarsen_factor: float, sparsity_factor: float,
               chunk_scale: tuple[int, ...], source_bin: Sequence[float],
               source_chunk_shape: Sequence[float], root_chunk_shape: Sequence[float],
               root_bin: Sequence[float], bounds, source_chunks: int, source_vertices: int,
               n_objects: int, n_workers: int, max_block_vertices: int,
               cross_level_storage: str, manifest_bucket: int = 16_384) -> LevelPlan:
    tbin = target_bin(source_bin, coarsen_factor)
    tchunk = tuple(float(s) * int(r) for s, r in zip(source_chunk_shape, chunk_scale))
    override = None if all(abs(t - r) < 1e-9 for t, r in zip(tchunk, root_chunk_shape)) else tchunk
    if override is not None:
        for axis, (c, b) in enumerate(zip(tchunk, tbin)):
            q = c / b
            if abs(q - round(q)) > 1e-9:
                raise PlanMetadataError(
                    f"level {source_level + 1}: chunk_shape {_fmt_tuple(tchunk)} (chunk_scale_factor "
                    f"{_fmt_tuple(chunk_scale)}) is not divisible by the target bin_shape "
                    f"{_fmt_tuple(tbin)} on axis {axis}; bins must tile an overridden chunk_shape")
    sgrid = grid_layout(bounds, source_chunk_shape)
    tgrid = grid_layout(bounds, tchunk)
    cpb = chunks_per_block(source_chunks, source_vertices, n_workers, max_block_vertices)
    n_blocks = max(1, math.ceil(source_chunks / cpb)) if source_chunks else 1
    # Target blocks (shuffle partitions, vertex writers): enough for every
    # worker, and small enough that the vertices feeding one stay within
    # the per-task budget.
    n_tchunks = int(math.prod(tgrid[1]))
    wanted = max(1, min(n_tchunks, 2 * n_workers, n_blocks))
    by_memory = max(1, int(max_block_vertices // max(1.0, source_vertices / max(1, n_tchunks))))
    tcpb = max(1, min(math.ceil(n_tchunks / wanted), by_memory))
    n_tb = math.ceil(n_tchunks / tcpb)
    n_buckets = max(1, math.ceil(n_objects / max(1, min(manifest_bucket, n_objects)))) if n_objects else 0
    return LevelPlan(
        source_level=source_level, target_level=source_level + 1,
        coarsen_factor=float(coarsen_factor), sparsity_factor=float(sparsity_factor),
        chunk_scale=tuple(chunk_scale), source_bin=tuple(float(b) for b in source_bin),
        bin_shape=tbin, bin_ratio=bin_ratio(tbin, root_bin),
        source_chunk_shape=tuple(float(c) for c in source_chunk_shape), chunk_shape=tchunk,
        chunk_shape_override=override, source_grid=sgrid, target_grid=tgrid,
        source_chunks=int(source_chunks), source_vertices=int(source_vertices),
        n_objects=int(n_objects), chunks_per_block=cpb, n_blocks=n_blocks,
        target_chunks_per_block=tcpb,
        n_target_blocks=n_tb, n_buckets=n_buckets, cross_level_storage=cross_level_storage,
        max_block_vertices=int(max_block_vertices), n_workers=int(n_workers))


def plan_pyramid_from_meta(*, store: str, ndim: int, root_chunk_shape, root_bin, bounds,
                           level0_bin=None, level0_chunk_shape=None, level0_chunks: int,
                           level0_vertices: int, n_objects: int, start_level: int = 0,
                           factors, chunk_scale_factors=None, cross_level_depth: int = 1,
                           cross_level_storage: str = "explicit", sparsity_strategy: str = "random",
                           n_workers: int = 2, max_block_vertices: int = 2_000_000,
                           shard_shape=None) -> PyramidPlan:
    """The whole pyramid from the source level's shapes: pure, no I/O."""
    facs = validate_factors(factors)
    from .format import normalize_shard_shape
    try:
        shards = normalize_shard_shape(shard_shape, ndim)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    validate_options(cross_level_storage=cross_level_storage, cross_level_depth=cross_level_depth,
                     sparsity_strategy=sparsity_strategy)
    if chunk_scale_factors is not None:
        if not isinstance(chunk_scale_factors, (list, tuple)) or len(chunk_scale_factors) != len(facs):
            n = len(chunk_scale_factors) if isinstance(chunk_scale_factors, (list, tuple)) else "?"
            raise PlanError(f"chunk_scale_factors has {n} entries but factors has {len(facs)}")
    levels = []
    sbin = tuple(level0_bin or root_bin)
    schunk = tuple(level0_chunk_shape or root_chunk_shape)
    chunks, verts = level0_chunks, level0_vertices
    for i, (cf, sf) in enumerate(facs):
        scale = normalize_chunk_scale(1 if chunk_scale_factors is None else chunk_scale_factors[i],
                                      ndim, where=f"chunk_scale_factors[{i}]")
        lv = plan_level(source_level=start_level + i, coarsen_factor=cf, sparsity_factor=sf,
                        chunk_scale=scale, source_bin=sbin, source_chunk_shape=schunk,
                        root_chunk_shape=root_chunk_shape, root_bin=root_bin, bounds=bounds,
                        source_chunks=chunks, source_vertices=verts, n_objects=n_objects,
                        n_workers=n_workers, max_block_vertices=max_block_vertices,
                        cross_level_storage=cross_level_storage)
        lv.sparsity_strategy = sparsity_strategy
        lv.shard_shape = shards
        levels.append(lv)
        sbin, schunk = lv.bin_shape, lv.chunk_shape
        chunks = min(chunks, math.prod(lv.target_grid[1]))
        verts = lv.estimated_vertices
    return PyramidPlan(store=store, ndim=ndim, root_chunk_shape=tuple(root_chunk_shape),
                       root_bin=tuple(root_bin), levels=levels,
                       cross_level_depth=cross_level_depth,
                       cross_level_storage=cross_level_storage, n_workers=n_workers,
                       bounds=bounds)


# ------------------------------------------------------------ blocks and routes
# A step's tasks are sized from what each chunk really holds (one listing of
# cell sizes), so a dense region is split instead of overshooting the budget,
# and its exchanges are routed from geometry alone, before anything runs.

def weighted_runs(weights, cap: float):
    """Starts of runs of consecutive items, each run's weight at most
    ``cap`` (an item heavier than ``cap`` is a run of its own)."""
    import numpy as np
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return np.zeros(1, dtype=np.int64)
    cum = np.cumsum(w)
    starts, at, before = [], 0, 0.0
    while at < w.size:
        starts.append(at)
        nxt = int(np.searchsorted(cum, before + cap, side="right"))
        at = max(nxt, at + 1)
        before = float(cum[at - 1])
    return np.asarray(starts, dtype=np.int64)


def run_cap(total: float, budget: int, n_workers: int) -> float:
    """Largest run: the memory budget, or less so every worker gets about
    two runs to work on."""
    return max(1.0, min(float(budget), math.ceil(total / max(1, 2 * n_workers))))


def shard_runs(coords, weights, origin, grid, shard_shape, cap: float) -> tuple[int, ...]:
    """Runs of a level's shards (row-major shard numbers) for the tasks
    that write them: each run's estimated weight at most ``cap`` (a heavier
    shard is a run of its own; it cannot be split).  ``coords``/``weights``:
    chunks expected to hold data and their weights; shards holding none
    join the run before them.  Returns each run's first shard number."""
    import numpy as np
    ss = np.asarray(shard_shape, dtype=np.int64)
    shard_grid = -(-np.asarray(grid, dtype=np.int64) // ss)
    rel = np.clip(np.asarray(coords, dtype=np.int64).reshape(-1, len(ss)) - np.asarray(origin),
                  0, np.asarray(grid, dtype=np.int64) - 1) // ss
    if rel.shape[0] == 0:
        return (0,)
    number = np.ravel_multi_index(tuple(rel.T), tuple(shard_grid.tolist()))
    uniq, inv = np.unique(number, return_inverse=True)
    w = np.bincount(inv.reshape(-1), weights=np.asarray(weights, dtype=np.float64),
                    minlength=uniq.size)
    starts = uniq[weighted_runs(w, cap)]
    starts[0] = 0
    return tuple(int(x) for x in starts)


def ravel(coords, origin, shape):
    """Row-major index of chunk coordinates in a grid (coordinates clipped
    into it)."""
    import numpy as np
    shape = np.asarray(shape, dtype=np.int64)
    rel = np.clip(np.asarray(coords, dtype=np.int64).reshape(-1, len(shape)) - np.asarray(origin),
                  0, shape - 1)
    return np.ravel_multi_index(tuple(rel.T), tuple(shape.tolist())) if rel.shape[0] else \
        np.empty(0, dtype=np.int64)


@dataclass
class StepLayout:
    """How one step's work is cut: source blocks (runs of present source
    chunks), target blocks (runs of the target grid, also the shuffle's
    partitions), and the routes geometry allows between them."""
    block_starts: Any           # chunk number of each source block's first chunk (first is 0)
    block_chunks: list          # per source block: its chunk numbers
    target_block_starts: Any    # target-grid index of each target block's first chunk
    block_partitions: list      # per source block: the partitions its keys can reach (sorted)
    partition_targets: list     # per partition: (first, last) target block its centroids reach

    @property
    def n_blocks(self) -> int:
        return len(self.block_chunks)

    @property
    def n_target_blocks(self) -> int:
        return len(self.target_block_starts)


#: Source chunks whose target boxes are expanded at once in ``step_layout``:
#: each expands to ~125 cells x 3 int64 coordinates (plus masks), so the
#: driver's transient memory stays ~25 MiB however many chunks a level has
#: (all 60,000 chunks at once took ~770 MiB).
ROUTE_BATCH_CHUNKS = 4_096


def step_layout(*, numbers, weights, source_origin, source_grid, source_chunk_shape,
                target_origin, target_grid, chunk_shape, bin_shape, budget: int,
                n_workers: int, route_batch: int = ROUTE_BATCH_CHUNKS) -> StepLayout:
    """Blocks, target blocks and routes of a step from the source level's
    present chunks (``numbers``: sorted row-major chunk numbers) and their
    estimated vertex counts; pure."""
    import numpy as np
    numbers = np.asarray(numbers, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    nd = len(source_grid)
    if math.prod(source_grid) >= 2 ** 31 or math.prod(target_grid) >= 2 ** 62:
        raise PlanError(f"chunk grid {_fmt_tuple(source_grid)} has too many chunks to number "
                        f"(at most 2^31)")
    total = float(weights.sum())
    starts = weighted_runs(weights, run_cap(total, budget, n_workers))
    block_chunks = [numbers[a:b] for a, b in zip(starts, np.r_[starts[1:], numbers.size])] \
        if numbers.size else [numbers]
    block_starts = numbers[starts] if numbers.size else np.zeros(1, np.int64)
    block_starts[0] = 0
    # Where a source chunk's vertices can land in the target grid: its box
    # widened by one bin below and a chunk of margin each way (rounding).
    coords = np.stack(np.unravel_index(numbers, tuple(source_grid)), axis=1).reshape(-1, nd) + \
        np.asarray(source_origin, dtype=np.int64)
    cs = np.asarray(source_chunk_shape, dtype=np.float64)
    ct = np.asarray(chunk_shape, dtype=np.float64)
    b = np.asarray(bin_shape, dtype=np.float64)
    lower = np.floor((coords * cs - b) / ct).astype(np.int64) - 1
    upper = np.floor((coords + 1) * cs / ct).astype(np.int64) + 1
    # Target blocks: runs of the target grid, weighted by the vertices
    # whose chunk starts in each target chunk.
    home = ravel(np.floor(coords * cs / ct).astype(np.int64), target_origin, target_grid)
    tlin, tinv = np.unique(home, return_inverse=True)
    tw = np.bincount(tinv.reshape(-1), weights=weights, minlength=tlin.size)
    tstarts = weighted_runs(tw, run_cap(total, budget, n_workers))
    target_block_starts = tlin[tstarts] if tlin.size else np.zeros(1, np.int64)
    target_block_starts[0] = 0
    n_tb = target_block_starts.size

    def tb(lin):
        return np.searchsorted(target_block_starts, lin, side="right") - 1

    # Every target chunk of each source chunk's box, as (source chunk,
    # partition) pairs: exact sets, so a block is wired only to the
    # partitions around its own chunks, however the grid is numbered.
    span = upper - lower + 1
    n_off = int(np.prod(span.max(axis=0))) if numbers.size else 0
    offsets = np.stack(np.unravel_index(np.arange(n_off), tuple(span.max(axis=0).tolist())),
                       axis=1) if n_off else np.empty((0, nd), np.int64)
    block_of_chunk = np.searchsorted(starts, np.arange(numbers.size), side="right") - 1
    found = []
    for lo in range(0, numbers.size, max(1, route_batch)):
        hi = min(numbers.size, lo + max(1, route_batch))
        cells = lower[lo:hi, None, :] + offsets[None, :, :]
        inside_box = np.all(cells <= upper[lo:hi, None, :], axis=2).ravel()
        owner = np.repeat(np.arange(lo, hi), n_off)[inside_box]
        part = tb(ravel(cells.reshape(-1, nd)[inside_box], target_origin, target_grid))
        found.append(np.unique(block_of_chunk[owner] * n_tb + part))
        del cells, inside_box, owner, part
    pairs = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    block_partitions = [[] for _ in block_chunks]
    for bp in pairs.tolist():
        block_partitions[bp // n_tb].append(bp % n_tb)
    # A centroid lies in its bin: from the bin's lower-corner chunk up to a
    # bin further, plus a chunk of margin each way.
    strides = np.cumprod([1, *list(target_grid)[::-1]])[:-1][::-1]
    reach = np.ceil(b / ct).astype(np.int64) + 1
    down, up = int(strides.sum()), int((strides * reach).sum())
    last = int(math.prod(target_grid)) - 1
    stops = np.r_[target_block_starts[1:], last + 1]
    partition_targets = [(int(tb(max(0, s - down))), int(tb(min(last, e - 1 + up))))
                         for s, e in zip(target_block_starts.tolist(), stops.tolist())]
    return StepLayout(block_starts, block_chunks, target_block_starts, block_partitions,
                      partition_targets)
