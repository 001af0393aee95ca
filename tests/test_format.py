"""Codecs in ``format.py`` against zarr-vectors' own encoders (no I/O)."""

import json

import numpy as np
import pytest
from zarr_vectors.encoding.ragged import encode_ragged_blob

from zarr_vectors_dask.format import codecs as cdc


def test_framed_link_cells_match_the_ragged_blob_encoder():
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 10**6, size=(50, 2))
    cuts = [(0, 1), (1, 17), (17, 17), (17, 50)]
    got = cdc.framed_link_cells(rows, [a for a, _ in cuts], [b for _, b in cuts])
    for (a, b), parts in zip(cuts, got):
        want = cdc.frame_cell(encode_ragged_blob([rows[a:b].astype(np.int64)], np.dtype(np.int64)))
        cell = bytes(parts)  # a header and a view of rows, written without joining
        assert cell == want
        back = cdc.decode_link_cell(cdc.unframe_cell(cell, what="cell"))
        np.testing.assert_array_equal(back, rows[a:b])


def test_link_cells_of_several_groups_decode_as_one_table():
    """A cell another writer split into several ragged groups (or an empty
    one) decodes to the same records, in order, as the one-group form."""
    rng = np.random.default_rng(4)
    rows = rng.integers(0, 10**6, size=(20, 2)).astype(np.int64)
    split = encode_ragged_blob([rows[:5], rows[5:5], rows[5:]], np.dtype(np.int64))
    one = encode_ragged_blob([rows], np.dtype(np.int64))
    np.testing.assert_array_equal(cdc.decode_link_cell(split), rows)
    np.testing.assert_array_equal(cdc.decode_link_cell(one), rows)
    assert cdc.decode_link_cell(encode_ragged_blob([], np.dtype(np.int64))).shape == (0, 2)


def test_manifest_table_encodes_as_zarr_vectors_does_and_decodes_back():
    """Each blob equals zarr-vectors' own encoder's for the same blocks
    (empty objects, one block, many; 2-D and 3-D; negative coordinates)."""
    from zarr_vectors.encoding.fragments import encode_object_manifest_blocks
    rng = np.random.default_rng(7)
    for ndim in (2, 3):
        counts = rng.integers(0, 6, size=50)
        counts[:3] = (0, 1, 0)
        total = int(counts.sum())
        coords = rng.integers(-3, 40, size=(total, ndim))
        frags = rng.integers(0, 1 << 40, size=total)
        blobs = cdc.encode_manifest_table(cdc.ManifestTable(counts, coords, frags), ndim)
        at = np.r_[0, np.cumsum(counts)]
        for i, blob in enumerate(blobs):
            blocks = [(tuple(int(x) for x in coords[j]), int(frags[j]))
                      for j in range(at[i], at[i + 1])]
            assert blob == encode_object_manifest_blocks(blocks, sid_ndim=ndim), (ndim, i)
        back = cdc.decode_manifest_table(blobs, ndim)
        assert np.array_equal(back.counts, counts) and np.array_equal(back.coords, coords)
        assert np.array_equal(back.frags, frags)


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 64, 65, 1000, 4097])
def test_single_vertex_fragments_are_zarr_vectors_bytes(n):
    from zarr_vectors.encoding.fragments import decode_fragments, encode_fragments
    got = cdc.single_vertex_fragments(n)
    assert got == encode_fragments([(i, 1) for i in range(n)])
    assert decode_fragments(got).num_fragments == n


def test_cell_chunk_inverts_cell_path():
    from zarr_vectors_dask.format import naming as nm
    for origin in ((0, 0, 0), (-2, 1, 0)):
        key = nm.cell_path("1/links/+2/0.0.1", (3, -1, 4), origin)
        assert nm.cell_chunk(key.split("/c/", 1)[1], origin) == (3, -1, 4)


@pytest.mark.parametrize("shard", [None, (2, 3, 1)])
def test_vlen_array_doc_is_zarrs_own_document(shard):
    """The documents rendered from one template per grid are the bytes
    zarr writes when it creates the array with those attributes."""
    import warnings

    import zarr
    from zarr.codecs import VLenBytesCodec
    from zarr.storage import MemoryStore

    from zarr_vectors_dask.format import documents as fdoc
    from zarr_vectors_dask.format import naming as nm
    cases = [((4, 6, 2), {}),
             ((4, 6, 2), fdoc.vlen_attributes((0, 0, 0), [(1, 2, 0), (0, 0, 1)],
                                              fdoc.vertices_attrs())),
             ((5, 3, 7), fdoc.vlen_attributes((-2, 0, 3), [(-2, 1, 3)],
                                              fdoc.link_array_attrs((0, -1, 1), -1))),
             ((4, 6, 2), {"name": "ü", "x": [1.5, None, True]})]
    for grid, attrs in cases:
        mem = MemoryStore()
        kw = {} if shard is None else {"shards": shard}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = zarr.create_array(mem, name="n", shape=grid, chunks=(1,) * 3, dtype="bytes",
                                    serializer=VLenBytesCodec(), compressors=[],
                                    attributes=attrs, zarr_format=3, **kw)
        want = zarr.core.sync.sync(mem.get("n/zarr.json", prototype=zarr.core.buffer.
                                           default_buffer_prototype())).to_bytes()
        assert fdoc.vlen_array_doc(grid, attrs, shard) == want, (grid, attrs)
        assert arr.attrs.asdict() == attrs
    assert nm.NONEMPTY in fdoc.vlen_attributes((0,), [(1,)], {})


def test_bulk_cell_parsing_equals_the_per_cell_functions():
    """``cell_chunks``/``linked_chunks``/``segment_cells``/``parse_chunk_keys``
    (a listing or a chunk list parsed in one go) give what ``cell_chunk``/``linked_chunk`` give cell by cell,
    and ``chunks_linking_to`` inverts ``linked_chunk``: origins below zero,
    negative offsets, scales both ways, 1-3 axes."""
    import random

    from zarr_vectors_dask.format import naming as nm
    rnd = random.Random(5)
    for _ in range(200):
        nd = rnd.randint(1, 3)
        origin = [rnd.randint(-4, 4) for _ in range(nd)]
        chunks = [tuple(rnd.randint(-9, 20) for _ in range(nd)) for _ in range(rnd.randint(0, 8))]
        offset = nm.format_offsets([rnd.randint(-2, 2) for _ in range(nd)])
        listing = [nm.cell_path(offset, c, origin) for c in chunks] + ["zarr.json",
                                                                      f"{offset}/zarr.json"]
        cells = nm.segment_cells(listing).get(offset, [])
        got = nm.cell_chunks(cells, origin)
        assert [tuple(r) for r in got.tolist()] == chunks
        assert nm.parse_chunk_keys([nm.chunk_key(c) for c in chunks], nd).tolist() == \
            [list(c) for c in chunks]
        s_from = [rnd.choice([1, 2, 4]) for _ in range(nd)]
        s_to = [rnd.choice([1, 2, 4]) for _ in range(nd)]
        assert [tuple(r) for r in nm.linked_chunks(got, offset, s_from, s_to).tolist()] == \
            [nm.linked_chunk(c, offset, s_from, s_to) for c in chunks]
        # the maps and selections built on them, against the per-cell functions
        want_map: dict = {}
        for c in chunks:
            want_map.setdefault(c, set()).add(nm.linked_chunk(c, offset, s_from, s_to))
        assert nm.link_map([(offset, got)], s_from, s_to) == want_map
        # the inverse: every chunk that links into the targets, and no other
        some = set(rnd.sample(chunks, len(chunks) // 2))
        linked = {nm.linked_chunk(c, offset, s_from, s_to) for c in some}
        back = nm.chunks_linking_to(linked, offset, s_from, s_to)
        assert {nm.chunk_key(c) for c in some} <= back
        for key in back:
            assert nm.linked_chunk(nm.parse_chunk_key(key), offset, s_from, s_to) in linked
        for c in chunks:
            assert (nm.chunk_key(c) in back) == (nm.linked_chunk(c, offset, s_from, s_to) in linked)


def test_link_records_of_many_cells_and_a_torn_one():
    sizes = [cdc._LINK_CELL_HEAD.size + 16 * n for n in (0, 1, 7)]
    assert cdc.link_cells_records(sizes) == [cdc.link_cell_records(s) for s in sizes] == [0, 1, 7]
    with pytest.raises(Exception, match="a link cell of 33 bytes"):
        cdc.link_cells_records(sizes + [33])


def test_bulk_cell_parsing_refuses_a_key_of_another_rank():
    from zarr_vectors_dask.format import naming as nm
    with pytest.raises(ValueError, match="cell key '0/0' does not name a 3-d chunk"):
        nm.cell_chunks(["0/0", "0/0/0/0"], (0, 0, 0))
    with pytest.raises(ValueError, match="chunk key '0.0' does not name a 3-d chunk"):
        nm.parse_chunk_keys(["0.0", "0.0.0.0"], 3)


def test_documents_after_logged_changes_are_those_of_the_cells(tmp_path):
    """``commit.CellsAfter`` and ``family_documents_after``: a links family's
    documents from the ones it had plus the changes a ``changes_only``
    store logged (a cell rewritten with more records, one new in a new
    offset array, one removed, emptying its array) equal the documents of
    the family written whole from its cells; untouched arrays are not
    written again."""
    from zarr_vectors_dask.format import commit as cm
    from zarr_vectors_dask.format import naming as nm
    from zarr_vectors_dask.storage.store import Store

    def cells(counts):  # {(offset, chunk): records} -> store items
        out = {}
        for (seg, chunk), n in counts.items():
            rows = np.arange(2 * n, dtype=np.int64).reshape(n, 2)
            out[nm.cell_path(f"{base}/{seg}", chunk, (0, 0))] = \
                bytes(cdc.framed_link_cells(rows, [0], [n])[0])
        return out

    def family(counts):
        fam = cm.LinkFamily(1, 2, (0, 0), (4, 4))
        for (seg, chunk), n in sorted(counts.items()):
            fam.cells.setdefault(seg, []).append((chunk, n))
        return fam

    base = nm.links_family_path(1, 2)
    before = {("0.0", (0, 0)): 3, ("0.0", (1, 2)): 1, ("1.0", (2, 2)): 4, ("1.1", (0, 3)): 2}
    after = {("0.0", (0, 0)): 5, ("1.0", (2, 2)): 4, ("0.1", (3, 1)): 2}
    st = Store.from_url(str(tmp_path))
    st.put_many(cells(before))
    cm.write_families(st, [family(before)], sid_ndim=2)
    ch = st.changes_only(".zvdask/log")
    ch.put_many(cells(after))
    gone = [nm.cell_path(f"{base}/0.0", (1, 2), (0, 0)), nm.cell_path(f"{base}/1.1", (0, 3), (0, 0))]
    ch.remove_noted(gone, {})
    sizes = ch.logged_sizes()
    got = cm.CellsAfter()
    got.read_family(st, 1, 2)
    assert got.chunks == {f"{base}/0.0": {"0.0", "1.2"}, f"{base}/1.0": {"2.2"},
                          f"{base}/1.1": {"0.3"}, f"{base}/0.1": set()}  # (its folder, no doc)
    got.apply(sizes, base, (0, 0))
    assert got.touched == {f"{base}/0.0", f"{base}/0.1", f"{base}/1.1"}
    assert got.cells_in(f"{base}/0.0", {"0.0", "3.3"}, (0, 0)) == [f"{base}/0.0/c/0/0"]
    docs = cm.family_documents_after(st, 1, 2, (0, 0), (4, 4), got, sizes, 2)
    whole = cm.family_docs(st, family(after), 2)
    assert sorted(docs) == [f"{base}/0.0/zarr.json", f"{base}/0.1/zarr.json", f"{base}/zarr.json"]
    assert all(docs[k] == whole[k] for k in docs)  # 1.0's stands; 1.1 has no cells left
    assert json.loads(docs[f"{base}/zarr.json"])["attributes"]["num_links"] == 11
