"""The cluster a build makes when it is given no client.

A ``LocalCluster(processes=True)`` starts its workers with multiprocessing's
``spawn``, which re-imports the caller's main script in every worker: a
script without an ``if __name__ == "__main__":`` guard runs again there
(and its build fails with "Nanny failed to start").  distributed's
``SubprocessCluster`` starts the scheduler and every worker as a separate
``python -m dask spec`` process instead, so no worker ever imports the
caller's main module: guarded or not, a script, ``python -c``, a notebook
or a shell all get the same cluster.  Where it cannot start (it does not
run on Windows), the build falls back to worker threads in this process,
said in one warning line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

__all__ = ["DEFAULT_WORKERS", "DEFAULT_THREADS", "default_client"]

log = logging.getLogger(__name__)

#: The default cluster: two worker processes of one thread each.
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 1


def _subprocess_cluster(scratch: str):
    from distributed.deploy.subprocess import SubprocessCluster
    # The scheduler publishes its address in this file; ours, so it goes
    # away with the cluster.
    return SubprocessCluster(
        n_workers=DEFAULT_WORKERS, threads_per_worker=DEFAULT_THREADS, dashboard_address=":0",
        silence_logs=logging.ERROR,
        scheduler_kwargs={"scheduler_file": os.path.join(scratch, "scheduler.json")})


def _threads_cluster():
    from distributed import LocalCluster
    return LocalCluster(n_workers=1, threads_per_worker=DEFAULT_WORKERS, processes=False,
                        dashboard_address=":0", silence_logs=logging.ERROR)


@contextlib.contextmanager
def default_client(*, in_this_process: bool = False):
    """A client on a cluster made for one build, closed after it: worker
    processes that never import ``__main__`` (``SubprocessCluster``), or
    worker threads here when ``in_this_process`` (an in-memory store) or
    when worker processes cannot be started (one warning line)."""
    from distributed import Client
    scratch = tempfile.mkdtemp(prefix="zvdask-cluster-")
    try:
        cluster = None
        if not in_this_process:
            try:
                cluster = _subprocess_cluster(scratch)
            except Exception as exc:  # noqa: BLE001 - any failure: fall back, said once
                # A log record, not a warning: one line, even unconfigured.
                log.warning("zarr-vectors-dask: could not start worker processes (%s: %s); "
                            "building on threads in this process instead",
                            type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        if cluster is None:
            cluster = _threads_cluster()
        with cluster, Client(cluster, set_as_default=False) as client:
            client.wait_for_workers(len(cluster.workers))
            yield client
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
