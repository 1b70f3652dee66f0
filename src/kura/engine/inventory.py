"""The node as a tree, for ``kura ls``: node → configuration store → VMs → disks.

This mirrors the browse view of the system kura replaces (per node: the host's
VM configuration store, then each VM, then where its files live), with what a
KVM administrator needs to plan backups:

- node: hostname, libvirt host UUID, URI, hypervisor and libvirt versions;
- configuration store: where libvirt keeps the domain definitions (the
  "Initial Store" of the seed) and how many VMs are persistent or transient;
- VM: name, UUID, state (running, paused, shut off, saved...), firmware,
  NVRAM and TPM state paths, the checkpoints libvirt knows here (kura's are
  ``kura-*``);
- disk: target, bus, path, format, virtual and allocated size, backing chain,
  storage kind (node-local or shared, with the mount point, file-system type
  and storage pool), and whether change tracking is available.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import libvirt

from kura.errors import HypervisorError
from kura.hypervisor import checkpoints
from kura.hypervisor.connection import Hypervisor, NodeIdentity
from kura.hypervisor.domain import DiskInfo, DomainInfo, describe, disk_sizes


@dataclass(frozen=True)
class DiskNode:
    disk: DiskInfo
    virtual_size: int | None
    allocated: int | None

    def to_dict(self) -> dict[str, Any]:
        d = self.disk.to_dict()
        d.update({"virtual_size": self.virtual_size, "allocated": self.allocated})
        return d


@dataclass(frozen=True)
class VmNode:
    info: DomainInfo
    disks: list[DiskNode]
    checkpoints: list[str]

    def to_dict(self) -> dict[str, Any]:
        i = self.info
        return {
            "name": i.name, "uuid": i.uuid, "state": i.state, "persistent": i.persistent,
            "firmware": i.firmware, "nvram": i.nvram, "tpm": i.tpm_dir,
            "checkpoints": list(self.checkpoints),
            "disks": [d.to_dict() for d in self.disks],
            "skipped": [{"target": t, "why": w} for t, w in i.skipped],
        }


@dataclass(frozen=True)
class NodeTree:
    node: NodeIdentity
    hypervisor: str
    libvirt_version: str
    config_store: str
    vms: list[VmNode] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        persistent = sum(1 for v in self.vms if v.info.persistent)
        return {
            "node": self.node.to_dict(), "hypervisor": self.hypervisor,
            "libvirt_version": self.libvirt_version,
            "config_store": {"path": self.config_store, "persistent": persistent,
                             "transient": len(self.vms) - persistent},
            "vms": [v.to_dict() for v in self.vms], "errors": list(self.errors),
        }


def _version(n: int) -> str:
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


def _config_store(uri: str) -> str:
    if "/session" in uri:
        return "~/.config/libvirt/qemu (session)"
    return "/etc/libvirt/qemu"


def describe_node(hv: Hypervisor, *, with_uuid: bool = True) -> NodeTree:
    """Walk every VM of the node (a VM that vanishes meanwhile is skipped)."""
    conn = hv.conn
    try:
        hypervisor = f"{conn.getType()} {_version(conn.getVersion())}"
        lib = _version(conn.getLibVersion())
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot query node {hv.uri}: {exc}") from exc
    node = hv.identity() if with_uuid else hv.node
    tree = NodeTree(node, hypervisor, lib, _config_store(hv.uri))
    for dom in hv.domains():
        try:
            info = describe(dom, with_chain=True)
            disks = []
            for d in info.disks:
                try:
                    virtual, allocated = disk_sizes(dom, d)
                    disks.append(DiskNode(d, virtual, allocated))
                except HypervisorError:
                    disks.append(DiskNode(d, None, None))
            cps = checkpoints.names(dom)
            tree.vms.append(VmNode(info, disks, cps))
        except HypervisorError as exc:
            tree.errors.append(str(exc))
    return tree
