"""Whole-VM restores: into a storage pool, and the refusals."""

from __future__ import annotations

import contextlib

import libvirt
import pytest

from kura.engine.backup import BackupOptions, backup_vm
from kura.engine.restore import RestoreOptions, restore_vm
from kura.engine.testing import node_of
from kura.errors import UsageError
from kura.lab import Lab
from kura.repository import Repository

pytestmark = pytest.mark.lab


def test_restore_into_pool_and_refusals(lab: Lab, lab_vm, repo: Repository) -> None:
    vm = lab_vm(node="node-a", storage="shared")
    pool_dir = lab.shared_dir / f"pool-{vm.name}"
    pool_dir.mkdir(mode=0o777)
    with node_of(lab, vm) as hv:
        r = backup_vm(hv, repo, vm.name, BackupOptions())
        m = repo.get_snapshot(r.restore_point)
        # The running VM itself: neither its disks nor its definition are replaced.
        with pytest.raises(UsageError, match="in use by running VM"):
            restore_vm(hv, repo, m, RestoreOptions(force=True))
        with pytest.raises(UsageError, match="exists"):
            restore_vm(hv, repo, m, RestoreOptions(target_dir=pool_dir))
        pool = hv.conn.storagePoolCreateXML(
            f"<pool type='dir'><name>{vm.name}-pool</name><target><path>{pool_dir}</path>"
            "</target></pool>", 0)
        try:
            new = f"{vm.name}-p"
            res = restore_vm(hv, repo, m, RestoreOptions(pool=f"{vm.name}-pool", new_name=new,
                                                         start=True))
            assert res.started and res.disks["vda"].startswith(str(pool_dir))
            assert f"{new}-vda.qcow2" in pool.listVolumes()
            dom = hv.lookup(new)
            assert dom.isActive()
            dom.destroy()
            dom.undefine()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                pool.destroy()
