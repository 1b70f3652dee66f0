"""Verify reports exactly which restore points, disks and byte ranges are damaged."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kura.repository import Repository
from kura.repository.store import chunk_name
from kura.repository.testing import TEST_CHUNK, make_repo, write_disk

CS = TEST_CHUNK


def test_clean_repository_verifies(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    m = write_disk(repo, "img", os.urandom(3 * CS) + bytes(CS))
    seen: list[int] = []
    totals: list[int] = []
    report = repo.verify(progress=seen.append, on_total=totals.append)
    assert report.ok and report.chunks_checked == 3 and sum(seen) == 3 * CS == totals[0]
    assert repo.get_snapshot(m.id).verify_state == "ok"


def test_damage_is_located_exactly(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    shared = os.urandom(CS)
    a = write_disk(repo, "a", os.urandom(CS) + shared + os.urandom(CS) + shared)
    b = write_disk(repo, "b", shared + os.urandom(CS // 2))
    c = write_disk(repo, "c", os.urandom(CS))
    path = tmp_path / "r" / chunk_name(repo.chunk_id(shared))
    raw = bytearray(path.read_bytes())
    raw[50] ^= 0xFF
    path.write_bytes(bytes(raw))
    report = repo.verify()
    assert not report.ok
    assert report.failed_snapshots == sorted([a.id, b.id])
    by_snap = {d.snapshot: d for d in report.damaged}
    assert by_snap[a.id].ranges == [(CS, 2 * CS), (3 * CS, 4 * CS)]
    assert by_snap[a.id].disk == "disk" and by_snap[a.id].source == "a"
    assert by_snap[b.id].ranges == [(0, CS)]
    assert "authentication failed" in by_snap[a.id].reasons[0]
    assert repo.get_snapshot(a.id).verify_state == "failed"
    assert repo.get_snapshot(c.id).verify_state == "ok"
    # the bad chunk was moved aside; writing the same data again heals it
    assert not path.exists() and list((tmp_path / "r" / "bad").iterdir())
    write_disk(repo, "heal", shared)
    assert repo.verify().ok


def test_verify_one_snapshot_and_missing_objects(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    a = write_disk(repo, "a", os.urandom(2 * CS))
    b = write_disk(repo, "b", os.urandom(2 * CS))
    (tmp_path / "r" / a.disks[0].index).unlink()
    report = repo.verify([b.id])
    assert report.ok and report.snapshots == [b.id]
    report = repo.verify(["a"])
    assert [(d.snapshot, d.disk, d.ranges) for d in report.damaged] == [
        (a.id, "disk", [(0, 2 * CS)])]
    (tmp_path / "r" / "snapshots" / f"{b.id}.manifest").write_bytes(b"junk")
    fresh = Repository.open(tmp_path / "r", passphrase=b"correct horse battery staple")
    report = fresh.verify()
    assert {d.snapshot for d in report.damaged} == {a.id, b.id}
    assert any(d.disk is None and "manifest" in d.reasons[0] for d in report.damaged)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(victim=st.integers(min_value=0, max_value=3), pos=st.integers(min_value=0),
       mode=st.sampled_from(["flip", "truncate"]))
def test_any_chunk_damage_is_reported(victim: int, pos: int, mode: str) -> None:
    with tempfile.TemporaryDirectory(prefix="kura-verify-") as tmp:
        root = Path(tmp)
        repo = make_repo(root / "r", encrypted=bool(victim % 2))
        parts = [os.urandom(CS) for _ in range(4)]
        m = write_disk(repo, "img", b"".join(parts))
        path = root / "r" / chunk_name(repo.chunk_id(parts[victim]))
        raw = bytearray(path.read_bytes())
        if mode == "flip":
            raw[pos % len(raw)] ^= 1
        else:
            del raw[pos % len(raw):]
        path.write_bytes(bytes(raw))
        report = repo.verify()
        assert [(d.snapshot, d.ranges) for d in report.damaged] == [
            (m.id, [(victim * CS, (victim + 1) * CS)])]
