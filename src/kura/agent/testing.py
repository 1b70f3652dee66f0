"""Test helpers: a scripted cluster and a runner that pretends to back up.

:class:`FakeCluster` holds VMs and which node runs each; :class:`FakeRunner`
is one node's view of it and goes through the node engine's six phases with
short sleeps, raising :class:`~kura.errors.MigratedError` when the VM moved
away mid-backup and stopping when the server cancels. Tests drive it with
``cluster.migrate(...)``, per-VM failures, and a ``hold`` event that parks a
backup in its data phase. It lets the server, the agent loop and the job engine
be tested without libvirt; the lab tests use the real runner.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kura.agent.loop import Agent, AgentSettings
from kura.agent.runner import PHASES, TaskContext
from kura.errors import DomainNotFound, GuestAgentError, Interrupted, KuraError, MigratedError
from kura.server import schemas


@dataclass
class FakeVm:
    name: str
    node: str
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))
    state: str = "running"
    storage: Literal["local", "shared"] = "shared"
    tags: list[str] = field(default_factory=list)
    guest_agent: bool = True
    fail: KuraError | None = None
    hold: threading.Event | None = None     # parks the data phase until set
    backups: list[str] = field(default_factory=list)  # nodes of successful backups


class FakeCluster:
    def __init__(self) -> None:
        self.vms: dict[str, FakeVm] = {}
        self.lock = threading.Lock()
        self.on_phase: Callable[[str, FakeVm, str], None] | None = None
        self.phase_seconds = 0.02

    def add(self, name: str, node: str, **kw: object) -> FakeVm:
        vm = FakeVm(name=name, node=node, **kw)  # type: ignore[arg-type]
        self.vms[vm.uuid] = vm
        return vm

    def vm(self, name: str) -> FakeVm:
        return next(v for v in self.vms.values() if v.name == name)

    def migrate(self, name: str, to: str) -> None:
        with self.lock:
            self.vm(name).node = to


class FakeRunner:
    def __init__(self, cluster: FakeCluster, node: str) -> None:
        self.cluster = cluster
        self.node = node

    def inventory(self) -> schemas.InventoryReport:
        with self.cluster.lock:
            mine = [v for v in self.cluster.vms.values() if v.node == self.node]
        return schemas.InventoryReport(
            uri=f"fake:///{self.node}",
            facts={"config_store": {"kind": "libvirt", "path": "/etc/libvirt/qemu",
                                    "domains": len(mine)}},
            vms=[schemas.VmReport(
                uuid=v.uuid, name=v.name, state=v.state, tags=v.tags,
                facts={"guest_agent": v.guest_agent},
                disks=[schemas.DiskReport(target="vda", path=f"/{v.storage}/{v.name}.qcow2",
                                          format="qcow2", size=256 << 20, storage=v.storage,
                                          storage_path=f"/{v.storage}")])
                for v in mine])

    def running_vms(self) -> frozenset[str]:
        with self.cluster.lock:
            return frozenset(v.uuid for v in self.cluster.vms.values()
                             if v.node == self.node and v.state == "running")

    def _vm(self, ctx: TaskContext) -> FakeVm:
        vm = self.cluster.vms.get(ctx.payload["vm_uuid"])
        if vm is None or vm.node != self.node:
            raise DomainNotFound(f"no VM {ctx.payload['vm_name']} on {self.node}")
        return vm

    def _check(self, ctx: TaskContext, vm: FakeVm) -> None:
        if ctx.cancel.is_set():
            raise Interrupted(f"backup stopped: {ctx.cancel_reason}")
        if vm.node != self.node:
            err = MigratedError(f"{vm.name} migrated to {vm.node} during the backup")
            err.moved_to = vm.node  # type: ignore[attr-defined]
            raise err

    def backup(self, ctx: TaskContext) -> schemas.TaskResult:
        vm = self._vm(ctx)
        warnings: list[str] = []
        consistency = "application"
        for phase in PHASES:
            with ctx.phase(phase):
                if self.cluster.on_phase is not None:
                    self.cluster.on_phase(self.node, vm, phase)
                time.sleep(self.cluster.phase_seconds)
                if phase == "quiesce" and ctx.payload.get("consistency") != "off":
                    if not vm.guest_agent:
                        if ctx.payload.get("consistency") == "require":
                            raise GuestAgentError("guest agent did not answer within 10 s")
                        warnings.append("guest agent did not answer within 10 s")
                        consistency = "crash"
                elif phase == "quiesce":
                    consistency = "crash"
                if phase == "data":
                    if vm.fail is not None:
                        raise vm.fail
                    while vm.hold is not None and not vm.hold.wait(0.05):
                        self._check(ctx, vm)
                self._check(ctx, vm)
        kind = "incremental" if vm.backups else "full"
        vm.backups.append(self.node)
        return schemas.TaskResult(ok=True, snapshot=uuidlib.uuid4().hex[:12], kind=kind,
                                  consistency=consistency, bytes_read=4 << 20,
                                  bytes_stored=1 << 20, warnings=warnings)

    def preflight(self, ctx: TaskContext) -> schemas.TaskResult:
        vm = self._vm(ctx)
        checks: list[dict[str, Any]] = [
                  {"check": "found", "ok": True, "detail": f"{vm.name} runs on {self.node}"},
                  {"check": "guest agent", "ok": vm.guest_agent or None,
                   "warn": not vm.guest_agent,
                   "detail": "answers" if vm.guest_agent else
                   "did not answer; the backup would be crash-consistent"},
                  {"check": "checkpoints", "ok": True,
                   "detail": "healthy" if vm.backups else
                   "no checkpoint yet: the next backup will be full"}]
        return schemas.TaskResult(ok=True, checks=checks)

    def restore(self, ctx: TaskContext) -> schemas.TaskResult:
        for phase in ("accepted", "data", "finish"):
            with ctx.phase(phase):
                time.sleep(self.cluster.phase_seconds)
        return schemas.TaskResult(ok=True, kind="restore",
                                  data={"node": self.node, "snapshot": ctx.payload["snapshot"]})


FAST = AgentSettings(heartbeat_interval=0.3, inventory_interval=0.5, poll_wait=2.0,
                     backoff_max=1.0, orphan_after=3.0, flush_interval=0.2)


class AgentThread:
    """An :class:`Agent` running in a thread, as a test's stand-in for ``kura agent``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="kura-test-agent", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.agent.run()
        except BaseException as exc:
            self.error = exc

    def kill(self) -> None:
        """Stop polling and reporting at once, as if the process died."""
        self.agent.kill()
        self.thread.join(timeout=10)


def wait_for(cond: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")
