"""A coarsening step, and the closing composition, as one Dask graph.

The graph is plain data (``{key: (function, *args)}``), built by one small
function per stage and handed to the scheduler once: no stage waits for
the driver.  Routes that geometry decides (which partitions a source block
can reach, which target blocks a partition's centroids can land in) come
from the plan; routes that depend on data (objects <-> source blocks) go
through exchange files behind a ``join`` barrier, so the receivers list
their own folder instead of being told who wrote to them.

``dask.get(graph.dsk, graph.output)`` runs a graph serially in-process (unit
tests); ``runtime.execute`` runs it on a distributed cluster.
"""

from __future__ import annotations

from ..format import naming as nm
from ..planning.runs import StepLayout, split_runs
from ..planning.sparsity import Sparsity
from ..runtime import Graph
from . import cells as scells
from . import context as ctxs
from . import exchange as xch
from . import links as lnk
from . import manifests as mans
from . import objects as objs
from . import shuffle
from . import summary as smy
from . import vertices as verts

__all__ = ["shard_writers", "step_graph", "attribute_refresh_graph"]


# ---------------------------------------------------------------- one step
def _sparsity_context(g: Graph, tok: str, spec, layout: StepLayout, n_rows: int,
                      sparsity: Sparsity) -> list:
    """Per-object lengths (and, for registered strategies, midpoints) for
    a strategy other than ``random``: buckets ask blocks about their
    fragments and sum the answers, so no task sees a whole level.
    Returns the tasks ``object_table`` waits for (none for ``random``)."""
    if not sparsity.needs_context(n_rows):
        return []
    want_points = sparsity.wants_points
    buckets = range(len(split_runs(n_rows, nm.MANIFEST_BUCKET)))
    refs = [g.add(tok, ctxs.context_refs, k, spec, k, n_rows) for k in buckets]
    asked = g.add(tok, xch.join, "context_refs", *refs)
    summaries = [g.add(tok, ctxs.fragment_summaries, b, spec, b, layout.block_chunks[b], asked)
                 for b in range(layout.n_blocks)]
    answered = g.add(tok, xch.join, "context_frags", *summaries)
    ctx = [g.add(tok, ctxs.object_context, k, spec, k, refs[k], want_points, answered)
           for k in buckets]
    if not want_points:
        return ctx
    asked = g.add(tok, xch.join, "context_points", *ctx)
    points = [g.add(tok, ctxs.fragment_points, b, spec, b, layout.block_chunks[b], asked)
              for b in range(layout.n_blocks)]
    answered = g.add(tok, xch.join, "context_pointvals", *points)
    return [g.add(tok, ctxs.object_points, k, spec, k, ctx[k], answered) for k in buckets]


def _objects(g: Graph, tok: str, spec, n_rows: int, sparsity: Sparsity, attrs: list[str],
             context: list, region):
    # A region refresh keeps the row digests of unchanged buckets.
    return g.add(tok, objs.object_table, 0, spec, n_rows, sparsity, attrs, region is None,
                 *context)


def _object_refs(g: Graph, tok: str, spec, n_buckets: int, objects, region):
    refs = [g.add(tok, objs.object_refs, k, spec, k, objects, region) for k in range(n_buckets)]
    return refs, (g.add(tok, xch.join, "refs", *refs) if refs else None)


def _old_sequences(g: Graph, tok: str, spec, region, refs_done) -> list:
    """A region's: the old parents of fragments outside it that its
    recomputed objects name."""
    if region is None or refs_done is None:
        return []
    return [g.add(tok, lnk.old_sequences, q, spec, q, region, refs_done)
            for q in range(region.n_old)]


def _bin_partials(g: Graph, tok: str, spec, layout: StepLayout, refs_done):
    return [g.add(tok, shuffle.bin_partials, b, spec, b, layout.block_chunks[b],
                  layout.block_partitions[b], refs_done) for b in range(layout.n_blocks)]


def _pick(g: Graph, tok: str, src, *path):
    return g.add(tok, xch.pick, f"{src[1]}:{':'.join(map(str, path))}-{src[0]}", src, *path)


def _reduce(g: Graph, tok: str, spec, layout: StepLayout, partials, region):
    senders: dict[int, list[int]] = {}
    for b, parts in enumerate(layout.block_partitions):
        for p in parts:
            senders.setdefault(p, []).append(b)
    return {p: g.add(tok, shuffle.reduce_metavertices, p, spec, p, blocks, region,
                     *[_pick(g, tok, partials[b], "exchange", p) for b in blocks])
            for p, blocks in sorted(senders.items())}


def _write_vertices(g: Graph, tok: str, spec, layout: StepLayout, reduced):
    receivers: dict[int, list[int]] = {}
    for p in reduced:
        lo, hi = layout.partition_targets[p]
        for tb in range(lo, hi + 1):
            receivers.setdefault(tb, []).append(p)
    return {tb: g.add(tok, verts.write_metavertices, tb, spec, tb, parts,
                      *[_pick(g, tok, reduced[p], "to_target", tb) for p in parts])
            for tb, parts in sorted(receivers.items())}


def _resolve(g: Graph, tok: str, spec, layout: StepLayout, reduced, writes):
    out = {}
    for p, rkey in reduced.items():
        lo, hi = layout.partition_targets[p]
        located = [_pick(g, tok, writes[tb], "located", p) for tb in range(lo, hi + 1)
                   if tb in writes]
        out[p] = g.add(tok, verts.resolve_parents, p, spec, p, rkey, *located)
    return out


def _links(g: Graph, tok: str, spec, layout: StepLayout, partials, resolved, region):
    links = []
    for b, parts in enumerate(layout.block_partitions):
        answers = [g.add(tok, lnk.answer_for, f"{b}:{p}", resolved[p], b, p)
                   for p in parts if p in resolved]
        links.append(g.add(tok, lnk.links_and_sequences, b, spec, b, partials[b], region,
                           *answers))
    return links


def _manifests(g: Graph, tok: str, spec, n_rows: int, refs, links, region):
    if not refs:
        return []
    done = g.add(tok, xch.join, "sequences", *links)  # and any old_sequences
    return [g.add(tok, mans.write_manifests, k, spec, k, refs[k], run, done, region)
            for k, run in enumerate(split_runs(n_rows, nm.MANIFEST_BUCKET))]


def _attributes(g: Graph, tok: str, spec, n_rows: int, attrs: list[str], objects,
                region: dict | None = None):
    """Every bucket of every attribute, or (a refresh) ``region``'s:
    ``{name: buckets}``."""
    every = range(len(split_runs(n_rows, nm.ATTRIBUTE_BUCKET)))
    return [g.add(tok, mans.write_attributes, f"{name}:{j}", spec, name, j, objects)
            for name in attrs for j in (every if region is None else region[name])]


def shard_writers(g: Graph, tok: str, store, routes, writers) -> list:
    """Sharded levels: once every writer has sent its cells, one task per
    run of shards writes them whole (no shard is written by two tasks)."""
    if not routes:
        return []
    done = g.add(tok, xch.join, "cells", *writers)
    return [g.add(tok, scells.write_shards, f"{r.level}:{k}", store, r, k, done)
            for r in routes for k in range(len(r.pack_starts))]


def step_graph(spec, layout: StepLayout, *, n_rows: int, sparsity: Sparsity,
               attribute_names: list[str], token: str, region=None) -> Graph:
    """The whole step: its one output is ``level_summary``'s counts.
    ``region`` (a ``StepRegion``, a refresh): the same stages over its
    source blocks, writing its target chunks, the manifest rows crossing
    it and no object attribute (unchanged); the documents are left to the
    driver (``region_summary``)."""
    g = Graph({})
    context = _sparsity_context(g, token, spec, layout, n_rows, sparsity) \
        if spec.has_objects else []
    objects = _objects(g, token, spec, n_rows, sparsity, attribute_names, context, region) \
        if spec.has_objects else None
    n_buckets = len(split_runs(n_rows, nm.MANIFEST_BUCKET)) if spec.has_objects else 0
    refs, refs_done = _object_refs(g, token, spec, n_buckets, objects, region)
    old = _old_sequences(g, token, spec, region, refs_done)
    partials = _bin_partials(g, token, spec, layout, refs_done)
    reduced = _reduce(g, token, spec, layout, partials, region)
    writes = _write_vertices(g, token, spec, layout, reduced)
    resolved = _resolve(g, token, spec, layout, reduced, writes)
    links = _links(g, token, spec, layout, partials, resolved, region)
    manifests = _manifests(g, token, spec, n_rows, refs, [*links, *old], region)
    if region is not None:
        g.output = g.add(token, smy.region_summary, 0, objects, len(manifests), *manifests,
                         *writes.values(), *links, *old)
        return g
    attrs = _attributes(g, token, spec, n_rows, attribute_names, objects) \
        if spec.has_objects else []
    shards = shard_writers(g, token, spec.store, spec.shard_routes, [*writes.values(), *links])
    g.output = g.add(token, smy.level_summary, 0, spec, objects, len(writes), len(links),
                     len(manifests),
                     *writes.values(), *links, *manifests, *attrs, *shards)
    return g


# ------------------------------------------------ a refresh of attributes
def attribute_refresh_graph(pairs, sparsities, *, n_rows: int, region: dict[str, tuple],
                            token: str) -> Graph:
    """The steps restricted to a region of object-attribute buckets
    (``{name: buckets}``): per coarse level, in order, the survivors as
    ``object_table`` draws them and the attribute stage on those buckets
    only; each level's writes wait for its source level's."""
    g = Graph({})
    wanted = tuple(sorted({b for bs in region.values() for b in bs}))
    done: tuple = ()
    for pair, sparsity in zip(pairs, sparsities):
        tok = f"{token}-{pair.target_level}"
        kept = g.add(tok, objs.attribute_survivors, 0, pair, n_rows, sparsity, wanted, *done)
        writes = _attributes(g, tok, pair, n_rows, list(region), kept, region)
        done = (g.add(tok, xch.join, "attributes", kept, *writes),)
    g.output = done[0] if done else None
    return g
