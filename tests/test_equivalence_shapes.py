"""Shapes that stress the graph's cutting (issue 11), each equal to the
reference on stores written by zarr-vectors' own writers: several
manifest and attribute buckets, and chunks of very different densities
split by a small per-task budget."""

from __future__ import annotations


import numpy as np
import pytest
import zarr
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.types.points import write_points
from zarr_vectors.types.polylines import write_polylines

import zarr_vectors_dask as zd
from zarr_vectors_dask.planning import levels
from zarr_vectors_dask.step.run import plan_step
from zarr_vectors_dask.step.source import read_source_level
from zarr_vectors_dask.storage.store import Store
from equivalence import twin_copies, assert_same_pyramid

KW = dict(factors=[(2, 1), (2, 3)], sparsity_seed=7, cross_level_depth=-1,
          cross_level_storage="explicit")


def _check(ref, ours, client, **kw):
    expected = reference_build_pyramid(str(ref), **KW)
    reports: list = []
    got = zd.build_pyramid(str(ours), client=client, _reports=reports, **KW, **kw)
    assert got == expected
    assert_same_pyramid(ref, ours)
    return reports


def _shuffle_object_rows(path, rng, id_range=2**40):
    """Give the level-0 objects sparse ids in an unsorted id table: rows of
    the id table, manifests and object attributes permuted together, which
    the format allows (readers look ids up through the table)."""
    g = zarr.open_group(path, mode="r+")
    ids = g["0/object_index/object_ids"]
    perm = rng.permutation(ids.shape[0])
    ids[:] = rng.choice(id_range, size=ids.shape[0], replace=False).astype(ids.dtype)
    arrays = [g["0/object_index/manifests"]]
    arrays += [g[f"0/object_attributes/{k}"] for k in g["0/object_attributes"].array_keys()]
    for arr in arrays:
        arr[:] = arr[:][perm]


@pytest.mark.slow  # 20k-object scale run (76 s); test_equivalence_many covers several buckets in CI
def test_many_objects_sparse_unsorted_ids_skewed_chunks(local_client, tmp_path):
    """70,000 short streamlines (five manifest buckets, two attribute
    buckets) with sparse ids in an unsorted id table, 80% of them in one
    corner chunk: sparsity, id table and links equal the reference's."""
    rng = np.random.default_rng(0)
    n = 70_000
    corner = rng.random((n, 1, 1)) < 0.8
    start = np.where(corner, rng.uniform(2, 22, size=(n, 1, 3)), rng.uniform(0, 96, size=(n, 1, 3)))
    lines = (start + np.cumsum(rng.normal(0, 1.0, size=(n, 3, 3)), axis=1)).clip(0, 99.9)
    attrs = {"weight": rng.random(n).astype(np.float32),
             "label": rng.integers(0, 9, n).astype(np.int32)}

    def write(path):
        write_polylines(path, list(lines.astype(np.float32)), chunk_shape=(25.0,) * 3,
                        bin_shape=(2.5,) * 3, bounds=([0.0] * 3, [100.0] * 3),
                        object_attributes=attrs)
        _shuffle_object_rows(path, rng)

    ref, ours = twin_copies(tmp_path, write)
    # The premises: ids neither dense nor sorted, chunk sizes far apart.
    ids = zarr.open_array(str(ours / "0/object_index/object_ids"), mode="r")[:]
    assert ids.size == n and np.any(np.diff(ids) < 0) and ids.max() > 100 * n
    sizes = [f.stat().st_size for f in (ours / "0/vertices/c").rglob("*") if f.is_file()]
    assert max(sizes) > 20 * np.median(sizes)
    _check(ref, ours, local_client)
    # Ids are kept (the coarse table lists them in id order, as the reference's does).
    got = zarr.open_array(str(ours / "1/object_index/object_ids"), mode="r")[:]
    assert np.array_equal(got, np.sort(ids))


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

    ref, ours = twin_copies(tmp_path, write)
    plan = zd.plan_pyramid(str(ours), factors=KW["factors"], max_block_vertices=2_000)
    st = Store.from_url(str(ours))
    lv = plan.levels[0]
    _, layout, _ = plan_step(st, lv, read_source_level(st, 0, 3), levels.read_root_meta(st),
                             sparsity_strategy="random", sparsity_seed=None)
    # Sized from cell sizes, not the mean: the dense chunk (number 0) is a
    # block alone, the sparse rest shares a block.
    assert layout.block_chunks[0].tolist() == [0] and layout.n_blocks == 2
    reports = _check(ref, ours, local_client, max_block_vertices=2_000)
    assert reports[0].stage_tasks["bin_partials"] == plan.levels[0].n_blocks
