"""Where a restore puts things, and how the domain XML is rewritten."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

from kura.engine.restore import RestoreOptions, _plan, _rewrite

XML = """<domain type='kvm'><name>web</name><uuid>11111111-2222-3333-4444-555555555555</uuid>
<os><type>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os><devices>
<disk type='block' device='disk'><driver name='qemu' type='qcow2'/><source dev='/dev/vg/web'/>
<backingStore type='file'><format type='qcow2'/><source file='/b.qcow2'/></backingStore>
<target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><target dev='sda' bus='sata'/><readonly/></disk>
<interface type='network'><mac address='52:54:00:00:00:01'/><source network='default'/></interface>
</devices></domain>"""

MANIFEST = SimpleNamespace(
    disks=[SimpleNamespace(name="vda", attrs={"format": "qcow2", "path": "/dev/vg/web"})],
    configs={"domain.xml": None, "nvram": None},
    source=SimpleNamespace(name="web", key="11111111-2222-3333-4444-555555555555"),
)


def test_same_name_keeps_uuid_and_paths() -> None:
    place = _plan(MANIFEST, XML, RestoreOptions())  # type: ignore[arg-type]
    assert place.uuid == "11111111-2222-3333-4444-555555555555"
    assert place.disks == {"vda": (Path("/dev/vg/web"), "qcow2")}
    assert place.nvram == Path("/var/lib/libvirt/qemu/nvram/web_VARS.fd")


def test_new_name_gets_new_uuid_files_macs() -> None:
    opts = RestoreOptions(new_name="web2", target_dir=Path("/srv/r"), fmt="raw")
    place = _plan(MANIFEST, XML, opts)  # type: ignore[arg-type]
    assert place.uuid != "11111111-2222-3333-4444-555555555555"
    assert place.disks == {"vda": (Path("/srv/r/web2-vda.img"), "raw")}
    assert place.nvram == Path("/srv/r/web2_VARS.fd")
    root = ET.fromstring(_rewrite(place, renamed=True))
    assert root.findtext("name") == "web2" and root.findtext("uuid") == place.uuid
    vda = root.find("devices/disk[target]")
    assert vda is not None and vda.get("type") == "file"
    assert vda.find("source").get("file") == "/srv/r/web2-vda.img"  # type: ignore[union-attr]
    assert vda.find("driver").get("type") == "raw"  # type: ignore[union-attr]
    assert vda.find("backingStore") is None
    assert root.find("devices/interface/mac") is None
    assert root.findtext("os/nvram") == "/srv/r/web2_VARS.fd"
    cdrom = root.findall("devices/disk")[1]
    assert cdrom.get("device") == "cdrom"  # untouched
