"""Conformance suite of the Backend protocol (every backend must pass it)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kura.errors import StorageFull, UsageError
from kura.repository.backend import Backend, LocalBackend, ObjectNotFound, open_backend
from kura.repository.testing import check_backend


@pytest.fixture(params=["local"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return LocalBackend(tmp_path / "repo")


def test_conformance_suite(backend: Backend) -> None:
    check_backend(backend)


def test_write_read_roundtrip(backend: Backend) -> None:
    backend.write("a/b/c", b"hello")
    assert backend.read("a/b/c") == b"hello"
    backend.write("a/b/c", b"again")
    assert backend.read("a/b/c") == b"again"
    assert backend.exists("a/b/c")
    assert backend.stat("a/b/c").size == 5


def test_missing_object(backend: Backend) -> None:
    with pytest.raises(ObjectNotFound) as exc:
        backend.read("nope/x")
    assert "nope/x" in str(exc.value)
    with pytest.raises(ObjectNotFound):
        backend.stat("nope/x")
    assert not backend.exists("nope/x")
    assert backend.touch("nope/x") is False
    backend.delete("nope/x")  # missing is fine


def test_create_is_exclusive(backend: Backend) -> None:
    assert backend.create("locks/l", b"1") is True
    assert backend.create("locks/l", b"2") is False
    assert backend.read("locks/l") == b"1"


def test_list_recursive_and_sorted(backend: Backend) -> None:
    for name in ("d/2/y", "d/1/x", "d/1/w", "e/z"):
        backend.write(name, b"")
    assert list(backend.list("d")) == ["d/1/w", "d/1/x", "d/2/y"]
    assert list(backend.list("missing")) == []


def test_touch_sets_mtime(backend: Backend) -> None:
    backend.write("t", b"x")
    old = time.time() - 3600
    if isinstance(backend, LocalBackend):
        os.utime(backend.root / "t", (old, old))
    assert backend.stat("t").mtime < time.time() - 1000
    assert backend.touch("t") is True
    assert backend.stat("t").mtime > time.time() - 60


def test_rename_and_delete(backend: Backend) -> None:
    backend.write("a/x", b"1")
    backend.rename("a/x", "b/y")
    assert not backend.exists("a/x")
    assert backend.read("b/y") == b"1"
    with pytest.raises(ObjectNotFound):
        backend.rename("a/x", "c/z")
    backend.write("dir/one", b"")
    backend.write("dir/sub/two", b"")
    backend.delete("dir")
    assert list(backend.list("dir")) == []


def test_no_temporary_files_left(backend: Backend) -> None:
    for i in range(5):
        backend.write(f"o/{i}", os.urandom(100))
    backend.create("o/c", b"x")
    assert list(backend.list("tmp")) == []


@pytest.mark.parametrize("name", ["", "/abs", "a/../b", "a//b", ".", "nul\x00byte", "x" * 2000])
def test_invalid_names(backend: Backend, name: str) -> None:
    with pytest.raises(UsageError):
        backend.read(name)


def test_open_backend(tmp_path: Path) -> None:
    b = open_backend(str(tmp_path))
    assert isinstance(b, LocalBackend) and b.root == tmp_path
    b2 = open_backend(f"file://{tmp_path}")
    assert isinstance(b2, LocalBackend) and b2.root == tmp_path
    assert open_backend(b) is b
    with pytest.raises(UsageError):
        open_backend("s3://bucket/x")
    with pytest.raises(UsageError):
        open_backend("file://host/x")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount tmpfs: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_enospc_is_storage_full_and_atomic(tiny_fs: Path) -> None:
    b = LocalBackend(tiny_fs / "repo")
    b.write("keep", b"precious")
    with pytest.raises(StorageFull) as exc:
        b.write("big", os.urandom(4 << 20))
    assert "big" in str(exc.value)
    assert not b.exists("big")
    assert list(b.list("tmp")) == []
    assert b.read("keep") == b"precious"
