"""Requests as a planned cost (issue 15): ``plan_pyramid``/``--dry-run``
estimate, per step, the objects a build writes and the requests it makes
of an object store, unsharded and sharded.  The pure parts are checked on
grids small enough to count by hand; one build checks the estimate against
the files it really wrote."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import zarr_vectors_dask as zd
from equivalence import MANIFEST_DIGESTS, SOURCE_RECORD
from stores import make_streamlines
from zarr_vectors_dask.errors import PlanError
from zarr_vectors_dask.planning.bill import (_axis_groups, chunk_candidates, expected_shards,
                                             link_estimate, request_plan)
from zarr_vectors_dask.planning.plan import plan_pyramid_from_meta

# A 2-D store of 4x2 chunks of 10, bins of 5: every bin inside one chunk.
TINY = dict(store="mem://tiny", ndim=2, root_chunk_shape=(10.0, 10.0), root_bin=(5.0, 5.0),
            bounds=([0.0, 0.0], [39.9, 19.9]), level0_chunks=8, level0_vertices=10**9,
            n_objects=100)
BASE = dict(store="mem://x", ndim=3, root_chunk_shape=(125.0,) * 3, root_bin=(5.0,) * 3,
            bounds=([0.0] * 3, [999.0] * 3), level0_chunks=512, level0_vertices=1_000_000,
            n_objects=10_000)
PYRAMID = dict(factors=[(2, 1), (2, 2), (2, 2)], cross_level_depth=-1,
               cross_level_storage="explicit")


# ---------------------------------------------------------------- geometry
def test_axis_groups_name_the_bins_that_straddle():
    # Chunk [0, 10), bins of 4: two inside, [8, 12) half across the face.
    assert _axis_groups(0, 10.0, 4.0, 10.0) == (
        (0.2, 1, ((0, 0, 0.5), (1, -1, 0.5))),
        (0.4, 2, ((0, 0, 1.0),)))
    # Data ending at 9: the straddling bin holds 1 of the chunk's 9 units,
    # and its centroid stays in the chunk.
    assert _axis_groups(0, 10.0, 4.0, 10.0, (0.0, 9.0)) == (
        (round(1 / 9, 12), 1, ((0, 0, 1.0),)), (round(4 / 9, 12), 2, ((0, 0, 1.0),)))
    # A coarse chunk of 20: chunk 1 is the second half of its parent.
    groups = _axis_groups(1, 10.0, 5.0, 20.0)
    assert {d for _, _, dist in groups for d in dist} == {(0, 1, 1.0)}


def test_expected_shards_count_present_chunks_by_shard():
    coords = np.array([[0, 0], [1, 1], [2, 0], [5, 5]])
    assert expected_shards(coords, np.ones(4), (2, 2)) == 3.0
    # Two chunks of one shard, each there half the time: 1 - 1/4.
    assert expected_shards(coords[:2], np.full(2, 0.5), (2, 2)) == pytest.approx(0.75)
    assert expected_shards(coords, np.zeros(4), (2, 2)) == 0.0


def test_chunk_candidates_are_exact_when_the_chunks_are_known():
    known = chunk_candidates((4, 4), 3, coords=[(0, 0), (1, 2), (3, 3)])
    assert known.expected == 3.0 and known.coords.tolist() == [[0, 0], [1, 2], [3, 3]]
    spread = chunk_candidates((4, 4), 4, origin=(-2, 0))
    assert spread.expected == pytest.approx(4.0) and spread.coords.min(axis=0).tolist() == [-2, 0]
    huge = chunk_candidates((4096, 4096, 64), 10**6)  # modelled on a box, scaled
    assert huge.coords.shape[0] <= (1 << 20) and huge.expected == pytest.approx(10**6)


def test_links_inside_chunks_are_one_cell_per_chunk():
    """Bins inside their chunk: every vertex's parent is in the chunk's
    own coarse chunk, whatever the data: one +1 cell per chunk."""
    fine = chunk_candidates((4, 2), 8)
    est = link_estimate(fine, active=np.ones(8), fine_chunk=(10.0, 10.0), bin_shape=(5.0, 5.0),
                        coarse_chunk=(10.0, 10.0), m=50.0, shard=(2, 2), target_shards=True,
                        landed=True)
    assert est.cells == pytest.approx(8) and est.arrays == pytest.approx(1)
    assert est.mirror_arrays == pytest.approx(1)
    assert est.shards == pytest.approx(2) and est.mirror_shards == pytest.approx(2)
    assert est.landed.expected == pytest.approx(8)


def test_tiny_grid_counts_by_hand():
    """4x2 chunks of 10 -> coarse chunks of 20 (chunk scale 2), bins of 10.
    Coarse level: 2 chunks, so 2 vertices + 2 vertex_fragments cells.
    +1: one cell per fine chunk (8), all at offset 0.0 (1 array); -1: the
    8 mirrors, at back offsets (0|1, 0|1) (4 arrays).  Documents: vertices,
    vertex_fragments, object_index group, manifests, object_ids, level,
    +1 (1 array + family), -1 (4 arrays + family + new links group) = 14.
    With 2x2 shards: 1 shard per vertex array, the +1 array's 8 cells in
    2 shards, each -1 array's cells in the coarse grid's 1 shard."""
    plan = plan_pyramid_from_meta(factors=[(2, 1)], chunk_scale_factors=[2], **TINY)
    rp = request_plan(plan)
    (step,) = rp.steps
    assert {k: round(v, 6) for k, v in step.objects.items()} == {
        "vertex cells": 4, "+1 link cells": 8, "-1 link cells": 8, "manifest buckets": 1,
        "object id table": 1, "documents": 14}
    # PUT: the objects, the root document, the exchange files (objects for
    # the bucket, refs and sequences per (bucket, block)) and two records.
    blocks = plan.levels[0].n_blocks
    assert step.put == pytest.approx(step.n_objects + 1 + 1 + 2 * blocks + 2)
    assert step.delete == pytest.approx(1 + 2 * blocks + 2)
    sharded = request_plan(plan, shard_shape=2).steps[0]
    assert {k: round(v, 6) for k, v in sharded.objects.items()} == {
        "vertex shards": 2, "+1 link shards": 2, "-1 link shards": 4, "manifest buckets": 1,
        "object id table": 1, "documents": 14}
    # One cell a chunk, no composition (one level), nothing for ±N.
    assert rp.compose.n_objects == 0


def test_exchange_files_follow_buckets_and_blocks():
    """Objects -> buckets, refs and sequences per (bucket, block) pair,
    flags per attribute bucket: written, read, deleted."""
    meta = {**BASE, "n_objects": 40_000}
    plan = plan_pyramid_from_meta(factors=[(2, 1)], **meta)
    lv = plan.levels[0]
    lv.n_object_attributes = 2
    step = request_plan(plan).steps[0]
    k, b = 3, lv.n_blocks
    assert lv.n_buckets == k
    assert step.delete == pytest.approx(k + 1 + 2 * k * b + 2)
    assert step.objects["manifest buckets"] == k and step.objects["attribute buckets"] == 2


@pytest.mark.parametrize("shard", [None, 2, (2, 2, 1), 4])
def test_more_chunks_never_cost_less(shard):
    parts = []
    for chunks in (64, 128, 256, 512):
        plan = plan_pyramid_from_meta(**PYRAMID, **{**BASE, "level0_chunks": chunks})
        parts.append(request_plan(plan, shard_shape=shard).total)
    for a, b in zip(parts, parts[1:]):
        assert b.n_objects >= a.n_objects and b.put >= a.put and b.get >= a.get


@pytest.mark.parametrize("shard", [1, 2, (2, 2, 1), (4, 4, 4)])
def test_sharded_never_writes_more_objects(shard):
    plan = plan_pyramid_from_meta(**PYRAMID, **BASE)
    plain, sharded = request_plan(plan), request_plan(plan, shard_shape=shard)
    for a, b in zip(plain.parts, sharded.parts):
        assert b.n_objects <= a.n_objects + 1e-6
    if shard != 1:
        assert sharded.total.n_objects < plain.total.n_objects
        assert sharded.total.put < plain.total.put


def test_bad_shard_shape_is_refused():
    plan = plan_pyramid_from_meta(factors=[(2, 1)], **BASE)
    with pytest.raises(PlanError, match="shard_shape"):
        request_plan(plan, shard_shape=(2, 2))


def test_printed_plan_shows_the_bill():
    text = repr(plan_pyramid_from_meta(**PYRAMID, **BASE))
    for needle in ("objects written and requests", "unsharded:", "PUT", "GET", "HEAD", "LIST",
                   "DELETE", "±N links", "start, finish", "total", "objects 0->1: vertex cells"):
        assert needle in text
    assert "sharded 2x2x2" not in text
    text = repr(plan_pyramid_from_meta(**PYRAMID, **BASE, shard_shape=2))
    assert "sharded 2x2x2:" in text and "fewer objects" in text
    assert "total tasks" in text  # the task counts stay


# ---------------------------------------------------------------- against a build
def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@pytest.mark.parametrize("shard_shape", [None, 2])
def test_estimate_against_what_a_build_writes(tmp_path, local_client, shard_shape):
    """The plan's objects-written estimate against the files a real build
    adds, within 35%: the estimate follows present chunks with a
    probability each and spreads vertices evenly, so it is exact only
    where geometry decides (level 0's chunks, bins inside chunks)."""
    base = tmp_path / "base.zv"
    make_streamlines(str(base), seed=5, n_objects=250)
    store = tmp_path / "s.zv"
    shutil.copytree(base, store)
    before = _files(store)
    plan = zd.plan_pyramid(str(store), shard_shape=shard_shape, **PYRAMID)
    estimate = plan.requests(plan.levels[0].shard_shape).total.n_objects
    zd.build_pyramid(str(store), sparsity_seed=0, client=local_client, shard_shape=shard_shape,
                     **PYRAMID)
    written = len(_files(store) - before)
    assert not (_files(store) - before) & {f for f in _files(store)
                                           if f.startswith(".zvdask") and f != SOURCE_RECORD
                                           and not f.startswith(MANIFEST_DIGESTS + "/")}
    assert 0.65 <= estimate / written <= 1.35, (estimate, written)
    if shard_shape is not None:  # and both agree that sharding writes fewer
        plain = plan.requests().total.n_objects
        assert estimate < plain
