"""Backing up one VM on this node: six named phases, nothing left behind.

``backup_vm`` runs the phases of the job log (see :mod:`kura.engine.events`):

1. **accepted** — which VM, which node, its state; full or incremental and
   why (:mod:`kura.engine.chain`); leftovers of an interrupted run on this VM
   (a backup job, scratch files, stray ``kura-*`` checkpoints) are removed;
   the repository writer is opened (source lock + writer registration).
2. **configuration** — domain XML, UEFI NVRAM, TPM state (:mod:`kura.engine.config`).
3. **quiesce** — guest filesystems frozen through the guest agent, by the
   job's consistency policy: ``require`` (no agent answer fails this VM),
   ``prefer`` (falls back to crash-consistent and says so), ``off``.
4. **view** — the pull-mode backup job starts (the point-in-time view, and
   atomically the new checkpoint ``kura-<restore point id>``); the guest is
   thawed right after, on every path, and the frozen time is recorded.
5. **data** — allocated (full) or dirty (incremental) chunks are read over
   NBD and stored (:mod:`kura.engine.datapath`), with progress events.
6. **finish** — the manifest is committed; only then is the new checkpoint
   told to the guard as kept; the backup job ends (scratch removed) and every
   older ``kura-*`` checkpoint is deleted.

Shut-off and saved VMs take the offline path (:mod:`kura.engine.offline`)
for phases 3-5. Every failure or interrupt (exception, Ctrl-C, SIGTERM made
into an exception by the caller) thaws, ends the job, deletes the new
checkpoint and aborts the writer, so no restore point, checkpoint, bitmap
or scratch file is left; a killed process is covered by the guard process
(:mod:`kura.hypervisor.guard`). If QEMU rejects the parent's bitmap when the
job starts, the VM is backed up again at once as a full, with the reason.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from kura.engine import chain, config, datapath, offline
from kura.engine.chain import ChainPlan
from kura.engine.events import JobLog, Listener
from kura.errors import (
    CheckpointError,
    GuestAgentError,
    HypervisorError,
    KuraError,
    MigratedError,
    UsageError,
)
from kura.hypervisor import checkpoints
from kura.hypervisor.connection import Hypervisor, NodeIdentity
from kura.hypervisor.domain import DomainInfo, describe, disk_sizes
from kura.hypervisor.guard import Guard
from kura.hypervisor.guestagent import Quiescer
from kura.hypervisor.view import (
    DEFAULT_SCRATCH_ROOT,
    PointInTimeView,
    clear_leftovers,
    job_dir,
    vm_lock,
)
from kura.nbd import NbdSource
from kura.repository import Repository, SnapshotWriter, SourceRef
from kura.repository.store import manifest_name

CONSISTENCY_POLICIES = ("require", "prefer", "off")
LIVE_STATES = ("running", "paused")
OFFLINE_STATES = ("shut off", "saved")


@dataclass(frozen=True)
class BackupOptions:
    """How to back up a VM (one object per job; the CLI and the agent build it)."""

    consistency: str = "prefer"  # require | prefer | off
    full: bool = False
    inflight: int = 8  # NBD requests in flight per disk
    workers: int | None = None  # hashing/compression threads (default: every core)
    agent_timeout: int = 10  # seconds libvirt waits for the guest agent
    max_frozen: float = 60.0  # the guard thaws after this many seconds frozen
    scratch_root: Path = DEFAULT_SCRATCH_ROOT
    guard: bool = True  # run the watchdog process (tests may turn it off)

    def __post_init__(self) -> None:
        if self.consistency not in CONSISTENCY_POLICIES:
            raise UsageError(f"consistency must be one of {', '.join(CONSISTENCY_POLICIES)}, "
                             f"not {self.consistency!r}")
        if self.inflight < 1:
            raise UsageError("inflight must be at least 1")


@dataclass
class DiskResult:
    target: str
    mode: str
    reason: str
    size: int
    bytes_read: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "reason": self.reason,
                "size": self.size, "bytes_read": self.bytes_read, "stats": dict(self.stats)}


@dataclass
class BackupResult:
    """What happened to one VM (``ok`` False with ``error`` when it failed)."""

    vm: str
    uuid: str = ""
    node: str = ""
    ok: bool = False
    restore_point: str | None = None
    kind: str = ""
    reason: str = ""
    parent: str | None = None
    state: str = ""
    consistency: str = ""
    frozen_seconds: float | None = None
    seconds: float = 0.0
    disks: list[DiskResult] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    log: list[str] = field(default_factory=list)

    @property
    def bytes_read(self) -> int:
        return sum(d.bytes_read for d in self.disks)

    @property
    def bytes_stored(self) -> int:
        return sum(int(d.stats.get("bytes_stored", 0)) for d in self.disks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm, "uuid": self.uuid, "node": self.node, "ok": self.ok,
            "restore_point": self.restore_point, "kind": self.kind, "reason": self.reason,
            "parent": self.parent, "state": self.state, "consistency": self.consistency,
            "frozen_seconds": self.frozen_seconds, "seconds": self.seconds,
            "bytes_read": self.bytes_read, "bytes_stored": self.bytes_stored,
            "disks": [d.to_dict() for d in self.disks], "phases": dict(self.phases),
            "error": self.error, "log": list(self.log),
        }


class _RetryFull(Exception):
    """QEMU refused the parent's bitmap: run the VM's backup again as a full."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def backup_vm(hv: Hypervisor, repo: Repository, ref: str, options: BackupOptions,
              listeners: list[Listener] | None = None) -> BackupResult:
    """Back up VM ``ref`` (name or UUID) of node ``hv``; raises on failure."""
    log = JobLog(ref, listeners)
    result = BackupResult(vm=ref)
    start = time.monotonic()
    try:
        try:
            _run(hv, repo, ref, options, log, result, forced_reason=None)
        except _RetryFull as retry:
            log.warning(f"{retry.reason}: taking a full backup instead")
            result.disks.clear()
            _run(hv, repo, ref, options, log, result, forced_reason=retry.reason)
    finally:
        result.seconds = time.monotonic() - start
        result.phases = dict(log.phases)
        result.log = log.lines()
    return result


def backup_vms(hv: Hypervisor, repo: Repository, refs: list[str], options: BackupOptions,
               listeners: list[Listener] | None = None) -> list[BackupResult]:
    """Back up several VMs one after the other; one VM's failure does not stop the rest."""
    results = []
    for ref in refs:
        try:
            results.append(backup_vm(hv, repo, ref, options, listeners))
        except KuraError as exc:
            failed = BackupResult(vm=ref, error=str(exc))
            results.append(failed)
    return results


def _run(hv: Hypervisor, repo: Repository, ref: str, options: BackupOptions, log: JobLog,
         result: BackupResult, *, forced_reason: str | None) -> None:
    with contextlib.ExitStack() as held:  # the per-VM lock, held to the end
        _run_locked(hv, repo, ref, options, log, result, held, forced_reason=forced_reason)


def _run_locked(hv: Hypervisor, repo: Repository, ref: str, options: BackupOptions,
                log: JobLog, result: BackupResult, held: contextlib.ExitStack, *,
                forced_reason: str | None) -> None:
    node = hv.node
    with log.phase("accepted"):
        dom = hv.lookup(ref)
        info = describe(dom)
        held.enter_context(vm_lock(options.scratch_root, info.uuid))
        log.vm = info.name
        result.vm, result.uuid, result.node, result.state = (info.name, info.uuid,
                                                              node.hostname, info.state)
        _check_not_migrated(dom, info)
        live = _check_state(info)
        # The guard comes up (a Python process) while the rest of this phase runs;
        # the live path waits for it before it freezes or starts a backup job.
        guard = Guard(hv.uri, info.uuid, wait=False) if live and options.guard else None
        if guard is not None:
            held.callback(guard.close)  # no-op once the live path has closed it
        sizes = {d.target: disk_sizes(dom, d)[0] for d in info.disks}
        if live:
            for line in clear_leftovers(dom, options.scratch_root, info.uuid):
                log.warning(line)
        plan = chain.plan(repo, dom, info, sizes, force_full=options.full or bool(forced_reason),
                          live=live, node=node.hostname)
        if forced_reason:
            plan = ChainPlan("full", forced_reason, None, None,
                             {t: chain.DiskPlan(t, "full", forced_reason) for t in plan.disks})
        for note in plan.notes:
            log.info(note)
        keep = {plan.checkpoint.name} if plan.checkpoint else set()
        if live or info.state == "shut off":
            for gone in checkpoints.remove_strays(dom, info, keep):
                log.info(f"removed stray checkpoint {gone}")
        log.info(f"VM {info.name} ({info.uuid}), {info.state}, on node {node.hostname}: "
                 f"{plan.kind} backup ({plan.reason})")
        w = repo.begin_snapshot(SourceRef("vm", info.uuid, info.name), node=node.hostname,
                                parent=plan.parent, kind=plan.kind, reason=plan.reason,
                                workers=options.workers)
        result.restore_point, result.kind, result.reason = w.id, plan.kind, plan.reason
        result.parent = plan.parent.id if plan.parent else None
    try:
        with log.phase("configuration"):
            config.capture(w, dom, info, log)
        if live:
            _live(dom, info, plan, sizes, w, options, log, result, node, guard)
        else:
            _offline(dom, info, plan, sizes, w, options, log, result, node)
        result.ok = True
    except BaseException:
        w.abort()
        raise


def _check_not_migrated(dom: Any, info: DomainInfo) -> None:
    """A definition left behind by a migration is not the VM: it runs elsewhere."""
    try:
        state, reason = dom.state(0)
    except libvirt.libvirtError as exc:
        raise MigratedError(f"VM {info.name} vanished from this node: {exc}") from exc
    if state == libvirt.VIR_DOMAIN_SHUTOFF and reason == libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED:
        raise MigratedError(
            f"VM {info.name} was migrated away from this node; this is a stale definition",
            hint="back it up on the node that runs it now (`kura ls --connect URI`)")


def _check_state(info: DomainInfo) -> bool:
    """True for the live path, False for offline; refuse other states clearly."""
    if not info.disks:
        raise HypervisorError(f"VM {info.name} has no disk kura can back up"
                              + (f" (skipped: {info.skipped})" if info.skipped else ""))
    if info.state in LIVE_STATES:
        return True
    if info.state in OFFLINE_STATES:
        network = [d.target for d in info.disks if d.source_type == "network"]
        if network:
            raise HypervisorError(
                f"VM {info.name} is {info.state} and has network disks ({', '.join(network)}) "
                "that kura can only read while the VM runs",
                hint="start the VM (paused is fine: virsh start --paused) and back it up")
        return False
    raise HypervisorError(f"VM {info.name} is {info.state}: kura cannot back it up in that state",
                          hint="wait until it is running, paused or shut off")


def _live(dom: Any, info: DomainInfo, plan: ChainPlan, sizes: dict[str, int],
          w: SnapshotWriter, options: BackupOptions, log: JobLog, result: BackupResult,
          node: NodeIdentity, guard: Guard | None) -> None:
    tracked = [d for d in info.disks if d.trackable]
    new_cp = checkpoints.checkpoint_name(w.id) if tracked else None
    cp_xml = (checkpoints.new_checkpoint_xml(new_cp, info, f"kura restore point {w.id}")
              if new_cp else None)
    if guard is not None:
        guard.wait_ready()  # raises (nothing frozen or started yet) if it did not come up
    try:
        directory = job_dir(options.scratch_root, info.uuid)
    except OSError as exc:
        if guard is not None:
            guard.done()
        raise HypervisorError(f"cannot create the scratch directory under "
                              f"{options.scratch_root}: {exc.strerror}") from exc
    if guard is not None:
        guard.job(new_cp, str(directory))
    bases = {t: p.bitmap_checkpoint for t, p in plan.disks.items() if p.mode == "incremental"}
    view = PointInTimeView(dom, list(info.disks), bases, cp_xml, directory)
    quiescer = Quiescer(dom, guard, agent_timeout=options.agent_timeout,
                        max_frozen=options.max_frozen)
    committed = False
    try:
        consistency, note = _quiesce(quiescer, info, options, log)
        with log.phase("view"):
            try:
                exports = view.start()
            except CheckpointError as exc:
                if plan.kind == "incremental":
                    raise _RetryFull(exc.message) from exc
                raise
            finally:
                frozen = quiescer.thaw() if quiescer.frozen else None
            if frozen is not None:
                log.info(f"guest thawed: frozen for {frozen:.3f}s "
                         f"({quiescer.filesystems} filesystems)")
                if frozen >= options.max_frozen:
                    # The guard thawed the guest before the view existed.
                    consistency = "crash"
                    note = (f"the view took {frozen:.0f}s, longer than the "
                            f"{options.max_frozen:.0f}s a guest may stay frozen: "
                            "the guard thawed it first")
                    log.warning(note)
            made = f"new checkpoint {new_cp}" if new_cp else "no checkpoint (no qcow2 disk)"
            log.info(f"point-in-time view exported on {view.socket}; {made}",
                     socket=str(view.socket),
                     exports={t: e.export for t, e in exports.items()})
            stored = checkpoints.stored_form(dom, new_cp, node.hostname) if new_cp else None
            result.consistency = consistency
            result.frozen_seconds = frozen
            _fill_meta(w, info, plan, node, consistency, frozen, stored, log, note)
        with log.phase("data"):
            sources: list[tuple[str, NbdSource]] = []
            with contextlib.ExitStack() as stack:
                for d in info.disks:
                    exp = exports.get(d.target)
                    if exp is None:
                        raise HypervisorError(f"the backup job exports no disk {d.target}")
                    bitmap = exp.bitmap if plan.disks[d.target].mode == "incremental" else None
                    src = stack.enter_context(NbdSource.connect_unix(view.socket, exp.export,
                                                                     bitmap=bitmap))
                    sources.append((d.target, src))
                _read_disks(sources, info, plan, sizes, w, options, log, result)
        with log.phase("finish"):
            if guard is not None:
                guard.committing()
            try:
                manifest = w.commit()
            except BaseException:
                committed = _maybe_committed(w, new_cp, log)
                raise
            committed = True
            if guard is not None:
                guard.committed()
            log.info(f"restore point {manifest.id} committed"
                     + (f"; checkpoint {new_cp} is the base of the next incremental"
                        if new_cp else ""))
            view.end()
            for gone in checkpoints.remove_strays(dom, info, {new_cp} if new_cp else set(),
                                                  bitmaps=False):
                log.info(f"deleted older checkpoint {gone}")
        if guard is not None:
            guard.done()
            guard = None
    finally:
        _cleanup(dom, quiescer, view, new_cp, committed, guard, log)


def _offline(dom: Any, info: DomainInfo, plan: ChainPlan, sizes: dict[str, int],
             w: SnapshotWriter, options: BackupOptions, log: JobLog, result: BackupResult,
             node: NodeIdentity) -> None:
    """Phases 3-6 for a shut-off or saved VM (see :mod:`kura.engine.offline`)."""
    new_cp = None
    if info.state == "shut off" and any(d.trackable for d in info.disks):
        new_cp = checkpoints.checkpoint_name(w.id)
    committed = False
    try:
        with contextlib.ExitStack() as stack:
            consistency, sources, stored = offline.prepare(dom, info, plan, new_cp,
                                                           node.hostname, stack, log)
            result.consistency = consistency
            _fill_meta(w, info, plan, node, consistency, None, stored, log,
                       "the VM was off" if consistency == "offline" else "saved VM")
            with log.phase("data"):
                _read_disks(sources, info, plan, sizes, w, options, log, result)
        with log.phase("finish"):
            try:
                manifest = w.commit()
            except BaseException:
                committed = _maybe_committed(w, new_cp, log)
                raise
            committed = True
            log.info(f"restore point {manifest.id} committed"
                     + (f"; checkpoint {new_cp} is the base of the next incremental"
                        if new_cp else ""))
            if new_cp:
                for gone in checkpoints.remove_strays(dom, info, {new_cp}, bitmaps=False):
                    log.info(f"deleted older checkpoint {gone}")
    finally:
        if new_cp and not committed:
            try:
                checkpoints.delete(dom, new_cp, info)
            except KuraError as exc:
                log.error(f"{exc}; it will be removed by the next backup")


def _maybe_committed(w: SnapshotWriter, new_cp: str | None, log: JobLog) -> bool:
    """After ``commit`` raised: False only when the repository says no manifest exists.

    A commit whose answer was lost (the network to the server cut after the
    manifest reached it) may have succeeded; deleting its checkpoint then would
    cost the next backup a full. A checkpoint kept for a restore point that did
    not commit is a stray, which the next backup removes (chain rule 5).
    """
    try:
        return w.store.backend.exists(manifest_name(w.id))
    except KuraError as exc:
        if new_cp:
            log.warning(f"cannot tell whether restore point {w.id} was committed "
                        f"({exc.message}): checkpoint {new_cp} is kept; the next backup "
                        "uses it if the restore point exists and removes it otherwise")
        return True


def _quiesce(quiescer: Quiescer, info: DomainInfo, options: BackupOptions,
             log: JobLog) -> tuple[str, str | None]:
    """Phase 3; returns (consistency, note explaining a fallback)."""
    with log.phase("quiesce"):
        if options.consistency == "off":
            log.info("guest freeze skipped (consistency policy off): crash-consistent")
            return "crash", "freeze skipped by policy"
        if info.state == "paused":
            why = "the VM is paused, so its guest agent cannot freeze filesystems"
            if options.consistency == "require":
                raise GuestAgentError(why, hint="resume the VM or use --consistency prefer")
            log.warning(f"{why}: crash-consistent backup")
            return "crash", why
        try:
            count = quiescer.freeze()
        except GuestAgentError as exc:
            if options.consistency == "require":
                log.error(f"{exc.message}: consistency 'require' fails this VM")
                raise
            log.warning(f"{exc.message}: falling back to a crash-consistent backup")
            return "crash", exc.message
        log.info(f"froze {count} guest filesystems through the guest agent")
        return "application", None


def _cleanup(dom: Any, quiescer: Quiescer, view: PointInTimeView, new_cp: str | None,
             committed: bool, guard: Guard | None, log: JobLog) -> None:
    """Undo whatever a failed or interrupted job left (no-op after success)."""
    if quiescer.frozen:
        try:
            quiescer.thaw()
        except KuraError as exc:
            log.error(str(exc))
    deleted = False
    if new_cp and not committed and view.started:
        # While the job still runs: a migration waiting for the job starts the
        # moment it ends, and the VM would take the checkpoint's bitmap along.
        with contextlib.suppress(KuraError):
            checkpoints.delete(dom, new_cp)
            deleted = True
    try:
        view.end()
    except KuraError as exc:
        log.error(str(exc))
    if new_cp and not committed and not deleted:
        try:
            checkpoints.delete(dom, new_cp)
        except KuraError as exc:
            log.error(f"{exc}; it will be removed by the next backup")
    if guard is not None:
        guard.close()  # no `done`: the guard double-checks the cleanup


def _fill_meta(w: SnapshotWriter, info: DomainInfo, plan: ChainPlan, node: NodeIdentity,
               consistency: str, frozen: float | None, stored: checkpoints.StoredCheckpoint | None,
               log: JobLog, note: str | None = None) -> None:
    w.meta.update({
        "consistency": consistency,
        "consistency_note": note,
        "frozen_seconds": None if frozen is None else round(frozen, 4),
        "reason": plan.reason,
        "node": node.to_dict(),
        "state": info.state,
        "vm": {"name": info.name, "uuid": info.uuid, "firmware": info.firmware},
        "checkpoint": stored.to_dict() if stored else None,
        "disks": {t: {"mode": p.mode, "reason": p.reason} for t, p in plan.disks.items()},
    })
    if consistency != "application" and note:
        log.info(f"restore point consistency: {consistency} ({note})")


def _read_disks(sources: list[tuple[str, NbdSource]], info: DomainInfo, plan: ChainPlan,
                sizes: dict[str, int], w: SnapshotWriter, options: BackupOptions, log: JobLog,
                result: BackupResult) -> None:
    chunk = w.store.chunk_size
    plans = []
    for target, src in sources:
        dp = plan.disks[target]
        rp = datapath.read_plan(src, target, dp.mode, chunk)
        plans.append((target, src, rp))
        log.info(f"disk {target}: {dp.mode} ({dp.reason}): {len(rp.indexes)} chunks, "
                 f"{rp.bytes} bytes to read of {src.size}")
    total = sum(rp.bytes for _, _, rp in plans)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        log.progress(done, total)

    log.progress(0, total)
    for target, src, rp in plans:
        disk = info.disk(target)
        dp = plan.disks[target]
        attrs = {"target": target, "bus": disk.bus, "format": disk.format, "path": disk.path,
                 "type": disk.source_type, "storage": disk.storage.kind, "mode": dp.mode,
                 "reason": dp.reason}
        base = dp.base if dp.mode == "incremental" else None
        dw = w.add_disk(target, sizes.get(target, src.size), base=base, attrs=attrs)
        got = datapath.copy(src, dw, rp, inflight=options.inflight, on_bytes=advance)
        entry = dw.finish()
        result.disks.append(DiskResult(target, dp.mode, dp.reason, entry.size, got,
                                       dict(entry.stats)))
        log.info(f"disk {target}: read {got} bytes, stored {entry.stats.get('bytes_stored', 0)} "
                 f"new bytes ({entry.stats.get('chunks_written', 0)} new chunks, "
                 f"{entry.stats.get('chunks_reused', 0)} already stored)")

