"""Write the example notebooks (outputs stripped) from the cells below.

    python notebooks/generate.py

Edit the cells here, regenerate, and commit both this file and the
``.ipynb`` files; ``tests/test_notebooks.py`` executes the notebooks.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip("\n"))


def code(text: str):
    return new_code_cell(text.strip("\n"))


QUICKSTART = [
    md("""
# zarr-vectors-dask quickstart

Build a multi-resolution pyramid of a small zarr-vectors store on a local Dask
cluster, then look at every level side by side.  Runs in about ten seconds.
"""),
    code("""
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import zarr_vectors as zv
from distributed import Client, LocalCluster
from zarr_vectors.types.polylines import write_polylines

import zarr_vectors_dask as zd
"""),
    md("""
## 1. A level-0 store, written by zarr-vectors

40 random-walk streamlines of 100 vertices each, written with zarr-vectors' own
`write_polylines`: chunks of 125³ and a base bin of 5³ (the bin is the cell
that coarsening merges vertices in).
"""),
    code("""
store = Path("quickstart.zv")
if store.exists():
    shutil.rmtree(store)

rng = np.random.default_rng(0)
lines = [(rng.uniform(200, 800, 3) + np.cumsum(rng.normal(0, 5, (100, 3)), axis=0)).astype(np.float32)
         for _ in range(40)]
write_polylines(str(store), lines, chunk_shape=(125, 125, 125), bin_shape=(5, 5, 5))
print(f"{store}: {len(lines)} streamlines, {sum(map(len, lines))} vertices")
"""),
    md("""
## 2. Plan

Each factor is `(coarsen, sparsity)`: the bin grows by `coarsen` per level and
`1/sparsity` of the objects are kept.  `plan_pyramid` reads metadata only and
shows the bins, chunk grids and task counts the build will use.
"""),
    code("""
factors = [(2, 1), (2, 2), (2, 2)]
print(zd.plan_pyramid(str(store), factors=factors, cross_level_depth=-1))
"""),
    md("""
## 3. Build on a LocalCluster

Two worker processes.  Open the dashboard link to watch the tasks (the
dashboard needs `pip install bokeh`).  `cross_level_depth=-1` links every pair
of levels (see notebook 03).
"""),
    code("""
cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
client = Client(cluster)
print("dashboard:", client.dashboard_link)

summary = zd.build_pyramid(str(store), factors=factors, sparsity_seed=0,
                           cross_level_depth=-1, client=client)
print(f"built {summary['levels_created']} levels")
"""),
    md("""
## 4. Per-level summary

Read back through zarr-vectors' own API: the level's bin, its vertex
(metavertex) count, the objects still present and the chunks that hold data.
"""),
    code("""
ds = zv.open(str(store))
print(f"{'level':>5}  {'bin':>9}  {'vertices':>8}  {'objects':>7}  {'chunks':>6}")
for lv in ds.levels:
    level = ds.level(lv)
    print(f"{lv:>5}  {level.resolution[0]:>9g}  {level.vertex_count:>8}  "
          f"{level.objects.count:>7}  {len(level.cells()):>6}")
"""),
    md("""
## 5. Every level side by side

Top row x-y, bottom row x-z projections.  Vertices are coloured by object id
(the same object keeps its colour on every level).  Sparsity 2 keeps 20 of the
40 objects (with one seed, the same 20 on every sparse level), and the coarser
bins make the lines visibly blockier.
"""),
    code("""
fig, axes = plt.subplots(2, len(ds.levels), figsize=(3.2 * len(ds.levels), 6.4),
                         sharex=True, sharey=True)
for lv in ds.levels:
    res = ds.level(lv).read()
    sizes = [s.stop - s.start for s in res.parts]
    object_of_vertex = np.repeat(res.part_objects, sizes)
    xyz = res.positions
    for row, (a, b, label) in enumerate([(0, 1, "y"), (0, 2, "z")]):
        ax = axes[row, lv]
        ax.scatter(xyz[:, a], xyz[:, b], c=object_of_vertex % 20, cmap="tab20",
                   vmin=0, vmax=19, s=4, linewidths=0)
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        if lv == 0:
            ax.set_ylabel(label)
    axes[0, lv].set_title(f"level {lv}: {ds.level(lv).vertex_count} vertices")
fig.tight_layout()
plt.show()
"""),
    md("""
## 6. Which objects survive: random or longest

Sparsity drops objects but keeps their ids.  The default
`sparsity_strategy="random"` is zarr-vectors' own seeded draw;
`sparsity_strategy="length"` keeps, at each sparsified level, the objects with
the longest polylines at the level below (ties to the lower row), which gives a
far more recognisable coarse view of a tractogram.  Both pyramids below start
from the same 200 streamlines of very different lengths and keep 1 in 8 of them
at level 1 (level 2 only coarsens); the coarsest level is drawn over level 0
(grey).
"""),
    code("""
rng = np.random.default_rng(1)

def tract(n_points):
    # A smooth curve: a direction that turns a little at every 4-unit step.
    steps = np.empty((n_points, 3))
    d = rng.normal(size=3)
    for i in range(n_points):
        d = d / np.linalg.norm(d)
        steps[i] = 4 * d
        d = d + rng.normal(0, 0.15, 3)
    return (rng.uniform(400, 600, 3) + np.cumsum(steps, axis=0)).astype(np.float32)

tracts = [tract(int(n)) for n in rng.integers(5, 150, 200)]
tract_length = np.array([np.linalg.norm(np.diff(t, axis=0), axis=1).sum() for t in tracts])
views = {}
for strategy in ("random", "length"):
    path = Path(f"tracts-{strategy}.zv")
    if path.exists():
        shutil.rmtree(path)
    write_polylines(str(path), tracts, chunk_shape=(125, 125, 125), bin_shape=(5, 5, 5))
    zd.build_pyramid(str(path), factors=[(2, 8), (2, 1)], sparsity_strategy=strategy,
                     sparsity_seed=0, client=client)
    top = zv.open(str(path)).level(2).read()
    kept = np.unique(top.part_objects)
    views[strategy] = top
    print(f"{strategy}: keeps {len(kept)} of {len(tracts)} objects, "
          f"{100 * tract_length[kept].sum() / tract_length.sum():.0f}% of the total length")

base = np.concatenate(tracts)
fig, axes = plt.subplots(1, 2, figsize=(10, 5), sharex=True, sharey=True)
for ax, (strategy, top) in zip(axes, views.items()):
    ax.scatter(base[:, 0], base[:, 1], c="0.85", s=1, linewidths=0)
    sizes = [s.stop - s.start for s in top.parts]
    ax.scatter(top.positions[:, 0], top.positions[:, 1],
               c=np.repeat(top.part_objects, sizes) % 20, cmap="tab20", vmin=0, vmax=19,
               s=6, linewidths=0)
    ax.set_aspect("equal")
    ax.set_title(f'sparsity_strategy="{strategy}" (level 2)')
    ax.set_xlabel("x")
axes[0].set_ylabel("y")
fig.tight_layout()
plt.show()
"""),
    code("""
client.close()
cluster.close()
"""),
]


S3_AND_CLUSTER = [
    md("""
# A pyramid on S3, built by a Dask cluster

Connect to a running Dask scheduler and build the pyramid of a store in an S3
bucket.  Everything comes from environment variables, so the same notebook runs
against AWS, MinIO/SeaweedFS or the `deploy/docker-compose.yml` stack:

| variable | meaning | default |
| --- | --- | --- |
| `ZVDASK_SCHEDULER` | scheduler address, e.g. `tcp://localhost:8786` | start a LocalCluster |
| `ZVDASK_S3_ENDPOINT` | S3 endpoint URL (leave unset for AWS) | unset |
| `ZVDASK_S3_KEY`, `ZVDASK_S3_SECRET` | credentials (leave unset to use the AWS credential chain / IAM role) | unset |
| `ZVDASK_BUCKET` | bucket (must exist) | `zvdask` |
| `ZVDASK_STORE` | store path inside the bucket | `notebook-02.zv` |

With the compose stack running (`cd deploy && docker compose up -d s3 scheduler worker`):
`ZVDASK_SCHEDULER=tcp://localhost:8786 ZVDASK_S3_ENDPOINT=http://localhost:8333
ZVDASK_S3_KEY=zvdask ZVDASK_S3_SECRET=zvdask-secret jupyter lab`.  Inside the
containers the workers reach S3 as `http://s3:8333`, so for that stack set
`ZVDASK_S3_ENDPOINT=http://s3:8333` and run the notebook in a container too, or
use an endpoint that both your machine and the workers can resolve.
"""),
    code("""
import os

import fsspec
import zarr_vectors as zv
from distributed import Client, LocalCluster, progress

import zarr_vectors_dask as zd
from zarr_vectors_dask.sample import write_sample
from zarr_vectors_dask.storage.store import redact
"""),
    md("""
## 1. Where the store lives

`storage_options` are fsspec/s3fs options.  They travel with every task, so the
workers need no credentials of their own.  Only the redacted form is printed.
"""),
    code("""
url = f"s3://{os.environ.get('ZVDASK_BUCKET', 'zvdask')}/{os.environ.get('ZVDASK_STORE', 'notebook-02.zv')}"
storage_options = {}
if os.environ.get("ZVDASK_S3_KEY"):
    storage_options["key"] = os.environ["ZVDASK_S3_KEY"]
    storage_options["secret"] = os.environ.get("ZVDASK_S3_SECRET", "")
if os.environ.get("ZVDASK_S3_ENDPOINT"):
    storage_options["client_kwargs"] = {"endpoint_url": os.environ["ZVDASK_S3_ENDPOINT"]}
print(url, redact(storage_options))
"""),
    md("""
## 2. Connect to the cluster
"""),
    code("""
address = os.environ.get("ZVDASK_SCHEDULER")
if address:
    cluster, client = None, Client(address)
else:
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0")
    client = Client(cluster)
n_workers = len(client.scheduler_info()["workers"])
print(f"scheduler {client.scheduler.address} with {n_workers} workers; dashboard {client.dashboard_link}")
"""),
    md("""
## 3. A sample store on S3

`write_sample` (the `zvdask sample` command) writes 24 streamlines with
zarr-vectors' `write_polylines` into a temporary directory and uploads them;
`overwrite=True` replaces an earlier run.
"""),
    code("""
info = write_sample(url, objects=24, vertices=2400, storage_options=storage_options, overwrite=True)
print(info)
"""),
    md("""
## 4. Plan and build, with a progress bar per step

Each coarsening step is one Dask graph: `progress` is called with the step's
output future, and `distributed.progress` draws one text bar for every task
of that graph.
"""),
    code("""
factors = [(2, 1), (2, 2), (2, 2)]
print(zd.plan_pyramid(url, factors=factors, storage_options=storage_options, n_workers=n_workers))
"""),
    code("""
def show_progress(step, futures):
    print(step)
    progress(futures, notebook=False)
    print()

summary = zd.build_pyramid(url, factors=factors, sparsity_seed=0, client=client,
                           storage_options=storage_options, overwrite=True,
                           progress=show_progress)
print(f"built {summary['levels_created']} levels")
"""),
    md("""
## 5. What is on S3

The levels are plain prefixes of the store; zarr-vectors reads them straight
from the bucket.
"""),
    code("""
fs, root = fsspec.core.url_to_fs(url, **storage_options)
print(sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, refresh=True)))

ds = zv.open(url, storage=zv.StorageOptions(options=storage_options))
for lv in ds.levels:
    level = ds.level(lv)
    print(f"level {lv}: bin {level.resolution[0]:g}, {level.vertex_count} vertices, "
          f"{level.objects.count} objects")
"""),
    code("""
client.close()
if cluster is not None:
    cluster.close()
"""),
]


CROSS_LEVEL = [
    md("""
# Cross-level links: from a coarse metavertex to its fine children

Every level of a pyramid links each vertex to its parent metavertex one level
up (`+1`, stored at the fine level) and, with `explicit` storage, each
metavertex to its children one level down (`-1`, stored at the coarse level).
With `cross_level_depth=-1` the pyramid also holds the composed `±N` links
between every pair of levels.
"""),
    code("""
from collections import defaultdict

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle
from zarr_vectors.core.arrays import list_chunk_keys, read_chunk_vertex_rows, read_link_arrays
from zarr_vectors.core.store import get_resolution_level, list_resolution_levels, open_store

import zarr_vectors_dask as zd
from zarr_vectors_dask.sample import write_sample
"""),
    md("""
## 1. A small pyramid

30 streamlines written by zarr-vectors (`write_sample`), then three coarser
levels with links between every pair of levels.  Without a `client`,
`build_pyramid` starts and stops its own cluster (worker processes that do not
import this notebook: see the README, "The default cluster").
"""),
    code("""
store = "links.zv"
write_sample(store, objects=30, vertices=3000, seed=1, overwrite=True)
zd.build_pyramid(store, factors=[(2, 1), (2, 2), (2, 2)], sparsity_seed=0,
                 cross_level_depth=-1, cross_level_storage="explicit")
root = open_store(store)
levels = sorted(list_resolution_levels(root))
print("levels", levels)
"""),
    md("""
## 2. Reading vertices and links

A link endpoint is `(chunk, index)`: the vertex's row in that chunk's vertex
rows, in fragment order.  `read_link_arrays(level, delta=d)` returns every
record of the `d` family as `(chunks, indices)` with endpoint 0 at this level
and endpoint 1 at level `this + d`.
"""),
    code("""
def vertices(level):
    g = get_resolution_level(root, level)
    return {tuple(map(int, cc)): read_chunk_vertex_rows(g, tuple(cc)) for cc in list_chunk_keys(g)}


def links(level, delta):
    \"\"\"{endpoint-0 vertex: [endpoint-1 vertices]} of the links/<delta> family at `level`.\"\"\"
    chunks, idx = read_link_arrays(get_resolution_level(root, level), delta=delta)
    out = defaultdict(list)
    for c, i in zip(chunks.tolist(), idx.tolist()):
        out[(tuple(c[0]), i[0])].append((tuple(c[1]), i[1]))
    return out


pos = {lv: vertices(lv) for lv in levels}
xyz = lambda lv, v: pos[lv][v[0]][v[1]]
for lv in levels:
    print(f"level {lv}: {sum(len(r) for r in pos[lv].values())} vertices")
"""),
    md("""
## 3. Pick a coarse metavertex and walk down with `-1`

The metavertex of the top level with the most children; then the children of
each child, down to level 0.
"""),
    code("""
top = levels[-1]
children_of = {lv: links(lv, -1) for lv in levels[1:]}
parent = max(children_of[top], key=lambda v: len(children_of[top][v]))

family = {top: [parent]}
for lv in range(top, 0, -1):
    family[lv - 1] = [child for v in family[lv] for child in children_of[lv][v]]
for lv in sorted(family, reverse=True):
    print(f"level {lv}: {len(family[lv])} vertices under the chosen metavertex")
"""),
    md("""
## 4. Check it against `+1` and `-{top}`

Going up with `+1` from every child must land on its parent, and the composed
`-{top}` family must name exactly the level-0 vertices the walk found.  All of
them lie in the metavertex's bin, since bins nest from level to level.
"""),
    code("""
for lv in range(top, 0, -1):
    up = links(lv - 1, +1)
    for v in family[lv]:
        assert all(up[child] == [v] for child in children_of[lv][v])

direct = links(top, -top)[parent]
assert sorted(direct) == sorted(family[0]), "composed link family disagrees with the -1 walk"

bin_size = 5.0 * 2 ** top
corner = np.floor(xyz(top, parent) / bin_size) * bin_size
fine = np.array([xyz(0, v) for v in family[0]])
assert ((fine >= corner) & (fine < corner + bin_size)).all()
print(f"+1 agrees, -{top} names the same {len(direct)} level-0 vertices, all inside the "
      f"{bin_size:g}-wide bin at {corner}")
"""),
    md("""
## 5. Draw the family

Left: the whole level 0 (grey) and the chosen bin.  Right: inside the bin, each
level's vertices under the metavertex, with a line from every vertex to its
parent.
"""),
    code("""
every = np.concatenate([rows for rows in pos[0].values()])
colors = plt.cm.viridis(np.linspace(0, 0.9, top + 1))

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 5))
ax0.scatter(every[:, 0], every[:, 1], s=1, c="0.7")
ax0.scatter(fine[:, 0], fine[:, 1], s=3, color=colors[0])
ax0.add_patch(Rectangle(corner[:2], bin_size, bin_size, fill=False, color="red"))
ax0.set_title("level 0 and the metavertex's bin (x-y)")

for lv in range(top, 0, -1):
    for v in family[lv]:
        p = xyz(lv, v)
        for child in children_of[lv][v]:
            c = xyz(lv - 1, child)
            ax1.plot([p[0], c[0]], [p[1], c[1]], color=colors[lv - 1], lw=0.6, alpha=0.7)
for lv in range(top + 1):
    pts = np.array([xyz(lv, v) for v in family[lv]])
    ax1.scatter(pts[:, 0], pts[:, 1], s=6 + 30 * lv, color=colors[lv], label=f"level {lv}",
                zorder=3, edgecolors="k" if lv == top else "none")
ax1.add_patch(Rectangle(corner[:2], bin_size, bin_size, fill=False, color="red"))
ax1.set_aspect("equal")
ax1.legend()
ax1.set_title("children through the -1 links")
fig.tight_layout()
plt.show()
"""),
]


NOTEBOOKS = {
    "01-quickstart.ipynb": QUICKSTART,
    "02-s3-and-cluster.ipynb": S3_AND_CLUSTER,
    "03-cross-level-links.ipynb": CROSS_LEVEL,
}


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells, metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        })
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print("wrote", HERE / name)


if __name__ == "__main__":
    main()
