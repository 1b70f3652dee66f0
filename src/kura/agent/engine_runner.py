"""The real runner: server tasks carried out by the node engine on this node.

Every call from the agent into ``kura.engine`` and ``kura.hypervisor`` is in
this module, so adapting to the engine's API touches one file.

* **inventory** — :func:`kura.engine.inventory.describe_node`, mapped onto the
  server's report; VM tags come from the domain metadata element in the
  ``urn:kura:1`` namespace (``<kura><tag>prod</tag></kura>``).
* **backup** — :func:`kura.engine.backup.backup_vm` on a repository opened
  through a server session (:mod:`kura.agent.remote`). The engine's job log is
  forwarded as task events; a listener raises ``Interrupted`` when the server
  cancels the task, which sends the engine down its clean-up path (guest
  thawed, backup job ended, new checkpoint deleted, writer aborted: no restore
  point). When the VM left this node, the error becomes ``MigratedError``
  naming the node it went to if this node's libvirt knows. A migration (or
  save, snapshot, dump) that waits for the backup's libvirt job is noticed by
  :mod:`kura.hypervisor.jobwatch`; the backup then gives way at once (ended
  cleanly), and, once the VM has left, reports ``MigratedError`` so that the
  server retries it on the new node.
* **preflight** — finds the VM, pings its guest agent, asks the chain planner
  whether the next backup is incremental (and why not), all read-only.
* **restore** — :func:`kura.engine.restore.restore_vm` from a read-only
  session.
"""

from __future__ import annotations

import contextlib
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu

from kura.agent.remote import RemoteSession, open_session
from kura.agent.runner import TaskContext
from kura.engine import chain
from kura.engine.backup import BackupOptions, backup_vm
from kura.engine.events import Event
from kura.engine.inventory import describe_node
from kura.engine.restore import RestoreOptions, restore_disk_file, restore_vm
from kura.errors import (
    DomainNotFound,
    HypervisorError,
    Interrupted,
    KuraError,
    MigratedError,
    UsageError,
)
from kura.hypervisor.connection import Hypervisor, open_connection
from kura.hypervisor.domain import describe, disk_sizes
from kura.hypervisor.jobwatch import JobRequest, JobWatch
from kura.hypervisor.view import DEFAULT_SCRATCH_ROOT
from kura.repository import Manifest
from kura.server import schemas
from kura.server.client import ServerClient

log = logging.getLogger(__name__)

TAG_NS = "urn:kura:1"


def domain_tags(dom: Any) -> list[str]:
    try:
        xml = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, TAG_NS, 0)
    except libvirt.libvirtError:
        return []
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return []
    return [t.text.strip() for t in root.iter() if t.tag.endswith("tag") and t.text][:64]


class EngineRunner:
    def __init__(self, uri: str, client: ServerClient, *,
                 scratch_root: Path | None = None, admin_uri: str | None = None,
                 migration_wait: float = 60.0) -> None:
        self.uri = uri
        self.client = client
        self.scratch_root = scratch_root
        self.jobwatch = JobWatch(admin_uri, scratch_root or DEFAULT_SCRATCH_ROOT)
        self.migration_wait = migration_wait

    @contextmanager
    def _hv(self) -> Iterator[Hypervisor]:
        hv = open_connection(self.uri)
        try:
            yield hv
        finally:
            hv.close()

    # ---- inventory -----------------------------------------------------

    def inventory(self) -> schemas.InventoryReport:
        with self._hv() as hv:
            tree = describe_node(hv)
            tags = {}
            for dom in hv.domains():
                try:
                    tags[str(dom.UUIDString())] = domain_tags(dom)
                except libvirt.libvirtError:
                    continue
        d = tree.to_dict()
        vms = []
        for v in tree.vms:
            i = v.info
            vms.append(schemas.VmReport(
                uuid=i.uuid, name=i.name, state=i.state, persistent=i.persistent,
                tags=tags.get(i.uuid, []),
                facts={"firmware": i.firmware, "checkpoints": v.checkpoints,
                       "nvram": i.nvram, "tpm": i.tpm_dir},
                disks=[schemas.DiskReport(
                    target=dn.disk.target, path=dn.disk.path or dn.disk.network or "",
                    format=dn.disk.format, size=dn.virtual_size or 0,
                    storage="shared" if dn.disk.storage.kind == "shared" else "local",
                    storage_path=dn.disk.storage.mount_point or dn.disk.storage.pool or "")
                    for dn in v.disks]))
        return schemas.InventoryReport(
            uri=self.uri, vms=vms,
            facts={"hostname": tree.node.hostname, "host_uuid": tree.node.host_uuid,
                   "hypervisor": tree.hypervisor, "libvirt": tree.libvirt_version,
                   "config_store": {**d["config_store"], "domains": len(tree.vms)},
                   "errors": tree.errors})

    def running_vms(self) -> frozenset[str]:
        with self._hv() as hv:
            try:
                doms = hv.conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot list the running VMs: {exc}") from exc
            return frozenset(str(d.UUIDString()) for d in doms)

    # ---- backup --------------------------------------------------------

    def _listener(self, ctx: TaskContext) -> Any:
        raised = [False]

        def listen(ev: Event) -> None:
            if ev.kind == "phase-start":
                ctx.phase_event(ev.phase or "", "start", message=ev.message)
            elif ev.kind == "phase-end":
                ok = bool(ev.data.get("ok"))
                ctx.phase_event(ev.phase or "", "end" if ok else "failed", ev.seconds)
            elif ev.kind == "progress":
                ctx.progress(**ev.data)
            else:
                ctx.log(ev.message, "warning" if ev.kind == "warning" else
                        "error" if ev.kind == "error" else "info")
            # A log line raises only once: the engine's clean-up after the interrupt
            # logs too, and must run to its end (thaw, end the job, delete the new
            # checkpoint). Work (a new phase, progress) is stopped every time.
            if ctx.cancel.is_set() and (not raised[0]
                                        or ev.kind in ("phase-start", "progress")):
                raised[0] = True
                raise Interrupted(f"backup stopped: {ctx.cancel_reason}")
        return listen

    def _left(self, hv: Hypervisor, uuid: str) -> bool:
        """True when the VM is no longer active on this node (it migrated away)."""
        dom = hv.find(uuid)
        if dom is None:
            return True
        try:
            return not dom.isActive()
        except libvirt.libvirtError:
            return True

    def backup(self, ctx: TaskContext) -> schemas.TaskResult:
        uuid = str(ctx.payload["vm_uuid"])
        opts = BackupOptions(consistency=str(ctx.payload.get("consistency", "prefer")),
                             full=bool(ctx.payload.get("full", False)))
        if self.scratch_root is not None:
            opts = replace(opts, scratch_root=self.scratch_root)
        session = open_session(self.client, ctx.task.id)
        try:
            with self._hv() as hv:
                dom = hv.find(uuid)
                live = dom is not None and bool(dom.isActive())
                name = str(dom.name()) if dom is not None else str(ctx.payload["vm_name"])
                phase = [""]
                asked: list[JobRequest] = []

                def give_way(req: JobRequest) -> None:
                    # In the finish phase the job ends within moments anyway.
                    if asked or phase[0] == "finish":
                        return
                    asked.append(req)
                    what = "a migration" if req.migration else f"a {req.job} job"
                    ctx.cancel_reason = (f"{what} of VM {name} is waiting for its backup on "
                                         f"{hv.node.hostname}: the backup gives way")
                    ctx.log(ctx.cancel_reason + " (ended cleanly: no restore point)", "warning")
                    ctx.cancel.set()

                def track(ev: Event) -> None:
                    if ev.kind == "phase-start":
                        phase[0] = ev.phase or ""

                watching = (self.jobwatch.watch(name, give_way) if live
                            else contextlib.nullcontext(False))
                try:
                    with watching:
                        res = backup_vm(hv, session.repo, uuid, opts,
                                        [track, self._listener(ctx)])
                except DomainNotFound as exc:
                    raise MigratedError(f"VM {ctx.payload['vm_name']} is not on "
                                        f"{hv.node.hostname} any more: {exc.message}") from exc
                except Interrupted as exc:
                    if asked:
                        raise self._gave_way(hv, uuid, name, asked[0]) from exc
                    raise
                except HypervisorError as exc:
                    if not isinstance(exc, MigratedError) and live and self._left(hv, uuid):
                        raise MigratedError(f"VM {ctx.payload['vm_name']} left "
                                            f"{hv.node.hostname} during the backup: "
                                            f"{exc}") from exc
                    raise
        finally:
            session.abort_quietly()
        warnings = [line for line in res.log if "warning:" in line]
        return schemas.TaskResult(
            ok=True, snapshot=res.restore_point or "", kind=res.kind,
            consistency=res.consistency, bytes_read=res.bytes_read,
            bytes_stored=res.bytes_stored,
            warnings=[w.split("warning:", 1)[1].strip() for w in warnings][:100],
            data={"reason": res.reason, "parent": res.parent, "seconds": res.seconds,
                  "frozen_seconds": res.frozen_seconds, "phases": res.phases,
                  "disks": [d.to_dict() for d in res.disks]})

    def _gave_way(self, hv: Hypervisor, uuid: str, name: str, req: JobRequest) -> KuraError:
        """The error for a backup that ended early because ``req`` waited for it.

        The backup has ended cleanly (no restore point, checkpoint deleted, guest
        thawed). For a migration, wait for the VM to leave so that the server
        retries it on its new node; anything else is retried here.
        """
        node = hv.node.hostname
        if not req.migration:
            return Interrupted(f"the backup of VM {name} on {node} gave way to a {req.job} "
                               "job requested meanwhile (no restore point); it is retried")
        deadline = time.monotonic() + self.migration_wait
        while not self._left(hv, uuid):
            if time.monotonic() >= deadline:
                return Interrupted(
                    f"the backup of VM {name} on {node} gave way to a migration, which has "
                    f"not completed within {self.migration_wait:.0f} s; the backup is retried")
            time.sleep(0.5)
        return MigratedError(f"VM {name} migrated away from {node} during its backup; the "
                             "backup gave way as soon as the migration asked for the VM "
                             "(ended cleanly: no restore point, guest thawed)")

    # ---- pre-flight ----------------------------------------------------

    def preflight(self, ctx: TaskContext) -> schemas.TaskResult:
        uuid = str(ctx.payload["vm_uuid"])
        checks: list[dict[str, Any]] = []
        with self._hv() as hv:
            dom = hv.find(uuid)
            if dom is None:
                raise MigratedError(f"VM {ctx.payload['vm_name']} is not on "
                                    f"{hv.node.hostname} any more")
            info = describe(dom)
            checks.append({"check": "found", "ok": True,
                           "detail": f"{info.name} is {info.state} on {hv.node.hostname}"})
            live = info.state in ("running", "paused")
            want = str(ctx.payload.get("consistency", "prefer"))
            if live and want != "off":
                checks.append(self._ping(dom, want))
            elif not live:
                checks.append({"check": "guest agent", "ok": True,
                               "detail": f"VM is {info.state}: an offline backup needs none"})
            session = open_session(self.client, ctx.task.id)
            try:
                sizes = {d.target: disk_sizes(dom, d)[0] for d in info.disks}
                plan = chain.plan(session.repo, dom, info, sizes,
                                  force_full=bool(ctx.payload.get("full")), live=live,
                                  node=hv.node.hostname)
                detail = ("healthy: the next backup is incremental" if plan.kind == "incremental"
                          else f"the next backup will be full: {plan.reason}")
                checks.append({"check": "checkpoints", "ok": True, "detail": detail,
                               "warn": plan.kind != "incremental"})
            except KuraError as exc:
                checks.append({"check": "checkpoints", "ok": False, "detail": str(exc)})
            finally:
                session.abort_quietly()
        checks.append({"check": "agent credentials", "ok": True,
                       "detail": "this agent's credential and data-path session work"})
        return schemas.TaskResult(ok=True, checks=checks)

    def _ping(self, dom: Any, want: str) -> dict[str, Any]:
        try:
            libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', 10, 0)
            return {"check": "guest agent", "ok": True, "detail": "answers guest-ping"}
        except libvirt.libvirtError as exc:
            msg = str(exc).splitlines()[0]
            if want == "require":
                return {"check": "guest agent", "ok": False,
                        "detail": f"did not answer ({msg}); consistency 'require' would fail"}
            return {"check": "guest agent", "ok": None, "warn": True,
                    "detail": f"did not answer ({msg}); the backup would be crash-consistent"}

    # ---- restore -------------------------------------------------------

    def restore(self, ctx: TaskContext) -> schemas.TaskResult:
        req = schemas.RestoreRequest.model_validate(ctx.payload.get("restore", {}))
        session: RemoteSession = open_session(self.client, ctx.task.id)
        try:
            manifest = session.repo.get_snapshot(str(ctx.payload["snapshot"]))
            if req.output is not None:  # one disk to a file on this node
                disk = req.disk or _only_disk(manifest)
                fmt = req.format or "raw"
                size = restore_disk_file(session.repo, manifest, disk, Path(req.output),
                                         fmt=fmt, force=req.force,
                                         listeners=[self._listener(ctx)])
                return schemas.TaskResult(
                    ok=True, kind="restore", snapshot=manifest.id, bytes_read=size,
                    data={"disk": disk, "output": req.output, "format": fmt, "size": size})
            opts = RestoreOptions(target_dir=Path(req.target_dir) if req.target_dir else None,
                                  new_name=req.new_name, fmt=req.format, start=req.start,
                                  force=req.force)
            with self._hv() as hv:
                res = restore_vm(hv, session.repo, manifest, opts, [self._listener(ctx)])
        finally:
            session.abort_quietly()
        return schemas.TaskResult(ok=True, kind="restore", snapshot=manifest.id,
                                  bytes_read=res.bytes, data=res.to_dict())


def _only_disk(manifest: Manifest) -> str:
    if len(manifest.disks) != 1:
        raise UsageError("this restore point has several disks: name one with --disk "
                         f"({', '.join(d.name for d in manifest.disks)})")
    return manifest.disks[0].name
