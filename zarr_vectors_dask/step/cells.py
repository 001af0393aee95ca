"""Writing a step's cells: one file per cell, or (sharded) packed for the
task that writes each shard whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptChunkError
from ..format import naming as nm
from ..format import shards as fshards
from ..storage.store import TEMPORARY, Store

__all__ = ["ShardRoute", "route_to", "put_cells", "write_shards"]


# ------------------------------------------------------------- cells and shards
@dataclass(frozen=True)
class ShardRoute:
    """How the cells one graph writes into a sharded level reach their
    shards.  A shard must be written whole by one task, but its cells come
    from several writers (a ``-1`` cell's records come from whichever
    source block holds its fine chunk), so writers send cells to the
    ``write_shards`` task owning their shard (runs of shard numbers,
    ``pack_starts``), as exchange files; that task encodes and writes each
    of its shards once."""

    level: int
    origin: tuple[int, ...]
    grid: tuple[int, ...]
    shard_shape: tuple[int, ...]
    pack_starts: tuple[int, ...]  # first shard number of each write_shards task
    scope: Any  # the graph's exchange scope (a step's target level, or "compose")

    @property
    def shard_grid(self) -> tuple[int, ...]:
        return tuple(-(-g // s) for g, s in zip(self.grid, self.shard_shape))

    def packs_of(self, where: np.ndarray) -> np.ndarray:
        """``write_shards`` task of cells at grid indices ``where``."""
        shard = np.asarray(where, dtype=np.int64) // np.asarray(self.shard_shape, dtype=np.int64)
        number = np.ravel_multi_index(tuple(shard.T), self.shard_grid)
        return np.searchsorted(np.asarray(self.pack_starts, dtype=np.int64), number,
                               side="right") - 1

    def folder(self, pack: int) -> str:
        return nm.exchange_key(self.scope, f"cells-{self.level}", pack, "").rstrip("/")


def route_to(routes, level: int) -> ShardRoute | None:
    for r in routes:
        if r.level == level:
            return r
    return None


def put_cells(store: Store, cells: dict[tuple[str, tuple], bytes], *, origin,
              route: ShardRoute | None, sender: str) -> None:
    """Write framed cells ``{(array path, chunk): bytes}`` of one level: as
    objects of their own, or (sharded) to the tasks that write their
    shards.  Nothing is visible until the commit writes the documents."""
    if not cells:
        return
    if route is None:
        store.put_many({nm.cell_path(a, c, origin): b for (a, c), b in cells.items()},
                       atomic=False)
        return
    items = list(cells.items())
    where = np.asarray([c for (_, c), _ in items], dtype=np.int64).reshape(len(items), -1) - \
        np.asarray(origin, dtype=np.int64)
    packs = route.packs_of(where)
    files = {}
    for k in np.unique(packs).tolist():
        sel = np.flatnonzero(packs == k).tolist()
        files[nm.exchange_key(route.scope, f"cells-{route.level}", k, sender)] = fshards.pack_cells(
            [items[i][0][0] for i in sel], where[sel], [items[i][1] for i in sel])
    store.put_many(files)


def write_shards(store: Store, route: ShardRoute, pack: int, *_done) -> int:
    """Encode and write every shard of one run that received cells (after
    every writer of the graph has finished); returns how many."""
    folder = route.folder(pack)
    # A writer killed mid-put leaves a temporary beside its rerun's file.
    keys = [f"{folder}/{s}" for s in sorted(store.listdir(folder)) if not TEMPORARY.search(s)]
    raw = store.get_many(keys)
    shards: dict[tuple[str, tuple], list] = {}
    ss = route.shard_shape
    for k in keys:
        if raw[k] is None:
            raise CorruptChunkError(f"{store.describe(k)}: exchange file is missing")
        for path, where, blob in fshards.unpack_cells(raw[k], what=store.describe(k)):
            shard = tuple(w // s for w, s in zip(where, ss))
            shards.setdefault((path, shard), []).append(
                (tuple(w % s for w, s in zip(where, ss)), blob))
    blobs = fshards.encode_shards(ss, list(shards.values()))
    store.put_many({fshards.shard_key(path, shard): blob
                    for (path, shard), blob in zip(shards, blobs)}, atomic=False)
    return len(shards)
