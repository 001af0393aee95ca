"""Source distributions of peer packages, for running their own tests here.

pip downloads each sdist once into a cache outside the repository
(``$ZVDASK_PEER_CACHE``, else ``~/.cache/zarr-vectors-dask/peer-suite``); only
its ``tests/`` tree is extracted, so the sdist's package source never shadows
the installed package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest


def cache_dir() -> Path:
    base = os.environ.get("ZVDASK_PEER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
        "zarr-vectors-dask", "peer-suite")
    return Path(base)


def fetch_sdist(dist: str, version: str) -> Path:
    """``dist``'s sdist at ``version``, downloaded by pip into the cache.  A
    failure fails the test: without the sdist the claim it checks is untested."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"{dist.replace('-', '_')}-{version}.tar.gz"
    if sdist.exists():
        return sdist
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           f"{dist}=={version}", "-d", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not sdist.exists():
        pytest.fail(f"could not fetch the {dist} {version} sdist with pip ({' '.join(cmd)}; "
                    f"exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return sdist


def extract_tests(sdist: Path, dest: Path) -> None:
    """Only the sdist's ``tests/`` tree, as ``dest/tests``."""
    prefix = sdist.name[:-len(".tar.gz")] + "/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix + "tests/") and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(prefix):]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **safe)
