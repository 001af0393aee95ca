"""Currency and refresh: a pyramid built by the project knows its level 0;
after edits by zarr-vectors' own EditSession (atomic and not) or a plain
zarr write, its status says stale naming the arrays, resume refuses, and
``refresh_pyramid`` leaves every file byte-identical to
``build_pyramid(..., overwrite=True)`` on a copy of the edited store.
An unchanged source is refreshed by rewriting nothing; a refresh killed
mid-way and run again ends equal too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import zarr
from zarr_vectors.core.store import open_store
from zarr_vectors.ops.edit import EditSession
from zarr_vectors.ops.refs import VertexRef

import zarr_vectors_dask as zd
from equivalence import compare_raw_files
from servers import subprocess_env
from stores import make_streamlines
from zarr_vectors_dask import fingerprint as fpm
from zarr_vectors_dask.cli import main
from zarr_vectors_dask.currency import REFRESH_ATTR, SOURCE_RECORD, StaleSourceError
from zarr_vectors_dask.resume import REWRITE_LOG
from zarr_vectors_dask.storage.store import Store

KW = dict(factors=[(2, 1), (2, 2)], sparsity_seed=0, cross_level_depth=-1,
          cross_level_storage="explicit")


def _sidecar(rel: str) -> bool:
    return rel.split(os.sep)[0] == ".zvdask"


def _mtimes(root) -> dict[str, int]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = os.stat(p).st_mtime_ns
    return out


def _root_attrs(path) -> dict:
    with open(os.path.join(path, "zarr.json")) as fh:
        return json.load(fh)["attributes"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, local_client):
    """A level-0 store and its pyramid built by the project (copied per test)."""
    d = tmp_path_factory.mktemp("refresh")
    path = d / "built.zv"
    make_streamlines(str(path), seed=5, n_objects=40)
    zd.build_pyramid(str(path), client=local_client, **KW)
    return path


@pytest.fixture(scope="module")
def full_rebuild(built, tmp_path_factory, local_client):
    """``full_rebuild(edit, atomic)``: ``built`` edited so (``_edit``, several
    joined by ``+``) and rebuilt whole -- what every refresh of that edit
    must equal; made once per module, as the edits are deterministic."""
    made = {}

    def get(edit: str, atomic: bool):
        if (edit, atomic) not in made:
            path = tmp_path_factory.mktemp("full") / "full.zv"
            shutil.copytree(built, path)
            for one in edit.split("+"):
                _edit(path, one, atomic)
            zd.build_pyramid(str(path), client=local_client, overwrite=True, **KW)
            made[edit, atomic] = path
        return made[edit, atomic]
    return get


@pytest.fixture
def store(built, tmp_path):
    path = tmp_path / "s.zv"
    shutil.copytree(built, path)
    return path


def _open(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: ".zvdask is not a Zarr component"
        return open_store(str(path), mode="r+")


def _edit(path, kind: str, atomic: bool) -> None:
    root = _open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "zarr_write":  # a hand-written zarr write of one cell
            arr = zarr.open_array(str(path / "0" / "object_attributes" / "weight"), mode="r+")
            arr[0] = arr[0] + 1.5
            return
        with EditSession(root, atomic=atomic) as ed:
            if kind == "edit_vertex":
                ref = VertexRef.from_object(root, level=0, object_id=3, vertex_index=2)
                ed.edit_vertex(ref, new_pos=np.array([20.0, 30.0, 40.0]) + ref.local)
            elif kind == "add_object":
                ed.add_object(level=0, vertices=np.array([[10.0, 10.0, 10.0],
                                                          [12.0, 11.0, 10.5]]))
            elif kind == "remove_object":
                ed.remove_object(7)
            else:
                raise AssertionError(kind)


#: The arrays each edit must be reported in (others may come with them).
EDITS = [("edit_vertex", False, {"vertices"}),
         ("edit_vertex", True, {"vertices", "object_index/manifests"}),
         ("add_object", True, {"vertices", "object_index/manifests"}),
         ("remove_object", False, {"object_index/manifests"}),
         ("zarr_write", False, {"object_attributes/weight"})]


@pytest.mark.parametrize("kind,atomic,arrays", EDITS,
                         ids=[f"{k}-{'atomic' if a else 'inplace'}" for k, a, _ in EDITS])
def test_edit_makes_stale_then_refresh_equals_full_rebuild(store, tmp_path, local_client,
                                                           kind, atomic, arrays):
    assert zd.pyramid_status(str(store)).state == "current"
    _edit(store, kind, atomic)
    st = zd.pyramid_status(str(store))
    assert st.state == "stale", st
    assert arrays <= set(st.diff.by_array()), st.diff.by_array()
    assert not any(a.startswith("links/+") or a.startswith("links/-") for a in st.diff.by_array())

    with pytest.raises(StaleSourceError) as info:
        zd.build_pyramid(str(store), client=local_client, resume=True, **KW)
    msg = str(info.value)
    assert "level 0 changed since the pyramid was built" in msg and "zvdask refresh" in msg
    for a in arrays:
        assert a in msg, msg
    from zarr_vectors.exceptions import CoarseningError
    assert isinstance(info.value, CoarseningError)

    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)

    dry = zd.refresh_pyramid(str(store), dry_run=True)
    assert not dry.refreshed and [lv for lv, _, f in dry.levels] == [1, 2]
    assert dry.dirty_chunks
    if kind == "zarr_write":  # object attributes only: their dirty buckets, not whole levels
        assert dry.region.kind == "attributes" and dry.region.buckets == (("weight", (0,)),)
        assert all(0 < f < 0.05 for _, _, f in dry.levels), dry.levels
    elif not atomic:  # in place, no row added: the chunks the change reaches
        assert dry.region.kind == "chunks" and all(0 < f < 1 for _, _, f in dry.levels)
        assert "level 1: would recompute" in str(dry) and "of its source chunks" in str(dry)
    else:  # rows appended: level 1 (which drops nothing) by chunks, level 2 drawn anew
        assert dry.region.kind == "chunks", dry.region
        (f1, f2) = [f for _, _, f in dry.levels]
        assert 0 < f1 < 1 and f2 == 1.0, dry.levels
        assert "level 2: would recompute the whole level (rows were added" in str(dry), str(dry)
    assert zd.pyramid_status(str(store)).state == "stale"  # the dry run wrote nothing

    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.refreshed
    if dry.region.kind == "chunks":  # and it did not fall back to whole levels
        assert report.summary["region"] == "chunks", report.summary
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert REFRESH_ATTR not in _root_attrs(store)
    assert zd.pyramid_status(str(store)).state == "current"


def _rewritten(before: dict, after: dict) -> set[str]:
    """Files written (mtime moved), added or removed, outside the sidecar."""
    keys = {*before, *after} - {k for k in {*before, *after} if _sidecar(k)}
    return {k for k in keys if before.get(k) != after.get(k)}


@pytest.mark.parametrize("atomic", [False, True], ids=["inplace", "atomic"])
def test_attribute_edit_rewrites_only_the_dirty_attribute_buckets(store, tmp_path, local_client,
                                                                  atomic):
    """EditSession.edit_attribute on two objects: the refresh reruns the
    attribute stage on the buckets holding them, at every coarse level,
    and ends byte-identical to a full rebuild; no other coarse file (and
    nothing of level 0) is written, and the edited values do reach the
    coarse levels (level 1 keeps every object)."""
    from zarr_vectors.ops.refs import AttributeRef, ObjectRef
    old1 = zarr.open_array(str(store / "1" / "object_attributes" / "weight"), mode="r")[:]
    root = _open(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with EditSession(root, atomic=atomic) as ed:
            for oid, value in ((4, 123.25), (31, -7.5)):
                ed.edit_attribute(AttributeRef("object", "weight", ObjectRef(0, oid)), value)
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    before = _mtimes(store)
    time.sleep(0.01)  # mtimes of rewritten files move past ``before``
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.refreshed and report.region.kind == "attributes", report
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    written = _rewritten(before, _mtimes(store))
    allowed = {"zarr.json"}  # the refresh mark, added then removed: same bytes at the end
    cells = {k for k in written if k not in allowed}
    assert cells and all(k.split(os.sep)[0] in ("1", "2") and
                         os.sep.join(k.split(os.sep)[1:3]) == os.path.join("object_attributes",
                                                                           "weight")
                         for k in cells), sorted(written)
    new1 = zarr.open_array(str(store / "1" / "object_attributes" / "weight"), mode="r")[:]
    assert not np.array_equal(old1, new1)
    assert zd.pyramid_status(str(store)).state == "current"


def test_attribute_refresh_after_rows_were_appended_draws_survivors_from_the_manifests(
        store, tmp_path, local_client):
    """Atomic edits append manifest rows but no object-attribute row, so
    the two row counts differ; an attribute-only refresh after that must
    draw level 2's survivors from the manifest rows, as the build does."""
    _edit(store, "add_object", True)
    _edit(store, "edit_vertex", True)
    zd.refresh_pyramid(str(store), client=local_client)
    weight = zarr.open_array(str(store / "0" / "object_attributes" / "weight"), mode="r")
    rows = zarr.open_array(str(store / "0" / "object_index" / "manifests"), mode="r")
    assert rows.shape[0] > weight.shape[0]
    _edit(store, "zarr_write", False)
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.region.kind == "attributes", report
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


def test_ids_swapped_with_a_geometry_edit_recompute_whole_levels(store, tmp_path,
                                                                  local_client):
    """Two objects that swap ids (a plain zarr write of the id table) with
    an in-place geometry edit: the coarse rows (in id order) move, so the
    refresh recomputes whole levels, says why, and equals a full rebuild."""
    _edit(store, "edit_vertex", False)
    ids = zarr.open_array(str(store / "0" / "object_index" / "object_ids"), mode="r+")
    both = ids[:2]
    ids[:2] = both[::-1]
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.region.kind == "whole" and "changed its id" in report.region.reason, report
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


@pytest.fixture(scope="module")
def built_graph(tmp_path_factory, local_client):
    from stores import make_graphs
    path = tmp_path_factory.mktemp("refresh-graph") / "g.zv"
    make_graphs(str(path), seed=1)
    zd.build_pyramid(str(path), client=local_client, **KW)
    return path


def _remove_one_link(path) -> None:
    """EditSession.remove_link on the first intra-chunk link record."""
    from zarr_vectors.ops.refs import LinkRef
    cells = sorted((path / "0" / "links" / "0" / "0.0.0" / "c").glob("*/*/*"))
    root = _open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with EditSession(root, atomic=False) as ed:
            cc = tuple(int(x) for x in cells[0].relative_to(cells[0].parents[2]).parts)
            ed.remove_link(LinkRef(level=0, chunk=cc, fragment=0, row=0, delta=0, offsets=None))


def test_intra_level_link_edit_rewrites_no_coarse_file(built_graph, tmp_path, local_client):
    """No coarsening step reads level 0's own links: after remove_link the
    refresh writes nothing but its record, and the pyramid equals a full
    rebuild (which zarr-vectors' own rebuild also leaves unchanged above
    level 0)."""
    store = tmp_path / "g.zv"
    shutil.copytree(built_graph, store)
    _remove_one_link(store)
    st = zd.pyramid_status(str(store))
    assert st.state == "stale" and all(a.startswith(("links/0", "link_")) for a in
                                       st.diff.by_array()), st.diff.by_array()
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    before = _mtimes(store)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.refreshed and report.region.kind == "links" and not report.levels
    assert _rewritten(before, _mtimes(store)) == set()
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(str(store)).state == "current"


def test_unchanged_source_refresh_rewrites_nothing(store, local_client):
    before = _mtimes(store)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert not report.refreshed and report.status.current and not report.levels
    assert _mtimes(store) == before
    zd.build_pyramid(str(store), client=local_client, resume=True, **KW)  # finished, current
    assert _mtimes(store) == before


@pytest.mark.parametrize("first,second", [("edit_vertex", "zarr_write"),
                                           ("zarr_write", "edit_vertex")],
                         ids=["chunks-then-attribute", "attribute-then-chunks"])
def test_an_edit_landing_after_the_refresh_listed_level_0_stays_stale(
        store, tmp_path, local_client, monkeypatch, first, second):
    """A second edit lands after the refresh listed level 0 (and worked out
    its region: a chunk region, or attribute buckets) and before it took
    the lock and wrote its record.  The refresh records the level 0 it
    worked from, so the pyramid is stale afterwards (not current without
    the second edit), and the next refresh ends equal to a full rebuild."""
    from zarr_vectors_dask import currency
    _edit(store, first, False)
    real = currency.begin

    def begin(*args, **kwargs):
        _edit(store, second, False)
        monkeypatch.setattr(currency, "begin", real)
        return real(*args, **kwargs)
    monkeypatch.setattr(currency, "begin", begin)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.refreshed and currency.begin is real  # the edit landed mid-refresh
    st = zd.pyramid_status(str(store))
    assert st.state == "stale", st
    second_array = "object_attributes/weight" if second == "zarr_write" else "vertices"
    assert second_array in st.diff.by_array(), st.diff.by_array()
    zd.refresh_pyramid(str(store), client=local_client)
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


def test_a_differing_request_is_refused_naming_the_argument(store):
    with pytest.raises(zd.BuildError, match="sparsity_seed: 0 then, 3 now"):
        zd.refresh_pyramid(str(store), sparsity_seed=3)
    zd.refresh_pyramid(str(store), sparsity_seed=0)  # the recorded one: fine


def test_pyramid_without_a_record_is_unknown_and_first_refresh_records(store, local_client,
                                                                       capsys):
    os.remove(store / SOURCE_RECORD)
    st = zd.pyramid_status(str(store))
    assert st.state == "unknown" and "no fingerprint" in st.reason
    with pytest.raises(zd.BuildError, match="no build arguments are recorded"):
        zd.refresh_pyramid(str(store))
    assert main(["info", str(store)]) == 0
    assert "currency: unknown" in capsys.readouterr().out
    zd.refresh_pyramid(str(store), client=local_client, **KW)
    assert zd.pyramid_status(str(store)).state == "current"
    assert main(["validate", str(store)]) == 0
    out = capsys.readouterr().out
    assert "currency: current" in out, out


@pytest.mark.parametrize("atomic", [False, True], ids=["inplace", "atomic"])
def test_cli_refresh_dry_run_and_info_say_stale(store, capsys, atomic):
    _edit(store, "edit_vertex", atomic)
    before = _mtimes(store)
    assert main(["info", str(store)]) == 0
    assert "currency: stale (level 0 changed since" in capsys.readouterr().out
    assert main(["refresh", str(store), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # the chunks it reaches, counted as the refresh plans them; a row
    # added (atomic): level 2's survivors are drawn anew, a whole level
    import re
    m = re.search(r"level 1: would recompute (\d+) chunk\(s\) from (\d+) of level 0's "
                  r"(\d+) chunks and 1 changed object\(s\) \(reads ([\d.]+)% of its source", out)
    assert m, out
    n_t, n_s, n_all, pct = int(m[1]), int(m[2]), int(m[3]), float(m[4])
    assert 0 < n_s < n_all and abs(pct - 100 * n_s / n_all) < 0.06, out
    whole2 = "level 2: would recompute the whole level (rows were added: its survivors"
    assert (whole2 in out) == atomic and "level 2: would recompute" in out, out
    assert "dirty level-0 chunks:" in out
    assert _mtimes(store) == before  # a dry run writes nothing


def test_racy_mtime_is_decided_by_hash(tmp_path):
    """A cell rewritten with other bytes of the same size and the same
    mtime right after the fingerprint: only its hash tells."""
    path = tmp_path / "s.zv"
    make_streamlines(str(path), seed=2, n_objects=8)
    st = Store.from_url(str(path))
    cell = next(k for k in fpm.list_source(st).entries if "/vertices/c/" in k)
    p = os.path.join(str(path), cell)
    os.utime(p, ns=(time.time_ns(),) * 2)  # as recent as the listing
    old = fpm.take(st)
    assert old.entries[cell].sha256 is not None
    m = os.stat(p).st_mtime_ns
    data = bytearray(open(p, "rb").read())
    data[-1] ^= 0xFF
    open(p, "wb").write(bytes(data))
    os.utime(p, ns=(m, m))
    diff = fpm.compare(old, fpm.take(st, like=old))
    assert diff.changed == (cell,)
    assert fpm.compare(old, fpm.take(st, like=old)).changed == (cell,)


def rewritten_keys(store) -> list[str]:
    """The keys an in-place refresh logged so far (``resume.REWRITE_LOG``)."""
    out = []
    log = os.path.join(str(store), REWRITE_LOG, "written")
    for name in (os.listdir(log) if os.path.isdir(log) else []):
        try:
            with open(os.path.join(log, name)) as fh:
                out.extend(fh.read().split("\n"))
        except FileNotFoundError:
            pass
    return out


def rewriting(store, prefix: str) -> bool:
    """An in-place refresh has started writing keys under ``prefix``."""
    return any(k.startswith(prefix) for k in rewritten_keys(store))


def test_refresh_killed_then_refreshed_again_ends_equal(private_dask_cluster, tmp_path):
    base = tmp_path / "base.zv"
    make_streamlines(str(base), seed=11, n_objects=400, max_len=150)
    store, expected = tmp_path / "s.zv", tmp_path / "full.zv"
    shutil.copytree(base, store)
    with private_dask_cluster.client() as client:
        zd.build_pyramid(str(store), client=client, **KW)
        _edit(store, "edit_vertex", False)
        shutil.copytree(store, expected)
        zd.build_pyramid(str(expected), client=client, overwrite=True, **KW)
        p = subprocess.Popen([sys.executable, "-m", "zarr_vectors_dask.cli", "refresh",
                              str(store), "--scheduler", private_dask_cluster.address,
                              "--no-progress"], env=subprocess_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            hit = False
            while time.monotonic() < deadline and p.poll() is None:
                if rewriting(store, "2/vertices/"):
                    hit = True
                    break
                time.sleep(0.001)
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.wait(timeout=30)
        assert hit, p.stderr.read()[-2000:]
        # What a reader sees now: the root says a refresh is under way.
        assert REFRESH_ATTR in _root_attrs(store)
        st = zd.pyramid_status(str(store))
        assert st.state == "unknown" and st.refreshing and "refresh" in st.reason
        report = zd.refresh_pyramid(str(store), client=client)
        assert report.refreshed
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(str(store)).state == "current"


#: What every killing driver shares: its arguments, ``die``, the kill
#: after the refresh mark is removed, and the refresh itself (the tail).
_DRIVER_HEAD = """
import os, signal, sys, threading, time
import distributed
import zarr_vectors_dask as zd
from zarr_vectors_dask import api, currency, refresh
from zarr_vectors_dask.resume import REWRITE_LOG
store, address, moment = sys.argv[1:4]
how, _, moment = moment.rpartition(":")
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if moment == "unmarked":
    real_mark = currency.mark_refreshing
    def mark(st, on):
        real_mark(st, on)
        if not on:
            die()
    currency.mark_refreshing = mark
"""
_DRIVER_TAIL = """
with distributed.Client(address) as c:
    zd.refresh_pyramid(store, client=c)
if moment == "returned":
    die()
"""
#: A driver that refreshes, SIGKILLed at one moment of an attribute refresh
#: (the functions it patches are looked up at call time).
_KILLING_DRIVER = _DRIVER_HEAD + """
if moment == "begun":
    refresh._rewrite_attributes = lambda *a, **k: die()
elif moment == "writing":
    from zarr_vectors_dask.step import run as srun
    real, cell = srun.execute, os.path.join(store, "1", "object_attributes", "weight", "c", "0")
    def execute(*a, **k):
        m = os.stat(cell).st_mtime_ns
        threading.Thread(target=real, args=a, kwargs=k, daemon=True).start()
        while os.stat(cell).st_mtime_ns == m:
            time.sleep(0.0005)
        die()
    srun.execute = execute
""" + _DRIVER_TAIL


def _kill_then_finish(cluster, built, full_rebuild, tmp_path, *, edit: str, driver_src: str,
                      moment: str, then: str, atomic: bool = False) -> None:
    """Edit a copy of ``built``, run ``driver_src`` (a refresh that SIGKILLs
    itself at ``moment``), check what a reader sees, finish with ``then``
    (``refresh`` or ``resume``) and compare with a full rebuild.  The
    cluster outlives the test (the killed driver's tasks may still run on
    it, writing only into this test's store)."""
    store = tmp_path / "s.zv"
    shutil.copytree(built, store)
    for one in edit.split("+"):  # several edits, one after the other
        _edit(store, one, atomic)
    expected = full_rebuild(edit, atomic)
    driver = tmp_path / "driver.py"
    driver.write_text(driver_src)
    with cluster.client() as client:
        p = subprocess.run([sys.executable, str(driver), str(store), cluster.address, moment],
                           env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        st = zd.pyramid_status(str(store))
        when = moment.split(":")[-1]
        if when == "returned":
            assert st.current, st
        else:
            assert st.state == "unknown" and "refresh" in st.reason, st
            assert st.refreshing == (when != "unmarked"), st
        if then == "resume":  # redoes the refresh: never keeps half-rewritten levels
            zd.build_pyramid(str(store), client=client, resume=True, **KW)
        else:
            zd.refresh_pyramid(str(store), client=client)
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert REFRESH_ATTR not in _root_attrs(store)
    assert not os.path.exists(os.path.join(store, REWRITE_LOG))
    assert zd.pyramid_status(str(store)).state == "current"


@pytest.mark.parametrize("moment,then", [
    pytest.param("begun", "refresh", marks=pytest.mark.slow),  # as "unmarked": unknown, redone
    ("writing", "resume"), pytest.param("unmarked", "refresh", marks=pytest.mark.slow),
    ("returned", "refresh")])
def test_attribute_refresh_killed_at_each_moment_then_finished_ends_equal(
        dask_cluster, built, full_rebuild, tmp_path, moment, then):
    """SIGKILL the driver of an attribute refresh after it marked the root,
    while its graph writes, after it removed the mark but before its
    record, and after it returned: the next refresh (or resume) ends equal
    to a full rebuild (an unfinished one rewrites every level)."""
    _kill_then_finish(dask_cluster, built, full_rebuild, tmp_path, edit="zarr_write",
                      driver_src=_KILLING_DRIVER, moment=moment, then=then)


def test_change_detection_costs_about_one_listing(tmp_path, local_client):
    path = tmp_path / "s.zv"
    make_streamlines(str(path), seed=3, n_objects=300, max_len=150, chunk_shape=25.0)
    # Cells written within RACY_NS of the build's listing are hashed when
    # recorded (and at every check until a build settles them): a store
    # written well before its build, as usual, has none.
    time.sleep(fpm.RACY_NS / 1e9 + 0.1)
    zd.build_pyramid(str(path), client=local_client, **KW)
    doc = json.load(open(path / SOURCE_RECORD))
    hashed = [k for k, e in doc["fingerprint"]["entries"].items()
              if e[2] is not None and not fpm.is_document(k)]
    assert not hashed, hashed[:3]
    st = Store.from_url(str(path))
    n = len(fpm.list_source(st).entries)
    t0 = time.perf_counter()
    for _ in range(20):
        listing = {k: os.stat(os.path.join(str(path), "0", k)).st_size
                   for k in st.keys_under("0")}
    t_list = (time.perf_counter() - t0) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        status = zd.pyramid_status(str(path))
    t_status = (time.perf_counter() - t0) / 20
    assert status.current
    print(f"\nchange detection on an unedited pyramid: {t_status * 1e3:.1f} ms; one listing "
          f"with sizes of level 0 ({len(listing)} objects, {n} in the fingerprint): "
          f"{t_list * 1e3:.1f} ms")


# ------------------------------------------------------------ drop-in re-runs
@pytest.fixture
def patched():
    undo = zd.patch_zarr_vectors()
    try:
        yield
    finally:
        undo()


def _zv_build(path, **kw):
    import zarr_vectors.multiresolution.coarsen as ref
    return ref.build_pyramid(str(path), **kw)


def test_native_refusal_names_every_choice(store, local_client):
    with pytest.raises(zd.BuildError) as info:
        zd.build_pyramid(str(store), client=local_client, **KW)
    msg = str(info.value)
    assert "overwrite=True" in msg and "resume=True" in msg and "refresh_pyramid" in msg, msg


def test_patched_rerun_same_arguments_unchanged_returns_at_once(store, local_client, patched,
                                                                caplog):
    before = _mtimes(store)
    with caplog.at_level("WARNING", logger="zarr_vectors_dask"):
        got = _zv_build(store, **KW)
    assert got["levels_created"] == 2
    assert _mtimes(store) == before
    assert not [r for r in caplog.records if r.name == "zarr_vectors_dask"]


def _patched_rerun_equals_a_full_build(store, tmp_path, client, caplog, kw) -> str:
    """Re-run zarr-vectors' (patched) build_pyramid on ``store``: it ends with
    every file of a fresh ``overwrite=True`` build with ``kw``, and says what
    it did in exactly one log line, returned."""
    expected = tmp_path / "expected.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=client, overwrite=True, **kw)
    with caplog.at_level("WARNING", logger="zarr_vectors_dask"):
        _zv_build(store, **kw)
    lines = [r.getMessage() for r in caplog.records if r.name == "zarr_vectors_dask"]
    assert len(lines) == 1, lines
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    return lines[0]


def test_patched_rerun_after_an_edit_refreshes(store, tmp_path, local_client, patched, caplog):
    _edit(store, "remove_object", False)
    line = _patched_rerun_equals_a_full_build(store, tmp_path, local_client, caplog, KW)
    assert "refreshing the pyramid" in line and "object_index/manifests" in line, line


def test_patched_rerun_other_arguments_rebuilds_as_a_fresh_build(store, tmp_path, local_client,
                                                                  patched, caplog):
    other = dict(KW, sparsity_seed=4)
    line = _patched_rerun_equals_a_full_build(store, tmp_path, local_client, caplog, other)
    assert "rebuilding the pyramid (overwrite=True)" in line, line
    assert "sparsity_seed: 0 then, 4 now" in line, line


@pytest.mark.parametrize("policy", [True, "batch"])
def test_patched_edit_session_refreshes_after_its_flush(store, tmp_path, local_client, patched,
                                                        policy):
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    _edit(expected, "edit_vertex", False)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    root = _open(store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with EditSession(root, atomic=False, refresh_pyramid=policy) as ed:
            ref = VertexRef.from_object(root, level=0, object_id=3, vertex_index=2)
            ed.edit_vertex(ref, new_pos=np.array([20.0, 30.0, 40.0]) + ref.local)
    assert zd.pyramid_status(str(store)).state == "current"
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


def test_patched_rebuild_pyramid_from_level_refreshes(store, tmp_path, local_client, patched):
    from zarr_vectors.ops.refresh import rebuild_pyramid_from_level
    _edit(store, "zarr_write", False)
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    specs = rebuild_pyramid_from_level(_open(store), 0)
    assert len(specs) == 2
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    before = _mtimes(store)
    assert rebuild_pyramid_from_level(_open(store), 0) == specs  # current: nothing rewritten
    assert _mtimes(store) == before


@pytest.mark.integration
def test_on_s3_etags_decide_and_refresh_equals_full_rebuild(s3_server, built, tmp_path,
                                                             local_client):
    """On S3 the fingerprint is sizes and ETags from one LIST; a plain
    write of one attribute cell is found, and the refresh (of that
    attribute's buckets) equals a full rebuild."""
    fs = s3_server.fs()
    bucket = s3_server.new_bucket()
    fs.put(str(built), f"{bucket}/x.zv", recursive=True)
    url, opts = s3_server.url(bucket, "x.zv"), s3_server.storage_options
    fs.rm(f"{bucket}/x.zv/{SOURCE_RECORD}")
    zd.refresh_pyramid(url, client=local_client, storage_options=opts, **KW)
    rec = json.loads(fs.cat(f"{bucket}/x.zv/{SOURCE_RECORD}"))
    assert rec["fingerprint"]["kind"] == "digest"
    assert zd.pyramid_status(url, storage_options=opts).state == "current"
    cell = next(k for k in rec["fingerprint"]["entries"] if "/object_attributes/weight/c/" in k)
    raw = bytearray(fs.cat(f"{bucket}/x.zv/{cell}"))
    raw[-1] ^= 0x01
    fs.pipe(f"{bucket}/x.zv/{cell}", bytes(raw))
    st = zd.pyramid_status(url, storage_options=opts)
    assert st.state == "stale" and st.diff.changed == (cell,), st
    report = zd.refresh_pyramid(url, client=local_client, storage_options=opts)
    assert report.region.kind == "attributes", report  # its buckets only, on S3 too
    assert zd.pyramid_status(url, storage_options=opts).state == "current"
    got, expected = tmp_path / "got.zv", tmp_path / "full.zv"
    fs.invalidate_cache()
    fs.get(f"{bucket}/x.zv", str(got), recursive=True)
    shutil.copytree(got, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    diff = compare_raw_files(expected, got, ignore=_sidecar)
    assert diff.identical, diff.summary()


def test_on_s3_an_in_place_edit_is_refreshed_by_chunks_equal_to_a_full_rebuild(
        s3_server, built, full_rebuild, tmp_path, local_client):
    """The chunk region on S3: its stale cells found from the documents,
    their sizes asked of the server, the documents moved by the logged
    changes.  Level 0 is edited by EditSession on a local copy and its
    changed objects uploaded, as a sync would."""
    fs = s3_server.fs()
    bucket = s3_server.new_bucket()
    fs.put(str(built), f"{bucket}/x.zv", recursive=True)
    url, opts = s3_server.url(bucket, "x.zv"), s3_server.storage_options
    # The copied record's fingerprint is local mtimes, which ETags never
    # match: a first refresh records S3's (every object looks changed).
    zd.refresh_pyramid(url, client=local_client, storage_options=opts)
    assert zd.pyramid_status(url, storage_options=opts).state == "current"
    edited = tmp_path / "edited.zv"
    shutil.copytree(built, edited)
    _edit(edited, "edit_vertex", False)
    diff = compare_raw_files(built, edited, ignore=_sidecar)
    assert diff.differing and not diff.only_in_expected, diff.summary()
    for rel in diff.differing + diff.only_in_actual:
        fs.pipe(f"{bucket}/x.zv/{rel}", (edited / rel).read_bytes())
    dirty = zd.pyramid_status(url, storage_options=opts).diff.dirty_chunks()
    assert 0 < len(dirty["vertices"]) <= 2, dirty  # the edit's, not every chunk
    report = zd.refresh_pyramid(url, client=local_client, storage_options=opts)
    assert report.region.kind == "chunks" and report.summary["region"] == "chunks", report
    got = tmp_path / "got.zv"
    fs.invalidate_cache()
    fs.get(f"{bucket}/x.zv", str(got), recursive=True)
    diff = compare_raw_files(full_rebuild("edit_vertex", False), got, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(url, storage_options=opts).state == "current"


# ------------------------------------------------------------ whole levels, in place
def _digests(root) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, inode and mtime, by path relative to ``root``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            stt = os.stat(p)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = (fh.read(), stt.st_ino, stt.st_mtime_ns)
    return out


def _remove_most_objects(path):
    """EditSession in place: every object but two emptied (coarse cells vanish)."""
    root = _open(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = zarr.open_array(str(path / "0" / "object_index" / "object_ids"), mode="r")[:]
        with EditSession(root, atomic=False) as ed:
            for oid in ids[2:]:
                ed.remove_object(int(oid))


@pytest.mark.parametrize("how", ["whole", "chunks"])
@pytest.mark.parametrize("kind", ["edit_vertex", "remove_most"])
def test_refresh_in_place_rewrites_only_the_files_that_differ(store, tmp_path, local_client,
                                                              kind, how, monkeypatch):
    """A refresh in place -- whole levels, or (in-place edits) the chunks
    they reach -- writes a file only where its bytes change and removes
    the files a full rebuild does not have: an unchanged file keeps its
    inode and mtime.  One vertex edit composes a few chunks again;
    emptying most objects, every chunk."""
    from zarr_vectors_dask import api
    from zarr_vectors_dask import refresh as rf
    if how == "whole":  # the chunk region is what in-place edits get: turn it off
        monkeypatch.setattr(rf, "_chunk_layout", lambda args: "turned off by the test")
    regions = []
    real = api.recompose_region
    monkeypatch.setattr(api, "recompose_region",
                        lambda *a: regions.append(real(*a)) or regions[-1])
    if kind == "remove_most":
        _remove_most_objects(store)
    else:
        _edit(store, kind, False)
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    before = {k: v for k, v in _digests(store).items() if not _sidecar(k)}
    time.sleep(0.01)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.refreshed and report.region.kind == how
    assert report.summary.get("region", "whole") == how
    assert f"objects written or removed: {report.summary['objects_changed']}" in str(report)
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    after = {k: v for k, v in _digests(store).items() if not _sidecar(k)}
    rewritten = {k for k in after if k in before and after[k][1:] != before[k][1:]}
    differing = {k for k in after if k in before and after[k][0] != before[k][0]}
    removed, added = set(before) - set(after), set(after) - set(before)
    # The root alone is written with its own bytes: the refresh mark on, then off.
    assert rewritten - differing == {"zarr.json"}, sorted(rewritten - differing)[:10]
    assert report.summary["objects_changed"] == len((differing | removed | added) - {"zarr.json"})
    assert differing <= rewritten
    assert differing and len(rewritten) < len(after) / 4, (len(rewritten), len(after))
    if kind == "remove_most":
        assert any("/vertices/c/" in k for k in removed), sorted(removed)[:5]
        assert regions == [None]  # most chunks changed: the whole composition
    elif how == "whole":
        fine = sum(1 for k in before if k.startswith("0/vertices/c/"))
        (only,) = regions
        assert only is not None and 0 < len(only[0]) < fine / 2, (only, fine)
    assert not any(k.startswith("0/") and "/links/" not in k for k in removed | added)
    assert zd.pyramid_status(str(store)).state == "current"


def _vertex_out_of_its_chunk(path) -> None:
    """A plain zarr write moving the first vertex of one level-0 cell into
    the next chunk along x (the cell stays where it is)."""
    arr = zarr.open_array(str(path / "0" / "vertices"), mode="r+")
    origin = np.asarray(arr.attrs.get("chunk_grid_origin", [0, 0, 0]))
    cell = sorted((path / "0" / "vertices" / "c").glob("*/*/*"))[0]
    idx = tuple(int(p) for p in cell.relative_to(path / "0" / "vertices" / "c").parts)
    sel = tuple(slice(i, i + 1) for i in idx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = bytes(np.asarray(arr[sel].flat[0]))
        vals = np.frombuffer(raw, dtype=np.float32).copy().reshape(-1, 3)
        chunk = np.asarray(json.loads((path / "zarr.json").read_text())["attributes"]
                           ["zarr_vectors"]["chunk_shape"], dtype=np.float32)
        vals[0, 0] = (np.asarray(idx)[0] + origin[0] + 1) * chunk[0] + 0.5
        obj = np.empty((1, 1, 1), dtype=object)
        obj.flat[0] = vals.tobytes()
        arr[sel] = obj


@pytest.mark.parametrize("case", ["vertex_left_its_chunk", "no_row_digests"])
def test_chunk_region_falls_back_to_whole_levels_saying_why(store, tmp_path, local_client, case):
    """What a chunk region cannot bound is refreshed as whole levels, the
    report naming why, and still equals a full rebuild."""
    if case == "vertex_left_its_chunk":
        _vertex_out_of_its_chunk(store)
        why = "a vertex lies outside its chunk"
    else:  # a pyramid built before the digests were recorded, then an object emptied
        shutil.rmtree(store / ".zvdask" / "manifest-rows")
        _edit(store, "remove_object", False)
        why = "no digest of the level-0 manifest rows is recorded"
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    report = zd.refresh_pyramid(str(store), client=local_client)
    text = str(report)
    assert why in text and "whole level" in text, text
    assert report.summary.get("region", "whole").startswith("whole"), report.summary
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(str(store)).state == "current"
    # The refresh recorded the digests again: the next in-place edit (one that
    # changes an object's manifest row too) is a chunk region.
    _edit(store, "edit_vertex", False)
    dry = zd.refresh_pyramid(str(store), dry_run=True)
    assert dry.region.kind == "chunks" and "1 changed object(s)" in str(dry), str(dry)


def test_sharded_pyramid_refreshed_in_place_equals_full_rebuild(tmp_path, local_client):
    """A pyramid built with ``shard_shape``: the in-place refresh compares
    and writes whole shards, and removes the ones that vanish."""
    store, expected = tmp_path / "s.zv", tmp_path / "full.zv"
    make_streamlines(str(store), seed=21, n_objects=60, max_len=120)
    kw = dict(KW, shard_shape=2)
    zd.build_pyramid(str(store), client=local_client, **kw)
    _remove_most_objects(store)
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **kw)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.region.kind == "whole"
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(str(store)).state == "current"


#: A driver that refreshes in place, SIGKILLed at one moment: ``whole:``
#: levels (the chunk region turned off), ``chunks:`` (the region the
#: in-place edit reaches) or ``appended:`` (an atomic edit: level 1 by
#: chunks, level 2 whole) or ``combined:`` (an in-place edit and an
#: object-attribute cell: the region's steps, then the attribute buckets).
#: The patched names are looked up at call time.
_IN_PLACE_KILLER = _DRIVER_HEAD + """
if how == "whole":
    refresh._chunk_layout = lambda args: "turned off by the test"
from zarr_vectors_dask.step import run as step_run
def logged(prefix):
    log = os.path.join(store, REWRITE_LOG, "written")
    for name in (os.listdir(log) if os.path.isdir(log) else []):
        try:
            if any(k.startswith(prefix) for k in open(os.path.join(log, name)).read().split()):
                return True
        except FileNotFoundError:
            pass
    return False
def kill_when(prefix):
    def watch():
        while not logged(prefix):
            time.sleep(0.0005)
        die()
    threading.Thread(target=watch, daemon=True).start()
def after_call(name, n, module=api):
    real, calls = getattr(module, name), []
    def wrapper(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == n:
            die()
        return out
    setattr(module, name, wrapper)
if moment.startswith("writing-"):
    kill_when(moment.split("-")[1] + "/vertices/")
elif moment in ("swept-1", "swept-2") and how == "chunks":  # a region step's own sweep
    after_call("discard_stale", int(moment.split("-")[1]), step_run)
elif moment == "swept-1" and how == "appended":  # level 1 by chunks, level 2 whole
    after_call("discard_stale", 1, step_run)
elif moment == "swept-2" and how == "appended":
    after_call("discard_unwritten", 1)
elif moment == "swept-1":
    after_call("discard_unwritten", 1)
elif moment == "attributes":  # a combined change's attribute buckets, being written
    kill_when("1/object_attributes/weight/c/")
elif moment == "attributed":
    after_call("rewrite_attributes", 1)
elif moment == "composed":
    after_call("compose_links", 1)
elif moment == "committed":  # the composed families' documents written
    from zarr_vectors_dask.format import commit
    after_call("commit_cross_level", 1, commit)
elif moment == "swept-all":
    after_call("discard_unwritten", {"chunks": 1, "appended": 2}.get(how, 3))
""" + _DRIVER_TAIL


@pytest.mark.parametrize("moment,then", [
    ("whole:writing-1", "refresh"), ("whole:swept-1", "resume"),
    pytest.param("whole:writing-2", "resume", marks=pytest.mark.slow),
    ("whole:composed", "resume"), pytest.param("whole:swept-all", "refresh", marks=pytest.mark.slow),
    ("whole:unmarked", "refresh"), ("whole:returned", "refresh"),
    ("chunks:writing-1", "refresh"), ("chunks:swept-1", "refresh"),
    ("chunks:writing-2", "resume"), pytest.param("chunks:swept-2", "refresh", marks=pytest.mark.slow),
    ("chunks:composed", "refresh"), ("chunks:swept-all", "resume"),
    pytest.param("chunks:unmarked", "refresh", marks=pytest.mark.slow),
    ("chunks:returned", "refresh")])
def test_in_place_refresh_killed_at_each_moment_then_finished_ends_equal(
        dask_cluster, built, full_rebuild, tmp_path, moment, then):
    """SIGKILL the driver of a refresh in place -- whole levels, or the
    chunks an in-place edit reaches -- while level 1 or 2 is rewritten,
    after a step's sweep, after the composition, after the last sweep,
    after the mark is removed and after it returned; then
    ``refresh_pyramid`` or ``build_pyramid(resume=True)`` ends equal to a
    full rebuild."""
    _kill_then_finish(dask_cluster, built, full_rebuild, tmp_path, edit="edit_vertex",
                      driver_src=_IN_PLACE_KILLER, moment=moment, then=then)


def test_deep_region_refresh_killed_after_its_composed_documents_ends_equal(
        dask_cluster, tmp_path, local_client):
    """Four levels, so that an in-place edit (an object's manifest row
    emptied) changes a composed family's record count (``1/links/+2`` has
    one record per level-1 vertex): SIGKILL the driver once the composed
    families' documents are written.  The rerun must not add the first
    attempt's logged changes to documents that already hold them."""
    kw = dict(KW, factors=[(2, 1), (2, 1), (2, 2)])
    built = tmp_path / "deep.zv"
    make_streamlines(str(built), seed=5, n_objects=40)
    zd.build_pyramid(str(built), client=local_client, **kw)
    expected = tmp_path / "deep-full.zv"
    shutil.copytree(built, expected)
    _edit(expected, "remove_object", False)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **kw)

    def num_links(path):
        with open(path / "1" / "links" / "+2" / "zarr.json") as fh:
            return json.load(fh)["attributes"]["num_links"]
    assert num_links(expected) != num_links(built)  # else the test shows nothing
    _kill_then_finish(dask_cluster, built, lambda *a: expected, tmp_path / "run",
                      edit="remove_object", driver_src=_IN_PLACE_KILLER,
                      moment="chunks:committed", then="refresh")


@pytest.mark.parametrize("moment,then", [
    ("combined:writing-1", "refresh"), ("combined:attributes", "resume"),
    pytest.param("combined:attributed", "refresh", marks=pytest.mark.slow),
    pytest.param("combined:returned", "refresh", marks=pytest.mark.slow)])
def test_combined_refresh_killed_at_each_moment_then_finished_ends_equal(
        dask_cluster, built, full_rebuild, tmp_path, moment, then):
    """An in-place geometry edit together with an object-attribute cell:
    a chunk region, then the attribute buckets of the levels it
    recomputed. SIGKILLed while level 1 is rewritten, while the attribute
    buckets are written, after they were, and after it returned: the next
    refresh or resume ends equal to a full rebuild."""
    _kill_then_finish(dask_cluster, built, full_rebuild, tmp_path, edit="edit_vertex+zarr_write",
                      driver_src=_IN_PLACE_KILLER, moment=moment, then=then)


def test_combined_change_is_reported_then_refreshed_by_chunks_and_buckets(store, tmp_path,
                                                                          local_client):
    """The dry run names the chunk region's chunks and the attribute
    buckets per level; the refresh takes that path and equals a full
    rebuild."""
    _edit(store, "edit_vertex", False)
    _edit(store, "zarr_write", False)
    dry = zd.refresh_pyramid(str(store), client=local_client, dry_run=True)
    assert dry.region.kind == "chunks" and dry.region.names == ("weight",), dry
    assert dry.levels and all("1 object-attribute bucket(s) of weight" in what
                               for _, what, _ in dry.levels), str(dry)
    expected = tmp_path / "full.zv"
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=local_client, overwrite=True, **KW)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.summary["region"] == "chunks", report
    assert "object-attribute bucket" in str(report), str(report)
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


@pytest.mark.parametrize("moment,then", [
    ("appended:writing-1", "resume"), ("appended:swept-1", "refresh"),
    ("appended:writing-2", "refresh"), pytest.param("appended:swept-2", "resume",
                                                    marks=pytest.mark.slow),
    pytest.param("appended:composed", "refresh", marks=pytest.mark.slow),
    ("appended:swept-all", "resume"), ("appended:returned", "refresh")])
def test_appending_refresh_killed_at_each_moment_then_finished_ends_equal(
        dask_cluster, built, full_rebuild, tmp_path, moment, then):
    """An atomic edit appends a row: level 1 is refreshed by chunks and
    level 2 (survivors drawn anew) whole.  SIGKILL the driver while either
    is written, after each one's sweep, after the composition, after the
    last sweep and after it returned; the next refresh or resume ends
    equal to a full rebuild."""
    _kill_then_finish(dask_cluster, built, full_rebuild, tmp_path, edit="edit_vertex",
                      driver_src=_IN_PLACE_KILLER, moment=moment, then=then, atomic=True)



def test_settle_drops_the_hashes_of_racy_cells_left_as_they_were(tmp_path, monkeypatch):
    """``fingerprint.settle`` (a build's last step): a racy cell whose size,
    mtime and bytes are still the recorded ones loses its hash (size and
    mtime decide from then on); one rewritten with other bytes under the
    same size and mtime, one grown, and one removed keep what they had."""
    path = tmp_path / "s.zv"
    make_streamlines(str(path), seed=2, n_objects=8)
    st = Store.from_url(str(path))
    cells = [k for k in fpm.list_source(st).entries if "/vertices/c/" in k][:4]
    now = time.time_ns()
    for k in cells:
        os.utime(os.path.join(str(path), k), ns=(now, now))
    taken = fpm.take(st)
    assert all(taken.entries[k].sha256 is not None for k in cells)
    same, other, grown, removed = (os.path.join(str(path), k) for k in cells)
    data = bytearray(open(other, "rb").read())
    data[-1] ^= 0xFF
    open(other, "wb").write(bytes(data))
    os.utime(other, ns=(now, now))
    open(grown, "ab").write(b"\0")
    os.utime(grown, ns=(now, now))
    os.remove(removed)
    monkeypatch.setattr(fpm, "RACY_NS", 1_000_000)  # 1 ms: all four are settled now
    time.sleep(0.01)
    settled = fpm.settle(st, taken)
    assert settled.entries[cells[0]].sha256 is None
    assert [settled.entries[k].sha256 for k in cells[1:]] == \
        [taken.entries[k].sha256 for k in cells[1:]]
    assert fpm.compare(settled, fpm.take(st, like=settled)).changed == tuple(sorted(cells[1:3]))


# ------------------------------------------------------------ emptied rows
def _single_fragment_objects(path) -> list[tuple]:
    """The one fragment (chunk, index) of an object whose fragment is alone
    in its chunk, and of one whose fragment shares its chunk."""
    from collections import Counter

    from zarr_vectors.core.arrays import read_object_manifest_rows
    from zarr_vectors.core.store import get_resolution_level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids, rows = read_object_manifest_rows(get_resolution_level(open_store(str(path), "r"), 0))
    per_chunk = Counter(c for row in rows for c, _ in row)
    single = [row[0] for row in rows if len(row) == 1]
    alone = [f for f in single if per_chunk[f[0]] == 1]
    shared = [f for f in single if per_chunk[f[0]] > 1]
    assert alone and shared, "the store has no object of each kind"
    return [alone[0], shared[0]]


def _emptied_rows_store(tmp_path, client) -> tuple:
    """300 short lines, built with factors (2, 1), (2, 1) (every object kept
    at level 2), then two single-fragment objects' fragments removed by an
    atomic EditSession; and the full rebuild of a copy."""
    from zarr_vectors.ops.refs import FragmentRef
    kw = dict(KW, factors=[(2, 1), (2, 1)])
    store, expected = tmp_path / "s.zv", tmp_path / "full.zv"
    make_streamlines(str(store), seed=3, n_objects=300, min_len=2, max_len=4,
                     with_attributes=False)
    zd.build_pyramid(str(store), client=client, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with EditSession(open_store(str(store), mode="r+"), atomic=True) as ed:
            for chunk, fragment in _single_fragment_objects(store):
                ed.remove_fragment(FragmentRef(level=0, chunk=tuple(chunk), fragment=int(fragment)),
                                   atomic=True)
    shutil.copytree(store, expected)
    zd.build_pyramid(str(expected), client=client, overwrite=True, **kw)
    for level in (1, 2):
        doc = json.loads((expected / str(level) / "object_index" / "zarr.json").read_text())
        assert doc["attributes"]["num_present"] == 298, (level, doc)  # both rows empty
    return store, expected


def test_objects_whose_only_fragment_is_emptied_are_refreshed_at_every_level(
        tmp_path, local_client):
    """EditSession's atomic remove_fragment empties a fragment and leaves
    the manifest row naming it, so the row's coarse rows come out empty
    while the level-0 row is unchanged.  One fragment is alone in its
    chunk (the chunk's cells go: a row naming a chunk that is gone is
    recomputed), one shares its chunk (recomputed at level 1 for naming a
    region chunk; at level 2 its level-1 row names nothing, and is
    recomputed because level 1 changed it).  Both objects are kept at
    level 2.  The refresh, by chunks, equals a full rebuild."""
    store, expected = _emptied_rows_store(tmp_path, local_client)
    report = zd.refresh_pyramid(str(store), client=local_client)
    assert report.region.kind == "chunks", report.region
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()


@pytest.mark.slow  # a kill variant: the rerun rewrites whole levels, as the sweeps test
def test_a_refresh_killed_after_level_1_rewrote_the_emptied_rows_ends_equal(
        dask_cluster, tmp_path, local_client):
    """The same edit; the driver is SIGKILLed once level 1's region step
    has rewritten its manifest rows, before level 2.  The next refresh
    (whole levels: one started and did not finish) ends equal."""
    store, expected = _emptied_rows_store(tmp_path, local_client)
    driver = tmp_path / "driver.py"
    driver.write_text(_IN_PLACE_KILLER)
    with dask_cluster.client() as client:
        p = subprocess.run([sys.executable, str(driver), str(store), dask_cluster.address,
                            "chunks:swept-1"], env=subprocess_env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
        assert not (store / "2" / "object_index" / "zarr.json").read_bytes() == \
            (expected / "2" / "object_index" / "zarr.json").read_bytes()  # level 2 not done
        zd.refresh_pyramid(str(store), client=client)
    diff = compare_raw_files(expected, store, ignore=_sidecar)
    assert diff.identical, diff.summary()
    assert zd.pyramid_status(str(store)).state == "current"
