"""The remote data path: agents write restore points through the server.

An agent backs up with the node engine exactly as standalone kura does, but
its repository's *backend* is remote (:mod:`kura.agent.remote`): every object
operation is a request to a **session** here, which applies it to the
server's own repository backend after checking it. The agent hashes,
compresses and encrypts (it receives the repository's master key at session
start, over the authenticated TLS channel); the server stores blobs and
decides what may become a restore point.

A session is opened for one task the server dispatched to that agent (a backup
or a restore of one VM), so an agent can only write restore points of VMs of
its own cluster that the server asked it to back up. What a session may do:

* read ``config``, the VM's own restore points (``snapshots/``, ``indexes/``,
  ``notes/``: listings are filtered to that VM) and lock/writer registrations;
  a restore session may also read chunks;
* write chunks (each id is remembered as *uploaded*; the chunk is staged in the
  session's write batch, which the agent's ``sync`` commits and which is always
  committed before the manifest is written), ``touch`` chunks (an id
  that exists is remembered as *present*; this is how only chunks the
  repository lacks are sent; ``touch_chunks`` does it for up to
  ``schemas.TOUCH_MAX`` ids in one request), write the indexes and notes of the one new
  restore point, its writer registration and the VM's source lock;
* write the **manifest** last. The server opens it and every index it names
  with its own key, and accepts it only if the source is the session's VM,
  the parent is that VM's restore point, and every chunk id referenced was
  uploaded or found present in this session, or is in the parent's indexes
  (PBS's rule: the server does not blindly trust a client). Then it writes the
  manifest: that is the commit.

A session that ends without a manifest (the agent reports failure, its task is
cancelled, its connection drops and it stays silent for ``idle_timeout``, or
the server restarts) is aborted. Whenever a session closes, the lock and
writer registration it created and still holds are removed, so the VM's next
backup is not blocked. Its chunks and indexes
are garbage for GC, never a restore point. Sessions are persisted in the
catalog only for that clean-up.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import select

from kura.catalog import Agent, BackupSession, Catalog, RunVm, Task, Vm
from kura.errors import (
    IntegrityError,
    KuraError,
    RepositoryError,
    ServerError,
    StorageFull,
    UsageError,
)
from kura.repository import ZERO_CHUNK, Manifest, ObjectNotFound, ObjectStat, Repository
from kura.repository.backend import WriteBatch
from kura.repository.blob import MAGIC
from kura.repository.locks import source_lock_name
from kura.repository.store import chunk_name
from kura.server.client import PACK_RECORD

log = logging.getLogger(__name__)

_CHUNK = re.compile(r"^chunks/[0-9a-f]{2}/([0-9a-f]{64})$")
_SNAP = re.compile(r"^(?:snapshots/([^/]+)\.manifest|notes/([^/]+)\.json|indexes/([^/]+)/[^/]+)$")
_WRITER = re.compile(r"^writers/[0-9A-Za-z_-]+\.json$")
_BROKEN = re.compile(r"^locks/broken-[0-9a-f]+$")


class Refused(ServerError):
    """The session may not do this (HTTP 403)."""


def error_status(exc: KuraError) -> int:
    """The HTTP status a session operation's error is answered with (API and data port)."""
    if isinstance(exc, Refused):
        return 403
    if isinstance(exc, ObjectNotFound):
        return 404
    if isinstance(exc, StorageFull):
        return 507
    if isinstance(exc, UsageError):
        return 400
    return 409


def status_error(status: int, message: str, *, name: str, location: str,
                 action: str) -> KuraError:
    """The agent's side of :func:`error_status`: the repository error that a status
    from the server (API or data port) stands for, for the same handling as a local
    repository's (404 → ``ObjectNotFound``, 507 → ``StorageFull``, else refused)."""
    if status == 404:
        return ObjectNotFound(name, location)
    if status == 507:
        return StorageFull(message)
    return RepositoryError(f"the server refused {action}: {message}")


@dataclass
class Session:
    id: str
    agent_id: str
    task_id: int
    vm_uuid: str
    kind: str  # backup | restore | preflight (read-only)
    visible: set[str]             # restore point ids of this VM the agent may read
    parent_ids: set[bytes] | None = None
    snapshot: str | None = None   # the new restore point's id, once seen
    uploaded: set[bytes] = field(default_factory=set)
    present: set[bytes] = field(default_factory=set)
    created: set[str] = field(default_factory=set)   # lock/writer objects it made
    batch: WriteBatch | None = None  # uploaded chunks, durable at the next commit
    committed: bool = False
    touched: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The data port's credential for this session (see kura.server.dataport): given to
    # the agent when the session opens, never logged.
    data_secret: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)


class SessionManager:
    def __init__(self, catalog: Catalog, repo: Repository, *, idle_timeout: float = 60.0,
                 on_commit: Callable[[int, str], None] | None = None) -> None:
        self.catalog = catalog
        self.on_commit = on_commit
        self.repo = repo
        self.backend = repo.store.backend
        self.idle_timeout = idle_timeout
        self.sweep_every = 0.5
        self._last_sweep = 0.0
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    # ---- lifecycle -----------------------------------------------------

    def recover(self) -> int:
        """Clean up after sessions a previous server process left open."""
        with self.catalog.session() as s:
            rows = list(s.scalars(select(BackupSession)))
            for row in rows:
                self._remove_objects([str(o) for o in row.objects])
                s.delete(row)
        return len(rows)

    def begin(self, agent_id: str, task_id: int) -> tuple[Session, bytes]:
        """Open a session for a task the server sent this agent; returns it and the key."""
        with self.catalog.session() as s:
            task = s.get(Task, task_id)
            if task is None or task.agent_id != agent_id:
                raise Refused(f"task {task_id} is not this agent's")
            if task.state != "sent":
                raise Refused(f"task {task_id} is {task.state}; nothing may be written for it")
            if task.kind not in ("backup", "restore", "preflight"):
                raise Refused(f"task {task_id} is a {task.kind}; it has no data path")
            rv = s.get(RunVm, task.run_vm_id) if task.run_vm_id else None
            if rv is None:
                raise Refused(f"task {task_id} names no VM")
            agent = s.get_one(Agent, agent_id)
            vm = s.get(Vm, rv.vm_uuid)
            if task.kind != "restore" and (vm is None or
                                          vm.cluster_id != agent.node.cluster_id):
                raise Refused(f"VM {rv.vm_name} is not in this agent's cluster")
            vm_uuid = rv.vm_uuid
            row = BackupSession(id=secrets.token_hex(12), agent_id=agent_id, task_id=task_id,
                                vm_uuid=vm_uuid, kind=task.kind)
            s.add(row)
            sid = row.id
            kind = task.kind
            wanted = str(task.payload.get("snapshot", ""))
        snaps = self.repo.list_snapshots(vm_uuid) if kind != "restore" else []
        visible = {m.id for m in snaps}
        if kind == "restore" and wanted:
            visible.add(self.repo.get_snapshot(wanted).id)
        sess = Session(id=sid, agent_id=agent_id, task_id=task_id, vm_uuid=vm_uuid, kind=kind,
                       visible=visible,
                       batch=self.backend.write_batch() if kind == "backup" else None)
        with self._lock:
            self._sessions[sid] = sess
        return sess, self.repo.store.master.to_bytes()

    def get(self, agent_id: str, sid: str) -> Session:
        with self._lock:
            sess = self._sessions.get(sid)
        if sess is None or sess.agent_id != agent_id:
            raise Refused(f"no open session {sid} for this agent (aborted or never opened)")
        sess.touched = time.monotonic()
        return sess

    def data_session(self, sid: str, secret: str) -> Session:
        """The open session a data port connection names, if ``secret`` is its own."""
        with self._lock:
            sess = self._sessions.get(sid)
        if sess is None or not hmac.compare_digest(sess.data_secret.encode(),
                                                   secret.encode()):
            raise Refused(f"no open session {sid} with that data secret")
        sess.touched = time.monotonic()
        return sess

    def end(self, agent_id: str, sid: str) -> bool:
        """Close a session; returns True if it committed a restore point."""
        sess = self.get(agent_id, sid)
        committed = sess.committed
        self._close(sess, "ended by the agent before commit" if not committed else "")
        return committed

    def sweep(self) -> list[str]:
        """Abort sessions idle too long or whose task is over; returns their ids.

        Called on every engine tick, which runs at every task event during a job, so
        it looks at the catalog at most every ``sweep_every`` seconds, with one query
        for all open sessions.
        """
        now = time.monotonic()
        if now - self._last_sweep < self.sweep_every:
            return []
        self._last_sweep = now
        with self._lock:
            sessions = list(self._sessions.values())
        if not sessions:
            return []
        with self.catalog.session() as s:
            rows = s.execute(select(Task.id, Task.state).where(
                Task.id.in_({sess.task_id for sess in sessions})))
            states = {int(tid): str(state) for tid, state in rows}
        out = []
        for sess in sessions:
            idle = now - sess.touched > self.idle_timeout
            if idle or states.get(sess.task_id) != "sent":
                why = "agent silent" if idle else "its task is over"
                self._close(sess, why)
                out.append(sess.id)
        return out

    def _close(self, sess: Session, why: str) -> None:
        with self._lock:
            self._sessions.pop(sess.id, None)
        if sess.batch is not None:
            sess.batch.discard()  # staged uploads never became visible
        if not sess.committed:
            log.warning("session %s (VM %s) aborted: %s; no restore point", sess.id,
                        sess.vm_uuid, why)
        # Whatever the writer did not release itself (its connection may have dropped
        # right after the commit) is released here, so the VM's next backup is not
        # blocked by a lock whose holder process is still alive on its node.
        self._remove_objects(sorted(sess.created))
        with self.catalog.session() as s:
            row = s.get(BackupSession, sess.id)
            if row is not None:
                s.delete(row)

    def _remove_objects(self, names: list[str]) -> None:
        """Delete a dead session's registrations, and its lock if it still holds it."""
        writers = set()
        for name in names:
            if name.startswith("writers/"):
                writers.add(name.rsplit("/", 1)[-1].removesuffix(".json"))
        for name in names:
            try:
                if name.startswith("locks/"):
                    holder = json.loads(self.backend.read(name))
                    if holder.get("writer") not in writers:
                        continue  # somebody else holds it now
                self.backend.delete(name)
            except (ObjectNotFound, ValueError):
                continue
            except KuraError as exc:
                log.warning("cannot remove %s of an aborted session: %s", name, exc)

    def _persist_created(self, sess: Session) -> None:
        with self.catalog.session() as s:
            row = s.get(BackupSession, sess.id)
            if row is not None:
                row.objects = sorted(sess.created)

    # ---- permissions ---------------------------------------------------

    def _snapshot_of(self, name: str) -> str | None:
        m = _SNAP.match(name)
        if m is None:
            return None
        return next(g for g in m.groups() if g is not None)

    def _may_read(self, sess: Session, name: str) -> None:
        if name == "config" or name.startswith(("locks/", "writers/")):
            return
        sid = self._snapshot_of(name)
        if sid is not None and (sid in sess.visible or sid == sess.snapshot):
            return
        if sess.kind == "restore" and _CHUNK.match(name):
            return
        raise Refused(f"this session may not read {name}")

    def _claim_snapshot(self, sess: Session, sid: str) -> None:
        if sess.snapshot is None:
            if sid in sess.visible or self.backend.exists(f"snapshots/{sid}.manifest"):
                raise Refused(f"restore point {sid} exists already")
            sess.snapshot = sid
        elif sess.snapshot != sid:
            raise Refused(f"this session writes restore point {sess.snapshot}, not {sid}")

    # ---- object operations ---------------------------------------------

    def read(self, sess: Session, name: str) -> bytes:
        self._may_read(sess, name)
        return self.backend.read(name)

    def stat(self, sess: Session, name: str) -> ObjectStat:
        self._may_read(sess, name)
        return self.backend.stat(name)

    def exists(self, sess: Session, name: str) -> bool:
        if _CHUNK.match(name):
            return self.touch(sess, name)
        self._may_read(sess, name)
        return self.backend.exists(name)

    def names(self, sess: Session, prefix: str) -> list[str]:
        prefix = prefix.strip("/")
        if prefix in ("locks", "writers"):
            return list(self.backend.list(prefix))
        if prefix in ("snapshots", "indexes", "notes"):
            return [n for n in self.backend.list(prefix)
                    if (self._snapshot_of(n) or "") in sess.visible]
        raise Refused(f"this session may not list {prefix or 'the repository'}")

    def touch(self, sess: Session, name: str) -> bool:
        m = _CHUNK.match(name)
        if m is not None:
            cid = bytes.fromhex(m.group(1))
            if name != chunk_name(cid):  # no chunk is stored under another folder
                return False
            return not self.touch_chunks(sess, [cid])
        if name in sess.created:
            return self.backend.touch(name)
        self._may_read(sess, name)
        return self.backend.exists(name)

    def touch_chunks(self, sess: Session, ids: list[bytes]) -> list[bytes]:
        """``touch`` for many chunks at once (the same rule for each: a stored chunk is
        touched and remembered as *present*); returns the missing ids, in order."""
        touch = self.backend.touch
        present: list[bytes] = []
        missing: list[bytes] = []
        for cid in ids:
            (present if touch(chunk_name(cid)) else missing).append(cid)
        with sess.lock:
            sess.present.update(present)
        return missing

    def write(self, sess: Session, name: str, data: bytes, *, create: bool) -> bool:
        if sess.kind != "backup":
            raise Refused("a restore session writes nothing to the repository")
        m = _CHUNK.match(name)
        if m is not None:
            self.put_chunk(sess, bytes.fromhex(m.group(1)), data)
            return True
        if _WRITER.match(name) or name == source_lock_name(sess.vm_uuid):
            done = True
            if create:
                done = self.backend.create(name, data)
            else:
                self.backend.write(name, data)
            if done:
                sess.created.add(name)
                self._persist_created(sess)
            return done
        sid = self._snapshot_of(name)
        if sid is None:
            raise Refused(f"this session may not write {name}")
        self._claim_snapshot(sess, sid)
        if name.startswith("snapshots/"):
            self._commit(sess, sid, data)
            return True
        if create:
            return self.backend.create(name, data)
        self.backend.write(name, data)
        return True

    def write_chunks(self, sess: Session, pack: bytes) -> int:
        """Store a pack of chunk blobs (records ``id (32) | length (u32 BE) | blob``);
        returns how many. Each is staged like a single chunk upload."""
        if sess.kind != "backup" or sess.batch is None:
            raise Refused("a restore session writes nothing to the repository")
        view = memoryview(pack)
        pos = count = 0
        while pos < len(view):
            if len(view) - pos < PACK_RECORD.size:
                raise UsageError("truncated chunk pack")
            cid, size = PACK_RECORD.unpack_from(view, pos)
            pos += PACK_RECORD.size
            if not size or pos + size > len(view):
                raise UsageError("truncated chunk pack")
            self.put_chunk(sess, cid, view[pos:pos + size])
            pos += size
            count += 1
        return count

    def put_chunk(self, sess: Session, cid: bytes, blob: bytes | memoryview) -> None:
        """One uploaded chunk (a pack's record, or a data port PUT): a kura blob, staged
        in the session's batch and remembered as *uploaded*."""
        if sess.batch is None:
            raise Refused("a restore session writes nothing to the repository")
        if blob[:len(MAGIC)] != MAGIC:
            raise Refused(f"chunk {cid.hex()} is not a kura blob")
        sess.batch.put(chunk_name(cid), blob)
        with sess.lock:
            sess.uploaded.add(cid)

    def delete(self, sess: Session, name: str) -> None:
        if name in sess.created or _BROKEN.match(name):
            self.backend.delete(name)
            sess.created.discard(name)
            return
        sid = self._snapshot_of(name)
        if name == f"indexes/{sess.snapshot}":  # an aborting writer drops its indexes at once
            sid = sess.snapshot
        if sid is not None and sid == sess.snapshot and not sess.committed:
            self.backend.delete(name)
            return
        raise Refused(f"this session may not delete {name}")

    def rename(self, sess: Session, src: str, dst: str) -> None:
        lock = source_lock_name(sess.vm_uuid)
        if (src == lock and _BROKEN.match(dst)) or (_BROKEN.match(src) and dst == lock):
            self.backend.rename(src, dst)
            return
        raise Refused(f"this session may not rename {src}")

    def sync(self, sess: Session, names: list[str]) -> None:
        """Make the session's uploads durable and visible (the agent's flush)."""
        if sess.batch is not None:
            sess.batch.commit()

    # ---- commit --------------------------------------------------------

    def _commit(self, sess: Session, sid: str, blob: bytes) -> None:
        store = self.repo.store
        name = f"snapshots/{sid}.manifest"
        what = f"restore point {sid} sent by an agent"
        try:
            manifest = Manifest.from_json(store.open_object(name, blob), what)
        except KuraError as exc:
            raise Refused(f"{what}: the manifest does not open with the repository key: "
                          f"{exc}") from exc
        if manifest.id != sid or manifest.repository != self.repo.id:
            raise Refused(f"{what}: names another restore point or repository")
        if manifest.source.key != sess.vm_uuid:
            raise Refused(f"{what}: is for source {manifest.source.key}, but this session "
                          f"backs up VM {sess.vm_uuid}")
        allowed = self._parent_ids(sess, manifest)
        with sess.lock:
            allowed = allowed | sess.uploaded | sess.present | {ZERO_CHUNK}
        bad: list[str] = []
        for disk in manifest.disks:
            try:
                index = store.read_index(manifest, disk)
            except IntegrityError as exc:
                raise Refused(f"{what}: {exc}") from exc
            bad += [c.hex() for c in index.ids if c not in allowed][:3]
        for cfg in manifest.configs.values():
            bad += [c.hex() for c in cfg.chunks if c not in allowed][:3]
        if bad:
            raise Refused(f"{what}: refers to chunks it neither uploaded nor inherited from its "
                          f"parent ({', '.join(x[:16] for x in bad[:3])}...); refused")
        if sess.batch is not None:
            sess.batch.commit()  # every uploaded chunk is durable before the manifest
        store.backend.write(name, blob)
        sess.committed = True
        if self.on_commit is not None:
            self.on_commit(sess.task_id, sid)
        log.info("restore point %s of VM %s committed by agent %s", sid, sess.vm_uuid,
                 sess.agent_id)

    def _parent_ids(self, sess: Session, manifest: Manifest) -> set[bytes]:
        if manifest.parent is None:
            return set()
        if manifest.parent not in sess.visible:
            raise Refused(f"restore point {manifest.id}: its parent {manifest.parent} is not "
                          f"a restore point of this VM")
        if sess.parent_ids is None:
            parent = self.repo.get_snapshot(manifest.parent)
            ids: set[bytes] = set()
            for disk in parent.disks:
                ids.update(self.repo.store.read_index(parent, disk).ids)
            for cfg in parent.configs.values():
                ids.update(cfg.chunks)
            sess.parent_ids = ids
        return sess.parent_ids


def key_b64(master: bytes) -> str:
    return base64.b64encode(master).decode()
