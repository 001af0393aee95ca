"""One line for code written against zarr-vectors: make its
``build_pyramid``/``coarsen_level`` ours, so ``zarr_vectors.open(url,
mode="r+").build_pyramid(...)``, ``rebuild_pyramid_from_level`` and
``from zarr_vectors.multiresolution.coarsen import build_pyramid`` all build
on Dask (on the default client, or a cluster made for each call: see
``cluster.py``).
"""

from __future__ import annotations

import sys
from typing import Callable

from . import api

__all__ = ["patch_zarr_vectors"]


_NAMES = ("build_pyramid", "coarsen_level")


def patch_zarr_vectors() -> Callable[[], None]:
    """Replace zarr-vectors' ``build_pyramid`` and ``coarsen_level`` by this
    package's, in ``zarr_vectors.multiresolution.coarsen`` (where zarr-vectors'
    own ``Dataset.build_pyramid`` and ``ops.refresh`` look them up at call
    time) and in every module already imported that holds them by name.
    Returns a function that puts the originals back."""
    import zarr_vectors.multiresolution.coarsen as ref

    originals = {name: getattr(ref, name) for name in _NAMES}
    ours = {"build_pyramid": api.build_pyramid, "coarsen_level": api.coarsen_level}
    replaced: list[tuple[object, str, object]] = []
    for mod in list(sys.modules.values()):
        if mod is None or getattr(mod, "__name__", "").startswith("zarr_vectors_dask"):
            continue
        for name in _NAMES:
            try:
                held = mod.__dict__.get(name)
            except AttributeError:
                continue
            if held is originals[name] and held is not ours[name]:
                setattr(mod, name, ours[name])
                replaced.append((mod, name, held))

    def undo() -> None:
        for mod, name, held in replaced:
            if getattr(mod, name, None) is ours[name]:
                setattr(mod, name, held)

    return undo
