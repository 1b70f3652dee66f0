"""Source locks, writer registrations, concurrent writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kura.errors import LockedError
from kura.repository import Repository, SourceRef
from kura.repository.locks import live_writers, source_lock_name
from kura.repository.testing import TEST_CHUNK, make_repo

SRC = SourceRef("vm", "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "web01")


def test_same_source_is_locked(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    w = repo.begin_snapshot(SRC, node="a")
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        repo.begin_snapshot(SRC, node="b")
    assert len(live_writers(repo.store.backend)) == 1
    w.abort()
    assert live_writers(repo.store.backend) == []
    repo.begin_snapshot(SRC, node="b").commit()


def test_lock_names_are_safe() -> None:
    assert source_lock_name("a/../b") == "locks/source-a%2F%2E%2E%2Fb.lock"
    assert source_lock_name("é") == "locks/source-%C3%A9.lock"


def test_dead_holder_on_this_host_is_broken(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(proc.stdout)
    w = repo.begin_snapshot(SRC, node="a")
    lock = tmp_path / "r" / source_lock_name(SRC.key)
    doc = json.loads(lock.read_text())
    w._session._stop.set()  # simulate a process that died holding the lock
    w._pipeline.close()
    doc.update(pid=dead_pid, writer="dead")
    lock.write_text(json.dumps(doc))
    w2 = repo.begin_snapshot(SRC, node="b")
    assert json.loads(lock.read_text())["writer"] == w2.writer_id
    w2.commit()


def test_stale_heartbeat_is_broken_and_loser_cannot_commit(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    w = repo.begin_snapshot(SRC, node="a", heartbeat=3600)
    lock = tmp_path / "r" / source_lock_name(SRC.key)
    doc = json.loads(lock.read_text())
    doc["host"] = "elsewhere"
    lock.write_text(json.dumps(doc))
    old = time.time() - 7200
    os.utime(lock, (old, old))
    w2 = repo.begin_snapshot(SRC, node="b")
    with pytest.raises(LockedError, match="lost the lock"):
        w.commit()
    m = w2.commit()
    assert [s.id for s in repo.list_snapshots()] == [m.id]


def test_heartbeat_keeps_lock_fresh(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    w = repo.begin_snapshot(SRC, node="a", heartbeat=0.05)
    lock = tmp_path / "r" / source_lock_name(SRC.key)
    old = time.time() - 7200
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert lock.stat().st_mtime > time.time() - 60
    w.commit()


def test_concurrent_writers_of_different_sources(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    shared = os.urandom(TEST_CHUNK)
    errors: list[BaseException] = []

    def backup(i: int) -> None:
        try:
            r = Repository.open(tmp_path / "r", passphrase=b"correct horse battery staple")
            src = SourceRef("image", f"img{i}", f"img{i}")
            with r.begin_snapshot(src, node=f"node{i % 2}") as w:
                d = w.add_disk("disk", 8 * TEST_CHUNK)
                for c in range(8):
                    d.write_chunk(c, shared if c % 2 else os.urandom(TEST_CHUNK))
                w.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=backup, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(repo.list_snapshots()) == 6
    assert repo.verify().ok
    assert repo.info()["chunks"] == 6 * 4 + 1


def test_holder_in_another_pid_namespace_is_judged_by_heartbeat(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    w = repo.begin_snapshot(SRC, node="a")
    lock = tmp_path / "r" / source_lock_name(SRC.key)
    doc = json.loads(lock.read_text())
    doc.update(pid=999999, pidns="other-boot/pid:[1]")  # a container on this host
    lock.write_text(json.dumps(doc))
    with pytest.raises(LockedError):
        repo.begin_snapshot(SRC, node="b")
    w.abort()
