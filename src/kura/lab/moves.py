"""Moving lab VMs between nodes: live migration, quick migration, cold move.

These mirror how VMs move in a real cluster (and in the seed's Hyper-V
cluster):

* **Live migration** (``migrate``): libvirt peer-to-peer migration of a running
  VM whose disks are on shared storage, with ``PERSIST_DEST |
  UNDEFINE_SOURCE`` so the definition moves with it. The shared directory is
  not a cluster file system, so ``VIR_MIGRATE_UNSAFE`` is passed: safe here,
  as both nodes share one kernel and one page cache.
* **Quick migration** (``migrate --offline``): save the running VM's state to a
  file beside its disks, move a node-local VM's directory to the destination's
  local storage (the "cluster disk changes owner"), define it on the
  destination with paths rewritten, undefine it on the source (with its
  checkpoint and snapshot metadata, keeping NVRAM), restore the saved state.
* **Cold move**: the same for a shut-off VM, without save and restore.

Checkpoint *metadata* never travels with a VM (the qcow2 bitmaps do):
redefining it on the new node is the backup engine's job. Each function
returns the directory move it made (or None) so that the caller can update
the lab state.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import libvirt

from kura.errors import LabError
from kura.lab.domain import relocate
from kura.lab.node import LabNode
from kura.lab.vm import LabVM

UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
LIVE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
              | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
              | libvirt.VIR_MIGRATE_UNSAFE)
_XML_FLAGS = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE


@dataclass(frozen=True)
class Moved:
    """A VM directory that moved from one node's local storage to another's."""

    old: Path
    new: Path

    def rewrite(self, path: str) -> str:
        old = str(self.old) + "/"
        return str(self.new) + "/" + path[len(old):] if path.startswith(old) else path


def live_migrate(vm: LabVM, src: LabNode, dom: libvirt.virDomain, dest: LabNode) -> None:
    if vm.storage != "shared":
        raise LabError(f"VM {vm.name} is on {src.name}'s local storage: live migration "
                       "needs shared storage", hint="use --offline (quick migration)")
    try:
        dom.migrateToURI3(dest.uri, {}, LIVE_FLAGS)
    except libvirt.libvirtError as exc:
        raise LabError(f"live migration of {vm.name} from {src.name} to {dest.name} failed: "
                       f"{exc.get_error_message()}") from exc


def _move_local_dir(vm: LabVM, dest: LabNode) -> Moved | None:
    """For a local-storage VM, move its directory to ``dest``'s local storage."""
    directory = vm.record.directory
    if vm.storage != "local" or not directory:
        return None
    new = dest.local_dir / vm.name
    if new.exists():
        raise LabError(f"{new} already exists: cannot move VM {vm.name} there")
    shutil.move(directory, new)
    return Moved(Path(directory), new)


def quick_migrate(vm: LabVM, src_conn: libvirt.virConnect, dom: libvirt.virDomain,
                  dest: LabNode, dest_conn: libvirt.virConnect) -> Moved | None:
    rec = vm.record
    base = Path(rec.directory) if rec.directory else Path(rec.disks[0].path).parent
    save = base / f"{vm.name}.save"
    try:
        xml = dom.XMLDesc(_XML_FLAGS)
        dom.save(str(save))
        moved = _move_local_dir(vm, dest)
        dxml = None
        if moved is not None:
            save = moved.new / save.name
            xml = relocate(xml, moved.old, moved.new)
            saved_xml = src_conn.saveImageGetXMLDesc(str(save), libvirt.VIR_DOMAIN_XML_SECURE)
            dxml = relocate(saved_xml, moved.old, moved.new)
        dest_conn.defineXML(xml)
        dom.undefineFlags(UNDEFINE_FLAGS)
        dest_conn.restoreFlags(str(save), dxml, 0)
    except libvirt.libvirtError as exc:
        raise LabError(f"quick migration of {vm.name} to {dest.name} failed: "
                       f"{exc.get_error_message()}",
                       hint=f"the saved state is in {save}") from exc
    save.unlink(missing_ok=True)
    return moved


def cold_move(vm: LabVM, dom: libvirt.virDomain, dest: LabNode,
              dest_conn: libvirt.virConnect) -> Moved | None:
    if dom.isActive():
        raise LabError(f"VM {vm.name} is running", hint="shut it down first, or migrate it")
    try:
        xml = dom.XMLDesc(_XML_FLAGS)
        moved = _move_local_dir(vm, dest)
        if moved is not None:
            xml = relocate(xml, moved.old, moved.new)
        dest_conn.defineXML(xml)
        dom.undefineFlags(UNDEFINE_FLAGS)
    except libvirt.libvirtError as exc:
        raise LabError(f"cold move of {vm.name} to {dest.name} failed: "
                       f"{exc.get_error_message()}") from exc
    return moved
