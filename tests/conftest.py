"""Shared fixtures: a real multi-process LocalCluster, reference pyramids,
and (via conftest_servers) SeaweedFS and dask scheduler/worker processes."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from types import ModuleType
from typing import NoReturn

import pytest

pytest_plugins = ["conftest_servers"]

#: Our tests run every graph task by task on the cluster, the path large
#: builds take, here and in the drivers they start; zarr-vectors' own
#: suites (test_peer_suite.py, test_zvtools.py) drop this and run with the
#: default, small graphs in one task; test_inline.py compares the two.
INLINE_ENV = "DASK_ZARR_VECTORS_DASK__INLINE_VERTICES"
os.environ[INLINE_ENV] = "0"
import dask  # noqa: E402 - after the variable it is to read

dask.config.refresh()


#: Our tests write ~10^5 small files.  On the CI machines' disk a small file
#: cost 64 us against 14 us on tmpfs one day, and zarr-vectors' own pyramid
#: tests went from 45 s to 186 s: temporary directories (pytest's, and every
#: subprocess's: peer suites, Dask workers, SeaweedFS) go to tmpfs when it
#: has room, unless TMPDIR is set.  The header names where they are.
TMPFS, TMPFS_MIN_FREE = "/dev/shm", 4 << 30


def _temporaries_on_tmpfs() -> str | None:
    if os.environ.get("TMPDIR") or not os.path.isdir(TMPFS):
        return None
    try:
        if shutil.disk_usage(TMPFS).free < TMPFS_MIN_FREE:
            return None
        path = os.path.join(TMPFS, f"zvdask-tests-{os.getuid()}")
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    os.environ["TMPDIR"] = path  # for subprocesses too
    tempfile.tempdir = None  # re-read by gettempdir, which pytest's basetemp uses
    return path


TEMPORARIES = _temporaries_on_tmpfs()


def pytest_report_header(config):
    return f"temporary files: {tempfile.gettempdir()}" + (
        " (tmpfs; set TMPDIR to choose)" if TEMPORARIES else "")


#: Test files by their time in CI (``--durations``), longest first.  With
#: ``-n 2 --dist loadfile`` a worker takes the next whole file when it is
#: free: handed out longest first, both workers stay busy to the end (xdist
#: would order files by their number of tests, and a one-test file of
#: minutes, such as the peer suite, went last while the other worker idled).
LONGEST_FIRST = ["test_safety.py", "test_refresh.py", "test_peer_suite.py",
                 "test_refresh_sequences.py", "test_sharded_source.py",
                 "test_equivalence.py", "test_vertex_attributes.py",
                 "test_sharded_pyramid.py", "test_s3.py", "test_length_sparsity.py",
                 "test_cli_manners.py", "test_zvtools.py", "test_equivalence_harness.py",
                 "test_notebooks.py", "test_deploy.py", "test_crash.py", "test_dropin.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist present
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's order kept


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def missing_component(reason: str) -> NoReturn:
    """A component a test needs (the ``weed`` binary, the ``dask`` CLI, an
    optional package) is absent: a skip on a developer's machine, a failure
    in CI (``CI=true``), where a broken set-up must not pass as green
    skips -- as the peer suite fails when it cannot fetch its sdist."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing test component is a failure)",
                    pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_missing(name: str) -> ModuleType:
    """``pytest.importorskip`` that fails in CI (see :func:`missing_component`)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing_component(f"could not import {name!r}: {exc}")


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
