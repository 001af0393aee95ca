"""Refresh: bring a pyramid up to date with its level 0 (the record and
status are ``currency.py``).

:func:`refresh_pyramid` rebuilds what a changed source makes stale --
today every coarse level, exactly as ``build_pyramid(..., overwrite=True)``
with the recorded arguments -- and returns at once when nothing changed.
Its report carries the dirty level-0 chunks per array, which a
region-restricted refresh will start from.
"""

from __future__ import annotations

import dataclasses

from . import api
from .currency import (PyramidStatus, dirty_source_chunks, read_record, request_record,
                       status_of)
from .errors import BuildError
from .format.documents import opened_zarr_vectors
from .resume import record_differences

__all__ = ["pyramid_status", "RefreshReport", "build_keywords", "refresh_pyramid"]


def pyramid_status(store, storage_options=None) -> PyramidStatus:
    """Whether the pyramid in ``store`` (anything ``build_pyramid`` takes)
    is current with its level 0: one listing of level 0, a read of each
    metadata document, no cell read unless a local mtime is racy."""
    with opened_zarr_vectors(store, storage_options, writable=False) as st:
        return status_of(st)



# ------------------------------------------------------------ refresh
@dataclasses.dataclass(frozen=True)
class RefreshReport:
    """What :func:`refresh_pyramid` found and did (or, ``dry_run``, would do).

    ``levels``: per coarse level, ``(level, what, fraction of a full
    build)``; ``dirty_chunks``: the changed level-0 chunks per array (the
    region a restricted refresh will start from); ``summary``: the
    build's summary when it ran."""

    status: PyramidStatus
    refreshed: bool
    dry_run: bool
    arguments: dict
    levels: tuple = ()
    dirty_chunks: dict = dataclasses.field(default_factory=dict)
    summary: dict | None = None

    def __str__(self) -> str:
        lines = [self.status.line()]
        if not self.levels:
            lines.append("nothing to refresh: every coarse level is current")
        n = sum(len(v) for v in self.dirty_chunks.values())
        if n:
            lines.append(f"dirty level-0 chunks: {n} in {len(self.dirty_chunks)} array(s)")
        verb = "would rebuild" if self.dry_run else "rebuilt"
        for level, what, frac in self.levels:
            lines.append(f"  level {level}: {verb} {what} ({frac:.0%} of a full build)")
        return "\n".join(lines)


def build_keywords(arguments: dict) -> dict:
    """Recorded arguments as ``build_pyramid`` keywords."""
    kw = dict(arguments)
    kw["factors"] = [tuple(f) for f in kw["factors"]]
    if kw.get("chunk_scale_factors") is not None:
        kw["chunk_scale_factors"] = [tuple(c) if isinstance(c, list) else c
                                     for c in kw["chunk_scale_factors"]]
    if isinstance(kw.get("shard_shape"), list):
        kw["shard_shape"] = tuple(kw["shard_shape"])
    return kw


def _refresh_arguments(st, doc: dict | None, asked: dict) -> dict:
    """The arguments to refresh with: the recorded ones; a request that
    differs from them is refused naming the argument, as resume does."""
    asked = {k: v for k, v in asked.items() if v is not None}
    if doc is None or not isinstance(doc.get("arguments"), dict):
        if "factors" not in asked:
            raise BuildError(f"{st.url}: no build arguments are recorded (a pyramid built by "
                             f"zarr-vectors, or before zarr-vectors-dask recorded them): pass "
                             f"the build's arguments (factors=..., --factors ...) to refresh it")
        return asked
    recorded = doc["arguments"]
    if asked:
        diff = record_differences(doc.get("record") or {},
                                  request_record(st, **build_keywords({**recorded, **asked})))
        if diff:
            raise BuildError(f"{st.url}: the pyramid was built with other arguments: "
                             f"{'; '.join(diff)}; refresh rebuilds it with the recorded ones "
                             f"(omit them), or use build_pyramid(..., overwrite=True)")
    return recorded


def refresh_pyramid(store, client=None, storage_options=None, dry_run: bool = False, *,
                    progress=None, max_block_vertices: int = 2_000_000,
                    **build_arguments) -> RefreshReport:
    """Bring the pyramid in ``store`` up to date with its level 0, with the
    arguments its build recorded (``build_arguments`` may repeat them; one
    that differs is refused naming it).

    Unchanged level 0: returns at once, nothing is written.  Changed (or
    currency unknown): every coarse level is rebuilt exactly as
    ``build_pyramid(..., overwrite=True)`` with those arguments does --
    under the build lock, the root marked ``zvdask_refresh`` while it
    runs, crash-safe (a refresh killed at any moment, then run again, ends
    equal to a full rebuild) -- and the new fingerprint is recorded.
    ``dry_run``: report what would be rebuilt, write nothing."""
    with opened_zarr_vectors(store, storage_options, writable=not dry_run) as st:
        doc = read_record(st)
        args = _refresh_arguments(st, doc, build_arguments)
        status = status_of(st)
        levels = () if status.current else tuple(
            (i + 1, "the whole level", 1.0) for i in range(len(args["factors"])))
        report = RefreshReport(status, False, dry_run, args, levels,
                               dirty_source_chunks(status.diff))
        if status.current or dry_run:
            return report
        summary = api.build_pyramid(st, client=client, overwrite=True, progress=progress,
                                    max_block_vertices=max_block_vertices, _refresh=True,
                                    **build_keywords(args))
        return dataclasses.replace(report, refreshed=True, summary=summary)
