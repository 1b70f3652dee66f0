"""Garbage collection, including while backups run."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from kura.errors import RepositoryError
from kura.repository import Repository, RetentionPolicy, SourceRef
from kura.repository.store import chunk_name
from kura.repository.testing import TEST_CHUNK, make_repo, write_disk

CS = TEST_CHUNK


def age_everything(root: Path, seconds: float = 3600) -> None:
    old = time.time() - seconds
    for p in root.rglob("*"):
        if p.is_file():
            os.utime(p, (old, old))


def test_gc_frees_only_unreferenced(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    keep = write_disk(repo, "a", os.urandom(2 * CS))
    gone = write_disk(repo, "a", os.urandom(3 * CS))
    repo.forget(gone.id)
    age_everything(tmp_path / "r")
    dry = repo.gc(dry_run=True)
    assert (dry.chunks_removed, dry.chunks_referenced) == (3, 2)
    assert repo.info()["chunks"] == 5
    res = repo.gc()
    assert (res.chunks_removed, res.chunks_referenced, res.snapshots) == (3, 2, 1)
    assert repo.info()["chunks"] == 2
    assert repo.verify().ok and repo.open_disk(keep.id, "disk").pread(0, 1)


def test_recent_unreferenced_chunks_survive_grace(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    gone = write_disk(repo, "a", os.urandom(CS))
    repo.forget(gone.id)
    res = repo.gc()  # default grace: 5 minutes
    assert (res.chunks_removed, res.chunks_recent) == (0, 1)


def test_gc_in_the_middle_of_a_backup(tmp_path: Path) -> None:
    """A chunk written or re-used by an in-flight backup is never deleted."""
    repo = make_repo(tmp_path / "r")
    old_data = [os.urandom(CS) for _ in range(4)]
    old = write_disk(repo, "img", b"".join(old_data))
    repo.forget(old.id)  # its chunks are now garbage...
    age_everything(tmp_path / "r")  # ...and old enough to be collected
    new_data = [old_data[0], os.urandom(CS), old_data[1], os.urandom(CS), old_data[2]]
    w = repo.begin_snapshot(SourceRef("image", "img", "img"), node="n")
    d = w.add_disk("disk", len(new_data) * CS)
    d.write_chunk(0, new_data[0])  # re-uses an old garbage chunk (touch)
    d.write_chunk(1, new_data[1])  # new chunk
    d._wait()
    gc1 = repo.gc(grace_seconds=0)  # GC in the middle of the backup
    assert gc1.chunks_removed == 3  # old_data[1:4]: not (yet) used by the backup
    d.write_chunk(2, new_data[2])  # its old copy was just deleted: stored again
    d.write_chunk(3, new_data[3])
    gc2 = repo.gc(grace_seconds=0)
    d.write_chunk(4, new_data[4])  # re-use after another GC
    m = w.commit()
    assert repo.open_disk(m.id, "disk").pread(0, len(new_data) * CS) == b"".join(new_data)
    assert gc2.chunks_removed == 0
    assert repo.verify().ok
    age_everything(tmp_path / "r")
    assert repo.gc(grace_seconds=0).chunks_removed == 0  # everything referenced now


def test_touch_racing_with_sweep_puts_chunk_back(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "r")
    data = os.urandom(CS)
    old = write_disk(repo, "img", data)
    repo.forget(old.id)
    age_everything(tmp_path / "r")
    backend = repo.store.backend
    real_rename = backend.rename
    cname = chunk_name(repo.chunk_id(data))

    def rename(src: str, dst: str) -> None:
        if src == cname:  # a writer re-uses the chunk between GC's stat and rename
            assert repo.has_chunk(repo.chunk_id(data))
        real_rename(src, dst)

    monkeypatch.setattr(backend, "rename", rename)
    res = repo.gc(grace_seconds=0)
    assert res.chunks_removed == 0
    assert backend.exists(cname)


def test_concurrent_gc_loop_and_backups(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    pool = [os.urandom(CS) for _ in range(6)]
    for i in range(3):  # garbage that shares data with the backups below
        m = write_disk(repo, f"old{i}", b"".join(pool[i * 2:i * 2 + 2]))
        repo.forget(m.id)
    age_everything(tmp_path / "r")
    stop = threading.Event()
    errors: list[BaseException] = []

    def gc_loop() -> None:
        r = Repository.open(tmp_path / "r", passphrase=b"correct horse battery staple")
        while not stop.is_set():
            try:
                r.gc(grace_seconds=0)
            except BaseException as exc:  # a concurrent gc holds the lock: fine
                if "garbage collection is locked" not in str(exc):
                    errors.append(exc)

    t = threading.Thread(target=gc_loop)
    t.start()
    try:
        results = []
        for round_ in range(5):
            data = b"".join(pool[(round_ + k) % 6] for k in range(6))
            results.append((write_disk(repo, f"vm{round_}", data), data))
    finally:
        stop.set()
        t.join()
    assert errors == []
    for m, data in results:
        assert repo.open_disk(m.id, "disk").pread(0, len(data)) == data
    assert repo.verify().ok


def test_prune_keeps_parent_of_running_backup(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    m1 = write_disk(repo, "img", os.urandom(2 * CS))
    m2 = write_disk(repo, "img", os.urandom(2 * CS))
    w = repo.begin_snapshot(SourceRef("image", "img", "img"), node="n", parent=m1,
                            kind="incremental")
    w.add_disk("disk", 2 * CS, base=m1.disks[0])
    res = repo.prune(RetentionPolicy(keep_last=1), dry_run=False)
    assert [m.id for m in res.kept] == [m2.id, m1.id]
    assert "parent of a running backup" in res.decisions[1].reasons
    age_everything(tmp_path / "r")
    repo.gc(grace_seconds=0)
    m3 = w.commit()
    assert repo.verify([m3.id]).ok


def test_inherited_chunk_missing_fails_the_backup(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    data = os.urandom(2 * CS)
    m1 = write_disk(repo, "img", data)
    (tmp_path / "r" / chunk_name(repo.chunk_id(data[:CS]))).unlink()
    w = repo.begin_snapshot(SourceRef("image", "img", "img"), node="n", parent=m1,
                            kind="incremental")
    w.add_disk("disk", 2 * CS, base=m1.disks[0])
    with pytest.raises(Exception, match="missing from the repository"):
        w.commit()
    assert [m.id for m in repo.list_snapshots()] == [m1.id]
    assert list((tmp_path / "r" / "locks").iterdir()) == []


def test_gc_cleans_leftovers_of_dead_backups(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    w = repo.begin_snapshot(SourceRef("image", "img", "img"), node="n")
    d = w.add_disk("disk", 2 * CS)
    d.write_chunk(0, os.urandom(CS))
    d.write_chunk(1, os.urandom(CS))
    d.finish()  # index written, but the process "dies" before the manifest
    w._session._stop.set()
    w._pipeline.close()
    (tmp_path / "r" / "tmp" / "leftover.tmp").write_bytes(b"x")
    assert repo.list_snapshots() == []
    res = repo.gc(grace_seconds=0)
    assert res.chunks_removed == 0 and res.indexes_removed == 0  # writer looks alive
    age_everything(tmp_path / "r")  # heartbeat stops: the writer is dead
    res = repo.gc(grace_seconds=0)
    assert (res.chunks_removed, res.indexes_removed, res.tmp_removed, res.writers_removed) == (
        2, 1, 1, 1)
    assert repo.info()["chunks"] == 0


def test_gc_refuses_with_damaged_manifest(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    m = write_disk(repo, "img", os.urandom(CS))
    (tmp_path / "r" / "snapshots" / f"{m.id}.manifest").write_bytes(b"junk")
    fresh = Repository.open(tmp_path / "r", passphrase=b"correct horse battery staple")
    age_everything(tmp_path / "r")
    with pytest.raises(RepositoryError, match=f"cannot read restore point {m.id}"):
        fresh.gc(grace_seconds=0)
    assert fresh.info()["chunks"] == 1
