"""What zarr-vectors' own entry points do on a store that already has its
pyramid, once :func:`~zarr_vectors_dask.patch_zarr_vectors` routes them
here.

zarr-vectors' ``build_pyramid`` rebuilds whatever is there, so a notebook
cell run twice or a pipeline step re-run works.  The patched one keeps
that promise, and is faster and safe about it:

- same arguments, level 0 unchanged since the recorded build: returns at
  once (the summary of the finished pyramid), nothing rewritten;
- same arguments, level 0 changed: ``refresh_pyramid`` (the recorded
  arguments are the asked ones);
- an interrupted build with the same arguments: resumed;
- anything else (other arguments, a pyramid whose currency is unknown):
  rebuilt as a fresh build would (``overwrite=True``: crash-safe, the
  lock held).

Each case but the first logs one line (logger ``zarr_vectors_dask``,
WARNING) saying what was done.  The native ``zarr_vectors_dask.build_pyramid``
keeps its explicit choice and refuses, naming ``overwrite=True``,
``resume=True`` and ``refresh_pyramid``.

``rebuild_pyramid_from_level(root, 0)`` and ``EditSession``'s
``refresh_pyramid=True|"batch"`` reach :func:`refresh_pyramid` with the
recorded arguments -- after the session has flushed its edits (the
reference refreshes before, from the old data).  Without recorded
arguments (or from a level above 0) they fall back to the reference's
refresh, whose ``coarsen_level`` calls are ours.
"""

from __future__ import annotations

import logging

from . import api
from . import currency as cur
from . import refresh as rf
from .format.documents import opened_zarr_vectors
from .resume import BUILD_RECORD, existing_coarse, record_differences

__all__ = ["build_pyramid", "rebuild_pyramid_from_level", "patch_edit_session"]

log = logging.getLogger("zarr_vectors_dask")


def build_pyramid(store, **kw) -> dict:
    """``zarr_vectors.build_pyramid`` as zarr-vectors users expect it: a
    re-run does what the module docstring says."""
    if (kw.get("resume") or kw.get("overwrite") or kw.get("method", "per_object") != "per_object"
            or not _has_levels(store, kw)):
        return api.build_pyramid(store, **kw)  # a registered method: zarr-vectors' own rules
    action, why = _decide(store, kw)
    if action == "finished":
        return api.build_pyramid(store, resume=True, **kw)
    with opened_zarr_vectors(store, kw.get("storage_options"), writable=False) as st:
        url = st.url
    if action == "refresh":
        log.warning("zarr_vectors_dask: %s: %s; refreshing the pyramid", url, why)
        report = rf.refresh_pyramid(store, client=kw.get("client"),
                                    storage_options=kw.get("storage_options"),
                                    progress=kw.get("progress"))
        if report.summary:  # the reference's keys only
            return {k: v for k, v in report.summary.items()
                    if k not in ("objects_changed", "region", "region_levels")}
        return api.build_pyramid(store, resume=True, **kw)
    if action == "resume":
        log.warning("zarr_vectors_dask: %s: %s; resuming it", url, why)
        return api.build_pyramid(store, resume=True, **kw)
    log.warning("zarr_vectors_dask: %s: %s; rebuilding the pyramid (overwrite=True)", url, why)
    return api.build_pyramid(store, overwrite=True, **kw)


def _has_levels(store, kw) -> bool:
    with opened_zarr_vectors(store, kw.get("storage_options"), writable=False) as st:
        return bool(existing_coarse(st, 0))


def _decide(store, kw) -> tuple[str, str]:
    """(``finished`` | ``refresh`` | ``resume`` | ``overwrite``, why)."""
    with opened_zarr_vectors(store, kw.get("storage_options"), writable=False) as st:
        asked = cur.request_record(st, **{k: v for k, v in kw.items()
                                           if k not in ("client", "storage_options")})
        doc = cur.read_record(st)
        if st.get(BUILD_RECORD) is not None:
            try:
                import json
                stored = json.loads(st.get(BUILD_RECORD))
            except ValueError:
                stored = None
            if stored == asked:
                return "resume", "an interrupted build with these arguments"
            return "overwrite", "an interrupted build used other arguments"
        if doc is None or doc.get("state") != "finished":
            return "overwrite", "the pyramid's currency is unknown (no recorded build)"
        diff = record_differences(doc.get("record") or {}, asked)
        if diff:
            return "overwrite", f"the pyramid was built with other arguments ({'; '.join(diff)})"
        status = cur.status_of(st)
        if status.current:
            return "finished", status.reason
        return "refresh", status.reason


# ------------------------------------------------------------ refresh paths
def rebuild_pyramid_from_level(original):
    """``zarr_vectors.ops.refresh.rebuild_pyramid_from_level`` routed to
    :func:`refresh_pyramid` when level 0 is the source and the store has
    recorded build arguments; else ``original``."""
    def rebuild(root, source_level, *a, **kw):
        if source_level == 0 and not a and not kw:
            with opened_zarr_vectors(root, None, writable=False) as st:
                doc = cur.read_record(st)
            if doc is not None and isinstance(doc.get("arguments"), dict):
                report = rf.refresh_pyramid(root)
                # Current already: the finished levels' summaries, as a rebuild returns them.
                summary = report.summary or api.build_pyramid(
                    root, resume=True, **rf.build_keywords(report.arguments))
                return list(summary.get("level_specs") or [])
        return original(root, source_level, *a, **kw)
    rebuild.__wrapped__ = original
    return rebuild


def patch_edit_session(cls):
    """Make ``EditSession`` refresh after its flush: ``_refresh_now`` (the
    reference calls it per edit, or in ``flush`` before its commit) only
    notes the lowest level; the wrapped ``flush`` refreshes from there once
    the edits are on disk.  Returns an undo."""
    orig_refresh, orig_flush = cls._refresh_now, cls.flush

    def _refresh_now(self, source_level):
        prev = getattr(self, "_zvdask_refresh_from", None)
        self._zvdask_refresh_from = source_level if prev is None else min(prev, source_level)

    def flush(self):
        report = orig_flush(self)
        level = getattr(self, "_zvdask_refresh_from", None)
        if level is not None:
            self._zvdask_refresh_from = None
            from zarr_vectors.ops import refresh as zr
            zr.rebuild_pyramid_from_level(self.root, level)
        return report

    cls._refresh_now, cls.flush = _refresh_now, flush

    def undo():
        cls._refresh_now, cls.flush = orig_refresh, orig_flush
    return undo
