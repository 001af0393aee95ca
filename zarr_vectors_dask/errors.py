"""Error types a build reports, and the helpers that keep those reports
readable: cleanup that never masks the error being raised, and a filter
that keeps Dask workers from logging our expected failures as crashes.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from zarr_vectors.exceptions import ArrayError, CoarseningError, MetadataError, StoreError

__all__ = ["BuildError", "PlanError", "PlanMetadataError", "LevelNotFoundError",
           "StoreNotFoundError", "ReadOnlyStoreError", "UnsupportedStoreError", "FormatError",
           "CorruptChunkError", "NotAZarrVectorsStoreError", "EXPECTED_ERRORS", "cleanup",
           "QuietExpectedErrors", "quiet_expected_task_errors"]


log = logging.getLogger("zarr_vectors_dask")


class BuildError(RuntimeError, CoarseningError):
    """The store's state forbids the requested build (existing levels,
    a concurrent build, parameters that differ from a committed level)."""


class PlanError(ValueError, CoarseningError):
    """A request that cannot be built; the message names the culprit.
    A ``ValueError`` (what zarr-vectors raises for malformed arguments)
    and a ``CoarseningError`` (what it raises for impossible coarsening)."""


class PlanMetadataError(PlanError, MetadataError):
    """A request whose target level's metadata would be invalid (a bin that
    does not tile the chunk shape, a sparsity factor below 1, a target
    level not above its source): zarr-vectors rejects these as
    ``MetadataError`` when it validates the level metadata."""


class LevelNotFoundError(PlanError, StoreError):
    """The source level asked for does not exist in the store."""


class StoreNotFoundError(FileNotFoundError, StoreError):
    """No store at the path or URL given."""


class ReadOnlyStoreError(BuildError, StoreError):
    """The store handle was opened read-only."""


class UnsupportedStoreError(PlanError, StoreError):
    """A store handle this package cannot hand to its workers."""


class FormatError(ValueError):
    """The store does not look like what zarr-vectors writes."""


class CorruptChunkError(FormatError, ArrayError):
    """A chunk cell could not be decoded; names the array and chunk."""


# ------------------------------------------------------------ store facts
class NotAZarrVectorsStoreError(FormatError, StoreError):
    """The path holds no zarr-vectors store (zarr-vectors: ``StoreError``)."""


#: Exception class names a task raises on purpose, with a message that
#: says everything (damaged data, an unreachable store): the driver
#: re-raises them, so a worker's "Compute Failed" traceback block adds
#: nothing.
EXPECTED_ERRORS = ("CorruptChunkError", "FormatError", "StoreAccessError", "BuildError",
                   "PlanError", "MetadataError")


def cleanup(fn: Callable[[], object], *, what: str) -> None:
    """Run a cleanup step inside ``finally``/``except``.

    When an exception is already on its way out, a failing cleanup is
    logged and noted on that exception instead of replacing it; otherwise
    the cleanup's own error propagates."""
    pending = sys.exc_info()[1]
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - see below
        if pending is None:
            raise
        log.warning("%s failed while handling %s: %s: %s", what, type(pending).__name__,
                    type(exc).__name__, exc)
        if hasattr(pending, "add_note"):
            pending.add_note(f"({what} also failed: {type(exc).__name__}: {exc})")


class _QuietExpected(logging.Filter):
    """Drops a worker's "Compute Failed" record when the task raised one of
    :data:`EXPECTED_ERRORS`; every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if not msg.startswith("Compute Failed"):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        text = str(args[3]) if len(args) > 3 else ""
        return not any(text.startswith(name + "(") for name in EXPECTED_ERRORS)


def _install_quiet_filter(logger_name: str = "distributed.worker") -> bool:
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _QuietExpected) for f in logger.filters):
        logger.addFilter(_QuietExpected())
    return True


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPlugin = object


class QuietExpectedErrors(_WorkerPlugin):
    """Worker plugin installing :class:`_QuietExpected` (see
    :func:`quiet_expected_task_errors`)."""

    name = "zvdask-quiet-expected-errors"

    def setup(self, worker):
        _install_quiet_filter()


def quiet_expected_task_errors(client) -> None:
    """Install :class:`_QuietExpected` on every worker of ``client``'s
    cluster, now and for workers that join later (a named worker plugin, so
    calling this again replaces rather than stacks it).  Best effort: a
    cluster that refuses plugins still builds, only more verbosely."""
    try:
        client.register_plugin(QuietExpectedErrors(), name=QuietExpectedErrors.name)
    except Exception as exc:  # noqa: BLE001
        log.debug("could not install the worker log filter: %s", exc)
