"""The agent's end of the remote data path: a repository whose backend is the server.

:func:`open_session` asks the server for a data-path session for one task and
returns a :class:`~kura.repository.Repository` built on a
:class:`RemoteBackend`: the node engine uses it exactly like a local
repository (it hashes, compresses and encrypts here, on the node), while every
object operation becomes an HTTPS request to the session, where the server
checks it (see :mod:`kura.server.sessions`). Chunks are uploaded only when a
``touch`` says the repository lacks them.

Errors map back onto the repository's: 404 → ``ObjectNotFound``, 507 →
``StorageFull``, a refusal → ``RepositoryError`` carrying the server's reason;
a server that cannot be reached stays a ``ServerError`` (the job engine
retries those), so the engine's clean-up paths (abort, no restore point) run as they do
locally.
"""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kura.errors import RepositoryError, ServerError, StorageFull
from kura.repository import ObjectNotFound, ObjectStat, Repository
from kura.repository.config import RepoConfig
from kura.repository.crypto import MasterKey
from kura.repository.store import RepoStore
from kura.server import schemas
from kura.server.client import ServerClient


class RemoteBackend:
    """A :class:`~kura.repository.Backend` that forwards to a server session."""

    def __init__(self, client: ServerClient, session_id: str, location: str) -> None:
        self.client = client
        self.sid = session_id
        self._location = location
        self._base = f"/api/agent/sessions/{session_id}"

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
            if status == 404:
                raise ObjectNotFound(name, self._location) from exc
            if status == 507:
                raise StorageFull(exc.message) from exc
            raise RepositoryError(f"the server refused {method} {name}: {exc.message}") from exc

    def _obj(self, name: str) -> str:
        return "/objects/" + quote(name, safe="/")

    def read(self, name: str) -> bytes:
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
        return bool(self._do(name, "POST", "/touch", json={"name": name})["found"])

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


class RemoteWriteBatch:
    """Chunks uploaded at once; ``commit`` asks the server to make them durable.

    The server stages each upload in its own write batch (no fsync per chunk) and
    commits that batch on ``/sync`` and, at the latest, before it writes the
    manifest, so nothing it names is ever less durable than the manifest.
    """

    def __init__(self, backend: RemoteBackend) -> None:
        self._backend = backend
        self._names: list[str] = []
        self._lock = threading.Lock()

    def put(self, name: str, data: bytes | bytearray) -> None:
        self._backend.write(name, data, sync_dir=False)
        with self._lock:
            self._names.append(name)

    def commit(self) -> None:
        with self._lock:
            names, self._names = self._names, []
        self._backend.sync_dirs(names)

    def discard(self) -> None:
        with self._lock:
            self._names = []


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
        with contextlib.suppress(ServerError):  # the server aborts silent sessions itself
            self.end()


def open_session(client: ServerClient, task_id: int) -> RemoteSession:
    data = client.request("POST", "/api/agent/sessions", json={"task_id": task_id})
    opened = schemas.SessionOpened.model_validate(data)
    backend = RemoteBackend(client, opened.session_id, opened.location)
    where = f"{opened.location}/config"
    config = RepoConfig.from_json(base64.b64decode(opened.config), where)
    master = MasterKey.from_bytes(base64.b64decode(opened.master_key))
    config.check_mac(master, where)
    return RemoteSession(client, opened.session_id, Repository(RepoStore(backend, config, master)))
