"""Full → incrementals on a running guest; every restore point equals its view."""

from __future__ import annotations

import filecmp
import json
import shutil
import time
from pathlib import Path

import libvirt
import libvirt_qemu
import pytest

from kura.engine.backup import BackupOptions, backup_vm
from kura.engine.restore import RestoreOptions, restore_disk_file, restore_vm
from kura.engine.testing import ViewCopier, node_of
from kura.lab import Lab
from kura.repository import Repository

pytestmark = pytest.mark.lab


def test_full_then_incrementals_restore_each_point(lab: Lab, lab_vm, repo: Repository,
                                                   tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    points = []
    with node_of(lab, vm) as hv:
        for i in range(3):
            if i:
                vm.write_pattern(i * (3 << 20), 1 << 20, 0x40 + i, disk="vda")
            copier = ViewCopier(tmp_path)
            copier.n = i * 10
            r = backup_vm(hv, repo, vm.name, BackupOptions(), [copier])
            assert r.ok and r.consistency == "application"
            assert r.frozen_seconds is not None and r.frozen_seconds < 5
            points.append((r, copier.copies["vda"]))
    kinds = [r.kind for r, _ in points]
    assert kinds == ["full", "incremental", "incremental"]
    # Incrementals read only what changed, not every allocated byte of their view
    # (the full is no yardstick: the workload keeps adding data, and a fresh guest's
    # disk holds little more than one incremental's worth of 1 MiB chunks).
    for r, view in points[1:]:
        assert r.bytes_read < view.stat().st_blocks * 512, r.restore_point
    chain = repo.list_snapshots(vm.uuid)
    assert [m.parent for m in chain] == [None, chain[0].id, chain[1].id]
    assert chain[2].meta["checkpoint"]["name"] == f"kura-{chain[2].id}"
    assert chain[0].meta["consistency"] == "application"
    for r, view in points:
        out = tmp_path / f"restored-{r.restore_point}.raw"
        restore_disk_file(repo, repo.get_snapshot(r.restore_point), "vda", out)
        assert filecmp.cmp(out, view, shallow=False), f"restore of {r.restore_point} differs"
    # Only the newest checkpoint is kept on the node.
    with node_of(lab, vm) as hv:
        names = [c.getName() for c in hv.lookup(vm.name).listAllCheckpoints()]
    assert names == [f"kura-{chain[2].id}"]


def _agent_ping(dom: libvirt.virDomain, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            libvirt_qemu.qemuAgentCommand(dom, json.dumps({"execute": "guest-ping"}), 2, 0)
            return
        except libvirt.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_workload_backup_is_application_consistent_and_boots(lab: Lab, lab_vm,
                                                              repo: Repository,
                                                              tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    with node_of(lab, vm) as hv:
        backup_vm(hv, repo, vm.name, BackupOptions(consistency="require"))
        time.sleep(3)  # the workload keeps writing
        _running, seq_before = vm.workload_status()
        r = backup_vm(hv, repo, vm.name, BackupOptions(consistency="require"))
        _running, seq_after = vm.workload_status()
        assert r.kind == "incremental" and r.consistency == "application"
        m = repo.get_snapshot(r.restore_point)
        assert m.consistency == "application" and m.meta["frozen_seconds"] is not None
        new = f"{vm.name}-r"
        target = lab.shared_dir / "restored" / new  # QEMU's user must reach it
        res = restore_vm(hv, repo, m, RestoreOptions(new_name=new, target_dir=target))
        disk = Path(res.disks["vda"])
        verdict = lab.verify_disk(disk, fmt="qcow2")
        assert verdict.ok and verdict.fsck_clean, verdict.errors
        assert verdict.files_checked > 0
        # Every file committed before the freeze is there and intact.
        assert seq_before <= verdict.last_seq <= seq_after
        dom = hv.lookup(new)
        try:
            assert dom.UUIDString() != vm.uuid
            dom.create()
            _agent_ping(dom)  # the restored guest boots and its agent answers
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            shutil.rmtree(target, ignore_errors=True)
