"""Deciding full or incremental: only an incremental that can be proven correct.

An incremental restore point is the parent's image plus every block the
dirty bitmap says changed since the parent's checkpoint. That is correct only
if the bitmap has recorded *every* write since that instant. :func:`plan`
takes the conservative view and falls back to a full read whenever it cannot
show that, saying why:

VM-wide (the whole restore point becomes a full, a new chain):

- ``--full`` was asked for;
- the VM has no committed restore point yet, or the latest one has no
  checkpoint (it was taken of a saved VM, or of raw disks only);
- the latest restore point failed verification;
- the VM is saved (its bitmaps may live in the save image, not the disk);
- the checkpoint is unknown to libvirt here and cannot be redefined from the
  stored XML, or its bitmaps are missing, disabled or inconsistent.

Per disk (that disk is read in full, the others stay incremental):

- the disk is new since the parent, or its size changed;
- the disk cannot hold a bitmap (raw, network) or had none in the checkpoint.

The parent is always the *latest committed* restore point of the VM's UUID:
a checkpoint created by a backup that did not commit is never a base,
because its restore point does not exist.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from kura.errors import KuraError
from kura.hypervisor import checkpoints
from kura.hypervisor.checkpoints import StoredCheckpoint
from kura.hypervisor.domain import DomainInfo
from kura.repository import DiskEntry, Manifest, Repository


@dataclass(frozen=True)
class DiskPlan:
    target: str
    mode: str  # "full" or "incremental"
    reason: str
    base: DiskEntry | None = None  # the parent's entry (incremental and full-with-parent)
    bitmap_checkpoint: str | None = None  # read changes since this checkpoint
    bitmap: str | None = None  # that checkpoint's bitmap in this disk's image


@dataclass(frozen=True)
class ChainPlan:
    kind: str  # "full" or "incremental"
    reason: str
    parent: Manifest | None
    checkpoint: StoredCheckpoint | None
    disks: dict[str, DiskPlan] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what was done to make the chain usable (redefined...)


def _full(info: DomainInfo, reason: str, notes: tuple[str, ...] = ()) -> ChainPlan:
    disks = {d.target: DiskPlan(d.target, "full", reason) for d in info.disks}
    return ChainPlan("full", reason, None, None, disks, notes)


def plan(repo: Repository, dom: Any, info: DomainInfo, sizes: dict[str, int], *,
         force_full: bool, live: bool, node: str) -> ChainPlan:
    """Decide, per disk, what the next restore point of ``info`` reads."""
    if force_full:
        return _full(info, "full backup requested")
    parent = repo.latest(info.uuid)
    if parent is None:
        return _full(info, "first backup of this VM")
    if parent.verify_state == "failed":
        return _full(info, f"the previous restore point {parent.id} failed verification")
    stored = StoredCheckpoint.from_meta(parent.meta.get("checkpoint"))
    if stored is None:
        return _full(info, f"the previous restore point {parent.id} has no checkpoint")
    if not live and info.state != "shut off":
        return _full(info, f"the VM is {info.state}: its disks are read in full")
    notes: list[str] = []
    try:
        if checkpoints.lookup(dom, stored.name) is None:
            checkpoints.redefine(dom, stored, validate=live)
            where = f" (created on {stored.node})" if stored.node and stored.node != node else ""
            notes.append(f"checkpoint {stored.name}{where} redefined on {node} "
                         "from the repository" + (" and validated" if live else ""))
    except KuraError as exc:
        _forget(dom, stored.name, info)
        return _full(info, f"checkpoint of {parent.id} cannot be restored on this node: "
                           f"{exc.message}", tuple(notes))
    parent_disks = {d.name: d for d in parent.disks}
    candidates = [d.target for d in info.disks
                  if d.trackable and d.target in parent_disks and d.target in stored.disks]
    problem = checkpoints.bitmap_problem(dom, info, stored, candidates)
    if problem is not None:
        _forget(dom, stored.name, info)
        return _full(info, f"the change tracking since {parent.id} cannot be trusted: {problem}",
                     tuple(notes))
    disks: dict[str, DiskPlan] = {}
    for d in info.disks:
        prev = parent_disks.get(d.target)
        if prev is None:
            disks[d.target] = DiskPlan(d.target, "full",
                                       f"disk {d.target} is new since {parent.id}")
        elif prev.size != sizes.get(d.target, prev.size):
            disks[d.target] = DiskPlan(d.target, "full", f"disk {d.target} was resized "
                                       f"({prev.size} -> {sizes[d.target]} bytes)")
        elif not d.trackable:
            disks[d.target] = DiskPlan(d.target, "full",
                                       f"{d.format} disk {d.target} has no change tracking")
        elif d.target not in stored.disks:
            disks[d.target] = DiskPlan(d.target, "full",
                                       f"disk {d.target} had no bitmap in {stored.name}")
        else:
            disks[d.target] = DiskPlan(d.target, "incremental",
                                       "blocks changed since the parent", prev, stored.name,
                                       stored.disks[d.target])
    increments = [p for p in disks.values() if p.mode == "incremental"]
    if not increments:
        return _full(info, "no disk of the VM can be read incrementally", tuple(notes))
    fulls = [p.reason for p in disks.values() if p.mode == "full"]
    reason = "blocks changed since the parent (dirty bitmaps of its checkpoint)"
    if fulls:
        reason += "; full read of " + "; ".join(fulls)
    return ChainPlan("incremental", reason, parent, stored, disks, tuple(notes))


def _forget(dom: Any, name: str, info: DomainInfo) -> None:
    """Drop a checkpoint that cannot be trusted (it would only cost write overhead)."""
    with contextlib.suppress(KuraError):
        checkpoints.delete(dom, name, info)
