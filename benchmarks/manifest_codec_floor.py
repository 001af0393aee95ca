#!/usr/bin/env python
"""Thread CPU to decode and re-encode every manifest bucket of a built pyramid.

A refresh whose region changes rows in every bucket of a level (object ids
are not spatial, so a clustered edit does) decodes the source level's
buckets in ``object_refs``, decodes the target level's buckets to splice the
changed rows in, and encodes them again: zstd and vlen-bytes, byte for byte
zarr's.  This prints that work per level, the floor of such a refresh:

    python benchmarks/manifest_codec_floor.py /dev/shm/zvrep/built-10000000.zv
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from zarr_vectors_dask.format.buckets import BucketCodec


def level_costs(root: str, level: int) -> tuple[int, float, float]:
    """(buckets, decode CPU-s, encode CPU-s) of one level's manifests."""
    path = os.path.join(root, str(level), "object_index", "manifests")
    with open(os.path.join(path, "zarr.json")) as fh:
        codec = BucketCodec.of(json.load(fh))
    if codec is None:
        raise SystemExit(f"{path}: not a plain vlen-bytes + zstd array (sharded?)")
    keys = sorted(os.listdir(os.path.join(path, "c")), key=int)
    dec = enc = 0.0
    for k in keys:
        with open(os.path.join(path, "c", k), "rb") as fh:
            raw = fh.read()
        t = time.thread_time()
        rows = codec.decode(raw, int(k)).tolist()
        dec += time.thread_time() - t
        t = time.thread_time()
        codec.encode(rows)
        enc += time.thread_time() - t
    return len(keys), dec, enc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="a built pyramid (local path)")
    args = ap.parse_args()
    levels = sorted(int(d) for d in os.listdir(args.root) if d.isdigit())
    print(f"`python benchmarks/manifest_codec_floor.py {args.root}`\n")
    print("| level | buckets | decode CPU-s | encode CPU-s |\n|---|---|---|---|")
    total_dec = total_enc = 0.0
    for lv in levels:
        n, dec, enc = level_costs(args.root, lv)
        print(f"| {lv} | {n} | {dec:.3f} | {enc:.3f} |")
        # object_refs decodes levels 0..top-1, the splice decodes and
        # encodes levels 1..top: each level below the top is decoded twice
        total_dec += dec * ((lv < levels[-1]) + (lv > levels[0]))
        total_enc += enc * (lv > levels[0])
    print(f"\nevery bucket changed at every level: decode {total_dec:.3f} + encode "
          f"{total_enc:.3f} = {total_dec + total_enc:.3f} CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
