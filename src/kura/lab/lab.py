"""The lab cluster: nodes, storage and VMs under one root directory.

``Lab.create(root)`` loads ``<root>/lab.json`` or claims a lab index and
writes a fresh one (see :mod:`kura.lab.state`). ``up()`` then makes reality
match the state, idempotently:

1. check the host (root, packages; apt-get installs what is missing);
2. build or reuse the cached guest image, probe KVM vs TCG;
3. for each node: if its libvirtd answers, keep it; otherwise kill whatever
   is left of it (by token/PID), wipe its volatile ``run`` directory and start
   it again — this is also crash recovery;
4. create the default VMs the first time (``local-1`` on node-a's local
   storage, ``shared-1``, ``shared-2``... on the shared directory alternating
   between nodes, all running the workload), or start the lab's own VMs that
   a crash left shut off.

Storage layout (all under the root)::

    shared/<vm>/vda.qcow2 ...      the cluster-shared volume (both nodes see it)
    nodes/<node>/local/<vm>/...    node-local storage
    <vm dir>/nvram.fd <vm>.console.log   UEFI variables, serial console

VMs move between nodes as in a real cluster (:mod:`kura.lab.moves`). The
backup engine decides whether a disk is on shared storage from the file system
type or from ``KURA_SHARED_STORAGE`` (colon-separated directories): tests and
agents set it to ``Lab.shared_dir``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import libvirt

from kura.errors import LabError
from kura.lab import host, moves
from kura.lab import node as nodes_mod
from kura.lab.accel import probe_accel
from kura.lab.domain import (
    OVMF_VARS,
    DiskFile,
    DiskSpec,
    DomainSpec,
    domain_xml,
    parse_size,
    target_name,
    validate_disks,
)
from kura.lab.guestimage import GuestImage, cache_dir, ensure_guest_image
from kura.lab.node import LabNode
from kura.lab.state import (
    DiskRecord,
    LabState,
    NodeRecord,
    VMRecord,
    allocate_index,
    ensure_claim,
    load_state,
    locked,
    node_address,
    node_name,
    release_index,
    save_state,
)
from kura.lab.verify import Verdict, verify_image
from kura.lab.vm import LabVM, console_path

log = logging.getLogger("kura.lab")
DEFAULT_ROOT = Path("/var/lib/kura/lab")
UEFI_MIN_MEMORY_MIB = 256
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def default_root() -> Path:
    return Path(os.environ.get("KURA_LAB_DIR") or DEFAULT_ROOT)


def _check_traversable(path: Path) -> None:
    """QEMU runs as libvirt-qemu: every parent of the lab must be searchable by others."""
    for parent in path.parents:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            raise LabError(f"{parent} is not searchable by other users, so QEMU (user "
                           "libvirt-qemu) cannot reach lab disks below it",
                           hint="choose a lab directory elsewhere or `chmod o+x` it")


class Lab:
    """A lab cluster rooted at a directory (see the module docstring)."""

    def __init__(self, root: Path, state: LabState) -> None:
        self.root = root
        self._state = state
        self._conns: dict[str, libvirt.virConnect] = {}
        self._image: GuestImage | None = None
        #: Called with one line per step of ``up``/``down`` (the CLI prints them;
        #: by default they go to the ``kura.lab`` logger at INFO).
        self.progress: Callable[[str], None] = log.info

    # -- identity ------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path | None = None, *, index: int | None = None) -> Lab:
        """Load the lab at ``root`` or create its state (claiming a lab index)."""
        root = (root or default_root()).absolute()
        if (root.is_dir() and not (root / "lab.json").exists()
                and any(p.name not in ("lab.lock", "up.lock") for p in root.iterdir())):
            # `down` removes the whole root: never adopt a directory with other files.
            raise LabError(f"{root} is not empty and holds no lab",
                           hint="give the lab a directory of its own (--lab-dir)")
        try:
            root.mkdir(parents=True, exist_ok=True)
            root.chmod(0o755)
        except PermissionError as exc:
            raise LabError(f"cannot create the lab directory {root}: permission denied",
                           hint="the lab must run as root (sudo kura lab up)") from exc
        _check_traversable(root)
        with locked(root / "lab.lock"):
            state = load_state(root)
            if state is None:
                # Index 0 is left to the default lab (`kura lab up`) when it is free.
                first = 0 if root == default_root().absolute() else 1
                state = LabState(index=allocate_index(root, index, start=first))
                save_state(root, state)
            elif index is not None and index != state.index:
                raise LabError(f"the lab at {root} has index {state.index}, not {index}")
        return cls(root, state)

    @classmethod
    def existing(cls, root: Path | None = None) -> Lab | None:
        """The lab at ``root`` if it has a state file, without creating anything."""
        root = (root or default_root()).absolute()
        state = load_state(root)
        return cls(root, state) if state is not None else None

    @classmethod
    def remains(cls, root: Path | None = None) -> Lab | None:
        """The lab at ``root`` for ``down``: also when a crash left nodes but no state file."""
        root = (root or default_root()).absolute()
        lab = cls.existing(root)
        if lab is None and (root / "nodes").is_dir():
            lab = cls(root, LabState(index=-1))  # down() finds the nodes by their token files
        return lab

    @property
    def index(self) -> int:
        return self._state.index

    @property
    def shared_dir(self) -> Path:
        """The cluster-shared volume: set ``KURA_SHARED_STORAGE`` to this."""
        return self.root / "shared"

    @property
    def accel(self) -> str:
        """``kvm`` or ``tcg`` (probed by ``up``)."""
        return self._state.accel or "tcg"

    @property
    def nodes(self) -> list[LabNode]:
        return [LabNode(name=r.name, address=r.address, directory=self.root / "nodes" / r.name,
                        token=r.token, host_uuid=r.host_uuid) for r in self._state.nodes]

    def node(self, name: str) -> LabNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise LabError(f"the lab has no node {name!r}",
                       hint="nodes are " + ", ".join(n.name for n in self.nodes) if self.nodes
                       else "run `kura lab up` first")

    def node_argv(self, node: str) -> list[str]:
        """The prefix that runs a command on ``node`` (see :meth:`LabNode.exec_argv`):
        ``[*lab.node_argv("node-a"), "kura", "backup", ...]``."""
        return self.node(node).exec_argv()

    def node_run(self, node: str, argv: Sequence[str | os.PathLike[str]],
                 **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` on ``node`` (its mount and UTS namespaces) and wait for it.

        What the command sees is what a kura agent on that node sees: the node's
        ``/var/lib/libvirt`` (and the other bind mounts), its hostname, and its
        libvirtd at ``qemu:///system``. Keywords go to :meth:`LabNode.run`
        (``cwd`` on the node) and :func:`subprocess.run`.
        """
        return self.node(node).run(argv, **kwargs)

    def connect(self, node: LabNode | str) -> libvirt.virConnect:
        """A (cached) libvirt connection to a node."""
        n = self.node(node) if isinstance(node, str) else node
        conn = self._conns.get(n.name)
        if conn is not None:
            try:
                if conn.isAlive():
                    return conn
            except libvirt.libvirtError:
                pass
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        conn = n.connect()
        self._conns[n.name] = conn
        return conn

    def _drop_connections(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        self._conns.clear()

    # -- state ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _mutate(self) -> Iterator[LabState]:
        with locked(self.root / "lab.lock"):
            state = load_state(self.root)
            if state is None:
                raise LabError(f"the lab at {self.root} has been removed",
                               hint="run `kura lab up` to build it again")
            yield state
            save_state(self.root, state)
            self._state = state

    def reload(self) -> None:
        state = load_state(self.root)
        if state is not None:
            self._state = state

    def image(self) -> GuestImage:
        if self._image is None:
            self._image = ensure_guest_image(progress=self.progress)
        return self._image

    # -- up / down -------------------------------------------------------------------

    def up(self, nodes: int = 2, vms: int = 3) -> None:
        """Bring the lab to ``nodes`` running nodes and its VMs running (idempotent)."""
        if not 1 <= nodes <= 8:
            raise LabError(f"a lab has 1..8 nodes, not {nodes}")
        if vms < 0:
            raise LabError("the number of VMs cannot be negative")
        with locked(self.root / "up.lock"):  # one up/down of this lab at a time
            self._up(nodes, vms)

    def _up(self, nodes: int, vms: int) -> None:
        self.progress("checking host packages")
        host.require_host()
        self.progress("guest image (kernel + initramfs)")
        image = self.image()
        accel = probe_accel(image, cache_dir())
        # Even for TCG guests: libvirt re-probes QEMU's capabilities on every call
        # (seconds each) when /dev/kvm exists but QEMU's user cannot open it.
        host.kvm_access()
        with self._mutate() as st:
            ensure_claim(self.root, st.index)
            st.accel = accel
            for i in range(len(st.nodes), nodes):
                st.nodes.append(NodeRecord(name=node_name(i), address=node_address(st.index, i),
                                           token=secrets.token_hex(16),
                                           host_uuid=str(uuidlib.uuid4())))
        self.progress(f"accelerator: {accel}")
        self.shared_dir.mkdir(exist_ok=True)
        self.shared_dir.chmod(0o777)
        all_nodes = self.nodes
        for n in all_nodes:
            if n.is_up() and n.pids():
                self.progress(f"{n.name}: up at {n.uri}")
                continue
            killed = nodes_mod.stop(n)
            self._conns.pop(n.name, None)
            nodes_mod.prepare(n, all_nodes)
            nodes_mod.start(n)
            self.progress(f"{n.name}: started at {n.uri}"
                          + (f" (cleaned up {killed} leftover processes)" if killed else ""))
        if not any(v.role == "lab" for v in self._state.vms):
            for i in range(vms):
                if i == 0:
                    name, where, storage = "local-1", all_nodes[0].name, "local"
                else:
                    name, where = f"shared-{i}", all_nodes[i % len(all_nodes)].name
                    storage = "shared"
                self.create_vm(name, node=where, storage=storage, workload=True, start=True,
                               wait=False, role="lab")
                self.progress(f"{name}: defined and started on {where} ({storage} storage)")
        self._recover_vms()
        # Only the lab's own VMs: a test's VM may have a frozen or hung agent on purpose.
        for vm in self.vms():
            if vm.record.role == "lab" and vm.agent and vm.is_active():
                vm.wait_agent(90)
        self.progress("the lab's VMs answer")

    def _recover_vms(self) -> None:
        """Define lab VMs that vanished and start the lab's own VMs left shut off."""
        for rec in list(self._state.vms):
            vm = self._vm(rec)
            where = vm.locate()
            if where is None:
                home = rec.home if rec.home in {n.name for n in self.nodes} else self.nodes[0].name
                self.connect(home).defineXML(self._xml(rec))
                self.progress(f"{rec.name}: redefined on {home}")
                where = vm.locate()
            if rec.role == "lab" and where is not None and not where[1].isActive():
                try:
                    where[1].create()
                except libvirt.libvirtError as exc:
                    raise LabError(f"cannot start lab VM {rec.name} on {where[0].name}: "
                                   f"{exc.get_error_message()}") from exc
                self.progress(f"{rec.name}: started on {where[0].name}")

    def down(self) -> None:
        """Kill every process of the lab (by PID), remove its files and free its index."""
        if not self.root.exists():
            return
        with locked(self.root / "up.lock"):
            self._down()

    def _down(self) -> None:
        self._drop_connections()
        tokens = {n.token for n in self.nodes}
        nodes_dir = self.root / "nodes"
        if nodes_dir.is_dir():  # also nodes a crash kept out of the state file
            for f in nodes_dir.glob(f"*/etc/{host.TOKEN_FILE}"):
                with contextlib.suppress(OSError):
                    tokens.add(f.read_text().strip())
        for token in sorted(tokens):
            killed = host.kill_token(token)
            if killed:
                self.progress(f"killed {killed} processes of node token {token[:8]}")
        leftovers = [pid for t in tokens for pid in host.pids_with_token(t)]
        if leftovers:
            raise LabError(f"lab processes survived: {leftovers}")
        if self.index >= 0:
            release_index(self.root, self.index)
        shutil.rmtree(self.root, ignore_errors=True)
        self.progress(f"removed {self.root}")

    # -- VMs ----------------------------------------------------------------------------

    def _vm(self, rec: VMRecord) -> LabVM:
        return LabVM(rec, self.nodes, self.connect)

    def vm(self, name: str) -> LabVM:
        self.reload()
        rec = self._state.vm(name)
        if rec is None:
            raise LabError(f"the lab has no VM {name!r}",
                           hint="see `kura lab status` for its VMs")
        return self._vm(rec)

    def vms(self) -> list[LabVM]:
        self.reload()
        return [self._vm(r) for r in self._state.vms]

    def _storage_dir(self, storage: str, node: str) -> Path:
        if storage == "shared":
            return self.shared_dir
        if storage == "local":
            return self.node(node).local_dir
        raise LabError(f"storage must be 'shared' or 'local', not {storage!r}")

    def _xml(self, rec: VMRecord) -> str:
        image = self.image()
        return domain_xml(DomainSpec(
            name=rec.name, uuid=rec.uuid, accel="kvm" if self.accel == "kvm" else "qemu",
            kernel=image.kernel, initrd=image.initrd,
            disks=tuple(DiskFile(Path(d.path), d.fmt, d.target) for d in rec.disks),
            memory_mib=rec.memory_mib, agent=rec.agent, workload=rec.workload,
            nvram=Path(rec.nvram) if rec.nvram else None,
            console_log=console_path(rec), storage=rec.storage, tpm=rec.tpm))

    def _check_new_name(self, name: str) -> None:
        if not _NAME.match(name):
            raise LabError(f"bad VM name {name!r}",
                           hint="use letters, digits, '.', '_' and '-' (max 63)")
        if self._state.vm(name) is not None:
            raise LabError(f"the lab already has a VM named {name!r}")

    def create_vm(self, name: str, *, node: str = "node-a", storage: str = "shared",
                  disks: Sequence[DiskSpec] = (DiskSpec(size="256M"),), agent: bool = True,
                  workload: bool = False, uefi: bool = False, memory_mib: int = 128,
                  start: bool = True, wait: bool = True, role: str = "test",
                  tpm: bool = False) -> LabVM:
        """Create disks for a new VM, define it on ``node`` and (by default) start it.

        With ``start`` and ``wait`` (and an agent) this returns once the guest agent
        answers. ``workload`` starts the writer loop at boot (kernel command line).
        UEFI guests get at least 256 MiB (OVMF plus the initramfs do not fit in 128).
        ``tpm`` adds an emulated TPM 2.0: the node's libvirtd creates its state
        (``/var/lib/libvirt/swtpm/<uuid>/`` on the node, see
        :meth:`LabNode.host_path`) when the VM first starts.
        """
        if tpm and shutil.which("swtpm") is None:
            raise LabError("a lab VM with a TPM needs swtpm",
                           hint="apt-get install swtpm swtpm-tools")
        if memory_mib < 96:
            raise LabError("lab guests need at least 96 MiB of memory")
        if uefi:
            memory_mib = max(memory_mib, UEFI_MIN_MEMORY_MIB)
        specs = tuple(disks)
        targets = validate_disks(specs)
        self.reload()
        self._check_new_name(name)
        target_node = self.node(node)
        vm_dir = self._storage_dir(storage, node) / name
        if vm_dir.exists():  # left over from a crash: the VM is not in the state
            shutil.rmtree(vm_dir)
        vm_dir.mkdir(parents=True)
        vm_dir.chmod(0o777)
        records = []
        for spec, target in zip(specs, targets, strict=True):
            path = vm_dir / f"{target}.{spec.fmt}"
            if spec.fmt == "qcow2":
                host.run(["qemu-img", "create", "-q", "-f", "qcow2", path, spec.size])
            else:
                with open(path, "wb") as fh:
                    fh.truncate(parse_size(spec.size))
            path.chmod(0o666)
            records.append(DiskRecord(path=str(path), fmt=spec.fmt, target=target,
                                      size=spec.size))
        nvram = None
        if uefi:
            nvram = vm_dir / "nvram.fd"
            shutil.copyfile(OVMF_VARS, nvram)
            nvram.chmod(0o666)
        rec = VMRecord(name=name, uuid=str(uuidlib.uuid4()), storage=storage, home=node,
                       disks=records, agent=agent, workload=workload, uefi=uefi,
                       memory_mib=memory_mib, nvram=str(nvram) if nvram else None, role=role,
                       directory=str(vm_dir), tpm=tpm)
        return self._define(rec, target_node, start=start, wait=wait)

    def define_vm_from_disks(self, name: str, *, node: str = "node-a",
                             disks: Sequence[Path | tuple[Path, str]], agent: bool = True,
                             workload: bool = False, nvram: Path | None = None,
                             memory_mib: int = 128, start: bool = True,
                             wait: bool = True) -> LabVM:
        """Define (and start) a lab VM on existing disk images, e.g. restored ones.

        ``disks`` are paths (format from the suffix: ``.raw``/``.img`` raw, else qcow2)
        or (path, format) pairs, attached as vda, vdb, ... The images are not the lab's:
        ``remove_vm`` leaves them in place. Storage is ``shared`` if the first disk
        is under ``shared_dir``.
        """
        self.reload()
        self._check_new_name(name)
        target_node = self.node(node)
        records = []
        for i, item in enumerate(disks):
            path, fmt = item if isinstance(item, tuple) else (
                item, "raw" if item.suffix in (".raw", ".img") else "qcow2")
            path = Path(path).absolute()
            if not path.exists():
                raise LabError(f"disk image {path} does not exist")
            if fmt not in ("qcow2", "raw"):
                raise LabError(f"disk format must be qcow2 or raw, not {fmt!r}")
            records.append(DiskRecord(path=str(path), fmt=fmt, target=target_name(i),
                                      size=str(path.stat().st_size)))
        if not records:
            raise LabError("a lab VM needs at least one disk")
        storage = ("shared" if Path(records[0].path).is_relative_to(self.shared_dir)
                   else "local")
        rec = VMRecord(name=name, uuid=str(uuidlib.uuid4()), storage=storage, home=node,
                       disks=records, agent=agent, workload=workload, uefi=nvram is not None,
                       memory_mib=memory_mib, nvram=str(nvram) if nvram else None,
                       role="test", directory=None)
        return self._define(rec, target_node, start=start, wait=wait)

    def _define(self, rec: VMRecord, target_node: LabNode, *, start: bool,
                wait: bool) -> LabVM:
        with self._mutate() as st:
            if st.vm(rec.name) is not None:
                raise LabError(f"the lab already has a VM named {rec.name!r}")
            st.vms.append(rec)
        vm = self._vm(rec)
        try:
            dom = self.connect(target_node).defineXML(self._xml(rec))
            if start:
                dom.create()
        except libvirt.libvirtError as exc:
            raise LabError(f"cannot define/start VM {rec.name} on {target_node.name}: "
                           f"{exc.get_error_message()}",
                           hint=f"see {target_node.directory}/log/qemu/{rec.name}.log") from exc
        if start and wait:
            if rec.agent:
                vm.wait_agent(90)
            else:
                vm.wait_booted(90)
        return vm

    def remove_vm(self, name: str) -> None:
        """Destroy and undefine a VM everywhere; delete its directory if the lab made it."""
        vm = self.vm(name)
        vm.undefine()
        with self._mutate() as st:
            rec = st.vm(name)
            if rec is not None:
                st.vms.remove(rec)
        if vm.record.directory:
            shutil.rmtree(vm.record.directory, ignore_errors=True)

    # -- moving VMs (see kura.lab.moves) -------------------------------------------------

    def _source(self, vm: LabVM, to: str) -> tuple[LabNode, libvirt.virDomain, LabNode]:
        dest = self.node(to)
        where = vm.locate()
        if where is None:
            raise LabError(f"VM {vm.name} is not defined on any lab node")
        if where[0].name == dest.name:
            raise LabError(f"VM {vm.name} is already on {to}")
        return where[0], where[1], dest

    def migrate(self, vm: str, to: str, *, offline: bool = False) -> None:
        """Live-migrate a running VM (shared storage), or quick-migrate it with
        ``offline`` (save on the source, move local disks, restore on ``to``)."""
        lv = self.vm(vm)
        src, dom, dest = self._source(lv, to)
        if not dom.isActive():
            raise LabError(f"VM {vm} is not running", hint="use cold_move for shut-off VMs")
        if offline:
            moved = moves.quick_migrate(lv, self.connect(src), dom, dest, self.connect(dest))
        else:
            moves.live_migrate(lv, src, dom, dest)
            moved = None
        self._moved(vm, moved, dest)

    def cold_move(self, vm: str, to: str) -> None:
        """Move a shut-off VM's definition (and local disks) to node ``to``."""
        lv = self.vm(vm)
        _src, dom, dest = self._source(lv, to)
        self._moved(vm, moves.cold_move(lv, dom, dest, self.connect(dest)), dest)

    def _moved(self, name: str, moved: moves.Moved | None, dest: LabNode) -> None:
        """Record a VM's new home node and, if its directory moved, its new paths."""
        with self._mutate() as st:
            rec = st.vm(name)
            if rec is None:
                return
            rec.home = dest.name
            if moved is None:
                return
            for d in rec.disks:
                d.path = moved.rewrite(d.path)
            if rec.nvram:
                rec.nvram = moved.rewrite(rec.nvram)
            rec.directory = str(moved.new)

    # -- reporting and checking ---------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Nodes and VMs as plain data (what ``kura lab status --json`` prints)."""
        self.reload()
        nodes = []
        for n in self.nodes:
            nodes.append({"name": n.name, "address": n.address, "uri": n.uri,
                          "local_dir": str(n.local_dir), "up": n.is_up()})
        vms = []
        for v in self.vms():
            where = v.locate()
            vms.append({"name": v.name, "uuid": v.uuid, "node": where[0].name if where else None,
                        "storage": v.storage, "state": v.state(),
                        "disks": [str(p) for p in v.disk_paths], "agent": v.agent})
        return {"root": str(self.root), "index": self.index, "accel": self.accel,
                "shared_dir": str(self.shared_dir), "nodes": nodes, "vms": vms}

    def verify_disk(self, image: Path, *, fmt: str = "qcow2", boot: bool = False) -> Verdict:
        """Check a disk that carried the workload: e2fsck + every committed file.

        By default on the host (a raw scratch copy, e2fsck and debugfs; no guest).
        With ``boot`` the copy is attached to a transient verifier guest on the
        first node, which runs the same check with its own tools
        (``/usr/lib/kura/check``) and prints the verdict as JSON.
        """
        scratch = self.root / "tmp"
        scratch.mkdir(exist_ok=True)
        scratch.chmod(0o777)
        if not boot:
            return verify_image(Path(image), fmt=fmt, scratch_dir=scratch)
        return self._verify_in_guest(Path(image), fmt, scratch)

    def _verify_in_guest(self, image: Path, fmt: str, scratch: Path) -> Verdict:
        if not image.exists():
            raise LabError(f"disk image {image} does not exist")
        if not self.nodes:
            raise LabError("the lab has no nodes", hint="run `kura lab up` first")
        work = Path(tempfile.mkdtemp(prefix="verify-", dir=scratch))
        work.chmod(0o777)
        node = self.nodes[0]
        dom: libvirt.virDomain | None = None
        out = ""
        try:
            copy = work / "disk.raw"
            host.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, copy],
                     timeout=600)
            copy.chmod(0o666)
            image_ = self.image()
            rec = VMRecord(name=f"kura-verify-{secrets.token_hex(3)}", uuid=str(uuidlib.uuid4()),
                           storage="local", home=node.name,
                           disks=[DiskRecord(str(copy), "raw", "vda", "0")], directory=str(work))
            xml = domain_xml(DomainSpec(
                name=rec.name, uuid=rec.uuid, accel="kvm" if self.accel == "kvm" else "qemu",
                kernel=image_.kernel, initrd=image_.initrd,
                disks=(DiskFile(copy, "raw", "vda"),), data=False,
                console_log=console_path(rec), storage="local"))
            try:
                dom = self.connect(node).createXML(xml, 0)  # transient: gone when destroyed
            except libvirt.libvirtError as exc:
                raise LabError(f"cannot start a verifier guest on {node.name}: "
                               f"{exc.get_error_message()}") from exc
            verifier = LabVM(rec, [node], self.connect)
            verifier.wait_agent(120)
            _code, out, _err = verifier.agent_exec(["/usr/lib/kura/check", "/dev/vda"],
                                                   timeout=900)
            data = json.loads(out.strip().splitlines()[-1])
            return Verdict(ok=bool(data["ok"]), fsck_clean=bool(data["fsck_clean"]),
                           last_seq=int(data["last_seq"]),
                           files_checked=int(data["files_checked"]),
                           errors=[str(e) for e in data["errors"]])
        except (ValueError, KeyError, IndexError) as exc:
            raise LabError(f"the verifier guest printed no verdict: {out[-300:]!r}") from exc
        finally:
            if dom is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
            shutil.rmtree(work, ignore_errors=True)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.1)
