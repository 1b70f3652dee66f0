"""Domain XML generation and disk specs (pure functions)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kura.errors import LabError
from kura.lab.domain import (
    AGENT_CHANNEL,
    DiskFile,
    DiskSpec,
    DomainSpec,
    disk_sources,
    domain_xml,
    parse_size,
    relocate,
    target_name,
    validate_disks,
)
from kura.lab.moves import Moved


def _spec(**kw: object) -> DomainSpec:
    base: dict[str, object] = dict(
        name="vm1", uuid=str(uuid.UUID(int=1)), accel="qemu",
        kernel=Path("/cache/k/vmlinuz"), initrd=Path("/cache/k/initrd.img"),
        disks=(DiskFile(Path("/lab/shared/vm1/vdb.raw"), "raw", "vdb"),
               DiskFile(Path("/lab/shared/vm1/vda.qcow2"), "qcow2", "vda")),
        console_log=Path("/lab/shared/vm1/vm1.console.log"))
    base.update(kw)
    return DomainSpec(**base)  # type: ignore[arg-type]


def test_domain_xml_direct_kernel_boot_and_disks() -> None:
    root = ET.fromstring(domain_xml(_spec()))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "vm1"
    assert root.findtext("os/kernel") == "/cache/k/vmlinuz"
    assert root.findtext("os/initrd") == "/cache/k/initrd.img"
    cmdline = root.findtext("os/cmdline") or ""
    assert "kura.agent=1" in cmdline and "kura.workload=0" in cmdline
    assert "kura.data=1" in cmdline
    disks = root.findall("devices/disk")
    assert [d.find("target").get("dev") for d in disks] == ["vda", "vdb"]  # type: ignore[union-attr]
    assert [d.find("driver").get("type") for d in disks] == ["qcow2", "raw"]  # type: ignore[union-attr]
    assert all(d.find("target").get("bus") == "virtio" for d in disks)  # type: ignore[union-attr]
    channel = root.find("devices/channel")
    assert channel is not None and channel.get("type") == "unix"
    assert channel.find("target").get("name") == AGENT_CHANNEL  # type: ignore[union-attr]
    assert root.find("os/loader") is None
    assert root.find("devices/serial/source").get("append") == "on"  # type: ignore[union-attr]


def test_domain_xml_variants() -> None:
    root = ET.fromstring(domain_xml(_spec(accel="kvm", agent=False, workload=True,
                                          nvram=Path("/lab/shared/vm1/nvram.fd"))))
    assert root.get("type") == "kvm"
    assert root.find("devices/channel") is None
    assert "kura.workload=1" in (root.findtext("os/cmdline") or "")
    assert (root.findtext("os/loader") or "").endswith("OVMF_CODE_4M.fd")
    assert root.findtext("os/nvram") == "/lab/shared/vm1/nvram.fd"
    with pytest.raises(LabError):
        domain_xml(_spec(accel="tcg"))


def test_disk_sources_and_relocate() -> None:
    xml = domain_xml(_spec(nvram=Path("/lab/shared/vm1/nvram.fd")))
    moved = relocate(xml, Path("/lab/shared/vm1"), Path("/lab/nodes/node-b/local/vm1"))
    disks = disk_sources(moved)
    assert [str(d.path) for d in disks] == ["/lab/nodes/node-b/local/vm1/vda.qcow2",
                                            "/lab/nodes/node-b/local/vm1/vdb.raw"]
    root = ET.fromstring(moved)
    assert root.findtext("os/nvram") == "/lab/nodes/node-b/local/vm1/nvram.fd"
    assert root.findtext("os/kernel") == "/cache/k/vmlinuz"  # outside the VM dir: kept
    assert "/lab/shared/vm1/" not in moved


@pytest.mark.parametrize(("text", "value"), [("256M", 256 << 20), ("1G", 1 << 30),
                                            ("64MiB", 64 << 20), ("4096", 4096)])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bad_sizes_and_disks() -> None:
    with pytest.raises(LabError, match="bad disk size"):
        parse_size("lots")
    with pytest.raises(LabError, match="at least one disk"):
        validate_disks(())
    with pytest.raises(LabError, match="qcow2 or raw"):
        validate_disks((DiskSpec(fmt="vmdk"),))
    with pytest.raises(LabError, match="given twice"):
        validate_disks((DiskSpec(target="vdb"), DiskSpec(target="vdb")))
    with pytest.raises(LabError, match=r"vda\.\.vdz"):
        validate_disks((DiskSpec(target="sda"),))
    assert validate_disks((DiskSpec(), DiskSpec(), DiskSpec(target="vdf"))) == ["vda", "vdb", "vdf"]
    assert target_name(25) == "vdz"
    with pytest.raises(LabError):
        target_name(26)


def test_moved_rewrites_only_paths_below_the_old_directory() -> None:
    m = Moved(Path("/lab/nodes/node-a/local/vm1"), Path("/lab/nodes/node-b/local/vm1"))
    assert m.rewrite("/lab/nodes/node-a/local/vm1/vda.qcow2") == \
        "/lab/nodes/node-b/local/vm1/vda.qcow2"
    assert m.rewrite("/lab/nodes/node-a/local/vm10/vda.qcow2") == \
        "/lab/nodes/node-a/local/vm10/vda.qcow2"
    assert m.rewrite("/elsewhere/disk.raw") == "/elsewhere/disk.raw"


def test_domain_xml_tpm_only_when_asked() -> None:
    assert ET.fromstring(domain_xml(_spec())).find("devices/tpm") is None
    tpm = ET.fromstring(domain_xml(_spec(tpm=True))).find("devices/tpm")
    assert tpm is not None and tpm.get("model") == "tpm-crb"
    backend = tpm.find("backend")
    assert backend is not None
    assert (backend.get("type"), backend.get("version")) == ("emulator", "2.0")
