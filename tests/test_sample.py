"""``zvdask sample``: level-0 sample stores, local and on S3."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from servers import REPO_ROOT, subprocess_env

from zarr_vectors_dask.cli import main
from zarr_vectors_dask.sample import sample_streamlines, write_sample


def _read_level0(url, storage_options=None):
    import zarr_vectors as zv
    from zarr_vectors.api.schema import StorageOptions

    ds = zv.open(url, storage=StorageOptions(options=storage_options or {}))
    assert ds.levels == (0,)
    return ds, ds.level(0).read()


def test_streamlines_are_what_zarr_vectors_reads_back(tmp_path):
    write_sample(str(tmp_path / "s.zv"), objects=7, vertices=300, seed=3)
    ds, res = _read_level0(str(tmp_path / "s.zv"))
    assert ds.kinds == ("streamline",)
    lines = sample_streamlines(7, 300, seed=3)
    assert [len(x) for x in lines] == [43] * 6 + [42]
    assert res.part_count == 7 and list(res.part_objects) == list(range(7))
    for part, line in zip(res.parts, lines):
        np.testing.assert_array_equal(res.positions[part], line)
    assert ds.level(0).objects.count == 7


def test_points_kind_has_every_object(tmp_path):
    write_sample(str(tmp_path / "p.zv"), kind="points", objects=9, vertices=500, seed=1)
    ds, res = _read_level0(str(tmp_path / "p.zv"))
    assert ds.kinds == ("point_cloud",)
    assert res.vertex_count == 500
    assert ds.level(0).objects.count == 9


def test_cli_refuses_an_existing_store_unless_overwrite(tmp_path, capsys):
    path = str(tmp_path / "x.zv")
    assert main(["sample", path, "--objects", "3", "--vertices", "30"]) == 0
    assert main(["sample", path, "--objects", "4", "--vertices", "40"]) == 2
    err = capsys.readouterr().err
    assert path in err and "--overwrite" in err
    assert _read_level0(path)[1].part_count == 3  # untouched
    assert main(["sample", path, "--objects", "4", "--vertices", "40", "--overwrite"]) == 0
    assert _read_level0(path)[1].part_count == 4


@pytest.mark.parametrize("argv, word", [
    (["--kind", "mesh"], "invalid choice"),
    (["--objects", "5", "--vertices", "4"], "vertices >= objects"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, word):
    try:
        rc = main(["sample", str(tmp_path / "y.zv"), *argv])
    except SystemExit as e:  # argparse
        rc = e.code
    assert rc == 2
    assert word in capsys.readouterr().err
    assert not (tmp_path / "y.zv").exists()


def test_module_cli_writes_to_s3(s3_server, tmp_path):
    bucket = s3_server.new_bucket("sample")
    url = f"s3://{bucket}/demo.zv"
    so = s3_server.storage_options
    opts = ["--storage-option", f"key={so['key']}", "--storage-option", f"secret={so['secret']}",
            "--storage-option", f"client_kwargs.endpoint_url={s3_server.endpoint_url}"]
    cmd = [sys.executable, "-m", "zarr_vectors_dask", "sample", url, "--objects", "5",
           "--vertices", "250", "--seed", "2", *opts]
    r = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert url in r.stdout

    # the same bytes zarr-vectors writes locally, read back through S3
    write_sample(str(tmp_path / "local.zv"), objects=5, vertices=250, seed=2)
    _, local = _read_level0(str(tmp_path / "local.zv"))
    _, remote = _read_level0(url, so)
    np.testing.assert_array_equal(remote.positions, local.positions)
    assert list(remote.part_objects) == list(local.part_objects)

    # a second run without --overwrite names the URL and keeps the secret out
    r = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert url in r.stderr and "--overwrite" in r.stderr
    assert so["secret"] not in r.stderr + r.stdout
    assert (REPO_ROOT / "zarr_vectors_dask" / "__main__.py").is_file()
