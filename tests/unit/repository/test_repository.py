"""Opening repositories, keys, references to restore points, bad input."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

import blake3
import pytest

from kura.errors import (
    IntegrityError,
    RepositoryError,
    RepositoryExists,
    RepositoryNotFound,
    SnapshotNotFound,
    UnsupportedFormat,
    UsageError,
    WrongPassphrase,
)
from kura.repository import Repository
from kura.repository.crypto import ID_BLAKE3, ID_HMAC_SHA256
from kura.repository.testing import TEST_CHUNK, TEST_PASSPHRASE, make_repo, write_disk

PW = TEST_PASSPHRASE


def test_init_open_and_info(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    assert repo.encrypted and repo.chunk_size == TEST_CHUNK
    again = Repository.open(f"file://{tmp_path / 'r'}", passphrase=PW)
    assert again.id == repo.id
    info = again.info()
    assert info["encryption"] == "aes-256-gcm" and info["snapshots"] == 0
    assert Repository.needs_passphrase(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config").read_text())
    assert PW.decode() not in json.dumps(config) and "master" not in config["key"]


def test_init_refuses_existing_and_bad_options(tmp_path: Path) -> None:
    make_repo(tmp_path / "r")
    with pytest.raises(RepositoryExists):
        make_repo(tmp_path / "r")
    with pytest.raises(UsageError, match="passphrase"):
        Repository.init(tmp_path / "x", passphrase=None)
    with pytest.raises(UsageError, match="encryption"):
        Repository.init(tmp_path / "x", passphrase=PW, encryption="rot13")
    with pytest.raises(UsageError, match="power of two"):
        Repository.init(tmp_path / "x", passphrase=PW, chunk_size=1000)


def test_wrong_or_missing_passphrase(tmp_path: Path) -> None:
    make_repo(tmp_path / "r")
    with pytest.raises(WrongPassphrase, match="wrong passphrase"):
        Repository.open(tmp_path / "r", passphrase=b"nope")
    with pytest.raises(WrongPassphrase, match="no passphrase"):
        Repository.open(tmp_path / "r")


def test_unencrypted_needs_no_passphrase(tmp_path: Path) -> None:
    make_repo(tmp_path / "r", encrypted=False)
    assert not Repository.needs_passphrase(tmp_path / "r")
    assert not Repository.open(tmp_path / "r", passphrase=b"ignored").encrypted


def test_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFound, match=str(tmp_path / "none")):
        Repository.open(tmp_path / "none", passphrase=PW)


def test_unknown_format_version(tmp_path: Path) -> None:
    make_repo(tmp_path / "r")
    cfg = tmp_path / "r" / "config"
    doc = json.loads(cfg.read_text())
    doc["version"] = 7
    cfg.write_text(json.dumps(doc))
    with pytest.raises(UnsupportedFormat, match="version 7"):
        Repository.open(tmp_path / "r", passphrase=PW)


@pytest.mark.parametrize("change", ["chunk_size", "encryption", "garbage", "truncate"])
def test_tampered_or_damaged_config(tmp_path: Path, change: str) -> None:
    make_repo(tmp_path / "r")
    cfg = tmp_path / "r" / "config"
    doc = json.loads(cfg.read_text())
    if change == "chunk_size":
        doc["chunk_size"] = 1 << 20
        cfg.write_text(json.dumps(doc))
    elif change == "encryption":
        doc["encryption"] = "none"
        cfg.write_text(json.dumps(doc))
    elif change == "garbage":
        cfg.write_bytes(b"\0\1\2")
    else:
        cfg.write_text(cfg.read_text()[:40])
    with pytest.raises((IntegrityError, RepositoryError)):
        Repository.open(tmp_path / "r", passphrase=PW)


def test_key_export_import(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    data = os.urandom(TEST_CHUNK)
    m = write_disk(repo, "img", data)
    keyfile = tmp_path / "key"
    repo.export_key(keyfile)
    assert oct(keyfile.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(UsageError, match="exists"):
        repo.export_key(keyfile)
    cfg = tmp_path / "r" / "config"
    doc = json.loads(cfg.read_text())
    doc["key"]["wrapped"] = "AAAA"
    cfg.write_text(json.dumps(doc))
    with pytest.raises((WrongPassphrase, IntegrityError)):
        Repository.open(tmp_path / "r", passphrase=PW)
    with pytest.raises(WrongPassphrase):
        Repository.import_key(tmp_path / "r", keyfile, passphrase=b"wrong")
    Repository.import_key(tmp_path / "r", keyfile, passphrase=PW)
    again = Repository.open(tmp_path / "r", passphrase=PW)
    assert again.open_disk(m.id, "disk").pread(0, TEST_CHUNK) == data
    other = make_repo(tmp_path / "other")
    with pytest.raises(RepositoryError, match="belongs to repository"):
        Repository.import_key(tmp_path / "other", keyfile, passphrase=PW)
    assert other.id != repo.id
    (tmp_path / "junk").write_text("{}")
    with pytest.raises(IntegrityError, match="not a kura key file"):
        Repository.import_key(tmp_path / "r", tmp_path / "junk")


def test_snapshot_references(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    a1 = write_disk(repo, "alpha", b"1" * 10)
    a2 = write_disk(repo, "alpha", b"2" * 10, parent=a1)
    b1 = write_disk(repo, "beta", b"3" * 10)
    assert [m.id for m in repo.list_snapshots()] == [a1.id, a2.id, b1.id]
    assert [m.id for m in repo.list_snapshots("alpha")] == [a1.id, a2.id]
    assert repo.get_snapshot("alpha").id == a2.id
    latest = repo.latest("alpha")
    assert latest is not None and latest.id == a2.id
    assert repo.latest("gamma") is None
    assert repo.get_snapshot(a1.id).id == a1.id
    assert repo.get_snapshot(f"alpha@{a1.id}").id == a1.id
    assert repo.get_snapshot(f"alpha@{a1.id[:-3]}").id == a1.id
    assert repo.get_snapshot(b1.id[:-1]).id == b1.id  # a unique id prefix
    with pytest.raises(SnapshotNotFound):
        repo.get_snapshot("gamma")
    with pytest.raises(SnapshotNotFound):
        repo.get_snapshot(f"beta@{a1.id}")
    with pytest.raises(SnapshotNotFound, match="no restore points"):
        repo.get_snapshot("gamma@2026")
    with pytest.raises(UsageError, match="ambiguous"):
        repo.get_snapshot("alpha@2")
    with pytest.raises(UsageError):
        repo.get_snapshot("  ")


def test_protect_and_notes(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    m = write_disk(repo, "img", b"x" * 10)
    assert repo.protect(m.id).protected
    assert repo.get_snapshot(m.id).protected
    with pytest.raises(UsageError, match="protected"):
        repo.forget(m.id)
    assert not repo.protect(m.id, False).protected
    # damaged notes: fail safe (treated as protected), never a crash
    (tmp_path / "r" / "notes" / f"{m.id}.json").write_bytes(b"garbage")
    assert repo.get_snapshot(m.id).protected
    repo.protect(m.id, False)
    repo.forget(m.id)
    assert repo.list_snapshots() == []


def test_init_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "file").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        make_repo(tmp_path / "home")
    (tmp_path / "empty").mkdir()
    make_repo(tmp_path / "empty")


def test_new_repositories_use_keyed_blake3_ids(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    cfg = tmp_path / "r" / "config"
    doc = json.loads(cfg.read_text())
    assert doc["version"] == 2 and doc["chunk_id"] == ID_BLAKE3
    assert repo.info()["chunk_id"] == ID_BLAKE3 and repo.info()["format_version"] == 2
    data = os.urandom(TEST_CHUNK)
    m = write_disk(repo, "img", data)
    [cid] = repo.read_index(m, "disk")
    assert cid == blake3.blake3(data, key=repo.store.master.id_key).digest()
    assert Repository.open(tmp_path / "r", passphrase=PW).open_disk(m.id, "disk").pread(
        0, TEST_CHUNK) == data
    # The id setting is authenticated: switching it (or the version) is detected.
    for change in ({"chunk_id": ID_HMAC_SHA256}, {"version": 1}):
        cfg.write_text(json.dumps({**doc, **change}))
        with pytest.raises((IntegrityError, UnsupportedFormat)):
            Repository.open(tmp_path / "r", passphrase=PW)
    cfg.write_text(json.dumps({**doc, "chunk_id": "md5"}))
    with pytest.raises(UnsupportedFormat, match="md5"):
        Repository.open(tmp_path / "r", passphrase=PW)


def test_hmac_sha256_repositories_are_still_made_as_version_1(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r", id_algorithm=ID_HMAC_SHA256)
    doc = json.loads((tmp_path / "r" / "config").read_text())
    assert doc["version"] == 1 and "chunk_id" not in doc
    data = os.urandom(TEST_CHUNK)
    m = write_disk(repo, "img", data)
    [cid] = repo.read_index(m, "disk")
    assert cid == hmac.digest(repo.store.master.id_key, data, "sha256")
    assert Repository.open(tmp_path / "r", passphrase=PW).open_disk(m.id, "disk").pread(
        0, TEST_CHUNK) == data


def _v1_data(cs: int) -> bytes:
    """The disk stored in tests/unit/repository/data/repo-v1 (made by kura before
    BLAKE3 ids: format version 1, HMAC-SHA256 ids, 64 KiB chunks)."""
    def block(i: int) -> bytes:
        return b"".join(hashlib.sha256(f"{i}:{j}".encode()).hexdigest().encode()
                        for j in range(cs // 64))
    return block(0) + bytes(cs) + block(2) + block(0)[: cs // 2]


def test_a_repository_written_before_blake3_still_reads_and_writes(tmp_path: Path) -> None:
    shutil.copytree(Path(__file__).parent / "data" / "repo-v1", tmp_path / "r")
    config = (tmp_path / "r" / "config").read_bytes()
    repo = Repository.open(tmp_path / "r", passphrase=PW)
    assert repo.info()["format_version"] == 1 and repo.info()["chunk_id"] == ID_HMAC_SHA256
    data = _v1_data(repo.chunk_size)
    [old] = repo.list_snapshots()
    assert repo.open_disk(old.id, "disk").pread(0, len(data)) == data
    assert repo.verify().ok
    # A new restore point dedups against the old chunks: the ids are still HMAC-SHA256.
    changed = data[: 2 * TEST_CHUNK] + os.urandom(TEST_CHUNK) + data[3 * TEST_CHUNK:]
    new = write_disk(repo, old.source.key, changed, parent=old, base=old.disks[0], only=[2])
    assert new.disks[0].stats["chunks_written"] == 1
    assert repo.read_index(new, "disk")[0] == repo.read_index(old, "disk")[0]
    again = Repository.open(tmp_path / "r", passphrase=PW)
    assert again.open_disk(new.id, "disk").pread(0, len(changed)) == changed
    assert again.verify().ok
    # Exporting and importing the key leaves the old config as it was.
    again.export_key(tmp_path / "key")
    Repository.import_key(tmp_path / "r", tmp_path / "key", passphrase=PW)
    assert (tmp_path / "r" / "config").read_bytes() == config


def test_latest_reads_only_the_newest_restore_points_notes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path / "r")
    snaps = [write_disk(repo, "img", bytes([i]) * 10) for i in range(3)]
    write_disk(repo, "other", b"o" * 10)
    repo.store.update_notes(snaps[-1].id, verify_state="failed")
    read: list[str] = []
    real = repo.store.read_notes
    monkeypatch.setattr(repo.store, "read_notes", lambda sid: read.append(sid) or real(sid))
    latest = repo.latest(snaps[0].source.key)
    # The newest, with what its notes say (a backup plans its parent from that) ...
    assert latest is not None and latest.id == snaps[-1].id
    assert latest.verify_state == "failed"
    # ... and no other restore point's notes read (through a server: a request each).
    assert read == [snaps[-1].id]
    assert repo.latest("nothing-here") is None
