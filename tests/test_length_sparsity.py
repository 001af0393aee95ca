"""Length-ranked sparsity (issue 14, part 2): ``sparsity_strategy="length"``
keeps the longest objects of the source level, and registered strategies
get the per-object context they document.

The expected pyramids are written by zarr-vectors itself: a selection
strategy registered for the reference (``_BruteForce``) picks the survivors
from the reference's own source level, read with zarr-vectors' reader and
ranked with numpy in the test.  Everything else about the pyramid
(metavertices, manifests, attributes, present masks, links) is then the
reference's, and ours must equal it file for file."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from zarr_vectors.core.arrays import (list_chunk_keys, read_chunk_vertices,
                                      read_object_manifest_rows, vertices_dtype)
from zarr_vectors.core.store import get_resolution_level, open_store, read_root_metadata
from zarr_vectors.multiresolution import registry
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.types.polylines import write_polylines

import zarr_vectors_dask as zd
from equivalence import twin_copies, compare_raw_files, assert_same_pyramid
from stores import make_points_sparse_ids, make_streamlines
from zarr_vectors_dask.errors import PlanError


# ----------------------------------------------------------- brute force
def object_polylines(path, level: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Each row's vertex sequence (its manifest's fragments concatenated,
    missing ones skipped), read with zarr-vectors' reader."""
    root = open_store(str(path), mode="r")
    ndim = read_root_metadata(root).sid_ndim
    lg = get_resolution_level(root, level)
    dtype = vertices_dtype(lg)
    frags = {}
    for cc in list_chunk_keys(lg, "vertices"):
        for i, f in enumerate(read_chunk_vertices(lg, cc, dtype=dtype, ndim=ndim)):
            frags[(tuple(cc), i)] = np.asarray(f, dtype=np.float64).reshape(-1, ndim)
    ids, manifests = read_object_manifest_rows(lg)
    lines = []
    for m in manifests:
        parts = [frags[(tuple(cc), int(fi))] for cc, fi in m if (tuple(cc), int(fi)) in frags]
        lines.append(np.concatenate(parts) if parts else np.empty((0, ndim)))
    return np.asarray(ids), lines


def lengths_of(lines) -> np.ndarray:
    return np.array([np.sqrt((np.diff(p, axis=0) ** 2).sum(axis=1)).sum() for p in lines])


def longest(lengths: np.ndarray, factor: float) -> np.ndarray:
    """The rows a length-ranked level keeps, by sorting in Python."""
    n = len(lengths)
    k = max(1, round(n * (1.0 / factor)))
    ranked = sorted(range(n), key=lambda r: (-lengths[r], r))
    return np.sort(np.array(ranked[:k], dtype=np.int64))


class _BruteForce:
    """A selection strategy for the *reference* build: the survivors of
    each level are the longest objects of the reference's own source
    level (every step of the pyramid sparsifies, so call i is level i)."""

    def __init__(self, path, factors):
        self.path, self.factors, self.calls = path, factors, 0

    def __call__(self, n_objects, target_count, **ctx):
        level = self.calls
        self.calls += 1
        _, lines = object_polylines(self.path, level)
        assert len(lines) == n_objects
        kept = longest(lengths_of(lines), self.factors[level][1])
        assert kept.size == target_count
        return kept


@pytest.fixture
def strategy_name(request):
    """A registry name for one test, removed afterwards."""
    name = f"zvdask-test-{request.node.name}"
    yield name
    registry._SELECTION_STRATEGIES.pop(name, None)


def _reference(ref, factors, name, **kw):
    registry.register_selection_strategy(name, _BruteForce(ref, factors))
    return reference_build_pyramid(str(ref), factors=factors, sparsity_strategy=name, **kw)


def _nonempty_ids(path, level):
    root = open_store(str(path), mode="r")
    ids, manifests = read_object_manifest_rows(get_resolution_level(root, level))
    return np.sort(np.asarray(ids)[[len(m) > 0 for m in manifests]])


KW = dict(sparsity_seed=5, cross_level_depth=-1, cross_level_storage="explicit")


# ----------------------------------------------------------------- tests
def test_length_equals_brute_force_on_streamlines(local_client, tmp_path, strategy_name):
    """Three sparsified levels of streamlines with object attributes: each
    level keeps the longest objects of the level below it (brute force on
    the reference's levels), ids stay, attributes and present masks follow
    the survivors; the files equal the reference's with those survivors."""
    factors = [(2, 2), (2, 1.5), (2, 3)]
    ref, ours = twin_copies(tmp_path, lambda p: make_streamlines(p, seed=11, n_objects=400,
                                                             min_len=2, max_len=120))
    expected = _reference(ref, factors, strategy_name, **KW)
    got = zd.build_pyramid(str(ours), factors=factors, sparsity_strategy="length",
                           client=local_client, **KW)
    assert got["level_specs"] == expected["level_specs"]
    assert_same_pyramid(ref, ours)
    # Survivors, spelled out for level 1: the longest 200 of level 0.
    ids, lines = object_polylines(ours, 0)
    kept = longest(lengths_of(lines), 2)
    assert kept.size == 200
    assert np.array_equal(_nonempty_ids(ours, 1), np.sort(ids[kept]))


def test_random_is_unchanged(local_client, tmp_path):
    """The default strategy is still the reference's own."""
    ref, ours = twin_copies(tmp_path, lambda p: make_streamlines(p, seed=2, n_objects=120))
    factors = [(2, 2), (2, 3)]
    expected = reference_build_pyramid(str(ref), factors=factors, **KW)
    got = zd.build_pyramid(str(ours), factors=factors, client=local_client, **KW)
    assert got == expected
    assert compare_raw_files(ref, ours).identical


def test_ids_not_dense_nor_sorted(local_client, tmp_path, strategy_name):
    """Sparse, unsorted object ids: survivors are ranked by source row and
    keep their ids."""
    factors = [(2, 3), (2, 2)]
    ref, ours = twin_copies(tmp_path, lambda p: make_points_sparse_ids(p, seed=4, n_objects=40))
    _reference(ref, factors, strategy_name, **KW)
    zd.build_pyramid(str(ours), factors=factors, sparsity_strategy="length",
                     client=local_client, **KW)
    assert_same_pyramid(ref, ours)
    ids, lines = object_polylines(ours, 0)
    assert not np.array_equal(ids, np.arange(ids.size))
    assert np.array_equal(_nonempty_ids(ours, 1), np.sort(ids[longest(lengths_of(lines), 3)]))


def test_many_buckets_and_ties(local_client, tmp_path, strategy_name):
    """70,000 objects (five manifest buckets, two attribute buckets), 30,000
    of them copies of one line whose length ranks near the cut: equal
    lengths, so lower rows win, across every bucket."""
    rng = np.random.default_rng(1)
    start = rng.uniform(0, 96, size=(40_000, 1, 3))
    walks = (start + np.cumsum(rng.normal(0, 1.0, size=(40_000, 3, 3)), axis=1)).clip(0, 99.9)
    walks = walks.astype(np.float32)
    walk_len = lengths_of(list(walks.astype(np.float64)))
    common = walks[int(np.argsort(walk_len)[36_000])]  # ~4,000 random lines are longer
    lines = list(walks) + [common.copy() for _ in range(30_000)]
    order = rng.permutation(len(lines))
    lines = [lines[i] for i in order]
    n = len(lines)
    attrs = {"weight": rng.random(n).astype(np.float32),
             "label": rng.integers(0, 9, n).astype(np.int32)}

    def write(path):
        write_polylines(path, lines, chunk_shape=(25.0,) * 3, bin_shape=(2.5,) * 3,
                        bounds=([0.0] * 3, [100.0] * 3), object_attributes=attrs)

    ref, ours = twin_copies(tmp_path, write)
    factors = [(2, 3)]
    _reference(ref, factors, strategy_name, **KW)
    zd.build_pyramid(str(ours), factors=factors, sparsity_strategy="length",
                     client=local_client, **KW)
    assert compare_raw_files(ref, ours).identical
    ids, src_lines = object_polylines(ours, 0)
    kept = longest(lengths_of(src_lines), 3)
    assert np.array_equal(_nonempty_ids(ours, 1), np.sort(ids[kept]))
    # The cut falls inside the group of equal lengths: some copies are
    # kept (the lowest rows), some dropped.
    copy_rows = np.flatnonzero(order >= 40_000)
    kept_copies = np.intersect1d(kept, copy_rows)
    assert 0 < kept_copies.size < copy_rows.size
    assert np.array_equal(kept_copies, copy_rows[:kept_copies.size])


def _record_context(out_dir, n_objects, target_count, **ctx):
    """A registered strategy: saves what it was given, keeps the rows
    whose representative point has the smallest first coordinate."""
    np.savez(os.path.join(out_dir, f"call-{len(os.listdir(out_dir))}.npz"),
             n=n_objects, target=target_count, lengths=ctx["lengths"],
             points=ctx["representative_points"], bin_shape=np.asarray(ctx["bin_shape"]),
             seed=-1 if ctx["seed"] is None else ctx["seed"])
    x = np.where(np.isnan(ctx["representative_points"][:, 0]), np.inf,
                 ctx["representative_points"][:, 0])
    return np.sort(np.argsort(x, kind="stable")[:target_count])


def test_registered_strategy_gets_the_context(local_client, tmp_path, strategy_name):
    """A name in zarr-vectors' registry is called on the cluster with the
    context it documents: per-object lengths, representative points (the
    vertex at index n // 2 of the object's sequence) and the source bin."""
    out = tmp_path / "calls"
    out.mkdir()
    registry.register_selection_strategy(strategy_name,
                                         functools.partial(_record_context, str(out)))
    store = tmp_path / "s.zv"
    make_streamlines(str(store), seed=8, n_objects=90)
    zd.build_pyramid(str(store), factors=[(2, 3)], sparsity_strategy=strategy_name,
                     sparsity_seed=4, client=local_client)
    (call,) = [np.load(out / f) for f in os.listdir(out)]
    ids, lines = object_polylines(store, 0)
    assert int(call["n"]) == 90 and int(call["target"]) == 30 and int(call["seed"]) == 4
    np.testing.assert_allclose(call["lengths"], lengths_of(lines), rtol=1e-12)
    mid = np.array([p[len(p) // 2] for p in lines])
    assert np.array_equal(call["points"], mid)
    root = open_store(str(store), mode="r")
    assert tuple(call["bin_shape"]) == tuple(read_root_metadata(root).effective_bin_shape)
    kept = np.sort(np.argsort(mid[:, 0], kind="stable")[:30])
    assert np.array_equal(_nonempty_ids(store, 1), np.sort(ids[kept]))


def test_unknown_strategy_fails_before_anything_is_written(tmp_path):
    """Refused up front, with the reference's exception class."""
    ref, ours = twin_copies(tmp_path, lambda p: make_streamlines(p, seed=1, n_objects=20))
    before = sorted(os.listdir(ours))
    with pytest.raises(ValueError) as theirs:
        reference_build_pyramid(str(ref), factors=[(2, 2)], sparsity_strategy="no-such")
    with pytest.raises(PlanError, match="unknown sparsity_strategy 'no-such'") as mine:
        zd.build_pyramid(str(ours), factors=[(2, 1), (2, 2)], sparsity_strategy="no-such")
    assert isinstance(mine.value, type(theirs.value))
    assert sorted(os.listdir(ours)) == before


class _Stop(Exception):
    pass


def test_resume_with_length(local_client, tmp_path):
    """A build stopped after level 1 resumes with "length" to the same
    pyramid as a clean build; rerunning on the finished pyramid rewrites
    nothing; asking for "random" then is refused."""
    clean, broken = twin_copies(tmp_path, lambda p: make_streamlines(p, seed=6, n_objects=150))
    factors = [(2, 2), (2, 2)]
    zd.build_pyramid(str(clean), factors=factors, sparsity_strategy="length",
                     client=local_client, **KW)

    def stop_at_level_2(name, futures):
        if name == "level 2":
            raise _Stop(name)

    with pytest.raises(_Stop):
        zd.build_pyramid(str(broken), factors=factors, sparsity_strategy="length",
                         client=local_client, progress=stop_at_level_2, **KW)
    from zarr_vectors_dask.errors import BuildError
    with pytest.raises(BuildError, match="sparsity_strategy"):
        zd.build_pyramid(str(broken), factors=factors, client=local_client, resume=True, **KW)
    zd.build_pyramid(str(broken), factors=factors, sparsity_strategy="length",
                     client=local_client, resume=True, **KW)
    assert compare_raw_files(clean, broken).identical
    stamp = {f: os.stat(os.path.join(d, f)).st_mtime_ns
             for d, _, fs in os.walk(broken) for f in fs}
    out = zd.build_pyramid(str(broken), factors=factors, sparsity_strategy="length",
                           client=local_client, resume=True, **KW)
    assert [s["objects_kept"] for s in out["level_specs"]] == [75, 75]
    assert stamp == {f: os.stat(os.path.join(d, f)).st_mtime_ns
                     for d, _, fs in os.walk(broken) for f in fs}


def test_cli_sparsity_strategy(local_client, tmp_path, capsys, strategy_name):
    """``zvdask pyramid --sparsity-strategy length`` on a running scheduler:
    the reference's pyramid with the brute-force survivors, built with the
    CLI's defaults (depth 1, explicit links, no seed)."""
    from zarr_vectors_dask.cli import main
    ref, ours = twin_copies(tmp_path, lambda p: make_streamlines(p, seed=9, n_objects=60))
    _reference(ref, [(2, 2)], strategy_name, cross_level_depth=1,
               cross_level_storage="explicit")
    rc = main(["pyramid", str(ours), "--factors", "2:2", "--sparsity-strategy", "length",
               "--scheduler", local_client.scheduler.address, "--no-progress"])
    assert rc == 0
    diff = compare_raw_files(ref, ours)
    assert diff.identical, diff.summary()
    assert main(["pyramid", str(ours), "--factors", "2:2", "--sparsity-strategy", "nope",
                 "--overwrite"]) != 0
    assert "unknown sparsity_strategy 'nope'" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.slow  # the S3 variant; length on local stores and S3 builds run in CI
def test_length_on_s3(s3_server, local_client, tmp_path, strategy_name):
    """Built straight on S3 (SeaweedFS): the exchange files of the context
    stages travel through the bucket; equal to the reference with the
    brute-force survivors, nothing left under .zvdask."""
    factors = [(2, 2), (2, 2)]
    ref, local = twin_copies(tmp_path, lambda p: make_streamlines(p, seed=21, n_objects=60,
                                                              chunk_shape=50.0))
    _reference(ref, factors, strategy_name, **KW)
    bucket = s3_server.new_bucket()
    fs = s3_server.fs()
    fs.put(str(local), f"{bucket}/x.zv", recursive=True)
    zd.build_pyramid(s3_server.url(bucket, "x.zv"), factors=factors, sparsity_strategy="length",
                     storage_options=s3_server.storage_options, client=local_client, **KW)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/x.zv", refresh=True)]
    assert sorted(names) == [".zvdask", "0", "1", "2", "zarr.json"], names  # .zvdask: the record
    ours = tmp_path / "from-s3.zv"
    fs.get(f"{bucket}/x.zv", str(ours), recursive=True)
    diff = compare_raw_files(ref, ours)
    assert diff.identical, diff.summary()


def test_plan_shows_the_context_tasks(tmp_path):
    """--dry-run counts the context stages: exactly for the first step (its
    real graph), estimated for later ones; none with random."""
    store = tmp_path / "s.zv"
    make_streamlines(str(store), seed=3, n_objects=50)
    plan = zd.plan_pyramid(str(store), factors=[(2, 2), (2, 2)], sparsity_strategy="length")
    for lv in plan.levels:
        assert lv.tasks["context_refs"] == lv.tasks["object_context"] == 1
        assert lv.tasks["fragment_summaries"] == lv.n_blocks
        assert "fragment_points" not in lv.tasks
    plain = zd.plan_pyramid(str(store), factors=[(2, 2), (2, 2)])
    assert not any("context_refs" in lv.tasks for lv in plain.levels)


def test_kept_rows_ranks_by_length_then_row():
    from zarr_vectors_dask.planning.sparsity import kept_rows
    lengths = np.array([3.0, 5.0, 5.0, 0.0, 5.0, 1.0, 3.0])
    keep = kept_rows(7, 2.0, "length", None, (1.0,), lengths=lengths)
    assert np.flatnonzero(keep).tolist() == [0, 1, 2, 4]  # 4 kept: three 5.0s, then row 0's 3.0
    assert kept_rows(7, 1.0, "length", None, (1.0,)).all()  # no sparsity: no lengths needed
    assert np.flatnonzero(kept_rows(7, 100.0, "length", None, (1.0,), lengths=lengths)) \
        .tolist() == [1]  # at least one row
