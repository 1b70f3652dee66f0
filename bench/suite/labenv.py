"""The bench's own lab cluster, its VMs, and the physical read limit.

The suite builds a private two-node lab (:class:`kura.lab.Lab` under
``<workdir>/lab`` with its own lab index, so nothing collides with other
labs on the machine). A bench VM has two virtio qcow2 disks on the shared
directory: a tiny ``vda`` that the guest formats and mounts on first boot,
and ``vdb``, the bench data, copied from the cache *before* the VM starts
(the guest's start-up script only ever formats ``vda``, and only when it is
blank, so ``vdb`` is never touched by the guest). The VMs run the lab guest
(kernel + initramfs, qemu-guest-agent, no workload) under whatever
accelerator the lab probed.

**The physical limit** of a running VM's backup is reading its allocated
data from the same point-in-time NBD export that kura reads: the suite starts
the same libvirt pull-mode backup job (kura's
:class:`~kura.hypervisor.view.PointInTimeView`, full, no checkpoint) and
times ``nbdcopy nbd+unix:///<export>?socket=... null:`` over every disk in
one child process. nbdcopy (libnbd) reads only the extents that
``base:allocation`` reports as data, with several requests in flight on
several connections, and throws the bytes away: no hashing, no storing.
:meth:`BenchLab.read_loop` times kura's own reader on the same export the
same way (see there), to tell reading from processing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from kura.hypervisor.domain import describe
from kura.hypervisor.view import PointInTimeView, job_dir
from kura.lab import DiskSpec, Lab, LabVM
from kura.nbd import NbdSource
from suite.data import fresh_copy
from suite.measure import Run, drop_caches, run


class BenchLab:
    """A two-node lab for the suite (created, brought up, and torn down by it)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.lab = Lab.create(workdir / "lab")
        self.scratch = workdir / "scratch"  # kura's views (job_dir chowns below it)
        self.peer_scratch = workdir / "peer-scratch"  # virtnbdbackup's sockets and scratch

    def up(self) -> None:
        self.lab.up(nodes=2, vms=0)
        self.scratch.mkdir(exist_ok=True)
        self.scratch.chmod(0o755)
        self.peer_scratch.mkdir(exist_ok=True)
        self.peer_scratch.chmod(0o1777)  # QEMU (libvirt-qemu) binds the NBD socket here

    def down(self) -> None:
        self.lab.down()

    def uri(self, node: str) -> str:
        """The node's libvirt URI over its unix socket, for kura and the peers alike.

        (virtnbdbackup treats every ``qemu+...://`` URI as remote and then wants a
        user, a password, ssh and NBD over TCP; ``qemu:///system?socket=`` is local.)
        """
        sock = self.lab.node(node).directory / "run" / "libvirt-sock"
        return f"qemu:///system?socket={sock}"

    def node_of(self, vm: LabVM) -> str:
        return vm.node

    def create(self, name: str, data: Path | None, *, node: str = "node-a",
               start: bool = True, wait: bool = True) -> LabVM:
        """A bench VM whose ``vdb`` is a fresh copy of ``data`` (qcow2)."""
        with contextlib.suppress(Exception):
            self.lab.remove_vm(name)  # left over from an interrupted run
        disks = (DiskSpec(size="32M"),) + ((DiskSpec(size="1G"),) if data else ())
        vm = self.lab.create_vm(name, node=node, storage="shared", disks=disks,
                                agent=True, workload=False, start=False)
        if data is not None:
            fresh_copy(data, vm.disk_paths[1])
        if start:
            vm.start(wait=wait, timeout=120)
        return vm

    def remove(self, name: str) -> None:
        self.lab.remove_vm(name)

    @contextlib.contextmanager
    def view(self, vm: LabVM) -> Iterator[list[str]]:
        """A full pull-mode view of every disk of ``vm``: yields NBD URIs."""
        dom = vm.domain()
        info = describe(dom)
        directory = job_dir(self.scratch, info.uuid)
        v = PointInTimeView(dom, list(info.disks), {}, None, directory)
        try:
            exports = v.start()
            yield [f"nbd+unix:///{e.export}?socket={v.socket}" for e in exports.values()]
        finally:
            v.end()

    def read_loop(self, vm: LabVM, chunk_size: int = 4 << 20, inflight: int = 8) -> float:
        """Seconds to read every disk's allocated chunks with kura's own NBD reader.

        The same libnbd loop kura's data phase runs (:class:`kura.nbd.NbdSource`,
        ``inflight`` requests on one connection, whole 4 MiB chunks), in this
        process, with nothing done to the bytes: how far kura's reading alone is
        from nbdcopy, separately from hashing, compressing and storing.
        """
        with self.view(vm) as uris:
            drop_caches()
            t0 = time.monotonic()
            for uri in uris:
                export, _, sock = uri.removeprefix("nbd+unix:///").partition("?socket=")
                with NbdSource.connect_unix(Path(sock), export) as src:
                    for _index, _data in src.read_chunks(src.data_chunks(chunk_size),
                                                         chunk_size, inflight=inflight):
                        pass
            return time.monotonic() - t0

    def read_limit(self, vm: LabVM) -> Run:
        """Time ``nbdcopy`` of every disk's allocated data to ``null:`` (one child)."""
        with self.view(vm) as uris:
            script = " && ".join(f"nbdcopy '{u}' null:" for u in uris)
            return run(["sh", "-c", script])
