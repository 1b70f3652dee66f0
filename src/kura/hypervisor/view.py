"""The point-in-time view of a running VM's disks: libvirt's backup job, pull mode.

``virDomainBackupBegin`` in *pull* mode makes QEMU export every selected disk
over NBD as it was at that instant. Guest writes continue; before QEMU
overwrites a block that the view still needs, it copies the old data into a
per-disk *scratch* file (copy-before-write fleecing), so the export never
changes while kura reads it. The same call atomically creates the new
checkpoint, so the next incremental starts exactly at this instant.

Per disk the view is *full* (export everything; kura reads the allocated
extents from ``base:allocation``) or *incremental* from a named checkpoint
(the export carries ``qemu:dirty-bitmap:backup-<dev>``: the blocks written
since then). Names are read back from ``virDomainBackupGetXMLDesc``
(``exportname``, ``exportbitmap``) rather than assumed.

The NBD server listens on a unix socket inside a per-job directory under the
scratch root (default ``/var/tmp/kura``), owned by QEMU's user so QEMU can
create the socket and scratch files there. The directory is named after the
VM's UUID so leftovers of a killed run can be recognised and removed, and
ending the view (``virDomainAbortJob``: the normal end of a pull-mode job)
removes scratch files; the directory goes too.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import secrets
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

from kura.errors import CheckpointError, HypervisorError, LockedError, MigratedError
from kura.hypervisor.domain import DiskInfo

DEFAULT_SCRATCH_ROOT = Path("/var/tmp/kura")
QEMU_USERS = ("libvirt-qemu", "qemu")


@dataclass(frozen=True)
class DiskExport:
    target: str
    export: str
    bitmap: str | None  # NBD dirty-bitmap context name (incremental disks)


def _qemu_ids() -> tuple[int, int] | None:
    for user in QEMU_USERS:
        try:
            pw = pwd.getpwnam(user)
            return pw.pw_uid, pw.pw_gid
        except KeyError:
            continue
    return None


def job_dir(root: Path, uuid: str) -> Path:
    """A fresh directory QEMU can write: ``ROOT/<uuid>/<random>``."""
    base = root / uuid
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    os.chmod(base, 0o755)
    path = base / secrets.token_hex(3)
    path.mkdir(mode=0o700)
    ids = _qemu_ids()
    if ids is not None:
        os.chown(path, *ids)
    else:
        os.chmod(path, 0o777)
    return path


@contextlib.contextmanager
def vm_lock(root: Path, uuid: str) -> Iterator[None]:
    """One kura backup per VM per node: an flock on ``ROOT/<uuid>.lock``.

    Taken before anything on the domain is touched, so one run never takes
    another's live backup job or new checkpoint for leftovers. The kernel
    drops it when the process dies, however it dies. The holder removes the
    file when it is done (still holding the lock), so no file is left per VM
    ever backed up; a process that locked a file that was removed meanwhile
    sees that its inode is no longer the path's and opens the path again.
    """
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    path = root / f"{uuid}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"another kura backup of VM {uuid} is running on this node",
                              hint="wait for it to finish") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed it after we opened it: again
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def active_job_xml(dom: Any) -> str | None:
    """The XML of the domain's running backup job, or None."""
    try:
        return str(dom.backupGetXMLDesc(0))
    except libvirt.libvirtError:
        return None  # no job (VIR_ERR_NO_DOMAIN_BACKUP), or the domain is not running


def clear_leftovers(dom: Any, root: Path, uuid: str) -> list[str]:
    """Abort a backup job a killed kura left behind; remove its directories."""
    done: list[str] = []
    xml = active_job_xml(dom)
    mine = str(root / uuid)
    if xml is not None:
        if mine in xml:
            try:
                dom.abortJob()
                done.append("aborted a backup job left by an interrupted kura run")
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot abort the leftover backup job: {exc}") from exc
        else:
            raise HypervisorError(
                "another backup job is already running on this VM",
                hint="wait for it to finish, or end it with `virsh domjobabort`",
            )
    base = root / uuid
    if base.is_dir():
        for child in base.iterdir():
            shutil.rmtree(child, ignore_errors=True)
            done.append(f"removed leftover scratch directory {child}")
    return done


class PointInTimeView:
    """One pull-mode backup job on one domain."""

    def __init__(self, dom: Any, disks: list[DiskInfo], bases: dict[str, str | None],
                 new_checkpoint_xml: str | None, directory: Path) -> None:
        self.dom = dom
        self.disks = disks
        self.bases = bases  # target -> checkpoint name to read changes since, or None
        self.checkpoint_xml = new_checkpoint_xml
        self.directory = directory
        self.socket = directory / "nbd.sock"
        self.exports: dict[str, DiskExport] = {}
        self.started = False

    def backup_xml(self, others: list[str]) -> str:
        """The job's XML; ``others`` are the domain's disks that are not backed up."""
        root = ET.Element("domainbackup", mode="pull")
        ET.SubElement(root, "server", transport="unix", socket=str(self.socket))
        disks_el = ET.SubElement(root, "disks")
        for d in self.disks:
            attrs = {"name": d.target, "backup": "yes", "type": "file"}
            base = self.bases.get(d.target)
            if base:
                attrs["backupmode"] = "incremental"
                attrs["incremental"] = base
            else:
                attrs["backupmode"] = "full"
            el = ET.SubElement(disks_el, "disk", attrs)
            ET.SubElement(el, "scratch", file=str(self.directory / f"{d.target}.scratch"))
        for dev in others:  # libvirt would otherwise include every disk
            ET.SubElement(disks_el, "disk", name=dev, backup="no")
        return ET.tostring(root, encoding="unicode")

    def start(self) -> dict[str, DiskExport]:
        """Begin the job; the view exists when this returns."""
        wanted = {d.target for d in self.disks}
        try:
            dom_xml = ET.fromstring(self.dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise _translate(exc, self.dom) from exc
        others = []
        for el in dom_xml.findall("devices/disk"):
            t = el.find("target")
            dev = t.get("dev") if t is not None else None
            if dev and dev not in wanted:
                others.append(dev)
        try:
            self.dom.backupBegin(self.backup_xml(others), self.checkpoint_xml, 0)
        except libvirt.libvirtError as exc:
            raise _translate(exc, self.dom) from exc
        self.started = True
        info = active_job_xml(self.dom)
        if info is None:
            raise HypervisorError("the backup job vanished right after it started")
        for el in ET.fromstring(info).findall("disks/disk"):
            if el.get("backup") != "yes":
                continue
            name = el.get("name", "")
            self.exports[name] = DiskExport(name, el.get("exportname") or name,
                                            el.get("exportbitmap"))
        return self.exports

    def end(self) -> None:
        """End the job (abort is the normal end in pull mode); remove scratch."""
        if self.started:
            self.started = False
            for attempt in range(5):
                if active_job_xml(self.dom) is None:
                    break
                try:
                    self.dom.abortJob()
                    break
                except libvirt.libvirtError as exc:
                    if attempt == 4:
                        raise HypervisorError(f"cannot end the backup job: {exc}") from exc
                    time.sleep(0.2)
            # The job winds down asynchronously; return once it is gone, so that no
            # later check (the guard's) mistakes it for a job still to abort.
            # It takes a few to a few hundred ms (TCG); a check is one cheap RPC.
            deadline = time.monotonic() + 5
            while active_job_xml(self.dom) is not None and time.monotonic() < deadline:
                time.sleep(0.005)
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(OSError):  # the VM's directory, once no job uses it
            self.directory.parent.rmdir()


def _translate(exc: libvirt.libvirtError, dom: Any) -> Exception:
    code = exc.get_error_code()
    msg = str(exc)
    if code == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT or "bitmap" in msg.lower():
        return CheckpointError(f"the checkpoint cannot be used: {msg}")
    if code == libvirt.VIR_ERR_NO_DOMAIN or "not running" in msg.lower():
        try:
            state, reason = dom.state(0)
        except libvirt.libvirtError:
            return MigratedError(f"the VM left this node before the backup began: {msg}")
        if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED:
            return MigratedError(f"the VM migrated to another node before the backup began: {msg}")
    if "state change lock" in msg:
        return HypervisorError(f"the VM is busy with another job (migration?): {msg}",
                               hint="retry once the other job ends")
    return HypervisorError(f"cannot start the backup job: {msg}")
