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
