"""The closing stage: ``+-N`` link families composed from the published
``+1`` families, one graph."""

from __future__ import annotations

import uuid
from typing import Callable

from ..errors import cleanup
from ..format import commit as cm
from ..runtime import StepReport, execute
from ..step.exchange import drop_exchange
from ..storage.store import Store
from .graph import COMPOSE_SCOPE, compose_graph

__all__ = ["compose_links"]


# ---------------------------------------------------------------- composition
def compose_links(client, store: Store, *, root_meta, depth: int, storage: str,
                  n_workers: int, progress: Callable | None = None,
                  max_block_vertices: int = 2_000_000, shard_shape=None) -> tuple[list, dict]:
    """The closing stage, one graph: ``±N`` families (N >= 2) composed
    from the published ``+1`` families by one task per run of fine
    chunks; their documents are written on the cluster by its last task.
    Returns the families left for the driver to commit (none) and the
    stage timings."""
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
                                 token=token, shard_shape=shard_shape)
        if graph is not None:
            execute(client, graph, token, report, name="compose", progress=progress)
    finally:
        cleanup(lambda: drop_exchange(store, COMPOSE_SCOPE),
                what="removing the exchange files of the composition")
    return [], report.stage_seconds
