"""The local side of ``store.Store``: listings and folder creation."""

from __future__ import annotations

import pytest

from zarr_vectors_dask.storage.store import Store


def test_keys_under_lists_every_file_below_by_relative_path(tmp_path):
    st = Store.from_url(str(tmp_path))
    st.put_many({"a/c/0/1/2": b"x", "a/c/0/3/4": b"y", "a/c/5": b"z", "a/zarr.json": b"{}",
                 "b/c/0": b"w"})
    assert sorted(st.keys_under("a")) == ["c/0/1/2", "c/0/3/4", "c/5", "zarr.json"]
    assert sorted(st.keys_under("a/c/0")) == ["1/2", "3/4"]
    assert st.keys_under("missing") == [] and st.keys_under("a/c/5") == []


def test_put_many_makes_nested_folders_and_refuses_a_file_in_the_way(tmp_path):
    st = Store.from_url(str(tmp_path))
    st.put_many({"x/y/z/1": b"1", "x/y/2": b"2"}, atomic=False)
    assert st.get("x/y/z/1") == b"1" and st.get("x/y/2") == b"2"
    st.put_many({"x/y/z/3": b"3"})  # the folder exists already
    assert st.get("x/y/z/3") == b"3"
    with pytest.raises(OSError):  # "x/y/2" is a file: no folder can be made there
        st.put_many({"x/y/2/4": b"4"})
    assert st.get("x/y/2") == b"2"


@pytest.mark.parametrize("url", ["local", "memory://zvparts"])
@pytest.mark.parametrize("atomic", [True, False])
def test_parts_are_written_back_to_back(tmp_path, url, atomic):
    """A value given as ``Parts`` (a header and a view of a large array, as
    link cells are written) is stored as its buffers joined, by every kind
    of store; empty parts and multi-byte views included."""
    import numpy as np

    from zarr_vectors_dask.storage.store import Parts
    st = Store.from_url(str(tmp_path) if url == "local" else url)
    rows = np.arange(12, dtype="<i8").reshape(6, 2)
    view = memoryview(rows)  # int64 items: written as their bytes
    st.put_many({"l/c/0": Parts(b"head", view[1:3]), "l/c/1": Parts(b"", b"tail"),
                 "l/c/2": Parts(b"only"), "l/c/3": b"plain"}, atomic=atomic)
    assert st.get("l/c/0") == b"head" + rows[1:3].tobytes()
    assert st.get("l/c/1") == b"tail" and st.get("l/c/2") == b"only"
    assert st.get("l/c/3") == b"plain"


def test_changes_only_compares_parts_by_their_joined_bytes(tmp_path):
    from zarr_vectors_dask.storage.store import Parts
    st = Store.from_url(str(tmp_path))
    st.put_many({"a/c/0": b"abcd", "a/c/1": b"xy"})
    ch = st.changes_only(".zvdask/log")
    ch.put_many({"a/c/0": Parts(b"ab", b"cd"), "a/c/1": Parts(b"x", b"z")})
    assert st.get("a/c/1") == b"xz"
    assert sorted(ch.logged_keys("changed")) == ["a/c/1"]


@pytest.mark.parametrize("url", ["local", "memory://zvsizes"])
def test_changes_only_logs_each_changed_objects_sizes(tmp_path, url):
    """What a refresh's documents are computed from: every object a
    ``changes_only`` store wrote anew, rewrote or removed, with its size
    before and after (-1: absent); objects found equal are not there."""
    from zarr_vectors_dask.storage.store import Parts
    st = Store.from_url(str(tmp_path) if url == "local" else url)
    st.put_many({"a/c/0": b"abcd", "a/c/1": b"xy", "a/c/3": b"q"})
    ch = st.changes_only(".zvdask/sizes-log")
    ch.put_many({"a/c/0": b"abcd", "a/c/1": Parts(b"x", b"yz"), "a/c/2": b"12345"})
    assert ch.sizes_of(["a/c/3", "a/c/9"]) == {"a/c/3": 1, "a/c/9": -1}
    ledger: dict = {}
    ch.remove_noted(["a/c/3"], ledger)
    assert ledger == {"a/c/3": (1, -1)}
    ch.note_changed(["a/zarr.json"])  # no sizes: a key only
    assert ch.logged_sizes() == {"a/c/1": (2, 3), "a/c/2": (-1, 5), "a/c/3": (1, -1)}
    assert ch.logged_keys("changed") == {"a/c/1", "a/c/2", "a/c/3", "a/zarr.json"}
    assert st.get("a/c/3") is None


def test_logged_sizes_refuse_two_different_changes_of_one_object(tmp_path):
    """An object changed twice under one log cannot say its first state:
    the refresh's documents would be wrong, so the log refuses, naming it."""
    from zarr_vectors_dask.storage.store import StoreError
    st = Store.from_url(str(tmp_path))
    ch = st.changes_only(".zvdask/sizes-log")
    ch.put_many({"a/c/1": b"xy"})
    ch.put_many({"a/c/1": b"xyz"})
    with pytest.raises(StoreError, match="a/c/1.*two changes"):
        ch.logged_sizes()
