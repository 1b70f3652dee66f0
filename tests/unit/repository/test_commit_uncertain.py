"""A manifest write that fails after the manifest landed must not take its indexes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kura.errors import StorageFull
from kura.repository.backend import LocalBackend
from kura.repository.testing import FaultyBackend, make_repo, write_disk


class FailsAfterManifest(FaultyBackend):
    """Writes the manifest, then fails (a directory fsync error, or a lost answer)."""

    def write(self, name: str, data: bytes | bytearray, *, sync_dir: bool = True) -> None:
        super().write(name, data, sync_dir=sync_dir)
        if name.startswith("snapshots/"):
            raise StorageFull(f"cannot sync the directory of {name}")


def test_a_manifest_that_landed_keeps_its_indexes(tmp_path: Path) -> None:
    backend = FailsAfterManifest(LocalBackend(tmp_path / "repo"))
    repo = make_repo(backend, encrypted=False)
    data = bytes(range(256)) * 1024
    with pytest.raises(StorageFull):
        write_disk(repo, "img", data)
    (point,) = repo.list_snapshots("img")  # it did commit
    assert repo.verify([point.id]).ok  # and its indexes are still there


def test_a_manifest_that_did_not_land_takes_its_indexes(tmp_path: Path) -> None:
    def refuse(name: str) -> None:
        if name.startswith("snapshots/"):
            raise StorageFull("no space left")

    backend = FaultyBackend(LocalBackend(tmp_path / "repo"), before_write=refuse)
    repo = make_repo(backend, encrypted=False)
    with pytest.raises(StorageFull):
        write_disk(repo, "img", b"x" * 100_000)
    assert repo.list_snapshots("img") == []
    assert list(backend.list("indexes")) == []
