"""``test_pyramid_matches_reference`` at a size where the graph is cut:
20,000 objects (two manifest buckets), a per-task vertex budget far below
a level's vertex count (many source blocks), for 2-D graphs and 3-D
meshes, with implicit links to depth 2 and chunk scales (scalar, then
per axis).  Stores are written by zarr-vectors' own writers.

Each store is built once per module (reference and project) and judged
by the tests below.  The judgement is file by file: identical bytes are
the reference's pyramid whatever reader looks at them, so the slower
reader walk of ``assert_equivalent`` (a minute on these stores) adds
nothing here.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

import zarr_vectors_dask as zd
from equivalence import compare_raw_files
from stores import make_graphs, make_meshes

N_OBJECTS = 20_000
MAX_BLOCK_VERTICES = 8_000
CASE = dict(factors=[(2, 1), (2, 2)], sparsity_seed=3, cross_level_depth=2,
            cross_level_storage="implicit")

#: kind -> (writer, keyword arguments, spatial dimensions); a few vertices
#: per object keeps the writers and the reference fast.
MANY = {
    "graphs_2d": (make_graphs, dict(ndim=2, min_nodes=2, max_nodes=4, step=1.0), 2),
    "meshes": (make_meshes, dict(min_radius=0.5, max_radius=2.0, n_lat=(2, 3),
                                 n_lon=(3, 4)), 3),
}


@dataclass
class Built:
    base: str
    ref: str
    ours: str
    expected: dict
    got: dict
    plan: object
    reports: list


def _case(ndim: int) -> dict:
    return dict(CASE, chunk_scale_factors=[2, (2, 4, 2)[:ndim]])


@pytest.fixture(scope="module", params=sorted(MANY))
def built(request, tmp_path_factory, local_client) -> Built:
    make, kw, ndim = MANY[request.param]
    top = tmp_path_factory.mktemp(f"many-{request.param}")
    base, ref, ours = (str(top / n) for n in ("level0.zv", "ref.zv", "ours.zv"))
    make(base, seed=17, n_objects=N_OBJECTS, **kw)
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    case = _case(ndim)
    plan = zd.plan_pyramid(ours, max_block_vertices=MAX_BLOCK_VERTICES, **case)
    expected = reference_build_pyramid(ref, **case)
    reports: list = []
    got = zd.build_pyramid(ours, client=local_client, max_block_vertices=MAX_BLOCK_VERTICES,
                           _reports=reports, **case)
    yield Built(base, ref, ours, expected, got, plan, reports)
    shutil.rmtree(top, ignore_errors=True)


def test_many_objects_pyramid_matches_reference(built):
    assert built.got == built.expected
    diff = compare_raw_files(built.ref, built.ours)
    assert diff.identical, diff.summary()
    # Level 0's own arrays are untouched (only new link families appear).
    level0 = compare_raw_files(built.base, built.ours, ignore=lambda p: not p.startswith("0/")
                               or p.startswith("0/links/+"))
    assert not level0.differing and not level0.only_in_expected, level0.summary()


def test_many_objects_build_is_cut_into_buckets_and_blocks(built):
    """The premises: every step has several manifest buckets and several
    source blocks, and the build ran one bin task per planned block."""
    first = built.plan.levels[0]
    assert first.n_objects == N_OBJECTS
    assert [lv.n_buckets for lv in built.plan.levels][:1] == [2]
    assert first.n_blocks >= 4, first
    steps = [r for r in built.reports if hasattr(r, "stage_tasks")]
    assert len(steps) == 2
    assert steps[0].stage_tasks["bin_partials"] == first.n_blocks
    assert steps[1].stage_tasks["write_manifests"] == 2
    assert all(r.stage_tasks["bin_partials"] > 1 for r in steps), [r.stage_tasks for r in steps]
