"""kura's checkpoints: create, keep in the repository, redefine anywhere, clean up.

A libvirt checkpoint has two halves. The *bitmaps* live inside each qcow2
image (a persistent dirty bitmap per disk, named after the checkpoint) and
travel with the image: live migration, save/restore, cold moves. The
*metadata* (name, parent, which disk has which bitmap) lives in libvirtd's
state directory on the node where the checkpoint was created, and does not
travel.

kura names its checkpoints ``kura-<restore point id>`` and keeps their
metadata XML in the restore point's manifest (``meta["checkpoint"]``). Before
an incremental backup, wherever the VM runs now:

1. if libvirt on this node lacks the parent's checkpoint, it is *redefined*
   from the stored XML (``<parent>`` removed: kura keeps only one checkpoint
   per VM, so it is always a root) with ``REDEFINE | REDEFINE_VALIDATE`` when
   the VM runs (libvirt then checks that the bitmaps exist);
2. the bitmaps are checked: present in the top image, recording, and not
   marked inconsistent (QEMU sets that after a crash) — through QMP
   ``query-named-block-nodes`` for a running VM, ``qemu-img info`` otherwise;
3. any other ``kura-*`` checkpoint (a failed run's, an older chain's) is
   deleted, bitmaps included, because every extra bitmap costs guest writes.

If any step fails the backup is taken in full and the log says why. A new
checkpoint is created by the backup job itself and only becomes the base of
the next incremental when its restore point commits: until then it is
deleted on every failure path.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

import libvirt

from kura.errors import CheckpointError, HypervisorError
from kura.hypervisor.domain import DomainInfo
from kura.hypervisor.qemuimg import add_bitmap, image_info, remove_bitmap

PREFIX = "kura-"


def checkpoint_name(restore_point_id: str) -> str:
    return PREFIX + restore_point_id


@dataclass(frozen=True)
class StoredCheckpoint:
    """What a restore point keeps to redefine its checkpoint on any node."""

    name: str
    xml: str
    disks: dict[str, str]  # target -> bitmap name
    node: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "xml": self.xml, "disks": dict(self.disks), "node": self.node}

    @classmethod
    def from_meta(cls, meta: Any) -> StoredCheckpoint | None:
        if not isinstance(meta, dict) or not meta.get("name") or not meta.get("xml"):
            return None
        return cls(str(meta["name"]), str(meta["xml"]),
                   {str(k): str(v) for k, v in dict(meta.get("disks") or {}).items()},
                   str(meta.get("node", "")))


def new_checkpoint_xml(name: str, info: DomainInfo, description: str) -> str:
    """XML for a new checkpoint: a bitmap on every qcow2 disk, none elsewhere."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "description").text = description
    disks = ET.SubElement(root, "disks")
    tracked = {d.target for d in info.disks if d.trackable}
    for el in ET.fromstring(info.xml).findall("devices/disk"):
        target = el.find("target")
        if target is None or not target.get("dev"):
            continue
        dev = target.get("dev", "")
        ET.SubElement(disks, "disk", name=dev, checkpoint="bitmap" if dev in tracked else "no")
    return ET.tostring(root, encoding="unicode")


def lookup(dom: Any, name: str) -> Any | None:
    try:
        return dom.checkpointLookupByName(name, 0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
            return None
        raise HypervisorError(f"cannot look up checkpoint {name}: {exc}") from exc


def names(dom: Any) -> list[str]:
    """Every checkpoint of the domain known to libvirt on this node."""
    try:
        return [str(cp.getName()) for cp in dom.listAllCheckpoints(0)]
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"cannot list checkpoints: {exc}") from exc


def stored_form(dom: Any, name: str, node: str) -> StoredCheckpoint:
    """The checkpoint's metadata as kept in the repository."""
    cp = lookup(dom, name)
    if cp is None:
        raise CheckpointError(f"checkpoint {name} vanished right after the backup created it")
    try:
        xml = str(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
    except libvirt.libvirtError as exc:
        raise CheckpointError(f"cannot read checkpoint {name}: {exc}") from exc
    disks = {}
    for d in ET.fromstring(xml).findall("disks/disk"):
        if d.get("checkpoint") == "bitmap":
            disks[d.get("name", "")] = d.get("bitmap") or name
    return StoredCheckpoint(name, xml, disks, node)


def redefine(dom: Any, stored: StoredCheckpoint, *, validate: bool) -> None:
    """Recreate the checkpoint's metadata on this node from the stored XML."""
    root = ET.fromstring(stored.xml)
    for parent in root.findall("parent"):
        root.remove(parent)
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if validate:
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        dom.checkpointCreateXML(ET.tostring(root, encoding="unicode"), flags)
    except libvirt.libvirtError as exc:
        raise CheckpointError(f"cannot redefine checkpoint {stored.name} on this node: {exc}") \
            from exc


def delete(dom: Any, name: str, info: DomainInfo | None = None) -> None:
    """Delete a checkpoint and its bitmaps.

    libvirt deletes bitmaps only in a running domain; for a shut-off one the
    metadata is deleted and the bitmaps are removed from the images with
    qemu-img (``info`` names the disks). Metadata alone goes if the bitmaps are
    already gone.
    """
    cp = lookup(dom, name)
    if cp is None:
        if info is not None and info.state == "shut off":
            _remove_image_bitmaps(info, name)
        return
    try:
        cp.delete(0)
        return
    except libvirt.libvirtError as first:
        try:
            cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        except libvirt.libvirtError:
            raise CheckpointError(f"cannot delete checkpoint {name}: {first}") from first
    if info is not None and info.state == "shut off":
        _remove_image_bitmaps(info, name)


def _remove_image_bitmaps(info: DomainInfo, name: str) -> None:
    for d in info.disks:
        if d.trackable and d.path:
            try:
                if image_info(d.path).bitmap(name) is not None:
                    remove_bitmap(d.path, name)
            except HypervisorError as exc:
                raise CheckpointError(f"cannot remove bitmap {name} from {d.path}: "
                                      f"{exc.message}") from exc


def create_offline(dom: Any, info: DomainInfo, name: str, description: str) -> None:
    """A new checkpoint for a shut-off domain (libvirt only creates them live).

    The bitmaps are added to the qcow2 images with ``qemu-img bitmap --add``
    (enabled and persistent: QEMU records every write from its next start),
    then the metadata is defined with ``REDEFINE`` as libvirt would have.
    """
    added: list[str] = []
    try:
        for d in info.disks:
            if d.trackable and d.path:
                add_bitmap(d.path, name)
                added.append(d.path)
        root = ET.fromstring(new_checkpoint_xml(name, info, description))
        ET.SubElement(root, "creationTime").text = str(int(time.time()))
        for el in root.findall("disks/disk"):
            if el.get("checkpoint") == "bitmap":
                el.set("bitmap", name)
        dom.checkpointCreateXML(ET.tostring(root, encoding="unicode"),
                                libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
    except (libvirt.libvirtError, HypervisorError) as exc:
        for path in added:
            with contextlib.suppress(HypervisorError):
                remove_bitmap(path, name)
        msg = exc.message if isinstance(exc, HypervisorError) else str(exc)
        raise CheckpointError(f"cannot create checkpoint {name} offline: {msg}") from exc


def _qmp(dom: Any, command: str, arguments: dict[str, Any] | None = None) -> Any:
    import libvirt_qemu

    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    try:
        out = libvirt_qemu.qemuMonitorCommand(dom, json.dumps(msg), 0)
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"QMP {command} failed: {exc}") from exc
    return json.loads(out).get("return")


def live_bitmaps(dom: Any, info: DomainInfo) -> dict[str, dict[str, dict[str, Any]]]:
    """target -> bitmap name -> QMP bitmap state, for the top image of each disk."""
    nodes = _qmp(dom, "query-named-block-nodes", {"flat": True}) or []
    by_file: dict[str, dict[str, dict[str, Any]]] = {}
    for node in nodes:
        if node.get("drv") != "qcow2":
            continue
        maps = {str(b.get("name")): b for b in node.get("dirty-bitmaps") or () if b.get("name")}
        by_file.setdefault(str(node.get("file")), {}).update(maps)
    return {d.target: by_file.get(d.path or "", {}) for d in info.disks if d.trackable}


def bitmap_problem(dom: Any, info: DomainInfo, stored: StoredCheckpoint,
                   targets: list[str]) -> str | None:
    """Why the checkpoint's bitmaps cannot be trusted for ``targets`` (None: they can)."""
    running = info.state in ("running", "paused")
    if running:
        try:
            live = live_bitmaps(dom, info)
        except HypervisorError as exc:
            return f"cannot inspect bitmaps: {exc}"
    for target in targets:
        bitmap = stored.disks.get(target)
        if bitmap is None:
            return f"disk {target} has no bitmap in checkpoint {stored.name}"
        if running:
            state = live.get(target, {}).get(bitmap)
            if state is None:
                return f"bitmap {bitmap} is missing on disk {target}"
            if state.get("inconsistent"):
                return f"bitmap {bitmap} on disk {target} is inconsistent (QEMU crashed?)"
            if not state.get("recording", True):
                return f"bitmap {bitmap} on disk {target} is disabled"
        else:
            disk = info.disk(target)
            if not disk.path:
                return f"disk {target} has no path"
            try:
                found = image_info(disk.path).bitmap(bitmap)
            except HypervisorError as exc:
                return str(exc)
            if found is None:
                return f"bitmap {bitmap} is missing on disk {target}"
            if not found.consistent:
                return f"bitmap {bitmap} on disk {target} is inconsistent (QEMU crashed?)"
    return None


_KURA_RE = re.compile(r"^kura-")


def remove_strays(dom: Any, info: DomainInfo, keep: set[str], *,
                  bitmaps: bool = True) -> list[str]:
    """Delete every ``kura-*`` checkpoint and bitmap except ``keep``; returns what went.

    ``bitmaps=False`` skips the search for bitmaps without checkpoint metadata (a QMP
    query, or ``qemu-img info`` per disk): at the end of a backup, whose start already
    searched, only the checkpoints need to go.
    """
    removed: list[str] = []
    for name in names(dom):
        if _KURA_RE.match(name) and name not in keep:
            delete(dom, name, info)
            removed.append(name)
    if not bitmaps:
        return removed
    # Bitmaps without metadata (left by a node that no longer knows them).
    running = info.state in ("running", "paused")
    try:
        if running:
            nodes = _qmp(dom, "query-named-block-nodes", {"flat": True}) or []
            tops = {d.path for d in info.disks if d.trackable}
            for node in nodes:
                if node.get("drv") != "qcow2" or node.get("file") not in tops:
                    continue
                for b in node.get("dirty-bitmaps") or ():
                    bname = str(b.get("name", ""))
                    if _KURA_RE.match(bname) and bname not in keep and not b.get("busy"):
                        _qmp(dom, "block-dirty-bitmap-remove",
                             {"node": node["node-name"], "name": bname})
                        removed.append(f"{bname} (bitmap)")
        else:
            for d in info.disks:
                if not d.trackable or not d.path:
                    continue
                for b in image_info(d.path).bitmaps:
                    if _KURA_RE.match(b.name) and b.name not in keep:
                        remove_bitmap(d.path, b.name)
                        removed.append(f"{b.name} (bitmap on {d.target})")
    except HypervisorError:
        pass  # stray bitmaps cost write overhead, not correctness
    return removed
