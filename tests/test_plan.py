"""Planning is pure: shapes and factors in, bins/grids/task counts out."""

from __future__ import annotations

import math

import pytest

from zarr_vectors_dask.errors import PlanError
from zarr_vectors_dask.planning.plan import (bin_ratio, grid_layout, normalize_chunk_scale,
                                             plan_pyramid_from_meta, target_bin, validate_factors,
                                             validate_options)
from zarr_vectors_dask.planning.runs import chunks_per_block, split_runs

BASE = dict(store="mem://x", ndim=3, root_chunk_shape=(125.0,) * 3, root_bin=(5.0,) * 3,
            bounds=([0.0] * 3, [999.0] * 3), level0_chunks=512, level0_vertices=1_000_000,
            n_objects=10_000)


def test_bins_compound_from_the_source_level():
    plan = plan_pyramid_from_meta(factors=[(2, 1), (2, 2), (2.5, 2)], **BASE)
    assert [lv.bin_shape for lv in plan.levels] == [(10.0,) * 3, (20.0,) * 3, (50.0,) * 3]
    assert [lv.bin_ratio for lv in plan.levels] == [(2,) * 3, (4,) * 3, (10,) * 3]
    assert target_bin((3.0, 4.0), 1.5) == (4.5, 6.0)
    assert bin_ratio((7.4,), (5.0,)) == (1,)


def test_chunk_scale_sets_override_only_when_it_differs_from_root():
    plan = plan_pyramid_from_meta(factors=[(5, 1), (5, 1)], chunk_scale_factors=[1, (2, 2, 1)], **BASE)
    assert plan.levels[0].chunk_shape_override is None
    assert plan.levels[1].chunk_shape == (250.0, 250.0, 125.0)
    assert plan.levels[1].chunk_shape_override == (250.0, 250.0, 125.0)


def test_grid_layout_matches_zarr_vectors():
    from zarr_vectors.spatial.chunking import grid_layout as zv_grid_layout
    for bounds, chunk in [(([-9.1, 27.0, 20.3], [75.5, 82.5, 82.6]), (25.0, 25.0, 25.0)),
                          (([0.0, 0.0], [100.0, 49.9]), (50.0, 25.0)),
                          (([-100.0, -0.5, 3.0], [-1.0, 0.5, 250.0]), (40.0, 10.0, 125.0))]:
        o, g = zv_grid_layout(bounds, chunk)
        assert grid_layout(bounds, chunk) == (tuple(o), tuple(g))


@pytest.mark.parametrize("bad, match", [
    ([(2,)], r"factors\[0\] must be a \(coarsen_factor, sparsity_factor\) pair"),
    ([(2, 1), "x"], r"factors\[1\]"),
    ([(0.5, 1)], r"factors\[0\] coarsen_factor must be >= 1"),
    ([(2, 0.9)], r"factors\[0\] sparsity_factor must be >= 1"),
    ([(float("nan"), 1)], r"coarsen_factor must be finite"),
    ([(2, float("inf"))], r"sparsity_factor must be finite"),
    ([], r"non-empty"),
])
def test_bad_factors_name_the_factor(bad, match):
    with pytest.raises(PlanError, match=match):
        validate_factors(bad)


@pytest.mark.parametrize("scale, match", [((2, 2), "has 2 entries"), (0, "positive integers"),
                                          ((1, -1, 1), "positive integers"), (1.5, "positive integers"),
                                          ((1, 2.5, 1), "positive integers")])
def test_bad_chunk_scale(scale, match):
    with pytest.raises(PlanError, match=match):
        normalize_chunk_scale(scale, 3, where="chunk_scale_factors[0]")


def test_chunk_scale_length_must_match_factors():
    with pytest.raises(PlanError, match="chunk_scale_factors has 1 entries but factors has 2"):
        plan_pyramid_from_meta(factors=[(2, 1), (2, 1)], chunk_scale_factors=[1], **BASE)


def test_bin_must_divide_overridden_chunk():
    with pytest.raises(PlanError, match=r"level 2: chunk_shape 250x250x250 .* not divisible"):
        plan_pyramid_from_meta(factors=[(2, 1), (3, 1)], chunk_scale_factors=[1, 2], **BASE)


@pytest.mark.parametrize("kw, match", [
    (dict(cross_level_storage="both", cross_level_depth=1, sparsity_strategy="random"), "cross_level_storage"),
    (dict(cross_level_storage="explicit", cross_level_depth=-2, sparsity_strategy="random"), "cross_level_depth"),
    (dict(cross_level_storage="explicit", cross_level_depth=1, sparsity_strategy="nope"), "sparsity_strategy"),
])
def test_bad_options(kw, match):
    with pytest.raises(PlanError, match=match):
        validate_options(**kw)


def test_blocks_bound_memory_and_task_counts_follow_chunks():
    # Task counts depend on chunks (and worker count), never per vertex.
    small = plan_pyramid_from_meta(factors=[(2, 1)], **BASE)
    big = plan_pyramid_from_meta(factors=[(2, 1)], **{**BASE, "level0_vertices": 100_000_000},
                                 max_block_vertices=2_000_000)
    for p in (small, big):
        lv = p.levels[0]
        assert lv.n_blocks <= lv.source_chunks
        assert lv.chunks_per_block * (lv.source_vertices / lv.source_chunks) <= 2_000_000 or \
            lv.chunks_per_block == 1
    assert chunks_per_block(512, 10**9, 2, 2_000_000) == 1
    assert chunks_per_block(512, 1000, 2, 2_000_000) == math.ceil(512 / 4)
    assert split_runs(5, 2) == [(0, 2), (2, 4), (4, 5)]


def test_plan_repr_shows_every_level_and_stage():
    text = repr(plan_pyramid_from_meta(factors=[(2, 1), (2, 2)], **BASE))
    for needle in ("0->1", "1->2", "bin_partials", "reduce_metavertices",
                   "total tasks", "est. size", "125x125x125"):
        assert needle in text
