"""Issue 24 part 5: ``zvdask`` behaves like a well-kept tool.

Impossible cluster settings and requests the plan refuses are said before
any cluster starts; a target that cannot be written names its path and
why; what is not a store is not told about a zarr.json it lacks; every
option has help and its default; progress is plain lines off a terminal;
``--resume`` on a finished pyramid says nothing was left; SIGTERM and
Ctrl-C stop a real build in one line, with its lock released, and the
re-run is refused (asking for --resume) or resumes to the reference's
pyramid."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid

from equivalence import compare_raw_files
from servers import subprocess_env
from stores import make_streamlines
# The crash tests' 800-streamline store and its reference pyramid (fixtures).
from test_crash import KW, _files_digest, _level0_arrays, _wait_for, inputs, store  # noqa: F401
from zarr_vectors_dask.cli import build_parser
from zarr_vectors_dask.cli_support import Interrupted, signals_stop_the_build
from zarr_vectors_dask.storage.lock import LOCK_KEY

CLI_ARGS = ["--factors", "2:1,2:2,2:2", "--sparsity-seed", "0", "--cross-level-depth", "-1",
            "--cross-level-storage", "explicit"]


def zvdask(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zarr_vectors_dask", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(),
                          **kw)


def _one_error_line(r, *needles) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("usage", " "))]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "dashboard" not in r.stdout, "a cluster was started first"
    return lines[0]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("manners") / "small.zv"
    make_streamlines(str(path), seed=3, n_objects=30)
    return path


# ------------------------------------------------------------------ refused up front
@pytest.mark.parametrize("option, value, said", [
    ("--n-workers", "0", "at least 1"), ("--threads-per-worker", "-1", "at least 1"),
    ("--memory-limit", "lots", "expected a size"), ("--memory-limit", "-2GiB", "expected a size"),
])
def test_impossible_cluster_settings_are_refused(small, option, value, said):
    r = zvdask("pyramid", small, "--factors", "2:1", option, value, timeout=60)
    _one_error_line(r, f"argument {option}", said)
    assert not os.path.exists(small / ".zvdask")


def test_negative_factor_reaches_the_factor_check(small):
    _one_error_line(zvdask("pyramid", small, "--factors", "-2:1"), "coarsen_factor must be >= 1")
    _one_error_line(zvdask("pyramid", small, "--factors", "2:1", "--chunk-scale", "-1"),
                    "chunk_scale_factors[0]")


def test_what_is_not_a_store_is_said_plainly(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file.txt"
    folder.mkdir()
    file.write_text("not a store")
    said = _one_error_line(zvdask("pyramid", folder, "--factors", "2:1"), str(folder))
    assert "no zarr.json" in said and "zarr_vectors root metadata" not in said
    said = _one_error_line(zvdask("info", file), str(file))
    assert "a file" in said and "zarr.json" not in said


def _read_only_cli(store, *args):
    """Run zvdask on ``store`` made read-only: by permissions when not
    root, else by a read-only bind mount in a private mount namespace."""
    if os.geteuid() != 0:
        os.chmod(store, 0o555)
        try:
            return zvdask("pyramid", store, *args)
        finally:
            os.chmod(store, 0o755)
    if shutil.which("unshare") is None:
        pytest.skip("root without unshare: no way to make a read-only store")
    cmd = " ".join([f"mount --bind -o ro {store} {store} &&", "exec", sys.executable, "-m",
                    "zarr_vectors_dask", "pyramid", str(store), *args])
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                       timeout=120, env=subprocess_env())
    if "mount:" in r.stderr or "unshare:" in r.stderr:
        pytest.skip(f"cannot make a read-only mount here: {r.stderr.strip()}")
    return r


def test_read_only_target_names_the_path_before_a_cluster(small, tmp_path):
    store = tmp_path / "ro.zv"
    shutil.copytree(small, store)
    before = _files_digest(store)
    said = _one_error_line(_read_only_cli(store, "--factors", "2:1"), f"{store} cannot be written")
    assert "read-only file system" in said or "permission denied" in said
    assert _files_digest(store) == before


# ------------------------------------------------------------------ help
def test_every_option_has_help_and_its_default():
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        assert sub.formatter_class is argparse.ArgumentDefaultsHelpFormatter, name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"zvdask {name} {action.dest}: no help"
        text = " ".join(sub.format_help().split())
        shown = [a for a in sub._actions if a.option_strings and a.default is not argparse.SUPPRESS
                 and not isinstance(a, argparse._HelpAction)]
        assert text.count("(default:") >= len(shown), name
    py = " ".join(zvdask("pyramid", "--help", timeout=60).stdout.split())
    assert "(default: 1)" in py and "demo uses -1" in py
    va = " ".join(zvdask("validate", "--help", timeout=60).stdout.split())
    assert "conformance level" in va and "not a pyramid level" in va


# ------------------------------------------------------------------ a real build
@pytest.mark.integration
def test_plain_progress_then_resume_on_a_finished_pyramid(dask_cluster, small, tmp_path):
    """Progress into a pipe is whole lines; --resume on the finished
    pyramid says nothing was left and rewrites nothing."""
    ref, store = tmp_path / "ref.zv", tmp_path / "ours.zv"
    shutil.copytree(small, ref)
    shutil.copytree(small, store)
    reference_build_pyramid(str(ref), **KW)
    r = zvdask("pyramid", store, "--scheduler", dask_cluster.address, *CLI_ARGS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "\r" not in r.stdout and "level 1: started" in r.stdout, r.stdout
    assert "level 1: done in" in r.stdout and "built 3 level(s)" in r.stdout, r.stdout
    assert compare_raw_files(ref, store).identical
    mtimes = {p: os.stat(os.path.join(store, p)).st_mtime_ns for p in _files_digest(store)}
    again = zvdask("pyramid", store, "--scheduler", dask_cluster.address, *CLI_ARGS, "--resume",
                   "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "nothing left to build" in again.stdout, again.stdout
    assert "built 3 level(s) in" not in again.stdout, again.stdout
    assert {p: os.stat(os.path.join(store, p)).st_mtime_ns for p in _files_digest(store)} == mtimes


def _start(store, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zarr_vectors_dask", "pyramid", str(store),
                             *CLI_ARGS, "--no-progress", *args], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _mid_level_2(store):
    return lambda: (os.path.exists(os.path.join(store, "1", "zarr.json"))
                    and os.path.isdir(os.path.join(store, "2")))


@pytest.mark.integration
def test_sigterm_stops_the_build_in_one_line_and_resume_finishes(dask_cluster, inputs, store):
    level0 = _level0_arrays(store)
    p = _start(store, "--scheduler", dask_cluster.address)
    try:
        hit = _wait_for(_mid_level_2(store), alive=lambda: p.poll() is None, interval=0.001)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert hit, f"never saw level 2 in progress: {p.stderr}"
    assert p.returncode == 128 + signal.SIGTERM, out + err
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        "zvdask: interrupted (SIGTERM); its tasks were cancelled and its build lock released "
        "(--resume finishes it)"], err
    assert not os.path.exists(os.path.join(store, LOCK_KEY))
    # A plain re-run: refused, asking for --resume (not told of a crash).
    plain = zvdask("pyramid", store, "--scheduler", dask_cluster.address, *CLI_ARGS)
    assert plain.returncode == 2 and "--resume" in plain.stderr, plain.stdout + plain.stderr
    assert "crashed" not in plain.stderr, plain.stderr
    resumed = zvdask("pyramid", store, "--scheduler", dask_cluster.address, *CLI_ARGS,
                     "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert compare_raw_files(inputs[1], store).identical
    assert _level0_arrays(store) == level0


@pytest.mark.integration
def test_a_signal_that_lands_in_a_finaliser_is_raised_again_at_once(capsys):
    """Python cannot raise inside a ``__del__`` or a gc callback (CI once
    lost a Ctrl-C in distributed's gc callback: "Exception ignored", then
    the build ran to the end and exited 0).  The interrupt is delivered
    again as soon as it can propagate, and nothing is printed."""
    ran = []

    class SignalledWhileFinalised:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10_000):  # the handler runs in here
                pass

    with pytest.raises(Interrupted, match="SIGINT"):
        with signals_stop_the_build():
            SignalledWhileFinalised()  # finalised at once
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 5:
                ran.append(time.perf_counter() - t0)
    assert ran and ran[-1] < 1, ran[-1]  # raised at once, not when the work ended
    assert "Exception ignored" not in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_to_the_process_group_prints_one_line(store):
    """A terminal's Ctrl-C reaches the command and its LocalCluster's
    workers (one process group): one line, no worker tracebacks."""
    p = _start(store, start_new_session=True)
    try:
        hit = _wait_for(lambda: os.path.isdir(os.path.join(store, "1")),
                        alive=lambda: p.poll() is None, interval=0.005)
        time.sleep(0.5)  # well inside level 1's tasks
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    assert hit and p.returncode == 128 + signal.SIGINT, out + err
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) == 1, err
    assert not os.path.exists(os.path.join(store, LOCK_KEY))

