"""zarr-vectors-tools (``zvtools``) beside this project.

* zvtools' own pyramid tests, from its sdist (fetched by pip into the cache
  ``tests/test_peer_suite.py`` uses), run twice in a pytest subprocess:
  plain, and with ``zarr_vectors_dask.patch_zarr_vectors()`` applied before
  collection.  Every test must have the same outcome both times, none may
  fail, and not one call may reach this project's ``build_pyramid`` /
  ``coarsen_level`` (a tripwire counts them).
* zvtools' pyramids built on twin stores with and without the patch are
  identical byte for byte, file by file.
* What the README promises a zvtools user: ``zvdask``'s pyramid of a store
  zvtools ingested (a TRK, an SWC) is zarr-vectors' ``build_pyramid`` of it,
  with level 0 -- segment ids, attributes, headers -- untouched.

zvtools is in the ``test`` extra, so under ``CI=true`` its absence fails
rather than skips.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest

from conftest import INLINE_ENV
from equivalence import assert_same_pyramid
from stores import make_meshes, make_points_with_ids
from sdists import extract_tests, fetch_sdist
import zvtools_inputs as zi

pytestmark = pytest.mark.integration

DIST = "zarr-vectors-tools"
#: zvtools' pyramid tests, a few per path (each a few seconds) so both runs
#: stay short: its per_object, polyline (RDP), skeleton
#: and mesh coarseners, ``zvtools pyramid``'s cross-level flags, a TRK
#: ingest then pyramid, and its ``rebuild_pyramid_from_level``.
TESTS = [
    "tests/test_per_object_pyramid.py::test_pure_sparsify",
    "tests/test_per_object_pyramid.py::test_object_attribute_present_mask_roundtrip",
    "tests/test_polyline_coarsen_chunk_local.py::test_sparsity_drops_objects_and_preserves_oid_slots",
    "tests/test_streamline_ingest_pyramid.py::test_trk_ingest_produces_a_coarsenable_store",
    "tests/test_skeleton_coarsen.py::test_coarsen_level_routes_to_skeleton",
    "tests/test_skeleton_coarsen.py::test_coarse_segment_id_is_flywire_not_oid",
    "tests/test_mesh_coarsen.py::test_m1_mesh_store_dispatches_to_the_mesh_coarsener",
    "tests/test_mesh_coarsen.py::test_m2_m3_faces_survive_and_all_are_considered",
    "tests/test_cli_cross_level_flags.py::test_none_skips_the_cross_level_links",
    "tests/test_edit_pyramid_refresh.py::TestRefreshFunction",
]


PLUGIN = '''
"""Loaded with -p before collection: the patch is in place before any test
module imports zarr-vectors, and every call into this project is logged."""
import os

import zarr_vectors_dask
import zarr_vectors_dask.api as api
import zarr_vectors_dask.rerun as rerun

_LOG = os.environ["ZVDASK_TRIPWIRE"]


def _tripwire(name, fn):
    def wrapped(*args, **kwargs):
        with open(_LOG, "a") as f:
            f.write(name + "\\n")
        return fn(*args, **kwargs)
    return wrapped


# The patch installs whatever rerun (zarr-vectors' build_pyramid, re-runs
# included) and api hold, so the wrappers are what zarr-vectors' names
# point to from here on.
rerun.build_pyramid = _tripwire("build_pyramid", rerun.build_pyramid)
api.coarsen_level = _tripwire("coarsen_level", api.coarsen_level)
zarr_vectors_dask.patch_zarr_vectors()


def pytest_sessionstart(session):
    import zarr_vectors.multiresolution.coarsen as coarsen
    assert coarsen.build_pyramid is rerun.build_pyramid
    assert coarsen.coarsen_level is api.coarsen_level
'''


def _require_zvtools() -> str:
    """zvtools' version; missing, a skip locally and a failure in CI."""
    try:
        import zarr_vectors_tools  # noqa: F401
        return metadata.version(DIST)
    except ImportError as exc:
        why = f"{DIST} is not installed ({exc}); pip install -e '.[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)


def _require_nibabel() -> None:
    """nibabel (zvtools' ``trk`` extra) writes and reads the TRK."""
    try:
        import nibabel  # noqa: F401
    except ImportError as exc:
        why = f"nibabel is not installed ({exc}); pip install -e '.[test]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why)
        pytest.skip(why)


def _outcomes(report: Path) -> dict[str, str]:
    """``{classname::name: passed|failed|error|skipped}`` from a junit report."""
    out = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        out[f"{case.get('classname')}::{case.get('name')}"] = kinds[0] if kinds else "passed"
    return out


def _start_suite(work: Path, tag: str, plugin: bool) -> subprocess.Popen:
    """zvtools' tests in a child pytest (its own temp folder, so the plain
    and patched runs can go side by side)."""
    report, tripwire = work / f"{tag}.xml", work / f"{tag}.calls"
    tripwire.write_text("")
    env = {k: v for k, v in os.environ.items() if k != INLINE_ENV}  # the default executor
    env = {**env, "ZVDASK_TRIPWIRE": str(tripwire), "PYTHONPATH": os.pathsep.join(
        [str(work), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "pytest", *(["-p", "zvdask_zvt_plugin"] if plugin else []),
           "-p", "no:cacheprovider", "-q", "--no-header", "-rfE", "-m", "not slow",
           f"--junitxml={report}", "--rootdir", str(work), "-c", str(work / "pytest.ini"),
           f"--basetemp={work / (tag + '-tmp')}", *TESTS]
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _suite_result(work: Path, tag: str, proc: subprocess.Popen
                  ) -> tuple[dict[str, str], list[str], str]:
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    tail = out[-6000:] + err[-3000:]
    report = work / f"{tag}.xml"
    assert report.exists(), f"{tag}: pytest did not run ({proc.returncode}):\n{tail}"
    return _outcomes(report), (work / f"{tag}.calls").read_text().split(), tail


def test_zvtools_pyramid_tests_pass_patched_as_unpatched(tmp_path):
    version = _require_zvtools()
    sdist = fetch_sdist(DIST, version)
    work = tmp_path / "zvt"
    work.mkdir()
    extract_tests(sdist, work)
    missing = [t for t in TESTS if not (work / t.split("::")[0]).exists()]
    assert not missing, f"{sdist.name} lacks {missing}"
    (work / "zvdask_zvt_plugin.py").write_text(PLUGIN)
    # zvtools' own pytest settings (its pyproject is not extracted).
    (work / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    slow: zvtools' slow tier\nfilterwarnings =\n"
        "    ignore::zarr.errors.UnstableSpecificationWarning\n    ignore::DeprecationWarning\n")

    # Side by side: each run is serial, and this file is one xdist worker's.
    runs = {tag: _start_suite(work, tag, plugin) for tag, plugin in (("plain", False),
                                                                      ("patched", True))}
    try:
        plain, plain_calls, plain_tail = _suite_result(work, "plain", runs["plain"])
        patched, calls, tail = _suite_result(work, "patched", runs["patched"])
    finally:
        for proc in runs.values():  # a failed check leaves no child running
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert len(plain) >= len(TESTS), f"only {len(plain)} zvtools test(s) ran:\n{plain_tail}"
    broken = {t: o for t, o in plain.items() if o in ("failure", "error")}
    assert not broken, f"zvtools' own tests fail without the patch: {broken}\n{plain_tail}"
    changed = {t: (plain.get(t), patched.get(t)) for t in plain.keys() | patched.keys()
               if plain.get(t) != patched.get(t)}
    assert not changed, f"outcomes changed by patch_zarr_vectors(): {changed}\n{tail}"
    assert not calls, f"zvtools reached zarr_vectors_dask: {calls[:10]}"
    assert not plain_calls  # the tripwire is not installed without the plugin


# ------------------------------------------------------------ zvtools output
def _build_twice(tmp_path, write, build):
    """``build(path)`` on two copies of one level-0 store, unpatched and
    patched; the two trees."""
    import zarr_vectors_dask

    base = tmp_path / "level0.zv"
    write(base)
    plain, patched = tmp_path / "plain.zv", tmp_path / "patched.zv"
    shutil.copytree(base, plain)
    shutil.copytree(base, patched)
    build(plain)
    undo = zarr_vectors_dask.patch_zarr_vectors()
    try:
        build(patched)
    finally:
        undo()
    return plain, patched


def _assert_same_bytes(a: Path, b: Path) -> int:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b, (f"only unpatched: {sorted(set(files_a) - set(files_b))[:5]}; "
                                f"only patched: {sorted(set(files_b) - set(files_a))[:5]}")
    differ = [str(p) for p in files_a if (a / p).read_bytes() != (b / p).read_bytes()]
    assert not differ, f"{len(differ)} file(s) differ, e.g. {differ[:5]}"
    return len(files_a)


FACTORS = [(2.0, 1.0), (2.0, 2.0)]


def _zvt_build(**kw):
    def build(path):
        from zarr_vectors_tools.multiresolution.coarsen import build_pyramid
        build_pyramid(str(path), factors=FACTORS, sparsity_seed=0, cross_level_depth=-1,
                      cross_level_storage="explicit", **kw)
    return build


@pytest.mark.parametrize("case", ["per_object", "mesh", "polyline", "zv_method_polyline"])
def test_patch_changes_no_zvtools_output(tmp_path, case):
    """Each zvtools coarsener (and zarr-vectors' ``build_pyramid(method=
    "polyline")``, which the project hands to zvtools' registered strategy)
    writes the same bytes with the patch as without it."""
    _require_zvtools()
    if case == "per_object":
        write, build = (lambda p: make_points_with_ids(str(p), n_objects=8, n_points=200)), \
            _zvt_build()
    elif case == "mesh":
        write, build = (lambda p: make_meshes(str(p), n_objects=2)), _zvt_build()
    else:
        _require_nibabel()
        trk = zi.write_trk(tmp_path / "t.trk")
        write = lambda p: zi.ingest_trk(trk, p)  # noqa: E731
        if case == "polyline":
            build = _zvt_build()
        else:
            import zarr_vectors.multiresolution.coarsen as zv_coarsen

            def build(path):
                # Looked up at call time: the patched name when patched.
                zv_coarsen.build_pyramid(str(path), factors=FACTORS, sparsity_seed=0,
                                         method="polyline")
    plain, patched = _build_twice(tmp_path, write, build)
    assert (plain / "2").is_dir(), "the build wrote no level 2"
    _assert_same_bytes(plain, patched)


# ------------------------------------------------------------ zvdask on zvtools stores
def _ingested(tmp_path, kind):
    if kind == "trk":
        _require_nibabel()
        return zi.ingest_trk(zi.write_trk(tmp_path / "t.trk"), tmp_path / "in.zv")
    return zi.ingest_swc(zi.write_swc(tmp_path / "n.swc"), tmp_path / "in.zv")


def _tree_bytes(root: Path, sub: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in (root / sub).rglob("*") if p.is_file() and "/links/" not in f"/{p.relative_to(root)}"}


@pytest.mark.parametrize("kind", ["trk", "swc"])
def test_zvdask_pyramid_of_a_zvtools_store_is_zarr_vectors(tmp_path, local_client, kind):
    """``zvdask``'s pyramid of a store zvtools ingested equals zarr-vectors'
    ``build_pyramid`` on a copy, and level 0 keeps what zvtools wrote:
    segment ids, object and vertex attributes, headers."""
    _require_zvtools()
    import zarr_vectors.multiresolution.coarsen as zv_coarsen
    import zarr_vectors_dask as zd

    src = _ingested(tmp_path, kind)
    ref, ours = tmp_path / "ref.zv", tmp_path / "ours.zv"
    shutil.copytree(src, ref)
    shutil.copytree(src, ours)
    kw = dict(factors=[(2.0, 1.0), (2.0, 2.0)], sparsity_seed=0, cross_level_depth=-1,
              cross_level_storage="explicit")
    zv_coarsen.build_pyramid(str(ref), **kw)
    zd.build_pyramid(str(ours), client=local_client, **kw)
    assert_same_pyramid(ref, ours)
    kept = ("0/fragment_attributes", "0/object_attributes") if kind == "trk" else \
        ("0/vertex_attributes",)
    for sub in (*kept, f"headers/{kind}"):
        before, after = _tree_bytes(src, sub), _tree_bytes(ours, sub)
        assert before and before == after, f"{sub} changed or missing"
