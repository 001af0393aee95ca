"""Execute the notebooks under notebooks/ with a real Jupyter kernel.

Each runs in its own temporary working directory.  02 talks to the session
SeaweedFS server and a real scheduler + worker processes through the
environment variables it documents.  The assertions are on what the
notebooks produced: the stores they wrote, the tables and figures they
showed, and (for 02) the tasks the external scheduler ran.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import sys
from pathlib import Path

import pytest
from conftest import import_or_missing

nbformat = import_or_missing("nbformat")
nbclient = import_or_missing("nbclient")
import_or_missing("ipykernel")
import_or_missing("matplotlib")

from servers import REPO_ROOT  # noqa: E402

NOTEBOOKS = REPO_ROOT / "notebooks"
CELL_TIMEOUT = 300


def _kernel_manager():
    """A manager for the ``python3`` kernel running *this* interpreter.

    jupyter_client turns a spec's ``python`` into ``sys.executable``; a
    ``python3`` spec installed elsewhere (another venv, the system) is
    pointed back at this interpreter so the kernel sees the same packages.
    """
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    exe = km.format_kernel_cmd()[0]
    if os.path.realpath(exe) != os.path.realpath(sys.executable):
        km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert os.path.realpath(km.format_kernel_cmd()[0]) == os.path.realpath(sys.executable)
    return km


def run_notebook(name: str, cwd: Path, monkeypatch, env: dict[str, str] | None = None):
    """Execute ``notebooks/<name>`` in ``cwd``; returns the executed notebook."""
    pp = [str(REPO_ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                             if p and p != str(REPO_ROOT)]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(pp))  # workers import the package too
    # Headless: the inline backend renders figures to PNG in the kernel
    # (plain Agg would show nothing at all in a notebook).
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, km=_kernel_manager(), timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def texts(nb) -> list[str]:
    """Text output of each code cell (stdout + text/plain results)."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream" and o.name == "stdout":
                parts.append(o.text)
            elif o.output_type in ("execute_result", "display_data") and "text/plain" in o.data:
                parts.append(o.data["text/plain"])
        out.append("".join(parts))
    return out


def all_output_text(nb) -> str:
    chunks = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                chunks.append(o.text)
            for v in (o.get("data") or {}).values():
                if isinstance(v, str):
                    chunks.append(v)
    return "\n".join(chunks)


def png_sizes(nb) -> list[tuple[int, int]]:
    """(width, height) of every PNG the notebook displayed."""
    sizes = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = (o.get("data") or {}).get("image/png")
            if data:
                raw = base64.b64decode(data)
                assert raw[:8] == b"\x89PNG\r\n\x1a\n"
                sizes.append(struct.unpack(">II", raw[16:24]))
    return sizes


def test_notebooks_are_stripped_and_valid():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == ["01-quickstart.ipynb", "02-s3-and-cluster.ipynb", "03-cross-level-links.ipynb"]
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        nbformat.validate(nb)
        assert nb.cells[0].cell_type == "markdown"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, name


def test_quickstart(tmp_path, monkeypatch):
    import zarr_vectors as zv

    nb = run_notebook("01-quickstart.ipynb", tmp_path, monkeypatch)
    out = texts(nb)
    joined = "\n".join(out)
    assert f"PyramidPlan for {tmp_path / 'quickstart.zv'}" in joined
    assert re.search(r"^dashboard: http://127\.0\.0\.1:\d+/status$", joined, flags=re.M)

    # the store it wrote, read independently
    ds = zv.open(str(tmp_path / "quickstart.zv"))
    assert ds.levels == (0, 1, 2, 3)
    assert ds.level(0).vertex_count == 4000
    # the printed per-level table is the store's
    rows = re.findall(r"^\s*(\d)\s+([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$", joined, flags=re.M)
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]
    for lv, bin_, verts, objs, chunks in rows:
        level = ds.level(int(lv))
        assert float(bin_) == 5.0 * 2 ** int(lv)
        assert int(verts) == level.vertex_count
        assert int(objs) == level.objects.count
        assert int(chunks) == len(level.cells())
    counts = [int(r[2]) for r in rows]
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0] / 4
    assert [int(r[3]) for r in rows] == [40, 40, 20, 20]

    # 4 levels side by side over 2 rows: wider than tall; then the
    # coarsest level of a random and a length-ranked pyramid side by side
    size, sparsity = png_sizes(nb)
    assert size[0] > 1.5 * size[1] > 300
    assert sparsity[0] > 1.5 * sparsity[1] > 200
    kept = dict(re.findall(r"^(random|length): keeps 25 of 200 objects, (\d+)% of the total "
                           r"length$", joined, flags=re.M))
    assert set(kept) == {"random", "length"}
    assert int(kept["length"]) > int(kept["random"])
    for strategy in ("random", "length"):
        assert zv.open(str(tmp_path / f"tracts-{strategy}.zv")).levels == (0, 1, 2)


def _transitions(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=30) as c:
        return int(c.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter))


def test_s3_and_cluster(tmp_path, monkeypatch, s3_server, dask_cluster):
    import zarr_vectors as zv

    bucket = s3_server.new_bucket("nb")
    before = _transitions(dask_cluster.address)
    nb = run_notebook("02-s3-and-cluster.ipynb", tmp_path, monkeypatch, env={
        "ZVDASK_SCHEDULER": dask_cluster.address,
        "ZVDASK_S3_ENDPOINT": s3_server.endpoint_url,
        "ZVDASK_S3_KEY": s3_server.key,
        "ZVDASK_S3_SECRET": s3_server.secret,
        "ZVDASK_BUCKET": bucket,
        "ZVDASK_STORE": "cells.zv",
    })
    text = all_output_text(nb)
    assert s3_server.secret not in text, "the notebook printed the S3 secret"
    assert f"scheduler {dask_cluster.address} with 2 workers" in text
    assert text.count("100% Completed") == 3  # one bar per step: each level is one graph
    assert f"s3://{bucket}/cells.zv" in text

    # the work ran on the external cluster, the pyramid is in the bucket
    assert _transitions(dask_cluster.address) > before + 100
    fs = s3_server.fs()
    assert {"0", "1", "2", "3", "zarr.json"} <= {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/cells.zv")}
    ds = zv.open(f"s3://{bucket}/cells.zv", storage=zv.StorageOptions(options=s3_server.storage_options))
    assert ds.levels == (0, 1, 2, 3)
    for lv in ds.levels:
        level = ds.level(lv)
        assert (f"level {lv}: bin {5 * 2 ** lv:g}, {level.vertex_count} vertices, "
                f"{level.objects.count} objects") in text
    assert ds.level(0).vertex_count == 2400 and ds.level(3).objects.count == 12


def test_cross_level_links(tmp_path, monkeypatch):
    nb = run_notebook("03-cross-level-links.ipynb", tmp_path, monkeypatch)
    text = "\n".join(texts(nb))
    assert "levels [0, 1, 2, 3]" in text
    m = re.search(r"\+1 agrees, -3 names the same (\d+) level-0 vertices", text)
    assert m, text[-2000:]
    n_fine = int(m.group(1))
    walk = dict(re.findall(r"level (\d): (\d+) vertices under the chosen metavertex", text))
    assert walk["3"] == "1" and int(walk["0"]) == n_fine > int(walk["2"]) >= 2
    (size,) = png_sizes(nb)
    assert size[0] > size[1] > 200
