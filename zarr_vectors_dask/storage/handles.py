"""What a caller may pass as the store: a path or URL, or an open handle
as zarr-vectors hands them out (``zarr_vectors.open(...)`` Datasets,
``zarr_vectors.core.store.open_store(...)`` Groups, zarr groups and zarr
stores).  Each becomes a :class:`~zarr_vectors_dask.store.Store` URL with
its storage options, read from the handle's own zarr store.

A zarr ``MemoryStore`` lives in one process's memory, so it has no URL a
worker process could open.  It is served to tasks under a process-local
``zvdask-memory://<token>`` URL by :class:`ZarrMemoryFileSystem`, which reads
and writes the store's own dict; such a build must run on workers inside
this process (see ``runtime.client_for``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from typing import Any, Iterator

from fsspec import AbstractFileSystem, register_implementation

from ..errors import ReadOnlyStoreError, UnsupportedStoreError

__all__ = ["MEMORY_PROTOCOL", "is_memory_url", "memory_store_for", "opened", "ZarrMemoryFileSystem"]


MEMORY_PROTOCOL = "zvdask-memory"


#: token -> zarr MemoryStore, for the duration of a build (:func:`opened`).
_MEMORY: dict[str, Any] = {}


_MEMORY_LOCK = threading.Lock()


#: fsspec options that describe a filesystem instance, not how to reach
#: the data; a worker makes its own instance.
_INSTANCE_ONLY = ("asynchronous", "loop", "skip_instance_cache")


def is_memory_url(url: str) -> bool:
    return url.startswith(MEMORY_PROTOCOL + "://")


def memory_store_for(url: str):
    """The zarr MemoryStore behind a ``zvdask-memory://`` URL."""
    token = url[len(MEMORY_PROTOCOL) + 3:].split("/", 1)[0]
    store = _MEMORY.get(token)
    if store is None:
        raise FileNotFoundError(
            f"{url}: no in-memory store is registered under this URL in process {os.getpid()}; "
            f"a zarr MemoryStore can only be built by workers in the process that holds it")
    return store


def _zarr_store_of(obj: Any):
    """``(zarr store, path inside it)`` of a handle, or None if ``obj`` is
    not a handle (a path or URL)."""
    import zarr
    from zarr.abc.store import Store as ZarrStore

    if isinstance(obj, ZarrStore):
        return obj, ""
    if isinstance(obj, zarr.Group):
        return obj.store, obj.path
    inner = getattr(obj, "_zarr", None)  # zarr_vectors.core.group.Group
    if isinstance(inner, zarr.Group):
        return inner.store, inner.path
    group = getattr(obj, "_group", None)  # zarr_vectors.api.dataset.Dataset
    if group is not None and group is not obj:
        return _zarr_store_of(group)
    return None


def _join(base: str, path: str) -> str:
    path = (path or "").strip("/")
    return f"{base.rstrip('/')}/{path}" if path else base


@contextlib.contextmanager
def opened(obj: Any, storage_options: dict | None, *,
           writable: bool = True) -> Iterator[tuple[str, dict]]:
    """``(url, storage_options)`` for ``obj`` while the block runs.

    Paths and URLs pass through with ``storage_options``.  A handle
    carries its own options; giving ``storage_options`` as well is refused
    rather than one silently winning.  When ``writable``, a read-only
    handle is refused: it was opened so that nothing writes through it."""
    found = _zarr_store_of(obj)
    if found is None:
        yield str(os.fspath(obj) if isinstance(obj, os.PathLike) else obj), dict(
            storage_options or {})
        return
    zs, path = found
    what = f"{type(obj).__name__} on {zs!r}"
    if storage_options:
        raise UnsupportedStoreError(
            f"{what}: storage_options were given with an open store handle, which carries "
            f"its own; pass the URL with storage_options, or the handle alone")
    if writable and getattr(zs, "read_only", False):
        raise ReadOnlyStoreError(
            f"{what}: the store handle is read-only (opened with mode='r'); a pyramid "
            f"writes new levels, so open it with mode='r+' (zarr_vectors.open(url, "
            f"mode='r+')) or pass the URL")
    from zarr.storage import FsspecStore, LocalStore, MemoryStore
    if isinstance(zs, LocalStore):
        yield _join(os.path.abspath(str(zs.root)), path), {}
    elif isinstance(zs, FsspecStore):
        yield _fsspec_url(zs, path, what)
    elif isinstance(zs, MemoryStore):
        if path.strip("/"):
            raise UnsupportedStoreError(
                f"{what}: a group below the root of a MemoryStore ({path!r}) is not supported; "
                f"open the store at its root")
        token = uuid.uuid4().hex
        with _MEMORY_LOCK:
            _MEMORY[token] = zs
        try:
            yield _join(f"{MEMORY_PROTOCOL}://{token}", path), {}
        finally:
            with _MEMORY_LOCK:
                _MEMORY.pop(token, None)
    else:
        raise UnsupportedStoreError(
            f"{what}: zarr store type {type(zs).__name__} is not supported; pass a path, an "
            f"fsspec URL (with storage_options), or a handle on a LocalStore, FsspecStore or "
            f"MemoryStore")


def _fsspec_url(zs, path: str, what: str) -> tuple[str, dict]:
    fs = zs.fs
    # zarr wraps a synchronous filesystem (e.g. local files) to make it async.
    fs = getattr(fs, "sync_fs", None) or fs
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    options = {k: v for k, v in dict(getattr(fs, "storage_options", {}) or {}).items()
               if k not in _INSTANCE_ONLY}
    root = _join(str(zs.path), path)
    if proto in ("file", "local"):
        return os.path.abspath(root), {}
    if not proto:
        raise UnsupportedStoreError(f"{what}: the filesystem has no protocol to build a URL from")
    return f"{proto}://{root}", options


# ------------------------------------------------------------ memory stores
class ZarrMemoryFileSystem(AbstractFileSystem):
    """fsspec view of a registered zarr MemoryStore's key -> Buffer dict.

    Directories are implied by keys (as on an object store).  Only what
    ``Store`` and the build lock use is implemented; every call goes to
    the dict, so tasks in this process see each other's writes at once."""

    protocol = (MEMORY_PROTOCOL,)
    root_marker = ""
    cachable = False

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(MEMORY_PROTOCOL + "://"):
            path = path[len(MEMORY_PROTOCOL) + 3:]
        return path.strip("/")

    def _split(self, path) -> tuple[dict, str, str]:
        path = self._strip_protocol(path)
        token, _, key = path.partition("/")
        return memory_store_for(f"{MEMORY_PROTOCOL}://{token}")._store_dict, token, key

    def cat_file(self, path, start=None, end=None, **kwargs):
        d, _, key = self._split(path)
        buf = d.get(key)
        if buf is None:
            raise FileNotFoundError(path)
        data = buf.to_bytes()
        return data if start is None and end is None else data[start:end]

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        from zarr.core.buffer import default_buffer_prototype
        d, _, key = self._split(path)
        d[key] = default_buffer_prototype().buffer.from_bytes(bytes(value))

    def rm_file(self, path):
        d, _, key = self._split(path)
        if d.pop(key, None) is None:
            raise FileNotFoundError(path)

    def _keys_under(self, d: dict, key: str) -> list[str]:
        prefix = f"{key}/" if key else ""
        return [k for k in list(d) if k.startswith(prefix)]

    def info(self, path, **kwargs):
        d, token, key = self._split(path)
        name = f"{token}/{key}" if key else token
        buf = d.get(key) if key else None
        if buf is not None:
            return {"name": name, "size": len(buf), "type": "file"}
        if not key or self._keys_under(d, key):
            return {"name": name, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def ls(self, path, detail=True, **kwargs):
        d, token, key = self._split(path)
        info = self.info(path)
        if info["type"] == "file":
            return [info] if detail else [info["name"]]
        prefix = f"{key}/" if key else ""
        entries: dict[str, dict] = {}
        for k in self._keys_under(d, key):
            child, sep, _ = k[len(prefix):].partition("/")
            name = f"{token}/{prefix}{child}"
            if sep:
                entries.setdefault(name, {"name": name, "size": 0, "type": "directory"})
            else:
                buf = d.get(k)
                entries[name] = {"name": name, "size": len(buf) if buf is not None else 0,
                                 "type": "file"}
        out = [entries[n] for n in sorted(entries)]
        return out if detail else [e["name"] for e in out]

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        d, token, key = self._split(path)
        if key and key in d:
            keys = [key]
        else:
            keys = self._keys_under(d, key)
        out = {}
        for k in sorted(keys):
            buf = d.get(k)
            if buf is not None:
                out[f"{token}/{k}"] = {"name": f"{token}/{k}", "size": len(buf), "type": "file"}
        return out if detail else sorted(out)

    def rm(self, path, recursive=False, maxdepth=None):
        for p in ([path] if isinstance(path, str) else path):
            d, _, key = self._split(p)
            if key in d:
                d.pop(key, None)
            elif recursive:
                for k in self._keys_under(d, key):
                    d.pop(k, None)
            # A non-recursive delete of a directory: directories are implied
            # by keys, so there is nothing to remove.

    def mkdir(self, path, create_parents=True, **kwargs):
        pass

    def makedirs(self, path, exist_ok=False):
        pass


register_implementation(MEMORY_PROTOCOL, ZarrMemoryFileSystem, clobber=True)
