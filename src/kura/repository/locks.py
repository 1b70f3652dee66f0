"""Writer registrations and source locks.

Every process writing a restore point *registers* (``writers/<writer id>.json``:
host, pid, source, parent, start time) so that garbage collection knows which
writers are in flight, and takes its source's *lock*
(``locks/source-<percent-encoded source key>.lock``) so that one source has at
most one writer at a time. GC takes ``locks/gc.lock`` the same way.

A lock is taken by creating its object exclusively (``Backend.create``: a hard
link on POSIX, which is atomic on local and NFS file systems). A heartbeat
thread touches the registration and the lock every ``HEARTBEAT`` seconds. A
holder is *dead* when its heartbeat is older than ``STALE_AFTER`` seconds, or at
once when it ran on this host, in this PID namespace and boot, and its process
is gone (pid + process start time, so a recycled pid does not count). A dead
holder's lock is broken by renaming it away, checking that the renamed object is
still the dead holder's (else it is put back) and creating the lock again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from kura.errors import LockedError
from kura.repository.backend import Backend, ObjectNotFound

log = logging.getLogger(__name__)

HEARTBEAT = 30.0
STALE_AFTER = 600.0
WRITERS_DIR = "writers"
LOCKS_DIR = "locks"
GC_LOCK = f"{LOCKS_DIR}/gc.lock"


def _encode_key(key: str) -> str:
    out = []
    for byte in key.encode():
        c = chr(byte)
        out.append(c if c.isascii() and (c.isalnum() or c in "-_") else f"%{byte:02X}")
    return "".join(out)


def source_lock_name(source_key: str) -> str:
    return f"{LOCKS_DIR}/source-{_encode_key(source_key)}.lock"


def _pid_start(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (None if unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing ')'.
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    """This process's PID namespace and boot: pids are only comparable within both."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{_read_text('/proc/sys/kernel/random/boot_id')}/{ns}"


HOST = socket.gethostname()
PIDNS = _pid_namespace()


@dataclass(frozen=True)
class Holder:
    """Who holds a lock or registration, as written in the object."""

    writer: str
    host: str
    pid: int
    pid_start: int | None
    pidns: str
    started: float
    source: str
    parent: str | None
    mtime: float

    @classmethod
    def parse(cls, data: bytes, mtime: float) -> Holder:
        try:
            doc = json.loads(data)
            return cls(writer=str(doc["writer"]), host=str(doc["host"]), pid=int(doc["pid"]),
                       pid_start=doc.get("pid_start"), pidns=str(doc.get("pidns", "")),
                       started=float(doc["started"]),
                       source=str(doc.get("source", "")), parent=doc.get("parent"),
                       mtime=mtime)
        except (ValueError, KeyError, TypeError):
            # An unreadable holder (half-written by a crashed NFS client...) is judged
            # by its mtime alone.
            return cls(writer="?", host="?", pid=0, pid_start=None, pidns="", started=mtime,
                       source="", parent=None, mtime=mtime)

    def alive(self, now: float | None = None, stale_after: float = STALE_AFTER) -> bool:
        now = time.time() if now is None else now
        if now - self.mtime > stale_after:
            return False
        if self.host == HOST and self.pidns == PIDNS and self.pid > 0:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            if self.pid_start is not None and _pid_start(self.pid) != self.pid_start:
                return False
        return True

    def describe(self) -> str:
        age = max(0.0, time.time() - self.started)
        return f"writer {self.writer} on host {self.host} pid {self.pid}, running {age:.0f}s"


def _read_holder(backend: Backend, name: str) -> Holder | None:
    try:
        mtime = backend.stat(name).mtime
        data = backend.read(name)
    except ObjectNotFound:
        return None
    return Holder.parse(data, mtime)


def live_writers(backend: Backend, *, stale_after: float = STALE_AFTER) -> list[Holder]:
    """Registrations of writers that are still running."""
    out = []
    now = time.time()
    for name in backend.list(WRITERS_DIR):
        holder = _read_holder(backend, name)
        if holder is not None and holder.alive(now, stale_after):
            out.append(holder)
    return out


def dead_registrations(backend: Backend, *, stale_after: float = STALE_AFTER) -> list[str]:
    now = time.time()
    out = []
    for name in backend.list(WRITERS_DIR):
        holder = _read_holder(backend, name)
        if holder is not None and not holder.alive(now, stale_after):
            out.append(name)
    return out


def acquire_lock(backend: Backend, name: str, payload: bytes, what: str, *,
                 stale_after: float = STALE_AFTER) -> None:
    """Create lock object ``name`` or raise ``LockedError`` naming its live holder."""
    for _attempt in range(5):
        if backend.create(name, payload):
            return
        holder = _read_holder(backend, name)
        if holder is None:
            continue  # released meanwhile
        if holder.alive(stale_after=stale_after):
            raise LockedError(
                f"{what} is locked by {holder.describe()}",
                hint=f"wait for it to finish; a dead holder's lock ({backend.location}/{name}) "
                     f"is broken automatically after {stale_after:.0f}s without heartbeat")
        trash = f"{LOCKS_DIR}/broken-{uuid.uuid4().hex}"
        try:
            backend.rename(name, trash)
        except ObjectNotFound:
            continue
        moved = _read_holder(backend, trash)
        if moved is not None and moved.writer != holder.writer and moved.alive(
                stale_after=stale_after):
            # Someone else broke the stale lock and took it first: give it back.
            if not backend.exists(name):
                backend.rename(trash, name)
            raise LockedError(f"{what} is locked by {moved.describe()}")
        log.warning("breaking stale lock %s of %s", name, holder.describe())
        backend.delete(trash)
    raise LockedError(f"{what}: could not take lock {name} (contention); try again")


class WriterSession:
    """Registration + source lock + heartbeat of one writer (see module docstring)."""

    def __init__(self, backend: Backend, source_key: str, *, parent: str | None,
                 writer_id: str | None = None, heartbeat: float = HEARTBEAT,
                 stale_after: float = STALE_AFTER) -> None:
        self.backend = backend
        self.writer_id = writer_id or uuid.uuid4().hex
        self.source_key = source_key
        self.parent = parent
        self.started = time.time()
        self.heartbeat = heartbeat
        self.stale_after = stale_after
        self.registration = f"{WRITERS_DIR}/{self.writer_id}.json"
        self.lock = source_lock_name(source_key)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    def _payload(self) -> bytes:
        doc: dict[str, Any] = {
            "writer": self.writer_id, "host": HOST, "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()), "pidns": PIDNS, "started": self.started,
            "source": self.source_key, "parent": self.parent}
        return json.dumps(doc).encode()

    def acquire(self) -> None:
        payload = self._payload()
        self.backend.write(self.registration, payload)
        try:
            acquire_lock(self.backend, self.lock, payload, f"source {self.source_key!r}",
                         stale_after=self.stale_after)
        except BaseException:
            self.backend.delete(self.registration)
            raise
        self._thread = threading.Thread(target=self._beat, name=f"kura-heartbeat-{self.writer_id}",
                                        daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                for name in (self.registration, self.lock):
                    if not self.backend.touch(name):
                        self.lost = f"{name} disappeared"
            except Exception as exc:  # keep beating; the commit check reports it
                log.warning("heartbeat of writer %s failed: %s", self.writer_id, exc)

    def check_held(self) -> None:
        """Raise ``LockedError`` unless this writer still holds its source lock."""
        holder = _read_holder(self.backend, self.lock)
        if holder is None or holder.writer != self.writer_id:
            raise LockedError(
                f"writer {self.writer_id} lost the lock of source {self.source_key!r} (its "
                "heartbeat stopped for too long and another writer broke it); the restore point "
                "was not committed")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = _read_holder(self.backend, self.lock)
            if holder is not None and holder.writer == self.writer_id:
                self.backend.delete(self.lock)
        finally:
            self.backend.delete(self.registration)
