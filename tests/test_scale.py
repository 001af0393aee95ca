"""The bounded-memory level-0 writer of the scale run (benchmarks/scale_level0.py)
writes exactly the store zarr-vectors' ``write_polylines`` writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from equivalence import assert_equivalent, compare_raw_files

_HERE = Path(__file__).resolve().parent


def _load_level0():
    spec = importlib.util.spec_from_file_location(
        "scale_level0", _HERE.parent / "benchmarks" / "scale_level0.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


L0 = _load_level0()
BOUNDS = ([0.0, 0.0, 0.0], [L0.BOX, L0.BOX, L0.BOX])


def _bench_lines(n_lines: int, seed: int, step: float) -> np.ndarray:
    """The single-shot draw of benchmarks/bench_pyramid.py's child_write."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0.0, L0.BOX, size=(n_lines, 1, 3))
    steps = rng.normal(0.0, step, size=(n_lines, L0.POINTS_PER_LINE - 1, 3))
    walk = np.concatenate([start, start + np.cumsum(steps, axis=1)], axis=1)
    walk = np.abs(walk) % (2 * L0.BOX)
    walk = np.where(walk >= L0.BOX, 2 * L0.BOX - walk, walk)
    return np.clip(walk, 0.0, np.nextafter(np.float32(L0.BOX), np.float32(0))).astype(np.float32)


def test_batched_lines_are_the_benchmark_lines():
    whole = _bench_lines(250, seed=3, step=9.0)
    batched = np.concatenate(list(L0.random_walk_batches(250, seed=3, step=9.0, batch_lines=37)))
    assert batched.dtype == whole.dtype
    np.testing.assert_array_equal(batched, whole)


def test_partitioned_writer_matches_write_polylines(tmp_path):
    from zarr_vectors.types.polylines import write_polylines

    # Large steps so lines cross chunk boundaries often (many bridges, many
    # fragments per chunk), small batches and sessions so every pass runs in
    # several parts.
    n_lines = 60
    lines = _bench_lines(n_lines, seed=1, step=25.0)
    ref, new = tmp_path / "ref.zv", tmp_path / "new.zv"
    expected = write_polylines(str(ref), list(lines), chunk_shape=L0.CHUNK_SHAPE,
                               bin_shape=L0.BIN_SHAPE, bounds=BOUNDS)
    got = L0.write_polylines_partitioned(
        new, L0.random_walk_batches(n_lines, seed=1, step=25.0, batch_lines=17),
        spill_dir=str(tmp_path), session_vertices=700)
    for key in ("polyline_count", "vertex_count", "chunk_count", "cross_chunk_link_count"):
        assert got[key] == expected[key], key
    assert expected["cross_chunk_link_count"] > n_lines  # the bridges path is exercised
    diff = compare_raw_files(ref, new, other_store_name=True)  # written as ref.zv and new.zv
    assert not (diff.only_in_expected or diff.only_in_actual or diff.differing), diff
    # Read back through zarr-vectors' readers, and its validator (level 3).
    assert_equivalent(ref, new, levels=[0])
    # The spill directory is removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.zv", "ref.zv"]


def test_partitioned_writer_rejects_out_of_bounds(tmp_path):
    from zarr_vectors.exceptions import MetadataError

    line = np.array([[1.0, 1.0, 1.0], [1001.0, 5.0, 5.0]], dtype=np.float32)
    with pytest.raises(MetadataError):
        L0.write_polylines_partitioned(tmp_path / "oob.zv", [[line]], spill_dir=str(tmp_path))
