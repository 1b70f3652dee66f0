"""Lab VMs: a handle on one VM of the lab, wherever it currently runs.

A :class:`LabVM` knows the VM's name, UUID, storage kind and disks (from the
lab state); its node is looked up live (the node whose libvirtd has the
domain, preferring one where it is active), so the handle stays valid across
migrations. Commands run inside the guest through the guest agent
(``guest-exec`` + ``guest-exec-status`` via ``virDomainQemuAgentCommand``);
the workload and :meth:`LabVM.write_pattern` use that.
"""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from kura.errors import LabError
from kura.lab.node import LabNode
from kura.lab.state import VMRecord

AGENT_TIMEOUT = 10
READY_MARKER = b"KURA-GUEST-READY"


def console_path(rec: VMRecord) -> Path:
    """Where the VM's serial console is logged (appended across boots and moves)."""
    base = Path(rec.directory) if rec.directory else Path(rec.disks[0].path).parent
    return base / f"{rec.name}.console.log"


class LabVM:
    """One VM of the lab (see the module docstring)."""

    def __init__(self, record: VMRecord, nodes: list[LabNode],
                 connect: Callable[[LabNode], libvirt.virConnect]) -> None:
        self._record = record
        self._nodes = nodes
        self._connect = connect

    def __repr__(self) -> str:
        return f"LabVM({self.name!r}, storage={self.storage!r})"

    @property
    def record(self) -> VMRecord:
        """What the lab state knows about the VM (disks, storage, options)."""
        return self._record

    @property
    def name(self) -> str:
        return self._record.name

    @property
    def uuid(self) -> str:
        return self._record.uuid

    @property
    def storage(self) -> str:
        return self._record.storage

    @property
    def agent(self) -> bool:
        return self._record.agent

    @property
    def disk_paths(self) -> list[Path]:
        """The VM's disk images, in target order (vda first)."""
        return [Path(d.path) for d in sorted(self._record.disks, key=lambda d: d.target)]

    @property
    def disk_formats(self) -> list[str]:
        return [d.fmt for d in sorted(self._record.disks, key=lambda d: d.target)]

    @property
    def nvram(self) -> Path | None:
        return Path(self._record.nvram) if self._record.nvram else None

    @property
    def console_log(self) -> Path:
        return console_path(self._record)

    def boots_logged(self) -> int:
        """How many times the guest has finished booting (ready markers on its console)."""
        try:
            return self.console_log.read_bytes().count(READY_MARKER)
        except FileNotFoundError:
            return 0

    def wait_booted(self, timeout: float = 60, *, boots: int = 1) -> None:
        """Wait until the console shows ``boots`` finished boots (works without an agent)."""
        deadline = time.monotonic() + timeout
        while self.boots_logged() < boots:
            if time.monotonic() > deadline:
                raise LabError(f"VM {self.name} did not finish booting within {timeout:.0f} s",
                               hint=f"see {self.console_log}")
            time.sleep(0.2)

    # -- where is it ---------------------------------------------------------------

    def locate(self) -> tuple[LabNode, libvirt.virDomain] | None:
        """(node, domain) of the VM: the node where it is active, else where it is defined."""
        found: tuple[LabNode, libvirt.virDomain] | None = None
        for node in self._nodes:
            try:
                dom = self._connect(node).lookupByUUIDString(self.uuid)
            except (libvirt.libvirtError, LabError):
                continue
            try:
                if dom.isActive():
                    return node, dom
            except libvirt.libvirtError:
                continue
            found = found or (node, dom)
        return found

    @property
    def node(self) -> str:
        """The name of the node the VM is on now."""
        where = self.locate()
        if where is None:
            raise LabError(f"VM {self.name} is not defined on any lab node",
                           hint="run `kura lab up` to recover the lab")
        return where[0].name

    def domain(self) -> libvirt.virDomain:
        """The libvirt domain on the VM's current node."""
        where = self.locate()
        if where is None:
            raise LabError(f"VM {self.name} is not defined on any lab node",
                           hint="run `kura lab up` to recover the lab")
        return where[1]

    def state(self) -> str:
        """running, paused, shutoff, ... or undefined."""
        where = self.locate()
        if where is None:
            return "undefined"
        code = where[1].state()[0]
        return {
            libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_PAUSED: "paused",
            libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
            libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
            libvirt.VIR_DOMAIN_CRASHED: "crashed",
            libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
        }.get(code, "unknown")

    def is_active(self) -> bool:
        where = self.locate()
        return bool(where and where[1].isActive())

    # -- guest agent ----------------------------------------------------------------

    def agent_command(self, command: str, arguments: dict[str, Any] | None = None, *,
                      timeout: int = AGENT_TIMEOUT) -> Any:
        """Send one guest agent command; return its ``return`` value."""
        if not self._record.agent:
            raise LabError(f"VM {self.name} has no guest agent")
        msg: dict[str, Any] = {"execute": command}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.domain(), json.dumps(msg), timeout, 0)
        except libvirt.libvirtError as exc:
            raise LabError(f"guest agent of {self.name}: {command} failed: "
                           f"{exc.get_error_message()}") from exc
        return json.loads(reply).get("return")

    def wait_agent(self, timeout: float = 60) -> None:
        """Wait until the guest agent answers guest-ping."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                dom = self.domain()
                libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 2, 0)
                return
            except (libvirt.libvirtError, LabError) as exc:
                last = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) \
                    else str(exc)
            if time.monotonic() > deadline:
                raise LabError(f"guest agent of {self.name} did not answer within "
                               f"{timeout:.0f} s: {last}",
                               hint=f"see {self.console_log}")
            time.sleep(0.25)

    def agent_exec(self, argv: list[str], timeout: float = 30) -> tuple[int, str, str]:
        """Run ``argv`` in the guest; return (exit code, stdout, stderr)."""
        if not argv:
            raise LabError("agent_exec needs a command")
        started = self.agent_command("guest-exec", {
            "path": argv[0], "arg": argv[1:], "capture-output": True})
        pid = started["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = self.agent_command("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                code = st.get("exitcode", -(st.get("signal") or 1))
                return int(code), out, err
            if time.monotonic() > deadline:
                raise LabError(f"command {argv!r} in {self.name} did not finish within "
                               f"{timeout:.0f} s")
            time.sleep(0.05)

    def sh(self, script: str, timeout: float = 30) -> str:
        """Run a shell snippet in the guest; return stdout; raise on a non-zero exit."""
        code, out, err = self.agent_exec(["/bin/sh", "-c", script], timeout=timeout)
        if code != 0:
            raise LabError(f"in {self.name}: `{script}` exited {code}: {err.strip()[-300:]}")
        return out

    # -- workload and data ------------------------------------------------------------

    def start_workload(self) -> None:
        """Start the file-writing workload (idempotent)."""
        self.sh("/usr/lib/kura/workload start")

    def stop_workload(self) -> int:
        """Stop the workload; return the last committed sequence number."""
        out = self.sh("/usr/lib/kura/workload stop", timeout=60)
        try:
            return int(out.strip().splitlines()[-1])
        except (ValueError, IndexError) as exc:
            raise LabError(f"workload in {self.name} reported {out!r}") from exc

    def workload_status(self) -> tuple[bool, int]:
        """(running, last committed seq)."""
        out = self.sh("/usr/lib/kura/workload status").strip()
        state, _, seq = out.partition(" last_seq=")
        return state == "running", int(seq or 0)

    def write_pattern(self, offset: int, length: int, byte: int, *,
                      disk: str | None = None) -> None:
        """Write ``length`` bytes of value ``byte`` at ``offset``, then flush to the disk.

        ``disk`` is a target (``vdb``...). Without it, the last disk of the VM is used
        when it has more than one. The first disk (``vda``) carries the ext4 file system,
        so there the bytes go to offset ``offset`` of the file ``/data/pattern.bin``
        (the changed blocks of the image are then wherever ext4 put them); on any
        other disk they are written raw at exactly ``offset``.
        """
        if not 0 <= byte <= 255 or offset < 0 or length <= 0:
            raise LabError("write_pattern needs offset >= 0, length > 0, 0 <= byte <= 255")
        targets = sorted(d.target for d in self._record.disks)
        target = disk or targets[-1]
        if target not in targets:
            raise LabError(f"VM {self.name} has no disk {target} (has {', '.join(targets)})")
        dest = "/data/pattern.bin" if target == "vda" else f"/dev/{target}"
        script = (f"head -c {length} /dev/zero | tr '\\000' '\\{byte:03o}' | "
                  f"dd of={dest} bs=65536 seek={offset} oflag=seek_bytes conv=notrunc,fsync "
                  f"2>/dev/null && sync")
        self.sh(script, timeout=120)

    # -- life cycle -----------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 60) -> None:
        where = self.locate()
        if where is None:
            raise LabError(f"VM {self.name} is not defined on any lab node")
        if not where[1].isActive():
            try:
                where[1].create()
            except libvirt.libvirtError as exc:
                raise LabError(f"cannot start VM {self.name} on {where[0].name}: "
                               f"{exc.get_error_message()}") from exc
        if wait and self._record.agent:
            self.wait_agent(timeout)

    def shutdown(self, timeout: float = 60, *, force: bool = True) -> None:
        """Shut the guest down cleanly and wait until it is off.

        Through the guest agent when the VM has one, else with the ACPI power button
        (the guest's acpid powers off). Either way the guest stops its workload and
        unmounts /data first. If it is not off after ``timeout`` seconds it is
        destroyed (``force``) or LabError is raised.
        """
        dom = self.domain()
        if not dom.isActive():
            return
        flags = (libvirt.VIR_DOMAIN_SHUTDOWN_GUEST_AGENT if self._record.agent
                 else libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
        deadline = time.monotonic() + timeout
        next_press = 0.0
        while time.monotonic() < deadline:
            try:
                if not dom.isActive():
                    return
                if time.monotonic() >= next_press:
                    # Repeat: a press while the guest is still booting is lost.
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.shutdownFlags(flags)
                    next_press = time.monotonic() + 5
            except libvirt.libvirtError:
                return
            time.sleep(0.1)
        if not force:
            raise LabError(f"VM {self.name} did not shut down within {timeout:.0f} s")
        self.destroy()

    def destroy(self) -> None:
        where = self.locate()
        if where and where[1].isActive():
            try:
                where[1].destroy()
            except libvirt.libvirtError as exc:
                if where[1].isActive():
                    raise LabError(f"cannot destroy VM {self.name}: "
                                   f"{exc.get_error_message()}") from exc

    def undefine(self) -> None:
        """Remove the domain definition from every node (disks and NVRAM are kept; an
        emulated TPM's state, which lives in the node's libvirt directory, is removed)."""
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM
                 | libvirt.VIR_DOMAIN_UNDEFINE_TPM)
        for node in self._nodes:
            try:
                dom = self._connect(node).lookupByUUIDString(self.uuid)
            except (libvirt.libvirtError, LabError):
                continue
            try:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    dom.undefineFlags(flags)
            except libvirt.libvirtError as exc:
                raise LabError(f"cannot undefine VM {self.name} on {node.name}: "
                               f"{exc.get_error_message()}") from exc
