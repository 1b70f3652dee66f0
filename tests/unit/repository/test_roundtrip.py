"""Whole-disk round trips through writer and reader, and damage on disk detected."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kura.errors import IntegrityError, SnapshotNotFound, UnsupportedFormat, UsageError
from kura.repository import ZERO_CHUNK, Repository
from kura.repository.testing import TEST_CHUNK, make_repo, write_disk

CS = TEST_CHUNK


@st.composite
def disks(draw: st.DrawFn) -> bytes:
    """Random sparse layouts: zero, random, repeated and text chunks, any tail length."""
    n = draw(st.integers(min_value=0, max_value=6))
    tail = draw(st.integers(min_value=0, max_value=CS - 1))
    parts = []
    for _ in range(n):
        kind = draw(st.sampled_from(["zero", "random", "text", "same"]))
        if kind == "zero":
            parts.append(bytes(CS))
        elif kind == "random":
            parts.append(draw(st.binary(min_size=16, max_size=16)) * (CS // 16))
        elif kind == "text":
            parts.append((b"line %d of text\n" % draw(st.integers())) * (CS // 16))
        else:
            parts.append(b"\x42" * CS)
    parts.append(draw(st.sampled_from([bytes(tail), os.urandom(tail)])))
    return b"".join(p[:CS] for p in parts)


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return make_repo(tmp_path_factory.mktemp("shared") / "repo")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=disks())
def test_disk_roundtrip(shared_repo: Repository, data: bytes) -> None:
    m = write_disk(shared_repo, "prop", data)
    reader = shared_repo.open_disk(m.id, "disk")
    assert reader.size == len(data)
    assert reader.pread(0, len(data) + 10) == data
    streamed = b"".join(c if c is not None else bytes(min(CS, len(data) - off))
                        for off, c in reader.iter_chunks(workers=2))
    assert streamed == data
    ids = shared_repo.read_index(m, "disk")
    for i, cid in enumerate(ids):
        assert (cid == ZERO_CHUNK) == (data[i * CS:(i + 1) * CS].count(0) == len(
            data[i * CS:(i + 1) * CS]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=disks(), offset=st.integers(min_value=0, max_value=8 * CS),
       length=st.integers(min_value=0, max_value=3 * CS))
def test_random_access(shared_repo: Repository, data: bytes, offset: int, length: int) -> None:
    m = write_disk(shared_repo, "pread", data)
    assert shared_repo.open_disk(m, "disk").pread(offset, length) == data[offset:offset + length]


@pytest.mark.parametrize("encrypted", [True, False])
def test_restore_is_sparse_and_exact(tmp_path: Path, encrypted: bool) -> None:
    repo = make_repo(tmp_path / "repo", encrypted=encrypted)
    data = os.urandom(CS) + bytes(20 * CS) + os.urandom(100)
    m = write_disk(repo, "img", data)
    out = tmp_path / "out.raw"
    seen: list[int] = []
    repo.restore_disk(m.id, "disk", out, progress=seen.append)
    assert out.read_bytes() == data
    assert sum(seen) == len(data)
    assert out.stat().st_blocks * 512 < 4 * CS  # holes for the zero chunks
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dedup_and_stats(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    block = os.urandom(CS)
    m1 = write_disk(repo, "a", block * 3 + bytes(CS))
    s = m1.disks[0].stats
    assert (s["chunks_written"], s["chunks_reused"], s["chunks_zero"]) == (1, 2, 1)
    m2 = write_disk(repo, "b", block)  # another source, same data: stored once
    assert m2.disks[0].stats["chunks_written"] == 0
    assert repo.info()["chunks"] == 1


def test_incremental_inherits_unwritten_chunks(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    v1 = os.urandom(4 * CS + 10)
    m1 = write_disk(repo, "img", v1)
    changed = os.urandom(CS)
    v2 = v1[:CS] + changed + v1[2 * CS:]
    m2 = write_disk(repo, "img", v2, parent=m1, base=m1.disks[0], only=[1])
    assert (m2.parent, m2.sequence, m2.chain, m2.kind) == (m1.id, 1, m1.id, "incremental")
    assert m2.disks[0].stats["chunks_inherited"] == 4
    assert repo.open_disk(m2, "disk").pread(0, len(v2)) == v2
    assert repo.open_disk(m1, "disk").pread(0, len(v1)) == v1  # the parent is unchanged
    # grown disk: whole chunks inherited, the old partial tail and new space are zero
    v3 = v2[: 4 * CS] + bytes(2 * CS)
    m3 = write_disk(repo, "img", v3, parent=m2, base=m2.disks[0], only=[])
    assert repo.open_disk(m3, "disk").pread(0, len(v3)) == v3
    assert m3.sequence == 2 and m3.chain == m1.id


def test_configs_roundtrip(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    xml = b"<domain>" + os.urandom(3 * CS) + b"</domain>"
    from kura.repository import SourceRef
    with repo.begin_snapshot(SourceRef("vm", "uuid-1", "web01"), node="n") as w:
        w.add_config("domain.xml", xml)
        w.add_config("empty", b"")
        w.meta["consistency"] = "application"
        w.meta["frozen_seconds"] = 0.25
        m = w.commit()
    assert repo.read_config(m.id, "domain.xml") == xml
    assert repo.read_config(m.id, "empty") == b""
    assert m.consistency == "application" and m.meta["frozen_seconds"] == 0.25
    with pytest.raises(UsageError, match="no configuration"):
        repo.read_config(m.id, "nvram")


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    from kura.repository import SourceRef
    with repo.begin_snapshot(SourceRef("image", "x", "x"), node="n") as w:
        dw = w.add_disk("disk", CS + 5)
        with pytest.raises(UsageError, match="outside"):
            dw.write_chunk(2, b"x")
        with pytest.raises(UsageError, match="expected 5"):
            dw.write_chunk(1, b"x" * 6)
        with pytest.raises(UsageError, match="already added"):
            w.add_disk("disk", 1)
        with pytest.raises(UsageError):
            w.add_disk("../evil", 1)
        w.abort()
    assert repo.list_snapshots() == []


def _chunk_files(repo_path: Path) -> list[Path]:
    return sorted(p for p in (repo_path / "chunks").rglob("*") if p.is_file())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_damaged_chunk_never_returns_wrong_data(tmp_path: Path, damage: str) -> None:
    repo = make_repo(tmp_path / "repo")
    a, b = os.urandom(CS), os.urandom(CS)
    m = write_disk(repo, "img", a + b)
    files = _chunk_files(tmp_path / "repo")
    target = next(f for f in files if f.name == repo.chunk_id(a).hex())
    other = next(f for f in files if f != target)
    raw = target.read_bytes()
    if damage == "flip":
        target.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    elif damage == "truncate":
        target.write_bytes(raw[:-1])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_bytes(other.read_bytes())
    reader = repo.open_disk(m.id, "disk")
    with pytest.raises(IntegrityError) as exc:
        reader.pread(0, 10)
    msg = str(exc.value)
    assert m.id in msg and "disk disk" in msg and f"bytes 0-{CS}" in msg
    assert reader.pread(CS, CS) == b  # the intact chunk still reads
    with pytest.raises(IntegrityError):
        repo.restore_disk(m.id, "disk", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_index_detected(tmp_path: Path, damage: str) -> None:
    repo = make_repo(tmp_path / "repo")
    m = write_disk(repo, "img", os.urandom(2 * CS))
    idx = tmp_path / "repo" / m.disks[0].index
    raw = idx.read_bytes()
    if damage == "flip":
        idx.write_bytes(raw[:-5] + bytes([raw[-5] ^ 0x80]) + raw[-4:])
    elif damage == "truncate":
        idx.write_bytes(raw[:-1])
    else:
        idx.unlink()
    with pytest.raises(IntegrityError, match=f"index of disk disk of restore point {m.id}"):
        repo.open_disk(m.id, "disk")


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_manifest_detected(tmp_path: Path, damage: str) -> None:
    repo = make_repo(tmp_path / "repo")
    good = write_disk(repo, "ok", os.urandom(CS))
    m = write_disk(repo, "img", os.urandom(CS))
    path = tmp_path / "repo" / "snapshots" / f"{m.id}.manifest"
    raw = path.read_bytes()
    path.write_bytes({"flip": raw[:30] + bytes([raw[30] ^ 4]) + raw[31:],
                      "truncate": raw[: len(raw) // 2], "empty": b""}[damage])
    fresh = Repository.open(tmp_path / "repo", passphrase=b"correct horse battery staple")
    with pytest.raises(IntegrityError, match=m.id):
        fresh.get_snapshot(m.id)
    listed = fresh.list_snapshots()
    assert [s.id for s in listed] == [good.id] and m.id in fresh.damaged
    with pytest.raises(SnapshotNotFound):
        fresh.get_snapshot("img")


def test_manifest_moved_to_another_name_is_rejected(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", encrypted=False)
    m = write_disk(repo, "img", os.urandom(CS))
    snaps = tmp_path / "repo" / "snapshots"
    fake = "20990101T000000Z-00000000"
    (snaps / f"{fake}.manifest").write_bytes((snaps / f"{m.id}.manifest").read_bytes())
    fresh = Repository.open(tmp_path / "repo")
    with pytest.raises(IntegrityError):
        fresh.get_snapshot(fake)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(["index", "manifest"]), pos=st.integers(min_value=0),
       mode=st.sampled_from(["flip", "truncate"]), encrypted=st.booleans())
def test_any_metadata_damage_is_detected(which: str, pos: int, mode: str,
                                         encrypted: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="kura-meta-") as tmp:
        root = Path(tmp)
        repo = make_repo(root / "r", encrypted=encrypted)
        data = os.urandom(CS) + bytes(CS) + os.urandom(10)
        m = write_disk(repo, "img", data)
        path = root / "r" / (m.disks[0].index if which == "index"
                             else f"snapshots/{m.id}.manifest")
        raw = bytearray(path.read_bytes())
        if mode == "flip":
            raw[pos % len(raw)] ^= 1 << (pos % 8)
        else:
            del raw[pos % len(raw):]
        path.write_bytes(bytes(raw))
        fresh = Repository.open(root / "r", passphrase=b"correct horse battery staple"
                                if encrypted else None)
        # a flipped version byte reads as a newer format: a clear error either way
        with pytest.raises((IntegrityError, UnsupportedFormat)):
            fresh.open_disk(m.id, "disk").pread(0, len(data))
        report = fresh.verify()
        assert report.failed_snapshots == [m.id]
