"""Lab VMs of every kind, and the workload check on real copies of their disks."""

from __future__ import annotations

import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kura.errors import LabError
from kura.lab import DiskSpec, Lab
from kura.lab.testing import VMFactory

pytestmark = pytest.mark.lab


def _xml(vm_domain_xml: str) -> ET.Element:
    return ET.fromstring(vm_domain_xml)


def test_multi_disk_vm_and_write_pattern(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(disks=(DiskSpec(size="128M"), DiskSpec(size="64M"),
                       DiskSpec(size="32M", fmt="raw")))
    assert [p.name for p in vm.disk_paths] == ["vda.qcow2", "vdb.qcow2", "vdc.raw"]
    devices = vm.sh("ls /dev/ | grep '^vd' | sort").split()
    assert devices == ["vda", "vdb", "vdc"]
    assert "/data" in vm.sh("cat /proc/mounts")
    vm.write_pattern(1 << 20, 65536, 0x41)  # default: last disk, raw offset
    raw = vm.disk_paths[2].read_bytes()
    assert raw[(1 << 20):(1 << 20) + 65536] == b"A" * 65536
    assert raw[(1 << 20) - 1] == 0 and raw[(1 << 20) + 65536] == 0
    vm.write_pattern(4096, 8192, 0x00, disk="vdb")
    vm.write_pattern(0, 4096, 0x7F, disk="vda")  # into /data/pattern.bin
    assert vm.sh("od -An -tx1 -N2 /data/pattern.bin").split() == ["7f", "7f"]
    with pytest.raises(LabError, match="no disk vdz"):
        vm.write_pattern(0, 1, 1, disk="vdz")


def test_raw_disk_vm_workload_verifies_after_shutdown(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(disks=(DiskSpec(size="128M", fmt="raw"),), workload=True)
    time.sleep(2)
    last = vm.stop_workload()
    assert last > 0
    vm.shutdown()
    verdict = lab.verify_disk(vm.disk_paths[0], fmt="raw")
    assert verdict.ok, verdict.errors
    assert verdict.fsck_clean and verdict.last_seq == last
    assert verdict.files_checked == last
    assert verdict.to_dict()["ok"] is True


def test_uefi_vm_has_nvram(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(uefi=True)
    assert vm.nvram is not None and vm.nvram.exists()
    root = _xml(vm.domain().XMLDesc(0))
    assert root.findtext("./os/loader", "").endswith("OVMF_CODE_4M.fd")
    assert root.findtext("./os/nvram") == str(vm.nvram)
    assert vm.agent_exec(["/bin/true"])[0] == 0
    assert "efi" in vm.sh("ls /sys/firmware/ || true")
    lab.migrate(vm.name, "node-b")  # NVRAM on shared storage: live migration
    assert vm.node == "node-b" and vm.agent_exec(["/bin/true"])[0] == 0


def test_uefi_vm_on_local_storage_quick_migrates_with_nvram(
        lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(uefi=True, storage="local", node="node-b")
    lab.migrate(vm.name, "node-a", offline=True)
    moved = lab.vm(vm.name)
    assert moved.nvram is not None and moved.nvram.exists()
    assert moved.nvram.is_relative_to(lab.node("node-a").local_dir)
    root = _xml(moved.domain().XMLDesc(0))
    assert root.findtext("./os/nvram") == str(moved.nvram)
    moved.wait_agent(30)


def test_vm_without_agent(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(agent=False, workload=True)
    assert vm.state() == "running"
    root = _xml(vm.domain().XMLDesc(0))
    assert root.find("./devices/channel") is None
    with pytest.raises(LabError, match="no guest agent"):
        vm.agent_exec(["/bin/true"])
    assert vm.boots_logged() == 1  # create_vm waited for the console's ready marker
    time.sleep(2)  # let the workload write a little
    vm.shutdown(timeout=60, force=False)  # ACPI power button -> acpid -> clean poweroff
    assert vm.state() == "shutoff"
    verdict = lab.verify_disk(vm.disk_paths[0])
    assert verdict.ok, verdict.errors


def _frozen_copy(lab: Lab, vm_name: str, dest: Path) -> None:
    """A live, application-consistent copy: freeze, copy the image, thaw."""
    dom = lab.vm(vm_name).domain()
    dom.fsFreeze()
    try:
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                        str(lab.vm(vm_name).disk_paths[0]), str(dest)], check=True)
    finally:
        dom.fsThaw()


def test_workload_check_passes_on_live_copy_and_fails_on_damage(
        lab: Lab, lab_vm: VMFactory, tmp_path: Path) -> None:
    vm = lab_vm(workload=True)
    deadline = time.monotonic() + 30
    while vm.workload_status()[1] < 12 and time.monotonic() < deadline:
        time.sleep(0.3)
    copy = tmp_path / "copy.raw"
    _frozen_copy(lab, vm.name, copy)
    verdict = lab.verify_disk(copy, fmt="raw")
    assert verdict.ok, verdict.errors
    assert verdict.last_seq >= 12 and verdict.files_checked == verdict.last_seq
    assert vm.workload_status()[0], "workload must survive the freeze"
    in_guest = lab.verify_disk(copy, fmt="raw", boot=True)  # same check, in a verifier guest
    assert in_guest.to_dict() == verdict.to_dict()

    # Damage the copy: delete file 3 and truncate file 5 (as a crash could).
    for cmd in ("rm /workload/files/00000/f00000003",
                "punch /workload/files/00000/f00000005 0"):
        subprocess.run(["debugfs", "-w", "-R", cmd, str(copy)], check=True,
                       capture_output=True)
    bad = lab.verify_disk(copy, fmt="raw")
    assert not bad.ok
    assert any("file 3 " in e and "missing" in e for e in bad.errors), bad.errors
    assert any("file 5 " in e and "wrong content" in e for e in bad.errors), bad.errors
    booted = lab.verify_disk(copy, fmt="raw", boot=True)
    assert not booted.ok and booted.last_seq == bad.last_seq
    assert any("file 3 " in e and "missing" in e for e in booted.errors), booted.errors
    assert any("file 5 " in e and "wrong content" in e for e in booted.errors), booted.errors


def test_verify_rejects_a_disk_without_workload(lab: Lab, tmp_path: Path) -> None:
    blank = tmp_path / "blank.raw"
    blank.write_bytes(b"\0" * (1 << 20))
    verdict = lab.verify_disk(blank, fmt="raw")
    assert not verdict.ok and verdict.errors


def test_define_vm_from_existing_disks(lab: Lab, lab_vm: VMFactory) -> None:
    src = lab_vm(workload=True)
    time.sleep(1)
    src.stop_workload()
    src.shutdown()
    restored = lab.shared_dir / "restored-test.qcow2"
    subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(src.disk_paths[0]),
                    str(restored)], check=True)
    restored.chmod(0o666)
    try:
        vm = lab_vm.from_disks(disks=[restored], node="node-b")
        assert vm.node == "node-b" and vm.storage == "shared"
        assert "workload" in vm.sh("ls /data")
    finally:
        lab_vm.cleanup()
        assert restored.exists(), "a VM defined on existing disks must not delete them"
        restored.unlink()
