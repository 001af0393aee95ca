"""Codecs in ``format.py`` against zarr-vectors' own encoders (no I/O)."""

import numpy as np
from zarr_vectors.encoding.ragged import encode_ragged_blob

from zarr_vectors_dask.format import codecs as cdc


def test_framed_link_cells_match_the_ragged_blob_encoder():
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 10**6, size=(50, 2))
    cuts = [(0, 1), (1, 17), (17, 50)]
    got = cdc.framed_link_cells(rows, [a for a, _ in cuts], [b for _, b in cuts])
    for (a, b), cell in zip(cuts, got):
        want = cdc.frame_cell(encode_ragged_blob([rows[a:b].astype(np.int64)], np.dtype(np.int64)))
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
