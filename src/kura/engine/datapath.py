"""Phase 5, the data path: NBD export → chunks → repository.

For each disk the chunk list comes from the export's meta contexts: for a
full read, every chunk that touches an allocated, non-zero extent
(``base:allocation``); for an incremental, every chunk that touches a dirty
extent (``qemu:dirty-bitmap:backup-<dev>``). Chunks outside the list are zero
(full) or inherited from the parent's index (incremental), so both produce a
complete image.

Chunks are read with several NBD requests in flight on each of two
connections where the export allows it (libnbd's asynchronous API, a reader
thread per connection, each reading one half of the chunk list; see ``copy``)
straight into pooled chunk buffers (no copy), and handed to the disk writer,
whose thread pool hashes, compresses, encrypts and stores them on every core;
the writer gives each buffer back to the pool once its chunk is stored. Both
sides are bounded, so memory stays near ``(2 x inflight + 2 x workers) x chunk
size`` whatever the disk size.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from kura.nbd import NbdSource
from kura.repository import DiskWriter


@dataclass(frozen=True)
class ReadPlan:
    target: str
    mode: str  # "full" or "incremental"
    indexes: list[int]
    chunk_size: int
    size: int

    @property
    def bytes(self) -> int:
        total = 0
        for i in self.indexes:
            total += min(self.chunk_size, self.size - i * self.chunk_size)
        return total


def read_plan(src: NbdSource, target: str, mode: str, chunk_size: int) -> ReadPlan:
    """Which chunks of ``src`` must be read for a ``mode`` backup."""
    incremental = mode == "incremental"
    indexes = src.dirty_chunks(chunk_size) if incremental else src.data_chunks(chunk_size)
    return ReadPlan(target, mode, indexes, chunk_size, src.size)


_END = object()


# Below this many chunks a second connection is not worth opening.
_SPLIT_MIN = 8


def copy(src: NbdSource, writer: DiskWriter, plan: ReadPlan, *, inflight: int,
         on_bytes: Callable[[int], None] | None = None, connections: int = 2) -> int:
    """Read the planned chunks and write them; returns the bytes read.

    libnbd makes progress only while its caller polls, so reading runs on its
    own thread and hands chunks over through a small queue: NBD requests keep
    flowing while the writer's window is full, and the writer's threads keep
    hashing while the next chunks arrive.

    With ``connections=2`` and an export that takes a second client (libvirt's
    pull-mode export does; a private qemu-nbd does not), the chunk list is cut
    in two halves, each read in order on its own connection and thread, the
    ``inflight`` window shared between them. Two requests streams read faster
    than one, and the halves of a disk often differ (data that compresses next
    to data that does not), so the cores compress one while the other is read.
    """
    indexes = plan.indexes
    extra = src.connect_again() if connections > 1 and len(indexes) >= _SPLIT_MIN else None
    if extra is None:
        parts = [(src, indexes)]
    else:
        half = len(indexes) // 2
        parts = [(src, indexes[:half]), (extra, indexes[half:])]
    window = max(1, -(-inflight // len(parts)))
    handoff: queue.Queue[object] = queue.Queue(maxsize=inflight)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def reader(source: NbdSource, part: list[int]) -> None:
        try:
            for item in source.read_buffers(part, plan.chunk_size, inflight=window):
                if not put(item):
                    item[2]()
                    return
            put(_END)
        except BaseException as exc:  # handed to the writing thread, which raises it
            put(exc)

    threads = [threading.Thread(target=reader, args=part, name=f"kura-nbd-read-{i}",
                                daemon=True) for i, part in enumerate(parts)]
    for thread in threads:
        thread.start()
    done = 0
    running = len(threads)
    try:
        while running:
            item = handoff.get()
            if item is _END:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            index, data, release = cast(tuple[int, memoryview, Callable[[], None]], item)
            size = len(data)
            writer.write_chunk(index, data, release)
            done += size
            if on_bytes is not None:
                on_bytes(size)
    finally:
        stop.set()
        while any(t.is_alive() for t in threads):
            with contextlib.suppress(queue.Empty):
                _release(handoff.get(timeout=0.05))
        for thread in threads:
            thread.join()
        while True:
            try:
                _release(handoff.get_nowait())
            except queue.Empty:
                break
        if extra is not None:
            extra.close()
    return done


def _release(item: object) -> None:
    """Give a chunk buffer that will not be written back to its pool."""
    if isinstance(item, tuple):
        item[2]()
