"""Several disks, UEFI NVRAM, a raw disk (always full), a disk added mid-chain,
and VMs that are shut off or saved."""

from __future__ import annotations

import filecmp
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import libvirt
import pytest

from kura.engine.backup import BackupOptions, backup_vm
from kura.engine.events import Event
from kura.engine.restore import RestoreOptions, restore_disk_file, restore_vm
from kura.engine.testing import ViewCopier, node_of
from kura.lab import DiskSpec, Lab
from kura.repository import Repository

pytestmark = pytest.mark.lab


def test_uefi_vm_with_raw_disk_and_a_disk_added_mid_chain(lab: Lab, lab_vm,
                                                          repo: Repository,
                                                          tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", uefi=True,
                 disks=(DiskSpec(size="256M"), DiskSpec(size="64M", fmt="raw")))
    with node_of(lab, vm) as hv:
        first = backup_vm(hv, repo, vm.name, BackupOptions())
        assert first.kind == "full" and {d.target for d in first.disks} == {"vda", "vdb"}
        m = repo.get_snapshot(first.restore_point)
        assert vm.nvram is not None
        assert repo.read_config(m, "nvram") == vm.nvram.read_bytes()

        vm.write_pattern(1 << 20, 1 << 20, 0x71, disk="vdb")
        second = backup_vm(hv, repo, vm.name, BackupOptions())
        modes = {d.target: (d.mode, d.reason) for d in second.disks}
        assert second.kind == "incremental"
        assert modes["vda"][0] == "incremental"
        assert modes["vdb"][0] == "full" and "raw" in modes["vdb"][1]

        # Add a disk (cold, as an administrator would) and go on with the chain.
        vm.shutdown()
        new_disk = Path(vm.disk_paths[0]).parent / "vdc.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(new_disk), "64M"],
                       check=True)
        new_disk.chmod(0o666)
        dom = hv.lookup(vm.name)
        root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        devices = root.find("devices")
        assert devices is not None
        devices.append(ET.fromstring(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{new_disk}'/><target dev='vdc' bus='virtio'/></disk>"))
        hv.conn.defineXML(ET.tostring(root, encoding="unicode"))
        vm.start()
        vm.sh("printf 'kura vdc data' | dd of=/dev/vdc bs=512 seek=100 conv=fsync 2>/dev/null")
        copier = ViewCopier(tmp_path)
        third = backup_vm(hv, repo, vm.name, BackupOptions(), [copier])
        modes = {d.target: (d.mode, d.reason) for d in third.disks}
        assert third.kind == "incremental", third.reason
        assert modes["vda"][0] == "incremental"
        assert modes["vdc"][0] == "full" and "new since" in modes["vdc"][1]

        m3 = repo.get_snapshot(third.restore_point)
        for target in ("vda", "vdb", "vdc"):
            out = tmp_path / f"{target}.raw"
            restore_disk_file(repo, m3, target, out)
            assert filecmp.cmp(out, copier.copies[target], shallow=False), target

        new = f"{vm.name}-r"
        target_dir = lab.shared_dir / "restored" / new
        res = restore_vm(hv, repo, m3, RestoreOptions(new_name=new, target_dir=target_dir))
        try:
            assert res.nvram is not None
            assert Path(res.nvram).read_bytes() == repo.read_config(m3, "nvram")
            xml = ET.fromstring(hv.lookup(new).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            formats = {d.find("target").get("dev"): d.find("driver").get("type")  # type: ignore[union-attr]
                       for d in xml.findall("devices/disk")}
            assert formats == {"vda": "qcow2", "vdb": "raw", "vdc": "qcow2"}
            assert xml.findtext("os/nvram") == res.nvram
            with pytest.raises(Exception, match="in use by running VM"):
                restore_vm(hv, repo, m3, RestoreOptions(force=True))
        finally:
            hv.lookup(new).undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def test_shut_off_and_saved_vms(lab: Lab, lab_vm, repo: Repository, tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    vm.write_pattern(0, 1 << 20, 0x55, disk="vda")
    vm.shutdown()
    start_error: list[str] = []

    def try_start(event: Event) -> None:
        if event.kind == "phase-start" and event.phase == "data":
            try:
                vm.domain().create()
                start_error.append("started!")
            except libvirt.libvirtError as exc:
                start_error.append(str(exc))

    with node_of(lab, vm) as hv:
        r = backup_vm(hv, repo, vm.name, BackupOptions(), [try_start])
        assert r.ok and r.kind == "full" and r.consistency == "offline"
        assert any("image lock" in line for line in r.log)
        assert start_error and "lock" in start_error[0]
        assert not vm.is_active()
        out = tmp_path / "off.raw"
        restore_disk_file(repo, repo.get_snapshot(r.restore_point), "vda", out)
        subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(out),
                        str(vm.disk_paths[0])], check=True, capture_output=True)
        assert lab.verify_disk(out, fmt="raw").fsck_clean

        # An offline incremental: the checkpoint was created offline (qemu-img bitmaps).
        vm.start()
        vm.write_pattern(0, 1 << 20, 0x56, disk="vda")
        vm.shutdown()
        r = backup_vm(hv, repo, vm.name, BackupOptions())
        assert r.ok and r.kind == "incremental" and r.consistency == "offline", r.reason
        assert 0 < r.bytes_read < (64 << 20)
        out = tmp_path / "off2.raw"
        restore_disk_file(repo, repo.get_snapshot(r.restore_point), "vda", out)
        subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(out),
                        str(vm.disk_paths[0])], check=True, capture_output=True)
        # ... and the chain goes on live from the offline checkpoint.
        vm.start()
        r = backup_vm(hv, repo, vm.name, BackupOptions())
        assert r.ok and r.kind == "incremental" and r.consistency == "application", r.reason

        vm.domain().managedSave(0)
        r = backup_vm(hv, repo, vm.name, BackupOptions())
        assert r.ok and r.state == "saved" and r.consistency == "crash" and r.kind == "full"
        vm.start()
        r = backup_vm(hv, repo, vm.name, BackupOptions())
        assert r.ok and r.kind == "full"  # restore points of saved VMs carry no checkpoint
        r = backup_vm(hv, repo, vm.name, BackupOptions())
        assert r.kind == "incremental"
