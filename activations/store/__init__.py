"""The activation store: a zarr v3 group of token rows, written by many shards, read as one.

Layout under the store root (`<run_dir>/activations/`):

    zarr.json                        root group; attrs = the store's identity and layout
    shards/r00000-of-00002/          one group per writer: tokens, doc_ids, positions, windows
                                     (the corpus window of each row, -1 if unknown) and one
                                     [rows, width] array per site (e.g. "L15.resid_post")
    manifests/r00000-of-00002.json   that shard's commit record, replaced atomically
    manifests/r00000-of-00002.json.prev  the commit before it, read if the manifest is ever torn
    manifests/r00000-of-00002.crc32c/    the committed crc32c of its chunks, a file per block of 64

A writer only ever writes whole chunks past its last commit, makes them durable, then
replaces its manifest. The manifest is the only thing readers trust: rows past it do not
exist, so a killed writer leaves nothing half-written behind and resumes from its manifest.
Every chunk carries a crc32c checksum, which the manifest commits by array and position. Every
read of committed rows checks the array's metadata against the format, that their chunks are there,
decode and are the ones committed at their positions, and raises StoreError naming the damage rather
than return zeros or other rows; `python -m pipeline.store verify` lists every damaged chunk and
checks the manifests' statistics against the rows.

zarr has no bfloat16, so bf16 rows are stored as their uint16 bit pattern (exact) with
`logical_dtype: bfloat16` in the array attributes; readers always get float32.

The root may be a local directory or an fsspec URL such as `s3://bucket/run/activations`
(storage options from the caller, else JSON in $DIALBOX_STORAGE_OPTIONS). Locally a manifest
is replaced with fsync and rename and a shard is flock-ed while open; on object storage a
manifest is one PUT, which S3 makes atomic, chunks are durable once their PUT returns, and
there is no lock: one writer per shard rests on every writer having its own harvest.rank.
"""


from activations.store.format import STORAGE_OPTIONS_ENV, TOKEN_COLUMNS, StoreError, shard_name
from activations.store.merge import merge
from activations.store.reader import ActivationStore, ShardRecord
from activations.store.stats import SiteStats
from activations.store.verify import VerifyResult, verify
from activations.store.writer import ShardWriter

__all__ = ["STORAGE_OPTIONS_ENV", "TOKEN_COLUMNS", "ActivationStore", "ShardRecord", "ShardWriter", "SiteStats", "StoreError",
           "VerifyResult", "merge", "shard_name", "verify"]
