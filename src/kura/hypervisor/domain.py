"""A libvirt domain as kura sees it: state, disks, firmware and TPM state.

:func:`describe` reads a domain's XML (the live XML when it runs, so that
aliases and the active backing chain are known; the persistent XML
otherwise) and returns a :class:`DomainInfo`:

- ``state`` is one of ``running``, ``paused``, ``shut off``, ``saved`` (shut
  off with a managed-save image: ``virsh managedsave``), ``shutting down``,
  ``crashed``, ``pmsuspended``;
- ``disks`` are the block devices kura backs up: ``<disk device='disk'>`` of
  type file, block, volume or network, each with its target (``vda``), bus,
  format, source, storage kind (see :mod:`kura.hypervisor.storage`) and
  whether change tracking is possible. CD-ROMs, floppies, pass-through LUNs,
  read-only and transient disks are listed in ``skipped`` with the reason;
- ``nvram`` is the UEFI variable store (``<os><nvram>``), ``tpm_dir`` the
  swtpm state directory of an emulated TPM.

Change tracking needs a persistent dirty bitmap, which only a qcow2 image at
the top of the chain can hold: raw and network disks are backed up in full
every time.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import libvirt

from kura.errors import HypervisorError
from kura.hypervisor.qemuimg import ImageInfo, image_info
from kura.hypervisor.storage import PoolIndex, StorageInfo, classify, read_mounts

SWTPM_ROOT = "/var/lib/libvirt/swtpm"

_STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "pmsuspended",
}


@dataclass(frozen=True)
class DiskInfo:
    """One disk of a domain."""

    target: str  # "vda"
    bus: str
    source_type: str  # file, block, volume, network
    path: str | None  # file or device path; None for network disks
    format: str  # driver type: qcow2, raw...
    storage: StorageInfo
    alias: str | None = None
    network: str | None = None  # "rbd:pool/image" for network disks
    backing: tuple[tuple[str, str], ...] = ()

    @property
    def trackable(self) -> bool:
        """Can this disk carry a checkpoint (a persistent dirty bitmap)?"""
        return self.format == "qcow2" and self.source_type in ("file", "block", "volume")

    @property
    def tracking_note(self) -> str:
        if self.trackable:
            return "available (qcow2 persistent bitmaps)"
        if self.format != "qcow2":
            return f"unavailable: {self.format} disk has no persistent bitmaps (always full)"
        return f"unavailable: {self.source_type} disk"

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "bus": self.bus, "type": self.source_type,
            "path": self.path, "network": self.network, "format": self.format,
            "storage": self.storage.to_dict(), "alias": self.alias,
            "backing": [{"path": p, "format": f} for p, f in self.backing],
            "change_tracking": self.trackable, "change_tracking_note": self.tracking_note,
        }


@dataclass(frozen=True)
class DomainInfo:
    """A domain's identity, state and what belongs to it."""

    name: str
    uuid: str
    state: str
    persistent: bool
    xml: str  # the XML this was parsed from
    disks: tuple[DiskInfo, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (target, why) for devices not backed up
    nvram: str | None = None
    tpm_dir: str | None = None
    firmware: str = "bios"
    extra: dict[str, Any] = field(default_factory=dict)

    def disk(self, target: str) -> DiskInfo:
        for d in self.disks:
            if d.target == target:
                return d
        raise HypervisorError(f"VM {self.name} has no disk {target!r}",
                              hint=f"its disks are {', '.join(d.target for d in self.disks)}")

    @property
    def active(self) -> bool:
        return self.state in ("running", "paused", "shutting down", "pmsuspended")


def domain_state(dom: Any) -> str:
    try:
        code = dom.state(0)[0]
        state = _STATES.get(code, "unknown")
        if state == "shut off" and dom.hasManagedSaveImage(0):
            return "saved"
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot read the state of VM {_name(dom)}: {exc}") from exc
    return state


def _name(dom: Any) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"


def _backing_from_xml(disk: ET.Element) -> tuple[tuple[str, str], ...]:
    chain: list[tuple[str, str]] = []
    node = disk.find("backingStore")
    while node is not None and node.get("type") is not None:
        src = node.find("source")
        path = (src.get("file") or src.get("dev") or src.get("name") or "") if src is not None \
            else ""
        fmt_el = node.find("format")
        chain.append((path, fmt_el.get("type", "") if fmt_el is not None else ""))
        node = node.find("backingStore")
    return tuple(chain)


def _volume_path(conn: Any, pool: str, volume: str) -> str | None:
    try:
        return str(conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).path())
    except libvirt.libvirtError:
        return None


def parse_disks(xml: str, conn: Any | None = None, *, with_chain: bool = False
                ) -> tuple[list[DiskInfo], list[tuple[str, str]]]:
    """The backed-up disks of a domain XML, and the devices skipped with why."""
    root = ET.fromstring(xml)
    mounts = read_mounts()
    pools = PoolIndex(conn) if conn is not None else None
    disks: list[DiskInfo] = []
    skipped: list[tuple[str, str]] = []
    for el in root.findall("devices/disk"):
        target_el = el.find("target")
        target = target_el.get("dev", "?") if target_el is not None else "?"
        device = el.get("device", "disk")
        if device != "disk":
            skipped.append((target, f"{device} device"))
            continue
        if el.find("readonly") is not None:
            skipped.append((target, "read-only disk"))
            continue
        if el.find("transient") is not None:
            skipped.append((target, "transient disk"))
            continue
        src = el.find("source")
        if src is None:
            skipped.append((target, "no medium"))
            continue
        stype = el.get("type", "file")
        driver = el.find("driver")
        fmt = driver.get("type", "raw") if driver is not None else "raw"
        path: str | None = None
        network: str | None = None
        pool: str | None = None
        if stype == "file":
            path = src.get("file")
        elif stype == "block":
            path = src.get("dev")
        elif stype == "volume":
            pool = src.get("pool")
            if conn is not None and pool and src.get("volume"):
                path = _volume_path(conn, pool, src.get("volume", ""))
        elif stype == "network":
            network = f"{src.get('protocol', '?')}:{src.get('name', '')}"
        else:
            skipped.append((target, f"unsupported disk type {stype!r}"))
            continue
        if stype != "network" and not path:
            skipped.append((target, "source path unknown"))
            continue
        if pool is None and pools is not None:
            pool = pools.pool_of(path)
        alias_el = el.find("alias")
        backing = _backing_from_xml(el)
        if with_chain and not backing and path and stype == "file" and os.path.exists(path):
            try:
                backing = image_info(path).backing
            except HypervisorError:
                backing = ()
        disks.append(DiskInfo(
            target=target,
            bus=target_el.get("bus", "") if target_el is not None else "",
            source_type=stype,
            path=path,
            format=fmt,
            storage=classify(path, network=stype == "network", pool=pool, mounts=mounts),
            alias=alias_el.get("name") if alias_el is not None else None,
            network=network,
            backing=backing,
        ))
    return disks, skipped


def describe(dom: Any, *, with_chain: bool = False) -> DomainInfo:
    """Read what kura needs to know about ``dom``."""
    state = domain_state(dom)
    try:
        flags = libvirt.VIR_DOMAIN_XML_SECURE
        if state not in ("running", "paused", "shutting down", "pmsuspended"):
            flags |= libvirt.VIR_DOMAIN_XML_INACTIVE
        xml = str(dom.XMLDesc(flags))
        persistent = bool(dom.isPersistent())
        conn = dom.connect()
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot read the definition of VM {_name(dom)}: {exc}") from exc
    root = ET.fromstring(xml)
    disks, skipped = parse_disks(xml, conn, with_chain=with_chain)
    uuid = root.findtext("uuid") or ""
    nvram = root.findtext("os/nvram")
    loader = root.find("os/loader")
    os_el = root.find("os")
    firmware = os_el.get("firmware", "") if os_el is not None else ""
    if not firmware:
        firmware = "efi" if (nvram or (loader is not None and loader.get("type") == "pflash")) \
            else "bios"
    tpm_dir: str | None = None
    backend = root.find("devices/tpm/backend")
    if backend is not None and backend.get("type") == "emulator":
        src = backend.find("source")
        if src is not None and src.get("path"):
            tpm_dir = src.get("path")
        else:
            tpm_dir = os.path.join(SWTPM_ROOT, uuid)
    return DomainInfo(
        name=root.findtext("name") or _name(dom),
        uuid=uuid,
        state=state,
        persistent=persistent,
        xml=xml,
        disks=tuple(disks),
        skipped=tuple(skipped),
        nvram=nvram.strip() if nvram else None,
        tpm_dir=tpm_dir,
        firmware=firmware,
    )


def inactive_xml(dom: Any) -> str:
    """The persistent definition (what a restore redefines), secrets included."""
    try:
        if dom.isPersistent():
            return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE))
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE))
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot read the definition of VM {_name(dom)}: {exc}") from exc


def disk_sizes(dom: Any, disk: DiskInfo) -> tuple[int, int]:
    """(virtual size, allocated bytes on the host) of one disk."""
    try:
        capacity, allocation, _physical = dom.blockInfo(disk.path or disk.target, 0)
        return int(capacity), int(allocation)
    except libvirt.libvirtError:
        pass
    if disk.path and os.path.exists(disk.path):
        info: ImageInfo = image_info(disk.path)
        return info.virtual_size, info.actual_size
    raise HypervisorError(f"cannot read the size of disk {disk.target} ({disk.path})")
