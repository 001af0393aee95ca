"""The build tunes its workers' glibc heap (``runtime.WorkerMalloc``):
Dask's nanny fixes the mmap threshold at 128 KiB, so every large numpy
temporary is mapped fresh and faults its pages in again."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from zarr_vectors_dask.runtime import WorkerMalloc, tuned_workers

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or
                                ctypes.util.find_library("c") is None,
                                reason="glibc's mallopt only")


def _faults_of_reused_arrays(n: int = 40) -> int:
    """Minor page faults while a 4 MiB array is made, filled and freed
    ``n`` times (as a stage's temporaries are)."""
    import resource

    import numpy as np
    np.ones(1 << 19)  # numpy's own first-use costs, outside the count
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        a = np.ones(1 << 19)
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_tuned_workers_reuse_freed_arrays_and_are_restored_after(local_client):
    pages = 40 * (4 << 20) // 4096  # every page of every array faulting
    untuned = local_client.run(_faults_of_reused_arrays)
    assert min(untuned.values()) > pages // 2  # Dask's nanny environment: each one faults
    with tuned_workers(local_client):
        tuned = local_client.run(_faults_of_reused_arrays)
        assert max(tuned.values()) < pages // 10  # freed arrays come back from the heap
    restored = local_client.run(_faults_of_reused_arrays)
    assert min(restored.values()) > pages // 2


def test_tuning_can_be_turned_off_by_dask_config(local_client):
    import dask
    pages = 40 * (4 << 20) // 4096
    with dask.config.set({"zarr-vectors-dask.tune-worker-malloc": False}), \
            tuned_workers(local_client):
        faults = local_client.run(_faults_of_reused_arrays)
        assert WorkerMalloc.name not in local_client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.worker_plugins))
    assert min(faults.values()) > pages // 2
