"""Reading restore points: random access and parallel streaming restore.

``DiskReader`` reads one disk of one restore point through its index. Every
chunk is opened (authenticated, decompressed) and re-hashed against its id; a
failure is an ``IntegrityError`` naming the restore point, the disk and the
byte range, so a reader never returns wrong data. ``pread`` serves random
access (instant recovery and file-level restore read through it) with a small
cache of recently used chunks; ``iter_chunks`` streams the disk in order with a
bounded window of chunks fetched in parallel.

``write_chunks`` is the restore loop every output format shares: worker
threads each take the next chunk, read, open and verify it and hand its
plaintext straight to a *sink* that writes it (no hand-off to a single writer
thread, no copy, no in-order window); memory stays at about ``workers`` chunks.
``nonzero_runs`` finds the 64 KiB granules of a chunk that hold data, so that
writers leave the zero ones unwritten (holes) even inside data chunks: a chunk
that an incremental backup re-read whole for a 1 MiB change is mostly zeros on
a thin disk. ``start_writeback`` lets the disk write while later chunks are
still being verified.

``restore_disk`` writes a disk to a raw file: created under a temporary name
beside the target, sized with ``ftruncate`` so all-zero chunks and granules
stay holes, filled by worker threads with ``pwritev`` of each chunk's data
runs, fsynced and renamed into place. A block device is written in place
(zeros included).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import threading
import uuid
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from kura.errors import IntegrityError, KuraError, RepositoryError, StorageFull
from kura.repository.backend import fsync_dir
from kura.repository.index import ZERO_CHUNK, chunk_length
from kura.repository.manifest import DiskEntry, Manifest
from kura.repository.store import RepoStore

ProgressFn = Callable[[int], None]


class DiskReader:
    """Random and streaming access to one disk of a restore point."""

    def __init__(self, store: RepoStore, manifest: Manifest, disk: DiskEntry, *,
                 cache_chunks: int = 4) -> None:
        self.store = store
        self.manifest = manifest
        self.disk = disk
        self.size = disk.size
        self.chunk_size = disk.chunk_size
        self.ids = store.read_index(manifest, disk).ids
        self._cache: OrderedDict[int, bytes | None] = OrderedDict()
        self._cache_max = cache_chunks
        self._lock = threading.Lock()

    def describe_range(self, index: int) -> str:
        start = index * self.chunk_size
        end = start + chunk_length(index, self.size, self.chunk_size)
        return (f"restore point {self.manifest.id} ({self.manifest.source.name}), disk "
                f"{self.disk.name}, bytes {start}-{end}")

    def read_chunk(self, index: int) -> bytes | None:
        """Plaintext of chunk ``index``, or None for an all-zero chunk."""
        chunk_id = self.ids[index]
        if chunk_id == ZERO_CHUNK:
            return None
        try:
            return self.store.read_chunk(
                chunk_id, expected_len=chunk_length(index, self.size, self.chunk_size))
        except IntegrityError as exc:
            raise IntegrityError(f"{self.describe_range(index)}: {exc.message}") from None

    def _cached(self, index: int) -> bytes | None:
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        data = self.read_chunk(index)
        with self._lock:
            self._cache[index] = data
            while len(self._cache) > self._cache_max:
                self._cache.popitem(last=False)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer at the end of the disk)."""
        if offset < 0 or length < 0:
            raise ValueError("negative offset or length")
        end = min(self.size, offset + length)
        parts: list[bytes] = []
        pos = offset
        while pos < end:
            index = pos // self.chunk_size
            start = index * self.chunk_size
            clen = chunk_length(index, self.size, self.chunk_size)
            take = min(end, start + clen) - pos
            data = self._cached(index)
            if data is None:
                parts.append(bytes(take))
            else:
                parts.append(data[pos - start: pos - start + take])
            pos += take
        return b"".join(parts)

    def iter_chunks(self, workers: int = 2) -> Iterator[tuple[int, bytes | None]]:
        """(offset, data or None for zeros) for every chunk, in order, prefetched."""
        window = max(1, 2 * workers)
        with ThreadPoolExecutor(max_workers=max(1, workers),
                                thread_name_prefix="kura-read") as pool:
            pending: deque[tuple[int, Future[bytes | None]]] = deque()
            next_index = 0
            try:
                while next_index < len(self.ids) or pending:
                    while next_index < len(self.ids) and len(pending) < window:
                        pending.append((next_index, pool.submit(self.read_chunk, next_index)))
                        next_index += 1
                    index, fut = pending.popleft()
                    yield index * self.chunk_size, fut.result()
            finally:
                for _i, fut in pending:
                    fut.cancel()


#: Granularity of the zero detection inside a chunk: the qcow2 cluster size kura writes.
GRANULE = 64 << 10
_ZEROS = bytes(GRANULE)

ChunkSink = Callable[[int, bytes | None], None]


def nonzero_runs(data: bytes, granule: int = GRANULE) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of ``data`` made of granules that are not all zero.

    Granules start at multiples of ``granule`` (at most 64 KiB); the last one may
    be shorter. Adjacent data granules form one run.
    """
    zeros = _ZEROS if granule == GRANULE else bytes(granule)
    runs: list[tuple[int, int]] = []
    size = len(data)
    pos = 0
    while pos < size:
        end = min(size, pos + granule)
        # startswith compares in place (memcmp): no slice copy of the chunk.
        if not data.startswith(zeros[: end - pos], pos):
            if runs and runs[-1][1] == pos:
                runs[-1] = (runs[-1][0], end)
            else:
                runs.append((pos, end))
        pos = end
    return runs


def pwritev_all(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write ``buffers`` contiguously at ``offset``, resuming after short writes."""
    while buffers:
        n = os.pwritev(fd, buffers[:1024], offset)  # IOV_MAX
        offset += n
        while buffers and n >= len(buffers[0]):
            n -= len(buffers[0])
            buffers = buffers[1:]
        if n:
            buffers = [buffers[0][n:], *buffers[1:]]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes at ``offset`` back to the disk, without waiting.

    A restored image is far below the kernel's dirty-page limits, so otherwise
    all of it would be written by the final ``fsync``, after the last chunk.
    ``POSIX_FADV_DONTNEED`` starts asynchronous writeback of the range's dirty
    pages (and keeps them until written): the disk writes while later chunks
    are still being read and verified.
    """
    with contextlib.suppress(OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def write_chunks(reader: DiskReader, sink: ChunkSink, *, workers: int,
                 progress: ProgressFn | None = None, zeros: bool = False) -> None:
    """Read and verify every chunk on ``workers`` threads and pass it to ``sink``.

    ``sink(index, plaintext)`` runs on the worker thread that verified the
    chunk, concurrently with other chunks, in no particular order: each worker
    takes the next chunk as soon as it is done with one (no in-order window in
    which a slow read stalls the others). All-zero chunks are passed (as None)
    only with ``zeros``; otherwise they are not read, and counted in the
    progress with the next data chunk (or at the end). The first exception
    (from reading, verifying or the sink) stops the workers, and is raised here
    once every worker has finished its chunk: the caller may close the output.
    """
    size, chunk = reader.size, reader.chunk_size
    todo = array("q")  # the chunks to read, in disk order
    lead = array("q")  # for each: bytes of the zero chunks just before it
    zero_run = 0
    for index, chunk_id in enumerate(reader.ids):
        if chunk_id == ZERO_CHUNK and not zeros:
            zero_run += chunk_length(index, size, chunk)
            continue
        todo.append(index)
        lead.append(zero_run)
        zero_run = 0
    next_todo = iter(range(len(todo)))
    take = threading.Lock()
    stop = threading.Event()
    done: queue.SimpleQueue[int | BaseException | None] = queue.SimpleQueue()

    def work() -> None:
        try:
            while not stop.is_set():
                with take:
                    n = next(next_todo, None)
                if n is None:
                    break
                sink(todo[n], reader.read_chunk(todo[n]))
                done.put(n)
        except BaseException as exc:  # raised by the calling thread
            stop.set()
            done.put(exc)
        finally:
            done.put(None)

    threads = [threading.Thread(target=work, name=f"kura-restore-{n}", daemon=True)
               for n in range(max(1, min(workers, len(todo))) if todo else 0)]
    error: BaseException | None = None
    try:
        for t in threads:
            t.start()
        running = len(threads)
        while running:
            item = done.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                error = error or item
            elif progress and error is None:
                progress(lead[item] + chunk_length(todo[item], size, chunk))
    finally:
        stop.set()
        for t in threads:
            t.join()
    if error is not None:
        raise error
    if progress and zero_run:
        progress(zero_run)


def _open_target(output: Path) -> tuple[int, Path | None, bool]:
    """(fd, temporary path or None when writing in place, is a block device)."""
    try:
        st = os.stat(output)
        if stat.S_ISBLK(st.st_mode):
            return os.open(output, os.O_WRONLY), None, True
    except FileNotFoundError:
        pass
    tmp = output.parent / f".{output.name}.kura-{uuid.uuid4().hex[:8]}.tmp"
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), tmp, False


def write_error(exc: OSError, output: Path) -> KuraError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left on the device of {output} while restoring",
                           hint="free space or restore elsewhere")
    return RepositoryError(f"cannot write {output}: {exc.strerror or exc}")


def restore_disk(reader: DiskReader, output: Path, *, workers: int = 2,
                 progress: ProgressFn | None = None) -> None:
    """Write the disk to ``output`` (raw, sparse); see the module docstring."""
    try:
        fd, tmp, is_block = _open_target(output)
    except OSError as exc:
        raise write_error(exc, output) from None
    try:
        if not is_block:
            os.ftruncate(fd, reader.size)

        def sink(index: int, data: bytes | None) -> None:
            offset = index * reader.chunk_size
            if data is None:  # only for a block device: its old content must go
                length = chunk_length(index, reader.size, reader.chunk_size)
                pwritev_all(fd, [memoryview(bytes(length))], offset)
                return
            view = memoryview(data)
            if is_block:
                pwritev_all(fd, [view], offset)
                start_writeback(fd, offset, len(data))
                return
            for start, end in nonzero_runs(data):
                pwritev_all(fd, [view[start:end]], offset + start)
            start_writeback(fd, offset, len(data))

        write_chunks(reader, sink, workers=workers, progress=progress, zeros=is_block)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        if tmp is not None:
            os.rename(tmp, output)
            fsync_dir(output.parent)
            tmp = None
    except OSError as exc:
        raise write_error(exc, output) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
