"""Dask's P2P shuffle against the step's own routing of bin partials (issue 22).

A coarsening step shuffles each source block's bin partials (distinct bin
keys, float64 sums, counts) by bin key into partitions, where they are
summed into metavertices.  The project routes them inside its one graph:
the plan knows from geometry which partitions a block can reach, so each
``(block, partition)`` pair is a small ``pick`` task and each partition a
``reduce_metavertices`` task.  This script measures that against
``dask.dataframe``'s P2P shuffle of the same partials, on the same
cluster, in the same run:

* the partials are the real ones: the step graph of level 1 is built for
  a random-walk store (``bench_pyramid.child_write``) and run up to its
  ``bin_partials`` tasks, whose results stay on the workers;
* ``routed``: the graph's own pick + ``reduce_metavertices`` tasks;
* ``p2p``: each block's parts become a pandas frame (partition, key,
  sums, count), shuffled with ``shuffle_method="p2p"`` on the partition
  column into as many output partitions, each reduced by the same numpy
  core (distinct keys, summed weights, centroids) -- without the routing
  to target blocks that ``reduce_metavertices`` also does, so the
  comparison leans towards P2P.

Both must find the same number of metavertices.  Reported: wall seconds
and CPU seconds of the driver, scheduler and workers (each process's own
counters), best of ``--repeat`` runs.  Needs pandas and pyarrow (not
project dependencies: ``pip install pandas pyarrow``).

    python benchmarks/shuffle_p2p.py --vertices 1000000,10000000 --root /dev/shm/zvp2p
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_pyramid import child_write, cluster_cpu_seconds, md_table  # noqa: E402


def _partials(client, path: str):
    """The level-1 step's ``bin_partials`` results, kept on the workers, with
    the spec, the layout and the graph's task count."""
    from zarr_vectors_dask.planning.levels import make_plan, read_root_meta
    from zarr_vectors_dask.step import shuffle
    from zarr_vectors_dask.step.run import step_graph
    from zarr_vectors_dask.step.source import read_source_level
    from zarr_vectors_dask.storage.store import Store
    st = Store.from_url(path)
    root_meta = read_root_meta(st)
    lv = make_plan(st, factors=[(2, 1)], chunk_scale_factors=None, cross_level_depth=1,
                   cross_level_storage="explicit", sparsity_strategy="random",
                   n_workers=len(client.scheduler_info()["workers"])).levels[0]
    src = read_source_level(st, 0, root_meta.sid_ndim)
    token = uuid.uuid4().hex[:8]
    graph, layout = step_graph(st, lv, src, root_meta, sparsity_strategy="random",
                               sparsity_seed=0, token=token)
    keys = sorted((k for k, t in graph.dsk.items() if t[0] is shuffle.bin_partials),
                  key=lambda k: k[1])
    futs = client.get(graph.dsk, keys, sync=False)
    client.gather([client.submit(len, f) for f in futs])  # computed, still held
    spec = graph.dsk[keys[0]][1]
    return spec, layout, futs


# ------------------------------------------------------------ the two routes
def _routed(client, spec, layout, futs) -> int:
    from zarr_vectors_dask.step.exchange import pick
    from zarr_vectors_dask.step.shuffle import reduce_metavertices
    senders: dict[int, list[int]] = {}
    for b, parts in enumerate(layout.block_partitions):
        for p in parts:
            senders.setdefault(p, []).append(b)
    reduced = []
    for p, blocks in sorted(senders.items()):
        picks = [client.submit(pick, futs[b], "exchange", p, pure=False) for b in blocks]
        reduced.append(client.submit(reduce_metavertices, spec, p, blocks, *picks, pure=False))
    counts = client.gather([client.submit(_metavertices, r, pure=False) for r in reduced])
    return int(sum(counts))


def _metavertices(reduced: dict) -> int:
    return int(sum(int(v["mv"].size) for v in reduced["to_target"].values()))


def _frame(partial: dict, ndim: int):
    """A block's parts as one pandas frame: partition, key, sums, count."""
    import pandas as pd
    cols: dict[str, list] = {"part": [], "count": []}
    for a in range(ndim):
        cols[f"k{a}"], cols[f"s{a}"] = [], []
    for p, part in partial["exchange"].items():
        n = part["keys"].shape[0]
        cols["part"].append(np.full(n, p, dtype=np.int64))
        cols["count"].append(part["counts"])
        for a in range(ndim):
            cols[f"k{a}"].append(part["keys"][:, a])
            cols[f"s{a}"].append(part["sums"][:, a])
    return pd.DataFrame({k: (np.concatenate(v) if v else np.empty(0)) for k, v in cols.items()})


def _reduce_frame(df, ndim: int):
    """Metavertices of one shuffled partition: the numpy core of
    ``reduce_metavertices`` (distinct keys, summed counts, centroids)."""
    import pandas as pd
    keys = np.ascontiguousarray(df[[f"k{a}" for a in range(ndim)]].to_numpy(np.int64))
    if not keys.shape[0]:
        return pd.DataFrame({"n": [0]})
    _, inv = np.unique(keys.view(np.dtype((np.void, 8 * ndim))).ravel(), return_inverse=True)
    n_u = int(inv.max()) + 1
    total = np.bincount(inv, weights=df["count"].to_numpy(), minlength=n_u)
    for a in range(ndim):
        np.bincount(inv, weights=df[f"s{a}"].to_numpy(), minlength=n_u) / np.maximum(total, 1)
    return pd.DataFrame({"n": [int(np.count_nonzero(total > 0))]})


def _p2p(client, spec, layout, futs) -> int:
    import dask
    import dask.dataframe as dd
    ndim = spec.ndim
    frames = [dask.delayed(_frame)(f, ndim) for f in futs]
    meta = _frame({"exchange": {}}, ndim).astype({"part": np.int64, "count": np.int64})
    ddf = dd.from_delayed(frames, meta=meta, verify_meta=False)
    n_parts = len({p for parts in layout.block_partitions for p in parts})
    out = ddf.shuffle("part", npartitions=n_parts, shuffle_method="p2p")
    out = out.map_partitions(_reduce_frame, ndim, meta={"n": np.int64})
    return int(out["n"].sum().compute())


# ------------------------------------------------------------ measuring
def _measure(client, fn, *args):
    c0 = sum(cluster_cpu_seconds(client).values())
    t0 = time.perf_counter()
    n = fn(client, *args)
    return n, time.perf_counter() - t0, sum(cluster_cpu_seconds(client).values()) - c0


def run(vertices: int, root: Path, workers: int, repeat: int) -> list[list]:
    from distributed import Client, LocalCluster
    path = root / f"l0-{vertices}.zv"
    if not path.exists():
        child_write(str(path), vertices, 0, 2.0)
    rows = []
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, \
            Client(cluster) as client:
        spec, layout, futs = _partials(client, str(path))
        n_pairs = sum(len(p) for p in layout.block_partitions)
        n_parts = len({p for parts in layout.block_partitions for p in parts})
        found = {}
        for name, fn in (("routed (pick + reduce_metavertices)", _routed),
                         ("dask.dataframe P2P shuffle + reduce", _p2p)):
            best = None
            for _ in range(repeat):
                n, wall, cpu = _measure(client, fn, spec, layout, futs)
                found[name] = n
                best = (wall, cpu) if best is None or wall < best[0] else best
            rows.append([f"{vertices:,}", name, layout.n_blocks, n_parts, n_pairs,
                         f"{best[0]:.2f}", f"{best[1]:.2f}", f"{n:,}"])
        if len(set(found.values())) != 1:
            raise SystemExit(f"the two routes disagree: {found}")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vertices", default="1000000", help="comma-separated level-0 sizes")
    ap.add_argument("--root", default="/dev/shm/zvp2p", help="scratch directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per route (best wall kept)")
    ap.add_argument("--keep", action="store_true", help="keep the level-0 stores")
    args = ap.parse_args(argv)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for v in (int(x) for x in args.vertices.split(",")):
            rows += run(v, root, args.workers, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"`python benchmarks/shuffle_p2p.py {' '.join(argv or sys.argv[1:])}` -- "
          f"{args.workers} workers x 1 thread, level 1 of factors (2, 1)\n")
    print(md_table(["vertices", "route", "source blocks", "partitions", "block x partition pairs",
                    "wall s (best)", "cluster CPU s", "metavertices"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
