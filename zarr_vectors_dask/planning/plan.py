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

from ..errors import PlanError, PlanMetadataError
from . import bill
from .runs import chunks_per_block
from .sparsity import context_rounds, ranked
from .text import fmt_tuple

__all__ = ["VALID_CROSS_LEVEL_STORAGE", "validate_factors", "normalize_chunk_scale",
           "validate_options", "check_method", "registered_strategy", "target_bin", "bin_ratio",
           "grid_layout", "INLINE_CONFIG", "DEFAULT_INLINE_VERTICES", "inline_limit",
           "runs_inline", "LevelPlan", "PyramidPlan", "plan_level", "plan_pyramid_from_meta"]


VALID_CROSS_LEVEL_STORAGE = ("none", "implicit", "explicit")


# ------------------------------------------------------------ validation
#: Why a coarsen factor below 1 is refused, though zarr-vectors builds it.
_FINER = ("a level's bins are its source level's times this factor, so the level would be "
          "finer than its source, not coarser (zarr-vectors 0.9.2 writes such a level without "
          "a word, and with 0 or a negative factor its bins are infinite or mirrored: one "
          "metavertex for everything, or bins that straddle zero)")


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
            if fv < 1.0 and name == "sparsity_factor":
                # zarr-vectors rejects it too, as level metadata
                # (object_sparsity outside (0, 1]).
                raise PlanMetadataError(f"factors[{i}] {name} must be >= 1; got {v!r}")
            if fv < 1.0:
                # zarr-vectors 0.9.2 builds these; we refuse them on purpose.
                raise PlanError(f"factors[{i}] {name} must be >= 1; got {v!r}: {_FINER}")
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


def check_method(method, options) -> None:
    """``method``/``options`` as zarr-vectors takes them.  Only the built-in
    ``"per_object"`` pyramid is built here, and it takes no options; any
    other name is looked up in zarr-vectors' strategy registry, which
    raises zarr-vectors' own error (naming the method and the package that
    provides it) when nothing registered it -- before the store is touched."""
    if method == "per_object":
        if options:
            raise PlanError(f"method='per_object' takes no extra options; got {sorted(options)}. "
                            f"Those keywords belong to a registered strategy -- pass method= "
                            f"as well.")
        return
    from zarr_vectors.multiresolution.registry import require_coarsen_strategy
    require_coarsen_strategy(method)


def registered_strategy(method):
    """The strategy another package registered under ``method`` (its own
    serial code, not this package's pyramid), or None for ``per_object``."""
    if method == "per_object":
        return None
    from zarr_vectors.multiresolution.registry import require_coarsen_strategy
    return require_coarsen_strategy(method)


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


# ------------------------------------------------------------ executor choice
#: Dask config key: a graph whose source level has at most this many
#: vertices, and at most this many objects, runs in one task
#: (``runtime.execute``); 0 runs every graph task by task.
INLINE_CONFIG = "zarr-vectors-dask.inline-vertices"
#: Measured on 2 workers (benchmarks/README.md, "Small graphs in one
#: task"): up to here one task is at least as fast as the distributed
#: graph, and spends 29-71 % less CPU.
DEFAULT_INLINE_VERTICES = 1_000_000


def inline_limit() -> int:
    """The ``zarr-vectors-dask.inline-vertices`` Dask config value."""
    import dask
    value = dask.config.get(INLINE_CONFIG, DEFAULT_INLINE_VERTICES)
    try:
        limit = int(value)
    except (TypeError, ValueError):
        limit = -1
    if limit < 0 or isinstance(value, bool) or (isinstance(value, float) and value != limit):
        raise PlanError(f"Dask config {INLINE_CONFIG} must be an integer >= 0 (vertices); "
                        f"got {value!r}")
    return limit


def runs_inline(source_vertices: int, limit: int, source_objects: int = 0) -> bool:
    """Whether a graph over a source level of ``source_vertices`` vertices
    and ``source_objects`` object rows runs in one task: its per-task
    overhead (scheduling, transfers) would cost more than its parallelism
    gives.  Objects count too: a small level can index millions of
    objects, whose manifests one task would then hold alone."""
    return 0 < int(source_vertices) <= int(limit) and int(source_objects) <= int(limit)


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
    #: Source levels of at most this many vertices (and objects) run the
    #: step's graph in one task (:func:`runs_inline`).
    inline_vertices: int = 0

    @property
    def inline(self) -> bool:
        """Whether the step's graph runs in one task (as planned: later
        steps' source sizes are estimates; the step decides on the real one)."""
        return runs_inline(self.source_vertices, self.inline_vertices, self.n_objects)

    def chunk_scales(self, root_chunk) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The source's and the target's chunk shapes as multiples of the
        root's (what link cells are anchored by)."""
        return (tuple(int(round(c / r)) for c, r in zip(self.source_chunk_shape, root_chunk)),
                tuple(int(round(c / r)) for c, r in zip(self.chunk_shape, root_chunk)))

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
        if ranked(self.sparsity_strategy, self.sparsity_factor, self.n_objects):
            # Per-object context before object_table.
            rounds = context_rounds(self.sparsity_strategy)
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
        return bill.render(self)

    def requests(self, shard_shape=None):
        """The estimated objects and requests of this build
        (:func:`bill.request_plan`)."""
        return bill.request_plan(self, shard_shape=shard_shape)

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
                    f"level {source_level + 1}: chunk_shape {fmt_tuple(tchunk)} (chunk_scale_factor "
                    f"{fmt_tuple(chunk_scale)}) is not divisible by the target bin_shape "
                    f"{fmt_tuple(tbin)} on axis {axis}; bins must tile an overridden chunk_shape")
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
                           shard_shape=None, inline_vertices: int = 0) -> PyramidPlan:
    """The whole pyramid from the source level's shapes: pure, no I/O."""
    facs = validate_factors(factors)
    from ..format.shards import normalize_shard_shape
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
        lv.inline_vertices = int(inline_vertices)
        levels.append(lv)
        sbin, schunk = lv.bin_shape, lv.chunk_shape
        chunks = min(chunks, math.prod(lv.target_grid[1]))
        verts = lv.estimated_vertices
    return PyramidPlan(store=store, ndim=ndim, root_chunk_shape=tuple(root_chunk_shape),
                       root_bin=tuple(root_bin), levels=levels,
                       cross_level_depth=cross_level_depth,
                       cross_level_storage=cross_level_storage, n_workers=n_workers,
                       bounds=bounds)
