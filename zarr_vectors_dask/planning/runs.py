"""Blocks and routes: a step's tasks sized from what each chunk holds
(weighted runs, the per-task cap, shard runs) and the geometric routes of
a step (``step_layout``).  Pure, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import PlanError
from .text import fmt_tuple

__all__ = ["split_runs", "chunks_per_block", "weighted_runs", "slab_runs", "run_cap",
           "shard_runs", "ravel",
           "StepLayout", "ROUTE_BATCH_CHUNKS", "step_layout"]


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


def slab_runs(keys: list, weights: list, cap: float) -> list[list[tuple]]:
    """Runs of items of several levels by a shared order: ``keys[i]`` and
    ``weights[i]`` are level ``i``'s items' keys (a number in one common
    order) and weights.  Cuts the merged order into runs of weight at most
    ``cap`` (``weighted_runs``); each run is ``[(level index, item
    indices), ...]`` for the levels with items in it.  A run heavier than
    ``cap`` (a heavy item, or items of several levels sharing a key at a
    cut) holding several levels is split into one run per level, so they
    run in parallel and none holds more than its own level's items."""
    import numpy as np
    if not keys:
        return []
    every = np.concatenate([np.asarray(k, dtype=np.int64) for k in keys])
    order = np.argsort(every, kind="stable")
    merged = np.concatenate([np.asarray(w, dtype=np.float64) for w in weights])[order]
    starts = weighted_runs(merged, cap)
    bounds = np.r_[every[order][starts], np.iinfo(np.int64).max]
    # Each level's items in key order, cut at the runs' bounds.
    cut = []
    for k, w in zip(keys, weights):
        k = np.asarray(k, dtype=np.int64)
        o = np.argsort(k, kind="stable")
        cum = np.r_[0.0, np.cumsum(np.asarray(w, dtype=np.float64)[o])]
        cut.append((o, np.searchsorted(k[o], bounds), cum))
    runs = []
    for r in range(bounds.size - 1):
        mine = [(i, np.sort(o[at[r]:at[r + 1]])) for i, (o, at, _) in enumerate(cut)
                if at[r + 1] > at[r]]
        weight = sum(cum[at[r + 1]] - cum[at[r]] for o, at, cum in cut)
        if len(mine) > 1 and weight > cap:
            runs += [[m] for m in mine]
        elif mine:
            runs.append(mine)
    return runs


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
        raise PlanError(f"chunk grid {fmt_tuple(source_grid)} has too many chunks to number "
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
