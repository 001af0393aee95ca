"""Running graphs on ``distributed``: the graph as data, handing it to the
scheduler once (``execute``), waiting until a graph's tasks have ended,
and the client a build runs on (``client_for``)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from .cluster import default_client
from .errors import BuildError, PlanError
from .storage import handles
from .storage.store import Store

__all__ = ["STAGE_OF", "Graph", "StepReport", "RUNNING", "wait_until_idle", "execute",
           "run_inline", "count_workers", "workers_in_this_process", "client_for", "MALLOC_CONFIG",
           "WorkerMalloc", "tuned_workers"]


#: Stage label of each task function, as the plan and benchmarks name them.
STAGE_OF = {
    "object_table": "object table", "object_refs": "object refs", "bin_partials": "bin partials",
    "reduce_metavertices": "shuffle", "write_metavertices": "write vertices",
    "resolve_parents": "resolve parents", "links_and_sequences": "links + sequences",
    "write_manifests": "manifests", "write_attributes": "attributes",
    "level_summary": "summary", "compose_block": "compose", "compose_summary": "summary",
    "pick": "routing", "join": "routing",
    "context_refs": "sparsity context", "fragment_summaries": "sparsity context",
    "object_context": "sparsity context", "fragment_points": "sparsity context",
    "object_points": "sparsity context", "write_shards": "shards",
    "run_inline": "whole graph in one task",
}


@dataclass
class Graph:
    dsk: dict
    output: tuple | None = None
    stages: dict[str, int] = field(default_factory=dict)  # task function -> tasks

    @property
    def tasks(self) -> int:
        return len(self.dsk)

    def add(self, token: str, fn, index, *args) -> tuple:
        """One task; keys are ``(function-token, index)`` so the dashboard
        and progress bars group them by stage."""
        key = (f"{fn.__name__}-{token}", index)
        self.dsk[key] = (fn, *args)
        self.stages[fn.__name__] = self.stages.get(fn.__name__, 0) + 1
        return key


@dataclass
class StepReport:
    target_level: int
    vertex_count: int = 0
    objects_kept: int = 0
    source_objects: int = 0
    chunks: int = 0
    seconds: float = 0.0
    tasks: int = 0
    round_trips: int = 0  # graphs handed to the scheduler (one per step)
    inline_graphs: int = 0  # of those, run in one task (``execute``'s ``inline``)
    stage_tasks: dict = field(default_factory=dict)  # task function -> tasks
    stage_seconds: dict = field(default_factory=dict)
    #: A region step's target chunks whose content or weights changed:
    #: where the next step's region starts.
    region_changes: tuple = ()
    #: ... and the ids of the objects whose manifest row it changed.
    region_rows: tuple = ()
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------- executor
#: Task states in which a worker thread may still be running a task (a
#: cancelled task keeps running until it returns: Dask cannot stop a thread).
RUNNING = ("executing", "long-running", "cancelled", "resumed")


def _live_tasks(token: str, states: tuple, dask_worker=None) -> int:
    return sum(1 for key, ts in dask_worker.state.tasks.items()
               if ts.state in states and token in str(key))


def wait_until_idle(client, *, token: str = "", states: tuple = RUNNING,
                    timeout: float = 300.0, what: str) -> None:
    """Wait until no worker runs a task whose key contains ``token`` (in
    one of ``states``); ``what`` names them in the timeout error."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            n = sum(client.run(_live_tasks, token, states).values())
        except Exception:  # noqa: BLE001 - no worker state to ask: nothing to wait for
            return
        if n == 0:
            return
        if time.monotonic() > deadline:
            raise BuildError(f"{n} task(s) of {what} are still running on the cluster after "
                             f"{timeout:.0f} s")
        time.sleep(0.1)


def execute(client, graph: Graph, token: str, report: StepReport, *, name: str,
            progress: Callable | None = None, inline: bool = False):
    """Hand ``graph`` to the scheduler once and return its output.  Only
    the output is held, so every intermediate is released as soon as its
    consumers have finished.  ``inline``: the whole graph runs in one task
    (:func:`run_inline`), for graphs too small to gain from their
    parallelism.  On any failure the graph's tasks are cancelled and
    waited for, so nothing writes after the error returns."""
    t0 = time.perf_counter()
    report.tasks += graph.tasks
    report.round_trips += 1
    report.inline_graphs += int(inline)
    for k, n in graph.stages.items():
        report.stage_tasks[k] = report.stage_tasks.get(k, 0) + n
    if inline:  # the key names the token, as the graph's own keys do
        fut = client.submit(run_inline, graph.dsk, graph.output, key=f"run_inline-{token}",
                            pure=False)
    else:
        fut = client.get(graph.dsk, graph.output, sync=False)
    try:
        if progress is not None:
            progress(name, [fut])
        return fut.result()  # the future's own client: it need not be the default
    except BaseException:
        fut.cancel()
        wait_until_idle(client, token=token, what="the failed step")
        raise
    finally:
        fut.release()
        report.stage_seconds[name] = report.stage_seconds.get(name, 0.0) + \
            time.perf_counter() - t0


def run_inline(dsk: dict, output):
    """A graph run inside this task (``execute``'s one task): by Dask's
    threaded scheduler on as many threads as this worker has, else (one
    thread, or not on a worker) synchronously.  Intermediates are released
    as their consumers finish, as on the cluster.

    The pool is this call's own and is shut down before it returns: Dask
    raises a task's error at once, and a sibling still writing must end
    before the caller cleans up after the failure."""
    threads = _worker_threads()
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor
        from dask.threaded import get
        with ThreadPoolExecutor(threads, thread_name_prefix="zvdask-inline") as pool:
            return get(dsk, output, pool=pool)
    from dask.local import get_sync
    return get_sync(dsk, output)


def _worker_threads() -> int:
    try:
        from distributed import get_worker
        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):  # not on a worker
        return 1


def count_workers(client) -> int:
    try:
        return max(1, len(client.scheduler_info()["workers"]))
    except Exception:  # noqa: BLE001
        return 2


# ------------------------------------------------------------ workers' heap
log = logging.getLogger(__name__)

#: Dask config key: whether a build tunes its workers' glibc heap (True).
MALLOC_CONFIG = "zarr-vectors-dask.tune-worker-malloc"

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_GLIBC_DEFAULT = 128 * 1024


def _mallopt(trim: int, mmap: int) -> bool:
    """Set glibc's trim and mmap thresholds in this process; False where
    there is no glibc (macOS, musl): nothing to tune there."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, trim)) and \
            bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap))
    except (OSError, AttributeError):
        return False


try:
    from distributed.diagnostics.plugin import WorkerPlugin as _WorkerPlugin
except ImportError:  # pragma: no cover - distributed is a dependency
    _WorkerPlugin = object


class WorkerMalloc(_WorkerPlugin):
    """Keep freed numpy temporaries in a worker's heap for the build.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``,
    which also fixes glibc's mmap threshold at 128 KiB: every array over
    that is mapped fresh and unmapped when freed, and its pages fault in
    again on the next use.  The stages allocate thousands of such arrays;
    at 10^7 vertices that was ~30 % of the cluster's CPU
    (benchmarks/README.md, "The workers' heap").  Set on setup; on
    teardown fixed at the environment's values (the nanny's), else glibc's
    start values -- glibc cannot return to dynamic thresholds, so a worker
    started without the nanny's variable is restored only approximately."""

    name = "zvdask-worker-malloc"  # a build registers it as "<name>-<its own suffix>"
    TRIM, MMAP = 64 << 20, 32 << 20  # glibc caps the mmap threshold at 32 MiB

    def setup(self, worker=None):
        _mallopt(self.TRIM, self.MMAP)

    def teardown(self, worker=None):
        # Another build on this cluster still running keeps the heap tuned.
        if worker is not None and any(isinstance(p, WorkerMalloc)
                                      for p in worker.plugins.values()):
            return
        # glibc cannot be put back to its dynamic thresholds: fixed at what
        # the environment asked for (the nanny's), else glibc's start values.
        _mallopt(_env_bytes("MALLOC_TRIM_THRESHOLD_"), _env_bytes("MALLOC_MMAP_THRESHOLD_"))


def _env_bytes(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name) or _GLIBC_DEFAULT))
    except ValueError:
        return _GLIBC_DEFAULT


@contextlib.contextmanager
def tuned_workers(client):
    """:class:`WorkerMalloc` on every worker of ``client`` while the block
    runs (workers joining meanwhile too), unless the Dask config
    ``zarr-vectors-dask.tune-worker-malloc`` is false.  Best effort: a
    cluster that refuses plugins builds as before, only slower."""
    import secrets

    import dask
    if not dask.config.get(MALLOC_CONFIG, True):
        yield
        return
    # A name of its own: builds running at once on one cluster do not
    # replace (and tear down) each other's plugin.
    name = f"{WorkerMalloc.name}-{secrets.token_hex(4)}"
    try:
        client.register_plugin(WorkerMalloc(), name=name)
    except Exception as exc:  # noqa: BLE001 - a tuning, never a reason to fail
        log.debug("could not tune the workers' heap: %s", exc)
        # the scheduler keeps a plugin some workers refused: not left behind
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(name)


# ------------------------------------------------------------ client
def workers_in_this_process(client) -> bool:
    pids = client.run(os.getpid)
    return bool(pids) and all(p == os.getpid() for p in pids.values())


@contextlib.contextmanager
def client_for(client, store: Store | None = None):
    """The client to build on: ``client``, else the default client, else a
    cluster of worker processes made for the duration of the build
    (``cluster.default_client``: they never import the caller's main).

    A zarr MemoryStore lives in this process, so its build needs workers
    in this process: the caller's client if its workers are, else (no
    client given) a threads-only cluster here, made for the build."""
    in_memory = store is not None and handles.is_memory_url(store.url)
    if client is not None:
        if in_memory and not workers_in_this_process(client):
            raise PlanError(
                "an in-memory store (zarr MemoryStore) cannot be read by worker processes: "
                "pass a client whose workers run in this process "
                "(LocalCluster(processes=False)), or no client, or write the store to a path "
                "or URL")
        yield client
        return
    from distributed import get_client
    try:
        default = get_client()
    except ValueError:  # no default client
        default = None
    # Decided before yielding: the caller's errors must not be caught here.
    if default is not None and (not in_memory or workers_in_this_process(default)):
        yield default
        return
    # Worker processes that never import the caller's __main__ (cluster.py).
    with default_client(in_this_process=in_memory) as c:
        yield c
