"""The source fingerprint's comparison rules, without I/O: which keys
count as level 0's source, how they group by array, when a hash decides,
and what the diff says."""

from __future__ import annotations

from zarr_vectors_dask import fingerprint as fp
from zarr_vectors_dask.fingerprint import Entry, Fingerprint

T = 10_000_000_000_000  # a listing time, ns
OLD = T - 10 * fp.RACY_NS  # an mtime well before it


def _fp(entries, kind="mtime", at=T):
    return Fingerprint(entries, kind, at if kind == "mtime" else None)


def test_source_keys_exclude_what_a_build_writes_at_level_0():
    assert fp.is_source_key("0/vertices/c/0/1/2")
    assert fp.is_source_key("0/links/0/0.+1.0/c/1/2/3")  # intra-level links are source
    assert fp.is_source_key("0/zarr.json")
    assert not fp.is_source_key("0/links/+1/c/0/0/0")
    assert not fp.is_source_key("0/links/-2/zarr.json")
    assert not fp.is_source_key("0/links/zarr.json")
    assert not fp.is_source_key("1/vertices/c/0/0/0")
    assert not fp.is_source_key("zarr.json")
    assert not fp.is_source_key("0/object_index/manifests/c/0." + "ab" * 16 + ".partial")
    assert not fp.is_source_key("0/vertices/c/0/0/0.tmp-123-0badf00d")


def test_keys_group_by_array_and_chunk():
    assert fp.array_of("0/vertices/c/0/1/2") == "vertices"
    assert fp.array_of("0/vertices/zarr.json") == "vertices"
    assert fp.array_of("0/object_index/manifests/c/0") == "object_index/manifests"
    assert fp.array_of("0/links/0/0.+1.0/c/1/2/3") == "links/0/0.+1.0"
    assert fp.array_of("0/zarr.json") == "level metadata"
    assert fp.array_of("zarr.json") == "root metadata"
    assert fp.chunk_of("0/vertices/c/0/1/2") == (0, 1, 2)
    assert fp.chunk_of("0/object_index/manifests/c/3") == (3,)
    assert fp.chunk_of("0/vertices/zarr.json") is None


def test_racy_mtimes_and_documents_are_hashed_others_not():
    assert fp.needs_hash("0/vertices/zarr.json", Entry(10, OLD), "mtime", T)
    assert not fp.needs_hash("0/vertices/c/0/0/0", Entry(10, OLD), "mtime", T)
    assert fp.needs_hash("0/vertices/c/0/0/0", Entry(10, T - 1), "mtime", T)
    assert fp.needs_hash("0/vertices/c/0/0/0", Entry(10, T + 5), "mtime", T)
    assert not fp.needs_hash("0/vertices/c/0/0/0", Entry(10, "etag1"), "digest", None)
    assert fp.needs_hash("0/vertices/c/0/0/0", Entry(10, None), "none", None)


def test_compare_by_stamp_by_hash_added_removed():
    old = _fp({"0/vertices/c/0/0/0": Entry(10, OLD),
               "0/vertices/c/0/0/1": Entry(10, OLD),
               "0/vertices/c/0/0/2": Entry(10, T - 1, "h1"),  # racy: hashed
               "0/vertices/zarr.json": Entry(5, OLD, "d1"),
               "0/object_index/manifests/c/0": Entry(7, OLD)})
    new = _fp({"0/vertices/c/0/0/0": Entry(10, OLD),            # same
               "0/vertices/c/0/0/1": Entry(10, OLD + 1),        # touched
               "0/vertices/c/0/0/2": Entry(10, T - 1),          # racy, same stamp
               "0/vertices/zarr.json": Entry(5, OLD + 9),       # rewritten
               "0/vertices/c/1/0/0": Entry(3, OLD)},            # new cell
              at=T + 100)
    # Only the hash can tell for the racy cell and the document.
    assert fp.keys_to_rehash(old, new) == ["0/vertices/c/0/0/2", "0/vertices/zarr.json"]
    same_bytes = new.with_entries({"0/vertices/c/0/0/2": Entry(10, T - 1, "h1"),
                                   "0/vertices/zarr.json": Entry(5, OLD + 9, "d1")})
    d = fp.compare(old, same_bytes)
    assert d.changed == ("0/vertices/c/0/0/1",)
    assert d.added == ("0/vertices/c/1/0/0",)
    assert d.removed == ("0/object_index/manifests/c/0",)
    other_bytes = new.with_entries({"0/vertices/c/0/0/2": Entry(10, T - 1, "h2"),
                                    "0/vertices/zarr.json": Entry(5, OLD + 9, "d2")})
    d2 = fp.compare(old, other_bytes)
    assert d2.changed == ("0/vertices/c/0/0/1", "0/vertices/c/0/0/2", "0/vertices/zarr.json")
    assert d2.by_array() == {
        "object_index/manifests": {"changed": 0, "added": 0, "removed": 1, "documents": 0},
        "vertices": {"changed": 2, "added": 1, "removed": 0, "documents": 1}}
    assert d2.dirty_chunks() == {"vertices": {(0, 0, 1), (0, 0, 2), (1, 0, 0)},
                                 "object_index/manifests": {(0,)}}
    assert d2.describe() == ("1 chunk of object_index/manifests (1 removed), "
                             "3 of vertices (1 added) and its metadata")


def test_size_change_is_a_change_even_with_equal_stamp_and_etags_decide():
    old = _fp({"0/vertices/c/0": Entry(10, "e1"), "0/vertices/c/1": Entry(10, "e2")}, "digest")
    new = _fp({"0/vertices/c/0": Entry(11, "e1"), "0/vertices/c/1": Entry(10, "e3")}, "digest")
    assert fp.keys_to_rehash(old, new) == []  # ETags are conclusive: nothing read
    assert fp.compare(old, new).changed == ("0/vertices/c/0", "0/vertices/c/1")
    assert fp.compare(old, old).empty
    assert fp.compare(old, old).describe() == "nothing"


def test_json_round_trip():
    f = _fp({"0/a/c/0": Entry(1, OLD, None), "0/zarr.json": Entry(2, OLD, "x")})
    assert Fingerprint.from_json(f.to_json()) == f
    assert fp.compare(Fingerprint.from_json(f.to_json()), f).empty
