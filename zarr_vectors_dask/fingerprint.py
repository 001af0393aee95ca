"""A fingerprint of a pyramid's source level: what level 0 held when the
pyramid was built, so a later look can tell which of its stored objects
changed, were added or were removed -- whoever wrote them (zarr-vectors'
``EditSession``, atomic or not, zarr-vectors-tools, a hand-written zarr
write).

It is taken from ONE listing of ``0/`` (``os.scandir`` with one ``stat``
per entry on a local path; one recursive ``find(detail=True)`` on an
object store, whose LIST pages carry size and ETag), plus the root
``zarr.json``.  Per stored object it keeps the key, the size and a stamp:

- **object stores**: the ETag (S3, SeaweedFS; GCS' ``md5Hash``/``crc32c``
  when there is no ETag).  An ETag changes whenever an object is written
  with other bytes (the MD5 of a single-part upload, the digest of the
  parts' digests for a multipart one), so size + ETag is trusted as
  conclusive and nothing is read.
- **local files**: ``st_mtime_ns``.  Size + mtime is rsync's quick check:
  any write sets the file's mtime to the time of the write.  It is not
  conclusive when the mtime is recent at the moment of the listing: file
  systems stamp times from a coarse clock (a few ms on Linux, 2 s on FAT),
  so a file written again within the same tick keeps its mtime ("racy
  git").  Files whose mtime is within :data:`RACY_NS` of the listing time
  are therefore hashed (SHA-256) when recorded, and hashed again when
  compared while their size and mtime are unchanged.  Replacing a file by
  another of the same size *and* a forged older mtime (``cp -p``,
  ``rsync -t`` of other content) is not detected, as rsync does not.
- **metadata documents** (``zarr.json``; the root's, the level's, each
  array's): always hashed and compared by hash only, since they are few
  and small and editors rewrite them with the same bytes (a touched
  document that did not change does not make the pyramid stale).

What is fingerprinted: every object under ``0/`` except what a pyramid
build itself writes there -- link families of other levels
(``0/links/<±N>/``, N != 0) and the links group document -- and
temporaries of killed writers; plus the root ``zarr.json`` (taken after
the build's last commit: the root also holds what the build published,
so any later rewrite of it, by an editor or another builder, counts as a
change).

:func:`compare` is pure: it takes two :class:`Fingerprint` values and
returns a :class:`SourceDiff`, grouped by array (``vertices``,
``vertex_fragments``, ``links/0/…``, ``object_index/manifests``,
``object_attributes/<name>``, ``vertex_attributes/<name>``), with the
chunk keys that changed (the dirty set a region-restricted refresh starts
from).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Callable, Iterable, Mapping

from .storage.store import TEMPORARY

__all__ = ["RACY_NS", "Entry", "Fingerprint", "SourceDiff", "is_document", "is_source_key",
           "array_of", "chunk_of", "needs_hash", "keys_to_rehash", "compare", "list_source",
           "sha256_of", "hash_entries", "take", "settle", "root_entry"]

#: A local file whose mtime is this close to (or after) the listing time
#: is hashed: 2 s covers the coarsest common timestamp (FAT) and a clock
#: that differs a little from the file server's.
RACY_NS = 2_000_000_000

#: Info keys of an fsspec listing entry that are content digests, in the
#: order they are preferred.
_DIGEST_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "checksum")
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified")

_DOCUMENTS = ("zarr.json", ".zarray", ".zattrs", ".zgroup")
ROOT_DOC = "zarr.json"
SOURCE_LEVEL = "0"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One stored object: its size, a stamp (mtime in ns, or a digest the
    storage keeps), and our own SHA-256 when the stamp is not conclusive."""

    size: int
    stamp: object = None
    sha256: str | None = None

    def to_json(self) -> list:
        return [self.size, self.stamp, self.sha256]

    @classmethod
    def from_json(cls, v) -> "Entry":
        return cls(int(v[0]), v[1], v[2])


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """Entries by key (relative to the store root); ``kind`` says what the
    stamps are (``mtime`` or ``digest``); ``listed_at_ns`` is the local
    clock at the listing (decides which mtimes are racy)."""

    entries: Mapping[str, Entry]
    kind: str
    listed_at_ns: int | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "listed_at_ns": self.listed_at_ns,
                "entries": {k: e.to_json() for k, e in sorted(self.entries.items())}}

    @classmethod
    def from_json(cls, doc: dict) -> "Fingerprint":
        return cls({k: Entry.from_json(v) for k, v in doc["entries"].items()},
                   doc["kind"], doc.get("listed_at_ns"))

    def with_entries(self, extra: Mapping[str, Entry]) -> "Fingerprint":
        return dataclasses.replace(self, entries={**self.entries, **extra})


# ------------------------------------------------------------ pure rules
def is_document(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in _DOCUMENTS


def is_source_key(key: str) -> bool:
    """Whether ``key`` (relative to the root) is part of level 0's source
    (not something a pyramid build writes there, not a temporary)."""
    if not key.startswith(SOURCE_LEVEL + "/") or TEMPORARY.search(key):
        return False
    parts = key.split("/")
    if len(parts) >= 2 and parts[1] == "links":
        if len(parts) == 3 and parts[2] == "zarr.json":
            return False  # a build creates it when level 0 has no links
        if len(parts) >= 3 and parts[2] != "0":
            return False  # ±N families: the build's own output
    return True


def array_of(key: str) -> str:
    """The array a key belongs to, relative to its level (``vertices``,
    ``object_index/manifests``, ``links/0/0.+1.0``), or ``root metadata``
    / ``level metadata`` for group documents."""
    if key == ROOT_DOC:
        return "root metadata"
    parts = key.split("/")[1:]
    if "c" in parts:
        parts = parts[:parts.index("c")]
    elif parts and parts[-1] in _DOCUMENTS:
        parts = parts[:-1]
    return "/".join(parts) or "level metadata"


def chunk_of(key: str) -> tuple[int, ...] | None:
    """The chunk (or shard) coordinates of a cell key, None for documents."""
    parts = key.split("/")
    if "c" not in parts:
        return None
    try:
        return tuple(int(p) for p in parts[parts.index("c") + 1:])
    except ValueError:
        return None


def needs_hash(key: str, entry: Entry, kind: str, listed_at_ns: int | None) -> bool:
    """Whether a new entry must carry its SHA-256: every document; a local
    file whose mtime is racy against the listing time."""
    if is_document(key):
        return True
    if kind != "mtime" or listed_at_ns is None or not isinstance(entry.stamp, int):
        return kind == "none"
    return entry.stamp >= listed_at_ns - RACY_NS


def keys_to_rehash(old: Fingerprint, new: Fingerprint) -> list[str]:
    """Keys of ``new`` to hash before comparing: those ``old`` hashed
    whose size and stamp are unchanged (only a hash can tell)."""
    out = []
    for k, e in new.entries.items():
        o = old.entries.get(k)
        if (o is not None and o.sha256 is not None and e.sha256 is None
                and o.size == e.size and (o.stamp == e.stamp or is_document(k))):
            out.append(k)
    return sorted(out)


def _same(o: Entry, n: Entry, key: str) -> bool:
    if o.size != n.size:
        return False
    if is_document(key) or (o.sha256 is not None and n.sha256 is not None):
        return o.sha256 == n.sha256 and o.sha256 is not None
    return o.stamp == n.stamp


@dataclasses.dataclass(frozen=True)
class SourceDiff:
    """Which source objects changed, were added or were removed."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.changed or self.added or self.removed)

    def keys(self) -> list[str]:
        return sorted({*self.changed, *self.added, *self.removed})

    def by_array(self) -> dict[str, dict[str, int]]:
        """``{array: {"changed": n, "added": n, "removed": n, "documents": n}}``:
        cells (chunks, or shards) by what happened to them, and metadata
        documents of the array that differ."""
        out: dict[str, dict[str, int]] = {}
        for what, keys in (("changed", self.changed), ("added", self.added),
                           ("removed", self.removed)):
            for k in keys:
                row = out.setdefault(array_of(k), {"changed": 0, "added": 0, "removed": 0,
                                                   "documents": 0})
                row["documents" if is_document(k) else what] += 1
        return dict(sorted(out.items()))

    def dirty_chunks(self) -> dict[str, set[tuple[int, ...]]]:
        """Per array, the chunk (or shard) coordinates whose cells differ:
        where a region-restricted refresh starts.  Documents carry none."""
        out: dict[str, set[tuple[int, ...]]] = {}
        for k in self.keys():
            c = chunk_of(k)
            if c is not None:
                out.setdefault(array_of(k), set()).add(c)
        return out

    def describe(self) -> str:
        """``3 chunks of vertices, 1 of object_index/manifests (1 added),
        the metadata of object_index/object_ids`` -- every array with a
        difference."""
        parts, first = [], True
        for array, row in self.by_array().items():
            n = row["changed"] + row["added"] + row["removed"]
            if n:
                noun = ("chunk" if n == 1 else "chunks") + " of " if first else "of "
                text, first = f"{n} {noun}{array}", False
                how = [f"{row[w]} {w}" for w in ("added", "removed") if row[w]]
                if how:
                    text += f" ({', '.join(how)})"
                if row["documents"]:
                    text += " and its metadata"
            else:
                text = f"the {array}" if "metadata" in array else f"the metadata of {array}"
            parts.append(text)
        return ", ".join(parts) if parts else "nothing"


def compare(old: Fingerprint, new: Fingerprint) -> SourceDiff:
    """How ``new`` differs from ``old`` (``new`` rehashed where
    :func:`keys_to_rehash` asks)."""
    changed, added = [], []
    for k, n in new.entries.items():
        o = old.entries.get(k)
        if o is None:
            added.append(k)
        elif not _same(o, n, k):
            changed.append(k)
    removed = [k for k in old.entries if k not in new.entries]
    return SourceDiff(tuple(sorted(changed)), tuple(sorted(added)), tuple(sorted(removed)))


# ------------------------------------------------------------ listing
def _digest_stamp(info: Mapping) -> object:
    for k in _DIGEST_KEYS:
        if info.get(k):
            return str(info[k]).strip('"')
    return None


def _local_listing(top: str, prefix: str) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    todo = [(prefix, top)]
    while todo:
        rel, folder = todo.pop()
        try:
            it = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if rel != f"{SOURCE_LEVEL}/links/" or e.name == "0":
                        todo.append((f"{rel}{e.name}/", e.path))  # not the ±N families
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[rel + e.name] = Entry(st.st_size, st.st_mtime_ns)
    return out


def _local_entries(root: str, keys: Iterable[str]) -> dict[str, Entry]:
    """Size and mtime of each of ``keys`` that exists under ``root``."""
    out: dict[str, Entry] = {}
    for k in keys:
        try:
            st = os.stat(os.path.join(root, k), follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            continue
        out[k] = Entry(st.st_size, st.st_mtime_ns)
    return out


def _remote_listing(store, key: str) -> tuple[dict[str, Entry], str]:
    out, kinds = {}, set()
    for rel, info in store.listing(key).items():
        stamp = _digest_stamp(info)
        kinds.add("digest" if stamp is not None else "none")
        out[f"{key}/{rel}"] = Entry(int(info.get("size") or 0), stamp)
    return out, ("digest" if kinds <= {"digest"} else "none")


def list_source(store) -> Fingerprint:
    """Level 0's source objects, from one listing (no hashes yet)."""
    if store.lists_mtimes:
        listed_at = time.time_ns()
        raw = _local_listing(os.path.join(store.root, SOURCE_LEVEL), SOURCE_LEVEL + "/")
        entries = {k: e for k, e in raw.items() if is_source_key(k)}
        return Fingerprint(entries, "mtime", listed_at)
    raw, kind = _remote_listing(store, SOURCE_LEVEL)
    return Fingerprint({k: e for k, e in raw.items() if is_source_key(k)}, kind, None)


def sha256_of(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def hash_entries(store, fp: Fingerprint, keys: Iterable[str]) -> Fingerprint:
    """``fp`` with the SHA-256 of ``keys`` filled in (read in one batch); a
    key gone since the listing is dropped (it was removed)."""
    keys = list(keys)
    if not keys:
        return fp
    got = store.get_many(keys)
    entries = dict(fp.entries)
    for k in keys:
        if got.get(k) is None:
            entries.pop(k, None)
        else:
            entries[k] = dataclasses.replace(entries[k], sha256=sha256_of(got[k]))
    return dataclasses.replace(fp, entries=entries)


def take(store, *, like: Fingerprint | None = None,
         hasher: Callable | None = None) -> Fingerprint:
    """Fingerprint of level 0 now: one listing, then the hashes its rules
    ask for -- documents, racy mtimes, and (``like``: an older
    fingerprint to compare with) what that one hashed."""
    fp = list_source(store)
    want = [k for k, e in fp.entries.items() if needs_hash(k, e, fp.kind, fp.listed_at_ns)]
    if like is not None:
        want = sorted(set(want) | set(keys_to_rehash(like, fp)))
    return (hasher or hash_entries)(store, fp, want)


def settle(store, fp: Fingerprint) -> Fingerprint:
    """``fp`` (a recorded fingerprint) without the hashes its racy mtimes
    needed, where they are no longer racy: each such file is hashed once
    more now, and if its bytes are still the recorded ones any later write
    stamps a later mtime, so size + mtime decide from here (git's racy
    index entries, re-checked once).  Keeps status checks at one listing."""
    if fp.kind != "mtime":
        return fp
    now = time.time_ns()
    racy = [k for k, e in fp.entries.items() if e.sha256 is not None and not is_document(k)
            and isinstance(e.stamp, int) and e.stamp < now - RACY_NS]
    if not racy:
        return fp
    current = _local_entries(store.root, racy)  # a stat each, not a listing of level 0
    still = [k for k in racy if current.get(k) is not None
             and (current[k].size, current[k].stamp) == (fp.entries[k].size, fp.entries[k].stamp)]
    got = store.get_many(still)
    entries = dict(fp.entries)
    for k in still:
        if sha256_of(got.get(k)) == fp.entries[k].sha256:
            entries[k] = dataclasses.replace(entries[k], sha256=None)
    return dataclasses.replace(fp, entries=entries)


def root_entry(store) -> dict[str, Entry]:
    """The root document, hashed (taken after a build's last commit)."""
    raw = store.get(ROOT_DOC)
    return {} if raw is None else {ROOT_DOC: Entry(len(raw), None, sha256_of(raw))}
