"""Shared fixtures: a real multi-process LocalCluster, reference pyramids,
and (via conftest_servers) SeaweedFS and dask scheduler/worker processes."""

from __future__ import annotations

import shutil

import pytest

pytest_plugins = ["conftest_servers"]


@pytest.fixture(scope="session")
def local_client():
    """LocalCluster with 2 worker processes, 1 thread each."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture
def twin_stores(tmp_path):
    """``make(kind_fn, **kw) -> (reference_copy, project_copy)`` of one level-0 store
    written by zarr-vectors' own writer."""
    def make(fn, **kw):
        base = tmp_path / "level0.zv"
        fn(str(base), **kw)
        ref, ours = tmp_path / "ref.zv", tmp_path / "ours.zv"
        shutil.copytree(base, ref)
        shutil.copytree(base, ours)
        return str(base), str(ref), str(ours)
    return make
