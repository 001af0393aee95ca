"""Pytest fixtures for the real S3 server and the real Dask cluster.

Plain fixture functions, meant to be pulled into ``tests/conftest.py`` with
either of::

    pytest_plugins = ["conftest_servers"]          # preferred
    from conftest_servers import *  # noqa: F401,F403

Fixtures
--------
``s3_server`` (session)
    A running :class:`servers.SeaweedFS`: ``.endpoint_url``,
    ``.storage_options`` (``key``, ``secret``,
    ``client_kwargs={"endpoint_url": ...}``), ``.fs()`` (fresh s3fs
    filesystem), ``.new_bucket(prefix="zvt") -> name``, ``.url(bucket, path)``,
    ``.stop(kill=False)``, ``.restart(downtime=0.0, kill=False)``,
    ``.ensure_running()``.  Tests that stop it should restart it; if one
    does not, the next ``new_bucket()`` restarts it.
``s3_bucket`` (function)
    A fresh bucket name on ``s3_server``.
``private_s3_server`` (function)
    A server of its own (own data dir and ports) for tests that stop,
    kill or restart it and should not disturb others.
``dask_cluster`` (module)
    A running :class:`servers.DaskCluster` (scheduler + 2 worker processes,
    1 thread, 2GiB each): ``.address``, ``.worker_pids``,
    ``.kill_worker(i)``, ``.add_worker()``, ``.wait_for_workers(n)``,
    ``.wait_for_worker_count(n)``, ``.client()``, ``.stop()``.
``dask_client`` (function)
    A ``distributed.Client`` connected to ``dask_cluster``.
``private_dask_cluster`` (function)
    A cluster of its own, for tests that kill workers.

All of them skip when the ``weed`` binary / ``dask`` CLI is missing, and
fail instead in CI (``CI=true``; ``conftest.missing_component``).
"""

from __future__ import annotations

import pytest

try:  # tests/ on sys.path (pytest "prepend" import mode, no __init__.py)
    from conftest import import_or_missing, missing_component
    from servers import dask_executable, start_dask_cluster, start_seaweedfs, weed_binary
except ImportError:  # tests/ as a package
    from tests.conftest import import_or_missing, missing_component
    from tests.servers import dask_executable, start_dask_cluster, start_seaweedfs, weed_binary

__all__ = [
    "s3_server",
    "s3_bucket",
    "private_s3_server",
    "dask_cluster",
    "dask_client",
    "private_dask_cluster",
]


def _require_weed() -> None:
    try:
        weed_binary()
    except FileNotFoundError as e:
        missing_component(str(e))
    import_or_missing("s3fs")


def _require_dask() -> None:
    try:
        dask_executable()
    except FileNotFoundError as e:
        missing_component(str(e))
    import_or_missing("distributed")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Session-wide SeaweedFS S3 server on 127.0.0.1 (auth on)."""
    _require_weed()
    srv = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs") / "data")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the session server."""
    return s3_server.new_bucket()


@pytest.fixture
def private_s3_server(tmp_path):
    """A SeaweedFS server for one test only (safe to stop/kill/restart)."""
    _require_weed()
    srv = start_seaweedfs(tmp_path / "seaweedfs-data")
    try:
        yield srv
    finally:
        srv.stop(kill=True)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A scheduler + 2 single-threaded worker processes, shared by a module."""
    _require_dask()
    cluster = start_dask_cluster(
        n_workers=2, nthreads=1, memory_limit="2GiB",
        workdir=tmp_path_factory.mktemp("dask-cluster"),
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def dask_client(dask_cluster):
    """A ``distributed.Client`` on ``dask_cluster`` (closed afterwards)."""
    client = dask_cluster.client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def private_dask_cluster(tmp_path):
    """A cluster for one test only (safe to kill workers)."""
    _require_dask()
    cluster = start_dask_cluster(
        n_workers=2, nthreads=1, memory_limit="2GiB", workdir=tmp_path / "dask-cluster",
    )
    try:
        yield cluster
    finally:
        cluster.stop()
