"""Every committed chunk's crc32c, by array and position: what binds a chunk to its place.

A chunk's own checksum (zarr's crc32c codec, the outermost: the file's last 4 bytes) proves its bytes
are whole, not that they belong where they are: two chunk files of an array swapped, or one linked to
its neighbour, read as valid chunks of the wrong rows. So the writer records the crc32c of each chunk
it stores (seen as zarr hands the bytes to storage: no extra read, any codec, local or remote), and the
manifest that commits the rows commits those values with them. A reader compares a chunk's last 4 bytes
with the value committed for its array and index: four bytes and a dict lookup per chunk read.

The manifest holds the values of the chunks past the last whole block of BLOCK chunks (`crc32c`:
{array: [value, ...]}); each whole block is written once, before the manifest that drops it, to
`manifests/<shard>.crc32c/<block>.json`, so a manifest stays small however large its shard grows.
Stores of format version 1 predate this: their chunks' positions are not checked.
"""

from __future__ import annotations

import json

import google_crc32c
from zarr.storage import WrapperStore

from activations.store.format import StoreError

BLOCK = 64  # chunks per block file: about 700 bytes of manifest per array at most


class MisplacedChunk(ValueError):
    """A whole chunk that is not the one committed at its array and position (a ValueError, like
    zarr's checksum error, so readers name it the same way)."""


def chunk_position(key: str) -> tuple[str, str, int] | None:
    """(shard, array, chunk index) of a chunk key such as shards/r00000-of-00001/L15.resid_post/c/3/0."""
    parts = key.split("/")
    if len(parts) >= 5 and parts[0] == "shards" and parts[3] == "c":
        return parts[1], parts[2], int(parts[4])
    return None


def stored_crc(data) -> int:
    """The crc32c a chunk's bytes end with."""
    return int.from_bytes(bytes(data[-4:]), "little")


def check_position(data, expected: int | None, index: int) -> None:
    """Refuse a chunk whose bytes are whole but not those committed at `index` (None: unchecked).
    A chunk that fails its own checksum is refused in zarr's words first, so that a torn chunk is
    named as torn, not as misplaced."""
    if expected is None or len(data) < 4 or stored_crc(data) == expected:
        return
    if google_crc32c.value(bytes(data[:-4])) != stored_crc(data):
        raise ValueError(f"Stored and computed checksum do not match (chunk {index})")
    raise MisplacedChunk(f"not the chunk committed here (crc32c {stored_crc(data):08x}, {expected:08x} committed): "
                         "it was rewritten, or chunk files were swapped, copied or linked")


class CrcStore(WrapperStore):
    """zarr's view of a store, seeing every chunk go by: a writer's records the crc32c of each chunk
    stored (`written`, by key), a reader's checks each chunk read against `expected(shard, array, index)`."""

    def __init__(self, store, expected=None, written: dict | None = None):
        super().__init__(store)
        self.expected = expected
        self.written = {} if written is None else written

    def _with_store(self, store) -> "CrcStore":
        return type(self)(store, self.expected, self.written)

    async def get(self, key, prototype=None, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        where = chunk_position(key) if self.expected and value is not None and byte_range is None else None
        if where:
            check_position(value.as_numpy_array(), self.expected(*where), where[2])
        return value

    async def set(self, key, value) -> None:
        if chunk_position(key):
            self.written[key] = stored_crc(value.as_numpy_array())
        await self._store.set(key, value)


def block_key(shard: str, block: int) -> str:
    return f"manifests/{shard}.crc32c/{block:06d}.json"


class ChunkCrcs:
    """The crc32c committed for each chunk of one shard: the manifest's tail and, read when first
    needed, the block files before it."""

    def __init__(self, root, shard: str, n_chunks: int, tail: dict):
        self.root, self.shard, self.tail = root, shard, tail
        self.spilled = n_chunks // BLOCK  # blocks written to their own files
        self.blocks: dict[int, dict] = {}

    def get(self, name: str, index: int) -> int | None:
        """The value committed for chunk `index` of array `name`; None when none is (a damaged manifest)."""
        block, at = divmod(index, BLOCK)
        values = (self._block(block) if block < self.spilled else self.tail).get(name, [])
        return int(values[at]) if at < len(values) else None

    def _block(self, block: int) -> dict:
        if block not in self.blocks:
            key = block_key(self.shard, block)
            data = self.root.read(key)
            try:
                self.blocks[block] = json.loads(data) if data is not None else {}
            except json.JSONDecodeError as err:
                raise StoreError(f"{self.root}/{key} is not valid JSON ({err}): the chunks it vouches for cannot be "
                                 "checked; restore it, or rerun that shard's writer into another run_name") from None
        return self.blocks[block]


def commit_crcs(root, shard: str, tail: dict, n_chunks: int, fsync: bool) -> dict:
    """Write the whole blocks of `tail` (the values of chunks from the last block file on, now `n_chunks`
    in all) to their files; what is left is the tail the manifest commits."""
    first = (n_chunks - len(next(iter(tail.values()), []))) // BLOCK
    while min((len(v) for v in tail.values()), default=0) >= BLOCK:
        block = {name: values[:BLOCK] for name, values in tail.items()}
        root.write_atomically(block_key(shard, first), json.dumps(block).encode(), fsync)
        tail = {name: values[BLOCK:] for name, values in tail.items()}
        first += 1
    return tail


def chunk_count(rows: int, chunk_rows: int) -> int:
    return -(-rows // chunk_rows)
