"""The data port's protocol, against a real server (TLS on a loopback port)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kura.errors import RepositoryError, ServerError, StorageFull
from kura.repository import Repository
from kura.repository.blob import MAGIC
from kura.repository.store import chunk_name
from kura.server import dataport
from kura.server.dataport import HEADER, DataAddress, DataChannel
from kura.server.sessions import Refused, Session
from kura.server.testing import RunningServer, start_server

CHUNK = 64 << 10


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[RunningServer, Repository, Session]]:
    """A server with its data port, and one open backup session (made directly)."""
    repo = Repository.init(tmp_path / "repo", passphrase=None, encryption="none",
                           chunk_size=CHUNK)
    srv = start_server(tmp_path / "server", repo=repo)
    mgr = srv.ctx.sessions
    assert mgr is not None and srv.ctx.data_port
    sess = Session(id="s1", agent_id="a1", task_id=1, vm_uuid="u", kind="backup",
                   visible=set(), batch=repo.store.backend.write_batch())
    mgr._sessions[sess.id] = sess
    yield srv, repo, sess
    srv.stop()


def _channel(srv: RunningServer, sess: Session, secret: str | None = None) -> DataChannel:
    assert srv.ctx.data_port
    with srv.client() as c:
        context = c.ssl_context
    return DataChannel(DataAddress("127.0.0.1", srv.ctx.data_port, sess.id,
                                   secret or sess.data_secret), context)


def _raw(srv: RunningServer) -> ssl.SSLSocket:
    """A bare TLS connection to the data port, to send what a client never would."""
    assert srv.ctx.data_port
    ctx = ssl.create_default_context(cafile=str(srv.files.ca))
    return ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.ctx.data_port), 10),
                           server_hostname="127.0.0.1")


def _frame(kind: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def _answer(conn: ssl.SSLSocket) -> tuple[int, bytes]:
    head = b""
    while len(head) < HEADER.size:
        part = conn.recv(HEADER.size - len(head))
        if not part:
            raise ConnectionError("closed")
        head += part
    kind, length = HEADER.unpack(head)
    body = b""
    while len(body) < length:
        body += conn.recv(length - len(body))
    return kind, body


def test_chunks_go_up_and_are_durable_after_sync(
        served: tuple[RunningServer, Repository, Session]) -> None:
    srv, repo, sess = served
    backend = repo.store.backend
    stored = b"\x01" * 32
    backend.write(chunk_name(stored), MAGIC + b"old")
    ch = _channel(srv, sess)
    ch.open()
    new = [bytes([0x10 + i]) * 32 for i in range(3)]
    # Presence: the stored chunk is touched and remembered; the rest is missing.
    assert ch.has([stored, *new]) == set(new)
    assert sess.present == {stored}
    blobs = {cid: MAGIC + os.urandom(CHUNK) for cid in new}
    for cid, blob in blobs.items():
        ch.put(cid, memoryview(blob))
    ch.sync()
    assert sess.uploaded == set(new)
    for cid, blob in blobs.items():
        assert backend.read(chunk_name(cid)) == blob
    assert ch.has(new) == set()
    ch.close()


def test_a_wrong_secret_or_a_closed_session_is_refused(
        served: tuple[RunningServer, Repository, Session]) -> None:
    srv, _, sess = served
    with pytest.raises(RepositoryError, match="no open session"):
        _channel(srv, sess, secret="00" * 32).open()
    bad = _channel(srv, sess)
    bad.address = DataAddress("127.0.0.1", bad.address.port, "nope", sess.data_secret)
    with pytest.raises(RepositoryError, match="no open session"):
        bad.open()
    ch = _channel(srv, sess)
    ch.open()
    ch.put(b"\x01" * 32, MAGIC + b"early")
    assert srv.ctx.sessions is not None
    srv.ctx.sessions._close(sess, "test")  # aborted while the agent is connected
    ch.put(b"\x02" * 32, MAGIC + b"late")
    with pytest.raises(RepositoryError, match="no open session"):
        ch.sync()
    with pytest.raises(RepositoryError, match="no open session"):
        ch.has([b"\x02" * 32])
    with pytest.raises(RepositoryError, match="no open session"):
        _channel(srv, sess).put(b"\x03" * 32, MAGIC + b"new connection")


def test_a_failed_put_is_told_at_the_next_answer(
        served: tuple[RunningServer, Repository, Session],
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _, sess = served
    ch = _channel(srv, sess)
    ch.put(b"\x03" * 32, b"not a kura blob")
    ch.put(b"\x04" * 32, MAGIC + b"fine, but after a failure")  # read and dropped
    with pytest.raises(RepositoryError, match="is not a kura blob"):
        ch.sync()
    with pytest.raises(RepositoryError, match="is not a kura blob"):
        ch.sync()  # and again: nothing after the failure was stored
    assert sess.uploaded == set()
    # A full disk on the server comes back as StorageFull, as over HTTPS.
    assert sess.batch is not None

    def full(name: str, data: Any) -> None:
        raise StorageFull("no space left on the repository's disk")
    monkeypatch.setattr(sess.batch, "put", full)
    ch2 = _channel(srv, sess)
    ch2.put(b"\x05" * 32, MAGIC + b"x")
    with pytest.raises(StorageFull):
        ch2.sync()


def test_malformed_frames_end_the_connection_with_a_reason(
        served: tuple[RunningServer, Repository, Session]) -> None:
    srv, _, sess = served
    hello = json.dumps({"protocol": 1, "session": sess.id,
                        "secret": sess.data_secret}).encode()
    cases: list[tuple[bytes, str]] = [
        (HEADER.pack(dataport.HAS, 32) + b"\x00" * 32, "first frame must be HELLO"),
        (HEADER.pack(dataport.HELLO, 5) + b"{bad}", "malformed HELLO"),
        (HEADER.pack(dataport.HELLO, 10 ** 6), "larger than"),
        (_frame(dataport.HELLO, json.dumps({"protocol": 9, "session": "s",
                                            "secret": "x"}).encode()), "protocol 9"),
    ]
    after_hello: list[tuple[bytes, str]] = [
        (HEADER.pack(0x33, 0), "unknown frame type"),
        (HEADER.pack(dataport.HAS, 31) + b"\x00" * 31, "HAS needs"),
        (HEADER.pack(dataport.PUT, 0xFFFFFFFF), "larger than"),
    ]
    for frame, reason in cases + [(HEADER.pack(dataport.HELLO, len(hello)) + hello + f, r)
                                  for f, r in after_hello]:
        with _raw(srv) as conn:
            conn.sendall(frame)
            kind, body = _answer(conn)
            if frame.startswith(HEADER.pack(dataport.HELLO, len(hello)) + hello):
                assert kind == dataport.OK
                kind, body = _answer(conn)
            assert kind == dataport.ERR, reason
            assert reason in json.loads(body)["message"]
            assert conn.recv(1) == b""  # and the server hung up
    # The port still serves after all that.
    ch = _channel(srv, sess)
    assert ch.has([b"\x06" * 32]) == {b"\x06" * 32}


def test_a_lost_upload_connection_fails_every_later_put_and_sync(
        served: tuple[RunningServer, Repository, Session]) -> None:
    srv, _, sess = served
    ch = _channel(srv, sess)
    ch.put(b"\x07" * 32, MAGIC + b"a")
    upload = ch._upload
    assert upload is not None
    upload.close()  # as if the network dropped it
    with pytest.raises(ServerError, match="lost the data connection"):
        ch.put(b"\x08" * 32, MAGIC + b"b")
    with pytest.raises(ServerError, match="lost the data connection"):
        ch.put(b"\x09" * 32, MAGIC + b"c")  # no silent reconnect: chunks may be lost
    with pytest.raises(ServerError, match="lost the data connection"):
        ch.sync()


def test_an_unreachable_data_port_says_so() -> None:
    from kura.server.testing import free_port

    ch = DataChannel(DataAddress("127.0.0.1", free_port(), "s", "x"),
                     ssl.create_default_context(), timeout=2)
    with pytest.raises(ServerError, match="cannot reach the kura server's data port"):
        ch.open()


def test_a_restore_session_reads_chunks_and_a_backup_session_cannot(
        served: tuple[RunningServer, Repository, Session]) -> None:
    from kura.repository import ObjectNotFound

    srv, repo, backup = served
    assert srv.ctx.sessions is not None
    stored = b"\x0a" * 32
    blob = MAGIC + os.urandom(3 * CHUNK)  # larger than a presence check's answer
    repo.store.backend.write(chunk_name(stored), blob)
    restore = Session(id="r1", agent_id="a1", task_id=2, vm_uuid="u", kind="restore",
                      visible=set())
    srv.ctx.sessions._sessions[restore.id] = restore
    ch = _channel(srv, restore)
    assert ch.get(stored) == blob
    with pytest.raises(ObjectNotFound):
        ch.get(b"\x0b" * 32)
    assert ch.get(stored) == blob  # the connection stays good after a refusal
    with pytest.raises(RepositoryError, match="may not read"):
        _channel(srv, backup).get(stored)
    with pytest.raises(RepositoryError, match="writes nothing"):  # and a restore can't write
        ch.put(b"\x0c" * 32, MAGIC + b"x")
        ch.sync()


def test_concurrent_presence_checks_share_round_trips_and_one_connection(
        served: tuple[RunningServer, Repository, Session],
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv, repo, sess = served
    stored = [bytes([0x40 + i]) * 32 for i in range(8)]
    for cid in stored:
        repo.store.backend.write(chunk_name(cid), MAGIC + b"old")
    mgr = srv.ctx.sessions
    assert mgr is not None
    real = mgr.touch_chunks
    questions: list[int] = []
    first = threading.Event()

    def slow_touch(s: Session, ids: list[bytes]) -> list[bytes]:
        questions.append(len(ids))
        if len(questions) == 1:  # hold the first question until the others queue
            first.wait(5)
        return real(s, ids)

    monkeypatch.setattr(mgr, "touch_chunks", slow_touch)
    ch = _channel(srv, sess)
    ch.open()
    asks = [[stored[i], bytes([0x80 + i]) * 32] for i in range(8)]
    answers: dict[int, set[bytes]] = {}

    def ask(i: int) -> None:
        answers[i] = ch.has(asks[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    threads[0].start()
    while not questions:
        time.sleep(0.01)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    first.set()
    for t in threads:
        t.join(10)
    # Every caller gets its own answer; the seven that queued went in one question.
    assert answers == {i: {asks[i][1]} for i in range(8)}
    assert questions == [2, 14]
    assert len(ch._idle) == 1  # one connection carried them all
    ch.close()


def test_a_refused_presence_check_fails_every_caller_it_carried(
        served: tuple[RunningServer, Repository, Session],
        monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _repo, sess = served
    mgr = srv.ctx.sessions
    assert mgr is not None
    monkeypatch.setattr(mgr, "touch_chunks", lambda s, ids: (_ for _ in ()).throw(
        Refused("this session is closed")))
    ch = _channel(srv, sess)
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            ch.has([bytes([i]) * 32])
        except RepositoryError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(errors) == 4 and all("closed" in str(e) for e in errors)
    ch.close()
