"""Where bytes live: a picklable handle on a store root (local path or any
fsspec URL), with retries for the failures object stores throw at random.

One class per kind of store: :class:`LocalStore` (plain ``os`` calls),
:class:`ObjectStore` (fsspec, batched and retried) and its
:class:`S3Store`; :meth:`Store.from_url` picks the class from the URL.

Workers rebuild the filesystem from ``(url, storage_options)``; nothing of
the driver's process (open files, clients) travels in the graph.
"""

from __future__ import annotations

import abc
import errno
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterable, TypeVar

import fsspec
from zarr_vectors.exceptions import StoreError

__all__ = ["TEMPORARY", "BATCH_SIZE", "SIDECAR_PREFIX", "Parts", "joined", "StoreAccessError",
           "redact", "is_transient", "with_retries", "Store", "LocalStore", "ObjectStore", "S3Store",
           "check_access", "iter_secret_values"]


T = TypeVar("T")


BATCH_SIZE = 64  # requests in flight per batched call (see _Opened.of)

#: The project's own folder in a store (records, scratch): never part of a pyramid.
SIDECAR_PREFIX = ".zvdask/"


#: Keys in ``storage_options`` whose values must never be printed.
_SECRET_KEYS = ("secret", "key", "token", "password", "session_token",
                "aws_secret_access_key", "aws_access_key_id", "aws_session_token")


class Parts:
    """One object's bytes given as buffers to write back to back (a link
    cell's header and its slice of a large record array): a local file
    gets them with one ``writev``, never joined; ``bytes()`` joins them."""

    __slots__ = ("buffers",)

    def __init__(self, *buffers):
        self.buffers = buffers

    def __bytes__(self) -> bytes:
        return b"".join(self.buffers)


def joined(v):
    """``v`` as one bytes-like object: a :class:`Parts` joined, anything
    else as it is (where a writer needs one buffer)."""
    return bytes(v) if isinstance(v, Parts) else v


def _write_fd(fd: int, v) -> None:
    """All of ``v`` (bytes-like, or :class:`Parts`) to an open file."""
    if isinstance(v, Parts):
        done = os.writev(fd, v.buffers)
        total = sum(memoryview(b).nbytes for b in v.buffers)
        if done == total:
            return
        v = memoryview(bytes(v))[done:]  # a short writev: the rest, plainly
    view = memoryview(v)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B") if view.nbytes else memoryview(b"")
    while view:
        view = view[os.write(fd, view):]


def _make_dir(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)`` in one system call when the
    parent exists (a pyramid creates ~10^5 folders)."""
    try:
        os.mkdir(path)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
    except FileNotFoundError:
        os.makedirs(path, exist_ok=True)


def _local_walk(top: str, sizes: bool):
    """``(relative path, size or None)`` of every file under the folder
    ``top`` (nothing when it does not exist): ``scandir``'s entry types,
    and a stat per file only when ``sizes`` is asked."""
    todo = [("", top)]
    while todo:
        rel, folder = todo.pop()
        try:
            entries = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    todo.append((f"{rel}{e.name}/", e.path))
                elif not sizes:
                    yield rel + e.name, None
                else:
                    try:
                        yield rel + e.name, e.stat(follow_symlinks=False).st_size
                    except FileNotFoundError:  # removed since the listing
                        continue


def _local_names(top: str) -> list[str]:
    """Every file under the folder ``top``, by path relative to it."""
    return [name for name, _ in _local_walk(top, sizes=False)]


#: What a process killed mid-write leaves next to the object it was
#: replacing: ``Store.put_many``'s ``<name>.tmp-<pid>-<hex>`` and zarr
#: LocalStore's ``<name>.<uuid>.partial``.  Never part of the format.
TEMPORARY = re.compile(r"\.tmp-\d+-[0-9a-f]{8}$|\.[0-9a-f]{32}\.partial$")

class StoreAccessError(RuntimeError, StoreError):
    """A store operation failed for good (bad credentials, missing bucket,
    no permission) — retrying will not help."""


def redact(options: Any) -> Any:
    """``storage_options`` with every credential replaced by ``***``."""
    if isinstance(options, dict):
        return {
            k: ("***" if k.lower() in _SECRET_KEYS else redact(v))
            for k, v in options.items()
        }
    return options


#: Exception classes (matched by name anywhere in the MRO, so botocore and
#: aiohttp need not be imported) that mean "the endpoint did not answer".
_TRANSIENT_TYPES = frozenset({
    "ConnectionError",  # botocore's: EndpointConnectionError, ConnectionClosedError, ...
    "HTTPClientError", "ReadTimeoutError", "ConnectTimeoutError", "IncompleteRead",
    "ResponseParserError", "FSTimeoutError", "ClientConnectorError", "ClientOSError",
    "ServerDisconnectedError", "ServerTimeoutError", "ClientPayloadError",
})


#: S3 error codes worth another try.
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "RequestTimeout", "RequestTimeoutException", "TooManyRequestsException",
    "RequestLimitExceeded", "BandwidthLimitExceeded", "OperationAborted",
})


_TRANSIENT_ERRNOS = frozenset(getattr(errno, n) for n in (
    "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "ETIMEDOUT", "EPIPE", "EAGAIN", "EBUSY",
    "EREMOTEIO", "EHOSTUNREACH", "ENETUNREACH", "ENETDOWN") if hasattr(errno, n))


def _s3_response(exc: BaseException) -> dict | None:
    """The S3 error response behind ``exc`` (s3fs re-raises botocore's
    ClientError as an OSError caused by it)."""
    seen = 0
    while exc is not None and seen < 5:
        resp = getattr(exc, "response", None)
        if isinstance(resp, dict) and "Error" in resp:
            return resp
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def is_transient(exc: BaseException) -> bool:
    """Connection failures, timeouts, 5xx and throttling: worth another try.
    Bad credentials, missing buckets and objects, denied access: not."""
    if isinstance(exc, (StoreAccessError, FileNotFoundError, PermissionError,
                        IsADirectoryError, NotADirectoryError, FileExistsError)):
        return False
    names = {c.__name__ for c in type(exc).__mro__}
    if any("SSL" in n or "Certificate" in n for n in names):
        return False  # a TLS misconfiguration does not heal by itself
    resp = _s3_response(exc)
    if resp is not None:
        code = str((resp.get("Error") or {}).get("Code") or "")
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code in _TRANSIENT_CODES or (isinstance(status, int)
                                            and (status >= 500 or status == 429))
    if isinstance(exc, (ConnectionError, TimeoutError)) or names & _TRANSIENT_TYPES:
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    # Last resort, the message -- without URLs and object paths, whose port
    # numbers and chunk keys ("…:40312/…/c/403/1") must not decide anything.
    words = [w for w in f"{type(exc).__name__} {exc}".lower().split()
             if "/" not in w and "://" not in w]
    text = " ".join(words)
    permanent = ("accessdenied", "access denied", "invalidaccesskeyid",
                 "signaturedoesnotmatch", "nosuchbucket", "forbidden")
    if any(p in text for p in permanent):
        return False
    transient = ("connect", "timeout", "timed out", "connection reset", "throttl", "slowdown",
                 "slow down", "internalerror", "serviceunavailable", "service unavailable",
                 "temporarily", "broken pipe", "server disconnected")
    if any(t in text for t in transient):
        return True
    return any(w.strip("().,:;'\"[]") in ("500", "502", "503", "504", "429") for w in words)


def _backoff(attempt: int, base_delay: float = 0.25, max_delay: float = 8.0) -> float:
    """Seconds to wait before retry ``attempt + 1``: jittered exponential
    (about a minute over eight attempts)."""
    return min(max_delay, base_delay * 2 ** attempt) * (0.5 + random.random())


def with_retries(fn: Callable[[], T], *, what: str, attempts: int = 8) -> T:
    """Call ``fn`` and retry transient failures with :func:`_backoff`, so a
    store that blips for a few seconds does not fail a long build."""
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if not is_transient(exc) or attempt == attempts - 1:
                raise
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def _kind(url: str) -> type["Store"]:
    """The class for a store URL: a local path (or ``file://``), S3, or
    any other fsspec store."""
    if "://" not in url or url.startswith("file://"):
        return LocalStore
    if url.startswith(("s3://", "s3a://")):
        return S3Store
    return ObjectStore


@dataclass(frozen=True)
class Store(abc.ABC):
    """A store root: ``url`` plus fsspec ``storage_options``.

    Small and picklable, so it rides in task arguments; each process makes
    (and caches) its own filesystem object from it.  ``Store(url)`` and
    :meth:`from_url` make the class for the URL's kind (:class:`LocalStore`,
    :class:`S3Store`, :class:`ObjectStore`): what differs between kinds is
    in their methods and in the attributes below, never in a caller's test
    of the kind.
    """

    url: str
    storage_options: dict = field(default_factory=dict, compare=False)
    #: Set by :meth:`changes_only`: the folder where each write logs its keys.
    write_log: str | None = field(default=None, compare=False)

    #: A whole object is cheaper to read than its index and then ranges of it.
    prefers_whole_reads: ClassVar[bool]
    #: A writer killed mid-write can leave temporaries (:data:`TEMPORARY`) here.
    leaves_temporaries: ClassVar[bool]
    #: Tries of a read through :meth:`zarr_store` (:func:`with_retries`' ``attempts``).
    zarr_read_attempts: ClassVar[int]
    #: A listing's change stamp is each file's mtime (else the object's digest).
    lists_mtimes: ClassVar[bool]

    def __new__(cls, url: Any = None, storage_options: dict | None = None, write_log=None):
        # ``Store(url)`` is the kind's class; unpickling passes no url.
        if cls is Store and url is not None:
            cls = _kind(str(url))
        return super().__new__(cls)

    def __repr__(self) -> str:  # credentials never reach logs or task reprs
        return f"Store({self.url!r})"

    __str__ = __repr__

    @classmethod
    def from_url(cls, url: Any, storage_options: dict | None = None) -> "Store":
        url = str(url)
        if "://" not in url:
            url = os.path.abspath(url)
        return cls(url.rstrip("/"), dict(storage_options or {}))

    # ------------------------------------------------------------------ fs
    def _opened(self) -> "_Opened":
        """This process's filesystem for the store, made once."""
        cached = _FS_CACHE.get(self._cache_key())
        if cached is None:
            fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
            cached = _FS_CACHE[self._cache_key()] = _Opened.of(fs, root.rstrip("/"))
        return cached

    @property
    def fs(self):
        return self._opened().fs

    @property
    def root(self) -> str:
        return self._opened().root

    def _cache_key(self):
        # The URL decides the kind, so the class need not be part of the key.
        key = self.__dict__.get("_key")
        if key is None:  # computed once per process: every cell path asks for it
            import json
            key = (self.url, json.dumps(self.storage_options, sort_keys=True, default=str))
            object.__setattr__(self, "_key", key)
        return key

    @property
    def is_local(self) -> bool:
        """For callers outside the package; inside it, ask for the behaviour."""
        return False

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def describe(self, key: str = "") -> str:
        """A URL for messages: never contains credentials."""
        return f"{self.url}/{key}" if key else self.url

    # ------------------------------------------------------------- byte I/O
    def get(self, key: str) -> bytes | None:
        """The bytes at ``key``, or None when there is no such object."""
        def _get():
            try:
                return self.fs.cat_file(self.path(key), **self._opened().whole_read_kw)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return None
        return with_retries(_get, what=self.describe(key))

    @abc.abstractmethod
    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        """Several objects in one call (concurrent on object stores)."""

    @abc.abstractmethod
    def get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        """Byte ranges ``(key, start, end)`` of several objects, in one call
        (concurrent on object stores).  ``start < 0`` with ``end=None`` is
        the last ``-start`` bytes (a shard index at the end).  None where
        the object does not exist; a range past the object's end comes
        back short, as a plain read does (the caller checks lengths)."""

    def put(self, key: str, data: bytes) -> None:
        self.put_many({key: data})

    def put_many(self, items: dict[str, bytes], *, atomic: bool = True) -> None:
        """Write several objects (bytes-like, or :class:`Parts`);
        idempotent (same key, same bytes).

        ``atomic=False`` is for cells of arrays no reader can see yet (an
        unpublished level or link family): a writer killed mid-file leaves
        a torn cell that the task's retry rewrites before anything is
        published, and skipping the temporary and rename halves the cost
        of the tens of thousands of small files a pyramid has.

        On a :meth:`changes_only` store, the keys are logged first and
        only objects whose bytes differ from the stored ones are written,
        atomically (the level is published: readers may be looking)."""
        if not items:
            return
        if self.write_log is not None:
            items, atomic = self._changed(items), True
        if items:
            self._write(items, atomic=atomic)

    @abc.abstractmethod
    def _write(self, items: dict[str, bytes], *, atomic: bool) -> None:
        """Write the objects, as this kind does (see :meth:`put_many`)."""

    # ------------------------------------------------- in-place rewrites
    def changes_only(self, write_log: str) -> "Store":
        """This store, writing only what differs and logging, under the
        folder ``write_log``, every key written or found equal
        (``written/``) and every key whose bytes it changed (``changed/``):
        a rewrite in place (a refresh) then leaves unchanged objects
        untouched, the keys it did not log are what it must remove, and the
        changed ones what later stages must redo (:meth:`logged_keys`)."""
        return replace(self, write_log=write_log.rstrip("/"))

    def _changed(self, items: dict[str, bytes]) -> dict[str, bytes]:
        """Log ``items``' keys (before writing: a log lists at least what
        was written), then keep the items whose bytes differ, logged as
        changed with their sizes before and after (:meth:`logged_sizes`).
        The project's own sidecar (scratch, records) is neither logged nor
        compared."""
        logged = [k for k in items if not k.startswith(SIDECAR_PREFIX)]
        if not logged:
            return items
        self._log("written", logged)
        old = self.get_many(logged)
        out = {k: v for k, v in items.items()
               if k not in old or old[k] is None or old[k] != bytes(v)}
        self._log("changed", [_size_line(k, _nbytes(old[k]), _nbytes(out[k]))
                              for k in out if k in old])
        return out

    def note_changed(self, keys: list[str]) -> None:
        """Log ``keys`` as changed (objects a rewrite removed)."""
        self._log("changed", keys)

    def remove_noted(self, keys: list[str],
                     ledger: dict[str, tuple[int, int]] | None = None) -> None:
        """Remove ``keys``, on a :meth:`changes_only` store logged as
        changed first: a rewrite killed between the two still knows what
        it removed (the composition redoes the chains through them).
        ``ledger`` (:meth:`logged_sizes`): each key's size is taken
        (:meth:`sizes_of`), logged with it as :meth:`_changed` logs a write,
        and recorded there as ``(size, -1)``."""
        if ledger is not None:
            old = self.sizes_of(keys)
            ledger.update((k, (old[k], -1)) for k in keys)
        if self.write_log is not None:
            self.note_changed(list(keys) if ledger is None else
                              [_size_line(k, ledger[k][0], -1) for k in keys])
        for k in keys:
            self.remove_tree(k)

    def _log(self, kind: str, keys: list[str]) -> None:
        if keys:
            self._write({_log_name(self.write_log, kind): "\n".join(keys).encode()}, atomic=True)

    def _log_lines(self, kind: str) -> list[str]:
        folder = f"{self.write_log}/{kind}"
        names = self.keys_under(folder)
        blobs = self.get_many([f"{folder}/{n}" for n in names])
        return [line for b in blobs.values() if b for line in b.decode().split("\n") if line]

    def logged_keys(self, kind: str = "written") -> set[str]:
        """Every key the writes through :meth:`changes_only` stores with
        this ``write_log`` logged as ``kind`` (``written`` or ``changed``)."""
        return {line.partition("\t")[0] for line in self._log_lines(kind)}

    def logged_sizes(self) -> dict[str, tuple[int, int]]:
        """``{key: (size before, size after)}`` (-1: absent) of every object
        these writes changed and logged with sizes.  A key logged twice
        (a task's retry before its write landed) must say the same twice:
        else the log cannot tell the object's first state, and this raises
        naming it."""
        out: dict[str, tuple[int, int]] = {}
        for line in self._log_lines("changed"):
            key, tab, rest = line.partition("\t")
            if not tab:
                continue
            old, new = (int(x) for x in rest.split("\t"))
            if out.setdefault(key, (old, new)) != (old, new):
                raise StoreError(f"{self.describe(key)}: the write log {self.write_log!r} "
                                 f"records two changes of it ({out[key]} and {(old, new)} "
                                 f"bytes before and after)")
        return out

    def sizes_of(self, keys: Iterable[str]) -> dict[str, int]:
        """Byte size of each of ``keys`` (-1: absent), one request each."""
        def _size(k):
            try:
                return int(self.fs.size(self.path(k)))
            except FileNotFoundError:
                return -1
        return {k: with_retries(lambda k=k: _size(k), what=self.describe(k)) for k in keys}

    def exists(self, key: str) -> bool:
        return with_retries(lambda: self.fs.exists(self.path(key)), what=self.describe(key))

    def listdir(self, key: str) -> list[str]:
        """Immediate child names under ``key`` (empty when absent)."""
        def _ls():
            try:
                entries = self._ls(self.path(key))
            except FileNotFoundError:
                return []
            # An emptied directory on a filer-backed store lists itself.
            here = self.path(key).rstrip("/")
            return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries
                           if e.rstrip("/") != here})
        return with_retries(_ls, what=self.describe(key))

    @abc.abstractmethod
    def _ls(self, path: str) -> list[str]:
        """``fs.ls`` of ``path``, names only, as this kind needs it."""

    @abc.abstractmethod
    def sizes(self, key: str) -> dict[str, int]:
        """Byte size of every object under ``key``, by path relative to it:
        one listing (a walk locally, a recursive find on object stores)."""

    def _find_args(self, top: str) -> tuple[tuple, dict]:
        """``fs.find`` arguments listing everything under ``top``.  s3fs
        follows an empty listing with a HEAD (is ``top`` a file?) unless a
        prefix is given: list the parent with ``top``'s name as the prefix,
        the same one request."""
        if self._opened().s3 and "/" in top:
            parent, name = top.rsplit("/", 1)
            return (parent,), {"prefix": f"{name}/"}
        return (top,), {}

    def listing(self, key: str) -> dict[str, dict]:
        """Every object under ``key`` with its listing details (size, ETag,
        ...), by path relative to it: one recursive listing of an object
        store (one LIST request per page, no HEAD).  Not for local paths."""
        top = self.path(key).rstrip("/")
        args, kw = self._find_args(top)

        def _find():
            try:
                return self.fs.find(*args, detail=True, **kw)
            except FileNotFoundError:
                return {}
        found = with_retries(_find, what=self.describe(key))
        return {p[len(top) + 1:]: info for p, info in found.items()
                if info.get("type") != "directory" and p.startswith(top + "/")}

    @abc.abstractmethod
    def keys_under(self, key: str) -> list[str]:
        """Every object under ``key``, by path relative to it: one listing,
        names only (no per-object stat)."""

    def remove_tree(self, key: str) -> None:
        def _rm():
            try:
                self.fs.rm(self.path(key), recursive=True)
            except FileNotFoundError:
                pass
        with_retries(_rm, what=self.describe(key))

    @abc.abstractmethod
    def remove_empty_dir(self, key: str) -> None:
        """Remove the folder ``key`` if it is empty, never recursively (a
        process may be writing into it right now)."""

    def zarr_store(self):
        """A zarr v3 store on the same root (for arrays zarr must encode);
        on a :meth:`changes_only` store, one that writes as it does."""
        inner = self._zarr_store()
        if self.write_log is None:
            return inner
        return _changes_only_zarr_store(inner, self.write_log)

    @abc.abstractmethod
    def _zarr_store(self):
        """zarr's own store for this kind, on the same root."""

    # ------------------------------------------------------------- the root
    @abc.abstractmethod
    def root_exists(self) -> bool:
        """Whether anything is at the root (a listing on object stores)."""

    @abc.abstractmethod
    def root_known_absent(self) -> bool:
        """True when the root is known to be missing without a request."""

    @abc.abstractmethod
    def root_is_file(self) -> bool:
        """True when the root is a file (so no store can be there)."""

    @abc.abstractmethod
    def remove_root(self) -> None:
        """Remove everything at the root."""

    @abc.abstractmethod
    def write_refusal(self, key: str) -> tuple[str, str] | None:
        """``(path, why)`` when writing into the folder ``key`` (the root if
        there is no such folder) is known to be refused before any write;
        None otherwise."""


@dataclass(frozen=True, repr=False)
class LocalStore(Store):
    """A folder on this machine (a path or ``file://`` URL): plain ``os``
    calls, which cost less than fsspec's bookkeeping per small file."""

    prefers_whole_reads = True  # one open and read of a whole shard
    leaves_temporaries = True  # put_many's and zarr LocalStore's temporary + rename
    zarr_read_attempts = 8  # zarr's LocalStore does not retry
    lists_mtimes = True

    @property
    def is_local(self) -> bool:
        return True

    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        # Plain reads: fsspec's per-path bookkeeping costs more than
        # reading a small cell from the page cache.  The root is looked up
        # once, not per cell.
        root, read = self.root, self._read_local
        return {k: read(f"{root}/{k}" if k else root) for k in keys}

    def get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        if not requests:
            return []
        return [self._read_local_range(self.path(k), s, e) for k, s, e in requests]

    @staticmethod
    def _read_local_range(path: str, start: int, end: int | None) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                if start < 0:
                    size = os.fstat(fh.fileno()).st_size
                    fh.seek(max(0, size + start))
                    return fh.read() if end is None else fh.read(max(0, end - fh.tell()))
                fh.seek(start)
                return fh.read() if end is None else fh.read(max(0, end - start))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    @staticmethod
    def _read_local(path: str) -> bytes | None:
        # os-level calls, as the writer (a composition reads ~10^4 cells).
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            parts, want = [], max(os.fstat(fd).st_size, 1 << 16)
            while True:  # to the end: a short read is not taken for it
                part = os.read(fd, want)
                if not part:
                    break
                parts.append(part)
        except IsADirectoryError:
            return None
        finally:
            os.close(fd)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _write(self, items: dict[str, bytes], *, atomic: bool) -> None:
        # os-level calls: Python's buffered ``open`` costs as much again
        # as the system calls for a cell of a few hundred bytes.
        made = set()
        suffix = f".tmp-{os.getpid()}-{random.getrandbits(32):08x}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        root = self.root  # once, not per cell
        for k, v in items.items():
            p = f"{root}/{k}" if k else root
            parent = p.rpartition("/")[0]
            if parent not in made:
                _make_dir(parent)
                made.add(parent)
            target = p + suffix if atomic else p
            fd = os.open(target, flags, 0o644)
            try:
                _write_fd(fd, v)
            finally:
                os.close(fd)
            if atomic:
                os.replace(target, p)  # a reader never sees a torn object

    def _ls(self, path: str) -> list[str]:
        return self.fs.ls(path, detail=False)

    def sizes(self, key: str) -> dict[str, int]:
        return dict(_local_walk(self.path(key).rstrip("/"), sizes=True))

    def keys_under(self, key: str) -> list[str]:
        return _local_names(self.path(key).rstrip("/"))

    def sizes_of(self, keys: Iterable[str]) -> dict[str, int]:
        out = {}
        for k in keys:
            try:
                out[k] = os.stat(self.path(k)).st_size
            except (FileNotFoundError, NotADirectoryError):
                out[k] = -1
        return out

    def remove_empty_dir(self, key: str) -> None:
        try:
            os.rmdir(self.path(key))
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                raise

    def _zarr_store(self):
        import zarr.storage
        return zarr.storage.LocalStore(self.root)

    def root_exists(self) -> bool:
        return os.path.exists(self.root)

    def root_known_absent(self) -> bool:
        return not os.path.exists(self.root)

    def root_is_file(self) -> bool:
        return os.path.isfile(self.root)

    def remove_root(self) -> None:
        shutil.rmtree(self.root)

    def write_refusal(self, key: str) -> tuple[str, str] | None:
        # The file system's permissions say it before anything is written.
        path = self.root
        folder = os.path.join(path, key)
        if os.path.isdir(folder):
            path = folder
        if os.access(path, os.W_OK):
            return None
        try:
            read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        return path, ("a read-only file system" if read_only else "permission denied")


@dataclass(frozen=True, repr=False)
class ObjectStore(Store):
    """Any other fsspec store (object stores, memory): batched concurrent
    calls, and every call retried."""

    prefers_whole_reads = False  # ranged reads: the index, then just the parts asked for
    leaves_temporaries = False  # objects are written whole
    zarr_read_attempts = 1  # zarr_store() retries inside (_retrying_zarr_store)
    lists_mtimes = False  # ETags (digests) instead

    def get_many(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        paths = [self.path(k) for k in keys]

        def _cat():
            o = self._opened()
            return o.fs.cat(paths, on_error="return", **o.whole_read_kw, **o.batch_kw)
        raw = with_retries(_cat, what=self.describe(keys[0]))
        result: dict[str, bytes | None] = {}
        for k, p in zip(keys, paths):
            v = raw.get(p)
            if isinstance(v, FileNotFoundError) or v is None:
                result[k] = None
            elif isinstance(v, BaseException):
                # One failed member: retry it alone so the classification
                # (transient or not) applies to it.
                result[k] = self.get(k)
            else:
                result[k] = v
        return result

    def get_ranges(self, requests: list[tuple[str, int, int | None]]) -> list[bytes | None]:
        if not requests:
            return []
        paths = [self.path(k) for k, _, _ in requests]

        def _cat():
            return self.fs.cat_ranges(paths, [s for _, s, _ in requests],
                                      [e for _, _, e in requests], on_error="return",
                                      **self._opened().batch_kw)
        raw = with_retries(_cat, what=self.describe(requests[0][0]))
        out: list[bytes | None] = []
        for (k, s, e), p, v in zip(requests, paths, raw):
            if isinstance(v, FileNotFoundError) or v is None:
                out.append(None)
            elif isinstance(v, BaseException):
                # One failed member: retry it alone so the classification
                # (transient or not) applies to it.
                def _one(p=p, s=s, e=e):
                    try:
                        return self.fs.cat_file(p, start=s, end=e)
                    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                        return None
                out.append(with_retries(_one, what=self.describe(k)))
            else:
                out.append(bytes(v))
        return out

    def _write(self, items: dict[str, bytes], *, atomic: bool) -> None:
        # Objects are written whole: ``atomic`` needs nothing more here.
        payload = {self.path(k): joined(v) for k, v in items.items()}
        with_retries(lambda: self.fs.pipe(payload, **self._opened().batch_kw),
                     what=self.describe(next(iter(items))))

    def _ls(self, path: str) -> list[str]:
        # Not fsspec's cached listing: other processes write here.
        return self.fs.ls(path, detail=False, refresh=True)

    def sizes(self, key: str) -> dict[str, int]:
        top = self.path(key).rstrip("/")

        def _find():
            try:
                found = self.fs.find(top, detail=True)
            except FileNotFoundError:
                return {}
            return {p[len(top) + 1:]: int(v.get("size") or 0) for p, v in found.items()
                    if v.get("type") != "directory" and p.startswith(top + "/")}
        return with_retries(_find, what=self.describe(key))

    def keys_under(self, key: str) -> list[str]:
        top = self.path(key).rstrip("/")
        args, kw = self._find_args(top)

        def _find():
            try:
                found = self.fs.find(*args, **kw)
            except FileNotFoundError:
                return []
            return [p[len(top) + 1:] for p in found if p.startswith(top + "/")]
        return with_retries(_find, what=self.describe(key))

    def remove_tree(self, key: str) -> None:
        super().remove_tree(key)
        self.fs.invalidate_cache()
        with_retries(lambda: self._prune_empty_dirs(key), what=self.describe(key))

    def _prune_empty_dirs(self, key: str) -> None:
        """Object stores with real directories (SeaweedFS's filer) keep the
        emptied ones, which would still list as levels or ``.zvdask``;
        remove them deepest first (a non-recursive delete never takes
        objects with it)."""
        try:
            tree = [d for d, _, _ in self.fs.walk(self.path(key), topdown=False)]
        except FileNotFoundError:
            tree = []
        top = self.path(key)
        for dirpath in [*tree, *([] if top in tree else [top])]:
            try:
                self.fs.rm(dirpath)
            except FileNotFoundError:
                pass
        self.fs.invalidate_cache()

    def remove_empty_dir(self, key: str) -> None:
        if self.listdir(key):
            return
        fs = self.fs
        try:
            fs.rm(self.path(key))  # not recursive: never takes objects with it
        except (FileNotFoundError, OSError):
            pass
        fs.invalidate_cache()

    def _zarr_store(self):
        import zarr.storage
        from .handles import is_memory_url, memory_store_for
        if is_memory_url(self.url):  # the caller's own MemoryStore (handles.py)
            return memory_store_for(self.url)
        fs = self.fs
        if not getattr(fs, "async_impl", False):
            raise StoreAccessError(f"{self.url}: zarr needs an async fsspec filesystem")
        afs = type(fs)(**{**self.storage_options, "asynchronous": True})
        return _retrying_zarr_store(zarr.storage.FsspecStore(afs, path=self.root))

    def root_exists(self) -> bool:
        return bool(self.listdir(""))

    def root_known_absent(self) -> bool:
        return False  # told by check_access's listing ("no such path or bucket")

    def root_is_file(self) -> bool:
        return False  # the root is a prefix, whatever objects share its name

    def remove_root(self) -> None:
        self.remove_tree("")

    def write_refusal(self, key: str) -> tuple[str, str] | None:
        return None  # told at the first write: the build lock's conditional put


@dataclass(frozen=True, repr=False)
class S3Store(ObjectStore):
    """An S3 (or S3-compatible) store: its conditional requests
    (``If-None-Match``, ``If-Match``) make the build lock exclusive
    (``lock.py``)."""


@dataclass(frozen=True)
class _Opened:
    """A filesystem, the store's root in it, and the call arguments that
    suit it, worked out once per process."""

    fs: Any
    root: str
    s3: bool
    whole_read_kw: dict  # for reading a whole object
    batch_kw: dict  # for a batched call (several objects)

    @classmethod
    def of(cls, fs, root: str) -> "_Opened":
        from fsspec.asyn import AsyncFileSystem
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        s3 = bool({"s3", "s3a"} & set(protocols))
        # s3fs sends a HEAD before every whole-object GET (to split large
        # objects into concurrent ranges) and, on a 404, a listing: three
        # requests for a missing cell.  Our objects are cells and shards,
        # far below the size where ranges pay.
        whole = {"max_concurrency": 1} if s3 else {}
        # fsspec's default batch (thousands) makes every completion re-scan
        # the pending set; 64 measured 20-25% less client CPU per request
        # on SeaweedFS (3,000 PUTs and GETs of 400 B, benchmarks/README.md).
        batch = {"batch_size": BATCH_SIZE} if isinstance(fs, AsyncFileSystem) else {}
        return cls(fs, root, s3, whole, batch)


_FS_CACHE: dict = {}


_RETRYING_STORE_CLS: list = []


def _retrying_zarr_store(inner):
    """``inner`` with :func:`with_retries`' policy on every request, so
    arrays zarr encodes survive the same blips as our own cells."""
    if not _RETRYING_STORE_CLS:
        _RETRYING_STORE_CLS.append(_make_retrying_store_cls())
    return _RETRYING_STORE_CLS[0](inner)


def _make_retrying_store_cls():
    import asyncio

    from zarr.storage import WrapperStore

    class RetryingStore(WrapperStore):
        async def _retry(self, call, attempts: int = 8):
            # with_retries' policy, awaited instead of slept.
            for attempt in range(attempts):
                try:
                    return await call()
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not is_transient(exc) or attempt == attempts - 1:
                        raise
                    await asyncio.sleep(_backoff(attempt))

        async def get(self, key, prototype, byte_range=None):
            return await self._retry(lambda: self._store.get(key, prototype, byte_range))

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            return await self._retry(
                lambda: self._store.get_partial_values(prototype, key_ranges))

        async def exists(self, key):
            return await self._retry(lambda: self._store.exists(key))

        async def set(self, key, value):
            await self._retry(lambda: self._store.set(key, value))

        async def delete(self, key):
            await self._retry(lambda: self._store.delete(key))

    return RetryingStore


def _nbytes(v) -> int:
    """Size of a stored or to-be-written object (-1: None, absent)."""
    if v is None:
        return -1
    if isinstance(v, Parts):
        return sum(memoryview(b).nbytes for b in v.buffers)
    return memoryview(v).nbytes


def _size_line(key: str, old: int, new: int) -> str:
    """A ``changed`` log line with the object's sizes (:meth:`Store.logged_sizes`)."""
    return f"{key}\t{int(old)}\t{int(new)}"


def _log_name(write_log: str, kind: str) -> str:
    """A new log file of a ``changes_only`` store (unique per writer and call)."""
    return f"{write_log}/{kind}/{os.getpid()}-{random.getrandbits(64):016x}"


_CHANGES_ONLY_CLS: list = []


def _changes_only_zarr_store(inner, write_log: str):
    """``inner`` logging each key it is asked to set under ``write_log``
    and leaving a stored object with the same bytes untouched, as
    :meth:`Store.put_many` does on a ``changes_only`` store."""
    if not _CHANGES_ONLY_CLS:
        _CHANGES_ONLY_CLS.append(_make_changes_only_cls())
    return _CHANGES_ONLY_CLS[0](inner, write_log)


def _make_changes_only_cls():
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import WrapperStore

    class ChangesOnlyStore(WrapperStore):
        def __init__(self, store, write_log: str):
            super().__init__(store)
            self._log = write_log

        def _with_store(self, store):
            return type(self)(store, self._log)

        async def set(self, key, value):
            proto = default_buffer_prototype()
            if not key.startswith(SIDECAR_PREFIX):
                await self._note("written", key, proto)
                old = await self._store.get(key, proto)
                if old is not None and old.to_bytes() == value.to_bytes():
                    return
                await self._note("changed", key, proto)
            await self._store.set(key, value)

        async def _note(self, kind: str, key: str, proto):
            await self._store.set(_log_name(self._log, kind),
                                  proto.buffer.from_bytes(key.encode()))

        async def _set_many(self, values):
            for key, value in values:
                await self.set(key, value)

    return ChangesOnlyStore


def check_access(store: Store) -> None:
    """Fail fast, with the URL and never the secret, when the store cannot
    be reached for a permanent reason."""
    try:
        with_retries(lambda: store.fs.ls(store.root, detail=False), what=store.url,
                     attempts=4)
    except FileNotFoundError:
        raise StoreAccessError(f"{store.url}: no such path or bucket") from None
    except PermissionError as exc:
        raise StoreAccessError(
            f"{store.url}: access denied ({type(exc).__name__}); check the "
            f"credentials in storage_options or the AWS environment") from None
    except Exception as exc:  # noqa: BLE001
        msg = str(exc)
        for opt in iter_secret_values(store.storage_options):
            msg = msg.replace(opt, "***")
        raise StoreAccessError(f"{store.url}: cannot access store: "
                               f"{type(exc).__name__}: {msg}") from None


def iter_secret_values(options: Any) -> Iterable[str]:
    if isinstance(options, dict):
        for k, v in options.items():
            if k.lower() in _SECRET_KEYS and isinstance(v, str) and v:
                yield v
            else:
                yield from iter_secret_values(v)
