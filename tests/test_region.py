"""The refresh region, planned without I/O (planning/region.py): which
level-0 changes reach the coarse levels, and which attribute buckets."""

from __future__ import annotations

import pytest

from zarr_vectors_dask.planning.region import ATTRIBUTES, LINKS, WHOLE, classify, dirty_buckets

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
    ({"vertices": _row(1)}, "vertices changed"),
    ({"object_attributes/w": _row(1), "object_index/manifests": _row(1)}, "manifests changed"),
    ({"object_attributes/w": _row(1, documents=1)}, "metadata of object_attributes/w"),
    ({"vertex_attributes/a": _row(1)}, "vertex_attributes/a changed"),
    ({"level metadata": _row(documents=1)}, "level metadata changed"),
    ({"links/0/0.0.0": _row(1), "root metadata": _row(documents=1)}, "root metadata"),
    ({}, "no fingerprint"),
])
def test_everything_else_rebuilds_whole_levels_naming_why(arrays, why):
    kind, reason = classify(arrays, **RANDOM)
    assert kind == WHOLE and why in reason, reason


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
