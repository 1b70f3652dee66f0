"""Incremental chains that follow a VM around the cluster, and a node-local VM."""

from __future__ import annotations

import filecmp
import os
import signal
from pathlib import Path

import pytest

from kura.engine.backup import BackupOptions, BackupResult, backup_vm
from kura.engine.inventory import describe_node
from kura.engine.restore import restore_disk_file
from kura.engine.testing import ViewCopier, node_of
from kura.lab import Lab, LabVM
from kura.repository import Repository

pytestmark = pytest.mark.lab


def _backup_checked(lab: Lab, vm: LabVM, repo: Repository, tmp_path: Path,
                    n: int) -> BackupResult:
    """Back up on whichever node runs the VM; check the restore equals the view."""
    copier = ViewCopier(tmp_path)
    copier.n = n
    with node_of(lab, vm) as hv:
        r = backup_vm(hv, repo, vm.name, BackupOptions(), [copier])
    assert r.ok, r.error
    assert r.node == vm.node
    out = tmp_path / f"r{n}.raw"
    restore_disk_file(repo, repo.get_snapshot(r.restore_point), "vda", out)
    assert filecmp.cmp(out, copier.copies["vda"], shallow=False)
    return r


def test_chain_survives_live_migration_quick_migration_and_cold_move(
        lab: Lab, lab_vm, repo: Repository, tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    first = _backup_checked(lab, vm, repo, tmp_path, 1)
    assert first.kind == "full" and first.node == "node-a"

    lab.migrate(vm.name, "node-b")  # live migration
    vm.write_pattern(0, 2 << 20, 0x61, disk="vda")
    r = _backup_checked(lab, vm, repo, tmp_path, 2)
    assert r.kind == "incremental" and r.node == "node-b", r.reason
    assert any("redefined on node-b" in line for line in r.log)

    lab.migrate(vm.name, "node-a", offline=True)  # save / restore on the other node
    vm.wait_agent(60)
    vm.write_pattern(0, 2 << 20, 0x62, disk="vda")
    r = _backup_checked(lab, vm, repo, tmp_path, 3)
    assert r.kind == "incremental" and r.node == "node-a", r.reason

    vm.shutdown()
    lab.cold_move(vm.name, "node-b")
    vm.start()
    vm.write_pattern(0, 2 << 20, 0x63, disk="vda")
    r = _backup_checked(lab, vm, repo, tmp_path, 4)
    assert r.kind == "incremental" and r.node == "node-b", r.reason
    chain = repo.list_snapshots(vm.uuid)
    assert [m.sequence for m in chain] == [0, 1, 2, 3]
    assert [m.node for m in chain] == ["node-a", "node-b", "node-a", "node-b"]


def test_node_local_vm_is_backed_up_on_its_node(lab: Lab, lab_vm, repo: Repository,
                                                tmp_path: Path) -> None:
    vm = lab_vm(node="node-b", storage="local", workload=False)
    with node_of(lab, vm) as hv:
        tree = describe_node(hv, with_uuid=False)
    entry = next(v for v in tree.to_dict()["vms"] if v["name"] == vm.name)
    assert entry["state"] == "running"
    assert entry["disks"][0]["storage"]["kind"] == "local"
    assert entry["disks"][0]["change_tracking"] is True
    r = _backup_checked(lab, vm, repo, tmp_path, 1)
    assert r.node == "node-b"
    m = repo.get_snapshot(r.restore_point)
    assert m.disks[0].attrs["storage"] == "local"


def test_lost_checkpoint_falls_back_to_full(lab: Lab, lab_vm, repo: Repository,
                                            tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared")
    with node_of(lab, vm) as hv:
        first = backup_vm(hv, repo, vm.name, BackupOptions())
        # Someone deletes the checkpoint and its bitmap behind kura's back.
        hv.lookup(vm.name).checkpointLookupByName(f"kura-{first.restore_point}").delete(0)
        r = backup_vm(hv, repo, vm.name, BackupOptions())
    assert r.kind == "full"
    assert "cannot be restored on this node" in r.reason or "cannot be trusted" in r.reason
    assert repo.get_snapshot(r.restore_point).parent is None


def _qemu_pid(name: str) -> int:
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and f"guest={name},".encode() in b" ".join(argv):
            return int(proc.name)
    raise AssertionError(f"no QEMU process for {name}")


def test_qemu_crash_makes_bitmaps_untrusted_and_the_next_backup_full(
        lab: Lab, lab_vm, repo: Repository, tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    _backup_checked(lab, vm, repo, tmp_path, 1)
    vm.shutdown()  # the bitmap is now in the qcow2 header ...
    vm.start()
    os.kill(_qemu_pid(vm.name), signal.SIGKILL)  # ... and QEMU dies with it in use
    lab.wait_for(lambda: not vm.is_active(), 30, "the killed VM to stop")
    vm.start()
    r = _backup_checked(lab, vm, repo, tmp_path, 2)
    assert r.kind == "full" and "cannot be trusted" in r.reason, r.reason
    r = _backup_checked(lab, vm, repo, tmp_path, 3)
    assert r.kind == "incremental", r.reason
