"""Bad input is rejected before anything is written, naming the culprit;
existing levels are never silently replaced."""

from __future__ import annotations

import contextlib
import hashlib
import os

import pytest

import zarr_vectors_dask as zd
from equivalence import SOURCE_RECORD, scratch_left
from stores import make_streamlines
from zarr_vectors_dask.errors import BuildError, FormatError, PlanError


def _digest(root) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture
def store(tmp_path):
    p = tmp_path / "s.zv"
    make_streamlines(str(p), seed=3)
    return str(p)


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such path"):
        zd.build_pyramid(str(tmp_path / "nope.zv"), factors=[(2, 1)])


def test_not_a_store(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(FormatError, match="not a zarr-vectors store"):
        zd.build_pyramid(str(tmp_path / "plain"), factors=[(2, 1)])


@pytest.mark.parametrize("kw, exc, match", [
    (dict(factors=[(2, 1, 3)]), PlanError, r"factors\[0\]"),
    (dict(factors=[(0.5, 1)]), PlanError, "coarsen_factor must be >= 1"),
    (dict(factors=[(2, float("nan"))]), PlanError, "sparsity_factor must be finite"),
    (dict(factors=[(2, 1)], chunk_scale_factors=[1, 1]), PlanError, "chunk_scale_factors has 2"),
    (dict(factors=[(2, 1)], chunk_scale_factors=[(1, 1)]), PlanError, "has 2 entries"),
    (dict(factors=[(2, 1)], chunk_scale_factors=[0]), PlanError, "positive integers"),
    (dict(factors=[(2, 1), (3, 1)], chunk_scale_factors=[1, 2]), PlanError, "not divisible"),
    (dict(factors=[(2, 1)], cross_level_storage="sideways"), PlanError, "cross_level_storage"),
    (dict(factors=[(2, 1)], cross_level_depth=-3), PlanError, "cross_level_depth"),
    (dict(factors=[(2, 1)], sparsity_strategy="coverage-xyz"), PlanError, "sparsity_strategy"),
])
def test_rejected_before_anything_is_written(store, kw, exc, match):
    before = _digest(store)
    with pytest.raises(exc, match=match):
        zd.build_pyramid(store, **kw)
    assert _digest(store) == before


@pytest.mark.parametrize("coarsen", [0.5, 0.0, -2.0])
def test_coarsen_factor_below_one_is_refused_where_the_reference_builds(store, tmp_path,
                                                                        coarsen):
    """What zarr-vectors accepts and we refuse, measured: it builds a level
    with bins finer than (0.5), infinite (0) or mirrored (-2) against its
    source's; ours refuses before writing anything and says why."""
    import shutil

    from zarr_vectors.multiresolution.coarsen import build_pyramid as ref
    copy = tmp_path / "ref.zv"
    shutil.copytree(store, copy)
    with pytest.warns() if coarsen == 0 else contextlib.nullcontext():  # its 0-division
        assert ref(str(copy), factors=[(coarsen, 1)])["levels_created"] == 1
    before = _digest(store)
    with pytest.raises(PlanError, match=r"coarsen_factor must be >= 1.*finer than its source"):
        zd.build_pyramid(store, factors=[(coarsen, 1)])
    assert _digest(store) == before


def test_divisibility_error_matches_the_reference(store, tmp_path):
    """A bin that does not divide a level's chunk: zarr-vectors raises for
    the request (after writing level 1); ours raises an instance of the same
    class, naming the level, before writing anything."""
    import shutil

    from zarr_vectors.multiresolution.coarsen import build_pyramid as ref
    copy = tmp_path / "ref.zv"
    shutil.copytree(store, copy)
    kw = dict(factors=[(2, 1), (3, 1)], chunk_scale_factors=[1, 2])
    with pytest.raises(Exception, match="does not divide") as theirs:
        ref(str(copy), **kw)
    before = _digest(store)
    with pytest.raises(PlanError, match="level 2.*not divisible") as ours:
        zd.build_pyramid(store, **kw)
    assert isinstance(ours.value, type(theirs.value)), (type(theirs.value), type(ours.value))
    assert _digest(store) == before


def test_existing_level_needs_a_flag(store, local_client):
    zd.build_pyramid(store, factors=[(2, 1)], client=local_client)
    before = _digest(store)
    with pytest.raises(BuildError, match=r"level 1 already exists.*overwrite=True.*resume=True"):
        zd.build_pyramid(store, factors=[(2, 1)], client=local_client)
    assert _digest(store) == before
    # overwrite rebuilds the same pyramid
    zd.build_pyramid(store, factors=[(2, 1)], client=local_client, overwrite=True)
    after = _digest(store)
    assert after.pop(SOURCE_RECORD) != before.pop(SOURCE_RECORD)  # re-recorded (its time)
    assert after == before


def test_resume_rejects_changed_parameters(store, local_client):
    zd.build_pyramid(store, factors=[(2, 1), (2, 2)], sparsity_seed=1, client=local_client)
    with pytest.raises(BuildError, match="level 1"):
        zd.build_pyramid(store, factors=[(3, 1), (2, 2)], sparsity_seed=1, client=local_client,
                         resume=True)


def test_concurrent_build_is_refused(store, local_client):
    from zarr_vectors_dask.storage.lock import LOCK_KEY
    from zarr_vectors_dask.storage.store import Store
    import json
    import time
    lock = {"owner": "otherhost:1", "host": "otherhost", "pid": 1, "token": "t",
            "heartbeat": time.time(), "lease": 120}
    Store.from_url(store).put(LOCK_KEY, json.dumps(lock).encode())
    with pytest.raises(BuildError, match="otherhost:1.*resume=True"):
        zd.build_pyramid(store, factors=[(2, 1)], client=local_client)
    # a live owner elsewhere (fresh heartbeat): resume refuses, naming it
    with pytest.raises(BuildError, match=r"otherhost:1\) and its last heartbeat is \d+ s old, "
                                         r"within its 120 s lease"):
        zd.build_pyramid(store, factors=[(2, 1)], client=local_client, resume=True)
    # once its lease has expired, resume takes the crashed build's lock over
    lock["heartbeat"] -= 600
    Store.from_url(store).put(LOCK_KEY, json.dumps(lock).encode())
    os.utime(os.path.join(store, LOCK_KEY), (time.time() - 600,) * 2)
    zd.build_pyramid(store, factors=[(2, 1)], client=local_client, resume=True)
    assert not scratch_left(store)


def test_corrupt_chunk_names_array_and_chunk(store, local_client):
    import glob
    cells = sorted(glob.glob(os.path.join(store, "0", "vertices", "c", "*", "*", "*")))
    with open(cells[0], "r+b") as fh:
        fh.truncate(5)
    with pytest.raises(Exception, match=r"0/vertices chunk -?\d+\.-?\d+\.-?\d+"):
        zd.build_pyramid(store, factors=[(2, 1)], client=local_client)
    assert not os.path.exists(os.path.join(store, "1", "zarr.json"))  # nothing published
