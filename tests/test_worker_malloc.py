"""The build tunes its workers' glibc heap (``runtime.WorkerMalloc``):
Dask's nanny fixes the mmap threshold at 128 KiB, so every large numpy
temporary is mapped fresh and faults its pages in again."""

from __future__ import annotations

import contextlib
import ctypes.util
import sys

import pytest

from zarr_vectors_dask.runtime import WorkerMalloc, tuned_workers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or
                                ctypes.util.find_library("c") is None,
                                reason="glibc's mallopt only")

N_ARRAYS = 80
#: 2 MiB arrays: over glibc's 128 KiB, under the 4 MiB from which numpy
#: asks for transparent huge pages (a few faults an array, when the kernel
#: has huge pages free: the count would depend on the machine's state).
ARRAY_ITEMS = 1 << 18
PAGES = N_ARRAYS * ARRAY_ITEMS * 8 // 4096  # every page of every array faulting


def _faults_of_reused_arrays(n: int = N_ARRAYS) -> int:
    """Minor page faults while a 2 MiB array is made, filled and freed
    ``n`` times (as a stage's temporaries are)."""
    import resource

    import numpy as np
    np.ones(ARRAY_ITEMS)  # numpy's own first-use costs, outside the count
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.ones(ARRAY_ITEMS)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.fixture(scope="module")
def fresh_client():
    """A worker process of its own: its heap has no earlier test's history."""
    from distributed import Client, LocalCluster
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def _faults(client) -> int:
    (n,) = client.run(_faults_of_reused_arrays).values()
    return n


def _registered(client) -> list:
    """The scheduler's worker plugins that are a build's heap tuning."""
    return [n for n in client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.worker_plugins))
        if n.startswith(WorkerMalloc.name)]


def test_tuned_workers_reuse_freed_arrays_and_are_restored_after(fresh_client):
    assert _faults(fresh_client) > PAGES // 2  # Dask's nanny environment: each one faults
    with tuned_workers(fresh_client):
        assert _faults(fresh_client) < PAGES // 10  # freed arrays come back from the heap
    assert not _registered(fresh_client)
    assert _faults(fresh_client) > PAGES // 2


def test_builds_at_once_keep_the_heap_tuned_until_the_last_ends(fresh_client):
    """Two builds on one cluster, the first ending while the second runs:
    each has its own plugin, and the second's workers stay tuned."""
    with contextlib.ExitStack() as first:
        first.enter_context(tuned_workers(fresh_client))
        with tuned_workers(fresh_client):
            assert len(_registered(fresh_client)) == 2
            first.close()  # the first build ends
            assert len(_registered(fresh_client)) == 1
            assert _faults(fresh_client) < PAGES // 10
    assert not _registered(fresh_client)
    assert _faults(fresh_client) > PAGES // 2


def test_tuning_can_be_turned_off_by_dask_config(fresh_client):
    import dask
    with dask.config.set({"zarr-vectors-dask.tune-worker-malloc": False}), \
            tuned_workers(fresh_client):
        assert not _registered(fresh_client)
        assert _faults(fresh_client) > PAGES // 2


def test_a_build_leaves_its_workers_as_it_found_them(fresh_client, tmp_path):
    import zarr_vectors_dask as zd
    from stores import make_streamlines
    path = tmp_path / "s.zv"
    make_streamlines(path)
    zd.build_pyramid(str(path), factors=[(2, 1), (2, 2)], sparsity_seed=0,
                     client=fresh_client)
    assert not _registered(fresh_client)
    assert _faults(fresh_client) > PAGES // 2
