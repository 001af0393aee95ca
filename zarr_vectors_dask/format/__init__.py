"""The zarr-vectors 0.9.2 on-disk format, as far as a pyramid touches it.

Everything that knows a path, a byte layout or a metadata document lives
here: chunk-cell paths and framing, payload encode/decode (via zarr-vectors'
own pure codec helpers), and rendering of ``zarr.json`` documents.  Graph
stages call these; they never build paths or bytes themselves.
"""
