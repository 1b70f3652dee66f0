"""The agent's end of the remote data path: a repository whose backend is the server.

:func:`open_session` asks the server for a data-path session for one task and
returns a :class:`~kura.repository.Repository` built on a
:class:`RemoteBackend`: the node engine uses it exactly like a local
repository (it hashes, compresses and encrypts here, on the node), while every
object operation becomes an HTTPS request to the session, where the server
checks it (see :mod:`kura.server.sessions`). Chunks are uploaded only when a
``touch`` says the repository lacks them; ``touch_chunks`` checks (and touches)
many at once, one request per ``schemas.TOUCH_MAX`` ids (the writer's inherited
chunks).

Errors map back onto the repository's: 404 → ``ObjectNotFound``, 507 →
``StorageFull``, a refusal → ``RepositoryError`` carrying the server's reason;
a server that cannot be reached stays a ``ServerError`` (the job engine
retries those), so the engine's clean-up paths (abort, no restore point) run as they do
locally.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kura.errors import RepositoryError, ServerError
from kura.repository import ObjectNotFound, ObjectStat, Repository
from kura.repository.config import RepoConfig
from kura.repository.crypto import MasterKey
from kura.repository.store import RepoStore, chunk_name
from kura.server import schemas
from kura.server.client import PACK_RECORD, ServerClient
from kura.server.dataport import DataAddress, DataChannel
from kura.server.sessions import status_error

log = logging.getLogger(__name__)

# Chunk blobs are sent in packs of about this many bytes (see RemoteWriteBatch).
PACK_BYTES = 4 << 20
_CHUNK_NAME = re.compile(r"^chunks/[0-9a-f]{2}/([0-9a-f]{64})$")


class RemoteBackend:
    """A :class:`~kura.repository.Backend` that forwards to a server session.

    With a ``data`` channel (the server's data port), chunk presence checks and
    chunk uploads go there instead of to the HTTPS routes.
    """

    def __init__(self, client: ServerClient, session_id: str, location: str,
                 data: DataChannel | None = None) -> None:
        self.client = client
        self.sid = session_id
        self.data = data
        self._location = location
        self._base = f"/api/agent/sessions/{session_id}"
        self._batch_touch = True  # until a server without ``chunks/touch`` says 404

    @property
    def location(self) -> str:
        return self._location

    def _do(self, name: str, method: str, path: str, **kw: Any) -> Any:
        try:
            return self.client.request(method, self._base + path, **kw)
        except ServerError as exc:
            status = getattr(exc, "status", 0)
            if status == 0:
                raise  # the server is unreachable: a ServerError, worth a retry
            raise status_error(status, exc.message, name=name, location=self._location,
                               action=f"{method} {name}") from exc

    def _obj(self, name: str) -> str:
        return "/objects/" + quote(name, safe="/")

    def read(self, name: str) -> bytes:
        m = _CHUNK_NAME.match(name)
        if m is not None and self.data is not None:
            try:
                return self.data.get(bytes.fromhex(m.group(1)))
            except ObjectNotFound:
                raise ObjectNotFound(name, self._location) from None
        data = self._do(name, "GET", self._obj(name))
        if not isinstance(data, bytes):
            raise RepositoryError(f"unexpected answer reading {name}")
        return data

    def write(self, name: str, data: bytes | bytearray, *, sync_dir: bool = True) -> None:
        self._do(name, "PUT", self._obj(name), content=bytes(data))

    def create(self, name: str, data: bytes) -> bool:
        out = self._do(name, "PUT", self._obj(name), content=bytes(data),
                       params={"create": "true"})
        return bool(out["found"])

    def exists(self, name: str) -> bool:
        return bool(self._do(name, "POST", "/exists", json={"name": name})["found"])

    def list(self, prefix: str) -> Iterator[str]:
        out = self._do(prefix, "GET", "/list", params={"prefix": prefix})
        return iter([str(n) for n in out["names"]])

    def delete(self, name: str) -> None:
        with contextlib.suppress(ObjectNotFound):
            self._do(name, "DELETE", self._obj(name))

    def touch(self, name: str) -> bool:
        m = _CHUNK_NAME.match(name)
        if m is not None and self.data is not None:
            return not self.data.has([bytes.fromhex(m.group(1))])
        return bool(self._do(name, "POST", "/touch", json={"name": name})["found"])

    def touch_chunks(self, chunk_ids: Sequence[bytes]) -> set[bytes]:
        """Touch many chunks, ``schemas.TOUCH_MAX`` per request; returns the missing ids.

        A server older than this route answers 404: then every id is touched alone.
        """
        missing: set[bytes] = set()
        for i in range(0, len(chunk_ids), schemas.TOUCH_MAX):
            part = chunk_ids[i:i + schemas.TOUCH_MAX]
            if self.data is not None:
                missing |= self.data.has(part)
                continue
            if self._batch_touch:
                try:
                    out = self._do("chunks", "POST", "/chunks/touch",
                                   json={"ids": [c.hex() for c in part]})
                except ObjectNotFound:
                    self._batch_touch = False
                else:
                    missing.update(bytes.fromhex(h)
                                   for h in schemas.ChunkIds.model_validate(out).ids)
                    continue
            missing.update(c for c in part if not self.touch(chunk_name(c)))
        return missing & set(chunk_ids)

    def stat(self, name: str) -> ObjectStat:
        out = self._do(name, "POST", "/stat", json={"name": name})
        return ObjectStat(mtime=float(out["mtime"]), size=int(out["size"]))

    def rename(self, src: str, dst: str) -> None:
        self._do(src, "POST", "/rename", json={"src": src, "dst": dst})

    def sync_dirs(self, names: Iterable[str]) -> None:
        batch = list(names)
        if batch:
            self._do("chunks", "POST", "/sync", json={"names": batch})

    def write_batch(self) -> RemoteWriteBatch:
        return RemoteWriteBatch(self)

    def write_chunks(self, pack: bytes) -> None:
        """Upload a pack of chunk records (see :class:`RemoteWriteBatch`)."""
        self._do("chunks", "POST", "/chunks", content=pack)


class RemoteWriteBatch:
    """Chunks uploaded in packs; ``commit`` asks the server to make them durable.

    ``put`` keeps chunk blobs until about ``PACK_BYTES`` are pending, then the
    putting thread sends them in one request (``POST .../chunks``: fewer requests
    is less CPU on the server); several packs may be on the way at once. The
    server stages each chunk in its own write batch and commits that on ``/sync``
    and, at the latest, before it writes the manifest. ``commit`` sends what is
    pending, waits for the packs still on the way (raising the first failure of
    any of them) and then asks for the sync, so nothing the writer's index names is
    less durable than the index. Objects that are not chunks are written at once.
    """

    def __init__(self, backend: RemoteBackend, pack_bytes: int = PACK_BYTES) -> None:
        self._backend = backend
        self._pack_bytes = pack_bytes
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._names: list[str] = []
        self._sending = 0
        self._failed: BaseException | None = None
        self._cond = threading.Condition()

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        m = _CHUNK_NAME.match(name)
        if m is None:
            self._backend.write(name, bytes(data), sync_dir=False)
            with self._cond:
                self._names.append(name)
            return
        if self._backend.data is not None:  # straight to the data port
            self._backend.data.put(bytes.fromhex(m.group(1)), data)
            return
        record = PACK_RECORD.pack(bytes.fromhex(m.group(1)), len(data)) + bytes(data)
        with self._cond:
            if self._failed is not None:
                raise RepositoryError(f"an earlier chunk upload failed: {self._failed}")
            self._pending.append(record)
            self._pending_bytes += len(record)
            self._names.append(name)
            pack = self._take() if self._pending_bytes >= self._pack_bytes else None
        if pack is not None:
            self._send(pack)

    def _take(self) -> list[bytes]:
        pack, self._pending, self._pending_bytes = self._pending, [], 0
        self._sending += 1
        return pack

    def _send(self, pack: list[bytes]) -> None:
        try:
            self._backend.write_chunks(b"".join(pack))
        except BaseException as exc:
            with self._cond:
                if self._failed is None:
                    self._failed = exc
            raise
        finally:
            with self._cond:
                self._sending -= 1
                self._cond.notify_all()

    def commit(self) -> None:
        with self._cond:
            pack = self._take() if self._pending else None
        if pack is not None:
            self._send(pack)
        with self._cond:
            while self._sending:
                self._cond.wait()
            if self._failed is not None:
                raise RepositoryError(f"a chunk upload failed: {self._failed}")
            names, self._names = self._names, []
        if self._backend.data is not None:
            # The SYNC commits the session's whole batch, which is all the API's sync
            # does too (the objects named were written durably when they were sent).
            self._backend.data.sync()
            return
        self._backend.sync_dirs(names)

    def discard(self) -> None:
        with self._cond:
            self._pending, self._pending_bytes, self._names = [], 0, []


@dataclass
class RemoteSession:
    client: ServerClient
    session_id: str
    repo: Repository

    def end(self) -> bool:
        """Close the session; True if a restore point was committed in it."""
        out = self.client.request("POST", f"/api/agent/sessions/{self.session_id}/end")
        return bool(schemas.SessionEnded.model_validate(out).committed)

    def abort_quietly(self) -> None:
        """End the session (aborting it unless committed) and close its data connections."""
        try:
            with contextlib.suppress(ServerError):  # the server aborts silent sessions itself
                self.end()
        finally:
            backend = self.repo.store.backend
            if isinstance(backend, RemoteBackend) and backend.data is not None:
                backend.data.close()


def open_session(client: ServerClient, task_id: int) -> RemoteSession:
    data = client.request("POST", "/api/agent/sessions", json={"task_id": task_id})
    opened = schemas.SessionOpened.model_validate(data)
    where = f"{opened.location}/config"
    config = RepoConfig.from_json(base64.b64decode(opened.config), where)
    master = MasterKey.from_bytes(base64.b64decode(opened.master_key))
    config.check_mac(master, where)
    channel = None
    if opened.data_port and opened.data_secret:
        port = client.data_port or opened.data_port
        channel = DataChannel(DataAddress(client.host, port, opened.session_id,
                                          opened.data_secret), client.ssl_context)
        try:
            channel.open()
        except ServerError as exc:  # a firewall in the way: the HTTPS routes still work
            log.warning("%s; chunks go over HTTPS instead (slower)", exc.message)
            channel = None
    backend = RemoteBackend(client, opened.session_id, opened.location, channel)
    return RemoteSession(client, opened.session_id, Repository(RepoStore(backend, config, master)))
