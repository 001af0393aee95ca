"""The test infrastructure itself: real SeaweedFS S3 and a real Dask cluster."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest_plugins = ["conftest_servers"]

from servers import REPO_ROOT, free_port, free_ports  # noqa: E402

# NOTE: real worker processes cannot import this test module, so nothing
# sent to them may be a function defined here (distributed pickles
# module-level functions by reference).  Use builtins or lambdas.


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(12)
    assert len(set(ports)) == 12
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_s3_put_get_round_trip(s3_server):
    bucket = s3_server.new_bucket()
    assert len(bucket) >= 3
    fs = s3_server.fs()
    payload = os.urandom(200_000)
    fs.pipe(f"{bucket}/dir/obj.bin", payload)
    fs.pipe(f"{bucket}/dir/small.txt", b"hello")
    assert fs.cat(f"{bucket}/dir/obj.bin") == payload
    assert sorted(fs.ls(f"{bucket}/dir")) == [f"{bucket}/dir/obj.bin", f"{bucket}/dir/small.txt"]
    assert fs.exists(f"{bucket}/dir/small.txt")
    fs.rm(f"{bucket}/dir/small.txt")
    assert not fs.exists(f"{bucket}/dir/small.txt")
    # buckets are distinct and empty
    other = s3_server.new_bucket()
    assert other != bucket
    assert fs.ls(other) == []


def test_s3_storage_options_shape_and_auth(s3_server):
    so = s3_server.storage_options
    assert set(so) == {"key", "secret", "client_kwargs"}
    assert so["client_kwargs"] == {"endpoint_url": s3_server.endpoint_url}
    assert s3_server.endpoint_url.startswith("http://127.0.0.1:")
    # auth is really on: a wrong secret is refused
    import s3fs

    bucket = s3_server.new_bucket()
    s3_server.fs().pipe(f"{bucket}/x", b"1")
    bad = s3fs.S3FileSystem(
        key=so["key"], secret="wrong", client_kwargs=so["client_kwargs"], skip_instance_cache=True
    )
    with pytest.raises(PermissionError):
        bad.cat(f"{bucket}/x")


def test_zarr_array_through_fsspec_url(s3_server, s3_bucket):
    zarr = pytest.importorskip("zarr")
    url = f"s3://{s3_bucket}/arr.zarr"
    a = zarr.open_array(url, mode="w", shape=(50, 7), chunks=(16, 7), dtype="f8",
                        storage_options=s3_server.storage_options)
    data = np.arange(350, dtype="f8").reshape(50, 7)
    a[:] = data
    b = zarr.open_array(url, mode="r", storage_options=s3_server.storage_options)
    np.testing.assert_array_equal(b[:], data)


def test_s3_restart_keeps_data_and_port(private_s3_server):
    srv = private_s3_server
    endpoint = srv.endpoint_url
    bucket = srv.new_bucket()
    srv.fs().pipe(f"{bucket}/before-kill", b"a" * 1000)

    # hard crash, down for a moment, back on the same port and data dir
    srv.stop(kill=True)
    assert not srv.is_running()
    import s3fs

    down = s3fs.S3FileSystem(**srv.storage_options, skip_instance_cache=True,
                             config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})
    with pytest.raises(Exception):
        down.cat(f"{bucket}/before-kill")
    srv.restart(downtime=1.0)
    assert srv.endpoint_url == endpoint
    fs = srv.fs()
    assert fs.cat(f"{bucket}/before-kill") == b"a" * 1000
    fs.pipe(f"{bucket}/before-stop", b"b")

    # graceful stop + restart
    srv.restart()
    fs = srv.fs()
    assert fs.cat(f"{bucket}/before-kill") == b"a" * 1000
    assert fs.cat(f"{bucket}/before-stop") == b"b"


def test_parallel_servers_do_not_collide(s3_server, private_s3_server):
    assert s3_server.endpoint_url != private_s3_server.endpoint_url
    assert not set(s3_server.ports.values()) & set(private_s3_server.ports.values())
    b = private_s3_server.new_bucket()
    private_s3_server.fs().pipe(f"{b}/k", b"v")
    assert not s3_server.fs().exists(f"{b}/k")


def test_dask_cluster_computes_on_two_workers(dask_cluster, dask_client):
    client = dask_client
    assert dask_cluster.address.startswith("tcp://127.0.0.1:")
    assert all(p is not None for p in dask_cluster.worker_pids)
    info = client.scheduler_info(n_workers=-1)["workers"]
    assert len(info) == 2
    assert all(w["nthreads"] == 1 for w in info.values())

    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2
    assert os.getpid() not in pids.values()

    # a trivial graph really spread over both workers
    futs = [client.submit(lambda i: os.getpid(), i, workers=[addr], pure=False) for i, addr in enumerate(sorted(info))]
    assert set(client.gather(futs)) == set(pids.values())

    import dask.array as da

    x = da.arange(10_000, chunks=1000)
    assert int(client.compute(x.sum()).result()) == sum(range(10_000))

    # workers import from the repository checkout and have the scientific stack
    paths = client.run(lambda: list(__import__("sys").path))
    assert all(str(REPO_ROOT) in p for p in paths.values())
    versions = client.run(lambda: __import__("zarr_vectors").__version__)
    assert len(set(versions.values())) == 1


def test_kill_worker_leaves_one(private_dask_cluster):
    cluster = private_dask_cluster
    pids = cluster.worker_pids
    assert len(pids) == 2 and all(pids)
    cluster.kill_worker(0)
    assert cluster.worker_pids[0] is None
    with pytest.raises(ProcessLookupError):
        os.kill(pids[0], 0)
    cluster.wait_for_worker_count(1, timeout=30)
    with cluster.client() as client:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 1
        assert client.submit(sum, [1, 2, 3]).result() == 6
    # a replacement worker can join
    cluster.add_worker()
    cluster.wait_for_worker_count(2, timeout=60)


def test_helpers_use_this_interpreters_tools():
    from servers import dask_executable, weed_binary

    assert os.path.dirname(dask_executable()) == os.path.dirname(sys.executable) or os.path.isfile(dask_executable())
    assert os.path.isfile(weed_binary())
