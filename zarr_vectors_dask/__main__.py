"""``python -m zarr_vectors_dask`` is the ``zvdask`` command."""

import sys

from .cli import main

__all__ = []  # the command line, nothing to import

if __name__ == "__main__":
    sys.exit(main())
