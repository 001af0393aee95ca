"""The one writer of shared metadata.

Data tasks only ever write chunk cells (and arrays' own chunks) under paths
no reader can see yet: a level, a links family or an array becomes visible
when its ``zarr.json`` exists.  This module writes those documents, after
the data they describe, in an order that publishes leaves before parents:
array documents, then groups, then the level group, then the root (its
capability list, ``multiscales`` and ``ome`` node list) last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import FormatError
from ..storage.store import Store
from . import codecs as cdc
from . import documents as fdoc
from . import naming as nm

__all__ = ["LinkFamily", "LevelCommit", "family_docs", "read_root_attrs", "write_root_attrs",
           "refresh_ome_nodes", "level_dirs", "published_levels", "write_level_arrays",
           "write_families", "publish_level", "commit_level", "commit_cross_level", "read_family",
           "CellsAfter", "cells_moved", "family_documents_after", "vertex_documents_after",
           "write_documents", "dumps"]


@dataclass
class LinkFamily:
    """Cells written for one ``links/<delta>`` family of one level."""

    level: int
    delta: int
    origin: tuple[int, ...]
    grid: tuple[int, ...]
    cells: dict[str, list[tuple[tuple[int, ...], int]]] = field(default_factory=dict)
    shard_shape: tuple[int, ...] | None = None  # cells per storage object (None: one)

    def add(self, written: dict) -> None:
        for seg, items in written.items():
            self.cells.setdefault(seg, []).extend(items)

    @property
    def num_links(self) -> int:
        return sum(n for items in self.cells.values() for _, n in items)


@dataclass
class LevelCommit:
    """Everything the commit needs to publish one coarse level."""

    source_level: int
    target_level: int
    level_attrs: dict  # the zarr_vectors_level block
    target_origin: tuple[int, ...]
    target_grid: tuple[int, ...]
    vertex_chunks: list[tuple[tuple[int, ...], int]]
    object_index: dict | None  # object_index group attributes, or None
    has_attributes: bool
    bin_shape: tuple[float, ...]
    capabilities: list[str]
    families: list[LinkFamily] = field(default_factory=list)


def _parse_offset(seg: str) -> tuple[int, ...]:
    return tuple(int(x) for x in seg.split("."))


def family_docs(store: Store, fam: LinkFamily, sid_ndim: int) -> dict[str, bytes]:
    docs: dict[str, bytes] = {}
    for seg, items in sorted(fam.cells.items()):
        docs.update(_offset_array_doc(fam.level, fam.delta, seg, fam.origin, fam.grid,
                                      {nm.chunk_key(c) for c, _ in items}, fam.shard_shape))
    if fam.cells:
        docs.update(_family_group_docs(store, fam.level, fam.delta, sid_ndim, fam.num_links))
    return docs


def _offset_array_doc(level: int, delta: int, seg: str, origin, grid, keys,
                      shard_shape=None) -> dict[str, bytes]:
    """The document of one offset array of a links family (``keys``: its
    non-empty chunks' keys)."""
    attrs = fdoc.vlen_attributes_of_keys(origin, keys,
                                         fdoc.link_array_attrs(_parse_offset(seg), delta))
    return {f"{nm.links_family_path(level, delta)}/{seg}/zarr.json":
            fdoc.vlen_array_doc(grid, attrs, shard_shape)}


def _family_group_docs(store: Store, level: int, delta: int, sid_ndim: int,
                       num_links: int) -> dict[str, bytes]:
    """A links family's group document (and the level's links group when
    it has none yet)."""
    docs = {}
    links_group = f"{level}/{nm.LINKS}/zarr.json"
    if store.get(links_group) is None:
        docs[links_group] = fdoc.group_doc({})
    # zarr-vectors queues family groups in its batch writer (compact JSON).
    docs[f"{nm.links_family_path(level, delta)}/zarr.json"] = fdoc.batched_group_doc(
        fdoc.link_family_attrs(delta, sid_ndim, num_links))
    return docs


def _vertex_docs(level: int, origin, grid, keys, shard_shape=None) -> dict[str, bytes]:
    """The documents of a coarse level's vertex arrays (both list the
    vertex cells' chunks, ``keys``)."""
    return {f"{level}/{array}/zarr.json": fdoc.vlen_array_doc(
                grid, fdoc.vlen_attributes_of_keys(origin, keys, attrs), shard_shape)
            for array, attrs in ((nm.VERTICES, fdoc.vertices_attrs()),
                                 (nm.VERTEX_FRAGMENTS, fdoc.vertex_fragments_attrs()))}


def _put_in_order(store: Store, docs: dict[str, bytes]) -> None:
    """Deepest documents first, so a parent never names a missing child."""
    for depth in sorted({k.count("/") for k in docs}, reverse=True):
        store.put_many({k: v for k, v in docs.items() if k.count("/") == depth})


def read_root_attrs(store: Store) -> dict:
    attrs = fdoc.node_attrs(store, "")
    if attrs is None:
        raise FormatError(f"{store.url}: no zarr.json at the store root")
    return attrs


def write_root_attrs(store: Store, attrs: dict) -> None:
    store.put("zarr.json", fdoc.group_doc(attrs))


def _upsert_multiscale(attrs: dict, level: int, scale, translation) -> None:
    ms = attrs.get("multiscales") or []
    if not ms or not isinstance(ms, list):
        return
    entry = dict(ms[0])
    datasets = [d for d in (entry.get("datasets") or []) if d.get("path") != str(level)]
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [float(s) for s in scale]}]
    if translation is not None and any(t != 0 for t in translation):
        transforms.append({"type": "translation", "translation": [float(t) for t in translation]})
    datasets.append({"path": str(level), "coordinateTransformations": transforms})
    datasets.sort(key=lambda d: int(d.get("path", "0") or 0))
    entry["datasets"] = datasets
    attrs["multiscales"] = [entry] + list(ms[1:])


def refresh_ome_nodes(attrs: dict, levels: list[int]) -> None:
    node = attrs.get("ome")
    if not isinstance(node, dict):
        return
    node = dict(node)
    node["nodes"] = [{"type": "zv:level", "name": str(lv)} for lv in sorted(levels)]
    attrs["ome"] = node


def level_dirs(store: Store) -> list[tuple[int, str]]:
    """The root's integer-named children (levels, published or not) as
    (number, name), in listing order."""
    out = []
    for name in store.listdir(""):
        try:
            out.append((int(name), name))
        except ValueError:
            continue
    return out


def published_levels(store: Store) -> list[int]:
    """Levels a reader can see: integer-named children with a zarr.json."""
    return sorted(lv for lv, name in level_dirs(store)
                  if store.get(f"{name}/zarr.json") is not None)


def write_level_arrays(store: Store, level: int, origin, grid, vertex_chunks, families,
                       *, sid_ndim: int, vertex_attributes: dict | None = None,
                       shard_shape=None) -> None:
    """Array documents of a coarse level (and the link families it adds),
    all under paths no reader lists yet.  Runs in the step's last task,
    where the writers' chunk and cell lists are reduced, so those lists
    never reach the driver.  ``vertex_attributes``: ``{name: array
    attributes}`` of per-vertex attribute arrays written with the vertices
    (a cell in every vertex chunk), and their group."""
    chunks = [cc for cc, _ in vertex_chunks]
    docs = _vertex_docs(level, origin, grid, {nm.chunk_key(c) for c in chunks}, shard_shape)
    for name, attrs in (vertex_attributes or {}).items():
        docs[f"{level}/{nm.VERTEX_ATTRIBUTES}/{name}/zarr.json"] = fdoc.vlen_array_doc(
            grid, fdoc.vlen_attributes(origin, chunks, attrs), shard_shape)
    if vertex_attributes:
        docs[f"{level}/{nm.VERTEX_ATTRIBUTES}/zarr.json"] = fdoc.group_doc({})
    _put_in_order(store, docs)
    write_families(store, families, sid_ndim=sid_ndim)


def write_families(store: Store, families, *, sid_ndim: int) -> None:
    """Documents of link families whose cells are written: offset arrays,
    then the family group (which makes the family visible)."""
    docs: dict[str, bytes] = {}
    for fam in families:
        docs.update(family_docs(store, fam, sid_ndim))
    _put_in_order(store, docs)


def publish_level(store: Store, c: LevelCommit, *, root_bin) -> None:
    """Publish one coarse level whose arrays are written: its groups, the
    level group (now listed), then the root."""
    t = c.target_level
    docs: dict[str, bytes] = {}
    if c.object_index is not None:
        docs[f"{t}/{nm.OBJECT_INDEX}/zarr.json"] = fdoc.group_doc(c.object_index)
    if c.has_attributes:
        docs[f"{t}/{nm.OBJECT_ATTRIBUTES}/zarr.json"] = fdoc.group_doc({})
    _put_in_order(store, docs)
    store.put(f"{t}/zarr.json", fdoc.group_doc({"zarr_vectors_level": c.level_attrs}))

    attrs = read_root_attrs(store)
    zv = dict(attrs.get("zarr_vectors") or {})
    caps = list(zv.get("format_capabilities") or [])
    for cap in c.capabilities:
        if cap not in caps:
            caps.append(cap)
    zv["format_capabilities"] = caps
    attrs["zarr_vectors"] = zv
    scale = [float(b) / float(r) if r else 1.0 for b, r in zip(c.bin_shape, root_bin)]
    _upsert_multiscale(attrs, t, scale, [b / 2.0 for b in c.bin_shape])
    refresh_ome_nodes(attrs, sorted(set(published_levels(store)) | {t}))
    write_root_attrs(store, attrs)


def commit_level(store: Store, c: LevelCommit, *, sid_ndim: int, root_bin) -> None:
    """Publish one coarse level (and the +1 family it adds to its source)."""
    write_level_arrays(store, c.target_level, c.target_origin, c.target_grid, c.vertex_chunks,
                       c.families, sid_ndim=sid_ndim)
    publish_level(store, c, root_bin=root_bin)


def commit_cross_level(store: Store, families: list[LinkFamily], *, sid_ndim: int,
                       depth: int, storage: str, links_capability: bool) -> None:
    """The closing commit: deeper link families and root cross-level settings."""
    docs: dict[str, bytes] = {}
    for fam in families:
        docs.update(family_docs(store, fam, sid_ndim))
    _put_in_order(store, docs)
    attrs = read_root_attrs(store)
    zv = dict(attrs.get("zarr_vectors") or {})
    zv["cross_level_depth"] = int(depth)
    zv["cross_level_storage"] = storage
    if links_capability:
        caps = list(zv.get("format_capabilities") or [])
        if nm.CAP_MULTISCALE_LINKS not in caps:
            caps.append(nm.CAP_MULTISCALE_LINKS)
        zv["format_capabilities"] = caps
    attrs["zarr_vectors"] = zv
    write_root_attrs(store, attrs)


def read_family(store: Store, level: int, delta: int) -> dict[str, tuple[tuple[int, ...],
                                                                        np.ndarray]]:
    """Published arrays of a links family, as their documents name their
    chunks: ``{offset: (origin, (n, ndim) chunks)}``."""
    base = nm.links_family_path(level, delta)
    if store.get(f"{base}/zarr.json") is None:
        return {}
    out = {}
    for seg in store.listdir(base):
        doc = fdoc.read_json(store, f"{base}/{seg}/zarr.json")
        if not doc or doc.get("node_type") != "array":
            continue
        attrs = doc.get("attributes") or {}
        nd = len(doc.get("shape") or [])
        origin = tuple(int(o) for o in attrs.get(nm.ORIGIN, [0] * nd))
        out[seg] = (origin, nm.parse_chunk_keys(attrs.get(nm.NONEMPTY) or [], nd))
    return out


# ------------------------------------- documents after a refresh's changes
# A refresh rewrites a finished pyramid, whose documents name exactly its
# cells: the documents after it are those plus the changes its writes
# logged (``Store.logged_sizes``), with no listing of the arrays' cells.

@dataclass
class CellsAfter:
    """Per-chunk arrays after a refresh's changes: ``chunks`` (array path ->
    keys of its non-empty chunks, ``"1.0.2"``) as their documents named
    them with the logged changes applied; ``touched``: the arrays with a
    changed cell (whose documents are written again)."""

    chunks: dict[str, set[str]] = field(default_factory=dict)
    touched: set[str] = field(default_factory=set)

    def read(self, store: Store, array_path: str) -> None:
        """Add an array as its document names its chunks."""
        attrs = fdoc.node_attrs(store, array_path) or {}
        self.chunks[array_path] = set(attrs.get(nm.NONEMPTY) or ())

    def read_family(self, store: Store, level: int, delta: int) -> None:
        """Add every offset array of a links family (its folders)."""
        base = nm.links_family_path(level, delta)
        for seg in store.listdir(base):
            if seg != "zarr.json":
                self.read(store, f"{base}/{seg}")

    def apply(self, sizes: dict[str, tuple[int, int]], under: str, origin) -> None:
        """Apply the changed cells under ``under`` (an array or a family)
        whose chunk grid starts at ``origin``: written ones are there,
        removed ones are not."""
        prefix = f"{under}/"
        for key, (_, new) in sizes.items():
            array, sep, cell = key.partition("/c/")
            if sep and key.startswith(prefix):
                keys = self.chunks.setdefault(array, set())
                chunk = nm.chunk_key(nm.cell_chunk(cell, origin))
                keys.add(chunk) if new >= 0 else keys.discard(chunk)
                self.touched.add(array)

    def cells_in(self, array_path: str, chunks: set[str], origin) -> list[str]:
        """Storage keys of the array's cells at ``chunks`` (chunk keys)."""
        return [nm.cell_path(array_path, nm.parse_chunk_key(k), origin)
                for k in sorted(self.chunks.get(array_path, set()) & chunks)]

    def remove(self, key: str, origin) -> None:
        """A cell the refresh removed."""
        array, _, cell = key.partition("/c/")
        self.chunks[array].discard(nm.chunk_key(nm.cell_chunk(cell, origin)))
        self.touched.add(array)


def cells_moved(sizes: dict[str, tuple[int, int]], path: str, count) -> int:
    """How much the changed cells under ``path`` moved a count whose
    value per cell is ``count(size)`` (absent: 0)."""
    prefix, total = f"{path}/", 0
    for key, (old, new) in sizes.items():
        if key.startswith(prefix) and "/c/" in key:
            total += (count(new) if new >= 0 else 0) - (count(old) if old >= 0 else 0)
    return total


def family_documents_after(store: Store, level: int, delta: int, origin, grid,
                           cells: CellsAfter, sizes: dict, sid_ndim: int) -> dict[str, bytes]:
    """The documents of a links family that a refresh changed: each
    touched offset array's chunk list, and the family's record count (the
    documented one moved by the changed cells'), read before they are
    written again.  Offset arrays left without cells have none."""
    base = nm.links_family_path(level, delta)
    docs = {}
    for path in sorted(a for a in cells.touched if a.startswith(f"{base}/") and cells.chunks[a]):
        docs.update(_offset_array_doc(level, delta, path[len(base) + 1:], origin, grid,
                                      cells.chunks[path]))
    if docs or any(k.startswith(f"{base}/") for k in sizes):
        n = int((fdoc.node_attrs(store, base) or {}).get("num_links") or 0)
        docs.update(_family_group_docs(store, level, delta, sid_ndim,
                                       n + cells_moved(sizes, base, cdc.link_cell_records)))
    return docs


def vertex_documents_after(level: int, origin, grid, cells: CellsAfter) -> dict[str, bytes]:
    """The documents of a coarse level's vertex arrays after a refresh, if
    its vertex cells changed."""
    path = f"{level}/{nm.VERTICES}"
    return _vertex_docs(level, origin, grid, cells.chunks[path]) if path in cells.touched else {}


def write_documents(store: Store, docs: dict[str, bytes]) -> None:
    """Documents of arrays already written, leaves first."""
    _put_in_order(store, docs)


def dumps(obj) -> str:  # for the build record
    return json.dumps(obj, sort_keys=True)
