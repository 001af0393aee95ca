"""What zarr-vectors-tools 0.3's pyramid paths write, next to zarr-vectors'
``build_pyramid`` on the same level-0 store.

For each store kind (written by zarr-vectors' own writers, tests/stores.py)
and each zvtools coarsener key that applies, one copy is built by
``zarr_vectors.multiresolution.coarsen.build_pyramid`` and one by
``zarr_vectors_tools.multiresolution.coarsen.build_pyramid(method=key)``,
with the same factors and cross-level settings.  Printed per pair: the
coarsener key zvtools picks by itself, the level metadata that names the
method and shared fragments, vertex counts, link deltas, whether the
manifests agree, and the file-by-file difference.

    PYTHONPATH=. python benchmarks/zvtools_paths.py [--keep DIR] [KIND ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from equivalence import compare_raw_files  # noqa: E402
import stores  # noqa: E402
import zvtools_inputs as zi  # noqa: E402

FACTORS = [(2.0, 1.0), (2.0, 2.0)]
XLEVEL = {"cross_level_depth": -1, "cross_level_storage": "explicit"}

def _segment_skeletons(path) -> None:
    """Skeletons keyed by segment id, as zvtools' precomputed-skeleton
    ingest writes them (zarr-vectors' ``types.skeletons`` chunk writer plus
    zvtools' ``build_object_index``): six random chains, each split at the
    chunk edge x=100."""
    import numpy as np
    from zarr_vectors.types import skeletons as sk
    from zarr_vectors_tools.multiresolution.object_index import build_object_index

    rng = np.random.default_rng(0)
    root, lg = sk.init_skeleton_store(str(path), chunk_shape=(100.0, 100.0, 100.0),
                                      bounds=([0.0, 0.0, 0.0], [200.0, 100.0, 100.0]), ndim=3,
                                      attribute_dtypes={"radius": "float32"})
    pieces: dict = {(0, 0, 0): [], (1, 0, 0): []}
    for seg in range(6):
        y, z = rng.uniform(10, 90, 2)
        for cc, xs in (((0, 0, 0), np.arange(5.0, 100.0, 3.0)), ((1, 0, 0), np.arange(101.0, 195.0, 3.0))):
            pos = np.stack([xs, y + rng.normal(0, 1, len(xs)).cumsum(),
                            z + rng.normal(0, 1, len(xs)).cumsum()], 1).clip(1, 99).astype(np.float32)
            pos[:, 0] = xs
            edges = np.array([[i, i - 1] for i in range(1, len(xs))])
            pieces[cc].append({"segment_id": 1000 + seg, "positions": pos, "edges": edges,
                               "attributes": {"radius": rng.uniform(1, 3, len(xs)).astype(np.float32)}})
    records = []
    for cc, chunk_pieces in pieces.items():
        recs, _ = sk.write_skeleton_chunk(lg, cc, chunk_pieces, attr_dtypes={"radius": np.float32})
        records += recs
    build_object_index(lg, records, ndim=3)
    sk.finalize_skeleton_store(root)


#: store kind -> (writer, zvtools keys to try on it)
CASES = {
    "points_with_ids": (stores.make_points_with_ids, ["per_object", "per_fragment"]),
    "streamlines": (stores.make_streamlines, ["polyline", "per_object"]),
    "skeletons": (stores.make_skeletons, ["skeleton", "per_object"]),
    "graphs": (stores.make_graphs, ["per_object"]),
    "meshes": (stores.make_meshes, ["mesh", "per_object"]),
    # Stores zvtools itself ingested (its TRK ingest stamps the segment ids
    # its RDP coarsener needs; its SWC ingest writes none).
    "zvtools_trk": (lambda p: zi.ingest_trk(zi.write_trk(f"{p}.trk"), p),
                    ["polyline", "per_object"]),
    "zvtools_swc": (lambda p: zi.ingest_swc(zi.write_swc(f"{p}.swc"), p),
                    ["skeleton", "per_object"]),
    "segment_skeletons": (_segment_skeletons, ["skeleton", "per_object"]),
}


def _levels(path: Path) -> list[int]:
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


def _describe(path: Path) -> dict:
    """Per level: method, shared_fragments, vertex_count, link deltas."""
    root = json.loads((path / "zarr.json").read_text())["attributes"]
    out = {"capabilities": sorted(root.get("zarr_vectors", {}).get("format_capabilities", [])
                                  or root.get("format_capabilities", []) or [])}
    for lvl in _levels(path):
        attrs = json.loads((path / str(lvl) / "zarr.json").read_text())["attributes"]
        meta = attrs.get("zarr_vectors_level", {})
        links = path / str(lvl) / "links"
        deltas = sorted(p.name for p in links.iterdir() if p.is_dir()) if links.is_dir() else []
        out[lvl] = {k: meta.get(k) for k in ("coarsening_method", "shared_fragments",
                                              "vertex_count", "preserves_object_ids")}
        out[lvl]["links"] = deltas
        out[lvl]["files"] = sum(1 for p in (path / str(lvl)).rglob("*") if p.is_file())
    return out


def _manifests_equal(a: Path, b: Path, level: int) -> bool | None:
    from zarr_vectors.building import open_store, read_all_object_manifests, get_resolution_level
    try:
        ma = read_all_object_manifests(get_resolution_level(open_store(str(a), mode="r"), level))
        mb = read_all_object_manifests(get_resolution_level(open_store(str(b), mode="r"), level))
    except Exception:
        return None
    return [list(map(tuple, m)) for m in ma] == [list(map(tuple, m)) for m in mb]


def run(work: Path, only: list[str]) -> None:
    import zarr_vectors.multiresolution.coarsen as zv_coarsen
    from zarr_vectors.building import open_store, read_root_metadata
    from zarr_vectors_tools.multiresolution import coarsen as zvt

    for kind, (write, keys) in CASES.items():
        if only and kind not in only:
            continue
        base = work / f"{kind}.zv"
        write(str(base))
        auto = zvt.select_coarsener_key(read_root_metadata(open_store(str(base), mode="r")))
        ref = work / f"{kind}-zv.zv"
        shutil.copytree(base, ref)
        t0 = time.perf_counter()
        zv_coarsen.build_pyramid(str(ref), factors=FACTORS, sparsity_seed=0, **XLEVEL)
        t_ref = time.perf_counter() - t0
        print(f"== {kind}: zvtools picks {auto!r}; zarr-vectors build {t_ref:.2f} s")
        print(f"   zarr-vectors: {_describe(ref)}")
        for key in keys:
            out = work / f"{kind}-{key}.zv"
            shutil.copytree(base, out)
            t0 = time.perf_counter()
            try:
                zvt.build_pyramid(str(out), factors=FACTORS, sparsity_seed=0, method=key, **XLEVEL)
            except Exception as exc:  # a key that refuses this store: say so
                print(f"   zvtools {key}: refused: {type(exc).__name__}: {exc}")
                continue
            took = time.perf_counter() - t0
            diff = compare_raw_files(ref, out)
            print(f"   zvtools {key} ({took:.2f} s): {_describe(out)}")
            print(f"     manifests equal at level 1/2: {_manifests_equal(ref, out, 1)}/"
                  f"{_manifests_equal(ref, out, 2)}; files only in zarr-vectors' "
                  f"{len(diff.only_in_expected)}, only in zvtools' {len(diff.only_in_actual)}, "
                  f"differing {len(diff.differing)} (identical: {diff.identical})")
            for p in diff.differing[:3]:
                print(f"       {p}: {'; '.join(diff.json_diffs.get(p, ['bytes'])[:3])}")
            for p in diff.only_in_actual[:3]:
                print(f"       only zvtools: {p}")
            for p in diff.only_in_expected[:3]:
                print(f"       only zarr-vectors: {p}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="write the stores here and keep them")
    ap.add_argument("kinds", nargs="*", help=f"store kinds to run (default all: {', '.join(CASES)})")
    args = ap.parse_args()
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=False)
        run(work, args.kinds)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), args.kinds)


if __name__ == "__main__":
    main()
