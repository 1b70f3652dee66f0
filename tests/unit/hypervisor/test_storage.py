"""Shared vs node-local storage from mountinfo and KURA_SHARED_STORAGE."""

from __future__ import annotations

from kura.hypervisor.storage import classify, find_mount, is_shared_fstype, read_mounts

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:40 / /mnt/nfs rw,relatime - nfs4 srv:/export rw,vers=4.2
31 22 0:41 / /mnt/gl rw - fuse.glusterfs gl:/vol rw
32 22 0:42 / /mnt/with\\040space rw - gfs2 /dev/sdb rw
"""


def test_parse_and_longest_prefix() -> None:
    mounts = read_mounts(MOUNTINFO)
    assert [m.mount_point for m in mounts] == ["/", "/mnt/nfs", "/mnt/gl", "/mnt/with space"]
    m = find_mount("/mnt/nfs/vm/disk.qcow2", mounts)
    assert m is not None and m.fstype == "nfs4"
    m = find_mount("/mnt/nfsx/disk", mounts)
    assert m is not None and m.mount_point == "/"


def test_classify_by_fstype_and_env() -> None:
    mounts = read_mounts(MOUNTINFO)
    assert classify("/mnt/nfs/a.qcow2", mounts=mounts, shared=[]).kind == "shared"
    assert classify("/mnt/gl/a.qcow2", mounts=mounts, shared=[]).kind == "shared"
    assert classify("/mnt/with space/a", mounts=mounts, shared=[]).kind == "shared"
    local = classify("/var/lib/libvirt/images/a.qcow2", mounts=mounts, shared=[])
    assert local.kind == "local" and local.mount_point == "/" and local.fstype == "ext4"
    forced = classify("/srv/cluster/a.qcow2", mounts=mounts, shared=["/srv/cluster"])
    assert forced.kind == "shared" and "KURA_SHARED_STORAGE" in forced.why
    assert classify(None, network=True).kind == "shared"


def test_fstypes() -> None:
    assert is_shared_fstype("ceph") and is_shared_fstype("fuse.ceph")
    assert not is_shared_fstype("ext4") and not is_shared_fstype("fuse.sshfs")
