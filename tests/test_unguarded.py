"""Issue 24 part 1: code without an ``if __name__ == "__main__":`` guard
builds on the default cluster, as it runs under zarr-vectors.

A plain script (and ``python -c``) writes a store with zarr-vectors'
writers and builds its pyramid at module level with no client, through
the patched zarr-vectors entry point and through ours.  Each ends with the
pyramid ``zarr_vectors.build_pyramid`` writes on a twin store, and the
script body ran once (worker processes never import the caller's main)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

from equivalence import assert_same_pyramid
from servers import subprocess_env
from stores import make_streamlines

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parent
STORE = dict(seed=7, n_objects=40, chunk_shape=40.0)
FACTORS = [(2, 1), (2, 2)]

# The body every caller runs: a side effect to count, the store written by
# zarr-vectors' own writers, then the build -- no guard, no client.
BODY = """\
import sys
sys.path.insert(0, {tests!r})
with open({counter!r}, "a") as fh:
    fh.write("ran\\n")
from stores import make_streamlines
make_streamlines({store!r}, **{kw!r})
{build}
print("levels", summary["levels_created"])
"""

PATCHED = """\
import zarr_vectors_dask
zarr_vectors_dask.patch_zarr_vectors()
from zarr_vectors.multiresolution.coarsen import build_pyramid
summary = build_pyramid({store!r}, factors={factors!r}, sparsity_seed=0)"""

NATIVE = """\
import zarr_vectors_dask as zd
summary = zd.build_pyramid({store!r}, factors={factors!r}, sparsity_seed=0)"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("unguarded") / "ref.zv")
    make_streamlines(path, **STORE)
    reference_build_pyramid(path, factors=FACTORS, sparsity_seed=0)
    return path


def _body(tmp_path, build: str) -> tuple[str, str, str]:
    store, counter = str(tmp_path / "ours.zv"), str(tmp_path / "ran.txt")
    code = BODY.format(tests=str(TESTS), counter=counter, store=store, kw=STORE,
                       build=build.format(store=store, factors=FACTORS))
    return code, store, counter


def _check(r: subprocess.CompletedProcess, reference: str, store: str, counter: str) -> None:
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "levels 2" in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    with open(counter) as fh:
        assert fh.read().count("ran") == 1, "the caller's code ran more than once"
    # Level 0 was written under another directory name (the root records it).
    assert_same_pyramid(reference, store, other_store_name=True)


@pytest.mark.parametrize("build", [PATCHED, NATIVE], ids=["patched", "native"])
def test_unguarded_script(reference, tmp_path, build):
    code, store, counter = _body(tmp_path, build)
    script = tmp_path / "script.py"
    script.write_text(code)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300, env=subprocess_env(), cwd=str(tmp_path))
    _check(r, reference, store, counter)


def test_python_dash_c(reference, tmp_path):
    code, store, counter = _body(tmp_path, PATCHED)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=subprocess_env(), cwd=str(tmp_path))
    _check(r, reference, store, counter)



def test_no_worker_processes_falls_back_to_threads_in_one_line(monkeypatch, caplog):
    """Where SubprocessCluster cannot start (Windows), the build runs on
    threads here and says so in one log line, not a traceback."""
    import os

    from zarr_vectors_dask import cluster

    def refuse(scratch):
        raise RuntimeError("SubprocessCluster does not support Windows.")
    monkeypatch.setattr(cluster, "_subprocess_cluster", refuse)
    with caplog.at_level("WARNING", logger=cluster.__name__):
        with cluster.default_client() as client:
            assert set(client.run(os.getpid).values()) == {os.getpid()}
    said = [r for r in caplog.records if r.name == cluster.__name__]
    assert len(said) == 1 and "\n" not in said[0].getMessage(), said
    assert "building on threads in this process" in said[0].getMessage()
    assert said[0].exc_info is None
