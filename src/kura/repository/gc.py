"""Garbage collection: free chunks that no restore point references.

Safe while backups run (any number of writers on any number of nodes):

1. Take ``locks/gc.lock``; note the start time T0. Put back any chunk a crashed
   GC left in ``trash/`` (it may have been touched by a writer just before).
2. Read the live writer registrations. The *cutoff* is
   ``min(T0, oldest live writer's start) - grace - 2 s`` (the 2 s cover coarse
   file system timestamps, which lag the clock a writer reads its start from).
3. Mark: every chunk named by the index of a disk or by a configuration of a
   committed manifest. A manifest or index that cannot be read aborts GC: its
   chunks are unknown, and deleting them could destroy a restore point.
4. Sweep every unmarked chunk whose mtime is older than the cutoff: rename it to
   ``trash/``, re-read its mtime (a writer may have touched it between the stat
   and the rename: then it goes back), then delete it.

Why an in-flight backup never loses a chunk: a writer touches (``has``) or
writes every chunk it references after it registered, including the chunks it
inherits from its parent, so their mtime is newer than its start and so than the
cutoff. A touch that races with the rename either lands before it (seen by the
re-check) or fails because the chunk is gone, and then the writer stores it
again. Writers that register after T0 are newer than the cutoff anyway.

GC also removes temporary files, index folders without a manifest (from
aborted or killed backups) older than the cutoff, and registrations of dead
writers. Prune removes manifests; only GC frees space.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from kura.errors import KuraError, RepositoryError
from kura.repository.backend import TMP_DIR as TMP
from kura.repository.backend import ObjectNotFound
from kura.repository.locks import (
    GC_LOCK,
    HOST,
    PIDNS,
    acquire_lock,
    dead_registrations,
    live_writers,
)
from kura.repository.store import (
    CHUNKS_DIR,
    INDEXES_DIR,
    RepoStore,
    chunk_name,
    manifest_name,
)

log = logging.getLogger(__name__)

TRASH_DIR = "trash"
DEFAULT_GRACE = 300
# File systems stamp mtimes from a coarse clock (a few ms behind time.time(); FAT
# and some NAS keep 2 s steps): always keep this much on top of the grace period.
CLOCK_SLACK = 2.0


@dataclass
class GcResult:
    dry_run: bool
    cutoff: float
    snapshots: int = 0
    chunks_total: int = 0
    chunks_referenced: int = 0
    chunks_removed: int = 0
    bytes_removed: int = 0
    chunks_recent: int = 0
    indexes_removed: int = 0
    tmp_removed: int = 0
    writers_removed: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _mark(store: RepoStore) -> tuple[set[bytes], set[str]]:
    referenced: set[bytes] = set()
    snapshot_ids = set(store.list_snapshot_ids())
    for sid in sorted(snapshot_ids):
        try:
            manifest = store.load_manifest(sid, with_notes=False)
            for disk in manifest.disks:
                referenced.update(store.read_index(manifest, disk).ids)
        except KuraError as exc:
            if not store.backend.exists(manifest_name(sid)):
                continue  # removed by a concurrent prune
            raise RepositoryError(
                f"garbage collection stopped: cannot read restore point {sid} ({exc.message}); "
                "its chunks would be deleted",
                hint="run 'kura repo verify' and remove or repair the damaged restore point "
                     "first") from None
        for entry in manifest.configs.values():
            referenced.update(entry.chunks)
    return referenced, snapshot_ids


def _restore_trash(store: RepoStore) -> None:
    backend = store.backend
    for name in list(backend.list(TRASH_DIR)):
        hexid = name.rsplit("/", 1)[-1].split(".", 1)[0]
        try:
            target = chunk_name(bytes.fromhex(hexid))
        except ValueError:
            continue
        if backend.exists(target):
            backend.delete(name)
        else:
            backend.rename(name, target)


def gc(store: RepoStore, *, grace_seconds: float = DEFAULT_GRACE, dry_run: bool = False,
       progress: Callable[[int], None] | None = None) -> GcResult:
    """Collect garbage (see module docstring); returns what was (or would be) freed."""
    t0 = time.time()
    backend = store.backend
    payload = json.dumps({"writer": f"gc-{uuid.uuid4().hex}", "host": HOST, "pidns": PIDNS,
                          "pid": os.getpid(), "started": t0}).encode()
    acquire_lock(backend, GC_LOCK, payload, "garbage collection")
    try:
        if not dry_run:
            _restore_trash(store)
        writers = live_writers(backend)
        cutoff = min([t0] + [w.started for w in writers]) - grace_seconds - CLOCK_SLACK
        result = GcResult(dry_run=dry_run, cutoff=cutoff)
        referenced, snapshot_ids = _mark(store)
        result.snapshots = len(snapshot_ids)
        for name in backend.list(CHUNKS_DIR):
            result.chunks_total += 1
            if progress:
                progress(1)
            try:
                cid = bytes.fromhex(name.rsplit("/", 1)[-1])
            except ValueError:
                continue
            if cid in referenced:
                result.chunks_referenced += 1
                continue
            try:
                st = backend.stat(name)
            except ObjectNotFound:
                continue
            if st.mtime >= cutoff:
                result.chunks_recent += 1
                continue
            if dry_run:
                result.chunks_removed += 1
                result.bytes_removed += st.size
                continue
            if _sweep(store, name, cutoff):
                result.chunks_removed += 1
                result.bytes_removed += st.size
        _clean(store, snapshot_ids, cutoff, result)
        result.seconds = time.time() - t0
        return result
    finally:
        backend.delete(GC_LOCK)


def _sweep(store: RepoStore, name: str, cutoff: float) -> bool:
    backend = store.backend
    trash = f"{TRASH_DIR}/{name.rsplit('/', 1)[-1]}.{uuid.uuid4().hex[:8]}"
    try:
        backend.rename(name, trash)
    except ObjectNotFound:
        return False
    if backend.stat(trash).mtime >= cutoff:
        # Touched by a writer between our stat and the rename: it is in use.
        if backend.exists(name):
            backend.delete(trash)
        else:
            backend.rename(trash, name)
        return False
    backend.delete(trash)
    return True


def _clean(store: RepoStore, snapshot_ids: set[str], cutoff: float, result: GcResult) -> None:
    backend = store.backend
    orphans: dict[str, float] = {}
    for name in backend.list(INDEXES_DIR):
        parts = name.split("/")
        if len(parts) != 3 or parts[1] in snapshot_ids:
            continue
        try:
            mtime = backend.stat(name).mtime
        except ObjectNotFound:
            continue
        orphans[parts[1]] = max(orphans.get(parts[1], 0.0), mtime)
    for sid, newest in orphans.items():
        if newest < cutoff and not backend.exists(manifest_name(sid)):
            result.indexes_removed += 1
            if not result.dry_run:
                backend.delete(f"{INDEXES_DIR}/{sid}")
    for name in list(backend.list(TMP)):
        try:
            old = backend.stat(name).mtime < cutoff
        except ObjectNotFound:
            continue
        if old:
            result.tmp_removed += 1
            if not result.dry_run:
                backend.delete(name)
    for name in dead_registrations(backend):
        result.writers_removed += 1
        if not result.dry_run:
            backend.delete(name)
