"""Where a store lives: a local directory or an fsspec URL, behind one small interface."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import fsspec
from zarr.storage import FsspecStore, LocalStore

from activations.atomic import temporary_beside
from activations.store.format import STORAGE_OPTIONS_ENV, StoreError


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalRoot:
    """A store in a local directory: manifests replaced by rename, fsync on request, flock."""

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def child(self, name: str) -> "LocalRoot":
        return LocalRoot(self.path / name)

    def zarr_store(self, read_only: bool) -> LocalStore:
        return LocalStore(self.path, read_only=read_only)  # a writer's creates directories as needed

    def read(self, key: str) -> bytes | None:
        try:
            return (self.path / key).read_bytes()
        except FileNotFoundError:
            return None

    def write_atomically(self, key: str, data: bytes, fsync: bool) -> None:
        """Readers see the old file or the new one, never a torn one, even if the disk fills."""
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_beside(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if fsync:
            _fsync(path.parent)

    def lock(self, key: str, shard: str):
        """An exclusive lock held while a writer has the shard open (the OS drops it if we die):
        a second writer would throw away the first one's uncommitted rows."""
        path = self.path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreError(f"shard {shard} is being written by another process: wait for it, or give this "
                             "writer another harvest.rank") from None
        return handle

    def sync(self, keys) -> None:
        """fsync the files and every directory between them and the root: a new file survives a
        power cut only once the directory naming it does."""
        files = [self.path / k for k in keys]
        dirs = set()
        for f in files:
            d = f.parent
            while d != self.path:
                dirs.add(d)
                d = d.parent
        for path in [*files, *sorted(dirs), self.path]:
            _fsync(path)

    def missing(self, prefix: str, keys: list[str]) -> dict[str, str]:
        """The keys under `prefix` with no file, with why: a stat each, cheap beside the read that
        follows, where listing a large store's folders would cost minutes."""
        folder = os.path.join(self.path, prefix)
        return {key: _not_a_file(os.path.join(folder, key)) for key in keys
                if not os.path.isfile(os.path.join(folder, key))}

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Bytes of every file under `prefix`, by key."""
        out = {}
        for folder, _, names in os.walk(self.path / prefix):
            for name in names:
                path = Path(folder) / name
                out[path.relative_to(self.path).as_posix()] = path.stat().st_size
        return out


def _not_a_file(path: str) -> str:
    """Why a chunk's path is not a chunk file (a stat more, only once it is known not to be one)."""
    if os.path.isdir(path):
        return "chunk is a directory, not a file"
    return "chunk missing"


class _NoLock:
    def close(self) -> None:
        pass


class RemoteRoot:
    """A store behind an fsspec URL (s3://, gs://, memory://, ...): every object is written by
    one PUT, which is atomic and durable once it returns, so there is nothing to fsync."""

    def __init__(self, url: str, storage_options: dict):
        self.url = url.rstrip("/")
        self.options = storage_options
        self._listed: dict[str, set] = {}  # prefix -> its keys, listed once for this root (a reader's view)
        try:
            self.fs, self.path = fsspec.core.url_to_fs(self.url, **storage_options)
        except (ImportError, ValueError) as err:
            raise StoreError(f"cannot open {self.url}: {err}") from None

    def __str__(self) -> str:
        return self.url

    def child(self, name: str) -> "RemoteRoot":
        return RemoteRoot(f"{self.url}/{name}", self.options)

    def zarr_store(self, read_only: bool):
        return FsspecStore.from_url(self.url, storage_options=self.options, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(f"{self.path}/{key}")
        except FileNotFoundError:
            return None

    def write_atomically(self, key: str, data: bytes, fsync: bool) -> None:
        self.fs.pipe_file(f"{self.path}/{key}", data)

    def lock(self, key: str, shard: str) -> _NoLock:
        return _NoLock()  # object stores have no locks; harvest.rank keeps writers apart

    def sync(self, keys) -> None:
        pass

    def missing(self, prefix: str, keys: list[str]) -> dict[str, str]:
        """The keys under `prefix` with no object, from one listing of it (a request per key
        would double a reader's requests)."""
        if prefix not in self._listed:
            self._listed[prefix] = {key.removeprefix(prefix) for key in self.sizes(prefix)}
        return {key: "chunk missing" for key in keys if key not in self._listed[prefix]}

    def sizes(self, prefix: str = "") -> dict[str, int]:
        self.fs.invalidate_cache()  # a listing cached earlier would miss new chunks
        found = self.fs.find(f"{self.path}/{prefix}".rstrip("/"), detail=True)
        return {key[len(self.path) + 1 :]: info["size"] for key, info in found.items()}


def store_root(path, storage_options: dict | None = None):
    """Where a store lives: a local path, or a URL with fsspec storage options (by default the
    JSON object in $DIALBOX_STORAGE_OPTIONS; s3fs also reads the usual AWS_* variables)."""
    if isinstance(path, (LocalRoot, RemoteRoot)):
        return path
    text = str(path)
    if fsspec.utils.get_protocol(text) in ("file", "local"):
        return LocalRoot(text.removeprefix("file://"))
    if storage_options is None:
        try:
            storage_options = json.loads(os.environ.get(STORAGE_OPTIONS_ENV) or "{}")
        except json.JSONDecodeError as err:
            raise StoreError(f"${STORAGE_OPTIONS_ENV} is not JSON ({err}): give an object such as "
                             '{"endpoint_url": "http://host:9000"}') from None
    return RemoteRoot(text, storage_options)
