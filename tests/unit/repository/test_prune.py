"""Retention rules, protected restore points, dry run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kura.errors import UsageError
from kura.repository import Manifest, RetentionPolicy, SourceRef
from kura.repository.prune import select
from kura.repository.testing import age_files, make_repo, write_disk


def fake(day: int, hour: int = 0, *, protected: bool = False, key: str = "s") -> Manifest:
    created = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=day, hours=hour)
    return Manifest(id=f"{day:03d}-{hour:02d}", repository="r",
                    source=SourceRef("image", key, key), created=created, node="n",
                    kind="full", reason="", parent=None, sequence=0, chain="c",
                    consistency="offline", meta={}, disks=[], configs={}, protected=protected)


def kept(decisions: list) -> list[str]:  # type: ignore[type-arg]
    return sorted(d.manifest.id for d in decisions if d.keep)


def test_keep_last() -> None:
    ms = [fake(d) for d in range(5)]
    assert kept(select(ms, RetentionPolicy(keep_last=2))) == ["003-00", "004-00"]


def test_daily_adds_to_last() -> None:
    ms = [fake(d, h) for d in range(5) for h in (1, 13)]
    out = select(ms, RetentionPolicy(keep_last=1, keep_daily=2))
    # last: the newest; daily: newest of the two most recent days not yet covered
    assert kept(out) == ["002-13", "003-13", "004-13"]
    reasons = {d.manifest.id: d.reasons for d in out}
    assert reasons["004-13"] == ["last"] and reasons["003-13"] == ["daily"]


def test_weekly_monthly_yearly() -> None:
    ms = [fake(d) for d in range(0, 400, 3)]
    out = select(ms, RetentionPolicy(keep_weekly=2, keep_monthly=2, keep_yearly=5))
    # weeks 2027-W05 and W04; then Dec and Nov 2026 (Feb and Jan 2027 are covered);
    # the years 2027 and 2026 are both covered already
    assert kept(out) == ["333-00", "363-00", "393-00", "399-00"]


def test_protected_never_removed() -> None:
    ms = [fake(0, protected=True), fake(1), fake(2)]
    out = select(ms, RetentionPolicy(keep_last=1))
    assert kept(out) == ["000-00", "002-00"]
    assert {d.manifest.id: d.reasons for d in out}["000-00"] == ["protected"]


def test_in_use_parent_kept() -> None:
    ms = [fake(0), fake(1)]
    assert kept(select(ms, RetentionPolicy(keep_last=1), {"000-00"})) == ["000-00", "001-00"]


def test_policy_validation() -> None:
    with pytest.raises(UsageError):
        RetentionPolicy(keep_last=-1)
    assert RetentionPolicy().empty and RetentionPolicy(keep_last=0).empty


def test_prune_repository(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "r")
    a = [write_disk(repo, "a", bytes([i]) * 100) for i in range(4)]
    b = write_disk(repo, "b", b"b" * 100)
    repo.protect(a[0].id)
    with pytest.raises(UsageError, match="retention rule"):
        repo.prune(RetentionPolicy(), dry_run=True)
    dry = repo.prune(RetentionPolicy(keep_last=1), dry_run=True)
    assert sorted(m.id for m in dry.removed) == sorted([a[1].id, a[2].id])
    assert len(repo.list_snapshots()) == 5
    res = repo.prune(RetentionPolicy(keep_last=1), source="a", dry_run=False)
    assert sorted(m.id for m in res.removed) == sorted([a[1].id, a[2].id])
    assert [m.id for m in repo.list_snapshots()] == [a[0].id, a[3].id, b.id]
    assert not (tmp_path / "r" / "indexes" / a[1].id).exists()
    assert res.to_dict()["removed"] == 2
    age_files(tmp_path / "r")
    gc = repo.gc(grace_seconds=0)
    assert gc.chunks_removed == 2
    assert repo.verify().ok
