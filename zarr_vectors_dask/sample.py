"""Small level-0 sample stores, written by zarr-vectors' own writers.

Used by ``zvdask sample`` / ``zvdask demo`` and the notebooks.  A remote
URL (``s3://...``) is written to a local temporary directory first and then
uploaded file by file, because zarr-vectors' writers target local paths;
the root ``zarr.json`` goes last so a reader never sees half a store.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from .storage.store import Store, StoreAccessError, iter_secret_values

__all__ = ["KINDS", "DOMAIN", "CHUNK_SHAPE", "BIN_SHAPE", "sample_streamlines", "write_sample"]


KINDS = ("streamlines", "points")

#: Domain, chunk and bin of every sample store (the demo's layout).
DOMAIN = (0.0, 1000.0)
CHUNK_SHAPE = (125.0, 125.0, 125.0)
BIN_SHAPE = (5.0, 5.0, 5.0)


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def sample_streamlines(n_objects: int, n_vertices: int, seed: int = 0) -> list[np.ndarray]:
    """``n_objects`` random walks (float32, inside the domain) with
    ``n_vertices`` vertices in all."""
    rng = np.random.default_rng(seed)
    lo, hi = DOMAIN
    lines = []
    for n in _split(n_vertices, n_objects):
        start = rng.uniform(lo + 100, hi - 100, 3)
        steps = rng.normal(0, 4.0, (n, 3))
        lines.append(np.clip(start + np.cumsum(steps, axis=0), lo, hi - 1).astype(np.float32))
    return lines


def _write_local(path: str, kind: str, n_objects: int, n_vertices: int, seed: int) -> None:
    if kind == "streamlines":
        from zarr_vectors.types.polylines import write_polylines
        lines = sample_streamlines(n_objects, n_vertices, seed)
        lengths = np.array([np.linalg.norm(np.diff(line, axis=0), axis=1).sum() for line in lines],
                           np.float32)
        write_polylines(path, lines, chunk_shape=CHUNK_SHAPE, bin_shape=BIN_SHAPE,
                        object_attributes={"length": lengths})
    elif kind == "points":
        from zarr_vectors.types.points import write_points
        rng = np.random.default_rng(seed)
        lo, hi = DOMAIN
        centres = rng.uniform(lo + 50, hi - 50, (n_objects, 3))
        # every object owns at least one point
        oids = np.concatenate([np.arange(n_objects),
                               rng.integers(0, n_objects, max(0, n_vertices - n_objects))])
        pos = centres[oids] + rng.normal(0, 15.0, (oids.size, 3))
        write_points(path, np.clip(pos, lo, hi - 1).astype(np.float32),
                     chunk_shape=CHUNK_SHAPE, bin_shape=BIN_SHAPE, object_ids=oids.astype(np.int64))
    else:
        raise ValueError(f"sample kind {kind!r} is not one of {', '.join(KINDS)}")


def _upload(local: str, store: Store) -> int:
    files = []
    for dirpath, _dirs, names in os.walk(local):
        for name in names:
            full = os.path.join(dirpath, name)
            files.append(os.path.relpath(full, local).replace(os.sep, "/"))
    files.sort(key=lambda k: (k == "zarr.json", k))  # root document last
    batch: dict[str, bytes] = {}
    for key in files:
        with open(os.path.join(local, key), "rb") as fh:
            batch[key] = fh.read()
        if len(batch) >= 64 or key == "zarr.json":
            store.put_many(batch)
            batch = {}
    store.put_many(batch)
    return len(files)


def write_sample(url: str, *, kind: str = "streamlines", objects: int = 50,
                 vertices: int = 5000, seed: int = 0, storage_options: dict | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Write a level-0 sample store of ``kind`` at ``url`` (local path or
    fsspec URL) with zarr-vectors' writers; returns what was written."""
    if kind not in KINDS:
        raise ValueError(f"sample kind {kind!r} is not one of {', '.join(KINDS)}")
    if objects < 1 or vertices < objects:
        raise ValueError(f"sample needs objects >= 1 and vertices >= objects "
                         f"(got objects={objects}, vertices={vertices})")
    store = Store.from_url(url, storage_options)
    try:
        exists = store.root_exists()
    except Exception as exc:  # noqa: BLE001 - reported with the URL, without secrets
        msg = str(exc)
        for secret in iter_secret_values(store.storage_options):
            msg = msg.replace(secret, "***")
        raise StoreAccessError(f"{store.url}: cannot access: {type(exc).__name__}: {msg}") from None
    if exists:
        if not overwrite:
            raise FileExistsError(f"{store.url}: already exists; pass overwrite=True "
                                  f"(--overwrite) to replace it")
        store.remove_root()
    # Not a store behaviour: zarr-vectors' writers take a path on this
    # machine, so a local store is written in place, others by upload.
    if store.is_local:
        os.makedirs(os.path.dirname(store.root) or ".", exist_ok=True)
        _write_local(store.root, kind, objects, vertices, seed)
    else:
        with tempfile.TemporaryDirectory(prefix="zvdask-sample-") as tmp:
            local = os.path.join(tmp, "sample.zv")
            _write_local(local, kind, objects, vertices, seed)
            _upload(local, store)
    writer = "write_polylines" if kind == "streamlines" else "write_points"
    return {"url": store.url, "kind": kind, "objects": objects, "vertices": vertices,
            "writer": f"zarr_vectors {writer}"}
