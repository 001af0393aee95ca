"""Per-vertex attributes at every level (opt-in): each metavertex gets the
aggregate of the attribute values of the source vertices in its bin.

The aggregation travels in the same shuffle as the centroids:

* ``bin_partials`` reduces its block's vertex instances per bin key into
  partials (weighted sums and counts, minima and maxima, and for ``mode``
  a histogram of ``(key, value, weight)`` triples), sent with the keys;
* ``reduce_metavertices`` merges the partials of a partition into one
  value per metavertex and routes it with the centroid;
* ``write_metavertices`` writes ``vertex_attributes/<name>`` cells in the
  metavertex order of its ``vertices`` cells.

Weights are the centroid's: a vertex of a fragment named by ``k`` kept
objects counts ``k`` times; vertices of dropped objects (weight 0) count
not at all.  Every mode works per column of a vector attribute.  NaN
values are ignored by every mode (``count`` excepted, which counts
vertices); a column whose values in a bin are all NaN gets NaN.

``mode`` keeps exact per-bin histograms: one ``(bin, value)`` entry per
distinct value in the bin, never more entries than vertex instances the
block holds, and merged entries per partition never more than the
partition's source instances (the same bound as the bin partials
themselves).  Ties go to the smallest value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CorruptChunkError, FormatError
from ..format import cells as fcells
from ..format import documents as fdoc
from ..format import naming as nm

__all__ = ["VERTEX_ATTRIBUTES", "MODES", "VertexAttribute", "default_mode", "output_dtype",
           "names_in_level", "check_request", "resolve", "decode_cell", "partials", "concat_rows",
           "reduce", "array_attributes"]


VERTEX_ATTRIBUTES = nm.VERTEX_ATTRIBUTES


#: zarr-vectors' aggregation vocabulary (``constants.VALID_AGGREGATIONS``).
MODES = ("mean", "sum", "mode", "count", "min", "max")


@dataclass(frozen=True)
class VertexAttribute:
    """One per-vertex attribute of a step: its source array, how it is
    aggregated and what the coarse array holds."""

    name: str
    mode: str
    dtype: str             # source element dtype
    out_dtype: str         # coarse element dtype
    declared_width: int    # columns the source array declares (row_shape)
    source: fcells.VlenArrayInfo  # without its chunk list
    source_is_count: bool  # the source column is itself a ``count`` aggregate
    channel_names: tuple[str, ...] | None = None

    @property
    def path_in_level(self) -> str:
        return f"{VERTEX_ATTRIBUTES}/{self.name}"


def default_mode(dtype: np.dtype) -> str:
    """The spec's defaults: ``mean`` for floats, majority for the rest."""
    return "mean" if np.dtype(dtype).kind in "fc" else "mode"


def output_dtype(mode: str, dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if mode == "count":
        return np.dtype(np.int64)
    if mode == "mean":
        return dtype if dtype.kind == "f" else np.dtype(np.float64)
    if mode == "sum":
        return dtype if dtype.kind == "f" else np.dtype(np.int64)
    return dtype


def names_in_level(store, level: int) -> list[str]:
    """Names of a level's per-vertex attribute arrays."""
    base = f"{level}/{VERTEX_ATTRIBUTES}"
    out = []
    for name in sorted(store.listdir(base)):
        if name == "zarr.json":
            continue
        doc = fdoc.read_json(store, f"{base}/{name}/zarr.json")
        if doc and doc.get("node_type") == "array":
            out.append(name)
    return out


def check_request(vertex_attributes, attribute_aggregation) -> dict[str, str]:
    """Validate the user's arguments (before anything is read)."""
    from ..errors import PlanError
    if vertex_attributes not in (None, "aggregate"):
        raise PlanError(f"vertex_attributes must be 'aggregate' or None; got "
                        f"{vertex_attributes!r}")
    agg = dict(attribute_aggregation or {})
    if agg and vertex_attributes is None:
        raise PlanError("attribute_aggregation is given but vertex_attributes is None; pass "
                        "vertex_attributes='aggregate' (--vertex-attributes) to write them")
    for name, mode in agg.items():
        if mode not in MODES:
            raise PlanError(f"attribute_aggregation[{name!r}] = {mode!r}: not an aggregation "
                            f"mode; expected one of {', '.join(MODES)}")
    return agg


def resolve(store, level: int, vertex_attributes, attribute_aggregation
            ) -> tuple[VertexAttribute, ...]:
    """The attributes one step aggregates, from the source level's
    metadata only.  A name in ``attribute_aggregation`` the level does not
    carry is an error naming the ones it does."""
    from ..errors import PlanError
    agg = check_request(vertex_attributes, attribute_aggregation)
    if vertex_attributes is None:
        return ()
    names = names_in_level(store, level)
    unknown = sorted(set(agg) - set(names))
    if unknown:
        raise PlanError(f"attribute_aggregation names {unknown}, which "
                        f"{store.describe(f'{level}/{VERTEX_ATTRIBUTES}')} does not hold "
                        f"(it holds {names or 'no per-vertex attributes'})")
    out = []
    for name in names:
        path = f"{level}/{VERTEX_ATTRIBUTES}/{name}"
        info = fcells.vlen_array_info(store, path)
        attrs = (fdoc.read_json(store, f"{path}/zarr.json") or {}).get("attributes") or {}
        try:
            dtype = np.dtype(attrs.get("dtype", "float32"))
        except TypeError:
            raise FormatError(f"{store.describe(path)}: dtype {attrs.get('dtype')!r} is "
                                  f"not a numeric dtype") from None
        if dtype.kind not in "biuf":
            raise FormatError(f"{store.describe(path)}: dtype {dtype} cannot be "
                                  f"aggregated (numeric attributes only)")
        row_shape = attrs.get("row_shape")
        channels = attrs.get("channel_names")
        width = int(row_shape[0]) if row_shape else (len(channels) if channels else 1)
        mode = agg.get(name, default_mode(dtype))
        out.append(VertexAttribute(
            name=name, mode=mode, dtype=dtype.str, out_dtype=output_dtype(mode, dtype).str,
            declared_width=width, source=fcells.VlenArrayInfo(**{**info.__dict__, "chunks": ()}),
            source_is_count=attrs.get("aggregation") == "count",
            channel_names=tuple(channels) if channels else None))
    return tuple(out)


# ----------------------------------------------------------------- reading
def decode_cell(attr: VertexAttribute, payload: bytes | None, n_rows: int, *, what: str
                ) -> np.ndarray:
    """A chunk's attribute rows, ``(n_rows, width)``, aligned with its
    vertices.  The width is read from the payload size, as zarr-vectors'
    reader does (its polyline writer stamps vector columns as scalar)."""
    dtype = np.dtype(attr.dtype)
    if payload is None:
        if n_rows == 0:
            return np.empty((0, attr.declared_width), dtype=dtype)
        raise CorruptChunkError(f"{what}: the chunk holds {n_rows} vertices but its "
                                    f"attribute cell is missing")
    n_el, rem = divmod(len(payload), dtype.itemsize)
    if rem or (n_rows and n_el % n_rows) or (not n_rows and n_el):
        raise CorruptChunkError(f"{what}: {len(payload)} bytes are not whole {dtype} rows "
                                    f"for the chunk's {n_rows} vertices")
    width = n_el // n_rows if n_rows else attr.declared_width
    return np.frombuffer(payload, dtype=dtype).reshape(n_rows, width)


# ----------------------------------------------------------------- helpers
def _group_reduce(ufunc, groups: np.ndarray, values: np.ndarray, n: int, fill) -> np.ndarray:
    """``out[g] = ufunc.reduce(values[groups == g])`` for every group (1-D),
    ``fill`` where a group has none."""
    out = np.full(n, fill, dtype=values.dtype)
    if groups.size == 0:
        return out
    order = np.argsort(groups, kind="stable")
    g = groups[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    out[g[starts]] = ufunc.reduceat(values[order], starts)
    return out


def _valid(values: np.ndarray) -> np.ndarray:
    return ~np.isnan(values) if values.dtype.kind == "f" else np.ones(values.shape, bool)


def _fill(dtype: np.dtype):
    """What a column holds where it has no value: NaN for floats; for
    integers only intermediate rows (every metavertex has a weighted
    vertex, and integers are never NaN)."""
    return np.nan if np.dtype(dtype).kind == "f" else 0


def _histogram(keys: np.ndarray, cols: np.ndarray, values: np.ndarray, weights: np.ndarray):
    """Merge ``(key, column, value)`` triples, summing their weights."""
    if keys.size == 0:
        return keys, cols, values, weights
    order = np.lexsort((values, cols, keys))
    k, c, v, w = keys[order], cols[order], values[order], weights[order]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (c[1:] != c[:-1]) |
                                  (v[1:] != v[:-1])])
    return k[starts], c[starts], v[starts], np.add.reduceat(w, starts)


# ----------------------------------------------------------------- partials
def partials(attr: VertexAttribute, values: np.ndarray, w: np.ndarray, inverse: np.ndarray,
             n_keys: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A block's partials of one attribute: per-key columns (aligned with
    the block's distinct keys) and, for ``mode``, histogram entries
    (``pk``: the key's index).  ``values``: ``(instances, width)``."""
    width = values.shape[1]
    live = w > 0
    per_key: dict[str, np.ndarray] = {}
    pairs: dict[str, np.ndarray] = {}
    if attr.mode == "count" and not attr.source_is_count:
        return per_key, pairs  # the centroid's own weights are the answer
    valid = _valid(values) & live[:, None]
    n = np.empty((n_keys, width), dtype=np.int64)
    for c in range(width):
        n[:, c] = np.bincount(inverse[valid[:, c]], weights=w[valid[:, c]],
                              minlength=n_keys).astype(np.int64)
    per_key["n"] = n
    if attr.mode in ("mean", "sum") or attr.mode == "count":
        if values.dtype.kind == "f":
            s = np.empty((n_keys, width), dtype=np.float64)
            for c in range(width):
                sel = valid[:, c]
                s[:, c] = np.bincount(inverse[sel], weights=values[sel, c].astype(np.float64) *
                                      w[sel], minlength=n_keys)
        else:  # exact integer sums
            s = np.empty((n_keys, width), dtype=np.int64)
            for c in range(width):
                sel = valid[:, c]
                s[:, c] = _group_reduce(np.add, inverse[sel],
                                        values[sel, c].astype(np.int64) * w[sel], n_keys, 0)
        per_key["s"] = s
    elif attr.mode in ("min", "max"):
        ufunc = np.minimum if attr.mode == "min" else np.maximum
        out = np.empty((n_keys, width), dtype=values.dtype)
        for c in range(width):
            sel = valid[:, c]
            out[:, c] = _group_reduce(ufunc, inverse[sel], values[sel, c], n_keys,
                                      _fill(values.dtype))
        per_key["x"] = out
    elif attr.mode == "mode":
        ks, cs, vs, ws = [], [], [], []
        for c in range(width):
            sel = valid[:, c]
            ks.append(inverse[sel])
            cs.append(np.full(int(sel.sum()), c, dtype=np.int64))
            vs.append(values[sel, c])
            ws.append(w[sel])
        k, c_, v, wt = _histogram(np.concatenate(ks), np.concatenate(cs), np.concatenate(vs),
                                  np.concatenate(ws))
        pairs = {"pk": k, "pc": c_, "pv": v, "pw": wt}
    return per_key, pairs


def concat_rows(attr: VertexAttribute, arrays: list[np.ndarray], *, what: str) -> np.ndarray:
    """Concatenate partials of several blocks; their widths must agree."""
    widths = {a.shape[1] for a in arrays if a.shape[0]}
    if len(widths) > 1:
        raise FormatError(f"{what}: per-vertex attribute {attr.name!r} has rows of "
                              f"{sorted(widths)} columns in different chunks")
    width = widths.pop() if widths else (arrays[0].shape[1] if arrays else attr.declared_width)
    return np.concatenate([a.reshape(-1, width) for a in arrays]) if arrays else \
        np.empty((0, width))


def reduce(attr: VertexAttribute, per_key: list[dict], pairs: list[dict], rows: list[np.ndarray],
           inv: np.ndarray, n_mv: int, total: np.ndarray, *, what: str) -> np.ndarray:
    """One value row per metavertex of a partition, ``(n_mv, width)``.

    ``per_key[i]``/``pairs[i]``: sender ``i``'s partials; ``rows[i]``: the
    global key rows of sender ``i``'s keys (``inv`` maps key rows to
    metavertices); ``total``: the centroid weight of each metavertex."""
    out_dtype = np.dtype(attr.out_dtype)
    if attr.mode == "count" and not attr.source_is_count:
        return total.astype(out_dtype).reshape(-1, 1)
    n = concat_rows(attr, [p["n"] for p in per_key], what=what)
    width = n.shape[1]
    mv = inv
    count = np.empty((n_mv, width), dtype=np.int64)
    for c in range(width):
        count[:, c] = np.bincount(mv, weights=n[:, c], minlength=n_mv).astype(np.int64)
    empty = count == 0
    if attr.mode in ("mean", "sum", "count"):
        s = concat_rows(attr, [p["s"] for p in per_key], what=what)
        if s.dtype.kind == "f":
            acc = np.empty((n_mv, width), dtype=np.float64)
            for c in range(width):
                acc[:, c] = np.bincount(mv, weights=s[:, c], minlength=n_mv)
        else:
            acc = np.empty((n_mv, width), dtype=np.int64)
            for c in range(width):
                acc[:, c] = _group_reduce(np.add, mv, s[:, c].astype(np.int64), n_mv, 0)
        if attr.mode == "mean":
            val = acc / np.maximum(count, 1)
        else:
            val = acc
        if out_dtype.kind == "f":
            val = np.where(empty, np.nan, val)
        return val.astype(out_dtype)
    if attr.mode in ("min", "max"):
        x = concat_rows(attr, [p["x"] for p in per_key], what=what)
        ufunc = np.minimum if attr.mode == "min" else np.maximum
        val = np.empty((n_mv, width), dtype=out_dtype)
        for c in range(width):
            sel = n[:, c] > 0
            val[:, c] = _group_reduce(ufunc, mv[sel], x[sel, c].astype(out_dtype), n_mv,
                                      _fill(out_dtype))
        return val
    # mode: merge the senders' histograms, then the heaviest value per
    # (metavertex, column), the smallest on a tie.
    k = np.concatenate([inv[r[p["pk"]]] for p, r in zip(pairs, rows) if p]) if any(pairs) \
        else np.empty(0, np.int64)
    c_ = np.concatenate([p["pc"] for p in pairs if p]) if any(pairs) else np.empty(0, np.int64)
    v = np.concatenate([p["pv"] for p in pairs if p]) if any(pairs) else np.empty(0, out_dtype)
    w = np.concatenate([p["pw"] for p in pairs if p]) if any(pairs) else np.empty(0, np.int64)
    k, c_, v, w = _histogram(k, c_, v, w)
    val = np.full((n_mv, width), _fill(out_dtype), dtype=out_dtype)
    if k.size:
        order = np.lexsort((v, -w, c_, k))
        k, c_, v = k[order], c_[order], v[order]
        first = np.r_[True, (k[1:] != k[:-1]) | (c_[1:] != c_[:-1])]
        val[k[first], c_[first]] = v[first]
    return val


def array_attributes(attr: VertexAttribute, width: int) -> dict:
    """The coarse array's zarr-vectors attributes (after its chunk list):
    what ``create_attribute_array`` stamps, with the width it really has
    and the aggregation that made it."""
    meta: dict = {"zv_array": "attribute", "name": attr.name,
                  "dtype": str(np.dtype(attr.out_dtype))}
    if attr.channel_names is not None and len(attr.channel_names) == width \
            and attr.mode != "count":
        meta["channel_names"] = list(attr.channel_names)
    meta["row_shape"] = [] if width == 1 else [int(width)]
    meta["aggregation"] = attr.mode
    return meta
