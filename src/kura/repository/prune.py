"""Retention: which restore points ``kura prune`` keeps and which it removes.

Per source (VM or image), restore points are walked newest first, rule by rule
in the order last, hourly, daily, weekly (ISO weeks), monthly, yearly. ``keep
last N`` keeps the N newest. A period rule ``keep daily N`` keeps the newest
restore point of each of the N most recent days that do not already hold a
restore point kept by an earlier rule (the same semantics as Proxmox Backup
Server: rules add to each other). Every decision carries the rules that kept
it. Periods use UTC.

Never removed, whatever the rules: *protected* restore points (notes flag,
set with ``kura repo protect``) and the parents of backups in flight (a live
writer registration names its parent; removing it would pull the base from
under an incremental). Every restore point is a complete image, so removing any
other one is safe for the rest of its chain.

Prune removes metadata only, in this order: manifest (the commit point), notes,
indexes; ``gc`` frees the chunks no restore point references any more.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kura.errors import UsageError
from kura.repository.locks import live_writers
from kura.repository.manifest import Manifest
from kura.repository.store import INDEXES_DIR, RepoStore, manifest_name, notes_name

_PERIODS: list[tuple[str, Callable[[datetime], str]]] = [
    ("hourly", lambda t: t.strftime("%Y-%m-%d %H")),
    ("daily", lambda t: t.strftime("%Y-%m-%d")),
    ("weekly", lambda t: f"{t.isocalendar()[0]}-W{t.isocalendar()[1]:02d}"),
    ("monthly", lambda t: t.strftime("%Y-%m")),
    ("yearly", lambda t: t.strftime("%Y")),
]


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def __post_init__(self) -> None:
        for name, value in self.rules():
            if value < 0:
                raise UsageError(f"--keep-{name} must not be negative")

    def rules(self) -> list[tuple[str, int]]:
        out = [("last", self.keep_last)] + [
            (name, getattr(self, f"keep_{name}")) for name, _fn in _PERIODS]
        return [(n, v) for n, v in out if v is not None]

    @property
    def empty(self) -> bool:
        return not any(v for _n, v in self.rules())

    def to_dict(self) -> dict[str, int]:
        return {f"keep_{n}": v for n, v in self.rules()}


@dataclass(frozen=True)
class PruneDecision:
    manifest: Manifest
    keep: bool
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.manifest.id, "source": self.manifest.source.name,
                "created": self.manifest.created.isoformat(), "keep": self.keep,
                "reasons": self.reasons}


@dataclass
class PruneResult:
    dry_run: bool
    decisions: list[PruneDecision] = field(default_factory=list)

    @property
    def kept(self) -> list[Manifest]:
        return [d.manifest for d in self.decisions if d.keep]

    @property
    def removed(self) -> list[Manifest]:
        return [d.manifest for d in self.decisions if not d.keep]

    def to_dict(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "decisions": [d.to_dict() for d in self.decisions],
                "kept": len(self.kept), "removed": len(self.removed)}


def select(manifests: list[Manifest], policy: RetentionPolicy,
           in_use: set[str] | None = None) -> list[PruneDecision]:
    """Keep/remove decisions for the restore points of ONE source."""
    ordered = sorted(manifests, key=lambda m: (m.created, m.sequence, m.id), reverse=True)
    reasons: dict[str, list[str]] = defaultdict(list)
    for m in ordered:
        if m.protected:
            reasons[m.id].append("protected")
        if in_use and m.id in in_use:
            reasons[m.id].append("parent of a running backup")
    for rule, count in policy.rules():
        if rule == "last":
            for m in ordered[:count]:
                reasons[m.id].append("last")
            continue
        key_fn = dict(_PERIODS)[rule]
        kept_so_far = [m for m in ordered if any(r != "protected" and not r.startswith("parent")
                                                 for r in reasons[m.id])]
        covered = {key_fn(m.created) for m in kept_so_far}
        selected = 0
        for m in ordered:
            if selected >= count:
                break
            period = key_fn(m.created)
            if period in covered:
                continue
            covered.add(period)
            reasons[m.id].append(rule)
            selected += 1
    return [PruneDecision(m, bool(reasons[m.id]), list(reasons[m.id])) for m in ordered]


def prune(store: RepoStore, manifests: list[Manifest], policy: RetentionPolicy, *,
          dry_run: bool) -> PruneResult:
    """Apply ``policy`` to each source among ``manifests`` (see module docstring)."""
    if policy.empty:
        raise UsageError("no retention rule given; pass at least one --keep-... option",
                         hint="e.g. --keep-last 3 --keep-daily 7")
    in_use = {h.parent for h in live_writers(store.backend) if h.parent}
    by_source: dict[str, list[Manifest]] = defaultdict(list)
    for m in manifests:
        by_source[m.source.key].append(m)
    result = PruneResult(dry_run=dry_run)
    for key in sorted(by_source):
        result.decisions.extend(select(by_source[key], policy, in_use))
    if not dry_run:
        for m in result.removed:
            remove_snapshot(store, m.id)
    return result


def remove_snapshot(store: RepoStore, snapshot_id: str) -> None:
    """Remove a restore point's metadata: manifest first, so a crash leaves garbage only."""
    store.backend.delete(manifest_name(snapshot_id))
    store.forget_cached(snapshot_id)
    store.backend.delete(notes_name(snapshot_id))
    store.backend.delete(f"{INDEXES_DIR}/{snapshot_id}")
