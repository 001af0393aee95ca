#!/usr/bin/env python
"""A refresh on S3 against a full rebuild on the same server (issue 21).

The standard pyramid (``refresh_repeat.py``'s, built locally once and kept
under ``--root``) is uploaded to a fresh bucket of a SeaweedFS server
(``weed mini`` on 127.0.0.1, as the tests start it).  Per rep, a local copy
gets the clustered vertex edit of ``--fraction`` of the level-0 chunks and
its changed level-0 objects are uploaded (as a sync would); the pyramid on
S3 is then refreshed, and a second bucket holding the same edited store is
rebuilt with ``overwrite=True``.  (The uploaded copy is refreshed once
before the edit: its record's local fingerprint does not carry over.)
Both on one LocalCluster; wall and
CPU-seconds (driver, scheduler, workers) each.  Run an older tree with
``PYTHONPATH=<its checkout>`` for an A/B.

    PYTHONPATH=$PWD python benchmarks/refresh_s3.py --vertices 1e6 --fraction 0.01 --root /dev/shm/zvrep
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pyramid import _seaweedfs  # noqa: E402
from bench_refresh import KW, differing, timed  # noqa: E402
from refresh_repeat import built_pyramid, edited_copy  # noqa: E402


def upload(fs, local: Path, url_path: str) -> None:
    fs.put(str(local), url_path, recursive=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vertices", type=float, default=1e6)
    ap.add_argument("--fraction", type=float, default=0.01)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--root", default="/dev/shm/zvrep")
    args = ap.parse_args(argv)
    import zarr_vectors_dask as zd
    from distributed import Client, LocalCluster
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0", silence_logs=40) as lc, Client(lc) as client:
        built = built_pyramid(client, root, int(args.vertices))
        data = Path(tempfile.mkdtemp(prefix="zvs3-", dir=root))
        srv = _seaweedfs()(data)
        try:
            fs, opts = srv.fs(), srv.storage_options
            for rep in range(args.reps):
                work = root / "s3-edited.zv"
                edited_copy(built, work, args.fraction)
                changed = sorted(k for k in differing(built, work, _level0(built, work)))
                refreshed, rebuilt = srv.new_bucket("zvr"), srv.new_bucket("zvb")
                upload(fs, built, f"{refreshed}/x.zv")
                # The uploaded record's fingerprint is local mtimes, which S3's
                # ETags cannot match (every object would look changed): one
                # refresh on the bucket records an S3 one, writing nothing else.
                zd.refresh_pyramid(srv.url(refreshed, "x.zv"), client=client,
                                   storage_options=opts)
                for rel in changed:  # the edit, synced
                    if (work / rel).exists():
                        fs.pipe(f"{refreshed}/x.zv/{rel}", (work / rel).read_bytes())
                    else:
                        fs.rm(f"{refreshed}/x.zv/{rel}")
                upload(fs, work, f"{rebuilt}/x.zv")
                fs.invalidate_cache()
                dirty = len(zd.pyramid_status(srv.url(refreshed, "x.zv"), storage_options=opts)
                            .diff.dirty_chunks().get("vertices", ()))
                r_wall, r_cpu = timed(client, lambda: zd.refresh_pyramid(
                    srv.url(refreshed, "x.zv"), client=client, storage_options=opts))
                b_wall, b_cpu = timed(client, lambda: zd.build_pyramid(
                    srv.url(rebuilt, "x.zv"), client=client, storage_options=opts,
                    overwrite=True, **KW))
                rows.append((rep, f"{len(changed)} / {dirty}", r_wall, r_cpu, b_wall, b_cpu))
        finally:
            srv.stop()
            shutil.rmtree(data, ignore_errors=True)
    print(f"`python benchmarks/refresh_s3.py --vertices {args.vertices:g} --fraction "
          f"{args.fraction:g} --reps {args.reps} --root {args.root}` ({zd.__file__})\n")
    print("| rep | level-0 objects synced / dirty vertex chunks | refresh s (CPU-s) | "
          "full rebuild s (CPU-s) | ratio |")
    print("|---|---|---|---|---|")
    for rep, n, rw, rc, bw, bc in rows:
        print(f"| {rep} | {n} | {rw:.2f} ({rc:.2f}) | {bw:.2f} ({bc:.2f}) | {100 * rw / bw:.1f}% |")
    return 0


def _level0(a: Path, b: Path) -> list[str]:
    """Level-0 files of either store, and the root document (paths
    relative to the store)."""
    out = {"zarr.json"}
    for root in (a, b):
        out |= {str(p.relative_to(root)) for p in (root / "0").rglob("*") if p.is_file()}
    return sorted(out)


if __name__ == "__main__":
    sys.exit(main())
