"""Where a disk lives: node-local or shared storage, mount point, storage pool.

kura must know whether a disk sits on storage every node of a cluster sees
(then the VM can live-migrate and its restore points follow it from node to
node) or on storage only this node sees (then it is backed up here and
nowhere else).

A path is *shared* when

- it lies under a directory listed in the environment variable
  ``KURA_SHARED_STORAGE`` (colon-separated; the administrator's word wins), or
- the file system it lives on is a network or cluster file system, found by
  the longest matching mount point in ``/proc/self/mountinfo``: nfs, nfs4,
  cifs/smb3, gfs2, ocfs2, ceph, glusterfs, lustre, beegfs, gpfs..., including
  FUSE mounts typed as one (``fuse.glusterfs``, ``fuse.ceph``...).

Network disks (``<disk type='network'>``: RBD, iSCSI, NBD, gluster) are shared
by nature. Everything else is node-local.

The storage pool is the libvirt pool whose target directory holds the file,
if any (``volume`` disks name theirs directly).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt

SHARED_FS_TYPES = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "gfs", "gfs2", "ocfs2", "ceph", "cephfs",
    "glusterfs", "lustre", "beegfs", "gpfs", "moosefs", "9p", "virtiofs", "afs",
    "pvfs2", "orangefs", "quobyte", "vxfs",
})

SHARED_ENV = "KURA_SHARED_STORAGE"


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str


@dataclass(frozen=True)
class StorageInfo:
    """Where one disk's data lives."""

    kind: str  # "shared" or "local"
    mount_point: str | None
    fstype: str | None
    pool: str | None
    why: str  # how the kind was decided, for ``kura ls`` and the job log

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "mount_point": self.mount_point, "fstype": self.fstype,
                "pool": self.pool, "why": self.why}


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal \ooo.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mounts(mountinfo: str | None = None) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (or the given text) into mounts."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return []
    mounts = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or len(rest) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), rest[0], _unescape(rest[1])))
    return mounts


def find_mount(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds ``path`` (longest mount-point prefix; later wins on ties)."""
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point.rstrip("/") or "/"
        if (path == mp or path.startswith(mp + "/") or mp == "/") and (
            best is None or len(mp) >= len(best.mount_point.rstrip("/") or "/")
        ):
            best = m
    return best


def shared_dirs(env: str | None = None) -> list[str]:
    raw = os.environ.get(SHARED_ENV, "") if env is None else env
    return [os.path.realpath(p) for p in raw.split(":") if p]


def is_shared_fstype(fstype: str) -> bool:
    if fstype in SHARED_FS_TYPES:
        return True
    if fstype.startswith("fuse."):
        return fstype[5:] in SHARED_FS_TYPES
    return False


def classify(path: str | None, *, network: bool = False, pool: str | None = None,
             mounts: list[Mount] | None = None, shared: list[str] | None = None) -> StorageInfo:
    """Decide whether ``path`` is on shared or node-local storage."""
    if network or path is None:
        return StorageInfo("shared", None, None, pool, "network disk")
    real = os.path.realpath(path)
    mounts = read_mounts() if mounts is None else mounts
    m = find_mount(real, mounts)
    mp = m.mount_point if m else None
    fstype = m.fstype if m else None
    for d in shared_dirs() if shared is None else shared:
        if real == d or real.startswith(d.rstrip("/") + "/"):
            return StorageInfo("shared", mp, fstype, pool, f"under {d} ({SHARED_ENV})")
    if fstype is not None and is_shared_fstype(fstype):
        return StorageInfo("shared", mp, fstype, pool, f"{fstype} file system")
    return StorageInfo("local", mp, fstype, pool, f"{fstype or 'unknown'} file system")


class PoolIndex:
    """Maps paths to the libvirt storage pool whose target directory holds them."""

    def __init__(self, conn: Any) -> None:
        self._targets: list[tuple[str, str]] = []
        try:
            pools = conn.listAllStoragePools(0)
        except libvirt.libvirtError:
            pools = []
        for pool in pools:
            try:
                target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
                name = str(pool.name())
            except libvirt.libvirtError:
                continue
            if target:
                self._targets.append((os.path.realpath(target), name))
        self._targets.sort(key=lambda t: len(t[0]), reverse=True)

    def pool_of(self, path: str | None) -> str | None:
        if not path:
            return None
        real = os.path.realpath(path)
        for target, name in self._targets:
            if real.startswith(target.rstrip("/") + "/"):
                return name
        return None
