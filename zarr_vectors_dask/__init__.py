"""Build zarr-vectors multi-resolution pyramids on Dask, chunk by chunk."""

from .api import build_pyramid, coarsen_level, plan_pyramid
from .dropin import patch_zarr_vectors
from .currency import PyramidStatus, StaleSourceError
from .errors import BuildError, PlanError
from .planning.plan import PyramidPlan
from .refresh import pyramid_status, refresh_pyramid
from .storage.store import Store, StoreAccessError

__version__ = "0.1.0"
__all__ = ["build_pyramid", "coarsen_level", "plan_pyramid", "patch_zarr_vectors", "PyramidPlan", "PlanError",
           "BuildError", "Store", "StoreAccessError", "__version__", "pyramid_status", "refresh_pyramid",
           "PyramidStatus", "StaleSourceError"]
