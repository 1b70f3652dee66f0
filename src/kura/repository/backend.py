"""Storage backends: where a repository's objects live.

A backend stores named objects ("chunks/ab/ab12...", "snapshots/X.manifest").
Names are relative, ``/``-separated, and never contain ``..``. The repository
relies on these operations only:

- ``read(name)`` the whole object, ``ObjectNotFound`` if absent;
- ``write(name, data)`` atomically: the object is either absent/old or
  complete and durable, never partial. The local backend writes ``tmp/<random>``,
  fsyncs it, renames it into place and (unless ``sync_dir=False``) fsyncs the
  directory; ``sync_dirs`` later makes a batch of renames durable at once
  (the local backend fsyncs their directories in parallel);
- ``write_batch()`` a :class:`WriteBatch` for many objects (chunks) made durable
  together: ``put`` stages an object (the local backend writes ``tmp/<random>``
  without an fsync; the object is not visible yet), ``commit`` makes every
  staged object durable and then visible (fsync the staged files from several
  threads, rename them into place, fsync their directories), ``discard`` drops
  what is staged. Only a committed object is ever visible, and it is complete;
  the writer commits before it writes an index or manifest that names it;
- ``create(name, data)`` the same, but only if ``name`` does not exist yet
  (the primitive under locks); returns False when it already existed;
- ``exists``, ``list(prefix)`` (every object name under a folder, recursively),
  ``delete`` (missing is fine), ``rename``;
- ``touch(name)`` sets the object's mtime to now and returns False when the
  object is missing: the existence check and the GC "in use" mark in one call;
- ``stat(name)`` mtime and size.

A full disk (ENOSPC/EDQUOT) becomes ``StorageFull`` naming the object; any
other OS error becomes ``RepositoryError`` naming the path. An object-storage
backend implements the same protocol (``create`` maps to a conditional put).
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable
from urllib.parse import unquote, urlparse

from kura.errors import IntegrityError, RepositoryError, StorageFull, UsageError

TMP_DIR = "tmp"
T = TypeVar("T")
# Directory fsyncs issued at once by ``LocalBackend.sync_dirs``, and file fsyncs
# issued at once by a write batch's commit.
_SYNC_THREADS = 32
# A local write batch commits by itself once it holds this many staged objects, so
# that chunks become visible (deduplicated across writers) within a few seconds
# and a crash leaves few temporary files; the directory fsyncs of a commit are
# shared by its objects.
BATCH_OBJECTS = 64


class ObjectNotFound(IntegrityError):
    """An object the repository expected is missing from the backend."""

    def __init__(self, name: str, location: str) -> None:
        super().__init__(f"object {name} is missing from the repository at {location}")
        self.name = name


@dataclass(frozen=True)
class ObjectStat:
    mtime: float
    size: int


@runtime_checkable
class Backend(Protocol):
    """The storage interface a repository is built on (see module docstring)."""

    @property
    def location(self) -> str: ...

    def read(self, name: str) -> bytes: ...

    def write(self, name: str, data: bytes | bytearray, *, sync_dir: bool = True) -> None: ...

    def create(self, name: str, data: bytes) -> bool: ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[str]: ...

    def delete(self, name: str) -> None: ...

    def touch(self, name: str) -> bool: ...

    def stat(self, name: str) -> ObjectStat: ...

    def rename(self, src: str, dst: str) -> None: ...

    def sync_dirs(self, names: Iterable[str]) -> None: ...

    def write_batch(self) -> WriteBatch: ...


@runtime_checkable
class WriteBatch(Protocol):
    """Objects written together and made durable at once (see module docstring).

    ``put`` may be called from several threads; ``commit`` returns once every object
    put before it was called is durable and visible (or raises). A batch may be
    committed many times; after a failed commit it keeps failing.
    """

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def commit(self) -> None: ...

    def discard(self) -> None: ...


def _check_name(name: str) -> None:
    parts = name.split("/")
    if (not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts)
            or any(ord(c) < 32 for c in name) or len(name) > 1024):
        raise UsageError(f"invalid repository object name {name!r}")



def _write_direct(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to the empty file ``fd`` (opened with O_DIRECT), then cut it to size.

    Chunks are written once and rarely read back soon, so they bypass the page
    cache: a buffered write copies every byte into newly allocated cache pages (the
    largest CPU cost of storing a chunk on a busy host) and leaves them for the
    kernel to write back. O_DIRECT needs an aligned buffer and length, so the data
    goes through a reused page-aligned buffer, padded with zeros to a whole block;
    ``ftruncate`` then gives the file its exact size. Durability still comes from
    the fsync that follows (the size, the block allocation, the device cache).
    """
    size = len(data)
    padded = -(-size // DIRECT_ALIGN) * DIRECT_ALIGN
    buf = _BUFFERS.take(padded)
    try:
        view = memoryview(buf)
        view[:size] = data
        view[size:padded] = bytes(padded - size)
        done = 0
        while done < padded:
            # A short write ends on a block boundary; the rest stays aligned.
            done += os.write(fd, view[done:padded])
        view.release()
        if padded != size:
            os.ftruncate(fd, size)
    finally:
        _BUFFERS.give(buf)


class _BufferPool:
    """Page-aligned buffers (anonymous mmaps) for O_DIRECT writes, kept for reuse."""

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= size:
                    return self._free.pop(i)
        return mmap.mmap(-1, max(size, DIRECT_BUFFER))

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)
                return
        buf.close()


# O_DIRECT: objects from this size on, the alignment of buffer, length and offset,
# the usual buffer size (a 4 MiB chunk and its blob header), and how many to keep.
DIRECT_MIN = 64 << 10
DIRECT_ALIGN = 4096
DIRECT_BUFFER = (4 << 20) + DIRECT_ALIGN
_BUFFERS = _BufferPool(keep=8)


_SYNC_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (the owning pid, the pool)
_SYNC_POOL_LOCK = threading.Lock()


def _sync_pool() -> ThreadPoolExecutor:
    """The process's fsync threads: started on first use and kept (a commit used to
    start and stop its own: ~300 thread starts in one server job of 8 VMs). A forked
    child, which has none of its parent's threads, starts its own."""
    global _SYNC_POOL
    with _SYNC_POOL_LOCK:
        if _SYNC_POOL is None or _SYNC_POOL[0] != os.getpid():
            _SYNC_POOL = (os.getpid(), ThreadPoolExecutor(max_workers=_SYNC_THREADS,
                                                          thread_name_prefix="kura-fsync"))
        return _SYNC_POOL[1]


def _all_at_once(fn: Callable[[T], None], items: Sequence[T]) -> None:
    """``fn(item)`` for every item, up to ``_SYNC_THREADS`` at once (concurrent fsyncs
    share the file system's journal commits); waits for all, raises the first failure.

    ``fn`` must not itself wait for this pool (it would wait for its own threads)."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    futures = [_sync_pool().submit(fn, item) for item in items]
    wait(futures)
    for f in futures:
        f.result()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (names created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _into_place(op: Callable[[Path, Path], None], tmp: Path, path: Path) -> None:
    """``op(tmp, path)`` (rename or link), creating ``path``'s folder on first use."""
    try:
        op(tmp, path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        op(tmp, path)

class LocalBackend:
    """A repository in a directory of a local or shared POSIX file system."""

    def __init__(self, root: str | os.PathLike[str], *, direct: bool = True) -> None:
        self.root = Path(root)
        # Large objects (chunks) are written with O_DIRECT where the file system allows.
        self._direct = direct and hasattr(os, "O_DIRECT")

    @property
    def location(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalBackend({str(self.root)!r})"

    # -- helpers -----------------------------------------------------------

    def _path(self, name: str) -> Path:
        _check_name(name)
        return self.root / name

    def _fail(self, exc: OSError, name: str, action: str) -> RepositoryError:
        path = self.root / name
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageFull(
                f"no space left on the repository's storage while {action} {path}",
                hint="free space or move the repository; existing restore points are intact",
            )
        return RepositoryError(f"cannot {action.split()[0]} {path}: {exc.strerror or exc}")

    def _open_tmp(self, flags: int) -> tuple[Path, int]:
        tmp_dir = self.root / TMP_DIR
        tmp = tmp_dir / f"{uuid.uuid4().hex}.tmp"
        flags |= os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            return tmp, os.open(tmp, flags, 0o600)
        except FileNotFoundError:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            return tmp, os.open(tmp, flags, 0o600)

    def _write_tmp(self, name: str, data: bytes | bytearray | memoryview, *,
                   sync: bool = True) -> Path:
        if self._direct and len(data) >= DIRECT_MIN:
            try:
                tmp, fd = self._open_tmp(os.O_DIRECT)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # the file system has no O_DIRECT (tmpfs, some FUSE)
            else:
                try:
                    return self._fill(tmp, fd, data, sync, direct=True)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._direct = False  # opened, but refused aligned writes
        tmp, fd = self._open_tmp(0)
        return self._fill(tmp, fd, data, sync, direct=False)

    def _fill(self, tmp: Path, fd: int, data: bytes | bytearray | memoryview, sync: bool,
              *, direct: bool) -> Path:
        try:
            if direct:
                _write_direct(fd, data)
            else:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if sync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    # -- the protocol --------------------------------------------------------

    def read(self, name: str) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(name, self.location) from None
        except IsADirectoryError:
            raise ObjectNotFound(name, self.location) from None
        except OSError as exc:
            raise self._fail(exc, name, "reading") from exc

    def write(self, name: str, data: bytes | bytearray, *, sync_dir: bool = True) -> None:
        path = self._path(name)
        try:
            tmp = self._write_tmp(name, data)
            try:
                _into_place(os.rename, tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            if sync_dir:
                fsync_dir(path.parent)
        except OSError as exc:
            raise self._fail(exc, name, "writing") from exc

    def create(self, name: str, data: bytes) -> bool:
        path = self._path(name)
        try:
            tmp = self._write_tmp(name, data)
            try:
                _into_place(os.link, tmp, path)
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                return self._create_excl(path, data)  # no hard links (some FUSE/SMB)
            finally:
                tmp.unlink(missing_ok=True)
            fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise self._fail(exc, name, "creating") from exc

    def _create_excl(self, path: Path, data: bytes) -> bool:
        # Not atomic for readers (a lock may be seen empty for a moment; lock readers
        # then judge it by its mtime), but still exclusive.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        return True

    def exists(self, name: str) -> bool:
        return self._path(name).exists()

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix)

        def walk(directory: Path, rel: str) -> Iterator[str]:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                return
            except OSError as exc:
                raise self._fail(exc, rel, "listing") from exc
            for entry in sorted(entries, key=lambda e: e.name):
                child = f"{rel}/{entry.name}"
                if entry.is_dir(follow_symlinks=False):
                    yield from walk(Path(entry.path), child)
                else:
                    yield child

        yield from walk(base, prefix.rstrip("/"))

    def delete(self, name: str) -> None:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            for child in sorted(path.rglob("*"), reverse=True):
                if child.is_dir():
                    child.rmdir()
                else:
                    child.unlink()
            path.rmdir()
        except OSError as exc:
            raise self._fail(exc, name, "deleting") from exc

    def touch(self, name: str) -> bool:
        try:
            os.utime(self._path(name))
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise self._fail(exc, name, "touching") from exc

    def stat(self, name: str) -> ObjectStat:
        try:
            st = os.stat(self._path(name))
        except FileNotFoundError:
            raise ObjectNotFound(name, self.location) from None
        except OSError as exc:
            raise self._fail(exc, name, "examining") from exc
        return ObjectStat(mtime=st.st_mtime, size=st.st_size)

    def rename(self, src: str, dst: str) -> None:
        dst_path = self._path(dst)
        try:
            try:
                os.rename(self._path(src), dst_path)
            except FileNotFoundError:
                if not self._path(src).exists():
                    raise ObjectNotFound(src, self.location) from None
                dst_path.parent.mkdir(parents=True, exist_ok=True)
                os.rename(self._path(src), dst_path)
        except ObjectNotFound:
            raise
        except OSError as exc:
            raise self._fail(exc, src, "renaming") from exc

    def sync_dirs(self, names: Iterable[str]) -> None:
        """fsync the directory of every name, several at once.

        A directory fsync can wait for a journal commit. One at a time those
        waits add up while other writers keep the journal busy (0.86 s for the
        256 chunk directories of a 1 GiB backup in one profiled run, against
        0.04 s on a quiet disk); issued together they share commits. Every
        fsync is waited for, and the first failure is raised.
        """
        _all_at_once(self._sync_one, sorted({self._path(n).parent for n in names}))

    def _sync_one(self, d: Path) -> None:
        try:
            fsync_dir(d)
        except OSError as exc:
            raise self._fail(exc, str(d.relative_to(self.root)), "syncing") from exc

    def make_dirs(self, names: Iterable[str]) -> None:
        """Create the folders ``names`` (and their parents) now and make them durable,
        rather than one at a time on first use (``Repository.init``: ``tmp/`` and the
        256 chunk folders, which a first backup would otherwise create mid-stream)."""
        parents: dict[Path, str] = {}
        for name in names:
            path = self._path(name)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._fail(exc, name, "creating") from exc
            parents.setdefault(path.parent, name)
        for parent, name in sorted(parents.items()):
            try:
                fsync_dir(parent)
            except OSError as exc:
                raise self._fail(exc, name, "creating") from exc

    def write_batch(self, *, limit: int = BATCH_OBJECTS) -> LocalWriteBatch:
        return LocalWriteBatch(self, limit=limit)


class LocalWriteBatch:
    """Group commit for a :class:`LocalBackend` (see :class:`WriteBatch`).

    ``put`` writes the object to ``tmp/`` without an fsync. ``commit`` fsyncs the
    staged files from up to ``_SYNC_THREADS`` threads (concurrent fsyncs share the
    file system's journal commits, and the data may already have been written back
    by the kernel meanwhile), renames each into place once all are durable, then
    fsyncs their directories (``sync_dirs``). Until then nothing is visible, so a
    crash leaves only temporary files, which GC removes. Commits run one at a
    time: ``commit`` waits for a commit another thread started, so when it returns
    every object put before it is durable. A ``put`` that fills the batch to
    ``limit`` objects commits them in the putting thread.
    """

    def __init__(self, backend: LocalBackend, *, limit: int = BATCH_OBJECTS) -> None:
        self._backend = backend
        self._limit = limit
        self._staged: list[tuple[Path, str]] = []
        self._lock = threading.Lock()          # guards _staged
        self._commit_lock = threading.Lock()   # one commit at a time
        self._failed: RepositoryError | None = None

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        be = self._backend
        be._path(name)  # check the name before anything is written
        try:
            tmp = be._write_tmp(name, data, sync=False)
        except OSError as exc:
            raise be._fail(exc, name, "writing") from exc
        with self._lock:
            self._staged.append((tmp, name))
            full = self._limit > 0 and len(self._staged) >= self._limit
        if full:
            self.commit()

    def commit(self) -> None:
        with self._commit_lock:
            if self._failed is not None:
                raise self._failed
            with self._lock:
                staged, self._staged = self._staged, []
            if not staged:
                return
            try:
                self._commit(staged)
            except RepositoryError as exc:
                self._failed = exc
                raise

    def _commit(self, staged: list[tuple[Path, str]]) -> None:
        be = self._backend
        done = 0
        try:
            self._sync_files(staged)
            for tmp, name in staged:
                try:
                    _into_place(os.rename, tmp, be.root / name)
                except OSError as exc:
                    raise be._fail(exc, name, "writing") from exc
                done += 1
        finally:
            for tmp, _name in staged[done:]:
                tmp.unlink(missing_ok=True)
        be.sync_dirs(name for _tmp, name in staged)

    def _sync_files(self, staged: list[tuple[Path, str]]) -> None:
        def sync(item: tuple[Path, str]) -> None:
            tmp, name = item
            try:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise self._backend._fail(exc, name, "writing") from exc
        _all_at_once(sync, staged)

    def discard(self) -> None:
        """Drop every staged object (nothing of it was visible)."""
        with self._lock:
            staged, self._staged = self._staged, []
        for tmp, _name in staged:
            tmp.unlink(missing_ok=True)


def open_backend(location: str | os.PathLike[str] | Backend) -> Backend:
    """The backend for a location: a plain path or a ``file://`` URL."""
    if isinstance(location, Backend):
        return location
    text = os.fspath(location)
    if "://" in text:
        url = urlparse(text)
        if url.scheme != "file":
            raise UsageError(
                f"unsupported repository location {text!r}",
                hint="use a directory path or a file:// URL",
            )
        if url.netloc not in ("", "localhost"):
            raise UsageError(f"file:// URL with a host is not supported: {text!r}")
        text = unquote(url.path)
    if not text:
        raise UsageError("empty repository location")
    return LocalBackend(Path(text).expanduser())
