"""The figures of a suite run: rows grouped by scenario, and their ratios.

A :class:`Row` is one tool doing one operation in one scenario: its wall
time (the median when the operation was repeated, with every sample kept),
the data it covered (the throughput's numerator: the allocated or changed
bytes of the disk, the same for every tool of a group), and where known the
bytes it stored, read, and its peak memory. ``role`` says what the row is:
``kura`` (the row the others are compared with; at most one per group),
``kura-alt`` (another kura path shown for reference), ``peer``, ``limit``
(a measured floor: reading the data and nothing else) or ``derived`` (a
computed floor, e.g. the CPU pipeline).

Ratios are always taken inside one group, i.e. between runs measured side by
side in the same suite run: for a peer ``peer time / kura time`` (above 1:
kura is faster), for a limit ``kura time / limit time`` (1 would be perfect).

:class:`Results` is what ``bench/run`` saves as JSON and what the report and
plot code read, so both can be tested on made-up figures.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROLES = ("kura", "kura-alt", "peer", "limit", "derived")

# Scenario (group) and tool names, shared by the scenarios, the report and the target checks.
G1 = "1 full backup, running VM"
G2F = "2 full backup, 8 GiB disk"
G2I = "2 incremental after 1% change"
G3A = "3 restore of 1"
G3B = "3 restore of 2 (full + incremental)"
G4 = "4 dedup: clones of one template"
G5 = "5 server job, both nodes"
G6 = "6 scaling"
KURA_IMAGE = "kura --image (raw file)"
KURA_IMAGE_RESTORE = "kura restore --image → raw"
BORG = "borg create zstd,3 (raw file)"
VNB_COPY = "virtnbdbackup -l copy -z"
NBDCOPY = "nbdcopy → null (read limit)"
READ_LOOP = "libnbd read loop (kura.nbd, 8 in flight)"
SERVER_JOB = "kura server job"
ONE_BY_ONE = "kura one by one (standalone)"


@dataclass
class Row:
    group: str
    tool: str
    role: str
    samples: list[float]
    data_bytes: int
    stored: int | None = None
    rss: int | None = None
    read: int | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        if not self.samples:
            raise ValueError(f"row {self.group}/{self.tool} has no time samples")

    @property
    def seconds(self) -> float:
        return statistics.median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)

    @property
    def throughput(self) -> float:
        """Bytes of data per second."""
        return self.data_bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Results:
    """Everything one run measured, plus the context needed to read it."""

    rows: list[Row] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # scenario -> why not measured
    scaling: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def groups(self) -> list[str]:
        seen: list[str] = []
        for r in self.rows:
            if r.group not in seen:
                seen.append(r.group)
        return seen

    def group(self, name: str) -> list[Row]:
        return [r for r in self.rows if r.group == name]

    def find(self, group: str, tool: str) -> Row | None:
        for r in self.rows:
            if r.group == group and r.tool == tool:
                return r
        return None

    def kura(self, group: str) -> Row | None:
        for r in self.group(group):
            if r.role == "kura":
                return r
        return None

    def ratio(self, row: Row) -> float | None:
        """peer/kura time for peers and kura-alt rows, kura/limit for limits."""
        k = self.kura(row.group)
        if k is None or row is k or k.seconds <= 0 or row.seconds <= 0:
            return None
        if row.role in ("limit", "derived"):
            return k.seconds / row.seconds
        return row.seconds / k.seconds

    def ratio_spread(self, row: Row) -> tuple[float, float] | None:
        """Lowest and highest per-round ratio when ``row`` and kura ran the same rounds
        side by side (scenario 1 with ``--repeat``): the noise of the ratio itself."""
        k = self.kura(row.group)
        if k is None or row is k or len(row.samples) < 2 or len(row.samples) != len(k.samples):
            return None
        if row.role in ("limit", "derived"):
            rs = [a / b for a, b in zip(k.samples, row.samples, strict=True) if b > 0]
        else:
            rs = [a / b for a, b in zip(row.samples, k.samples, strict=True) if b > 0]
        return (min(rs), max(rs)) if rs else None

    def to_json(self) -> str:
        return json.dumps({"rows": [asdict(r) for r in self.rows], "context": self.context,
                           "skipped": self.skipped, "scaling": self.scaling}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Results:
        doc = json.loads(text)
        return cls(rows=[Row(**r) for r in doc.get("rows", [])],
                   context=dict(doc.get("context", {})), skipped=dict(doc.get("skipped", {})),
                   scaling=list(doc.get("scaling", [])))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
