"""Equivalence checks between two zarr-vectors pyramid stores.

``assert_equivalent(expected, actual)`` reads both stores exclusively
through zarr-vectors' own readers (``zarr_vectors.core.store`` /
``zarr_vectors.core.arrays``) and checks, per the project's
reference-semantics "How equivalence is judged":

* the same resolution levels;
* the same root metadata (``format_capabilities`` as a set, ``zv_version``
  ignored, ``multiscales`` and the RFC-8 ``ome`` block compared; an ``ome``
  ``name`` equal to the name zarr-vectors derives from that store's own
  path is normalised first, since it only records what the directory was
  called when level 0 was written) and the same level metadata (raw
  ``zarr_vectors_level`` block and the parsed ``LevelMetadata``);
* the same arrays at every level;
* the same chunk set per level and, per chunk, the same fragments in the
  same order with positions equal within ``rtol`` (default 1e-6);
* the same ``object_index`` (array metadata, object ids, decoded manifests
  exactly, and the raw manifest bytes);
* the same object attributes (dtype, shape, fill value, values NaN-aware)
  and present masks;
* the same link deltas per level, the same family metadata per delta and
  the same set of records per delta (and, by default, the same multiplicity);
* ``zarr_vectors.validate.validate(actual, level=3).ok``.

Every failure raises ``AssertionError`` naming the level / chunk / object /
attribute / delta that differs.  A reader that raises on the *actual* store
is also reported as ``AssertionError``.

``compare_raw_files(expected, actual)`` compares the two directory trees
byte for byte, every file and every ``zarr.json`` included; what it leaves
out is named by the caller with its reason (``exclude=``).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
import math
import os
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zarr_vectors.core.arrays import (
    list_chunk_keys,
    list_link_deltas,
    list_link_offsets,
    read_chunk_vertices,
    read_link_arrays,
    read_object_attribute_present_mask,
    read_object_attributes,
    read_object_manifest_rows,
    vertices_dtype,
)
from zarr_vectors.core.ome import derive_store_name
from zarr_vectors.core.paths import links_group_path
from zarr_vectors.core.store import (
    get_resolution_level,
    list_resolution_levels,
    open_store,
    read_level_metadata,
    read_root_metadata,
)
from zarr_vectors.validate import validate

__all__ = [
    "assert_equivalent",
    "assert_same_pyramid",
    "assert_sharded_matches",
    "sharded_arrays",
    "compare_raw_files",
    "RawDiff",
    "SIDECAR",
    "link_records",
]

_VERTICES = "vertices"
_VERTEX_FRAGMENTS = "vertex_fragments"
_OBJECT_INDEX = "object_index"
_OBJECT_ATTRIBUTES = "object_attributes"
_MAX_LISTED = 8


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def _fail(where: str, what: str) -> None:
    raise AssertionError(f"{where}: {what}")


def _short(items, n: int = _MAX_LISTED) -> str:
    items = list(items)
    head = ", ".join(repr(i) for i in items[:n])
    return f"[{head}{', ...' if len(items) > n else ''}] ({len(items)} total)"


def _read(side: str, where: str, fn: Callable[..., Any], *args, **kwargs):
    """Call a reader; turn a failure on the actual store into AssertionError."""
    try:
        return fn(*args, **kwargs)
    except AssertionError:
        raise
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        if side == "actual":
            raise AssertionError(
                f"{where}: reading the ACTUAL store failed: "
                f"{type(e).__name__}: {e}"
            ) from e
        raise


def _both(where: str, fn: Callable[..., Any], exp_args: tuple, act_args: tuple,
          **kwargs):
    return (
        _read("expected", where, fn, *exp_args, **kwargs),
        _read("actual", where, fn, *act_args, **kwargs),
    )


def _array_meta(group, path: str) -> dict[str, Any]:
    return group.read_array_meta(path)


def _fill_value(group, path: str) -> Any:
    return group.read_array_fill_value(path)


def _array_attrs(group, path: str) -> dict[str, Any]:
    return group.read_array_attrs(path)


def _to_plain(x: Any) -> Any:
    """JSON-ish normal form: tuples -> lists, numpy scalars -> python."""
    if isinstance(x, dict):
        return {str(k): _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_plain(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    return x


def _diff_values(a: Any, b: Any, path: str = "", *, rel: float = 1e-9) -> list[str]:
    """Recursive structural diff; floats compared with a tiny relative tol."""
    a, b = _to_plain(a), _to_plain(b)
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            p = f"{path}.{k}" if path else k
            if k not in a:
                out.append(f"{p}: missing in expected, actual={b[k]!r}")
            elif k not in b:
                out.append(f"{p}: missing in actual, expected={a[k]!r}")
            else:
                out.extend(_diff_values(a[k], b[k], p, rel=rel))
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} != {len(b)} "
                    f"(expected={a!r}, actual={b!r})"]
        for i, (x, y) in enumerate(zip(a, b)):
            out.extend(_diff_values(x, y, f"{path}[{i}]", rel=rel))
        return out
    if (isinstance(a, (int, float)) and isinstance(b, (int, float))
            and not isinstance(a, bool) and not isinstance(b, bool)):
        fa, fb = float(a), float(b)
        if math.isnan(fa) and math.isnan(fb):
            return []
        if fa == fb or math.isclose(fa, fb, rel_tol=rel, abs_tol=0.0):
            return []
        return [f"{path}: expected={a!r} actual={b!r}"]
    if a != b:
        return [f"{path}: expected={a!r} actual={b!r}"]
    return []


def _raise_diffs(where: str, what: str, diffs: list[str]) -> None:
    if diffs:
        body = "; ".join(diffs[:_MAX_LISTED])
        more = f" (+{len(diffs) - _MAX_LISTED} more)" if len(diffs) > _MAX_LISTED else ""
        _fail(where, f"{what} differs: {body}{more}")


def _store_stem(store: Any) -> str | None:
    """The name zarr-vectors derives for a store from its path (the RFC-8
    ``ome.name`` default), or ``None`` when ``store`` is not path-like."""
    try:
        return derive_store_name(str(Path(os.fspath(store)).resolve()))
    except TypeError:
        return None


# ---------------------------------------------------------------------------
# root metadata
# ---------------------------------------------------------------------------

def _normalised_root_attrs(root, stem: str | None) -> dict[str, Any]:
    attrs = _to_plain(root.attrs.to_dict())
    zv = dict(attrs.get("zarr_vectors", {}))
    zv.pop("zv_version", None)
    if "format_capabilities" in zv:
        zv["format_capabilities"] = sorted(set(zv["format_capabilities"]))
    attrs["zarr_vectors"] = zv
    ome = attrs.get("ome")
    if isinstance(ome, dict) and stem is not None and ome.get("name") == stem:
        ome = dict(ome)
        ome["name"] = "<store name>"
        attrs["ome"] = ome
    return attrs


def _parsed_root_meta(root) -> dict[str, Any]:
    d = _to_plain(dict(vars(read_root_metadata(root))))
    d.pop("zv_version", None)
    if d.get("format_capabilities") is not None:
        d["format_capabilities"] = sorted(set(d["format_capabilities"]))
    return d


def _compare_root(exp_root, act_root, exp_path, act_path) -> None:
    where = "root"
    e_parsed, a_parsed = _both(where, _parsed_root_meta, (exp_root,), (act_root,))
    _raise_diffs(where, "parsed RootMetadata", _diff_values(e_parsed, a_parsed))
    e_raw = _normalised_root_attrs(exp_root, _store_stem(exp_path))
    a_raw = _normalised_root_attrs(act_root, _store_stem(act_path))
    # Compare the blocks separately for clearer messages.
    for key in sorted(set(e_raw) | set(a_raw)):
        if key not in e_raw:
            _fail(where, f"attribute block {key!r} present only in actual")
        if key not in a_raw:
            _fail(where, f"attribute block {key!r} missing in actual")
        _raise_diffs(where, f"root attributes[{key!r}]",
                     _diff_values(e_raw[key], a_raw[key], key))


# ---------------------------------------------------------------------------
# per level
# ---------------------------------------------------------------------------

def _compare_level_meta(exp_root, act_root, exp_lg, act_lg, level: int) -> None:
    where = f"level {level}"
    e_raw = _to_plain(exp_lg.attrs.to_dict())
    a_raw = _to_plain(act_lg.attrs.to_dict())
    _raise_diffs(where, "level attributes (zarr_vectors_level)",
                 _diff_values(e_raw, a_raw))
    e_lm, a_lm = _both(where, read_level_metadata, (exp_root, level), (act_root, level))
    _raise_diffs(where, "parsed LevelMetadata",
                 _diff_values(dict(vars(e_lm)), dict(vars(a_lm))))


def _compare_children(exp_lg, act_lg, level: int) -> None:
    e, a = set(exp_lg.children()), set(act_lg.children())
    if e != a:
        _fail(f"level {level}",
              f"arrays/groups present differ: only in expected {sorted(e - a)}, "
              f"only in actual {sorted(a - e)}")


def _compare_vertices(exp_lg, act_lg, level: int, ndim: int, *,
                      rtol: float, atol: float) -> None:
    where = f"level {level}"
    e_dt, a_dt = _both(where, vertices_dtype, (exp_lg,), (act_lg,))
    if np.dtype(e_dt) != np.dtype(a_dt):
        _fail(where, f"vertices dtype {e_dt} != {a_dt}")
    vertex_keys: list[tuple[int, ...]] = []
    for arr in (_VERTICES, _VERTEX_FRAGMENTS):
        e_keys, a_keys = _both(where, list_chunk_keys, (exp_lg, arr), (act_lg, arr))
        e_set = {tuple(int(c) for c in k) for k in e_keys}
        a_set = {tuple(int(c) for c in k) for k in a_keys}
        if e_set != a_set:
            _fail(where, f"{arr} chunk set differs: "
                         f"missing in actual {_short(sorted(e_set - a_set))}; "
                         f"extra in actual {_short(sorted(a_set - e_set))}")
        if arr == _VERTICES:
            # list_chunk_keys order: the chunk-major order the format uses.
            vertex_keys = [tuple(int(c) for c in k) for k in e_keys]
    keys = [_chunk_key_str(cc) for cc in vertex_keys]
    plan = [(_VERTICES, keys), (_VERTEX_FRAGMENTS, keys)]
    with ExitStack() as stack:
        _read("expected", where, stack.enter_context, exp_lg.batched_reads(plan))
        _read("actual", where, stack.enter_context, act_lg.batched_reads(plan))
        _compare_vertex_chunks(exp_lg, act_lg, vertex_keys, level, ndim, e_dt, a_dt,
                               rtol=rtol, atol=atol)


def _chunk_key_str(cc) -> str:
    return ".".join(str(int(c)) for c in cc)


def _compare_vertex_chunks(exp_lg, act_lg, chunk_keys, level, ndim, e_dt, a_dt, *,
                           rtol, atol) -> None:
    for cc in chunk_keys:
        cw = f"level {level} chunk {cc}"
        e_frags = _read("expected", cw, read_chunk_vertices, exp_lg, cc,
                        dtype=e_dt, ndim=ndim)
        a_frags = _read("actual", cw, read_chunk_vertices, act_lg, cc,
                        dtype=a_dt, ndim=ndim)
        if len(e_frags) != len(a_frags):
            _fail(cw, f"fragment count {len(e_frags)} (expected) != "
                      f"{len(a_frags)} (actual)")
        e_shapes = [np.shape(f) for f in e_frags]
        a_shapes = [np.shape(f) for f in a_frags]
        if e_shapes == a_shapes and e_frags:
            ecat = np.concatenate([np.asarray(f).reshape(-1) for f in e_frags])
            acat = np.concatenate([np.asarray(f).reshape(-1) for f in a_frags])
            if np.allclose(acat, ecat, rtol=rtol, atol=atol, equal_nan=True):
                continue
        for i, (ef, af) in enumerate(zip(e_frags, a_frags)):
            ef, af = np.asarray(ef), np.asarray(af)
            if ef.shape != af.shape:
                _fail(cw, f"fragment {i} shape {ef.shape} (expected) != "
                          f"{af.shape} (actual)")
            if not np.allclose(af, ef, rtol=rtol, atol=atol, equal_nan=True):
                bad = np.flatnonzero(
                    ~np.isclose(af, ef, rtol=rtol, atol=atol, equal_nan=True)
                    .reshape(len(ef), -1).all(axis=1)
                ) if ef.ndim == 2 else np.array([0])
                r = int(bad[0])
                _fail(cw, f"fragment {i} positions differ (rtol={rtol}): "
                          f"{len(bad)} row(s), first row {r}: expected "
                          f"{ef[r].tolist()} actual {af[r].tolist()}")


def _compare_object_index(exp_lg, act_lg, level: int) -> None:
    where = f"level {level} object_index"
    e_has, a_has = _OBJECT_INDEX in exp_lg, _OBJECT_INDEX in act_lg
    if e_has != a_has:
        _fail(where, f"present in expected={e_has}, in actual={a_has}")
    if not e_has:
        return
    e_meta, a_meta = _both(where, _array_meta,
                           (exp_lg, _OBJECT_INDEX), (act_lg, _OBJECT_INDEX))
    _raise_diffs(where, "object_index metadata", _diff_values(e_meta, a_meta))

    (e_ids, e_man), (a_ids, a_man) = _both(
        where, read_object_manifest_rows, (exp_lg,), (act_lg,))
    e_ids, a_ids = np.asarray(e_ids), np.asarray(a_ids)
    if e_ids.shape != a_ids.shape or not np.array_equal(e_ids, a_ids):
        only_e = sorted(set(e_ids.tolist()) - set(a_ids.tolist()))
        only_a = sorted(set(a_ids.tolist()) - set(e_ids.tolist()))
        _fail(where, f"object ids differ: expected {len(e_ids)} ids, actual "
                     f"{len(a_ids)}; only in expected {_short(only_e)}, only in "
                     f"actual {_short(only_a)}"
                     + ("; same ids in a different row order"
                        if not only_e and not only_a else ""))
    for row, (oid, em, am) in enumerate(zip(e_ids.tolist(), e_man, a_man)):
        em = [(tuple(int(c) for c in cc), int(f)) for cc, f in em]
        am = [(tuple(int(c) for c in cc), int(f)) for cc, f in am]
        if em != am:
            first = next((k for k, (x, y) in enumerate(zip(em, am)) if x != y),
                         min(len(em), len(am)))
            _fail(f"{where} object {oid} (row {row})",
                  f"manifest differs: len {len(em)} (expected) vs {len(am)} "
                  f"(actual); first difference at entry {first}: expected "
                  f"{em[first] if first < len(em) else '<end>'} actual "
                  f"{am[first] if first < len(am) else '<end>'}")

    # Raw manifest bytes, one blob per row.
    path = f"{_OBJECT_INDEX}/manifests"
    if exp_lg.standalone_array_exists(path):
        e_blobs = _read("expected", where, exp_lg.read_vlen_array, path)
        a_blobs = _read("actual", where, act_lg.read_vlen_array, path)
        if len(e_blobs) != len(a_blobs):
            _fail(where, f"raw manifest row count {len(e_blobs)} != {len(a_blobs)}")
        for row, (eb, ab) in enumerate(zip(e_blobs, a_blobs)):
            if bytes(eb) != bytes(ab):
                _fail(f"{where} row {row} (object {e_ids[row]})",
                      f"raw manifest bytes differ ({len(eb)} vs {len(ab)} "
                      f"bytes) although they decode equally")


def _object_attribute_names(lg) -> list[str]:
    if _OBJECT_ATTRIBUTES not in lg:
        return []
    return sorted(lg[_OBJECT_ATTRIBUTES].children())


def _compare_object_attributes(exp_lg, act_lg, level: int) -> None:
    where = f"level {level} object_attributes"
    e_names = _object_attribute_names(exp_lg)
    a_names = _read("actual", where, _object_attribute_names, act_lg)
    if e_names != a_names:
        _fail(where, f"attribute names differ: expected {e_names}, actual {a_names}")
    for name in e_names:
        aw = f"{where}/{name}"
        e, a = _both(aw, read_object_attributes, (exp_lg, name), (act_lg, name))
        e, a = np.asarray(e), np.asarray(a)
        if e.dtype != a.dtype:
            _fail(aw, f"dtype {e.dtype} (expected) != {a.dtype} (actual)")
        if e.shape != a.shape:
            _fail(aw, f"shape {e.shape} (expected) != {a.shape} (actual)")
        eq_nan = e.dtype.kind in "fc"
        if not np.array_equal(e, a, equal_nan=eq_nan):
            neq = (e != a)
            if eq_nan:
                neq &= ~(np.isnan(e) & np.isnan(a))
            rows = np.flatnonzero(neq.reshape(len(e), -1).any(axis=1))
            r = int(rows[0])
            _fail(aw, f"values differ in {len(rows)} row(s), first row {r}: "
                      f"expected {e[r].tolist()} actual {a[r].tolist()}")
        full = f"{_OBJECT_ATTRIBUTES}/{name}"
        e_fill, a_fill = _both(aw, _fill_value,
                               (exp_lg, full), (act_lg, full))
        _raise_diffs(aw, "fill value", _diff_values(e_fill, a_fill, "fill_value",
                                                   rel=0.0))
        e_attr, a_attr = _both(aw, _array_attrs,
                               (exp_lg, full), (act_lg, full))
        _raise_diffs(aw, "array attributes", _diff_values(e_attr, a_attr))
        e_m, a_m = _both(aw, read_object_attribute_present_mask,
                         (exp_lg, name), (act_lg, name))
        e_m = np.ones(len(e), np.uint8) if e_m is None else np.asarray(e_m, np.uint8)
        a_m = np.ones(len(a), np.uint8) if a_m is None else np.asarray(a_m, np.uint8)
        if not np.array_equal(e_m, a_m):
            rows = np.flatnonzero(e_m != a_m)
            _fail(aw, f"present mask differs in {len(rows)} row(s): "
                      f"{_short(rows.tolist())}")


def link_records(level_group, delta: int) -> list[tuple]:
    """Every record of ``links/<delta>`` as a hashable tuple
    ``((chunk_0, vi_0), (chunk_1, vi_1), ...)`` via ``read_link_arrays``."""
    fam = links_group_path(delta)
    plan = [
        (f"{fam}/{seg}", list(level_group.list_chunks(f"{fam}/{seg}")))
        for seg in list_link_offsets(level_group, delta)
    ]
    # One prefetch for the whole family instead of one GET per cell.
    with level_group.batched_reads(plan):
        chunks, vi = read_link_arrays(level_group, delta=delta)
    if vi.size == 0:
        return []
    return [
        tuple((tuple(c), int(v)) for c, v in zip(crow, vrow))
        for crow, vrow in zip(chunks.tolist(), vi.tolist())
    ]


def _compare_links(exp_lg, act_lg, level: int, *, multiset: bool) -> None:
    where = f"level {level} links"
    e_d, a_d = _both(where, list_link_deltas, (exp_lg,), (act_lg,))
    if list(e_d) != list(a_d):
        _fail(where, f"link deltas differ: expected {list(e_d)}, actual {list(a_d)}")
    for d in e_d:
        dw = f"level {level} links delta {d:+d}"
        fam = links_group_path(d)
        e_rec, a_rec = _both(dw, link_records, (exp_lg, d), (act_lg, d))
        e_set, a_set = set(e_rec), set(a_rec)
        if e_set != a_set:
            _fail(dw, f"record sets differ: {len(e_set)} expected vs {len(a_set)} "
                      f"actual distinct; missing in actual "
                      f"{_short(sorted(e_set - a_set))}; extra in actual "
                      f"{_short(sorted(a_set - e_set))}")
        if multiset and Counter(e_rec) != Counter(a_rec):
            ec, ac = Counter(e_rec), Counter(a_rec)
            bad = [r for r in e_set if ec[r] != ac[r]]
            _fail(dw, f"record multiplicities differ ({len(e_rec)} vs "
                      f"{len(a_rec)} records); e.g. {bad[:3]!r} "
                      f"x{[ec[r] for r in bad[:3]]} expected vs "
                      f"x{[ac[r] for r in bad[:3]]} actual")
        e_meta, a_meta = _both(dw, _array_meta,
                               (exp_lg, fam), (act_lg, fam))
        _raise_diffs(dw, "family metadata", _diff_values(e_meta, a_meta))


# ---------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------

def assert_equivalent(
    expected_path,
    actual_path,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    check_validate: bool = True,
    validate_level: int = 3,
    link_multiset: bool = True,
    levels: list[int] | None = None,
) -> None:
    """Assert two pyramid stores are equivalent (see module docstring).

    Args:
        expected_path: Reference store (e.g. built by zarr-vectors'
            ``build_pyramid``).
        actual_path: Store under test.
        rtol, atol: Tolerance for vertex positions.
        check_validate: Also require ``validate(actual, level=validate_level).ok``.
        link_multiset: Besides equal record *sets*, require each record to
            occur equally often per delta.
        levels: Restrict the per-level checks to these levels (the level
            list itself is always compared in full).

    Raises:
        AssertionError: naming the level / chunk / object / delta that differs.
    """
    exp_root = open_store(str(expected_path), mode="r")
    try:
        act_root = open_store(str(actual_path), mode="r")
    except Exception as e:  # noqa: BLE001
        raise AssertionError(
            f"cannot open actual store {actual_path}: {type(e).__name__}: {e}"
        ) from e

    # Read-only node caches: every reader below resolves the same
    # zarr.json nodes over and over otherwise.
    with exp_root.cached_nodes(), act_root.cached_nodes():
        _assert_equivalent_open(
            exp_root, act_root, expected_path, actual_path,
            rtol=rtol, atol=atol, link_multiset=link_multiset, levels=levels,
        )

    if check_validate:
        res = validate(str(actual_path), level=validate_level)
        if not res.ok:
            _fail("validate",
                  f"validate(actual, level={validate_level}) failed: "
                  f"{res.errors[:_MAX_LISTED]}")


def _assert_equivalent_open(exp_root, act_root, expected_path, actual_path, *,
                            rtol, atol, link_multiset, levels) -> None:
    e_levels = list_resolution_levels(exp_root)
    a_levels = _read("actual", "root", list_resolution_levels, act_root)
    if e_levels != a_levels:
        _fail("root", f"resolution levels differ: expected {e_levels}, "
                      f"actual {a_levels}")

    _compare_root(exp_root, act_root, expected_path, actual_path)
    ndim = read_root_metadata(exp_root).sid_ndim

    for level in (e_levels if levels is None else levels):
        exp_lg = get_resolution_level(exp_root, level)
        act_lg = _read("actual", f"level {level}", get_resolution_level,
                       act_root, level)
        _compare_level_meta(exp_root, act_root, exp_lg, act_lg, level)
        _compare_children(exp_lg, act_lg, level)
        _compare_vertices(exp_lg, act_lg, level, ndim, rtol=rtol, atol=atol)
        _compare_object_index(exp_lg, act_lg, level)
        _compare_object_attributes(exp_lg, act_lg, level)
        _compare_links(exp_lg, act_lg, level, multiset=link_multiset)


# ---------------------------------------------------------------------------
# raw file comparison: every file's bytes
# ---------------------------------------------------------------------------

#: The project's own build records (``.zvdask/``): deliberately ours, the
#: reference writes none.  A finished build keeps only :data:`SOURCE_RECORD`
#: (excluded by default), so pass this only where a test leaves the other
#: records on purpose (an interrupted build).
SIDECAR = {".zvdask/*": "the project's own build records, not part of the format"}


@dataclass
class RawDiff:
    """Result of :func:`compare_raw_files` (paths relative to each store)."""

    only_in_expected: list[str] = field(default_factory=list)
    only_in_actual: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)
    #: For differing ``zarr.json`` files: what differs, to read (parsed
    #: JSON paths, or that only the formatting / key order does).
    json_diffs: dict[str, list[str]] = field(default_factory=dict)
    #: Paths left out on request: reason -> paths (either tree).
    excluded: dict[str, list[str]] = field(default_factory=dict)

    @property
    def identical(self) -> bool:
        return not (self.only_in_expected or self.only_in_actual or self.differing)

    def __bool__(self) -> bool:  # truthy when there IS a difference
        return not self.identical

    def summary(self, limit: int = 20) -> str:
        lines = ["stores are file-for-file identical" if self.identical else ""]
        for title, items in (("only in expected", self.only_in_expected),
                             ("only in actual", self.only_in_actual),
                             ("bytes differ", self.differing)):
            if items:
                lines.append(f"{title} ({len(items)}):")
                for p in items[:limit]:
                    extra = ""
                    if p in self.json_diffs:
                        extra = "  <- " + "; ".join(self.json_diffs[p][:4])
                    lines.append(f"  {p}{extra}")
                if len(items) > limit:
                    lines.append(f"  ... {len(items) - limit} more")
        for reason, paths in self.excluded.items():
            lines.append(f"not compared ({len(paths)} file(s)): {reason}")
        return "\n".join(line for line in lines if line)


def _list_files(root: Path) -> set[str]:
    out = set()
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            out.add(Path(os.path.relpath(os.path.join(dirpath, f), root)).as_posix())
    return out


def _explain_json(eb: bytes, ab: bytes) -> list[str]:
    """Why two differing ``zarr.json`` files differ, for the message."""
    try:
        ej, aj = json.loads(eb), json.loads(ab)
    except ValueError:
        return ["not valid JSON"]
    diffs = _diff_values(ej, aj, rel=0.0)
    if diffs:
        return diffs
    if json.dumps(ej) == json.dumps(aj):  # keeps key order and 1 vs 1.0
        return [f"same JSON, other whitespace: expected {eb[:50]!r}..., "
                f"actual {ab[:50]!r}..."]
    if list(_key_paths(ej)) != list(_key_paths(aj)):
        return ["same JSON, other key order"]
    return ["same JSON, other number spelling (such as 1 vs 1.0)"]


def _key_paths(x: Any, at: str = ""):
    """Every key of a parsed document, in document order."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield f"{at}.{k}"
            yield from _key_paths(v, f"{at}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _key_paths(v, f"{at}[{i}]")


def _store_name_bytes(root: Path) -> bytes | None:
    stem = _store_stem(root)
    return None if stem is None else json.dumps({"name": stem})[1:-1].encode()


#: The project's own record of a finished build (its arguments and a
#: fingerprint of level 0, ``currency.py``): deliberately a file the
#: reference does not write, in the project's sidecar folder.
SOURCE_RECORD = ".zvdask/source.json"
_SOURCE_REASON = "the project's record of its finished build (arguments, level-0 fingerprint)"
#: With it, a digest of each kept level-0 manifest row the build read (how a
#: refresh tells the objects an edit changed): also the project's, kept.
MANIFEST_DIGESTS = ".zvdask/manifest-rows"
_DIGESTS_REASON = "the project's digests of the level-0 manifest rows its build read"


def scratch_left(root) -> list[str]:
    """Files a finished build left under ``root/.zvdask`` besides its
    source record and the digests of its level-0 manifest rows (none
    expected)."""
    top = Path(root) / ".zvdask"
    return sorted(p for p in (_list_files(top) if top.exists() else ())
                  if f".zvdask/{p}" != SOURCE_RECORD
                  and not f".zvdask/{p}".startswith(f"{MANIFEST_DIGESTS}/"))


def compare_raw_files(expected, actual, *, exclude: dict[str, str] | None = None,
                      ignore: Callable[[str], bool] | None = None,
                      other_store_name: bool = False, source_record: bool = False) -> RawDiff:
    """Compare two store directory trees byte for byte, every file
    (``zarr.json`` documents included: whitespace, key order and number
    spelling count, as they do for checksums, rsync and caches).

    ``exclude`` maps glob patterns (``fnmatch``, relative posix paths;
    ``*`` crosses ``/``) to the reason those paths are deliberately
    different; excluded paths are not compared and are listed under their
    reason in :attr:`RawDiff.excluded`.  :data:`SIDECAR` is one such entry;
    :data:`SOURCE_RECORD` and :data:`MANIFEST_DIGESTS` are always ones
    unless ``source_record``.
    ``ignore(relpath) -> bool`` narrows the comparison to part of a tree.

    ``other_store_name``: the two stores' level 0 were written under
    different directory names, which zarr-vectors records as the root's
    RFC-8 ``ome.name``; the actual root's ``"name": "<its stem>"`` is read
    as the expected's before the byte comparison.  Nothing else is
    normalised.
    """
    exclude = dict(exclude or {})
    if not source_record:
        exclude.setdefault(SOURCE_RECORD, _SOURCE_REASON)
        exclude.setdefault(f"{MANIFEST_DIGESTS}/*", _DIGESTS_REASON)
    e_root, a_root = Path(expected), Path(actual)
    e_files, a_files = _list_files(e_root), _list_files(a_root)
    if ignore is not None:
        e_files = {p for p in e_files if not ignore(p)}
        a_files = {p for p in a_files if not ignore(p)}
    diff = RawDiff()
    for pattern, reason in exclude.items():
        hit = sorted(p for p in e_files | a_files if fnmatch.fnmatchcase(p, pattern))
        if hit:
            diff.excluded.setdefault(reason, []).extend(hit)
        e_files -= set(hit)
        a_files -= set(hit)
    diff.only_in_expected = sorted(e_files - a_files)
    diff.only_in_actual = sorted(a_files - e_files)
    for rel in sorted(e_files & a_files):
        eb = (e_root / rel).read_bytes()
        ab = (a_root / rel).read_bytes()
        if rel == "zarr.json" and other_store_name:
            e_name, a_name = _store_name_bytes(e_root), _store_name_bytes(a_root)
            if e_name is not None and a_name is not None:
                ab = ab.replace(a_name, e_name, 1)
        if eb == ab:
            continue
        if os.path.basename(rel) == "zarr.json":
            diff.json_diffs[rel] = _explain_json(eb, ab)
        diff.differing.append(rel)
    return diff


def assert_same_pyramid(expected, actual, **raw_kw) -> RawDiff:
    """Assert ``actual`` is ``expected`` file for file
    (:func:`compare_raw_files` with ``raw_kw``); returns the diff.

    Identical bytes read identically through zarr-vectors' readers and
    validate alike, so :func:`assert_equivalent` (seconds a store) runs
    only when they differ: to name the level, chunk or object first."""
    diff = compare_raw_files(expected, actual, **raw_kw)
    if not diff.identical:
        assert_equivalent(expected, actual)
        raise AssertionError(f"the readers agree, the files do not:\n{diff.summary()}")
    return diff


# ---------------------------------------------------------------------------
# sharded pyramids against the reference's unsharded one
# ---------------------------------------------------------------------------

_SHARDING = "sharding_indexed"


def _array_doc(store: Path, array: str) -> dict:
    with open(store / array / "zarr.json", "rb") as fh:
        return json.loads(fh.read())


def sharded_arrays(store) -> list[str]:
    """Every array of ``store`` written with Zarr v3's sharding codec."""
    root = Path(store)
    out = []
    for dirpath, _dirs, files in os.walk(root):
        if "zarr.json" in files:
            rel = Path(dirpath).relative_to(root).as_posix()
            doc = _array_doc(root, rel)
            if doc.get("node_type") == "array" and any(
                    c.get("name") == _SHARDING for c in doc.get("codecs", [])):
                out.append(rel)
    return sorted(out)


def _unsharded_doc(doc: dict) -> dict:
    """The document a sharded array has as one cell per chunk: the inner
    chunk shape for the grid, the inner codecs for the codecs."""
    (codec,) = doc["codecs"]
    conf = codec["configuration"]
    assert codec["name"] == _SHARDING and set(conf["chunk_shape"]) == {1}, codec
    return {**doc, "chunk_grid": {**doc["chunk_grid"], "configuration": {
        **doc["chunk_grid"]["configuration"], "chunk_shape": conf["chunk_shape"]}},
        "codecs": conf["codecs"]}


def _cells(store: Path, array: str) -> list[bytes]:
    import zarr
    return [bytes(v) for v in zarr.open_array(str(store / array), mode="r")[...].ravel()]


def assert_sharded_matches(expected, actual) -> list[str]:
    """A pyramid built with ``shard_shape`` against the reference's (which
    is unsharded), byte for byte wherever sharding does not change bytes.

    The files that legitimately differ are, for each array the build wrote
    with the sharding codec (coarse levels' ``vertices`` and
    ``vertex_fragments``, every link segment array of a delta other than 0,
    level 0's ``+N`` too), its ``c/`` tree and its ``zarr.json``.  Every
    other file -- level 0's arrays, root and level documents, link family
    groups, object index (ids, manifests), object attributes and present
    masks -- must be byte-identical.  A sharded array's document must be
    the reference's except for the grid's chunk shape (the shard shape) and
    the codecs (one ``sharding_indexed`` wrapping the reference's codecs).
    Its cells, decoded by zarr, must be the reference's cells byte for byte:
    positions exactly, not within a tolerance, and link records in the
    reference's order within every cell.  Returns the sharded arrays.
    """
    e_root, a_root = Path(expected), Path(actual)
    arrays = sharded_arrays(a_root)
    assert arrays, f"{actual}: no array is sharded"
    assert not sharded_arrays(e_root), f"{expected}: the reference is sharded"

    def legitimately_different(rel: str) -> bool:
        return any(rel == f"{a}/zarr.json" or rel.startswith(f"{a}/c/") for a in arrays)

    rest = compare_raw_files(e_root, a_root, ignore=legitimately_different)
    assert rest.identical, f"files sharding does not touch differ:\n{rest.summary()}"
    for a in arrays:
        assert (e_root / a / "zarr.json").is_file(), f"{a}: not an array of the reference"
        want, got = _array_doc(e_root, a), _unsharded_doc(_array_doc(a_root, a))
        assert got == want, f"{a}/zarr.json: {_diff_values(want, got, rel=0.0)[:4]}"
        e_cells, a_cells = _cells(e_root, a), _cells(a_root, a)
        bad = [i for i, (x, y) in enumerate(zip(e_cells, a_cells)) if x != y]
        assert len(e_cells) == len(a_cells) and not bad, \
            f"{a}: {len(bad)} cell(s) differ from the reference's, first at flat index {bad[:1]}"
    return arrays


def twin_copies(tmp_path, write):
    """``write(path)`` a level-0 store once; two copies of it, for the
    reference and for us: ``(ref, ours)``."""
    base, ref, ours = tmp_path / "b.zv", tmp_path / "r.zv", tmp_path / "o.zv"
    write(str(base))
    shutil.copytree(base, ref)
    shutil.copytree(base, ours)
    return ref, ours
