"""The data port: chunk uploads and presence checks on a TLS socket of their own.

A backup through the server moves every new chunk from the agent to the server
and asks, for every chunk, whether the repository has it already. Over the
HTTPS API each of those is an HTTP request through uvicorn, the ASGI stack and a
thread-pool hand-off, and each upload's body is assembled and copied several
times: measured, the server spent more CPU per backed-up byte than the agent
that hashed, compressed and encrypted it. The data port carries just those
two operations, with one framing header per chunk, on threads that read
straight into a reused buffer (why this is written by hand: docs/design.md,
"Built by hand, and why").

Everything else of a session (opening it, indexes, the manifest, locks) stays
on the HTTPS API, and so does every decision: the port calls the same
:class:`~kura.server.sessions.SessionManager` methods the API does.

Protocol (version 1; all integers big-endian). Every message is a frame: a
header of type (u8) and payload length (u32), then the payload.

========  =====  ============================================================
frame     type   payload
========  =====  ============================================================
HELLO     0x01   JSON ``{"protocol": 1, "session": ID, "secret": HEX}``
HAS       0x02   1 to ``TOUCH_MAX`` chunk ids (32 bytes each)
PUT       0x03   chunk id (32 bytes) and the sealed chunk blob
SYNC      0x04   empty
GET       0x05   chunk id (32 bytes): a restore session reads a chunk
OK        0x80   HAS: the ids of those chunks the repository lacks; GET: the blob;
                 else empty
ERR       0x81   JSON ``{"status": HTTP-like code, "message": text}``
========  =====  ============================================================

The client starts with HELLO: the session id and the session's data secret,
which the server gave that agent when the session opened (over the
authenticated API); the connection then belongs to that session. HELLO, HAS,
SYNC and GET get one answer each, in order. PUT gets none: a failed PUT (a full
disk, a blob that is not a kura blob, a closed session) is remembered, later
PUTs are read and dropped, and the next HAS or SYNC answers ERR with it, so
the client learns of it before anything refers to the chunk. SYNC answers OK
once every chunk PUT before it on this connection is durable. A frame that
is malformed or too large ends the connection after an ERR.

A client opens one connection for its uploads (PUT and SYNC, in order) and
others for presence checks (HAS: one, shared by a backup's threads, see
:meth:`DataChannel.has`) and reads (GET), so a question never waits behind a
megabyte of upload; a restore's workers each read on their own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from kura.errors import KuraError, RepositoryError, ServerError, UsageError
from kura.repository.store import chunk_name
from kura.server import schemas
from kura.server.sessions import Refused, Session, SessionManager, error_status, status_error

log = logging.getLogger(__name__)

PROTOCOL = 1
HEADER = struct.Struct(">BI")
HELLO, HAS, PUT, SYNC, GET = 0x01, 0x02, 0x03, 0x04, 0x05
OK, ERR = 0x80, 0x81
ID_LEN = 32
MAX_HELLO = 4096
MAX_HAS = schemas.TOUCH_MAX  # ids per HAS: as many as the API's batch touch takes
MAX_PUT = (64 << 20) + (64 << 10)  # the largest chunk size and its blob's overhead


class FrameError(UsageError):
    """A frame that breaks the protocol; the connection ends."""


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean end of stream before the first byte."""
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            if got == 0:
                return False
            raise ConnectionError("the peer closed the connection inside a frame")
        got += n
    return True


def _send(sock: socket.socket, kind: int, payload: bytes = b"") -> None:
    if len(payload) <= 65536:
        sock.sendall(HEADER.pack(kind, len(payload)) + payload)
    else:  # a chunk: no copy of it to prepend the header
        sock.sendall(HEADER.pack(kind, len(payload)))
        sock.sendall(payload)


def _err_payload(status: int, message: str) -> bytes:
    return json.dumps({"status": status, "message": message}).encode()


# ---- server ---------------------------------------------------------------

class DataPort:
    """The server's data listener: one thread per connection (see module docstring)."""

    def __init__(self, sessions: SessionManager, context: ssl.SSLContext, host: str, port: int,
                 *, max_connections: int = 256, idle_timeout: float = 300.0,
                 hello_timeout: float = 30.0) -> None:
        self.sessions = sessions
        self.context = context
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.hello_timeout = hello_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> int:
        """Listen (``port`` 0: any free port); returns the port listened on."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            lsn = socket.create_server((self.host, self.port), family=family, backlog=128)
        except OSError as exc:
            raise UsageError(f"cannot listen on the data port {self.host}:{self.port}: "
                             f"{exc.strerror or exc}",
                             hint="choose another with --data-listen, or 'off'") from exc
        self._listener = lsn
        self.port = int(lsn.getsockname()[1])
        self._thread = threading.Thread(target=self._accept_loop, name="kura-dataport",
                                        daemon=True)
        self._thread.start()
        return self.port

    def stop(self) -> None:
        self._stopping = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping:
            try:
                raw, addr = self._listener.accept()
            except OSError:
                if self._stopping:
                    return
                continue
            if not self._slots.acquire(blocking=False):
                log.warning("data port: refusing a connection from %s: too many open", addr[0])
                raw.close()
                continue
            threading.Thread(target=self._serve, args=(raw, addr[0]), daemon=True,
                             name="kura-dataport-conn").start()

    def _serve(self, raw: socket.socket, peer: str) -> None:
        try:
            raw.settimeout(self.hello_timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.context.wrap_socket(raw, server_side=True) as conn:
                _Connection(self, conn, peer).run()
        except (OSError, ssl.SSLError) as exc:
            log.debug("data port: connection from %s ended: %s", peer, exc)
        except Exception:  # a bug here must not take the listener down
            log.exception("data port: connection from %s failed", peer)
        finally:
            with contextlib.suppress(OSError):
                raw.close()
            self._slots.release()


class _Connection:
    def __init__(self, port: DataPort, conn: ssl.SSLSocket, peer: str) -> None:
        self.port = port
        self.sessions = port.sessions
        self.conn = conn
        self.peer = peer
        self.head = memoryview(bytearray(HEADER.size))
        self.buf = bytearray()  # grown to the largest frame seen (a presence check's: small)
        self.sess: Session | None = None
        self.failed: tuple[int, str] | None = None  # a PUT's error, told at the next answer

    def _frame(self, limit: int) -> tuple[int, memoryview] | None:
        if not _recv_exact(self.conn, self.head):
            return None
        kind, length = HEADER.unpack(self.head)
        if length > limit:
            raise FrameError(f"frame of {length} bytes is larger than {limit}")
        if length > len(self.buf):
            self.buf = bytearray(length)
        payload = memoryview(self.buf)[:length]
        if length and not _recv_exact(self.conn, payload):
            raise ConnectionError("the peer closed the connection inside a frame")
        return kind, payload

    def run(self) -> None:
        try:
            frame = self._frame(MAX_HELLO)
            if frame is None:
                return
            self.sess = self._hello(*frame)
            _send(self.conn, OK)
            self.conn.settimeout(self.port.idle_timeout)
            while (frame := self._frame(MAX_PUT)) is not None:
                self._handle(*frame)
        except (FrameError, Refused) as exc:  # a broken frame, or HELLO refused
            if isinstance(exc, Refused):
                log.warning("data port: refused a connection from %s: %s", self.peer, exc)
            with contextlib.suppress(OSError, ssl.SSLError):
                _send(self.conn, ERR, _err_payload(error_status(exc), str(exc)))

    def _hello(self, kind: int, payload: memoryview) -> Session:
        if kind != HELLO:
            raise FrameError("the first frame must be HELLO")
        try:
            hello = json.loads(bytes(payload))
            sid, secret = str(hello["session"]), str(hello["secret"])
            version = int(hello.get("protocol", 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise FrameError("malformed HELLO") from exc
        if version != PROTOCOL:
            raise FrameError(f"data port protocol {version} is not spoken here (this server: "
                             f"{PROTOCOL})")
        return self.sessions.data_session(sid, secret)

    def _handle(self, kind: int, payload: memoryview) -> None:
        assert self.sess is not None
        if kind == PUT:
            if self.failed is None and len(payload) > ID_LEN:
                try:
                    self.sessions.put_chunk(self.sessions.get(self.sess.agent_id, self.sess.id),
                                            bytes(payload[:ID_LEN]), payload[ID_LEN:])
                except KuraError as exc:
                    self.failed = (error_status(exc), str(exc))
            elif self.failed is None:
                raise FrameError("PUT without a chunk")
            return
        if kind not in (HAS, SYNC, GET):
            raise FrameError(f"unknown frame type {kind:#x}")
        if self.failed is not None:
            _send(self.conn, ERR, _err_payload(*self.failed))
            return
        try:
            sess = self.sessions.get(self.sess.agent_id, self.sess.id)
            if kind == HAS:
                if not payload or len(payload) % ID_LEN or len(payload) > MAX_HAS * ID_LEN:
                    raise FrameError(f"HAS needs 1 to {MAX_HAS} ids of {ID_LEN} bytes")
                ids = [bytes(payload[i:i + ID_LEN]) for i in range(0, len(payload), ID_LEN)]
                answer = b"".join(self.sessions.touch_chunks(sess, ids))
            elif kind == GET:
                if len(payload) != ID_LEN:
                    raise FrameError(f"GET needs one chunk id of {ID_LEN} bytes")
                answer = self.sessions.read(sess, chunk_name(bytes(payload)))
            else:
                self.sessions.sync(sess, [])
                answer = b""
        except KuraError as exc:
            if isinstance(exc, FrameError):
                raise
            _send(self.conn, ERR, _err_payload(error_status(exc), str(exc)))
            return
        _send(self.conn, OK, answer)


# ---- client ---------------------------------------------------------------

@dataclass(frozen=True)
class DataAddress:
    host: str
    port: int
    session: str
    secret: str


class _Ask:
    """One caller's presence check, answered by whichever thread carries it."""

    def __init__(self, ids: list[bytes]) -> None:
        self.ids = ids
        self.done = False
        self.missing: set[bytes] = set()
        self.error: BaseException | None = None

    def outcome(self) -> set[bytes]:
        if self.error is not None:
            raise self.error
        return self.missing


class DataChannel:
    """The agent's end: one upload connection and a few for presence checks.

    Thread-safe. A connection that fails is closed and the failure raised as a
    :class:`~kura.errors.ServerError` (the server could not be reached: worth a
    retry); an ERR answer becomes the error the HTTPS data path raises for the
    same status (404 → ``ObjectNotFound``, 507 → ``StorageFull``, else
    ``RepositoryError`` with the server's reason).
    """

    def __init__(self, address: DataAddress, context: ssl.SSLContext, *,
                 timeout: float = 60.0) -> None:
        self.address = address
        self.context = context
        self.timeout = timeout
        self._upload: ssl.SSLSocket | None = None
        self._upload_lock = threading.Lock()
        self._broken: ServerError | None = None  # the upload connection failed: for good
        self._idle: list[ssl.SSLSocket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._has_cond = threading.Condition()  # guards the presence-check queue
        self._has_queue: list[_Ask] = []
        self._has_busy = False

    @property
    def where(self) -> str:
        return f"{self.address.host}:{self.address.port}"

    def open(self) -> None:
        """Connect once now (the first presence check's connection): a port that cannot
        be reached shows here, before the backup depends on it."""
        conn = self.connect()
        with self._lock:
            self._idle.append(conn)

    def connect(self) -> ssl.SSLSocket:
        """A new connection, past HELLO."""
        a = self.address
        try:
            raw = socket.create_connection((a.host, a.port), timeout=self.timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = self.context.wrap_socket(raw, server_hostname=a.host)
        except (OSError, ssl.SSLError) as exc:
            raise ServerError(f"cannot reach the kura server's data port {self.where}: {exc}",
                              hint="let the agent reach that port (see 'kura server "
                                   "--data-listen')") from exc
        try:
            hello = {"protocol": PROTOCOL, "session": a.session, "secret": a.secret}
            _send(conn, HELLO, json.dumps(hello).encode())
            self._answer(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _answer(self, conn: ssl.SSLSocket) -> bytes:
        head = memoryview(bytearray(HEADER.size))
        try:
            if not _recv_exact(conn, head):
                raise ConnectionError("the server closed the data connection")
            kind, length = HEADER.unpack(head)
            if length > MAX_PUT:
                raise ConnectionError(f"answer of {length} bytes is too large")
            payload = memoryview(bytearray(length))
            if length and not _recv_exact(conn, payload):
                raise ConnectionError("the server closed the data connection")
        except (OSError, ssl.SSLError) as exc:
            raise ServerError(f"lost the data connection to the kura server ({self.where}): "
                              f"{exc}") from exc
        if kind == OK:
            return bytes(payload)
        if kind != ERR:
            raise ServerError(f"the kura server's data port answered frame type {kind:#x}")
        try:
            err = json.loads(bytes(payload))
            status, message = int(err["status"]), str(err["message"])
        except (ValueError, KeyError, TypeError):
            status, message = 409, bytes(payload[:200]).decode(errors="replace")
        raise status_error(status, message, name=message, location="kura-server",
                           action="a chunk operation")

    def has(self, ids: Sequence[bytes]) -> set[bytes]:
        """Touch the stored chunks of ``ids`` (at most ``MAX_HAS``); returns the missing.

        Callers on several threads share round trips: while one presence check is on
        the wire, the others queue theirs, and the next one carries all that queued
        (up to ``MAX_HAS`` ids), on one connection. A backup's chunk workers each ask
        about one chunk at a time; this way they cost the server one question (and
        one connection) where they cost one per worker.
        """
        ask = _Ask(list(ids))
        with self._has_cond:
            self._has_queue.append(ask)
            while self._has_busy and not ask.done:
                self._has_cond.wait()
            if ask.done:
                return ask.outcome()
            self._has_busy = True  # this thread asks, for itself and whoever queued
        try:
            while not ask.done:
                with self._has_cond:
                    batch = self._take_asks()
                self._ask_for(batch)
        finally:
            with self._has_cond:
                self._has_busy = False
                self._has_cond.notify_all()
        return ask.outcome()

    def _take_asks(self) -> list[_Ask]:
        batch: list[_Ask] = []
        count = 0
        while self._has_queue and (not batch or
                                   count + len(self._has_queue[0].ids) <= MAX_HAS):
            batch.append(self._has_queue.pop(0))
            count += len(batch[-1].ids)
        return batch

    def _ask_for(self, batch: list[_Ask]) -> None:
        try:
            answer = self._ask(HAS, b"".join(c for a in batch for c in a.ids))
        except BaseException as exc:
            for a in batch:
                a.error = exc
        else:
            missing = {answer[i:i + ID_LEN] for i in range(0, len(answer), ID_LEN)}
            for a in batch:
                a.missing = missing.intersection(a.ids)
        with self._has_cond:
            for a in batch:
                a.done = True
            self._has_cond.notify_all()

    def get(self, chunk_id: bytes) -> bytes:
        """A stored chunk's blob (restore sessions)."""
        return self._ask(GET, chunk_id)

    def _ask(self, kind: int, payload: bytes) -> bytes:
        """One question and its answer, on an idle connection (or a new one)."""
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self.connect()
        try:
            _send(conn, kind, payload)
            answer = self._answer(conn)
        except RepositoryError:  # a refusal (see status_error): the connection is still good
            self._give_back(conn)
            raise
        except BaseException:
            conn.close()
            raise
        self._give_back(conn)
        return answer

    def _give_back(self, conn: ssl.SSLSocket) -> None:
        with self._lock:
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)

    def put(self, chunk_id: bytes, blob: bytes | bytearray | memoryview) -> None:
        """Send one chunk (no answer; a failure on the server shows at the next sync)."""
        with self._upload_lock:
            conn = self._upload_conn()
            try:
                conn.sendall(HEADER.pack(PUT, ID_LEN + len(blob)) + chunk_id)
                conn.sendall(blob)
            except (OSError, ssl.SSLError) as exc:
                raise self._break(f"lost the data connection to the kura server "
                                  f"({self.where}) while uploading: {exc}") from exc

    def sync(self) -> None:
        """Wait until every chunk put so far is durable on the server."""
        with self._upload_lock:
            if self._broken is not None:
                raise self._broken
            if self._upload is None:
                return  # nothing was put
            try:
                _send(self._upload, SYNC)
            except (OSError, ssl.SSLError) as exc:
                raise self._break(f"lost the data connection to the kura server "
                                  f"({self.where}): {exc}") from exc
            try:
                self._answer(self._upload)
            except ServerError as exc:
                raise self._break(exc.message) from exc

    def _upload_conn(self) -> ssl.SSLSocket:
        # Chunks sent on a connection that failed may be lost: no new one is opened,
        # every later put and sync fails (the backup ends without a restore point).
        if self._broken is not None:
            raise self._broken
        if self._upload is None:
            try:
                self._upload = self.connect()
            except ServerError as exc:
                raise self._break(exc.message) from exc
        return self._upload

    def _break(self, message: str) -> ServerError:
        self._broken = ServerError(message)
        self._drop_upload()
        return self._broken

    def _drop_upload(self) -> None:
        if self._upload is not None:
            with contextlib.suppress(OSError):
                self._upload.close()
            self._upload = None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            with contextlib.suppress(OSError):
                conn.close()
        with self._upload_lock:
            self._drop_upload()
