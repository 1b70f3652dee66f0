"""Domain parsing, checkpoint XML and backup-job XML (no libvirt needed)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from kura.hypervisor.checkpoints import StoredCheckpoint, new_checkpoint_xml
from kura.hypervisor.domain import DomainInfo, parse_disks
from kura.hypervisor.view import PointInTimeView

DOMAIN = """<domain type='kvm'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
<os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
<devices>
 <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
  <source file='/images/web.qcow2'/><target dev='vda' bus='virtio'/></disk>
 <disk type='file' device='disk'><driver name='qemu' type='raw'/>
  <source file='/images/web-data.img'/><target dev='vdb' bus='virtio'/></disk>
 <disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
 <disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'/><target dev='vdc' bus='virtio'/></disk>
</devices></domain>"""


def test_parse_disks() -> None:
    disks, skipped = parse_disks(DOMAIN)
    assert [d.target for d in disks] == ["vda", "vdb", "vdc"]
    assert disks[0].trackable and not disks[1].trackable and not disks[2].trackable
    assert disks[2].storage.kind == "shared" and disks[2].network == "rbd:pool/img"
    assert skipped == [("sda", "cdrom device")]


def test_checkpoint_xml_marks_only_qcow2_disks() -> None:
    disks, _ = parse_disks(DOMAIN)
    info = DomainInfo("web", "u", "running", True, DOMAIN, tuple(disks))
    root = ET.fromstring(new_checkpoint_xml("kura-x", info, "d"))
    assert root.findtext("name") == "kura-x"
    modes = {d.get("name"): d.get("checkpoint") for d in root.findall("disks/disk")}
    assert modes == {"vda": "bitmap", "vdb": "no", "sda": "no", "vdc": "no"}


def test_stored_checkpoint_roundtrip() -> None:
    s = StoredCheckpoint("kura-1", "<domaincheckpoint/>", {"vda": "kura-1"}, "node-a")
    assert StoredCheckpoint.from_meta(s.to_dict()) == s
    assert StoredCheckpoint.from_meta(None) is None
    assert StoredCheckpoint.from_meta({"name": "x"}) is None


def test_backup_xml_per_disk_modes() -> None:
    disks, _ = parse_disks(DOMAIN)
    view = PointInTimeView(None, disks[:2], {"vda": "kura-1"}, None, Path("/var/tmp/kura/u/j"))
    root = ET.fromstring(view.backup_xml(["sda", "vdc"]))
    assert root.get("mode") == "pull"
    assert root.find("server").get("socket") == "/var/tmp/kura/u/j/nbd.sock"  # type: ignore[union-attr]
    by = {d.get("name"): d for d in root.findall("disks/disk")}
    assert by["vda"].get("backupmode") == "incremental" and by["vda"].get("incremental") == "kura-1"
    assert by["vdb"].get("backupmode") == "full"
    assert by["sda"].get("backup") == "no" and by["vdc"].get("backup") == "no"
    assert by["vdb"].find("scratch").get("file") == "/var/tmp/kura/u/j/vdb.scratch"  # type: ignore[union-attr]
