"""The refresh region, planned without I/O (planning/region.py): which
level-0 changes reach the coarse levels, and which attribute buckets."""

from __future__ import annotations

import pytest

import numpy as np

from zarr_vectors_dask.planning.region import (ATTRIBUTES, CHUNKS, LINKS, WHOLE, chunk_region,
                                              classify, dirty_buckets, reachable_targets,
                                              supporting_sources)

RANDOM = dict(factors=[(2.0, 1.0), (2.0, 2.0)], sparsity_strategy="random", sparsity_seed=0)


def _row(changed=0, added=0, removed=0, documents=0) -> dict:
    return {"changed": changed, "added": added, "removed": removed, "documents": documents}


@pytest.mark.parametrize("arrays", [
    {"links/0/0.0.0": _row(1)},
    {"links/0/0.+1.0": _row(1), "links/0": _row(documents=1), "link_fragments": _row(2)},
    {"link_attributes/w/0/0.0.0": _row(1)},
])
def test_intra_level_links_reach_no_coarse_level(arrays):
    assert classify(arrays, **RANDOM)[0] == LINKS


@pytest.mark.parametrize("arrays,why", [
    ({"vertices": _row(1), "object_attributes/w": _row(1, documents=1)},
     "metadata of object_attributes/w"),
    ({"vertices": _row(1), "vertex_attributes/a": _row(1)}, "vertex_attributes/a, vertices"),
    ({"object_index/manifests": _row(1), "object_index/attrs": _row(1)},
     "object_index/attrs, object_index/manifests changed"),
    ({"object_index/object_ids": _row(1, documents=1)}, "object_ids changed"),
    ({"object_attributes/w": _row(1, documents=1)}, "metadata of object_attributes/w"),
    ({"vertex_attributes/a": _row(1)}, "vertex_attributes/a changed"),
    ({"level metadata": _row(documents=1)}, "level metadata changed"),
    ({"links/0/0.0.0": _row(1), "root metadata": _row(documents=1)}, "root metadata"),
    ({}, "no fingerprint"),
])
def test_everything_else_rebuilds_whole_levels_naming_why(arrays, why):
    kind, reason = classify(arrays, **RANDOM)
    assert kind == WHOLE and why in reason, reason


def test_rows_appended_are_a_chunk_region_checked_by_the_refresh():
    """The object index's cells and documents (rows appended, the id table
    grown) with vertex cells: a chunk region, whose driver checks that
    rows were only appended and no id changed (``changed_objects``)."""
    arrays = {"vertices": _row(2), "vertex_fragments": _row(2),
              "object_index/manifests": _row(1, added=1, documents=1),
              "object_index/object_ids": _row(1, documents=1), "object_index": _row(documents=1)}
    assert classify(arrays, **RANDOM)[0] == CHUNKS


def test_attribute_cells_with_vertex_cells_are_a_chunk_region_with_buckets():
    """Object-attribute cells changed together with vertex cells: a chunk
    region whose refresh also rewrites the attribute buckets; not when the
    survivors cannot be redrawn, nor when the attribute's shape changed."""
    arrays = {"vertices": _row(1), "object_attributes/w": _row(1)}
    kind, reason = classify(arrays, **RANDOM)
    assert kind == CHUNKS and "object_attributes/w" in reason and "bucket" in reason, reason
    kind, reason = classify(arrays, **{**RANDOM, "sparsity_seed": None})
    assert kind == WHOLE and "sparsity_seed=None" in reason, reason
    arrays["object_attributes/w"] = _row(1, documents=1)
    assert classify(arrays, **RANDOM, same_layout={"object_attributes/w"})[0] == CHUNKS
    # manifest rows (changed objects) with attribute cells: the same
    arrays = {"object_attributes/w": _row(1), "object_index/manifests": _row(1)}
    assert classify(arrays, **RANDOM)[0] == CHUNKS


def test_attribute_cells_alone_are_a_bucket_region():
    arrays = {"object_attributes/w": _row(2), "links/0/0.0.0": _row(1)}
    assert classify(arrays, **RANDOM)[0] == ATTRIBUTES
    # A rewritten document that keeps shape and dtype (EditSession's recompression).
    arrays = {"object_attributes/w": _row(1, documents=1)}
    assert classify(arrays, **RANDOM, same_layout={"object_attributes/w"})[0] == ATTRIBUTES


@pytest.mark.parametrize("strategy,seed,factors,why", [
    ("length", 0, [(2, 2)], "ranks objects by their geometry"),
    ("random", None, [(2, 1), (2, 3)], "sparsity_seed=None"),
])
def test_survivors_that_cannot_be_redrawn_rebuild(strategy, seed, factors, why):
    kind, reason = classify({"object_attributes/w": _row(1)}, factors=factors,
                            sparsity_strategy=strategy, sparsity_seed=seed)
    assert kind == WHOLE and why in reason, reason


def test_no_rows_dropped_needs_no_seed_or_rank():
    for strategy in ("length", "random"):
        kind, _ = classify({"object_attributes/w": _row(1)}, factors=[(2, 1), (4, 1)],
                           sparsity_strategy=strategy, sparsity_seed=None)
        assert kind == ATTRIBUTES


@pytest.mark.parametrize("chunks,cell_rows,n_rows,bucket,expected", [
    ([(0,)], 65_536, 40, 65_536, (0,)),
    ([(1,)], 1_000, 200_000, 65_536, (0,)),          # rows 1000..1999
    ([(65,)], 1_000, 200_000, 65_536, (0, 1)),       # rows 65000..65999 straddle
    ([(2, 0), (0, 0)], 100_000, 250_000, 65_536, (0, 1, 3)),  # the last cell is short
    ([(9,)], 1_000, 5_000, 65_536, ()),              # beyond the rows: nothing
])
def test_dirty_buckets_cover_exactly_the_rows_of_the_cells(chunks, cell_rows, n_rows, bucket,
                                                          expected):
    assert dirty_buckets(chunks, cell_rows, n_rows, bucket) == expected


def test_recompose_chunks_follow_the_parent_chains_down():
    from zarr_vectors_dask.planning.region import recompose_chunks
    parents = {0: {(0,): {(0,)}, (1,): {(0,)}, (2,): {(1,)}, (3,): {(1,)}},
               1: {(0,): {(0,)}, (1,): {(0,)}}}
    # A +1 cell of level 1 changed: every level-0 chunk under it recomposes.
    assert recompose_chunks({1: {(1,)}}, parents) == {1: {(1,)}, 0: {(2,), (3,)}}
    # A level-0 +1 cell changed: only that chunk (its parents above are unchanged).
    assert recompose_chunks({0: {(2,)}}, parents) == {1: set(), 0: {(2,)}}
    # Nothing changed: nothing recomposes.
    assert recompose_chunks({}, parents) == {1: set(), 0: set()}


# ------------------------------------------------------------ chunk regions
@pytest.mark.parametrize("arrays", [
    {"vertices": _row(2)},
    {"vertices": _row(1, added=1, documents=1), "vertex_fragments": _row(2)},
    {"object_index/manifests": _row(1), "object_index": _row(documents=1),
     "level metadata": _row(documents=1)},
    {"vertices": _row(1), "links/0/0.0.0": _row(1)},
])
def test_in_place_vertex_and_manifest_edits_are_a_chunk_region(arrays):
    kind, reason = classify(arrays, **RANDOM)
    assert kind == CHUNKS, reason


@pytest.mark.parametrize("layout,strategy,seed,why", [
    ("the pyramid is sharded", "random", 0, "sharded"),
    ("", "length", 0, "ranks objects by their geometry"),
    ("", "random", None, "sparsity_seed=None"),
])
def test_chunk_region_needs_a_layout_and_survivors_it_can_keep(layout, strategy, seed, why):
    kind, reason = classify({"vertices": _row(1)}, factors=[(2, 1), (2, 2)],
                            sparsity_strategy=strategy, sparsity_seed=seed, chunk_layout=layout)
    assert kind == WHOLE and why in reason, reason


def test_reachable_targets_are_the_chunks_meeting_the_bins_that_meet_the_chunk():
    # Chunk 2 of 125 is [250, 375); bins of 10 from 25 to 37 end at 380: chunk 3 too.
    assert reachable_targets([(2,)], (125.0,), (10.0,), (125.0,)) == {(2,), (3,)}
    # Bins that tile the chunk exactly stay inside it.
    assert reachable_targets([(2,)], (100.0,), (25.0,), (100.0,)) == {(2,)}
    assert supporting_sources([(2,)], (100.0,), (25.0,), (100.0,)) == {(2,)}
    # A coarse chunk of 250 homes bins of 10 read from two source chunks of
    # 125; bins of 15 straddle its faces, so one more chunk on each side.
    assert supporting_sources([(1,)], (250.0,), (10.0,), (125.0,)) == {(2,), (3,)}
    assert supporting_sources([(1,)], (250.0,), (15.0,), (125.0,)) == {(1,), (2,), (3,), (4,)}


@pytest.mark.parametrize("seed", range(5))
def test_every_centroid_of_a_chunks_bins_is_homed_in_its_reach(seed):
    """Random points of one chunk, binned; any weighted float32 mean of a
    bin's points (a centroid) lies in a reachable target, and every point
    of a bin meeting a target lies in that target's supporting sources."""
    rng = np.random.default_rng(seed)
    cs, b, ct = (np.asarray(x) for x in ((60.0, 40.0), (7.0, 3.0), (45.0, 50.0)))
    c = np.asarray([2, -1])
    pts = (c * cs + rng.random((4000, 2)) * cs).astype(np.float32)
    pts = pts[np.all(np.floor(pts.astype(np.float64) / cs) == c, axis=1)]
    reach = reachable_targets([tuple(c)], cs, b, ct)
    keys = np.floor(pts.astype(np.float64) / b).astype(np.int64)
    for k in np.unique(keys, axis=0)[:200]:
        mine = pts[np.all(keys == k, axis=1)].astype(np.float64)
        w = rng.integers(1, 4, mine.shape[0])
        centroid = (np.sum(mine * w[:, None], axis=0) / w.sum()).astype(np.float32)
        home = tuple(np.floor(centroid.astype(np.float64) / ct).astype(np.int64).tolist())
        assert home in reach, (k, home)
        assert tuple(c) in supporting_sources([home], ct, b, cs)


def test_chunk_region_adds_old_targets_strays_and_fallen_weights():
    grid = [(x, y) for x in range(8) for y in range(8)]
    kw = dict(present=grid, source_chunk=(10.0, 10.0), bin_shape=(5.0, 5.0),
              target_chunk=(20.0, 20.0))
    plain = chunk_region([(2, 3)], old_links={}, **kw)
    assert plain.targets == {(1, 1)}
    assert plain.sources == {(2, 2), (2, 3), (3, 2), (3, 3)}
    # Its old vertices linked elsewhere (it held a stray): that target too.
    moved = chunk_region([(2, 3)], old_links={(2, 3): {(3, 3)}}, **kw)
    assert moved.targets == {(1, 1), (3, 3)}
    # An unchanged chunk whose old links leave its reach next to a target is read.
    stray = chunk_region([(2, 3)], old_links={(7, 7): {(3, 3), (1, 2)}}, **kw)
    assert (7, 7) in stray.sources and stray.targets == {(1, 1)}
    # Metavertices whose weights fell: their chunk and the bins' other homes.
    fallen = chunk_region([], old_links={}, fallen={(2, 2)}, rows={5}, **kw)
    assert fallen.targets == {(2, 2)} and fallen.rows == {5}
    assert chunk_region([], old_links={}, **kw).targets == frozenset()


def test_a_changed_chunk_that_no_longer_exists_is_gone_not_a_source():
    """Its cells went (its fragments emptied): nothing there is read, but a
    row naming it is recomputed (``gone``); a changed chunk still present
    is a source, not gone."""
    grid = [(x, y) for x in range(8) for y in range(8)]
    kw = dict(source_chunk=(10.0, 10.0), bin_shape=(5.0, 5.0), target_chunk=(20.0, 20.0),
              old_links={})
    both = chunk_region([(2, 3), (5, 5)], present=[c for c in grid if c != (2, 3)], **kw)
    assert both.gone == {(2, 3)}
    assert (2, 3) not in both.sources and (5, 5) in both.sources
    assert both.targets == {(1, 1), (2, 2)}  # the gone chunk's target is still recomputed
    assert chunk_region([(5, 5)], present=grid, **kw).gone == frozenset()
