"""Callers written against zarr-vectors: open store handles (local, S3,
memory), ``method=``/``options=``, ``coarsen_level`` skipping levels, and
zarr-vectors' exception classes -- each compared with zarr-vectors itself."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import zarr_vectors as zv
from zarr_vectors.core.store import open_store
from zarr_vectors.exceptions import ArrayError, CoarseningError, MetadataError, StoreError
from zarr_vectors.multiresolution import registry
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.multiresolution.coarsen import coarsen_level as reference_coarsen_level
from zarr_vectors.types.points import write_points

import zarr_vectors_dask as zd
from equivalence import SOURCE_RECORD, compare_raw_files, scratch_left, assert_same_pyramid
from stores import make_streamlines

BUILD = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
             cross_level_storage="explicit")


def _points_store(path, *, n=3000, seed=3, compressor=None):
    """Points over 600^3 in chunks of 200 with bin 50; a few sit exactly on
    the lower faces (coordinates 0.0), so some cells end in NUL bytes."""
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0, 600, size=(n, 3)).astype(np.float32)
    pos[:40, 2] = 0.0
    kw = {"compressor": compressor} if compressor else {}
    write_points(str(path), pos, chunk_shape=(200.0, 200.0, 200.0),
                 bin_shape=(50.0, 50.0, 50.0), **kw)
    return str(path)


def _twins(tmp_path, make, **kw):
    base = tmp_path / "level0.zv"
    make(base, **kw)
    ref, ours = tmp_path / "ref.zv", tmp_path / "ours.zv"
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    return str(ref), str(ours)


def _no_scratch(path) -> None:
    assert not scratch_left(path), os.listdir(path)


# ------------------------------------------------------------ handles
def test_group_handle_equals_reference(local_client, tmp_path):
    """``open_store(path, mode="r+")``'s Group, as zarr-vectors' own
    ``build_pyramid`` takes it: same pyramid as the reference's."""
    ref, ours = _twins(tmp_path, make_streamlines, seed=5, n_objects=40, chunk_shape=40.0)
    plan = zd.plan_pyramid(open_store(ours, mode="r"), **BUILD)  # planning only reads
    assert [lv.target_level for lv in plan.levels] == [1, 2]
    expected = reference_build_pyramid(open_store(ref, mode="r+"), **BUILD)
    got = zd.build_pyramid(open_store(ours, mode="r+"), method="per_object", options=None,
                           **BUILD)
    assert got == expected
    assert_same_pyramid(ref, ours)
    _no_scratch(ours)


def test_dataset_and_one_line_switch(local_client, tmp_path):
    """A ``zarr_vectors.open(...)`` Dataset is accepted as it is, and after
    ``patch_zarr_vectors()`` the Dataset's own ``build_pyramid`` (which
    passes ``method=`` and its handle) builds here."""
    ref, ours = _twins(tmp_path, _points_store, compressor="zstd")
    shutil.copytree(ours, tmp_path / "patched.zv")
    patched = str(tmp_path / "patched.zv")
    reference_build_pyramid(ref, factors=[(2, 1), (2, 1)])

    zd.build_pyramid(zv.open(ours, mode="r+"), factors=[(2, 1), (2, 1)], options={})
    assert_same_pyramid(ref, ours)

    undo = zd.patch_zarr_vectors()
    try:
        import zarr_vectors.multiresolution.coarsen as coarsen
        from zarr_vectors_dask import rerun  # zd.build_pyramid, with zarr-vectors' re-run rules
        assert coarsen.build_pyramid is rerun.build_pyramid
        ds = zv.open(patched, mode="r+")
        ds.build_pyramid(factors=[(2, 1), (2, 1)])
        assert ds.levels == (0, 1, 2)
    finally:
        undo()
    assert coarsen.build_pyramid is reference_build_pyramid
    assert_same_pyramid(ref, patched)


def test_read_only_handle_is_refused_before_writing(local_client, tmp_path):
    path = _points_store(tmp_path / "p.zv", n=300)
    before = sorted(p.relative_to(path) for p in Path(path).rglob("*"))
    with pytest.raises(StoreError, match="read-only.*mode='r\\+'"):
        zd.build_pyramid(zv.open(path), factors=[(2, 1)])
    with pytest.raises(StoreError, match="read-only"):
        zd.coarsen_level(open_store(path, mode="r"), 0, 1, coarsen_factor=2)
    assert sorted(p.relative_to(path) for p in Path(path).rglob("*")) == before


def test_handle_with_storage_options_is_refused(tmp_path):
    path = _points_store(tmp_path / "p.zv", n=300)
    with pytest.raises(StoreError, match="storage_options"):
        zd.plan_pyramid(open_store(path, mode="r+"), factors=[(2, 1)],
                        storage_options={"anon": True})


def _dump_memory(store, dest: Path) -> str:
    for key, buf in store._store_dict.items():
        p = dest / key
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(buf.to_bytes())
    return str(dest)


def test_memory_store_builds_in_process(local_client, tmp_path):
    """A MemoryStore cannot reach worker processes: with a process cluster
    as the default client, the build runs on workers in this process and
    leaves the reference's pyramid in the caller's MemoryStore; an explicit
    process client is refused with a message that says why."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    base = Path(_points_store(tmp_path / "level0.zv", n=1500, compressor="zstd"))
    mem = MemoryStore()
    for p in base.rglob("*"):
        if p.is_file():
            mem._store_dict[str(p.relative_to(base))] = \
                default_buffer_prototype().buffer.from_bytes(p.read_bytes())
    ref = tmp_path / "ref.zv"
    shutil.copytree(base, ref)
    reference_build_pyramid(str(ref), **BUILD)

    ds = zv.open(mem, mode="r+")
    with pytest.raises(zd.PlanError, match="MemoryStore.*processes=False"):
        zd.build_pyramid(ds, client=local_client, **BUILD)
    assert not any(k.startswith("1/") for k in mem._store_dict)

    zd.build_pyramid(ds, **BUILD)
    assert not any(k.startswith(".zvdask") and k != SOURCE_RECORD for k in mem._store_dict)
    ours = _dump_memory(mem, tmp_path / "ours.zv")
    assert_same_pyramid(str(ref), ours)


@pytest.mark.integration
def test_s3_group_handle_equals_reference(s3_server, local_client, tmp_path):
    """``open_store("s3://…", mode="r+", storage_options=…)``: URL and
    credentials come from the handle's FsspecStore."""
    base = tmp_path / "level0.zv"
    make_streamlines(str(base), seed=21, n_objects=30, chunk_shape=50.0)
    ref = tmp_path / "ref.zv"
    shutil.copytree(base, ref)
    reference_build_pyramid(str(ref), **BUILD)

    bucket = s3_server.new_bucket()
    fs = s3_server.fs()
    fs.put(str(base), f"{bucket}/x.zv", recursive=True)
    url = s3_server.url(bucket, "x.zv")
    handle = open_store(url, mode="r+", storage_options=dict(s3_server.storage_options))
    zd.build_pyramid(handle, **BUILD)

    ours = tmp_path / "ours.zv"
    fs.invalidate_cache()
    fs.get(f"{bucket}/x.zv", str(ours), recursive=True)
    diff = compare_raw_files(str(ref), str(ours))
    assert diff.identical, diff.summary()


# ------------------------------------------------------------ manual levels
def _manual(path, coarsen):
    coarsen(path, 0, 1, coarsen_factor=2.0)
    return coarsen(path, 0, 2, coarsen_factor=6.0)


def test_coarsen_level_skipping_a_level_equals_reference(local_client, tmp_path):
    """``coarsen_level(store, 0, 2, coarsen_factor=6)`` after ``0 -> 1``, as
    zarr-vectors' manual-levels test does: same levels, same metadata."""
    ref, ours = _twins(tmp_path, make_streamlines, seed=9, n_objects=30, chunk_shape=60.0,
                       bin_shape=5.0)
    expected = _manual(ref, reference_coarsen_level)
    got = _manual(ours, zd.coarsen_level)
    assert got == expected
    assert_same_pyramid(ref, ours)


def test_coarsen_level_zero_to_two_alone_equals_reference(local_client, tmp_path):
    ref, ours = _twins(tmp_path, _points_store)
    expected = reference_coarsen_level(ref, 0, 2, coarsen_factor=4.0, sparsity_factor=1.0)
    got = zd.coarsen_level(ours, 0, 2, coarsen_factor=4.0)
    assert got == expected
    assert_same_pyramid(ref, ours)
    with pytest.raises(CoarseningError, match="adjacent levels only.*0 -> 3"):
        zd.coarsen_level(ours, 0, 3, coarsen_factor=8.0, cross_level_storage="explicit")
    assert not os.path.exists(os.path.join(ours, "3"))


def test_failed_skip_step_removes_its_family(local_client, tmp_path, monkeypatch):
    """A step 0 -> 2 that fails removes what it wrote: the level and the
    ``+2`` family under level 0 (the cleanup used to assume ``+1``)."""
    from zarr_vectors_dask.format import naming as nm
    from zarr_vectors_dask.step import run as step_run
    from zarr_vectors_dask.storage.store import Store

    path = _points_store(tmp_path / "p.zv", n=500)
    st = Store.from_url(path)

    def boom(*a, **k):  # the step writes some cells, then fails
        st.put(f"{nm.links_family_path(0, 2)}/x", b"left by the failed step")
        st.put("2/vertices/c/0/0/0", b"partial")
        raise RuntimeError("injected failure")
    monkeypatch.setattr(step_run, "_run_step", boom)
    with pytest.raises(RuntimeError, match="injected"):
        zd.coarsen_level(path, 0, 2, coarsen_factor=4.0)
    assert not os.path.exists(os.path.join(path, "2"))
    assert not st.listdir(nm.links_family_path(0, 2))
    assert os.path.exists(os.path.join(path, "0", "vertices", "zarr.json"))


# ------------------------------------------------------------ method / options
def test_method_and_options_as_zarr_vectors(local_client, tmp_path, monkeypatch):
    path = _points_store(tmp_path / "p.zv", n=300)
    # Unknown method: zarr-vectors' own error, before the store is touched.
    with pytest.raises(ValueError) as ref_exc:
        reference_coarsen_level("/nonexistent.zv", 0, 1, method="cross_object_metanode")
    with pytest.raises(ValueError) as our_exc:
        zd.coarsen_level("/nonexistent.zv", 0, 1, method="cross_object_metanode")
    assert str(our_exc.value) == str(ref_exc.value)
    assert "zarr-vectors-tools" in str(our_exc.value)
    with pytest.raises(ValueError, match="'grid'.*zarr-vectors-tools"):
        zd.build_pyramid(path, factors=[(2, 1)], method="grid")
    # per_object takes no options.
    with pytest.raises(CoarseningError, match="takes no extra options.*'coarsen_mode'"):
        zd.build_pyramid(path, factors=[(2, 1)], options={"coarsen_mode": "x"})
    with pytest.raises(CoarseningError, match="takes no extra options"):
        zd.coarsen_level(path, 0, 1, coarsen_factor=2, options={"coarsen_mode": "x"})
    assert not os.path.exists(os.path.join(path, "1"))
    # A registered method is that package's code, called as zarr-vectors calls it.
    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return {"method": "fake"}
    monkeypatch.setitem(registry._COARSEN_STRATEGIES, "fake", fake)
    assert zd.coarsen_level(path, 0, 1, coarsen_factor=2, method="fake",
                            options={"knob": 1}) == {"method": "fake"}
    assert seen["store_path"] == path and seen["knob"] == 1 and seen["target_level"] == 1
    seen.clear()
    out = zd.build_pyramid(path, factors=[(2, 1)], method="fake", cross_level_depth=0,
                           cross_level_storage="none")
    assert out["method"] == "fake" and out["level_specs"] == [{"method": "fake"}]
    assert seen["source_level"] == 0 and seen["coarsen_factor"] == 2.0


# ------------------------------------------------------------ exception classes
def _bad_requests(path):
    return {
        "options with per_object": lambda f: f["bp"](path, factors=[(2, 1)], options={"a": 1}),
        "chunk scale of the wrong rank": lambda f: f["bp"](path, factors=[(2, 1)],
                                                          chunk_scale_factors=[(2, 2)]),
        "chunk scale 0": lambda f: f["bp"](path, factors=[(2, 1)], chunk_scale_factors=[0]),
        "negative chunk scale": lambda f: f["cl"](path, 0, 1, coarsen_factor=2,
                                                  chunk_scale_factor=-1),
        "bin does not tile the chunk": lambda f: f["bp"](path, factors=[(3, 1)],
                                                        chunk_scale_factors=[2]),
        "sparsity below 1": lambda f: f["bp"](path, factors=[(2, 0.5)]),
        "target not above source": lambda f: f["cl"](path, 0, 0, coarsen_factor=2),
        "missing source level": lambda f: f["cl"](path, 3, 4, coarsen_factor=2),
        "bad cross_level_storage": lambda f: f["bp"](path, factors=[(2, 1)],
                                                    cross_level_storage="always"),
        "bad cross_level_depth": lambda f: f["bp"](path, factors=[(2, 1)], cross_level_depth=-2),
        "missing store": lambda f: f["bp"](path + ".missing", factors=[(2, 1)]),
    }


def test_errors_are_instances_of_the_reference_classes(local_client, tmp_path):
    """For each request zarr-vectors refuses, ours raises an instance of
    the class zarr-vectors raises for it (CoarseningError, MetadataError,
    StoreError, ValueError), naming the argument, and writes nothing."""
    path = _points_store(tmp_path / "p.zv", n=300)
    ref_copy = str(tmp_path / "ref.zv")
    ref = {"bp": reference_build_pyramid, "cl": reference_coarsen_level}
    ours = {"bp": zd.build_pyramid, "cl": zd.coarsen_level}
    names = {"options with per_object": "options", "chunk scale of the wrong rank": "rank",
             "chunk scale 0": "chunk_scale", "negative chunk scale": "chunk_scale_factor",
             "bin does not tile the chunk": "bin_shape", "sparsity below 1": "sparsity",
             "target not above source": "target_level", "missing source level": "level 3",
             "bad cross_level_storage": "always",
             "bad cross_level_depth": "cross_level_depth", "missing store": "missing"}
    assert sorted(names) == sorted(_bad_requests(path))
    for name, call in _bad_requests(path).items():  # noqa: B007
        shutil.rmtree(ref_copy, ignore_errors=True)
        shutil.copytree(path, ref_copy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                _bad_requests(ref_copy)[name](ref)
                ref_exc = None
            except Exception as exc:  # noqa: BLE001
                ref_exc = exc
        assert ref_exc is not None, f"zarr-vectors accepts {name!r}"
        with pytest.raises(Exception) as got:
            call(ours)
        assert names[name] in str(got.value), (name, str(got.value))
        # The reference's own class, whatever it is, for this request.
        assert isinstance(got.value, type(ref_exc)), (name, type(ref_exc), type(got.value))
        assert isinstance(ref_exc, (CoarseningError, MetadataError, StoreError, ValueError)), \
            (name, type(ref_exc))
        assert not os.path.exists(os.path.join(path, "1")), name
        _no_scratch(path)


def test_damaged_cell_is_an_array_error(local_client, tmp_path):
    """zarr-vectors reports an unreadable chunk as ``ArrayError``; ours names
    the array and chunk and is an ``ArrayError`` too."""
    path = _points_store(tmp_path / "p.zv", n=2000, compressor="zstd")
    cell = next(Path(path, "0", "vertices", "c").rglob("*"))
    while cell.is_dir():
        cell = next(cell.iterdir())
    cell.write_bytes(cell.read_bytes()[:7])
    with pytest.raises(ArrayError, match="0/vertices chunk"):
        zd.build_pyramid(path, factors=[(2, 1)])
    assert not os.path.exists(os.path.join(path, "1"))
