"""Writing a restore point: the chunk pipeline, disk indexes, the manifest.

``SnapshotWriter`` follows the write ordering of docs/design.md: register and
lock (``locks.WriterSession``), write chunks, write each disk's index, write the
manifest last, then unregister. ``abort`` (or leaving a ``with`` block on an
exception) leaves no manifest, so no restore point becomes visible.

``DiskWriter.write_chunk(i, data)`` takes one whole chunk. All-zero data is
recorded as ``ZERO_CHUNK`` and never stored. Anything else goes to a thread pool
(hashlib, the AES-GCM code and zstd release the GIL, so this uses every core)
through a bounded in-flight window, so memory stays at about
``2 x workers x chunk size`` whatever the disk size. A worker computes the
chunk id, asks the *sink* whether the chunk is already stored (which touches
it, the GC mark) and otherwise compresses, seals and stores it.

The sink is the one storage seam (``ChunkSink``): ``has(id)`` (touching),
``has_many(ids)`` (touching; returns the missing ids) and ``put(id, blob)``, plus
``flush()`` to make the puts durable before the index is written. ``StoreSink``
stores into the repository directly (through a server when the repository's
backend is the agent's ``RemoteBackend``); hashing, compression and encryption
always happen here, on the client side.

Incremental writes: ``add_disk(..., base=parent_entry)`` starts from the
parent's chunk ids; every chunk not written is inherited (all of them when the
size is unchanged; for a resized disk only chunks that are whole in both sizes,
the rest is zero unless written). At ``finish`` the inherited chunks are
touched, which protects them from a concurrent GC and proves they still exist:
``has_many`` in batches of ``TOUCH_BATCH`` ids (through a server, one request
per batch instead of one per chunk).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, cast, runtime_checkable

from kura.errors import IntegrityError, KuraError, SnapshotNotFound, UsageError
from kura.repository.index import ZERO_CHUNK, DiskIndex, chunk_count, chunk_length
from kura.repository.locks import WriterSession
from kura.repository.manifest import (
    ConfigEntry,
    DiskEntry,
    Manifest,
    SourceRef,
    check_object_name,
    new_snapshot_id,
)
from kura.repository.store import RepoStore, chunk_name, index_name, manifest_name

log = logging.getLogger(__name__)

_ZEROS: dict[int, bytearray] = {}
# Inherited chunks are touched (``ChunkSink.has_many``) this many ids at a time.
TOUCH_BATCH = 4096


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    z = _ZEROS.get(n)
    if z is None:
        z = _ZEROS[n] = bytearray(n)  # never written to
    # bytearray == any buffer is one memcmp; memoryview == bytes compares byte by
    # byte (6 ms for 4 MiB of zeroes instead of 0.1 ms).
    return z == cast(bytes, data)  # (to mypy: bytearray compares with any buffer)


class ChunkSink(Protocol):
    """Where sealed chunks go (see module docstring)."""

    def has(self, chunk_id: bytes) -> bool: ...

    def has_many(self, chunk_ids: Sequence[bytes]) -> set[bytes]:
        """Touch the stored chunks of ``chunk_ids``; returns the ids that are missing."""
        ...

    def put(self, chunk_id: bytes, blob: bytes | bytearray) -> None: ...

    def flush(self) -> None: ...

    def discard(self) -> None: ...


@runtime_checkable
class ChunkToucher(Protocol):
    """A backend that touches many chunks in one call (the server's, see
    :mod:`kura.agent.remote`); ``touch_chunks`` returns the missing ids."""

    def touch_chunks(self, chunk_ids: Sequence[bytes]) -> set[bytes]: ...


class StoreSink:
    """Stores chunks straight into the repository's backend, durable in batches.

    Chunks go into one backend write batch (``put`` without a per-chunk fsync);
    ``flush`` commits it, so they are durable and visible before the index that
    names them is written. ``has_many`` is one ``touch_chunks`` call on a backend
    that has it (the server's), otherwise a plain loop of touches.
    """

    def __init__(self, store: RepoStore) -> None:
        self.store = store
        self._batch = store.backend.write_batch()

    def has(self, chunk_id: bytes) -> bool:
        return self.store.has_chunk(chunk_id)

    def has_many(self, chunk_ids: Sequence[bytes]) -> set[bytes]:
        backend = self.store.backend
        if isinstance(backend, ChunkToucher):
            return backend.touch_chunks(chunk_ids)
        has = self.store.has_chunk
        return {c for c in chunk_ids if not has(c)}

    def put(self, chunk_id: bytes, blob: bytes | bytearray) -> None:
        self._batch.put(chunk_name(chunk_id), blob)

    def flush(self) -> None:
        self._batch.commit()

    def discard(self) -> None:
        self._batch.discard()


class _Pipeline:
    """The worker pool and chunk-dedup state shared by a snapshot's disks."""

    def __init__(self, store: RepoStore, sink: ChunkSink, workers: int) -> None:
        self.store = store
        self.sink = sink
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kura-chunk")
        self.known: set[bytes] = set()
        self.inflight: dict[bytes, threading.Event] = {}
        self.lock = threading.Lock()

    def ensure(self, chunk_id: bytes, data: bytes | memoryview) -> tuple[bool, int]:
        """Make sure chunk ``chunk_id`` is stored. Returns (reused, bytes stored).

        The same chunk arriving twice at once (a disk full of one pattern) is stored
        once: the second caller waits for the first.
        """
        while True:
            with self.lock:
                if chunk_id in self.known:
                    return True, 0
                event = self.inflight.get(chunk_id)
                if event is None:
                    event = self.inflight[chunk_id] = threading.Event()
                    break
            event.wait()  # then re-check: the first caller may have failed
        try:
            if self.sink.has(chunk_id):
                with self.lock:
                    self.known.add(chunk_id)
                return True, 0
            sealed = self.store.seal_chunk(chunk_id, data)
            self.sink.put(chunk_id, sealed)
            with self.lock:
                self.known.add(chunk_id)
            return False, len(sealed)
        finally:
            with self.lock:
                del self.inflight[chunk_id]
            event.set()

    def process(self, data: bytes | memoryview) -> tuple[bytes, bool, int]:
        chunk_id = self.store.chunk_id(data)
        reused, stored = self.ensure(chunk_id, data)
        return chunk_id, reused, stored

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DiskWriter:
    """Writes the chunks and the index of one disk (see module docstring)."""

    def __init__(self, snapshot: SnapshotWriter, name: str, size: int,
                 base: list[bytes] | None, base_size: int, attrs: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.name = name
        self.size = size
        self.chunk_size = snapshot.store.chunk_size
        self.count = chunk_count(size, self.chunk_size)
        self.attrs = attrs
        self._ids: list[bytes | None] = [None] * self.count
        if base is not None:
            # Same size: everything; resized: only chunks that are whole in both.
            whole = self.count if size == base_size else min(size, base_size) // self.chunk_size
            self._inherit = base[:whole]
        else:
            self._inherit = []
        self._pipe = snapshot._pipeline
        self._cond = threading.Condition()
        self._inflight = 0
        self._max_inflight = 2 * self._pipe.workers
        self._error: BaseException | None = None
        self.entry: DiskEntry | None = None
        self._stats = {"bytes_in": 0, "chunks_written": 0, "chunks_reused": 0,
                       "chunks_zero": 0, "chunks_inherited": 0, "bytes_stored": 0}

    @property
    def stats(self) -> dict[str, int]:
        with self._cond:
            return dict(self._stats)

    def _check_index(self, index: int) -> int:
        if self.entry is not None:
            raise UsageError(f"disk {self.name} is already finished")
        if not 0 <= index < self.count:
            raise UsageError(f"chunk {index} is outside disk {self.name} "
                             f"({self.count} chunks of {self.chunk_size} bytes)")
        return chunk_length(index, self.size, self.chunk_size)

    def _raise_pending(self) -> None:
        if self._error is not None:
            err = self._error
            if isinstance(err, KuraError):
                raise err
            raise IntegrityError(f"writing disk {self.name} failed: {err}") from err

    def set_zero(self, index: int) -> None:
        self._check_index(index)
        self._ids[index] = ZERO_CHUNK
        with self._cond:
            self._stats["chunks_zero"] += 1

    def write_chunk(self, index: int, data: bytes | memoryview,
                    release: Callable[[], None] | None = None) -> None:
        """Store chunk ``index`` (the whole chunk); blocks while the window is full.

        ``data`` is processed later on a worker thread. Pass ``bytes``, or a view of
        a buffer together with ``release``: it is called exactly once, when
        ``data`` is no longer used (stored, found to be a duplicate or zero, or
        refused), and the buffer may be reused from then on.
        """
        try:
            expected = self._check_index(index)
            if len(data) != expected:
                raise UsageError(f"chunk {index} of disk {self.name} has {len(data)} bytes, "
                                 f"expected {expected}")
            with self._cond:
                self._raise_pending()
                self._stats["bytes_in"] += expected
            if is_zero(data):
                self._ids[index] = ZERO_CHUNK
                with self._cond:
                    self._stats["chunks_zero"] += 1
                if release is not None:
                    release()
                return
            with self._cond:
                while self._inflight >= self._max_inflight and self._error is None:
                    self._cond.wait()
                self._raise_pending()
                self._inflight += 1
        except BaseException:
            if release is not None:
                release()
            raise
        try:
            future = self._pipe.pool.submit(self._pipe.process, data)
        except BaseException:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()
            if release is not None:
                release()
            raise
        future.add_done_callback(lambda f: self._done(index, f, release))

    def _done(self, index: int, future: Future[tuple[bytes, bool, int]],
              release: Callable[[], None] | None) -> None:
        if release is not None:
            release()  # the worker is done with the data, whatever the outcome
        with self._cond:
            self._inflight -= 1
            try:
                chunk_id, reused, stored = future.result()
            except BaseException as exc:
                if self._error is None:
                    self._error = exc
            else:
                self._ids[index] = chunk_id
                self._stats["chunks_reused" if reused else "chunks_written"] += 1
                self._stats["bytes_stored"] += stored
            self._cond.notify_all()

    def _wait(self) -> None:
        with self._cond:
            while self._inflight:
                self._cond.wait()
            self._raise_pending()

    def finish(self) -> DiskEntry:
        """Wait for the pipeline, resolve inherited chunks, write the index."""
        if self.entry is not None:
            return self.entry
        self._wait()
        ids: list[bytes] = []
        inherited: list[bytes] = []
        for i, cid in enumerate(self._ids):
            if cid is None:
                if i < len(self._inherit):
                    cid = self._inherit[i]
                    self._stats["chunks_inherited"] += 1
                    if cid != ZERO_CHUNK:
                        inherited.append(cid)
                else:
                    cid = ZERO_CHUNK
                    self._stats["chunks_zero"] += 1
            ids.append(cid)
        self._touch_inherited(inherited)
        self._pipe.sink.flush()
        store = self.snapshot.store
        name, digest = store.write_index(self.snapshot.id, self.name,
                                         DiskIndex(self.size, self.chunk_size, ids))
        self.entry = DiskEntry(name=self.name, size=self.size, chunk_size=self.chunk_size,
                               index=name, index_sha256=digest, chunk_count=self.count,
                               attrs=self.attrs, stats=self.stats)
        return self.entry

    def _touch_inherited(self, inherited: list[bytes]) -> None:
        pipe = self._pipe
        with pipe.lock:
            todo = sorted({c for c in inherited if c not in pipe.known})
        if not todo:
            return
        # In batches of TOUCH_BATCH ids (through a server, one request each): a loop of
        # local touches is cheaper than a thread-pool hand-off per chunk. Several
        # batches still go to the pool (a slow file system or the network in parallel).
        batches = [todo[i:i + TOUCH_BATCH] for i in range(0, len(todo), TOUCH_BATCH)]
        results = ([pipe.sink.has_many(batches[0])] if len(batches) == 1
                   else pipe.pool.map(pipe.sink.has_many, batches))
        gone: set[bytes] = set()
        for r in results:
            gone |= r
        missing = [c for c in todo if c in gone]
        if missing:
            raise IntegrityError(
                f"disk {self.name}: {len(missing)} chunk(s) of the parent restore point are "
                f"missing from the repository (first: {missing[0].hex()})",
                hint="run a full backup (--full); 'kura repo verify' shows the damage")
        with pipe.lock:
            pipe.known.update(todo)


class SnapshotWriter:
    """Writes one restore point; use ``commit()`` or ``abort()`` (or ``with``)."""

    def __init__(self, store: RepoStore, source: SourceRef, *, node: str,
                 parent: Manifest | None, kind: str, reason: str, writer: str | None,
                 sink: ChunkSink | None = None, workers: int | None = None,
                 stale_after: float | None = None, heartbeat: float | None = None) -> None:
        if kind not in ("full", "incremental"):
            raise UsageError(f"restore point kind must be 'full' or 'incremental', not {kind!r}")
        if parent is not None:
            if parent.source.key != source.key:
                raise UsageError(f"parent {parent.id} belongs to source {parent.source.name!r}, "
                                 f"not {source.name!r}")
            if parent.verify_state == "failed":
                raise UsageError(f"parent restore point {parent.id} failed verification; take "
                                 "a full backup")
        self.store = store
        self.source = source
        self.node = node
        self.parent = parent
        self.kind = kind
        self.reason = reason
        self.created = datetime.now(UTC)
        self.id = new_snapshot_id(self.created)
        self.meta: dict[str, Any] = {}
        self._disks: dict[str, DiskWriter] = {}
        self._configs: dict[str, ConfigEntry] = {}
        self._state = "open"
        kwargs: dict[str, float] = {}
        if stale_after is not None:
            kwargs["stale_after"] = stale_after
        if heartbeat is not None:
            kwargs["heartbeat"] = heartbeat
        self._session = WriterSession(store.backend, source.key,
                                      parent=parent.id if parent else None, writer_id=writer,
                                      **kwargs)
        self._session.acquire()
        try:
            if parent is not None and not store.backend.exists(manifest_name(parent.id)):
                raise SnapshotNotFound(
                    f"parent restore point {parent.id} was removed before the backup started",
                    hint="take a full backup")
            self._pipeline = _Pipeline(store, sink or StoreSink(store),
                                       workers or os.cpu_count() or 2)
        except BaseException:
            self._session.release()
            raise
        self.started = time.time()

    @property
    def writer_id(self) -> str:
        return self._session.writer_id

    def _check_open(self) -> None:
        if self._state != "open":
            raise UsageError(f"restore point {self.id} is already {self._state}")

    def add_config(self, name: str, data: bytes) -> None:
        """Store a configuration blob (domain XML, NVRAM...) as deduplicated chunks."""
        self._check_open()
        check_object_name("configuration", name)
        size = self.store.chunk_size
        pieces = [memoryview(data)[i:i + size] for i in range(0, len(data), size)]
        chunks = [cid for cid, _reused, _stored in self._pipeline.pool.map(
            self._pipeline.process, pieces)]
        self._configs[name] = ConfigEntry(name=name, size=len(data), chunks=chunks)

    def add_disk(self, name: str, size: int, *, base: DiskEntry | None = None,
                 attrs: dict[str, Any] | None = None) -> DiskWriter:
        self._check_open()
        check_object_name("disk", name)
        if name in self._disks:
            raise UsageError(f"disk {name} was already added to restore point {self.id}")
        if size < 0:
            raise UsageError(f"disk {name}: negative size {size}")
        base_ids: list[bytes] | None = None
        base_size = 0
        if base is not None:
            if self.parent is None:
                raise UsageError(f"disk {name}: a base disk needs a parent restore point")
            if base.chunk_size != self.store.chunk_size:
                raise UsageError(f"disk {name}: base has another chunk size")
            base_ids = self.store.read_index(self.parent, base).ids
            base_size = base.size
        writer = DiskWriter(self, name, size, base_ids, base_size, dict(attrs or {}))
        self._disks[name] = writer
        return writer

    def commit(self) -> Manifest:
        """Finish every disk, write the manifest (the commit point), unregister."""
        self._check_open()
        writing = False
        try:
            disks = [d.finish() for d in self._disks.values()]
            self._pipeline.sink.flush()
            self._session.check_held()
            consistency = str(self.meta.get(
                "consistency", "offline" if self.source.kind == "image" else "crash"))
            parent = self.parent
            manifest = Manifest(
                id=self.id, repository=self.store.id, source=self.source, created=self.created,
                node=self.node, kind=self.kind, reason=self.reason,
                parent=parent.id if parent else None,
                sequence=parent.sequence + 1 if parent else 0,
                chain=parent.chain if parent else self.id, consistency=consistency,
                meta=dict(self.meta), disks=disks, configs=dict(self._configs))
            writing = True
            self.store.write_manifest(manifest)
        except BaseException:
            # A manifest write that failed may still have landed (an error after the
            # rename, an answer lost on the network): then its indexes must stay.
            self.abort(keep_indexes=writing and self._manifest_may_exist())
            raise
        self._state = "committed"
        self._close()
        return manifest

    def abort(self, *, keep_indexes: bool = False) -> None:
        """Give up: no manifest is written; chunks already stored are left for GC."""
        if self._state != "open":
            return
        self._state = "aborted"
        if keep_indexes:
            log.warning("restore point %s may have been committed (its manifest write failed "
                        "after it may have landed): its indexes are kept", self.id)
        else:
            try:
                self.store.backend.delete(index_name(self.id, "-").rsplit("/", 1)[0])
            except KuraError as exc:
                log.warning("abort of %s: cannot remove its indexes: %s", self.id, exc)
        self._close()
        try:  # chunks staged but never committed: nothing refers to them
            self._pipeline.sink.discard()
        except (KuraError, OSError) as exc:
            log.warning("abort of %s: cannot drop its staged chunks: %s", self.id, exc)

    def _manifest_may_exist(self) -> bool:
        try:
            return self.store.backend.exists(manifest_name(self.id))
        except Exception:  # cannot tell: assume it does
            return True

    def _close(self) -> None:
        self._pipeline.close()
        self._session.release()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()

