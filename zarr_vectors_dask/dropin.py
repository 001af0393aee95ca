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

from . import api, rerun

__all__ = ["patch_zarr_vectors"]


_NAMES = ("build_pyramid", "coarsen_level")


def patch_zarr_vectors() -> Callable[[], None]:
    """Replace zarr-vectors' ``build_pyramid`` and ``coarsen_level`` by this
    package's (a re-run of ``build_pyramid`` rebuilds, refreshes or returns
    at once: ``rerun.py``), ``ops.refresh.rebuild_pyramid_from_level`` by
    ``refresh_pyramid`` with the recorded arguments, and make
    ``EditSession(refresh_pyramid=...)`` refresh after its flush, in ``zarr_vectors.multiresolution.coarsen`` (where zarr-vectors'
    own ``Dataset.build_pyramid`` and ``ops.refresh`` look them up at call
    time) and in every module already imported that holds them by name.
    Returns a function that puts the originals back."""
    import zarr_vectors.multiresolution.coarsen as ref

    import zarr_vectors.ops.refresh as zr
    from zarr_vectors.ops.edit import EditSession

    originals = {name: getattr(ref, name) for name in _NAMES}
    # A re-run through zarr-vectors' entry points rebuilds, refreshes or
    # returns at once (rerun.py), as its callers expect.
    ours = {"build_pyramid": rerun.build_pyramid, "coarsen_level": api.coarsen_level}
    originals["rebuild_pyramid_from_level"] = zr.rebuild_pyramid_from_level
    ours["rebuild_pyramid_from_level"] = rerun.rebuild_pyramid_from_level(
        zr.rebuild_pyramid_from_level)
    undo_session = rerun.patch_edit_session(EditSession)
    replaced: list[tuple[object, str, object]] = []
    for mod in list(sys.modules.values()):
        if mod is None or getattr(mod, "__name__", "").startswith("zarr_vectors_dask"):
            continue
        for name in originals:
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
        undo_session()

    return undo
