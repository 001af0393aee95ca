"""Manners of the ``zvdask`` command: cluster settings refused while
parsing, checks made before a cluster starts, signals that stop a build
cleanly, and progress written as plain lines where output is not a
terminal."""

from __future__ import annotations

import _thread
import argparse
import contextlib
import logging
import re
import signal
import sys
import threading
import time


__all__ = ["MIN_MEMORY_LIMIT", "WORKER_PRELOAD", "at_least_one", "at_least_zero", "memory_limit",
           "join_dash_values", "check_writable", "Interrupted", "signals_stop_the_build",
           "progress"]

#: A worker process alone needs about this much; less never runs a task.
MIN_MEMORY_LIMIT = 100 * 2**20


# ------------------------------------------------------------ cluster settings
def at_least_one(text: str) -> int:
    """argparse type: a whole number >= 1 (0 workers or threads wait forever)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def at_least_zero(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 0")
    return value


def memory_limit(text: str) -> str:
    """argparse type: a worker memory limit as distributed parses it (a size,
    a fraction of this machine's memory, ``auto``, or ``0`` for none)."""
    from distributed.worker_memory import parse_memory_limit
    try:
        value = parse_memory_limit(text, 1, 1, logger=logging.getLogger(__name__))
    except (ValueError, TypeError):
        value = -1
    if value is not None and value < MIN_MEMORY_LIMIT:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected a size of at least 100MiB (e.g. 2GiB), a fraction of this "
            f"machine's memory (e.g. 0.5), auto, or 0 for no limit")
    return text


_VALUE_MAY_START_WITH_MINUS = ("--factors", "--chunk-scale", "--memory-limit")


def join_dash_values(argv: list[str]) -> list[str]:
    """``--factors -2:1`` -> ``--factors=-2:1`` (and ``--chunk-scale``,
    ``--memory-limit``): argparse takes a value that
    starts with ``-`` and is not a plain number for an option, so the
    factor check would never see it.  The ``=`` form is argparse's own."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in _VALUE_MAY_START_WITH_MINUS:
            nxt = next(it, None)
            if nxt is not None and re.match(r"-\.?\d", nxt):
                out.append(f"{arg}={nxt}")
                continue
            out.append(arg)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(arg)
    return out


# ------------------------------------------------------------ before a cluster
def check_writable(store) -> None:
    """A local target that cannot be written: say which path and why
    before a cluster starts (the build writes its lock and levels there)."""
    from .storage.store import StoreAccessError
    refused = store.write_refusal(".zvdask")
    if refused is None:
        return  # writable, or an object store: the lock's conditional put is the first write
    path, why = refused
    raise StoreAccessError(f"{path} cannot be written ({why}): a build writes its lock and "
                           f"its levels into the store")


# ------------------------------------------------------------ signals
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; its name is the message."""


@contextlib.contextmanager
def signals_stop_the_build():
    """SIGTERM and SIGINT raise :class:`Interrupted` in the main thread, so
    the build's own cleanup runs (its graph cancelled, its lock released,
    its cluster closed).  A second signal ends the process at once.

    A signal that lands where Python cannot raise (a gc callback, a
    ``__del__``: the scheduler's own gc callbacks run in this process) would
    be printed as "Exception ignored" and lost; it is delivered again
    instead, and at the latest raised when the command's work returns."""
    lost: list = []
    active = [True]
    lock = threading.Lock()

    def handler(signum, frame):
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        raise Interrupted(signal.Signals(signum).name)

    def deliver_again(signum):
        time.sleep(0.02)  # out of the finaliser by then; if not, lost once more
        with lock:  # never after the handlers are restored
            if active[0]:
                _thread.interrupt_main(signum)

    def unraisable(info):
        if not isinstance(info.exc_value, Interrupted):
            return old_hook(info)
        lost.append(info.exc_value)
        for s in (signal.SIGTERM, signal.SIGINT):  # still the first signal
            signal.signal(s, handler)
        signum = getattr(signal, str(info.exc_value), signal.SIGINT)
        threading.Thread(target=deliver_again, args=(signum,), daemon=True).start()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    old_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
        if lost:  # never propagated: the work ended first
            raise lost[-1]
    finally:
        try:
            with lock:
                active[0] = False
        finally:
            sys.unraisablehook = old_hook
            for s, h in old.items():
                signal.signal(s, h)


#: distributed preload for the workers the command starts (SIGINT ignored).
WORKER_PRELOAD = ["zarr_vectors_dask.worker_signals"]


# ------------------------------------------------------------ progress
def progress(name, futures) -> None:
    """distributed's text bar on a terminal; elsewhere (a log, a pipe) one
    line when a stage starts and one when it ends, with no carriage returns."""
    from distributed import progress as bar, wait
    if sys.stdout.isatty():
        print(f"  {name}:", flush=True)
        bar(futures, notebook=False)
        print(flush=True)
        return
    print(f"  {name}: started", flush=True)
    t0 = time.perf_counter()
    wait(futures)
    print(f"  {name}: done in {time.perf_counter() - t0:.2f} s", flush=True)
