"""The build lock: at most one build writes a store at a time.

``.zvdask/lock.json`` holds the owner (host, pid), a random token and a
heartbeat a background thread renews every ``lease / 4`` seconds.

* Taking it is an exclusive create: a hard link of a complete temporary
  file on a local store (fails if the name exists), a conditional put
  (``If-None-Match: *``) on S3.  Two builds started at once: one wins.
* Releasing it checks the token (a conditional delete, ``If-Match`` the
  ETag, on S3), so a build never removes its successor's lock.
* ``resume`` takes a lock over only when its owner is provably gone (same
  host, process ended) or its lease has expired (no heartbeat for
  ``lease`` seconds); the take-over is itself conditional (a rename on a
  local store, ``If-Match`` on S3), so two resumes cannot both win.
  While the lease is fresh it refuses, naming the owner.
* An owner that finds its lock taken over (its renewal fails) marks it
  lost; the build stops at its next check without publishing more.

Stores other than local paths and S3 get a check-then-put (not exclusive);
so does an S3 server that rejects conditional writes (``NotImplemented``),
with a warning.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from ..errors import BuildError
from .store import LocalStore, S3Store, Store, with_retries

__all__ = ["LOCK_KEY", "SCRATCH_DIR", "default_lease", "BuildLock", "remove_empty_scratch"]


LOCK_KEY = ".zvdask/lock.json"


SCRATCH_DIR = ".zvdask"


log = logging.getLogger("zarr_vectors_dask.lock")  # its name before the layout (issue 23)


def default_lease() -> float:
    """Seconds without a heartbeat after which a lock counts as abandoned
    (``ZVDASK_LOCK_LEASE`` overrides the default of 120)."""
    try:
        return max(1.0, float(os.environ.get("ZVDASK_LOCK_LEASE", "120")))
    except ValueError:
        return 120.0


#: A local lock's own temporaries: the new lock before its link, the old
#: one renamed aside before its unlink.
_ASIDE = re.compile(r"lock\.json\.(new|old)-[0-9a-f]{32}")


class _Exists(Exception):
    pass


class _Changed(Exception):
    pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


# ------------------------------------------------------------------ backends
class _Local:
    """Exclusive create by ``link``; compare-and-swap by ``rename``."""

    def __init__(self, store: Store):
        self.path = store.path(LOCK_KEY)

    def read(self):
        """(bytes, version) or (None, None); the version is the mtime."""
        try:
            with open(self.path, "rb") as fh:
                data = fh.read()
                st = os.fstat(fh.fileno())
            return data, st.st_mtime
        except FileNotFoundError:
            return None, None

    def _tmp(self, data: bytes) -> str:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.new-{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def create(self, data: bytes):
        tmp = self._tmp(data)
        try:
            os.link(tmp, self.path)  # atomic, fails if the name exists
        except FileExistsError:
            raise _Exists from None
        finally:
            os.unlink(tmp)
        return None

    def replace(self, data: bytes, expect):
        """Swap the lock seen as ``expect`` (its bytes and mtime, as
        :meth:`read` returned them) for ``data``, or raise _Changed."""
        aside = f"{self.path}.old-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)  # only one of several contenders wins
        except FileNotFoundError:
            raise _Changed from None
        try:
            with open(aside, "rb") as fh:
                seen = (fh.read(), os.fstat(fh.fileno()).st_mtime)
            if seen != tuple(expect):  # renewed or replaced since we looked: put it back
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                raise _Changed
            try:
                self.create(data)
            except _Exists:
                raise _Changed from None
        finally:
            try:
                os.unlink(aside)
            except FileNotFoundError:
                pass
        return None

    def leftovers(self) -> list[tuple[str, bytes, float]]:
        """(path, bytes, mtime) of every ``lock.json.new-*``/``.old-*``
        beside the lock: a process killed between its rename or link and
        its unlink leaves one."""
        out = []
        folder, base = os.path.split(self.path)
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as it:
            for e in it:
                if _ASIDE.fullmatch(e.name) and e.name.startswith(base):
                    with contextlib.suppress(FileNotFoundError), open(e.path, "rb") as fh:
                        out.append((e.path, fh.read(), os.fstat(fh.fileno()).st_mtime))
        return out

    def renew(self, data: bytes, token: str):
        """The owner's heartbeat: the file's mtime (no rewrite, so no
        moment without a lock file)."""
        cur, _ = self.read()
        if cur is None or _token(cur) != token:
            raise _Changed
        try:
            os.utime(self.path)
        except FileNotFoundError:
            raise _Changed from None
        return None

    def delete(self, token: str, version) -> bool:
        aside = f"{self.path}.old-{uuid.uuid4().hex}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        with open(aside, "rb") as fh:
            seen = fh.read()
        if _token(seen) != token:  # not ours (taken over): put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return True


class _S3:
    """Conditional requests: ``If-None-Match: *`` to create, ``If-Match``
    the ETag to renew, take over and delete."""

    def __init__(self, store: Store):
        self.store = store
        self.fs = store.fs
        self.bucket, self.key, _ = self.fs.split_path(store.path(LOCK_KEY))
        self.conditional = True

    def _call(self, method, **kw):
        from fsspec.asyn import sync

        async def go():
            resp = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kw)
            if method == "get_object":
                body = await resp["Body"].read()
                return body, resp.get("ETag")
            return resp
        return with_retries(lambda: sync(self.fs.loop, go), what=self.store.describe(LOCK_KEY))

    @staticmethod
    def _status(exc: BaseException) -> tuple[str, int | None]:
        from .store import _s3_response
        resp = _s3_response(exc) or {}
        code = str((resp.get("Error") or {}).get("Code") or "")
        status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        text = f"{type(exc).__name__} {exc}"
        if not code:
            for c in ("PreconditionFailed", "ConditionalRequestConflict", "NotImplemented"):
                if c in text:
                    code = c
        if status is None and ("412" in text or "Precondition" in text):
            status = 412
        return code, status

    def _conflict(self, exc) -> bool:
        code, status = self._status(exc)
        return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)

    def _unsupported(self, exc) -> bool:
        code, status = self._status(exc)
        return code == "NotImplemented" or status == 501

    def read(self):
        try:
            return self._call("get_object")
        except FileNotFoundError:
            return None, None
        except Exception as exc:  # noqa: BLE001
            code, status = self._status(exc)
            if code == "NoSuchKey" or status == 404:
                return None, None
            raise

    def create(self, data: bytes):
        if self.conditional:
            try:
                return self._call("put_object", Body=data, IfNoneMatch="*").get("ETag")
            except Exception as exc:  # noqa: BLE001
                if self._conflict(exc):
                    raise _Exists from None
                if not self._unsupported(exc):
                    raise
                self.conditional = False
                log.warning("%s: the S3 server does not support conditional writes "
                            "(If-None-Match); the build lock is not exclusive",
                            self.store.url)
        if self.read()[0] is not None:
            raise _Exists
        return self._call("put_object", Body=data).get("ETag")

    def replace(self, data: bytes, expect):
        if not self.conditional:
            cur, etag = self.read()
            if etag != expect:
                raise _Changed
            return self._call("put_object", Body=data).get("ETag")
        try:
            return self._call("put_object", Body=data, IfMatch=expect).get("ETag")
        except FileNotFoundError:
            raise _Changed from None
        except Exception as exc:  # noqa: BLE001
            if self._conflict(exc) or self._status(exc)[1] == 404:
                raise _Changed from None
            raise

    def renew(self, data: bytes, etag):
        return self.replace(data, etag)

    def delete(self, token: str, version) -> bool:
        if self.conditional and version is not None:
            try:
                self._call("delete_object", IfMatch=version)
                return True
            except FileNotFoundError:
                return False
            except Exception as exc:  # noqa: BLE001
                if self._conflict(exc) or self._status(exc)[1] == 404:
                    return False
                if not self._unsupported(exc):
                    raise
        cur, _ = self.read()
        if cur is None or _token(cur) != token:
            return False
        self._call("delete_object")
        return True


class _Generic:
    """Any other fsspec filesystem: check, then put (not exclusive)."""

    def __init__(self, store: Store):
        self.store = store

    def read(self):
        data = self.store.get(LOCK_KEY)
        return data, data

    def create(self, data: bytes):
        if self.store.get(LOCK_KEY) is not None:
            raise _Exists
        self.store.put(LOCK_KEY, data)
        return data

    def replace(self, data: bytes, expect):
        if self.store.get(LOCK_KEY) != expect:
            raise _Changed
        self.store.put(LOCK_KEY, data)
        return data

    def renew(self, data: bytes, version):
        return self.replace(data, version)

    def delete(self, token: str, version) -> bool:
        cur = self.store.get(LOCK_KEY)
        if cur is None or _token(cur) != token:
            return False
        self.store.remove_tree(LOCK_KEY)
        return True


def _backend(store: Store):
    """The exclusive create the store's kind offers."""
    if isinstance(store, LocalStore):
        return _Local(store)
    if isinstance(store, S3Store):
        return _S3(store)
    return _Generic(store)


def _token(raw: bytes | None) -> str | None:
    try:
        return json.loads(raw).get("token")
    except (ValueError, TypeError, AttributeError):
        return None


def _parse(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}


# ------------------------------------------------------------------ the lock
class BuildLock:
    """Take with :meth:`acquire`, check with :meth:`check`, give back with
    :meth:`release`; a daemon thread renews the heartbeat in between."""

    def __init__(self, store: Store, *, lease: float | None = None):
        self.store = store
        self.lease = float(lease if lease is not None else default_lease())
        self.token = uuid.uuid4().hex
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.backend = _backend(store)
        self.version = None  # ETag on S3
        self.lost: str | None = None
        self.took_over: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _doc(self) -> bytes:
        now = time.time()
        return json.dumps({"owner": self.owner, "host": socket.gethostname(),
                           "pid": os.getpid(), "token": self.token,
                           "started": getattr(self, "_started", now), "heartbeat": now,
                           "lease": self.lease}).encode()

    # -- judging someone else's lock
    def _assess(self, raw: bytes, version) -> tuple[bool, str, str]:
        """(abandoned, owner, why) for a lock document seen at ``version``."""
        doc = _parse(raw)
        owner = str(doc.get("owner") or "?")
        host = doc.get("host")
        pid = doc.get("pid")
        if host is None and ":" in owner:
            host, _, p = owner.rpartition(":")
            pid = int(p) if p.isdigit() else None
        if host == socket.gethostname() and isinstance(pid, int):
            if not _process_alive(pid):
                return True, owner, f"its process {pid} on this host has ended, so that build crashed"
        beats = [float(doc[k]) for k in ("heartbeat", "started")
                 if isinstance(doc.get(k), (int, float))]
        if isinstance(version, float):  # a local lock's mtime: the owner's heartbeat
            beats.append(version)
        lease = float(doc.get("lease") or self.lease)
        age = time.time() - max(beats) if beats else float("inf")
        if age > lease:
            return True, owner, (f"its last heartbeat is {age:.0f} s old, past its "
                                 f"{lease:.0f} s lease, so that build has stopped")
        return False, owner, (f"its last heartbeat is {max(0.0, age):.0f} s old, within its "
                              f"{lease:.0f} s lease, so it may still be running")

    def acquire(self, *, resume: bool) -> None:
        self._started = time.time()
        for _attempt in range(5):
            try:
                self.version = self.backend.create(self._doc())
                break
            except _Exists:
                pass
            raw, version = self.backend.read()
            if raw is None:
                continue  # released meanwhile: try again
            abandoned, owner, why = self._assess(raw, version)
            if not resume:
                hint = why if abandoned else "if that build crashed"
                raise BuildError(
                    f"{self.store.url}: another pyramid build holds the lock ({owner}); {hint}: "
                    f"run again with resume=True (--resume) to take it over")
            if not abandoned:
                raise BuildError(
                    f"{self.store.url}: another pyramid build holds the lock ({owner}) and "
                    f"{why}; resume takes a lock over only once its owner has ended or its "
                    f"lease has expired: try again later, or stop that build first")
            try:
                expect = (raw, version) if isinstance(self.backend, _Local) else version
                self.version = self.backend.replace(self._doc(), expect)
            except _Changed:
                continue  # renewed, released or taken by another resume: look again
            self.took_over = _parse(raw)
            log.info("%s: took over the lock of %s (%s)", self.store.url, owner, why)
            break
        else:
            raise BuildError(f"{self.store.url}: could not take the build lock (it kept "
                             f"changing hands); try again")
        self._sweep_leftovers()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"zvdask-lock-{self.token[:8]}")
        self._thread.start()

    def _sweep_leftovers(self) -> None:
        """Remove the lock temporaries of builds that have ended (judged as
        their lock would be); a live contender's are left alone."""
        if not isinstance(self.backend, _Local):
            return  # object stores write the lock whole
        for path, raw, mtime in self.backend.leftovers():
            if _token(raw) != self.token and self._assess(raw, mtime)[0]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)

    def _renew_loop(self) -> None:
        interval = max(0.2, self.lease / 4)
        while not self._stop.wait(interval):
            if not self.renew():
                return

    def renew(self) -> bool:
        """One heartbeat; False once the lock is found taken over."""
        try:
            with self._mutex:
                if self._stop.is_set() or self.lost:
                    return not self.lost
                version = self.token if isinstance(self.backend, _Local) else self.version
                self.version = self.backend.renew(self._doc(), version)
        except _Changed:
            raw, _ = self.backend.read()
            other = _parse(raw).get("owner", "nobody") if raw else "nobody"
            self.lost = f"the build lock was taken over (now held by {other})"
            log.error("%s: %s", self.store.url, self.lost)
            return False
        except Exception as exc:  # noqa: BLE001 - try again next beat
            log.warning("%s: renewing the build lock failed: %s", self.store.url, exc)
        return True

    def check(self) -> None:
        """Raise if this build no longer owns the lock."""
        if self.lost:
            raise BuildError(f"{self.store.url}: {self.lost}; this build stops here")

    def release(self) -> None:
        """Stop renewing; delete the lock if it is still ours; remove the
        scratch folder if that left it empty."""
        self._stop.set()
        with self._mutex:
            pass  # wait out a renewal in flight
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            self.backend.delete(self.token, self.version)
        remove_empty_scratch(self.store)


def remove_empty_scratch(store: Store) -> None:
    """Remove ``.zvdask`` if empty, without a recursive delete (a build
    starting right now may be creating its lock there)."""
    store.remove_empty_dir(SCRATCH_DIR)
