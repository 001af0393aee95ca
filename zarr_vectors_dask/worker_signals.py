"""A distributed preload for the workers ``zvdask`` starts: they ignore
SIGINT.  A terminal's Ctrl-C goes to the whole process group; the command
itself stops the build (graph cancelled, lock released, cluster closed),
while each worker that got it would print a page of traceback."""

from __future__ import annotations

import signal
import threading

__all__ = ["dask_setup"]


def dask_setup(worker) -> None:  # distributed's preload hook
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
