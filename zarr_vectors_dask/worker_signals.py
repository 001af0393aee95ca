"""A distributed preload for the workers ``zvdask`` starts: they ignore
SIGINT.  A terminal's Ctrl-C goes to the whole process group; the command
itself stops the build (graph cancelled, lock released, cluster closed),
while each worker that got it would print a page of traceback."""

from __future__ import annotations

import logging
import signal
import threading

__all__ = ["dask_setup"]


def _closing_soon(_signum, _frame) -> None:
    """Ctrl-C reached this worker too: the command is closing the cluster,
    and a heartbeat that meets the closed scheduler meanwhile would log
    an error with its traceback (seen under load).  Keep quiet."""
    logging.getLogger("distributed").setLevel(logging.CRITICAL)


def dask_setup(worker) -> None:  # distributed's preload hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _closing_soon)
