"""Writing a restored disk: raw (sparse file) or qcow2 (thin, through qemu-nbd).

Raw images are written by the repository's own restorer: a sparse file,
zero chunks left as holes, written to a temporary name and renamed into
place.

qcow2 images are created empty and thin (``qemu-img create``), served
writable by a private ``qemu-nbd`` started through libnbd's systemd socket
activation (no socket file, no port) with ``--cache=unsafe`` (the image
is a temporary file until it is complete, so QEMU's metadata-ordering flushes
buy nothing; one ``fsync`` after qemu-nbd exits makes it durable before it is
renamed into place), and filled with asynchronous NBD
writes, several in flight on a writer thread while chunks are decrypted and
verified on the repository's reader threads, skipping zero chunks so that unallocated clusters
stay unallocated. The result is flushed before qemu-nbd exits, and written
under a temporary name so that an interrupted restore never leaves a
half-written image under the real name.

In both cases every chunk is checked against its chunk id as it is read
from the repository (:class:`~kura.repository.DiskReader` re-hashes each
plaintext), before a single byte of it is written.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kura.errors import HypervisorError, UsageError
from kura.hypervisor.qemuimg import create_image
from kura.repository import Manifest, Repository

FORMATS = ("raw", "qcow2")


def write_disk(repo: Repository, manifest: Manifest, disk: str, output: Path, fmt: str, *,
               workers: int = 2, inflight: int = 8,
               progress: Callable[[int], None] | None = None) -> int:
    """Restore ``disk`` of ``manifest`` to ``output`` in ``fmt``; returns its size."""
    if fmt not in FORMATS:
        raise UsageError(f"restore format must be raw or qcow2, not {fmt!r}")
    entry = manifest.disk(disk)
    if fmt == "raw":
        repo.restore_disk(manifest, disk, output, progress=progress, workers=workers)
        return entry.size
    tmp = output.parent / f".{output.name}.kura-{uuid.uuid4().hex[:8]}.tmp"
    try:
        create_image(str(tmp), "qcow2", entry.size)
        _fill_qcow2(repo, manifest, disk, tmp, workers=workers, inflight=inflight,
                    progress=progress)
        _fsync(tmp)  # qemu-nbd has exited: make the image durable, then publish it
        os.rename(tmp, output)
        _fsync(output.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return entry.size


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fill_qcow2(repo: Repository, manifest: Manifest, disk: str, path: Path, *, workers: int,
                inflight: int, progress: Callable[[int], None] | None) -> None:
    import nbd

    reader = repo.open_disk(manifest, disk)
    h = nbd.NBD()
    try:
        h.connect_systemd_socket_activation(
            ["qemu-nbd", "-f", "qcow2", "--cache=unsafe", "--aio=threads",
             "--discard=unmap", str(path)])
    except nbd.Error as exc:
        raise HypervisorError(f"cannot open {path} for writing with qemu-nbd: {exc}") from exc
    # libnbd progresses only while polled: the NBD writes run on their own thread,
    # fed through a small queue, while this thread decrypts and verifies chunks.
    handoff: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=inflight)
    failure: list[BaseException] = []

    def writer() -> None:
        pending: deque[tuple[Any, int]] = deque()

        def reap(limit: int) -> None:
            while len(pending) > limit:
                cookie, length = pending[0]
                while not h.aio_command_completed(cookie):
                    h.poll(-1)
                pending.popleft()
                if progress:
                    progress(length)

        try:
            while True:
                item = handoff.get()
                if item is None:
                    break
                reap(inflight - 1)
                pending.append((h.aio_pwrite(item[1], item[0]), len(item[1])))
            reap(0)
        except BaseException as exc:  # reported to the reading thread
            failure.append(exc)
            while handoff.get() is not None:  # unblock the producer
                pass

    thread = threading.Thread(target=writer, name="kura-nbd-write", daemon=True)
    thread.start()
    try:
        for offset, data in reader.iter_chunks(workers=workers):
            if failure:
                break
            if data is None:
                if progress:
                    progress(min(reader.chunk_size, reader.size - offset))
                continue
            handoff.put((offset, data))
    finally:
        handoff.put(None)
        thread.join()
    if failure:
        raise HypervisorError(f"writing {path} failed: {failure[0]}") from failure[0]
    try:
        h.shutdown()
    except nbd.Error as exc:
        raise HypervisorError(f"closing {path} failed: {exc}") from exc
    # Dropping the handle closes it and reaps qemu-nbd.
