"""Group commit (write batches), O_DIRECT writes, and the write ordering they must keep."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from kura.errors import RepositoryError, StorageFull
from kura.repository import backend as backend_mod
from kura.repository.backend import DIRECT_MIN, LocalBackend
from kura.repository.testing import TEST_CHUNK, make_repo, write_disk


def test_staged_objects_are_invisible_until_commit(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "r")
    batch = b.write_batch()
    data = os.urandom(3 * TEST_CHUNK + 5)
    batch.put("chunks/ab/one", data)
    batch.put("chunks/cd/two", b"small")
    assert not b.exists("chunks/ab/one") and not b.exists("chunks/cd/two")
    assert len(list(b.list("tmp"))) == 2
    batch.commit()
    assert b.read("chunks/ab/one") == data and b.read("chunks/cd/two") == b"small"
    assert list(b.list("tmp")) == []
    batch.commit()  # an empty commit is fine


def test_discard_leaves_nothing(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "r")
    batch = b.write_batch()
    batch.put("chunks/ab/one", os.urandom(DIRECT_MIN * 2))
    batch.discard()
    batch.commit()
    assert not b.exists("chunks/ab/one") and list(b.list("tmp")) == []


def test_batch_commits_itself_when_full(tmp_path: Path) -> None:
    b = LocalBackend(tmp_path / "r")
    batch = b.write_batch(limit=3)
    for i in range(7):
        batch.put(f"chunks/0{i}/x", bytes([i]) * 10)
    assert [b.exists(f"chunks/0{i}/x") for i in range(7)] == [True] * 6 + [False]
    batch.commit()
    assert b.read("chunks/06/x") == bytes([6]) * 10


@pytest.mark.parametrize("size", [DIRECT_MIN - 1, DIRECT_MIN, DIRECT_MIN + 1, 4096 * 33,
                                  (4 << 20) + 4096 + 17, (9 << 20) + 3])
@pytest.mark.parametrize("direct", [True, False])
def test_large_objects_read_back_exactly(tmp_path: Path, size: int, direct: bool) -> None:
    b = LocalBackend(tmp_path / "r", direct=direct)
    data = os.urandom(size)
    b.write("obj/a", data)
    batch = b.write_batch()
    batch.put("obj/b", bytearray(data))
    batch.commit()
    assert b.read("obj/a") == data and b.read("obj/b") == data
    assert b.stat("obj/b").size == size


def test_no_o_direct_falls_back_to_buffered(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)
    monkeypatch.setattr(backend_mod.os, "open", no_direct)
    b = LocalBackend(tmp_path / "r")
    data = os.urandom(DIRECT_MIN * 3 + 1)
    b.write("obj/a", data)
    assert b.read("obj/a") == data
    assert list(b.list("tmp")) == []


def test_failed_commit_keeps_failing_and_shows_nothing(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    b = LocalBackend(tmp_path / "r")
    batch = b.write_batch()
    batch.put("chunks/ab/one", b"x" * 100)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(backend_mod.os, "fsync", full)
    with pytest.raises(StorageFull):
        batch.commit()
    monkeypatch.setattr(backend_mod.os, "fsync", real_fsync)
    assert not b.exists("chunks/ab/one") and list(b.list("tmp")) == []
    batch.put("chunks/cd/two", b"y")
    with pytest.raises(RepositoryError):
        batch.commit()  # a writer never learns that only part of its chunks is durable


class Recorder:
    """Instruments the local backend's system calls: fsync (by path), rename."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.events: list[tuple[str, str]] = []
        self.source: dict[str, str] = {}  # renamed-to name -> the temporary file it was
        real_fsync, real_rename = os.fsync, os.rename

        def fsync(fd: int) -> None:
            real_fsync(fd)
            self.events.append(("fsync", self._rel(os.readlink(f"/proc/self/fd/{fd}"))))

        def rename(src: str | Path, dst: str | Path) -> None:
            real_rename(src, dst)
            self.source[self._rel(str(dst))] = self._rel(str(src))
            self.events.append(("rename", self._rel(str(dst))))
        monkeypatch.setattr(backend_mod.os, "fsync", fsync)
        monkeypatch.setattr(backend_mod.os, "rename", rename)

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root) if path.startswith(str(self.root)) else path

    def first(self, kind: str, name: str) -> int:
        return next(i for i, e in enumerate(self.events) if e == (kind, name))


def test_chunks_are_durable_before_the_index_and_manifest(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """The write ordering (docs/design.md) with group commit: every chunk's file is
    fsynced before it is renamed into place, and renamed and its directory fsynced
    before the index naming it is renamed into place; indexes before the manifest."""
    repo = make_repo(tmp_path / "r")
    root = tmp_path / "r"
    rec = Recorder(root, monkeypatch)
    data = os.urandom(TEST_CHUNK * 9 + 100)
    m = write_disk(repo, "img", data)
    assert repo.open_disk(m, "disk").pread(0, len(data)) == data
    chunk_files = sorted(str(p.relative_to(root)) for p in (root / "chunks").rglob("*")
                         if p.is_file())
    assert len(chunk_files) == 10
    index = next(e[1] for e in rec.events if e[0] == "rename" and e[1].startswith("indexes/"))
    manifest = next(e[1] for e in rec.events
                    if e[0] == "rename" and e[1].startswith("snapshots/"))
    index_at, manifest_at = rec.first("rename", index), rec.first("rename", manifest)
    assert index_at < manifest_at
    renames = {e[1]: i for i, e in enumerate(rec.events) if e[0] == "rename"}
    for name in chunk_files:
        at = renames[name]
        assert at < index_at, f"{name} became visible after its index"
        # the file was fsynced (under its temporary name) before the rename
        assert ("fsync", rec.source[name]) in rec.events[:at], f"{name} renamed unsynced"
        folder = name.rsplit("/", 1)[0]
        dir_syncs = [i for i, e in enumerate(rec.events) if e == ("fsync", folder)]
        assert any(at < i < index_at for i in dir_syncs), f"{folder} not fsynced before index"
    # one group commit: every chunk file was fsynced before the first chunk was renamed
    first_chunk_rename = min(renames[n] for n in chunk_files)
    for name in chunk_files:
        assert ("fsync", rec.source[name]) in rec.events[:first_chunk_rename]
