"""Store access (fsspec, with retries), open handles, the build lock."""
