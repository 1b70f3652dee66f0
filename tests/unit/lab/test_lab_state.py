"""The lab state file and lab-index allocation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kura.errors import LabError
from kura.lab import Lab
from kura.lab.state import (
    DiskRecord,
    LabState,
    NodeRecord,
    VMRecord,
    allocate_index,
    ensure_claim,
    load_state,
    node_address,
    node_name,
    release_index,
    save_state,
)


@pytest.fixture(autouse=True)
def _registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    reg = tmp_path / "registry"
    monkeypatch.setenv("KURA_LAB_REGISTRY", str(reg))
    return reg


def test_addresses_and_names() -> None:
    assert node_address(0, 0) == "127.0.0.2"
    assert node_address(0, 1) == "127.0.0.3"
    assert node_address(7, 1) == "127.0.7.3"
    assert [node_name(i) for i in range(3)] == ["node-a", "node-b", "node-c"]
    with pytest.raises(LabError):
        node_address(256, 0)
    with pytest.raises(LabError):
        node_name(8)


def test_state_round_trip(tmp_path: Path) -> None:
    state = LabState(index=3, accel="tcg",
                     nodes=[NodeRecord("node-a", "127.0.3.2", "t0k3n", "u-u-i-d")],
                     vms=[VMRecord(name="vm1", uuid="x", storage="local", home="node-a",
                                   disks=[DiskRecord("/d/vda.qcow2", "qcow2", "vda", "256M")],
                                   directory="/d")])
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)
    assert loaded == state
    assert loaded is not None and loaded.vm("vm1") is not None and loaded.vm("nope") is None
    assert not list(tmp_path.glob("*.tmp"))


def test_missing_and_damaged_state(tmp_path: Path) -> None:
    assert load_state(tmp_path) is None
    (tmp_path / "lab.json").write_text("{not json")
    with pytest.raises(LabError, match="damaged"):
        load_state(tmp_path)
    (tmp_path / "lab.json").write_text('{"version": 99, "index": 0}')
    with pytest.raises(LabError, match="not supported"):
        load_state(tmp_path)


def test_allocation_gives_distinct_indexes(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    ia = allocate_index(a, start=1)
    ib = allocate_index(b, start=1)
    assert ia != ib and min(ia, ib) >= 1
    assert allocate_index(a, start=1) == ia  # the owner gets its own claim back
    with pytest.raises(LabError, match="in use"):
        allocate_index(b, ia)


def test_stale_claims_are_taken_over(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    ia = allocate_index(a, start=5)
    save_state(a, LabState(index=ia))
    assert allocate_index(b, start=5) != ia  # a is alive: its state names the index
    (a / "lab.json").unlink()
    # a's state is gone but the claim is fresh: it may still be being created.
    assert allocate_index(tmp_path / "c", start=ia, ) != ia
    release_index(a, ia)
    assert allocate_index(tmp_path / "d", ia) == ia


def test_release_only_own_claim(tmp_path: Path, _registry: Path) -> None:
    a = tmp_path / "a"
    ia = allocate_index(a, start=9)
    release_index(tmp_path / "someone-else", ia)
    assert (_registry / str(ia)).exists()
    release_index(a, ia)
    assert not (_registry / str(ia)).exists()


def test_ensure_claim_after_registry_loss(tmp_path: Path, _registry: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    ia = allocate_index(a, start=20)
    save_state(a, LabState(index=ia))
    ensure_claim(a, ia)  # own claim: nothing to do
    (_registry / str(ia)).unlink()  # a reboot empties /run
    ensure_claim(a, ia)
    assert (_registry / str(ia)).read_text().strip() == str(a)
    b.mkdir()
    (_registry / str(ia)).write_text(f"{b}\n")  # another lab took it meanwhile
    save_state(b, LabState(index=ia))
    with pytest.raises(LabError, match="now used by"):
        ensure_claim(a, ia)


def test_a_lab_never_adopts_a_directory_with_other_files(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(LabError, match="not empty"):
        Lab.create(tmp_path)
