"""The closing stage: ``+-N`` link families composed from the published
``+1`` families, one graph."""

from __future__ import annotations

import re
import uuid
from typing import Callable

from ..errors import cleanup
from ..format import commit as cm
from ..format import documents as fdoc
from ..format import naming as nm
from ..planning.plan import runs_inline
from ..planning.region import recompose_chunks
from ..runtime import StepReport, execute
from ..step.exchange import drop_exchange
from ..storage.store import Store
from .graph import COMPOSE_SCOPE, compose_graph
from .tasks import level_geometry

_PLUS_ONE_CELL = re.compile(r"^(\d+)/links/\+1/([^/]+)/c/(.+)$")

__all__ = ["compose_links", "recompose_region", "discard_recomposed"]


# ---------------------------------------------------------------- composition
def compose_links(client, store: Store, *, root_meta, depth: int, storage: str,
                  n_workers: int, progress: Callable | None = None,
                  max_block_vertices: int = 2_000_000, shard_shape=None,
                  only: dict | None = None, inline_vertices: int = 0) -> tuple[list, dict]:
    """The closing stage, one graph: ``±N`` families (N >= 2) composed
    from the published ``+1`` families by one task per run of fine
    chunks; their documents are written on the cluster by its last task.
    Returns the families left for the driver to commit (none) and the
    stage timings.  ``only`` (a refresh, :func:`recompose_region`): the
    chunks to compose per level; their families' documents are then left
    to the caller (:func:`discard_recomposed`).  ``inline_vertices``: the
    graph runs in one task when the finest level has at most that many
    vertices (``planning.plan.runs_inline``)."""
    report = StepReport(target_level=-1)
    levels = cm.published_levels(store)
    if storage == "none" or depth == 0 or len(levels) < 2:
        return [], report.stage_seconds
    max_delta = (max(levels) - min(levels)) if depth == -1 else int(depth)
    if max_delta < 2:
        return [], report.stage_seconds
    token = uuid.uuid4().hex[:12]
    drop_exchange(store, COMPOSE_SCOPE)  # leftovers of an interrupted attempt
    try:
        graph, _ = compose_graph(store, levels, max_delta, root_meta=root_meta, storage=storage,
                                 n_workers=n_workers, max_block_vertices=max_block_vertices,
                                 token=token, shard_shape=shard_shape, only=only)
        if graph is not None:
            inline = runs_inline(_vertex_count(store, min(levels)), inline_vertices)
            execute(client, graph, token, report, name="compose", progress=progress,
                    inline=inline)
    finally:
        cleanup(lambda: drop_exchange(store, COMPOSE_SCOPE),
                what="removing the exchange files of the composition")
    return [], report.stage_seconds


def _vertex_count(store: Store, level: int) -> int:
    attrs = (fdoc.node_attrs(store, str(level)) or {}).get("zarr_vectors_level") or {}
    return int(attrs.get("vertex_count") or 0)


# ---------------------------------------------------------- a refresh in place
def _geometry(store: Store, root_meta) -> dict:
    return {lv: level_geometry(store, lv, root_meta) for lv in cm.published_levels(store)}


#: Above this share of the fine chunks, a refresh composes everything again.
RECOMPOSE_SHARE = 0.5


def recompose_region(store: Store, root_meta, changed: set[str]) -> dict | None:
    """Per level, the chunks whose composed cells can differ, given the
    keys of the ``+1`` cells a rewrite changed or removed (``changed``):
    the chains come from the ``+1`` families' documents, no cell is read
    (``planning.region.recompose_chunks``).  None: compose all of them
    (more than ``RECOMPOSE_SHARE`` of the chunks)."""
    geo = _geometry(store, root_meta)
    dirty: dict[int, set] = {}
    for key in changed:
        m = _PLUS_ONE_CELL.match(key)
        if m and int(m.group(1)) in geo:
            lv = int(m.group(1))
            dirty.setdefault(lv, set()).add(nm.cell_chunk(m.group(3), geo[lv]["grid"][0]))
    parents: dict[int, dict] = {}
    for lv in geo:
        if lv + 1 not in geo:
            continue
        parents[lv] = nm.link_map(
            ((seg, chunks) for seg, (_, chunks) in cm.read_family(store, lv, 1).items()
             if len(chunks)),
            geo[lv]["scale"], geo[lv + 1]["scale"])
    only = recompose_chunks(dirty, parents)
    total = sum(len(p) for p in parents.values())
    if sum(len(v) for v in only.values()) > RECOMPOSE_SHARE * total:
        return None  # most of it: the whole composition costs less than a partial's sweep
    return only


def _composed_family_names(store: Store, level: int) -> list[str]:
    return [n for n in store.listdir(f"{level}/{nm.LINKS}") if nm.is_composed_family(n)]


def _recomposed_cells(cells: cm.CellsAfter, base: str, level: int, delta: int, geo: dict,
                      chunks: set) -> list[str]:
    """The cells of a composed family that belong to one of ``chunks`` of
    its fine level: a ``+N`` cell is keyed by its fine chunk, a ``-N``
    cell belongs to the fine chunk it mirrors."""
    if not chunks:
        return []
    fine, origin = level + min(delta, 0), geo[level]["grid"][0]
    keys = {nm.chunk_key(c) for c in chunks}
    out = []
    for array in sorted(a for a in cells.chunks if a.startswith(f"{base}/")):
        at = keys if delta > 0 else nm.chunks_linking_to(
            chunks, array[len(base) + 1:], geo[level]["scale"], geo[fine]["scale"])
        out += cells.cells_in(array, at, origin)
    return out


def discard_recomposed(store: Store, root_meta, only: dict, logged: set[str]) -> None:
    """Remove the composed cells of the recomposed chunks that the rewrite
    did not write, then the offset arrays and families left without
    cells, and write the documents of the families it changed: as they
    named their cells before it, plus its logged changes (its first
    attempt only: a rerun composes everything, ``api._composed_current``)."""
    geo = _geometry(store, root_meta)
    sizes = store.logged_sizes()
    docs: dict[str, bytes] = {}
    for level in geo:
        for name in _composed_family_names(store, level):
            delta = int(name)  # "+2", "-3"
            base, origin = nm.links_family_path(level, delta), geo[level]["grid"][0]
            recomposed = only.get(level + min(delta, 0), set())
            if not recomposed and not any(k.startswith(f"{base}/") for k in sizes):
                continue  # untouched: its documents stand
            cells = cm.CellsAfter()
            cells.read_family(store, level, delta)
            cells.apply(sizes, base, origin)
            stale = [k for k in _recomposed_cells(cells, base, level, delta, geo, recomposed)
                     if k not in logged]
            store.remove_noted(stale, sizes)
            for key in stale:
                cells.remove(key, origin)
            left = [a for a in cells.chunks if a.startswith(f"{base}/") and cells.chunks[a]]
            if not left:
                store.remove_tree(base)
                continue
            for seg in store.listdir(base):
                if seg != "zarr.json" and f"{base}/{seg}" not in left:
                    store.remove_tree(f"{base}/{seg}")
            docs.update(cm.family_documents_after(store, level, delta, origin,
                                                  geo[level]["grid"][1], cells, sizes,
                                                  root_meta.sid_ndim))
    cm.write_documents(store, docs)
