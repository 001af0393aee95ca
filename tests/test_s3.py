"""Pyramids built straight on S3 (a real SeaweedFS server): equivalent to
the reference built locally, nothing staged on local disk, credentials
never printed, permanent failures fail fast, outages are ridden out."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

import zarr_vectors_dask as zd
from equivalence import assert_equivalent, assert_sharded_matches, compare_raw_files
from servers import subprocess_env
from stores import make_streamlines
from zarr_vectors_dask.storage.store import Store, StoreAccessError, is_transient

pytestmark = pytest.mark.integration

# NOTE: functions sent to scheduler/workers must be lambdas or builtins:
# this module is not importable there.

BUILD = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
             cross_level_storage="explicit")
CLI_BUILD = ["--factors", "2:1,2:2", "--sparsity-seed", "0", "--cross-level-depth", "-1",
             "--cross-level-storage", "explicit"]


@pytest.fixture(scope="module")
def level0(tmp_path_factory):
    """``(level0, reference)``: a streamline store with object attributes
    written by zarr-vectors, and zarr-vectors' own pyramid of a copy."""
    d = tmp_path_factory.mktemp("s3-level0")
    base, ref = d / "level0.zv", d / "reference.zv"
    make_streamlines(str(base), seed=21, n_objects=30, chunk_shape=50.0)
    shutil.copytree(base, ref)
    summary = reference_build_pyramid(str(ref), **BUILD)
    return base, ref, summary


def _upload(srv, base) -> tuple[str, str, dict[str, bytes]]:
    """Put level 0 under ``x.zv`` in a fresh bucket; returns the bucket, the
    store's URL and the uploaded ``{relative key: bytes}``."""
    bucket = srv.new_bucket()
    fs = srv.fs()
    fs.put(str(base), f"{bucket}/x.zv", recursive=True)
    prefix = f"{bucket}/x.zv/"
    return bucket, srv.url(bucket, "x.zv"), {p[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix)}


def _objects(srv, bucket: str) -> dict[str, bytes]:
    fs = srv.fs()
    prefix = f"{bucket}/x.zv/"
    return {p[len(prefix):]: fs.cat_file(p) for p in fs.find(prefix)}


def _download(srv, bucket: str, dest) -> str:
    srv.fs().get(f"{bucket}/x.zv", str(dest), recursive=True)
    return str(dest)


def _assert_level0_untouched(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    for key, data in before.items():
        if not key.startswith("0/"):
            continue  # the root document gains the new levels
        assert after.get(key) == data, f"level-0 object {key} changed or vanished"
    new = sorted(k for k in after if k not in before and k.startswith("0/"))
    assert all(k.startswith("0/links/+") for k in new), new[:5]


def _assert_no_bookkeeping(srv, bucket: str) -> None:
    """No lock or resume records left, not even as an emptied directory
    (SeaweedFS keeps those, and readers would list them)."""
    fs = srv.fs()
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/x.zv", refresh=True)]
    assert sorted(names) == [".zvdask", "0", "1", "2", "zarr.json"], names
    # The sidecar holds the finished build's record (SOURCE_RECORD) and the
    # digests of the level-0 manifest rows it read, only.
    kept = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/x.zv/.zvdask", refresh=True)]
    assert sorted(kept) == ["manifest-rows", "source.json"], kept


def _secrets(srv) -> tuple[str, str]:
    return srv.storage_options["key"], srv.storage_options["secret"]


def _assert_clean(text: str, *secrets: str) -> None:
    for s in secrets:
        assert s not in text


# ---------------------------------------------------------------- API


def _assert_built_in_place(srv, bucket, before, ref, tmp_path):
    """Level 0 untouched, no build bookkeeping left, and the downloaded
    pyramid identical to the reference's; returns the local copy."""
    _assert_level0_untouched(before, _objects(srv, bucket))
    _assert_no_bookkeeping(srv, bucket)
    ours = _download(srv, bucket, tmp_path / "ours.zv")
    diff = compare_raw_files(ref, ours)
    assert diff.identical, diff.summary()
    return ours


def test_pyramid_built_on_s3_matches_reference(s3_server, level0, local_client, tmp_path,
                                               caplog):
    base, ref, expected_summary = level0
    bucket, url, before = _upload(s3_server, base)

    st = Store.from_url(url, s3_server.storage_options)
    # Every byte goes through the object store: no local root, no local zarr store.
    assert not st.is_local and st.root == f"{bucket}/x.zv"
    assert type(st.zarr_store()._store).__name__ == "FsspecStore"

    # A reader polling the store sees level 1 only once it is complete:
    # when its zarr.json first appears, every cell its arrays list exists
    # (S3 has no rename; the commit writes the level document last).
    published: dict = {}
    done = threading.Event()

    def watch():
        from zarr_vectors_dask.format import cells as fcells, naming as nm
        reader = Store.from_url(url, s3_server.storage_options)
        while not done.is_set() and "missing" not in published:
            if reader.get("1/zarr.json") is None:
                time.sleep(0.02)
                continue
            missing = []
            for name in ("vertices", "vertex_fragments"):
                info = fcells.vlen_array_info(reader, f"1/{name}")
                if info is None:
                    missing.append(f"1/{name}/zarr.json")
                    continue
                missing += [nm.cell_path(info.path, c, info.origin) for c in info.chunks
                            if reader.get(nm.cell_path(info.path, c, info.origin)) is None]
            published["missing"] = missing

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # Keys the scheduler saw from here on (its transition log is bounded;
    # clear it so what remains is this build's).
    local_client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_log.clear())
    with caplog.at_level(logging.DEBUG, logger="zarr_vectors_dask"), \
            caplog.at_level(logging.INFO):
        summary = zd.build_pyramid(url, storage_options=s3_server.storage_options,
                                   client=local_client, **BUILD)
    assert summary == expected_summary
    done.set()
    watcher.join(timeout=60)
    assert published.get("missing") == [], published

    from dask.utils import key_split
    keys = local_client.run_on_scheduler(
        lambda dask_scheduler: [str(t[0]) for t in dask_scheduler.transition_log])
    assert any(key_split(k) == "write_metavertices" for k in keys), keys[:10]
    logs = [caplog.text, repr(local_client.get_scheduler_logs()),
            repr(local_client.get_worker_logs())]
    _assert_clean("\n".join(keys + logs), *_secrets(s3_server))

    ours = _assert_built_in_place(s3_server, bucket, before, ref, tmp_path)
    assert_equivalent(ref, ours)


def test_plan_repr_and_errors_hide_credentials(s3_server, level0, local_client, monkeypatch):
    base, _, _ = level0
    bucket, url, before = _upload(s3_server, base)
    key, secret = _secrets(s3_server)

    plan = zd.plan_pyramid(url, storage_options=s3_server.storage_options, **BUILD)
    assert url in repr(plan)
    _assert_clean(repr(plan) + str(plan) + repr(Store.from_url(url, s3_server.storage_options)),
                  key, secret)

    wrong_secret = dict(s3_server.storage_options, secret="not-the-secret-3f9a")
    wrong_key = dict(s3_server.storage_options, key="no-such-key-77c1")
    # Bad credentials fail at the first answer: no retry waits (a retry
    # would sleep _backoff(attempt); recorded instead, and not slept).
    import zarr_vectors_dask.storage.store as store_module
    retries: list[int] = []
    monkeypatch.setattr(store_module, "_backoff", lambda attempt, *a, **k: retries.append(attempt)
                        or 0.0)
    for opts in (wrong_secret, wrong_key):
        with pytest.raises(StoreAccessError) as info:
            zd.build_pyramid(url, storage_options=opts, client=local_client, **BUILD)
        assert retries == [], f"bad credentials were retried {len(retries)} time(s)"
        msg = str(info.value)
        assert url in msg and "access denied" in msg, msg
        _assert_clean(msg + repr(info.value), key, secret, opts["key"], opts["secret"])

    missing = s3_server.url("no-such-bucket-zvdask", "x.zv")
    with pytest.raises(StoreAccessError, match="no such path or bucket") as info:
        zd.build_pyramid(missing, storage_options=s3_server.storage_options,
                         client=local_client, **BUILD)
    assert missing in str(info.value)
    _assert_clean(str(info.value), key, secret)

    # Nothing was written by any of the failed attempts.
    assert _objects(s3_server, bucket) == before
    assert "no-such-bucket-zvdask" not in s3_server.fs().ls("")


# ---------------------------------------------------------------- CLI


def _zvdask(*args: str, cwd, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zarr_vectors_dask.cli", *args],
                          capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=subprocess_env(env_extra or {}))


def _cli_options(srv) -> list[str]:
    so = srv.storage_options
    return ["--storage-option", f"key={so['key']}", "--storage-option", f"secret={so['secret']}",
            "--storage-option", f"client_kwargs.endpoint_url={so['client_kwargs']['endpoint_url']}"]


def _local_files(*roots) -> list[str]:
    return sorted(os.path.join(d, f) for r in roots for d, _, fs in os.walk(r) for f in fs)


def test_cli_pyramid_info_validate_on_s3(s3_server, level0, tmp_path):
    base, ref, _ = level0
    bucket, url, before = _upload(s3_server, base)
    key, secret = _secrets(s3_server)
    # The CLI (and its LocalCluster workers) run in empty directories with
    # their own TMPDIR: any staging of the store would land there.
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}

    out = _zvdask("pyramid", url, *CLI_BUILD, *_cli_options(s3_server), "--n-workers", "2",
                  cwd=cwd, env_extra=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "built 2 level(s)" in out.stdout
    _assert_clean(out.stdout + out.stderr, key, secret)
    staged = [p for p in _local_files(cwd, tmp)
              if p.endswith("zarr.json") or "x.zv" in p or "/c/" in p]
    assert not staged, staged[:5]

    _assert_built_in_place(s3_server, bucket, before, ref, tmp_path)

    info = _zvdask("info", url, *_cli_options(s3_server), cwd=cwd, env_extra=env)
    assert info.returncode == 0, info.stderr[-3000:]
    for lv in (0, 1, 2):
        assert f"level {lv}:" in info.stdout
    _assert_clean(info.stdout + info.stderr, key, secret)

    ok = _zvdask("validate", url, *_cli_options(s3_server), cwd=cwd, env_extra=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr[-3000:]
    assert f"{url}: ok" in ok.stdout
    _assert_clean(ok.stdout + ok.stderr, key, secret)

    # The validator really reads the object store: without level 1's
    # vertices document the store is invalid.
    s3_server.fs().rm(f"{bucket}/x.zv/1/vertices/zarr.json")
    bad = _zvdask("validate", url, "--level", "1", *_cli_options(s3_server), cwd=cwd,
                  env_extra=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert "INVALID" in bad.stdout
    _assert_clean(bad.stdout + bad.stderr, key, secret)

    wrong = _zvdask("pyramid", url, *CLI_BUILD, "--storage-option", f"key={key}",
                    "--storage-option", "secret=cli-wrong-secret-81d2",
                    "--storage-option",
                    f"client_kwargs.endpoint_url={s3_server.endpoint_url}", cwd=cwd,
                    env_extra=env, timeout=120)
    assert wrong.returncode == 2
    assert "dashboard" not in wrong.stdout  # refused before any cluster started
    assert url in wrong.stderr and "access denied" in wrong.stderr, wrong.stderr[-2000:]
    _assert_clean(wrong.stdout + wrong.stderr, secret, "cli-wrong-secret-81d2")


# ---------------------------------------------------------------- outage


@pytest.mark.slow  # a minute of outage and retries; transient/permanent classification runs in CI
def test_build_survives_s3_outage(private_s3_server, level0, local_client, tmp_path):
    srv = private_s3_server
    base, ref, expected_summary = level0
    bucket, url, before = _upload(srv, base)

    result: dict = {}

    def build():
        try:
            result["summary"] = zd.build_pyramid(url, storage_options=srv.storage_options,
                                                 client=local_client, **BUILD)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            result["error"] = exc

    thread = threading.Thread(target=build, daemon=True)
    thread.start()
    # Stop the server once level 1 has begun to appear: genuinely mid-build.
    watcher = srv._fs(probe=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive():
        try:
            if watcher.find(f"{bucket}/x.zv/1/"):
                break
        except Exception:  # noqa: BLE001 - not there yet
            pass
        time.sleep(0.05)
    assert thread.is_alive(), f"build ended before the outage: {result}"
    srv.restart(downtime=3)
    thread.join(timeout=300)
    assert not thread.is_alive(), "build did not finish after the outage"
    assert "error" not in result, repr(result.get("error"))
    assert result["summary"] == expected_summary

    _assert_level0_untouched(before, _objects(srv, bucket))
    ours = _download(srv, bucket, tmp_path / "ours.zv")
    diff = compare_raw_files(ref, ours)
    assert diff.identical, diff.summary()

    # Both read paths (our cells, and arrays zarr decodes) wait out an
    # outage longer than s3fs's own retries last (about 5 s here).
    import zarr
    st = Store.from_url(url, srv.storage_options)
    expected_ids = zarr.open_array(st.zarr_store(), path="0/object_index/object_ids", mode="r")[:]
    got: dict = {}
    srv.stop()
    restarter = threading.Thread(target=lambda: srv.restart(downtime=8), daemon=True)
    cells = threading.Thread(target=lambda: got.update(cell=st.get("0/zarr.json")), daemon=True)
    restarter.start()
    cells.start()
    try:
        arr = zarr.open_array(st.zarr_store(), path="0/object_index/object_ids", mode="r")
        assert (arr[:] == expected_ids).all()
    finally:
        # Let the restart finish before the fixture stops the server, or a
        # late start would outlive the test.
        restarter.join(timeout=120)
        cells.join(timeout=120)
    assert got.get("cell") == before["0/zarr.json"]


def test_connection_failures_are_transient_and_auth_failures_are_not(private_s3_server):
    srv = private_s3_server
    bucket = srv.new_bucket()
    # One attempt each inside s3fs/botocore: we only want the exceptions.
    fast = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    bad = Store.from_url(srv.url(bucket, "x.zv"),
                         {**srv.storage_options, "secret": "wrong", **fast})
    with pytest.raises(PermissionError) as denied:
        bad.fs.cat_file(bad.path("0/zarr.json"))
    assert not is_transient(denied.value)

    srv.stop()
    down = Store.from_url(srv.url(bucket, "x.zv"), {**srv.storage_options, **fast})
    # A chunk key like c/403/... (or a port containing 403) in the message
    # must not read as "403 Forbidden".
    for key in ("0/vertices/c/403/1/2", "0/zarr.json"):
        with pytest.raises(Exception) as refused:
            down.fs.cat_file(down.path(key))
        assert "EndpointConnectionError" in type(refused.value).__name__, repr(refused.value)
        assert is_transient(refused.value), repr(refused.value)


@pytest.mark.slow  # sharding on S3: sharded pyramids run locally in CI, S3 builds too
def test_sharded_pyramid_on_s3(s3_server, level0, local_client, tmp_path):
    """``shard_shape`` on S3: level 0 untouched, no scratch left, the
    pyramid reads as the reference's, every file sharding does not touch
    is the reference's byte for byte and every sharded cell too, and each
    array the build wrote is one object per shard that holds a cell --
    fewer objects than cells."""
    from test_sharded_pyramid import _assert_one_object_per_shard, _cell_objects
    base, ref, expected_summary = level0
    bucket, url, before = _upload(s3_server, base)
    summary = zd.build_pyramid(url, storage_options=s3_server.storage_options,
                               client=local_client, shard_shape=2, **BUILD)
    assert summary == expected_summary
    _assert_level0_untouched(before, _objects(s3_server, bucket))
    _assert_no_bookkeeping(s3_server, bucket)
    ours = _download(s3_server, bucket, tmp_path / "ours.zv")
    assert_equivalent(ref, ours)
    assert_sharded_matches(ref, ours)
    assert _assert_one_object_per_shard(ours, (2, 2, 2)) < _cell_objects(ref)


@pytest.mark.integration
def test_reads_are_one_request_per_object(s3_server, monkeypatch):
    """A whole-object read on S3 is one GET: no HEAD before it (s3fs's
    default, to split large objects) and no listing after a 404.  Requests
    are counted as the client sends them."""
    import collections
    import aiobotocore.client as ac
    sent = collections.Counter()
    real = ac.AioBaseClient._make_api_call

    async def counting(self, operation, params):
        sent[operation] += 1
        return await real(self, operation, params)
    monkeypatch.setattr(ac.AioBaseClient, "_make_api_call", counting)
    store = Store.from_url(s3_server.url(s3_server.new_bucket(), "s.zv"),
                           s3_server.storage_options)
    sent.clear()  # the bucket's creation
    store.put_many({f"c/{i}": b"x" * (i + 1) for i in range(100)})
    assert sent == {"PutObject": 100}
    sent.clear()
    got = store.get_many([f"c/{i}" for i in range(100)] + ["c/missing"])
    assert got["c/missing"] is None and all(got[f"c/{i}"] == b"x" * (i + 1) for i in range(100))
    assert sent == {"GetObject": 101}, sent
    sent.clear()
    assert store.get("c/7") == b"x" * 8 and store.get("nothing") is None
    assert sent == {"GetObject": 2}, sent
    # A listing is one request, found or empty (no HEAD after an empty one).
    sent.clear()
    assert sorted(store.keys_under("c"), key=int) == [str(i) for i in range(100)]
    assert store.keys_under("d") == [] and store.keys_under("c/1") == []
    assert sent == {"ListObjectsV2": 3}, sent
