"""Shapes that stress the graph's cutting (issue 11), each equal to the
reference on stores written by zarr-vectors' own writers: several
manifest and attribute buckets, and chunks of very different densities
split by a small per-task budget."""

from __future__ import annotations

import shutil

import numpy as np
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.types.points import write_points
from zarr_vectors.types.polylines import write_polylines

import zarr_vectors_dask as zd
from zarr_vectors_dask import api
from zarr_vectors_dask.pipeline import plan_step, read_source_level
from zarr_vectors_dask.store import Store
from equivalence import assert_equivalent, compare_raw_files

KW = dict(factors=[(2, 1), (2, 3)], sparsity_seed=7, cross_level_depth=-1,
          cross_level_storage="explicit")


def _twins(tmp_path, write):
    base, ref, ours = tmp_path / "b.zv", tmp_path / "r.zv", tmp_path / "o.zv"
    write(str(base))
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    return ref, ours


def _check(ref, ours, client, **kw):
    expected = reference_build_pyramid(str(ref), **KW)
    reports: list = []
    got = zd.build_pyramid(str(ours), client=client, _reports=reports, **KW, **kw)
    assert got == expected
    assert_equivalent(str(ref), str(ours))
    assert compare_raw_files(ref, ours).identical
    return reports


def test_more_objects_than_one_attribute_bucket(local_client, tmp_path):
    """70,000 short streamlines: five manifest buckets, two attribute
    buckets, sparsity across all of them."""
    rng = np.random.default_rng(0)
    n = 70_000
    start = rng.uniform(0, 96, size=(n, 1, 3))
    lines = (start + np.cumsum(rng.normal(0, 1.0, size=(n, 3, 3)), axis=1)).clip(0, 99.9)
    attrs = {"weight": rng.random(n).astype(np.float32),
             "label": rng.integers(0, 9, n).astype(np.int32)}

    def write(path):
        write_polylines(path, list(lines.astype(np.float32)), chunk_shape=(25.0,) * 3,
                        bin_shape=(2.5,) * 3, bounds=([0.0] * 3, [100.0] * 3),
                        object_attributes=attrs)

    ref, ours = _twins(tmp_path, write)
    _check(ref, ours, local_client)


def test_one_dense_chunk_is_split_off(local_client, tmp_path):
    """95% of the points in one chunk, a per-task budget far below that
    chunk: the dense chunk gets a block of its own and the output is
    still the reference's."""
    rng = np.random.default_rng(1)
    dense = rng.uniform(0, 24, size=(19_000, 3))
    spread = rng.uniform(0, 100, size=(1_000, 3))
    pos = np.concatenate([dense, spread]).astype(np.float32)
    ids = rng.integers(0, 500, pos.shape[0]).astype(np.int64)

    def write(path):
        write_points(path, pos, chunk_shape=(25.0,) * 3, bin_shape=(2.5,) * 3,
                     bounds=([0.0] * 3, [100.0] * 3), object_ids=ids)

    ref, ours = _twins(tmp_path, write)
    plan = zd.plan_pyramid(str(ours), factors=KW["factors"], max_block_vertices=2_000)
    st = Store.from_url(str(ours))
    lv = plan.levels[0]
    _, layout, _ = plan_step(st, lv, read_source_level(st, 0, 3), api._root_meta(st),
                             sparsity_strategy="random", sparsity_seed=None)
    # Sized from cell sizes, not the mean: the dense chunk (number 0) is a
    # block alone, the sparse rest shares a block.
    assert layout.block_chunks[0].tolist() == [0] and layout.n_blocks == 2
    reports = _check(ref, ours, local_client, max_block_vertices=2_000)
    assert reports[0].stage_tasks["bin_partials"] == plan.levels[0].n_blocks
