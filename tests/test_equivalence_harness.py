"""Self-test of the equivalence harness (tests/equivalence.py) on stores from
tests/stores.py, using only zarr-vectors' reference ``build_pyramid``.

(a) a reference pyramid is equivalent to a copy of itself, for every kind;
(b) perturbations made with zarr-vectors' own writer functions are caught
    with an AssertionError naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from equivalence import (SIDECAR, assert_equivalent, assert_same_pyramid,  # noqa: E402
                         compare_raw_files)
from stores import KINDS  # noqa: E402

from zarr_vectors.core.arrays import (  # noqa: E402
    list_chunk_keys,
    read_chunk_vertices,
    read_link_arrays,
    read_object_attribute_present_mask,
    read_object_attributes,
    read_object_manifest_rows,
    write_chunk_vertices,
    write_cross_level_links,
    write_object_attributes,
    write_object_index,
)
from zarr_vectors.core.store import (  # noqa: E402
    get_resolution_level,
    open_store,
    remove_resolution_level,
    update_level_metadata,
)
from zarr_vectors.multiresolution.coarsen import build_pyramid  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::zarr.errors.UnstableSpecificationWarning")

FACTORS = [(2, 1), (2, 2), (2.5, 2)]

#: Small stores so the whole module stays well under a minute.
SMALL: dict[str, dict] = {
    "points": dict(n_points=200),
    "points_2d": dict(n_points=250),
    "points_ids": dict(n_objects=12, n_points=300),
    "points_sparse_ids": dict(n_objects=10, n_points=250),
    "streamlines": dict(n_objects=10, max_len=50),
    "streamlines_2d": dict(n_objects=10, max_len=50),
    "skeletons": dict(n_objects=4, max_nodes=60),
    "graphs": dict(n_objects=4, max_nodes=70),
    "meshes": dict(n_objects=3),
}
assert set(SMALL) == set(KINDS)


def _build(kind: str, path: Path, *, seed: int = 11, sparsity_seed: int = 0) -> Path:
    KINDS[kind](path, seed=seed, **SMALL[kind])
    build_pyramid(
        str(path), factors=FACTORS, sparsity_seed=sparsity_seed,
        cross_level_depth=-1, cross_level_storage="explicit",
    )
    return path


def _fast_tmp(tmp_path_factory, name: str) -> tuple[Path, bool]:
    """A scratch dir in RAM (/dev/shm) when available: these stores are
    thousands of tiny files and a busy disk otherwise dominates the run."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"zvd-{name}-", dir=shm)), True
    return tmp_path_factory.mktemp(name), False


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``reference(kind) -> path`` of a cached reference pyramid."""
    cache: dict[str, Path] = {}
    base, owned = _fast_tmp(tmp_path_factory, "refs")

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = _build(kind, base / kind / "ref.zv")
        return cache[kind]

    yield get
    if owned:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_path(tmp_path_factory):  # noqa: F811 - RAM-backed override
    """Per-test scratch dir, RAM-backed when possible (see ``_fast_tmp``)."""
    base, owned = _fast_tmp(tmp_path_factory, "t")
    yield base
    if owned:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def copy_of(reference, tmp_path):
    """``copy_of(kind) -> path`` of a fresh copy (same store name)."""
    def make(kind: str) -> Path:
        dst = tmp_path / "copy" / "ref.zv"
        shutil.copytree(reference(kind), dst)
        return dst
    return make


# ---------------------------------------------------------------------------
# (a) positive cases
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_copy_is_equivalent(kind, reference, copy_of):
    ref = reference(kind)
    cp = copy_of(kind)
    assert_equivalent(ref, cp)  # includes validate(actual, level=3)
    diff = compare_raw_files(ref, cp)
    assert diff.identical, diff.summary()


@pytest.mark.parametrize("kind", ["meshes"])
def test_rebuild_under_other_name_is_bit_identical(kind, reference, tmp_path):
    """The reference is deterministic; the store name (RFC-8 ome.name, derived
    from the path at level-0 write time) is normalised by both helpers, by
    the raw one only when asked to."""
    other = _build(kind, tmp_path / "other_name.zv")
    assert_equivalent(reference(kind), other, check_validate=False)
    diff = compare_raw_files(reference(kind), other, other_store_name=True)
    assert diff.identical, diff.summary()
    strict = compare_raw_files(reference(kind), other)
    assert strict.differing == ["zarr.json"], strict.summary()


def test_implicit_object_store_ignores_sparsity_seed(reference, tmp_path):
    """A level-0 store without object_index is ONE implicit object, so
    sparsity never applies and the seed cannot matter."""
    other = _build("points_2d", tmp_path / "ref.zv", sparsity_seed=123)
    assert_equivalent(reference("points_2d"), other, check_validate=False)
    assert compare_raw_files(reference("points_2d"), other).identical


def test_empty_level_copy_is_equivalent(tmp_path):
    """Reference step 12: a level whose kept objects have no vertices.

    With the same seed at every level, ``default_rng(2).choice(6, 1)`` picks
    a row that ``choice(6, 3)`` dropped one level earlier, so level 2 keeps
    only an empty manifest and is written empty (level 3 follows suit).
    """
    ref = tmp_path / "a" / "ref.zv"
    KINDS["streamlines"](ref, seed=1, n_objects=6)
    out = build_pyramid(str(ref), factors=[(2, 2), (2, 6), (2, 1)],
                        sparsity_seed=2, cross_level_depth=-1,
                        cross_level_storage="explicit")
    assert [s["vertex_count"] for s in out["level_specs"]][1:] == [0, 0]
    cp = tmp_path / "b" / "ref.zv"
    shutil.copytree(ref, cp)
    assert_equivalent(ref, cp)
    assert compare_raw_files(ref, cp).identical
    # and a non-empty level in its place is caught
    other = tmp_path / "c" / "ref.zv"
    KINDS["streamlines"](other, seed=1, n_objects=6)
    build_pyramid(str(other), factors=[(2, 2), (2, 6), (2, 1)],
                  sparsity_seed=0, cross_level_depth=-1,
                  cross_level_storage="explicit")
    with pytest.raises(AssertionError):
        assert_equivalent(ref, other, check_validate=False)


def test_vertex_within_tolerance_passes(reference, copy_of):
    cp = copy_of("streamlines")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 2)
    cc = list_chunk_keys(lg)[0]
    frags = read_chunk_vertices(lg, cc, ndim=3)
    frags[0] = np.nextafter(frags[0], np.float32(np.inf)).astype(np.float32)
    write_chunk_vertices(lg, cc, frags, dtype=np.float32)
    assert_equivalent(reference("streamlines"), cp, check_validate=False)
    # ...but it is not bit-identical, and the raw helper says where.
    diff = compare_raw_files(reference("streamlines"), cp)
    assert not diff.only_in_expected and not diff.only_in_actual
    assert diff.differing and all(p.startswith("2/vertices/") for p in diff.differing), \
        diff.summary()


def test_rewriting_object_index_unchanged_passes(reference, copy_of):
    cp = copy_of("points_ids")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 2)
    ids, manifests = read_object_manifest_rows(lg)
    write_object_index(lg, dict(zip(ids.tolist(), manifests)), sid_ndim=3)
    assert_equivalent(reference("points_ids"), cp, check_validate=False)


def test_capability_order_is_ignored(reference, copy_of):
    cp = copy_of("points_ids")
    root = open_store(str(cp), mode="r+")
    zv = root.attrs.to_dict()["zarr_vectors"]
    zv["format_capabilities"] = list(reversed(zv["format_capabilities"]))
    zv["zv_version"] = "0.0.0-other"
    root.attrs.update({"zarr_vectors": zv})
    assert_equivalent(reference("points_ids"), cp, check_validate=False)
    # The files are not the reference's, and the raw comparison says so.
    assert compare_raw_files(reference("points_ids"), cp).differing == ["zarr.json"]


# ---------------------------------------------------------------------------
# the raw comparison is byte for byte
# ---------------------------------------------------------------------------

def _rewrite_json(path: Path, **dumps_kw) -> bytes:
    """Rewrite a ``zarr.json`` as the same JSON in other bytes."""
    doc = json.loads(path.read_bytes())
    new = json.dumps(doc, **dumps_kw).encode()
    path.write_bytes(new)
    return new


@pytest.mark.parametrize("how", [
    dict(indent=2), dict(separators=(",", ":")), dict(sort_keys=True)])
def test_same_json_in_other_bytes_differs(how, reference, copy_of):
    """Whitespace and key order of a metadata document count: the same
    parsed JSON in other bytes is a difference, named with its reason."""
    cp = copy_of("streamlines")
    fam = "0/links/+1/zarr.json"
    before = (cp / fam).read_bytes()
    assert _rewrite_json(cp / fam, **how) != before  # the premise
    diff = compare_raw_files(reference("streamlines"), cp)
    assert diff.differing == [fam], diff.summary()
    assert diff.json_diffs[fam][0].startswith("same JSON, other")


def test_number_spelling_differs(reference, copy_of):
    """``1`` and ``1.0`` read equal as JSON; as bytes they are not."""
    cp = copy_of("points")
    doc = cp / "1" / "zarr.json"
    raw = doc.read_bytes()
    level = json.loads(raw)
    assert json.dumps(level, indent=2).encode() == raw  # rewriting alone keeps the bytes
    block = level["attributes"]["zarr_vectors_level"]
    block["level"] = float(block["level"])
    doc.write_bytes(json.dumps(level, indent=2).encode())
    assert json.loads(doc.read_bytes()) == json.loads(raw)  # the premise
    diff = compare_raw_files(reference("points"), cp)
    assert diff.differing == ["1/zarr.json"], diff.summary()
    assert "number spelling" in diff.json_diffs["1/zarr.json"][0]


def test_exclusions_are_named(reference, copy_of):
    """Excluded paths are not compared, and the summary says why."""
    cp = copy_of("points_ids")
    (cp / ".zvdask").mkdir()
    (cp / ".zvdask" / "build.json").write_text("{}")
    assert compare_raw_files(reference("points_ids"), cp).only_in_actual == [
        ".zvdask/build.json"]
    diff = compare_raw_files(reference("points_ids"), cp, exclude=SIDECAR)
    assert diff.identical and diff.excluded == {
        SIDECAR[".zvdask/*"]: [".zvdask/build.json"]}
    assert SIDECAR[".zvdask/*"] in diff.summary()


# ---------------------------------------------------------------------------
# (b) perturbations must fail
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["points_ids", "skeletons"])
def test_different_sparsity_seed_fails(kind, reference, tmp_path):
    other = _build(kind, tmp_path / "ref.zv", sparsity_seed=1)
    with pytest.raises(AssertionError, match=r"level \d"):
        assert_equivalent(reference(kind), other, check_validate=False)
    assert compare_raw_files(reference(kind), other)  # truthy == differs


def test_moved_vertex_fails(reference, copy_of):
    cp = copy_of("points_ids")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 2)
    cc = list_chunk_keys(lg)[-1]
    frags = read_chunk_vertices(lg, cc, ndim=3)
    frags[-1] = (frags[-1] + np.float32(0.25)).astype(np.float32)
    write_chunk_vertices(lg, cc, frags, dtype=np.float32)
    with pytest.raises(AssertionError, match=rf"level 2 chunk \({cc[0]}, .*positions differ"):
        assert_equivalent(reference("points_ids"), cp, check_validate=False)


def test_same_pyramid_names_what_the_readers_see_first(reference, copy_of):
    """``assert_same_pyramid`` on a moved vertex fails as the readers see
    it (level and chunk), not only as a differing file."""
    cp = copy_of("points_ids")
    lg = get_resolution_level(open_store(str(cp), mode="r+"), 2)
    cc = list_chunk_keys(lg)[-1]
    frags = read_chunk_vertices(lg, cc, ndim=3)
    frags[-1] = (frags[-1] + np.float32(0.25)).astype(np.float32)
    write_chunk_vertices(lg, cc, frags, dtype=np.float32)
    with pytest.raises(AssertionError, match=rf"level 2 chunk \({cc[0]}, .*positions differ"):
        assert_same_pyramid(reference("points_ids"), cp)


def test_same_pyramid_fails_on_bytes_the_readers_agree_on(reference, copy_of):
    """The same JSON in other bytes reads equal, and still fails, naming
    the file; an untouched copy passes."""
    cp = copy_of("streamlines")
    assert assert_same_pyramid(reference("streamlines"), cp).identical
    _rewrite_json(cp / "0/links/+1/zarr.json", indent=2)
    with pytest.raises(AssertionError, match=r"readers agree, the files do not(.|\n)*"
                                             r"0/links/\+1/zarr\.json"):
        assert_same_pyramid(reference("streamlines"), cp)


def test_swapped_fragments_fail(reference, copy_of):
    cp = copy_of("streamlines")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 1)
    cc = next(c for c in list_chunk_keys(lg)
              if len(read_chunk_vertices(lg, c, ndim=3)) >= 2)
    frags = read_chunk_vertices(lg, cc, ndim=3)
    frags[0], frags[1] = frags[1], frags[0]
    write_chunk_vertices(lg, cc, frags, dtype=np.float32)
    with pytest.raises(AssertionError, match=r"level 1 chunk .*fragment 0 positions"):
        assert_equivalent(reference("streamlines"), cp, check_validate=False)


def test_extra_fragment_fails(reference, copy_of):
    cp = copy_of("points")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 3)
    cc = list_chunk_keys(lg)[0]
    frags = read_chunk_vertices(lg, cc, ndim=3)
    write_chunk_vertices(lg, cc, frags + [frags[-1].copy()], dtype=np.float32)
    with pytest.raises(AssertionError, match=r"level 3 chunk .*fragment count"):
        assert_equivalent(reference("points"), cp, check_validate=False)


def test_manifest_change_fails(reference, copy_of):
    cp = copy_of("streamlines")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 1)
    ids, manifests = read_object_manifest_rows(lg)
    row = next(i for i, m in enumerate(manifests) if len(m) >= 2)
    manifests[row] = list(reversed(manifests[row]))
    write_object_index(lg, dict(zip(ids.tolist(), manifests)), sid_ndim=3)
    with pytest.raises(AssertionError,
                       match=rf"level 1 object_index object {ids[row]} .*manifest differs"):
        assert_equivalent(reference("streamlines"), cp, check_validate=False)


def test_dropped_object_row_fails(reference, copy_of):
    cp = copy_of("points_ids")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 2)
    ids, manifests = read_object_manifest_rows(lg)
    table = dict(zip(ids.tolist(), manifests))
    table.pop(ids.tolist()[-1])
    write_object_index(lg, table, sid_ndim=3)
    with pytest.raises(AssertionError, match=r"level 2 object_index"):
        assert_equivalent(reference("points_ids"), cp, check_validate=False)


@pytest.mark.parametrize("attr", ["weight", "label", "color", "counts"])
def test_object_attribute_value_fails(attr, reference, copy_of):
    cp = copy_of("streamlines")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 2)
    data = read_object_attributes(lg, attr)
    mask = read_object_attribute_present_mask(lg, attr)
    mask = np.ones(len(data), np.uint8) if mask is None else mask
    row = int(np.flatnonzero(mask)[0])
    data = data.copy()
    data[row] = data[row] + 1
    write_object_attributes(lg, attr, data, present_mask=mask)
    with pytest.raises(AssertionError,
                       match=rf"level 2 object_attributes/{attr}: values differ"):
        assert_equivalent(reference("streamlines"), cp, check_validate=False)


def test_present_mask_change_fails(reference, copy_of):
    cp = copy_of("streamlines")
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, 3)
    data = read_object_attributes(lg, "weight")
    mask = read_object_attribute_present_mask(lg, "weight")
    assert mask is not None and mask.min() == 0  # sparsified level
    mask = mask.copy()
    mask[int(np.flatnonzero(mask)[0])] = 0
    write_object_attributes(lg, "weight", data, present_mask=mask)
    with pytest.raises(AssertionError, match=r"level 3 object_attributes/weight"):
        assert_equivalent(reference("streamlines"), cp, check_validate=False)


def test_missing_capability_fails(reference, copy_of):
    cp = copy_of("points_ids")
    root = open_store(str(cp), mode="r+")
    zv = root.attrs.to_dict()["zarr_vectors"]
    zv["format_capabilities"] = [c for c in zv["format_capabilities"]
                                 if c != "multiscale_links"]
    root.attrs.update({"zarr_vectors": zv})
    with pytest.raises(AssertionError, match=r"root: .*format_capabilities"):
        assert_equivalent(reference("points_ids"), cp, check_validate=False)


def test_level_metadata_change_fails(reference, copy_of):
    cp = copy_of("skeletons")
    root = open_store(str(cp), mode="r+")
    update_level_metadata(get_resolution_level(root, 2), object_sparsity=0.25)
    with pytest.raises(AssertionError, match=r"level 2: .*object_sparsity"):
        assert_equivalent(reference("skeletons"), cp, check_validate=False)


def test_missing_level_fails(reference, copy_of):
    cp = copy_of("meshes")
    root = open_store(str(cp), mode="r+")
    remove_resolution_level(root, 3)
    with pytest.raises(AssertionError, match=r"resolution levels differ"):
        assert_equivalent(reference("meshes"), cp, check_validate=False)


def _append_link(cp: Path, level: int, delta: int, *, duplicate: bool) -> None:
    root = open_store(str(cp), mode="r+")
    lg = get_resolution_level(root, level)
    chunks, vi = read_link_arrays(lg, delta=delta)
    src_c, src_v = chunks[:1, 0], vi[:1, 0]
    trg_c, trg_v = chunks[:1, 1], vi[:1, 1]
    if not duplicate:
        # Same endpoints' chunks, a different (still valid) local index.
        other = np.flatnonzero(
            (chunks[:, 1] == trg_c[0]).all(axis=1) & (vi[:, 1] != trg_v[0]))
        if other.size:
            trg_v = vi[other[:1], 1]
        else:
            src_v = src_v + 10_000  # no valid alternative: an out-of-range one
    write_cross_level_links(lg, src_c, src_v, trg_c, trg_v, chunks.shape[2],
                            delta=delta, mode="append")


def test_extra_link_record_fails(reference, copy_of):
    cp = copy_of("streamlines")
    _append_link(cp, 1, 1, duplicate=False)
    with pytest.raises(AssertionError, match=r"level 1 links delta \+1: record sets differ"):
        assert_equivalent(reference("streamlines"), cp, check_validate=False)


def test_duplicate_link_record_fails_only_as_multiset(reference, copy_of):
    cp = copy_of("points_ids")
    _append_link(cp, 2, -1, duplicate=True)
    with pytest.raises(AssertionError,
                       match=r"level 2 links delta -1: record multiplicities differ"):
        assert_equivalent(reference("points_ids"), cp, check_validate=False)
    # As a plain set the records agree; the family metadata (num_links) does not.
    with pytest.raises(AssertionError,
                       match=r"level 2 links delta -1: family metadata differs"):
        assert_equivalent(reference("points_ids"), cp, check_validate=False,
                          link_multiset=False)


def test_missing_link_family_fails(reference, copy_of):
    cp = copy_of("graphs")
    root = open_store(str(cp), mode="r+")
    get_resolution_level(root, 3).delete_subtree("links/-3")
    with pytest.raises(AssertionError, match=r"level 3 links: link deltas differ"):
        assert_equivalent(reference("graphs"), cp, check_validate=False)


def test_unreadable_actual_is_assertion(reference, tmp_path):
    with pytest.raises(AssertionError, match=r"cannot open actual store"):
        assert_equivalent(reference("points"), tmp_path / "does_not_exist.zv")
