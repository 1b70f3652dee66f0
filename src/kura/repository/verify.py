"""Verify: re-read restore points and report exactly what is damaged.

1. Load each manifest to check (all, or the ones asked for); a manifest that
   fails authentication or parsing is reported as a whole.
2. Read each disk's index (checked against the hash in the manifest); a bad
   index damages the whole disk. Collect, for every chunk id, where it is used
   (restore point, disk or ``config:<name>``, chunk number).
3. Read every referenced chunk once, on a thread pool: authenticate, decompress,
   re-hash against its id, check its length. A bad chunk damages the byte range
   it covers in every disk that uses it.
4. Report damage per restore point and disk as merged byte ranges with the
   reasons, record ``verify_state`` (``ok``/``failed``) in each restore point's
   notes, and move corrupted chunk blobs (not merely unreadable ones) aside to
   ``bad/`` so that the next backup writing the same data stores it afresh.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kura.errors import IntegrityError, KuraError, RepositoryError
from kura.repository.backend import ObjectNotFound
from kura.repository.index import ZERO_CHUNK, chunk_length
from kura.repository.store import ChunkMissing, RepoStore, chunk_name

log = logging.getLogger(__name__)

BAD_DIR = "bad"


@dataclass(frozen=True)
class Damage:
    """Damage found in one restore point: a disk's byte ranges, or the whole thing."""

    snapshot: str
    source: str
    disk: str | None
    ranges: list[tuple[int, int]]
    reasons: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "source": self.source, "disk": self.disk,
                "ranges": [list(r) for r in self.ranges], "reasons": self.reasons}

    def describe(self) -> str:
        where = f"restore point {self.snapshot} ({self.source})"
        if self.disk is not None:
            spans = ", ".join(f"{a}-{b}" for a, b in self.ranges[:8])
            more = f" and {len(self.ranges) - 8} more ranges" if len(self.ranges) > 8 else ""
            where += f", disk {self.disk}, bytes {spans}{more}"
        return f"{where}: {'; '.join(self.reasons[:3])}"


@dataclass
class VerifyReport:
    snapshots: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    bytes_checked: int = 0
    damaged: list[Damage] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def failed_snapshots(self) -> list[str]:
        return sorted({d.snapshot for d in self.damaged})

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "snapshots": self.snapshots, "chunks_checked": self.chunks_checked,
                "bytes_checked": self.bytes_checked, "seconds": round(self.seconds, 3),
                "damaged": [d.to_dict() for d in self.damaged]}


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def verify(store: RepoStore, snapshot_ids: Sequence[str] | None = None, *, workers: int = 2,
           progress: Callable[[int], None] | None = None,
           on_total: Callable[[int], None] | None = None, record: bool = True,
           quarantine: bool = True) -> VerifyReport:
    """Check restore points (all when ``snapshot_ids`` is None); see module docstring."""
    t0 = time.monotonic()
    report = VerifyReport()
    ids = list(snapshot_ids) if snapshot_ids is not None else store.list_snapshot_ids()
    report.snapshots = ids
    # chunk id -> [(snapshot, source name, disk label, start, end)]
    refs: dict[bytes, list[tuple[str, str, str, int, int]]] = defaultdict(list)
    whole: list[Damage] = []
    loaded: list[str] = []
    for sid in ids:
        try:
            manifest = store.load_manifest(sid, with_notes=False)
        except KuraError as exc:
            whole.append(Damage(sid, "?", None, [], [exc.message]))
            continue
        loaded.append(sid)
        name = manifest.source.name
        for disk in manifest.disks:
            try:
                index = store.read_index(manifest, disk)
            except KuraError as exc:
                whole.append(Damage(sid, name, disk.name, [(0, disk.size)], [exc.message]))
                continue
            for i, cid in enumerate(index.ids):
                if cid != ZERO_CHUNK:
                    start = i * disk.chunk_size
                    end = start + chunk_length(i, disk.size, disk.chunk_size)
                    refs[cid].append((sid, name, disk.name, start, end))
        for cname, entry in manifest.configs.items():
            for i, cid in enumerate(entry.chunks):
                start = i * store.chunk_size
                end = min(entry.size, start + store.chunk_size)
                refs[cid].append((sid, name, f"config:{cname}", start, end))
    if on_total:
        on_total(sum(r[0][4] - r[0][3] for r in refs.values()))

    def check(cid: bytes) -> tuple[bytes, str | None, bool]:
        first = refs[cid][0]
        try:
            store.read_chunk(cid, expected_len=first[4] - first[3])
        except ChunkMissing as exc:
            return cid, exc.message, False
        except IntegrityError as exc:
            return cid, exc.message, True
        except RepositoryError as exc:
            return cid, exc.message, False
        return cid, None, False

    bad: dict[tuple[str, str, str], list[tuple[int, int]]] = defaultdict(list)
    reasons: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kura-verify") as pool:
        for cid, error, corrupt in pool.map(check, list(refs)):
            length = refs[cid][0][4] - refs[cid][0][3]
            report.chunks_checked += 1
            report.bytes_checked += length
            if progress:
                progress(length)
            if error is None:
                continue
            for sid, name, label, start, end in refs[cid]:
                key = (sid, name, label)
                bad[key].append((start, end))
                if error not in reasons[key]:
                    reasons[key].append(error)
            if corrupt and quarantine:
                _quarantine(store, cid)
    report.damaged = whole + [
        Damage(sid, name, label, _merge(ranges), reasons[(sid, name, label)])
        for (sid, name, label), ranges in sorted(bad.items())]
    report.seconds = time.monotonic() - t0
    if record:
        failed = set(report.failed_snapshots)
        stamp = datetime.now(UTC).isoformat()
        for sid in loaded:
            try:
                store.update_notes(sid, verify_state="failed" if sid in failed else "ok",
                                   verified_at=stamp)
            except KuraError as exc:
                log.warning("cannot record the verify result of %s: %s", sid, exc)
    return report


def _quarantine(store: RepoStore, cid: bytes) -> None:
    target = f"{BAD_DIR}/{cid.hex()}.{int(time.time())}"
    try:
        store.backend.rename(chunk_name(cid), target)
        log.warning("moved damaged chunk %s to %s", cid.hex(), target)
    except ObjectNotFound:
        pass
    except KuraError as exc:
        log.warning("cannot move damaged chunk %s aside: %s", cid.hex(), exc)
