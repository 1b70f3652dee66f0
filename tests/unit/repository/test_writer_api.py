"""Writer life cycle and the hooks a remote data path uses (ChunkSink, low-level calls)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from kura.errors import IntegrityError, SnapshotNotFound, StorageFull, UsageError
from kura.repository import LocalBackend, Repository, SourceRef, StoreSink
from kura.repository.store import chunk_name
from kura.repository.testing import TEST_CHUNK, FaultyBackend, make_repo, write_disk

CS = TEST_CHUNK
SRC = SourceRef("image", "img", "img")


class RecordingSink:
    """A sink as a remote agent would use: the blobs go 'over the wire' to put()."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.puts: list[bytes] = []
        self.flushed = 0

    def has(self, chunk_id: bytes) -> bool:
        return self.repo.has_chunk(chunk_id)

    def has_many(self, chunk_ids: Sequence[bytes]) -> set[bytes]:
        return {c for c in chunk_ids if not self.repo.has_chunk(c)}

    def put(self, chunk_id: bytes, blob: bytes | bytearray) -> None:
        # the server side checks what it stores
        assert self.repo.open_chunk(chunk_id, bytes(blob))
        self.repo.store_chunk_blob(chunk_id, bytes(blob))
        self.puts.append(chunk_id)

    def flush(self) -> None:
        self.flushed += 1

    def discard(self) -> None:
        pass


class BrokenSink(StoreSink):
    """Every store fails, as a cut connection would."""

    def put(self, chunk_id: bytes, blob: bytes | bytearray) -> None:
        raise IntegrityError("the wire broke")


def test_custom_sink(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    sink = RecordingSink(repo)
    data = os.urandom(CS) * 2 + os.urandom(CS)
    with repo.begin_snapshot(SRC, node="n", sink=sink) as w:
        d = w.add_disk("disk", len(data))
        for i in range(3):
            d.write_chunk(i, data[i * CS:(i + 1) * CS])
        m = w.commit()
    assert len(sink.puts) == 2 and sink.flushed >= 1
    assert repo.open_disk(m, "disk").pread(0, len(data)) == data


def test_low_level_hooks(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    data = b"chunk data" * 100
    cid = repo.chunk_id(data)
    blob = repo.seal_chunk(cid, data)
    assert not repo.has_chunk(cid)
    repo.store_chunk_blob(cid, bytes(blob))
    assert repo.has_chunk(cid)
    assert repo.open_chunk(cid, bytes(blob)) == data
    with pytest.raises(IntegrityError):
        repo.open_chunk(repo.chunk_id(b"other"), bytes(blob))


def test_exception_in_with_block_aborts(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    with pytest.raises(RuntimeError), repo.begin_snapshot(SRC, node="n") as w:
        w.add_disk("disk", CS).write_chunk(0, os.urandom(CS))
        raise RuntimeError("boom")
    assert repo.list_snapshots() == []
    assert list((tmp_path / "r" / "locks").iterdir()) == []
    assert list((tmp_path / "r" / "writers").iterdir()) == []
    tmp = tmp_path / "r" / "tmp"  # the staged, never committed chunk is gone too
    assert not tmp.exists() or list(tmp.iterdir()) == []
    assert list(repo.store.backend.list("chunks")) == []
    with pytest.raises(UsageError, match="aborted"):
        w.commit()
    write_disk(repo, "img", b"x" * 10)  # the source is free again


def test_parent_removed_before_start(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    m = write_disk(repo, "img", b"x" * 10)
    repo.forget(m.id)
    with pytest.raises(SnapshotNotFound, match="full backup"):
        repo.begin_snapshot(SRC, node="n", parent=m, kind="incremental")
    assert list((tmp_path / "r" / "locks").iterdir()) == []


def test_parent_checks(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    other = write_disk(repo, "other", b"x" * 10)
    with pytest.raises(UsageError, match="belongs to source"):
        repo.begin_snapshot(SRC, node="n", parent=other)
    with pytest.raises(UsageError, match="kind"):
        repo.begin_snapshot(SRC, node="n", kind="differential")
    m = write_disk(repo, "img", b"x" * 10)
    failed = repo.store.load_manifest(m.id)
    with pytest.raises(UsageError, match="failed verification"):
        repo.begin_snapshot(SRC, node="n", parent=replace(failed, verify_state="failed"))
    with repo.begin_snapshot(SRC, node="n") as w:
        with pytest.raises(UsageError, match="needs a parent"):
            w.add_disk("disk", 10, base=m.disks[0])
        w.abort()


def test_worker_error_surfaces(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")

    with repo.begin_snapshot(SRC, node="n", sink=BrokenSink(repo.store)) as w:
        d = w.add_disk("disk", 4 * CS)
        with pytest.raises(IntegrityError, match="wire broke"):
            for i in range(4):
                d.write_chunk(i, os.urandom(CS))
            d.finish()
        with pytest.raises(IntegrityError):
            w.commit()
    assert repo.list_snapshots() == []


@pytest.mark.parametrize("fail_on", ["chunks/", "indexes/", "snapshots/"])
def test_storage_full_at_any_step_leaves_no_restore_point(tmp_path: Path, fail_on: str) -> None:
    repo = make_repo(tmp_path / "r")
    first = write_disk(repo, "img", os.urandom(2 * CS))
    armed = {"on": False}

    def hook(name: str) -> None:
        if armed["on"] and name.startswith(fail_on):
            raise StorageFull(f"no space left while writing {name}")

    faulty = Repository.open(FaultyBackend(LocalBackend(tmp_path / "r"), before_write=hook),
                             passphrase=b"correct horse battery staple")
    armed["on"] = True
    with pytest.raises(StorageFull, match=fail_on):
        write_disk(faulty, "img", os.urandom(3 * CS), parent=first)
    assert [m.id for m in repo.list_snapshots()] == [first.id]
    assert repo.verify().ok
    assert list((tmp_path / "r" / "locks").iterdir()) == []
    armed["on"] = False
    write_disk(faulty, "img", os.urandom(CS))  # works again once there is space


class Buffers:
    """Reused chunk buffers, as the NBD reader hands them out: a released buffer is
    scribbled over at once, so any use after release would store wrong data."""

    def __init__(self) -> None:
        self.free: list[bytearray] = []
        self.out = 0
        self.releases = 0

    def take(self, data: bytes) -> tuple[memoryview, Callable[[], None]]:
        buf = self.free.pop() if self.free else bytearray(CS)
        buf[:len(data)] = data
        self.out += 1
        given = []

        def release() -> None:
            assert not given, "released twice"
            given.append(1)
            self.releases += 1
            self.out -= 1
            buf[:] = b"\xee" * len(buf)
            self.free.append(buf)

        return memoryview(buf)[:len(data)], release


def test_release_is_called_once_when_the_data_is_no_longer_used(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    bufs = Buffers()
    same = os.urandom(CS)
    chunks = [same, bytes(CS), same, os.urandom(CS), b"t" * CS, same, os.urandom(CS // 2)]
    data = b"".join(chunks)
    with repo.begin_snapshot(SRC, node="n", workers=3) as w:
        d = w.add_disk("disk", len(data))
        for i, c in enumerate(chunks):
            view, release = bufs.take(c)
            d.write_chunk(i, view, release)
        with pytest.raises(UsageError, match="expected"):
            view, release = bufs.take(b"short")
            d.write_chunk(0, view, release)
        m = w.commit()
    assert bufs.out == 0 and bufs.releases == len(chunks) + 1
    assert len(bufs.free) <= 2 * 3 + 1  # the writer's window bounds the buffers in use
    assert repo.open_disk(m, "disk").pread(0, len(data)) == data
    assert repo.verify().ok


def test_release_happens_when_storing_fails(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    bufs = Buffers()

    with repo.begin_snapshot(SRC, node="n", sink=BrokenSink(repo.store)) as w:
        d = w.add_disk("disk", 8 * CS)
        with pytest.raises(IntegrityError, match="wire broke"):
            for i in range(8):
                view, release = bufs.take(os.urandom(CS))
                d.write_chunk(i, view, release)
            d.finish()
        w.abort()
    assert bufs.out == 0


def test_store_sink_has_many_touches_present_and_returns_missing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    data = [os.urandom(CS) for _ in range(3)]
    write_disk(repo, "img", b"".join(data))
    ids = [repo.chunk_id(d) for d in data]
    for cid in ids:
        os.utime(tmp_path / "r" / chunk_name(cid), (1000, 1000))
    absent = [repo.chunk_id(b"not stored %d" % i) for i in range(2)]
    sink = StoreSink(repo.store)
    assert sink.has_many([absent[0], *ids, absent[1]]) == set(absent)
    assert sink.has_many([]) == set()
    for cid in ids:  # touched: the GC mark
        assert (tmp_path / "r" / chunk_name(cid)).stat().st_mtime > 1000
    assert not any(repo.store.backend.exists(chunk_name(c)) for c in absent)


def test_inherited_chunks_are_touched_in_batches(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from kura.repository import writer

    repo = make_repo(tmp_path / "r")
    data = os.urandom(7 * CS)
    m1 = write_disk(repo, "img", data)
    monkeypatch.setattr(writer, "TOUCH_BATCH", 3)
    calls: list[int] = []
    real = StoreSink.has_many

    def counting(self: StoreSink, chunk_ids: Sequence[bytes]) -> set[bytes]:
        calls.append(len(chunk_ids))
        return real(self, chunk_ids)
    monkeypatch.setattr(StoreSink, "has_many", counting)
    monkeypatch.setattr(StoreSink, "has", lambda self, cid: pytest.fail("per-chunk touch"))
    m2 = write_disk(repo, "img", data, parent=m1, base=m1.disks[0], only=[])
    assert sorted(calls) == [1, 3, 3]
    assert repo.open_disk(m2, "disk").pread(0, len(data)) == data
    # A missing inherited chunk fails the backup with the same error as before,
    # naming the first missing id (in id order) and the remedy.
    ids = sorted({repo.chunk_id(data[i * CS:(i + 1) * CS]) for i in range(7)})
    for cid in (ids[5], ids[2]):
        (tmp_path / "r" / chunk_name(cid)).unlink()
    calls.clear()
    w = repo.begin_snapshot(SRC, node="n", parent=m2, kind="incremental")
    w.add_disk("disk", len(data), base=m2.disks[0])
    with pytest.raises(IntegrityError, match=f"2 chunk\\(s\\) of the parent restore point "
                       f"are missing from the repository \\(first: {ids[2].hex()}\\)") as exc:
        w.commit()
    assert exc.value.hint is not None and "--full" in exc.value.hint
    assert sorted(calls) == [1, 3, 3]
    assert [m.id for m in repo.list_snapshots()] == [m1.id, m2.id]
