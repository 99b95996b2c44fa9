"""A shared, content-addressed cache of stage results (a folder or an object store, through fsspec).

Layout under the cache URL (``file:///shared/reidbuild-cache``, ``s3://bucket/prefix``, any fsspec URL)::

    blobs/<aa>/<sha256>          artifact bytes, named by their sha256
    actions/<aa>/<key>.json      one action entry per stage result: output file names with their hashes
                                 and sizes, and the stage's lock record

An action key is the stage fingerprint (params, input hashes, upstream hashes, tool versions); for a
non-reproducible stage (a TensorRT engine) it also covers the environment the bytes are tied to (GPU and
compute capability, TensorRT, CUDA versions). Blobs are pushed before their entry, so a reader never sees an
entry whose blobs are missing; every blob is sha256-checked before use.

Use from other commands (e.g. a rebuild into a scratch folder)::

    from reidbuild.cache import open_store
    store = open_store("file:///shared/cache", required=False)   # or the REIDBUILD_CACHE value
    pipeline.run(stages, ..., output_dir=scratch, store=store)   # restores what it can, pushes what ran
    store.problems                                               # corrupt blobs / unreachable, as text
"""
from __future__ import annotations

from .store import Store, open_store

__all__ = ["Store", "open_store"]
