"""Per-vertex attributes at every level (issue 14, part 1; opt-in).

Each coarse level's ``vertex_attributes/<name>`` must hold, per metavertex,
the aggregate of the source vertices in its bin, weighted as the centroid
weights them.  The expectation is computed here by brute force with numpy
on the *reference's* own coarse level: its ``+1`` links say which
metavertex each source vertex went to, its manifests which objects were
kept (and so how often each source fragment counts).  Stores are written
by zarr-vectors' own writers.
"""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
from zarr_vectors.core.arrays import (
    attribute_buffer,
    list_chunk_keys,
    read_object_manifest_rows,
    read_vertex_fragment_index,
)
from zarr_vectors.core.store import open_store
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
from zarr_vectors.types.points import read_points, write_points
from zarr_vectors.types.polylines import read_polylines, write_polylines
from zarr_vectors.validate import validate

import zarr_vectors_dask as zd
from zarr_vectors_dask.errors import PlanError
from zarr_vectors_dask.step.attributes import MODES
from equivalence import compare_raw_files, link_records
from stores import BIN, CHUNK, _blobs, _streamlines

FACTORS = [(2, 1), (2, 2), (2, 2)]  # sparsity: dropped objects, shared fragments
KW = dict(factors=FACTORS, sparsity_seed=0, cross_level_depth=1,
          cross_level_storage="explicit")


# ------------------------------------------------------------------ stores
def make_streamlines(path, seed=0, n_objects=60):
    """Streamlines with a float attribute holding NaNs, a small-range
    integer label (ties happen) and a 3-vector."""
    rng = np.random.default_rng(seed)
    lines = _streamlines(rng, n_objects, 3, 10, 80, 1.5)
    fa, label, direction = [], [], []
    for line in lines:
        v = rng.random(len(line)).astype(np.float32)
        v[rng.random(len(line)) < 0.15] = np.nan
        fa.append(v)
        label.append(rng.integers(0, 4, len(line)).astype(np.int32))
        direction.append(rng.normal(size=(len(line), 3)).astype(np.float32))
    write_polylines(str(path), lines, chunk_shape=(CHUNK,) * 3, bin_shape=(BIN,) * 3,
                    vertex_attributes={"fa": fa, "label": label, "dir": direction})


def make_points(path, seed=0, n_points=1500):
    """A point cloud (one implicit object) with float64, int16 and 2-vector
    attributes."""
    rng = np.random.default_rng(seed)
    pos, _ = _blobs(rng, n_points, 3, n_blobs=8, spread=4.0)
    conf = rng.random(n_points)
    conf[rng.random(n_points) < 0.1] = np.nan
    write_points(str(path), pos, chunk_shape=(CHUNK,) * 3, bin_shape=(BIN,) * 3,
                 vertex_attributes={"conf": conf,
                                    "cls": rng.integers(-2, 3, n_points).astype(np.int16),
                                    "vec": rng.normal(size=(n_points, 2)).astype(np.float32)})


KINDS = {"streamlines": make_streamlines, "points": make_points}


@pytest.fixture
def stores(tmp_path):
    def make(kind, seed=0):
        base = tmp_path / "level0.zv"
        KINDS[kind](base, seed=seed)
        ref, ours = tmp_path / "ref.zv", tmp_path / "ours.zv"
        shutil.copytree(base, ref)
        shutil.copytree(base, ours)
        return str(base), str(ref), str(ours)
    return make


# ------------------------------------------------------------------ reading
def _level(path, level):
    return open_store(path)[str(level)]


def _attr_names(lg):
    return sorted(lg["vertex_attributes"].children())


def _attr_dtype(lg, name):
    return np.dtype(lg.read_array_meta(f"vertex_attributes/{name}")["dtype"])


def _chunk_rows(lg, name, cc):
    """A chunk's attribute rows, ``(n_vertices, width)``, through
    zarr-vectors' own decoder."""
    key = ".".join(str(c) for c in cc)
    fi = read_vertex_fragment_index(lg, cc)
    return attribute_buffer(lg.read_bytes(f"vertex_attributes/{name}", key), fi,
                            _attr_dtype(lg, name))


def _fragment_weights(ref_src, ref_trg):
    """How often each source fragment counts: once per reference to it
    from a kept object (kept: non-empty manifest at the coarse level)."""
    if "object_index" not in set(ref_src.children()):
        return None  # one implicit object: every fragment once
    src_ids, src_man = read_object_manifest_rows(ref_src)
    trg_ids, trg_man = read_object_manifest_rows(ref_trg)
    kept = {int(i) for i, m in zip(np.asarray(trg_ids).tolist(), trg_man) if len(m)}
    weights = Counter()
    for oid, man in zip(np.asarray(src_ids).tolist(), src_man):
        if int(oid) in kept:
            for cc, f in man:
                weights[(tuple(int(c) for c in cc), int(f))] += 1
    return weights


def _aggregate(mode, values, weights, dtype, source_is_count):
    """The brute-force aggregate of one column of one metavertex."""
    values = np.asarray(values)
    weights = np.asarray(weights, dtype=np.int64)
    if mode == "count":
        return int((values.astype(np.int64) * weights).sum()) if source_is_count \
            else int(weights.sum())
    ok = ~np.isnan(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)
    x, w = values[ok], weights[ok]
    if x.size == 0:
        return np.nan
    if mode == "mean":
        return float((x.astype(np.float64) * w).sum() / w.sum())
    if mode == "sum":
        return float((x.astype(np.float64) * w).sum()) if dtype.kind == "f" \
            else int((x.astype(np.int64) * w).sum())
    if mode == "min":
        return x.min()
    if mode == "max":
        return x.max()
    assert mode == "mode"
    tally = defaultdict(int)
    for v, k in zip(x.tolist(), w.tolist()):
        tally[v] += k
    best = max(tally.values())
    return min(v for v, k in tally.items() if k == best)


def expected_level(base, ref, ours, level, modes):
    """``{name: {chunk: (n_metavertices, width) array}}`` of level
    ``level``, by brute force on the reference's coarse level."""
    src_path = base if level == 1 else ours
    src = _level(src_path, level - 1)
    ref_src, ref_trg = _level(ref, level - 1), _level(ref, level)
    weights = _fragment_weights(ref_src, ref_trg)
    parent = {fine: coarse for fine, coarse in link_records(ref_src, +1)}
    groups = defaultdict(list)  # metavertex -> [(source chunk, vertex, weight)]
    for cc in list_chunk_keys(ref_src):
        cc = tuple(int(c) for c in cc)
        fi = read_vertex_fragment_index(ref_src, cc)
        for f in range(fi.num_fragments):
            w = 1 if weights is None else weights.get((cc, f), 0)
            if w == 0:
                continue
            for vi in np.asarray(fi.indices(f)).tolist():
                groups[parent[(cc, int(vi))]].append((cc, int(vi), w))
    out = {}
    for name in _attr_names(src):
        mode = modes[name]
        dtype = _attr_dtype(src, name)
        source_is_count = mode == "count" and level > 1
        rows = {cc: _chunk_rows(src, name, cc) for cc in
                {tuple(int(c) for c in cc) for cc in list_chunk_keys(src)}}
        per_chunk = {}
        for cc in list_chunk_keys(ref_trg):
            cc = tuple(int(c) for c in cc)
            n = len(read_vertex_fragment_index(ref_trg, cc).ranges())
            cols = []
            for mv in range(n):
                members = groups[(cc, mv)]
                assert members, f"metavertex {cc}/{mv} of the reference has no weighted vertex"
                vals = np.stack([rows[c][v] for c, v, _ in members])
                ws = [w for _, _, w in members]
                cols.append([_aggregate(mode, vals[:, j], ws, dtype, source_is_count)
                             for j in range(1 if mode == "count" else vals.shape[1])])
            per_chunk[cc] = np.asarray(cols, dtype=np.float64 if mode != "count" and
                                       (dtype.kind == "f" or mode == "mean") else np.int64)
        out[name] = per_chunk
    return out


def default_modes(path):
    lg = _level(path, 0)
    return {n: "mean" if _attr_dtype(lg, n).kind == "f" else "mode" for n in _attr_names(lg)}


def check_pyramid(base, ref, ours, modes, levels=len(FACTORS)):
    """Every coarse level: same vertices as the reference, attributes equal
    to the brute force, declared and readable by zarr-vectors' readers."""
    for level in range(1, levels + 1):
        ref_lg, our_lg = _level(ref, level), _level(ours, level)
        chunks = [tuple(int(c) for c in cc) for cc in list_chunk_keys(ref_lg)]
        assert chunks == [tuple(int(c) for c in cc) for cc in list_chunk_keys(our_lg)]
        for cc in chunks:
            key = ".".join(map(str, cc))
            assert ref_lg.read_bytes("vertices", key) == our_lg.read_bytes("vertices", key)
        meta = our_lg.attrs.to_dict()["zarr_vectors_level"]
        assert "vertex_attributes" in meta["arrays_present"]
        assert _attr_names(our_lg) == sorted(modes)
        expected = expected_level(base, ref, ours, level, modes)
        for name, per_chunk in expected.items():
            want_dtype = _attr_dtype(_level(base, 0), name)
            got_dtype = _attr_dtype(our_lg, name)
            mode = modes[name]
            if mode == "count":
                assert got_dtype == np.int64
            elif mode == "mean" and want_dtype.kind != "f":
                assert got_dtype == np.float64
            elif mode == "sum" and want_dtype.kind != "f":
                assert got_dtype == np.int64
            else:
                assert got_dtype == want_dtype
            arr_meta = our_lg.read_array_meta(f"vertex_attributes/{name}")
            assert arr_meta["aggregation"] == mode
            for cc, want in per_chunk.items():
                got = _chunk_rows(our_lg, name, cc)
                assert got.shape == want.shape, (level, name, cc)
                where = f"level {level} {name} ({mode}) chunk {cc}"
                if got.dtype.kind == "f":
                    np.testing.assert_allclose(got.astype(np.float64), want, rtol=1e-6,
                                               equal_nan=True, err_msg=where)
                else:
                    np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=where)
    assert validate(ours, level=3).ok


def check_readers(ours, kind, modes):
    """zarr-vectors' own readers return every attribute at every level,
    one row per vertex they return."""
    for level in range(1, len(FACTORS) + 1):
        if kind == "streamlines":
            out = read_polylines(ours, level=level)
            n = sum(len(p) for p in out["polylines"])
        else:
            out = read_points(ours, level=level, attribute_names=sorted(modes))
            n = len(out["positions"])
        assert sorted(out["vertex_attributes"]) == sorted(modes), (level, out.keys())
        for name, col in out["vertex_attributes"].items():
            assert len(col) == n, (level, name)


# ------------------------------------------------------------------ tests
def _kind_mode_params():
    """The defaults, ``mean`` and ``mode`` (the histogram) in CI, on
    streamlines and points; the other modes in the slow run (each is
    also in ``test_mixed_modes_and_default``'s one build)."""
    out = []
    for kind in sorted(KINDS):
        for mode in [None, *MODES]:
            quick = mode in (None, "mode") or (kind == "streamlines" and mode == "mean")
            out.append(pytest.param(kind, mode, marks=() if quick else pytest.mark.slow))
    return out


@pytest.mark.parametrize("kind, mode", _kind_mode_params())
def test_aggregates_equal_brute_force(kind, mode, stores, local_client):
    base, ref, ours = stores(kind, seed=len(str(mode)))
    modes = default_modes(base)
    if mode is not None:
        modes = {n: mode for n in modes}
    expected_summary = reference_build_pyramid(ref, **KW)
    summary = zd.build_pyramid(ours, client=local_client, vertex_attributes="aggregate",
                               attribute_aggregation=None if mode is None else modes, **KW)
    assert summary == expected_summary
    check_pyramid(base, ref, ours, modes)
    if mode in (None, "max"):
        check_readers(ours, kind, modes)


@pytest.mark.parametrize("asked, modes", [
    ({"fa": "max", "label": "count"}, {"fa": "max", "label": "count", "dir": "mean"}),
    ({"fa": "min", "label": "sum", "dir": "sum"}, {"fa": "min", "label": "sum", "dir": "sum"}),
])
def test_mixed_modes_and_default(stores, local_client, asked, modes):
    """A mapping for some attributes; the rest get the dtype default.
    Between them, every mode the quick brute-force runs leave out."""
    base, ref, ours = stores("streamlines", seed=7)
    reference_build_pyramid(ref, **KW)
    zd.build_pyramid(ours, client=local_client, vertex_attributes="aggregate",
                     attribute_aggregation=asked, **KW)
    check_pyramid(base, ref, ours, modes)


def test_option_off_is_the_reference(stores, local_client):
    """A store with per-vertex attributes, option off: the reference's
    pyramid, file for file."""
    _, ref, ours = stores("streamlines", seed=3)
    reference_build_pyramid(ref, **KW)
    zd.build_pyramid(ours, client=local_client, **KW)
    diff = compare_raw_files(ref, ours)
    assert diff.identical, diff.summary()


@pytest.mark.parametrize("kwargs, message", [
    (dict(vertex_attributes="aggregate", attribute_aggregation={"nope": "mean"}),
     "'nope'"),
    (dict(vertex_attributes="aggregate", attribute_aggregation={"fa": "median"}),
     "'median'"),
    (dict(vertex_attributes=None, attribute_aggregation={"fa": "mean"}),
     "vertex_attributes"),
    (dict(vertex_attributes="yes"), "vertex_attributes"),
])
def test_bad_requests_fail_before_writing(kwargs, message, stores, local_client):
    _, _, ours = stores("streamlines")
    with pytest.raises(PlanError, match=message):
        zd.build_pyramid(ours, client=local_client, **KW, **kwargs)
    assert not (open_store(ours).children() and "1" in set(open_store(ours).children()))


def test_cli_parses_aggregation():
    from zarr_vectors_dask.cli import build_parser
    args = build_parser().parse_args(["pyramid", "s.zv", "--factors", "2:1",
                                      "--vertex-attributes", "--aggregate", "fa=mean,label=mode"])
    assert args.vertex_attributes and args.aggregate == {"fa": "mean", "label": "mode"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pyramid", "s.zv", "--factors", "2:1",
                                   "--aggregate", "fa=median"])


def test_finished_pyramid_is_checked_for_attributes(stores, local_client):
    """A finished pyramid is kept only if its per-vertex attributes are
    what is asked: resuming with the same request rewrites nothing,
    with other aggregations (or none) is refused naming the difference."""
    from zarr_vectors_dask.errors import BuildError
    _, ref, ours = stores("points")
    asked = dict(vertex_attributes="aggregate", attribute_aggregation={"cls": "max"})
    zd.build_pyramid(ours, client=local_client, **asked, **KW)
    # resume=True on a finished pyramid: nothing to do when it is the one asked.
    import os
    stamp = os.stat(os.path.join(ours, "1", "vertex_attributes", "cls", "zarr.json")).st_mtime_ns
    zd.build_pyramid(ours, client=local_client, resume=True, **asked, **KW)
    assert os.stat(os.path.join(ours, "1", "vertex_attributes", "cls",
                                "zarr.json")).st_mtime_ns == stamp
    with pytest.raises(BuildError, match="per-vertex attributes"):
        zd.build_pyramid(ours, client=local_client, resume=True, **KW)
    with pytest.raises(BuildError, match="per-vertex attributes"):
        zd.build_pyramid(ours, client=local_client, resume=True, vertex_attributes="aggregate",
                         **KW)
    reference_build_pyramid(ref, **KW)  # the reference's pyramid has none
    with pytest.raises(BuildError, match="per-vertex attributes"):
        zd.build_pyramid(ref, client=local_client, resume=True, **asked, **KW)


def test_compressed_source(tmp_path, local_client):
    """Attribute cells of a zstd-compressed level 0 are read through zarr."""
    rng = np.random.default_rng(5)
    lines = _streamlines(rng, 30, 3, 10, 60, 1.5)
    fa = [rng.random(len(p)).astype(np.float32) for p in lines]
    label = [rng.integers(0, 3, len(p)).astype(np.int64) for p in lines]
    base = tmp_path / "level0.zv"
    write_polylines(str(base), lines, chunk_shape=(CHUNK,) * 3, bin_shape=(BIN,) * 3,
                    vertex_attributes={"fa": fa, "label": label}, compressor="zstd")
    ref, ours = str(tmp_path / "ref.zv"), str(tmp_path / "ours.zv")
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    reference_build_pyramid(ref, **KW)
    zd.build_pyramid(ours, client=local_client, vertex_attributes="aggregate", **KW)
    check_pyramid(str(base), ref, ours, {"fa": "mean", "label": "mode"})


def test_coarsen_level_writes_the_same_attributes(stores, tmp_path, local_client):
    """``coarsen_level`` takes the same options and writes the same
    attribute cells and documents as the first step of ``build_pyramid``;
    they hold the brute-force aggregates over the reference's
    ``coarsen_level``, and every other file is the reference's."""
    import json
    import os

    from zarr_vectors.multiresolution.coarsen import coarsen_level as reference_coarsen_level
    base, one, two = stores("streamlines", seed=11)
    ref = str(tmp_path / "reference.zv")
    shutil.copytree(base, ref)
    reference_coarsen_level(ref, 0, 1, coarsen_factor=2.0, cross_level_storage="explicit")
    asked = dict(vertex_attributes="aggregate", attribute_aggregation={"label": "max"})
    zd.coarsen_level(one, 0, 1, coarsen_factor=2.0, cross_level_storage="explicit",
                     client=local_client, **asked)
    check_pyramid(base, ref, one, dict(default_modes(base), label="max"), levels=1)
    # Besides the attributes, only level 1's document differs: it lists them.
    diff = compare_raw_files(ref, one, ignore=lambda p: p.startswith("1/vertex_attributes/")
                             or p == "1/zarr.json")
    assert diff.identical, diff.summary()
    docs = [json.load(open(os.path.join(p, "1", "zarr.json"))) for p in (ref, one)]
    present = docs[1]["attributes"]["zarr_vectors_level"]["arrays_present"]
    present.remove("vertex_attributes")
    assert docs[1] == docs[0]
    zd.build_pyramid(two, factors=[(2, 1)], cross_level_storage="explicit",
                     client=local_client, **asked)
    files = []
    for top, _, names in os.walk(os.path.join(one, "1", "vertex_attributes")):
        files += [os.path.relpath(os.path.join(top, n), one) for n in names]
    assert len(files) > 4
    for f in files:
        with open(os.path.join(one, f), "rb") as a, open(os.path.join(two, f), "rb") as b:
            assert a.read() == b.read(), f
    assert "vertex_attributes" in _level(one, 1).attrs.to_dict()["zarr_vectors_level"][
        "arrays_present"]
    assert validate(one, level=3).ok


@pytest.mark.integration
@pytest.mark.slow  # S3 variant; per-vertex attributes on local stores run in CI
def test_on_s3(s3_server, stores, tmp_path, local_client):
    """Built straight on S3 (SeaweedFS): the same aggregates."""
    base, ref, _ = stores("streamlines", seed=13)
    reference_build_pyramid(ref, **KW)
    bucket = s3_server.new_bucket()
    fs = s3_server.fs()
    fs.put(base, f"{bucket}/x.zv", recursive=True)
    modes = {"fa": "min", "label": "mode", "dir": "sum"}
    zd.build_pyramid(s3_server.url(bucket, "x.zv"), storage_options=s3_server.storage_options,
                     client=local_client, vertex_attributes="aggregate",
                     attribute_aggregation=modes, **KW)
    ours = str(tmp_path / "from-s3.zv")
    fs.get(f"{bucket}/x.zv", ours, recursive=True)
    check_pyramid(base, ref, ours, modes)
