"""Generators of small level-0 zarr-vectors stores for tests.

Every store here is written exclusively through zarr-vectors' own public
writers (``write_points``, ``write_polylines``, ``write_graph``,
``write_mesh``), so the stores are exactly what the reference library
produces and are independent of anything in ``zarr_vectors_dask``.

Each generator has the shape::

    make_<kind>(path, *, seed=0, n_objects=..., ...) -> path

and is deterministic in ``seed``.  ``writer_kw`` (where offered) goes to
the writer as is, e.g. ``{"shard_shape": 2, "compressor": "zstd"}``.
Geometry spans roughly ``[-45, 55)`` per axis (about 100 units, some
negative so chunk coordinates go negative) with ``chunk_shape=25`` and
``bin_shape=5`` by default, giving several dozen spatial chunks and bins
that actually merge vertices when coarsened.

``KINDS`` maps a short name to each generator.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from zarr_vectors.types.graphs import write_graph
from zarr_vectors.types.meshes import write_mesh
from zarr_vectors.types.points import write_points
from zarr_vectors.types.polylines import write_polylines

__all__ = [
    "LO",
    "HI",
    "CHUNK",
    "BIN",
    "make_points",
    "make_points_2d",
    "make_points_with_ids",
    "make_points_sparse_ids",
    "make_streamlines",
    "make_streamlines_2d",
    "make_skeletons",
    "make_graphs",
    "make_meshes",
    "KINDS",
]

#: Domain every generator draws from (per axis).
LO, HI = -45.0, 55.0
#: Default spatial chunk edge and bin edge.
CHUNK = 25.0
BIN = 5.0


def _shape(value: float, ndim: int) -> tuple[float, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(float(v) for v in value)
    return tuple(float(value) for _ in range(ndim))


def _clip(pos: np.ndarray) -> np.ndarray:
    # Keep every vertex inside the domain; a vertex *on* HI is fine for the
    # writers, but staying strictly inside keeps the chunk count stable.
    return np.clip(pos, LO + 1e-3, HI - 1e-3)


def _blobs(rng: np.random.Generator, n: int, ndim: int, n_blobs: int,
           spread: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around ``n_blobs`` random centres; returns (pos, blob_id)."""
    centres = rng.uniform(LO + 5, HI - 5, size=(n_blobs, ndim))
    which = rng.integers(0, n_blobs, size=n)
    pos = centres[which] + rng.normal(0.0, spread, size=(n, ndim))
    return _clip(pos).astype(np.float32), which


def _random_walk(rng: np.random.Generator, n: int, ndim: int,
                 step: float) -> np.ndarray:
    """A smooth random walk of ``n`` vertices inside the domain."""
    pos = np.empty((n, ndim), dtype=np.float64)
    pos[0] = rng.uniform(LO + 5, HI - 5, size=ndim)
    d = rng.normal(size=ndim)
    d /= np.linalg.norm(d)
    for i in range(1, n):
        d = d + rng.normal(0.0, 0.35, size=ndim)
        d /= np.linalg.norm(d)
        nxt = pos[i - 1] + step * d
        # Reflect off the domain walls.
        for a in range(ndim):
            if nxt[a] < LO + 1 or nxt[a] > HI - 1:
                d[a] = -d[a]
                nxt[a] = pos[i - 1][a] + step * d[a]
        pos[i] = nxt
    return _clip(pos).astype(np.float32)


def _object_attributes(rng: np.random.Generator, n_objects: int) -> dict[str, np.ndarray]:
    """Float and int, 1-D ``(O,)`` and 2-D ``(O, C)`` object attributes."""
    return {
        "weight": rng.random(n_objects).astype(np.float32),
        "label": rng.integers(0, 1000, size=n_objects).astype(np.int32),
        "color": rng.random((n_objects, 3)).astype(np.float64),
        "counts": rng.integers(-50, 50, size=(n_objects, 2)).astype(np.int64),
    }


# ---------------------------------------------------------------------------
# Point clouds
# ---------------------------------------------------------------------------

def make_points(path, *, seed: int = 0, n_objects: int = 6, n_points: int = 800,
                ndim: int = 3, chunk_shape=CHUNK, bin_shape=BIN, writer_kw: dict | None = None):
    """Point cloud without object ids (no ``object_index`` at level 0).

    Half the points are uniform over the domain, half in ``n_objects`` tight
    Gaussian clusters (so bins hold several points and really merge when
    coarsened).  The clusters are *not* written as objects: the whole
    level is one implicit object for the pyramid.
    """
    rng = np.random.default_rng(seed)
    n_uni = n_points // 2
    uni = rng.uniform(LO, HI, size=(n_uni, ndim)).astype(np.float32)
    blobs, _ = _blobs(rng, n_points - n_uni, ndim, n_blobs=max(1, n_objects),
                      spread=3.0)
    pos = np.concatenate([uni, blobs]).astype(np.float32)
    pos = pos[rng.permutation(len(pos))]
    write_points(
        str(path), pos,
        chunk_shape=_shape(chunk_shape, ndim), bin_shape=_shape(bin_shape, ndim),
        **(writer_kw or {}),
    )
    return path


def make_points_2d(path, *, seed: int = 0, n_objects: int = 6,
                   n_points: int = 600, **kw):
    """2-D point cloud without object ids (``n_objects`` = cluster count)."""
    return make_points(path, seed=seed, n_objects=n_objects, n_points=n_points,
                       ndim=2, **kw)


def make_points_with_ids(path, *, seed: int = 0, n_objects: int = 24,
                         n_points: int = 900, ndim: int = 3,
                         chunk_shape=CHUNK, bin_shape=BIN, writer_kw: dict | None = None):
    """Point cloud with dense object ids ``0..n_objects-1`` and object attributes.

    Each object is a blob (every id has at least one point); points are
    written in shuffled order.  Object attributes: ``weight`` float32 (O,),
    ``label`` int32 (O,), ``color`` float64 (O, 3), ``counts`` int64 (O, 2).
    """
    rng = np.random.default_rng(seed)
    centres = rng.uniform(LO + 5, HI - 5, size=(n_objects, ndim))
    spread = rng.uniform(1.0, 8.0, size=n_objects)
    oids = np.concatenate([
        np.arange(n_objects),
        rng.integers(0, n_objects, size=max(0, n_points - n_objects)),
    ])
    oids = oids[rng.permutation(len(oids))].astype(np.int64)
    pos = centres[oids] + rng.normal(size=(len(oids), ndim)) * spread[oids, None]
    pos = _clip(pos).astype(np.float32)
    write_points(
        str(path), pos,
        chunk_shape=_shape(chunk_shape, ndim), bin_shape=_shape(bin_shape, ndim),
        object_ids=oids,
        object_attributes=_object_attributes(rng, n_objects),
        **(writer_kw or {}),
    )
    return path


def make_points_sparse_ids(path, *, seed: int = 0, n_objects: int = 16,
                           n_points: int = 600, ndim: int = 3,
                           chunk_shape=CHUNK, bin_shape=BIN):
    """Point cloud whose object ids are NOT ``0..n-1`` (gappy, large ids).

    Exercises the row-vs-id distinction of ``object_index`` (the
    ``object_ids`` table).  No object attributes (their row alignment for
    non-dense ids is writer-defined).
    """
    rng = np.random.default_rng(seed)
    id_space = np.sort(rng.choice(np.arange(3, 10 * n_objects + 3), n_objects,
                                  replace=False)).astype(np.int64)
    centres = rng.uniform(LO + 5, HI - 5, size=(n_objects, ndim))
    which = np.concatenate([
        np.arange(n_objects),
        rng.integers(0, n_objects, size=max(0, n_points - n_objects)),
    ])
    which = which[rng.permutation(len(which))]
    pos = _clip(centres[which] + rng.normal(0, 4.0, size=(len(which), ndim)))
    write_points(
        str(path), pos.astype(np.float32),
        chunk_shape=_shape(chunk_shape, ndim), bin_shape=_shape(bin_shape, ndim),
        object_ids=id_space[which],
    )
    return path


# ---------------------------------------------------------------------------
# Streamlines
# ---------------------------------------------------------------------------

def _streamlines(rng, n_objects, ndim, min_len, max_len, step):
    return [
        _random_walk(rng, int(rng.integers(min_len, max_len + 1)), ndim, step)
        for _ in range(n_objects)
    ]


def make_streamlines(path, *, seed: int = 0, n_objects: int = 30, ndim: int = 3,
                     min_len: int = 10, max_len: int = 80, step: float = 1.5,
                     with_attributes: bool = True,
                     chunk_shape=CHUNK, bin_shape=BIN, writer_kw: dict | None = None):
    """Streamlines (smooth random walks) with object attributes.

    Object attributes (when ``with_attributes``): ``weight`` float32 (O,),
    ``label`` int32 (O,), ``color`` float64 (O, 3), ``counts`` int64 (O, 2).
    Streamlines cross chunk boundaries, so objects have multi-fragment
    manifests.
    """
    rng = np.random.default_rng(seed)
    lines = _streamlines(rng, n_objects, ndim, min_len, max_len, step)
    attrs = _object_attributes(rng, n_objects) if with_attributes else None
    write_polylines(
        str(path), lines,
        chunk_shape=_shape(chunk_shape, ndim), bin_shape=_shape(bin_shape, ndim),
        object_attributes=attrs,
        **(writer_kw or {}),
    )
    return path


def make_streamlines_2d(path, *, seed: int = 0, n_objects: int = 25, **kw):
    """2-D streamlines with object attributes."""
    return make_streamlines(path, seed=seed, n_objects=n_objects, ndim=2, **kw)


# ---------------------------------------------------------------------------
# Skeletons and graphs (write_graph)
# ---------------------------------------------------------------------------

def _random_tree(rng, n_nodes, ndim, step):
    """A random branching tree: (positions (n, D), edges (n-1, 2) child->parent)."""
    pos = np.empty((n_nodes, ndim), dtype=np.float64)
    pos[0] = rng.uniform(LO + 10, HI - 10, size=ndim)
    dirs = np.empty((n_nodes, ndim))
    d = rng.normal(size=ndim)
    dirs[0] = d / np.linalg.norm(d)
    edges = []
    for i in range(1, n_nodes):
        # Mostly extend the previous node (long runs), sometimes branch off
        # an earlier one.
        parent = i - 1 if rng.random() < 0.85 else int(rng.integers(0, i))
        d = dirs[parent] + rng.normal(0.0, 0.5, size=ndim)
        d /= np.linalg.norm(d)
        dirs[i] = d
        pos[i] = pos[parent] + step * d
        edges.append((i, parent))
    return _clip(pos).astype(np.float32), np.asarray(edges, dtype=np.int64).reshape(-1, 2)


def make_skeletons(path, *, seed: int = 0, n_objects: int = 8, ndim: int = 3,
                   min_nodes: int = 30, max_nodes: int = 150, step: float = 1.5,
                   with_attributes: bool = True,
                   chunk_shape=CHUNK, bin_shape=BIN):
    """Skeletons: ``write_graph(kind="skeleton")``, one rooted tree per object.

    ``object_ids`` are ``0..n_objects-1``; object attributes as in
    :func:`make_streamlines` when ``with_attributes``.
    """
    rng = np.random.default_rng(seed)
    positions, edges, oids = [], [], []
    offset = 0
    for o in range(n_objects):
        n = int(rng.integers(min_nodes, max_nodes + 1))
        p, e = _random_tree(rng, n, ndim, step)
        positions.append(p)
        edges.append(e + offset)
        oids.append(np.full(n, o, dtype=np.int64))
        offset += n
    attrs = _object_attributes(rng, n_objects) if with_attributes else None
    write_graph(
        str(path), np.concatenate(positions), np.concatenate(edges),
        chunk_shape=_shape(chunk_shape, ndim), bin_shape=_shape(bin_shape, ndim),
        kind="skeleton",
        object_ids=np.concatenate(oids),
        object_attributes=attrs,
    )
    return path


def make_graphs(path, *, seed: int = 0, n_objects: int = 6, ndim: int = 3,
                min_nodes: int = 30, max_nodes: int = 120, step: float = 2.0,
                extra_edge_frac: float = 0.2,
                chunk_shape=CHUNK, bin_shape=BIN, writer_kw: dict | None = None):
    """General graphs: ``write_graph(kind="graph")`` — trees plus extra
    cycle-closing edges, one connected component per object id."""
    rng = np.random.default_rng(seed)
    positions, edges, oids = [], [], []
    offset = 0
    for o in range(n_objects):
        n = int(rng.integers(min_nodes, max_nodes + 1))
        p, e = _random_tree(rng, n, ndim, step)
        n_extra = int(extra_edge_frac * n)
        a = rng.integers(0, n, size=n_extra)
        b = rng.integers(0, n, size=n_extra)
        keep = a != b
        e = np.concatenate([e, np.stack([a[keep], b[keep]], axis=1)])
        positions.append(p)
        edges.append(e + offset)
        oids.append(np.full(n, o, dtype=np.int64))
        offset += n
    write_graph(
        str(path), np.concatenate(positions), np.concatenate(edges),
        chunk_shape=_shape(chunk_shape, ndim), bin_shape=_shape(bin_shape, ndim),
        kind="graph",
        object_ids=np.concatenate(oids),
        **(writer_kw or {}),
    )
    return path


# ---------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------

def _uv_sphere(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit UV sphere: (vertices (V, 3), triangles (F, 3))."""
    verts = [(0.0, 0.0, 1.0)]
    for i in range(1, n_lat):
        th = np.pi * i / n_lat
        for j in range(n_lon):
            ph = 2 * np.pi * j / n_lon
            verts.append((np.sin(th) * np.cos(ph), np.sin(th) * np.sin(ph), np.cos(th)))
    verts.append((0.0, 0.0, -1.0))
    v = np.asarray(verts)
    south = len(verts) - 1
    faces = []

    def ring(i, j):  # vertex index of latitude ring i (1-based), column j
        return 1 + (i - 1) * n_lon + (j % n_lon)

    for j in range(n_lon):
        faces.append((0, ring(1, j), ring(1, j + 1)))
    for i in range(1, n_lat - 1):
        for j in range(n_lon):
            a, b = ring(i, j), ring(i, j + 1)
            c, d = ring(i + 1, j), ring(i + 1, j + 1)
            faces.append((a, c, b))
            faces.append((b, c, d))
    for j in range(n_lon):
        faces.append((south, ring(n_lat - 1, j + 1), ring(n_lat - 1, j)))
    return v, np.asarray(faces, dtype=np.int64)


def make_meshes(path, *, seed: int = 0, n_objects: int = 5,
                min_radius: float = 6.0, max_radius: float = 20.0,
                with_attributes: bool = True, n_lat=(6, 14), n_lon=(8, 20),
                chunk_shape=CHUNK, bin_shape=BIN):
    """Triangle meshes: ``n_objects`` noisy ellipsoids (UV spheres), 3-D.

    ``object_ids`` are ``0..n_objects-1``; big radii make objects straddle
    chunk edges.  Object attributes as in :func:`make_streamlines` when
    ``with_attributes``.  ``n_lat`` / ``n_lon``: half-open ranges of the
    spheres' latitude rings and meridians (``(2, 3)``, ``(3, 4)``: five
    vertices, six triangles, for stores of many small objects).
    """
    rng = np.random.default_rng(seed)
    verts, faces, oids = [], [], []
    offset = 0
    for o in range(n_objects):
        lat = int(rng.integers(*n_lat))
        lon = int(rng.integers(*n_lon))
        v, f = _uv_sphere(lat, lon)
        radii = rng.uniform(min_radius, max_radius, size=3)
        centre = rng.uniform(LO + max_radius / 2, HI - max_radius / 2, size=3)
        v = centre + v * radii * (1 + rng.normal(0, 0.05, size=(len(v), 1)))
        verts.append(_clip(v).astype(np.float32))
        faces.append(f + offset)
        oids.append(np.full(len(v), o, dtype=np.int64))
        offset += len(v)
    attrs = _object_attributes(rng, n_objects) if with_attributes else None
    write_mesh(
        str(path), np.concatenate(verts), np.concatenate(faces),
        chunk_shape=_shape(chunk_shape, 3), bin_shape=_shape(bin_shape, 3),
        object_ids=np.concatenate(oids),
        object_attributes=attrs,
    )
    return path


#: name -> generator.  Every generator: ``fn(path, *, seed=0, ...) -> path``.
KINDS: dict[str, Callable[..., object]] = {
    "points": make_points,
    "points_2d": make_points_2d,
    "points_ids": make_points_with_ids,
    "points_sparse_ids": make_points_sparse_ids,
    "streamlines": make_streamlines,
    "streamlines_2d": make_streamlines_2d,
    "skeletons": make_skeletons,
    "graphs": make_graphs,
    "meshes": make_meshes,
}
