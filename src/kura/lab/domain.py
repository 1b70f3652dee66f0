"""Domain XML for lab VMs (pure functions, no libvirt calls).

A lab VM boots the cached guest kernel and initramfs directly (``<kernel>``,
``<initrd>``, ``<cmdline>``); it has no root disk. Its data disks are virtio
(``vda``, ``vdb``, ...); the guest formats ``vda`` with ext4 on first boot and
mounts it on ``/data``. The guest agent channel is a virtio-serial port named
``org.qemu.guest_agent.0`` whose unix socket libvirt creates. The serial
console goes to ``<vm>.console.log`` in the VM's directory (appended, so it survives
migration). ``type='kvm'`` is used only when the host probe showed that a
guest really boots under KVM; otherwise ``type='qemu'`` (TCG).

UEFI VMs add OVMF as pflash with a per-VM NVRAM file (copied from Debian's
vars template) in the VM's directory; OVMF then boots the same kernel through
fw_cfg. A VM with ``tpm`` gets an emulated TPM 2.0 (``tpm-crb``, swtpm
started by the node's libvirtd, state in the node's
``/var/lib/libvirt/swtpm/<uuid>/``). The kernel command line carries ``kura.agent=0|1`` and
``kura.workload=0|1`` and ``kura.data=0|1`` (0: do not format or mount vda,
for verifier guests) for the guest's start-up script.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from kura.errors import LabError

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
EMULATOR = "/usr/bin/qemu-system-x86_64"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
LAB_NS = "https://kura.dev/xmlns/lab/1"
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


@dataclass(frozen=True)
class DiskSpec:
    """A disk to create for a lab VM."""

    size: str = "256M"
    fmt: str = "qcow2"
    target: str | None = None


@dataclass(frozen=True)
class DiskFile:
    """A disk as it appears in the domain XML."""

    path: Path
    fmt: str
    target: str


@dataclass(frozen=True)
class DomainSpec:
    name: str
    uuid: str
    accel: str
    kernel: Path
    initrd: Path
    disks: tuple[DiskFile, ...]
    memory_mib: int = 128
    agent: bool = True
    workload: bool = False
    nvram: Path | None = None
    console_log: Path | None = None
    storage: str = "shared"
    data: bool = True
    tpm: bool = False


def parse_size(size: str) -> int:
    """Bytes in a size like ``256M``, ``1G``, ``64MiB`` or ``4096``."""
    m = _SIZE.match(size.strip())
    if not m:
        raise LabError(f"bad disk size {size!r}", hint="use e.g. 256M or 1G")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(m.group(1)) * factor[m.group(2).upper()]


def target_name(i: int) -> str:
    """vda, vdb, ... vdz for disk i."""
    if not 0 <= i < 26:
        raise LabError(f"a lab VM has at most 26 disks (asked for disk #{i + 1})")
    return "vd" + chr(ord("a") + i)


def validate_disks(specs: tuple[DiskSpec, ...]) -> list[str]:
    """The target of each disk (given or assigned in order), checked for clashes."""
    if not specs:
        raise LabError("a lab VM needs at least one disk")
    targets: list[str] = []
    for i, spec in enumerate(specs):
        if spec.fmt not in ("qcow2", "raw"):
            raise LabError(f"disk format must be qcow2 or raw, not {spec.fmt!r}")
        parse_size(spec.size)
        target = spec.target or target_name(i)
        if not re.fullmatch(r"vd[a-z]", target):
            raise LabError(f"disk target must be vda..vdz, not {target!r}")
        if target in targets:
            raise LabError(f"disk target {target} given twice")
        targets.append(target)
    return targets


def cmdline(spec: DomainSpec) -> str:
    return (f"console=ttyS0 quiet kura.agent={int(spec.agent)} "
            f"kura.workload={int(spec.workload)} kura.data={int(spec.data)} "
            f"kura.hostname={spec.name}")


def domain_xml(spec: DomainSpec) -> str:
    """The libvirt domain XML of a lab VM."""
    if spec.accel not in ("kvm", "qemu"):
        raise LabError(f"domain type must be kvm or qemu, not {spec.accel!r}")
    ET.register_namespace("kura", LAB_NS)
    dom = ET.Element("domain", type=spec.accel)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    meta = ET.SubElement(ET.SubElement(dom, "metadata"), f"{{{LAB_NS}}}vm")
    ET.SubElement(meta, f"{{{LAB_NS}}}storage").text = spec.storage
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = "1"
    os_ = ET.SubElement(dom, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.nvram is not None:
        ET.SubElement(os_, "loader", readonly="yes", type="pflash").text = str(OVMF_CODE)
        ET.SubElement(os_, "nvram", template=str(OVMF_VARS)).text = str(spec.nvram)
    ET.SubElement(os_, "kernel").text = str(spec.kernel)
    ET.SubElement(os_, "initrd").text = str(spec.initrd)
    ET.SubElement(os_, "cmdline").text = cmdline(spec)
    ET.SubElement(ET.SubElement(dom, "features"), "acpi")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"
    dev = ET.SubElement(dom, "devices")
    ET.SubElement(dev, "emulator").text = EMULATOR
    for disk in sorted(spec.disks, key=lambda d: d.target):
        d = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(d, "driver", name="qemu", type=disk.fmt, discard="unmap")
        ET.SubElement(d, "source", file=str(disk.path))
        ET.SubElement(d, "target", dev=disk.target, bus="virtio")
    ET.SubElement(dev, "controller", type="usb", model="none")
    if spec.tpm:
        tpm = ET.SubElement(dev, "tpm", model="tpm-crb")
        ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    if spec.agent:
        ch = ET.SubElement(dev, "channel", type="unix")
        ET.SubElement(ch, "target", type="virtio", name=AGENT_CHANNEL)
    if spec.console_log is not None:
        serial = ET.SubElement(dev, "serial", type="file")
        ET.SubElement(serial, "source", path=str(spec.console_log), append="on")
        ET.SubElement(serial, "target", port="0")
    else:
        ET.SubElement(ET.SubElement(dev, "serial", type="pty"), "target", port="0")
    ET.SubElement(dev, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def disk_sources(xml: str) -> list[DiskFile]:
    """The file-backed disks of a domain XML, in target order."""
    root = ET.fromstring(xml)
    disks = []
    for d in root.findall("./devices/disk[@device='disk']"):
        src = d.find("source")
        tgt = d.find("target")
        drv = d.find("driver")
        if src is None or tgt is None or src.get("file") is None:
            continue
        fmt = drv.get("type", "raw") if drv is not None else "raw"
        disks.append(DiskFile(Path(src.get("file", "")), fmt, tgt.get("dev", "")))
    return sorted(disks, key=lambda d: d.target)


def relocate(xml: str, old_dir: Path, new_dir: Path) -> str:
    """Rewrite every file path under ``old_dir`` (disks, NVRAM, console) to ``new_dir``."""
    root = ET.fromstring(xml)
    old = str(old_dir).rstrip("/") + "/"
    new = str(new_dir).rstrip("/") + "/"
    for el in root.iter():
        for attr in ("file", "path"):
            value = el.get(attr)
            if value and value.startswith(old):
                el.set(attr, new + value[len(old):])
        if el.tag == "nvram" and el.text and el.text.startswith(old):
            el.text = new + el.text[len(old):]
    return ET.tostring(root, encoding="unicode")
