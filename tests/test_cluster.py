"""A real deployment: `dask scheduler` and two `dask worker` processes on
127.0.0.1; the driver connects by address, workers read and write the store."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

import zarr_vectors_dask as zd
from equivalence import compare_raw_files
from stores import make_streamlines

pytestmark = pytest.mark.integration


def test_build_on_scheduler_and_worker_processes(dask_cluster, twin_stores):
    from distributed import Client
    _, ref, ours = twin_stores(make_streamlines, seed=21)
    kw = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
              cross_level_storage="explicit")
    reference_build_pyramid(str(ref), **kw)
    with Client(dask_cluster.address) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        zd.build_pyramid(str(ours), client=client, **kw)
    assert compare_raw_files(ref, ours).identical


def test_cli_with_scheduler_address(dask_cluster, tmp_path):
    base, ref = tmp_path / "b.zv", tmp_path / "r.zv"
    make_streamlines(str(base), seed=22)
    shutil.copytree(base, ref)
    reference_build_pyramid(str(ref), factors=[(2, 1), (2, 2)], sparsity_seed=4,
                            cross_level_depth=1, cross_level_storage="explicit")
    out = subprocess.run([sys.executable, "-m", "zarr_vectors_dask.cli", "pyramid", str(base),
                          "--factors", "2:1,2:2", "--sparsity-seed", "4", "--scheduler",
                          dask_cluster.address, "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "level" in out.stdout and "built 2 level(s)" in out.stdout
    assert compare_raw_files(ref, base).identical
