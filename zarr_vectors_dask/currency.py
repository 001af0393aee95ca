"""Currency of a pyramid: the record of its source, and its status.

Every build records, in the project's own sidecar ``.zvdask/source.json``,
the arguments it was built with and a fingerprint of level 0
(``fingerprint.py``).  The record goes through three states:

- ``building`` / ``refreshing``: written under the build lock before the
  first level is discarded or written, with the arguments and the
  fingerprint taken then (``pending``: the state of level 0 the build
  reads);
- ``finished``: written after the build's last commit, with the pending
  fingerprint and the root document as published.

A crash anywhere before the last write leaves a record that is not
``finished`` (or a build record, ``.zvdask/build.json``), read as
"currency unknown".  Every file outside ``.zvdask/`` stays the
reference's: while a refresh runs, the root also carries the attribute
``zvdask_refresh`` (so any reader of the root sees it), which the refresh
removes before it records the fingerprint -- the root ``zarr.json`` is
then byte-identical to a full build's again.

:func:`pyramid_status` compares the record with one listing of level 0.
:func:`refresh_pyramid` rewrites what a changed source makes stale, as
``build_pyramid(..., overwrite=True)`` with the recorded arguments writes
it, and returns at once when nothing changed (``refresh.py``).
:func:`dirty_source_chunks` gives the changed level-0 cells per array,
where a region-restricted refresh starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

from . import fingerprint as fpm
from .errors import BuildError
from .format import commit as cm
from .planning.levels import make_plan
from .resume import BUILD_RECORD, build_record_for, record_differences

__all__ = ["SOURCE_RECORD", "REFRESH_ATTR", "StaleSourceError", "PyramidStatus", "read_record",
           "begin", "finish", "finish_interrupted", "interrupted_refresh", "mark_refreshing", "status_of",
           "current_source", "refuse_if_stale", "dirty_source_chunks", "arguments_for",
           "request_record"]

SOURCE_RECORD = ".zvdask/source.json"
#: Root attribute present while a refresh runs (removed when it ends).
REFRESH_ATTR = "zvdask_refresh"
REFRESH_HINT = "zvdask refresh STORE (refresh_pyramid(store))"


class StaleSourceError(BuildError):
    """Level 0 changed since the pyramid was built: resuming would report a
    stale pyramid as finished (a zarr-vectors ``CoarseningError``, as the
    other resume refusals)."""


# ------------------------------------------------------------ the record
def read_record(store) -> dict | None:
    raw = store.get(SOURCE_RECORD)
    if raw is None:
        return None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _fingerprint(doc: dict | None, key: str) -> fpm.Fingerprint | None:
    if not doc or not isinstance(doc.get(key), dict):
        return None
    try:
        return fpm.Fingerprint.from_json(doc[key])
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def begin(store, *, arguments: dict, record: dict, resuming: bool,
          refreshing: bool = False, taken: fpm.Fingerprint | None = None) -> fpm.Fingerprint:
    """Under the lock, before the build changes anything it keeps: the
    record says a build (or refresh) is under way, with its arguments and
    the fingerprint of level 0 it reads (``taken``: the one a refresh
    worked out its region from, before the lock -- an edit landing since
    must stay unrecorded, as it is not refreshed).  A resumed build keeps
    the fingerprint of the build it finishes (its kept levels were built
    from that level 0)."""
    old = read_record(store) if resuming else None
    pending = None
    if old is not None and old.get("record") == record:
        pending = _fingerprint(old, "pending")
    if pending is None:
        pending = taken if taken is not None else fpm.take(store)
    state = "refreshing" if refreshing or (old or {}).get("state") == "refreshing" else "building"
    doc = {"state": state, "arguments": arguments, "record": record,
           "pending": pending.to_json()}
    store.put(SOURCE_RECORD, json.dumps(doc, separators=(",", ":")).encode())
    if state == "refreshing":
        mark_refreshing(store, True)
    return pending


def finish(store, pending: fpm.Fingerprint | None = None) -> None:
    """After the last commit: clear the refresh mark, then record the
    fingerprint (with the root as published) -- the record's last write."""
    doc = read_record(store)
    if doc is None:
        return
    pending = pending or _fingerprint(doc, "pending")
    if pending is None:
        return
    mark_refreshing(store, False)
    done = fpm.settle(store, pending).with_entries(fpm.root_entry(store))
    out = {"state": "finished", "arguments": doc.get("arguments"), "record": doc.get("record"),
           "fingerprint": done.to_json(),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.put(SOURCE_RECORD, json.dumps(out, separators=(",", ":")).encode())


def finish_interrupted(store, record: dict) -> None:
    """A finished pyramid whose build (or refresh) with ``record``'s
    arguments was killed after its last commit, before the record's last
    write: do that write now (levels are complete; nothing else changes)."""
    doc = read_record(store)
    if doc is not None and doc.get("state") != "finished" and doc.get("record") == record:
        finish(store)


def mark_refreshing(store, on: bool) -> None:
    """Add (or remove) the root's ``zvdask_refresh`` attribute."""
    attrs = cm.read_root_attrs(store)
    if on == (REFRESH_ATTR in attrs):
        return
    if on:
        attrs[REFRESH_ATTR] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "host": socket.gethostname(), "pid": os.getpid(),
                               "record": SOURCE_RECORD}
    else:
        attrs.pop(REFRESH_ATTR)
    cm.write_root_attrs(store, attrs)


# ------------------------------------------------------------ status
@dataclasses.dataclass(frozen=True)
class PyramidStatus:
    """Whether a pyramid is current with its level 0.

    ``state``: ``current``, ``stale`` or ``unknown``; ``reason`` says why in
    words; ``diff`` (stale only) lists the level-0 objects that changed;
    ``refreshing``: a refresh started and has not ended; ``arguments``: the
    recorded build arguments (None when there are none); ``source``: the
    fingerprint of level 0 the diff was taken against (None when none
    was taken)."""

    state: str
    reason: str
    diff: fpm.SourceDiff | None = None
    refreshing: bool = False
    arguments: dict | None = None
    seconds: float = 0.0
    source: fpm.Fingerprint | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def current(self) -> bool:
        return self.state == "current"

    def line(self, store_url: str = "STORE") -> str:
        text = f"currency: {self.state} ({self.reason})"
        if self.state != "current":
            text += f"; refresh with: zvdask refresh {store_url}"
        return text


def _build_in_flight(store) -> bool:
    return store.get(BUILD_RECORD) is not None


def status_of(store) -> PyramidStatus:
    """:func:`pyramid_status` on an opened ``Store``."""
    t0 = time.perf_counter()
    doc = read_record(store)
    refreshing = REFRESH_ATTR in cm.read_root_attrs(store)
    args = (doc or {}).get("arguments")

    def out(state, reason, diff=None, source=None):
        return PyramidStatus(state, reason, diff, refreshing, args, time.perf_counter() - t0,
                             source)
    if doc is None:
        return out("unknown", "no fingerprint of level 0 is recorded: the pyramid was built "
                              "by zarr-vectors, or before zarr-vectors-dask recorded one")
    if doc.get("state") != "finished" or _build_in_flight(store):
        what = "a refresh" if doc.get("state") == "refreshing" or refreshing else "a build"
        return out("unknown", f"{what} of this pyramid started and has not finished")
    old = _fingerprint(doc, "fingerprint")
    if old is None:
        return out("unknown", f"the fingerprint in {SOURCE_RECORD} cannot be read")
    new = current_source(store, old)
    diff = fpm.compare(old, new)
    if diff.empty:
        return out("current", "level 0 is unchanged since the pyramid was built", source=new)
    return out("stale", f"level 0 changed since the pyramid was built: {diff.describe()}", diff,
               new)


def current_source(store, old: fpm.Fingerprint) -> fpm.Fingerprint:
    """Level 0 (and the root document) now, hashed where a comparison with
    ``old`` needs it."""
    return fpm.take(store, like=old).with_entries(fpm.root_entry(store))


def refuse_if_stale(store, record: dict) -> None:
    """``resume`` on a finished pyramid built with ``record``'s arguments:
    refuse when level 0 changed since (resuming would report it finished)."""
    doc = read_record(store)
    if doc is None or doc.get("state") != "finished" or doc.get("record") != record:
        return
    st = status_of(store)
    if st.state == "stale":
        raise StaleSourceError(f"{store.url}: {st.reason}; nothing to resume, the pyramid is "
                               f"stale: refresh it with `zvdask refresh {store.url}` "
                               f"(refresh_pyramid(store)) or rebuild it with overwrite=True")


def interrupted_refresh(store, record: dict) -> bool:
    """Whether a refresh with ``record``'s arguments started and did not
    end (``resume`` then redoes it); one with other arguments is refused,
    naming them."""
    doc = read_record(store)
    if doc is None or doc.get("state") != "refreshing":
        return False
    diff = record_differences(doc.get("record") or {}, record)
    if diff:
        raise BuildError(f"{store.url}: the interrupted refresh used other arguments: "
                         f"{'; '.join(diff)}; use overwrite=True (--overwrite) to rebuild")
    return True


def dirty_source_chunks(diff: fpm.SourceDiff | None) -> dict[str, set[tuple[int, ...]]]:
    """The changed level-0 chunks per array (empty when nothing changed)."""
    return {} if diff is None else diff.dirty_chunks()




def arguments_for(plan, request, shard_shape) -> dict:
    """The keywords of ``build_pyramid`` that rebuild this pyramid
    (recorded for ``refresh_pyramid``), normalised as the plan has them."""
    return json.loads(json.dumps({
        "factors": [[lv.coarsen_factor, lv.sparsity_factor] for lv in plan.levels],
        "chunk_scale_factors": [list(lv.chunk_scale) for lv in plan.levels],
        "sparsity_strategy": request.sparsity_strategy,
        "sparsity_seed": request.sparsity_seed,
        "cross_level_depth": request.cross_level_depth,
        "cross_level_storage": request.cross_level_storage,
        "vertex_attributes": request.vertex_attributes,
        "attribute_aggregation": request.attribute_aggregation,
        "shard_shape": None if shard_shape is None else list(shard_shape)}))


def request_record(st, *, factors, chunk_scale_factors=None, sparsity_strategy="random",
                   sparsity_seed=None, cross_level_depth=1, cross_level_storage="explicit",
                   vertex_attributes=None, attribute_aggregation=None, shard_shape=None,
                   **_other) -> dict:
    """The build record (what ``resume.prepare_targets`` compares) of a request."""
    plan = make_plan(st, factors=factors, chunk_scale_factors=chunk_scale_factors,
                     cross_level_depth=cross_level_depth, cross_level_storage=cross_level_storage,
                     sparsity_strategy=sparsity_strategy, n_workers=1, shard_shape=shard_shape)
    rec = build_record_for(plan, sparsity_strategy=sparsity_strategy, sparsity_seed=sparsity_seed,
                           cross_level_depth=cross_level_depth,
                           cross_level_storage=cross_level_storage)
    if vertex_attributes is not None:
        rec.update(vertex_attributes=vertex_attributes,
                   attribute_aggregation=dict(sorted((attribute_aggregation or {}).items())))
    if plan.levels[0].shard_shape is not None:
        rec["shard_shape"] = list(plan.levels[0].shard_shape)
    return json.loads(json.dumps(rec))
