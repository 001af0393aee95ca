"""zarr-vectors 0.9.2's own pyramid tests, run with its ``build_pyramid`` and
``coarsen_level`` replaced by ours.

The test files come from zarr-vectors' source distribution, fetched with pip
into a cache directory outside the repository (never copied into it).  They
run in a pytest subprocess with a plugin that calls
``zarr_vectors_dask.patch_zarr_vectors()`` before any test module imports
the functions, and one LocalCluster (2 worker processes) for the session as
the default client.  Every one of the 137 tests must pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

from conftest import INLINE_ENV
from sdists import extract_tests, fetch_sdist

pytestmark = pytest.mark.integration

VERSION = "0.9.2"
TEST_FILES = [
    "tests/test_per_object_pyramid.py",
    "tests/test_multiscale_links.py",
    "tests/test_per_level_chunk_shape.py",
    "tests/integration/test_binning_sparsity.py",
    "tests/test_metadata_stamps.py",
    "tests/test_metadata_ownership.py",
    "tests/test_ome_node.py",
    "tests/test_edit_pyramid_refresh.py",
    "tests/test_api_maintenance.py",
    "tests/test_multiresolution_registry.py",
]
EXPECTED_TESTS = 137

PLUGIN = '''
"""Loaded with -p before collection: the test modules' own
``from zarr_vectors.multiresolution.coarsen import build_pyramid`` then
binds ours."""
import zarr_vectors_dask

zarr_vectors_dask.patch_zarr_vectors()
_cluster = _client = None


def pytest_configure(config):
    global _cluster, _client
    from distributed import Client, LocalCluster
    _cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                            dashboard_address=":0", silence_logs=40)
    _client = Client(_cluster, set_as_default=True)


def pytest_unconfigure(config):
    if _client is not None:
        _client.close()
        _cluster.close()


def pytest_sessionstart(session):
    import zarr_vectors.multiresolution.coarsen as coarsen
    assert coarsen.build_pyramid is zarr_vectors_dask.rerun.build_pyramid
    assert coarsen.coarsen_level is zarr_vectors_dask.coarsen_level
'''


def test_zarr_vectors_pyramid_tests_pass_with_our_builder(tmp_path):
    sdist = fetch_sdist("zarr-vectors", VERSION)
    work = tmp_path / "peer"
    work.mkdir()
    extract_tests(sdist, work)
    missing = [f for f in TEST_FILES if not (work / f).exists()]
    assert not missing, f"{sdist.name} lacks {missing}"
    (work / "zvdask_peer_plugin.py").write_text(PLUGIN)
    # zarr-vectors' own pytest settings (its pyproject is not extracted).
    (work / "pytest.ini").write_text(textwrap.dedent("""\
        [pytest]
        filterwarnings =
            ignore::zarr.errors.UnstableSpecificationWarning
            ignore::DeprecationWarning
        """))
    report = work / "report.xml"
    env = {k: v for k, v in os.environ.items() if k != INLINE_ENV}  # the default executor
    env = {**env, "PYTHONPATH": os.pathsep.join(
        [str(work), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pytest", "-p", "zvdask_peer_plugin", "-p", "no:cacheprovider",
           "-q", "--no-header", "-rfE", f"--junitxml={report}", "--rootdir", str(work),
           "-c", str(work / "pytest.ini"), *TEST_FILES]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert report.exists(), f"pytest did not run ({proc.returncode}):\n{tail}"
    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": EXPECTED_TESTS, "failures": 0, "errors": 0, "skipped": 0}, \
        f"{counts}\n{tail}"
    assert proc.returncode == 0, tail
