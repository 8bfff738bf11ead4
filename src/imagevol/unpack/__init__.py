"""Turning verified blobs into files: the layer applier and (later) the artifact materializers.

`compression` opens a blob as a stream of decompressed bytes (gzip, zstd or none, sniffed when the
media type does not say); `applier` applies one image layer (a tar stream) onto a directory without
ever writing outside it.
"""
