"""Helpers for tests of kura and of code built on the repository.

``make_repo`` creates a small, fast repository (64 KiB chunks, cheap scrypt);
``write_disk`` stores bytes as a one-disk restore point; ``FaultyBackend``
wraps a backend and injects failures (``ENOSPC`` after N writes, or a hook
called before every write) to test what an error leaves behind;
``check_backend`` is the conformance suite every ``Backend`` must pass;
``age_files`` makes a repository's files look old (GC tests).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from kura.errors import StorageFull, UsageError
from kura.repository.backend import (
    Backend,
    LocalBackend,
    ObjectNotFound,
    ObjectStat,
    WriteBatch,
)
from kura.repository.crypto import DEFAULT_ID_ALGORITHM
from kura.repository.index import chunk_count
from kura.repository.manifest import DiskEntry, Manifest, SourceRef
from kura.repository.repo import Repository

TEST_CHUNK = 64 << 10
TEST_PASSPHRASE = b"correct horse battery staple"


def make_repo(path: Path | Backend, *, encrypted: bool = True,
              chunk_size: int = TEST_CHUNK, compression_level: int = 3,
              id_algorithm: str = DEFAULT_ID_ALGORITHM) -> Repository:
    return Repository.init(path, passphrase=TEST_PASSPHRASE if encrypted else None,
                           encryption="aes-256-gcm" if encrypted else "none",
                           chunk_size=chunk_size, compression_level=compression_level,
                           scrypt_n=1 << 10, id_algorithm=id_algorithm)


def write_disk(repo: Repository, name: str, data: bytes, *, disk: str = "disk",
               parent: Manifest | None = None, base: DiskEntry | None = None,
               only: Iterable[int] | None = None, node: str = "test-node",
               kind: str | None = None) -> Manifest:
    """Store ``data`` as disk ``disk`` of a new restore point of image ``name``.

    ``only``: write just these chunk indexes (the rest is inherited from ``base``
    or zero).
    """
    source = SourceRef(kind="image", key=name, name=name)
    cs = repo.chunk_size
    with repo.begin_snapshot(source, node=node, parent=parent,
                             kind=kind or ("incremental" if parent else "full")) as w:
        dw = w.add_disk(disk, len(data), base=base)
        indexes = range(chunk_count(len(data), cs)) if only is None else only
        for i in indexes:
            dw.write_chunk(i, data[i * cs:(i + 1) * cs])
        return w.commit()


class FaultyBackend:
    """A backend wrapper that fails on purpose (see module docstring)."""

    def __init__(self, inner: Backend, *, enospc_after: int | None = None,
                 before_write: Callable[[str], None] | None = None) -> None:
        self.inner = inner
        self.enospc_after = enospc_after
        self.before_write = before_write
        self.writes = 0

    @property
    def location(self) -> str:
        return self.inner.location

    def _count(self, name: str) -> None:
        if self.before_write is not None:
            self.before_write(name)
        self.writes += 1
        if self.enospc_after is not None and self.writes > self.enospc_after:
            raise StorageFull(f"no space left on the repository's storage while writing "
                              f"{self.location}/{name}",
                              hint=os.strerror(errno.ENOSPC))

    def read(self, name: str) -> bytes:
        return self.inner.read(name)

    def write(self, name: str, data: bytes | bytearray, *, sync_dir: bool = True) -> None:
        self._count(name)
        self.inner.write(name, data, sync_dir=sync_dir)

    def create(self, name: str, data: bytes) -> bool:
        self._count(name)
        return self.inner.create(name, data)

    def exists(self, name: str) -> bool:
        return self.inner.exists(name)

    def list(self, prefix: str) -> Iterator[str]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def touch(self, name: str) -> bool:
        return self.inner.touch(name)

    def stat(self, name: str) -> ObjectStat:
        return self.inner.stat(name)

    def rename(self, src: str, dst: str) -> None:
        self.inner.rename(src, dst)

    def sync_dirs(self, names: Iterable[str]) -> None:
        self.inner.sync_dirs(names)

    def write_batch(self) -> WriteBatch:
        return _FaultyBatch(self, self.inner.write_batch())


class _FaultyBatch:
    """A write batch of a :class:`FaultyBackend`: puts count as writes."""

    def __init__(self, outer: FaultyBackend, inner: WriteBatch) -> None:
        self.outer = outer
        self.inner = inner

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        self.outer._count(name)
        self.inner.put(name, data)

    def commit(self) -> None:
        self.inner.commit()

    def discard(self) -> None:
        self.inner.discard()


def local(path: Path) -> LocalBackend:
    return LocalBackend(path)


def age_files(root: Path, seconds: float = 3600) -> None:
    """Set the mtime of every file under ``root`` back by ``seconds`` (GC tests)."""
    old = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))


class ConformanceFailure(AssertionError):
    """A backend does not behave as the Backend protocol requires."""


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ConformanceFailure(what)


def check_backend(backend: Backend) -> None:
    """The conformance suite every Backend must pass (run it on an empty backend).

    Checks atomic overwrite, exclusive create, recursive sorted listing, touch
    (mtime and the missing case), stat, rename, delete (missing is fine, folders
    recursively), write batches (committed objects are readable, a discarded
    batch leaves no temporary object), missing objects (``ObjectNotFound``) and
    invalid names.
    """
    backend.write("a/b/c", b"hello")
    _expect(backend.read("a/b/c") == b"hello", "read returns what write stored")
    backend.write("a/b/c", bytearray(b"again"))
    _expect(backend.read("a/b/c") == b"again", "write replaces an object")
    _expect(backend.exists("a/b/c") and backend.stat("a/b/c").size == 5, "exists/stat")
    for call in (lambda: backend.read("no/x"), lambda: backend.stat("no/x")):
        try:
            call()
        except ObjectNotFound:
            pass
        else:
            raise ConformanceFailure("a missing object raises ObjectNotFound")
    _expect(not backend.exists("no/x") and backend.touch("no/x") is False, "missing object")
    backend.delete("no/x")
    _expect(backend.create("locks/l", b"1") is True, "create makes a new object")
    _expect(backend.create("locks/l", b"2") is False, "create never replaces")
    _expect(backend.read("locks/l") == b"1", "create keeps the first content")
    for name in ("d/2/y", "d/1/x", "d/1/w"):
        backend.write(name, b"")
    _expect(list(backend.list("d")) == ["d/1/w", "d/1/x", "d/2/y"], "list: recursive, sorted")
    _expect(list(backend.list("nothing")) == [], "list of a missing folder is empty")
    before = backend.stat("d/1/w").mtime
    time.sleep(0.02)
    _expect(backend.touch("d/1/w") and backend.stat("d/1/w").mtime >= before, "touch")
    backend.rename("d/1/w", "e/moved")
    _expect(not backend.exists("d/1/w") and backend.exists("e/moved"), "rename")
    backend.sync_dirs(["e/moved"])
    backend.delete("d")
    _expect(list(backend.list("d")) == [], "delete removes a folder recursively")
    batch = backend.write_batch()
    batch.put("batch/1", b"one")
    batch.put("batch/2", bytearray(b"two"))
    batch.commit()
    _expect(backend.read("batch/1") == b"one" and backend.read("batch/2") == b"two",
            "a committed write batch is readable")
    batch.put("batch/3", b"three")
    batch.discard()
    backend.delete("batch")
    _expect(list(backend.list("tmp")) == [], "no temporary objects left behind")
    for bad in ("", "/abs", "a/../b", "a//b"):
        try:
            backend.read(bad)
        except UsageError:
            continue
        except ObjectNotFound:
            pass
        raise ConformanceFailure(f"invalid name {bad!r} is refused")
