"""Tiny TRK and SWC files, and level-0 stores ingested from them by
zarr-vectors-tools' own ``zvtools convert`` (its CLI, called in-process).

A TRK is written with nibabel (zarr-vectors-tools' ``trk`` extra); an SWC is
plain text, written here by hand.  Both are deterministic in ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_trk(path, *, seed: int = 0, n_streamlines: int = 20) -> Path:
    """Smooth random walks in a 100 mm RAS box, saved as TrackVis TRK."""
    from nibabel.streamlines import Tractogram, TrkFile

    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_streamlines):
        n = int(rng.integers(10, 60))
        p, d = rng.uniform(20, 80, 3), rng.normal(size=3)
        pts = [p]
        for _ in range(n - 1):
            d = d + rng.normal(0, 0.3, 3)
            d /= np.linalg.norm(d)
            p = p + 1.5 * d
            pts.append(p)
        lines.append(np.clip(np.asarray(pts, np.float32), 1, 99))
    header = {"dimensions": np.array([100, 100, 100], np.int16),
              "voxel_sizes": np.array([1, 1, 1], np.float32),
              "voxel_to_rasmm": np.eye(4, dtype=np.float32), "voxel_order": b"RAS"}
    TrkFile(Tractogram(lines, affine_to_rasmm=np.eye(4)), header=header).save(str(path))
    return Path(path)


def write_swc(path, *, seed: int = 0, n_nodes: int = 300) -> Path:
    """One branching neuron (SWC holds one rooted tree): ID type X Y Z radius parent."""
    rng = np.random.default_rng(seed)
    rows, pos = ["# tiny neuron for zarr-vectors-dask tests"], {}
    for nid in range(1, n_nodes + 1):
        parent = -1 if nid == 1 else (nid - 1 if rng.random() < 0.9 else int(rng.integers(1, nid)))
        pos[nid] = (np.array([50.0, 50.0, 50.0]) if parent < 0
                    else pos[parent] + rng.normal(0, 2.5, 3))
        x, y, z = pos[nid]
        rows.append(f"{nid} {1 if parent < 0 else 3} {x:.3f} {y:.3f} {z:.3f} "
                    f"{rng.uniform(0.2, 2.0):.3f} {parent}")
    Path(path).write_text("\n".join(rows) + "\n")
    return Path(path)


def zvtools(*argv: str) -> None:
    """Run ``zvtools ARGV...`` in this process; a non-zero exit is an error."""
    from zarr_vectors_tools.cli import main

    rc = main([str(a) for a in argv])
    if rc:
        raise RuntimeError(f"zvtools {' '.join(map(str, argv))} exited {rc}")


def ingest_trk(trk, store) -> Path:
    """``zvtools convert T.trk S --num-chunks 4,4,4 --compute-length --compute-endpoints``
    (a TRK store's bin is its chunk, so the grid is fine enough that two
    coarse levels still have many metavertices):
    streamlines with ``fragment_attributes/segment_id`` (which zvtools' RDP
    coarsener needs) and object attributes ``length``, ``start``, ``end``."""
    zvtools("convert", trk, store, "--num-chunks", "4,4,4", "--compute-length",
            "--compute-endpoints")
    return Path(store)


def ingest_swc(swc, store) -> Path:
    """``zvtools convert N.swc S --chunk-shape 25,25,25 --bin-shape 5,5,5``: one skeleton with
    vertex attributes ``radius`` and ``compartment`` and the SWC header."""
    zvtools("convert", swc, store, "--chunk-shape", "25,25,25", "--bin-shape", "5,5,5")
    return Path(store)
