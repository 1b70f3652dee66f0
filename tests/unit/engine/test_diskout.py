"""Restored disks written without QEMU: qcow2 layout, sparseness, bytes, failures.

The qcow2 files are checked with the real ``qemu-img`` (check, compare, convert).
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest

from kura.engine.diskout import write_disk
from kura.engine.qcow2 import Qcow2Writer
from kura.errors import IntegrityError, StorageFull
from kura.repository import Repository
from kura.repository.reader import nonzero_runs, write_chunks
from kura.repository.testing import make_repo
from kura.repository.testing import write_disk as store_disk

KIB, MIB = 1 << 10, 1 << 20
CS = 256 * KIB  # four qcow2 clusters per chunk


def _layout(size: int, edge: int) -> bytes:
    """Data at the start, across ``edge``, half-zero chunks, a short tail."""
    data = bytearray(size)
    data[:CS] = os.urandom(CS)
    data[3 * CS + 64 * KIB: 3 * CS + 128 * KIB] = os.urandom(64 * KIB)  # one cluster of four
    data[3 * CS + 200 * KIB: 3 * CS + 201 * KIB] = b"x" * KIB  # a partly-zero cluster
    data[edge - CS: edge + CS] = os.urandom(2 * CS)
    data[edge + 5 * CS: edge + 6 * CS] = b"text " * (CS // 5) + b"t" * (CS % 5)
    data[size - 777:] = os.urandom(777)  # the last chunk and cluster are short
    return bytes(data)


def _qemu_img(*args: str) -> str:
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, str, bytes]:
    root = tmp_path_factory.mktemp("diskout")
    repo = make_repo(root / "repo", chunk_size=CS)
    data = _layout(12 * MIB + 12288 + 512, 4 * MIB)
    m = store_disk(repo, "img", data)
    return repo, m.id, data


def test_nonzero_runs() -> None:
    g = 4
    assert nonzero_runs(b"", g) == []
    assert nonzero_runs(bytes(9), g) == []
    assert nonzero_runs(b"\0\0\0\1" + bytes(4) + b"\1", g) == [(0, 4), (8, 9)]
    assert nonzero_runs(b"a" * 8 + bytes(4) + b"b" * 6, g) == [(0, 8), (12, 18)]


@pytest.mark.parametrize("cluster_bits", [12, 16])
def test_writer_many_tables_any_order(tmp_path: Path, cluster_bits: int) -> None:
    """4 KiB clusters: 2 MiB per L2 table and 8 MiB per refcount block, so a 40 MiB
    image needs many of both; chunks are written in a shuffled order."""
    size = 40 * MIB + 4608
    data = _layout(size, 30 * MIB)
    chunks = [(i, data[off:off + CS]) for i, off in enumerate(range(0, size, CS))]
    stored = [(i, c) for i, c in chunks if c.strip(b"\0")]
    random.Random(7).shuffle(stored)
    out = tmp_path / "w.qcow2"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        w = Qcow2Writer(fd, size, CS, sorted(i for i, _ in stored), cluster_bits=cluster_bits)
        for i, c in stored:
            w.write_chunk(i, c)
        w.finish()
    finally:
        os.close(fd)
    _qemu_img("check", str(out))
    raw = tmp_path / "back.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
    assert raw.read_bytes() == data


def test_qcow2_is_exact_thin_and_valid(tmp_path: Path,
                                       stored: tuple[Repository, str, bytes]) -> None:
    repo, sid, data = stored
    m = repo.get_snapshot(sid)
    out = tmp_path / "out.qcow2"
    seen: list[int] = []
    assert write_disk(repo, m, "disk", out, "qcow2", workers=3, progress=seen.append) \
        == len(data)
    assert sum(seen) == len(data)
    check = _qemu_img("check", "--output=json", str(out))
    assert '"check-errors": 0' in check and "leaks" not in check and "corruptions" not in check
    raw = tmp_path / "back.raw"
    _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
    assert raw.read_bytes() == data
    # thin: the clusters holding data, plus metadata; zero clusters in data chunks too
    data_clusters = sum(1 for i in range(0, len(data), 64 * KIB)
                        if data[i:i + 64 * KIB].strip(b"\0"))
    assert out.stat().st_size <= (data_clusters + 8) * 64 * KIB
    info = _qemu_img("info", "--output=json", str(out))
    assert f'"virtual-size": {len(data)}' in info
    assert {p.name for p in tmp_path.iterdir()} == {"out.qcow2", "back.raw"}


def test_raw_is_exact_and_sparse_inside_chunks(tmp_path: Path,
                                               stored: tuple[Repository, str, bytes]) -> None:
    repo, sid, data = stored
    out = tmp_path / "out.raw"
    write_disk(repo, repo.get_snapshot(sid), "disk", out, "raw")
    assert out.read_bytes() == data
    # 19 clusters of data, though 6 chunks (24 clusters) are stored
    assert out.stat().st_blocks * 512 <= 20 * 64 * KIB


def test_qcow2_small_and_empty_disks(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", chunk_size=CS)
    for name, data in (("tiny", b"abc"), ("zeros", bytes(3 * CS)), ("empty", b"")):
        m = store_disk(repo, name, data)
        out = tmp_path / f"{name}.qcow2"
        write_disk(repo, m, "disk", out, "qcow2")
        _qemu_img("check", str(out))
        raw = tmp_path / f"{name}.raw"
        _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(out), str(raw))
        assert raw.read_bytes() == data + bytes(-len(data) % 512)  # whole sectors


def test_damaged_chunk_leaves_nothing(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", chunk_size=CS)
    good, bad = os.urandom(CS), os.urandom(CS)
    m = store_disk(repo, "img", good * 3 + bad + good)
    victim = next(p for p in (tmp_path / "repo" / "chunks").rglob("*")
                  if p.name == repo.chunk_id(bad).hex())
    blob = victim.read_bytes()
    victim.write_bytes(blob[:50] + bytes([blob[50] ^ 1]) + blob[51:])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for fmt in ("qcow2", "raw"):
        with pytest.raises(IntegrityError, match=f"{m.id}.*bytes {3 * CS}-{4 * CS}"):
            write_disk(repo, m, "disk", out_dir / f"d.{fmt}", fmt)
        assert list(out_dir.iterdir()) == []


def test_full_disk_is_clear_and_leaves_nothing(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "repo", chunk_size=CS)
    m = store_disk(repo, "img", os.urandom(4 * CS))
    real = os.pwritev
    calls = 0

    def pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for fmt in ("qcow2", "raw"):
        calls = 0
        with pytest.raises(StorageFull, match="no space left"):
            write_disk(repo, m, "disk", out_dir / f"d.{fmt}", fmt)
        assert list(out_dir.iterdir()) == []


def test_write_chunks_progress_order_free_and_first_error_stops(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", chunk_size=CS)
    data = bytes(CS) + os.urandom(3 * CS) + bytes(2 * CS) + os.urandom(CS) + bytes(CS)
    m = store_disk(repo, "img", data)
    reader = repo.open_disk(m, "disk")
    seen: list[int] = []
    got: dict[int, bytes | None] = {}
    write_chunks(reader, got.__setitem__, workers=3, progress=seen.append)
    assert sum(seen) == len(data) and sorted(got) == [1, 2, 3, 6]
    assert all(got[i] == data[i * CS:(i + 1) * CS] for i in got)
    # with zeros: every chunk reaches the sink, zero ones as None
    got.clear()
    write_chunks(reader, got.__setitem__, workers=2, zeros=True)
    assert sorted(got) == list(range(8)) and got[0] is None and got[7] is None

    threads = threading.active_count()
    calls: list[int] = []

    def failing(index: int, plain: bytes | None) -> None:
        calls.append(index)
        raise OSError(errno.EIO, "boom")

    with pytest.raises(OSError, match="boom"):
        write_chunks(reader, failing, workers=2, zeros=True)
    assert len(calls) <= 2  # each worker stops after its first failure at the latest
    assert threading.active_count() == threads  # every worker has finished
