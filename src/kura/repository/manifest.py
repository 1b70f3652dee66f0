"""Manifests: the authenticated description of one restore point.

A manifest is a JSON document sealed as a blob at ``snapshots/<id>.manifest``
(binding: that name). Writing it is the commit point of a backup: a restore
point exists exactly when its manifest does. Fields (version 1)::

    format "kura-manifest", version 1, repository (id), id, source {kind, key, name},
    created (ISO 8601 UTC), node, kind ("full"|"incremental"), reason,
    parent (id | null), sequence (0 for a chain's first point), chain (id of the
    chain's first point), consistency ("application"|"crash"|"offline"),
    meta {free-form, filled by the engine},
    disks [{name, size, chunk_size, index, index_sha256, chunk_count, attrs, stats}],
    configs {name: {size, chunks: [hex ids]}}

Chains are linked by the explicit ``parent`` id and ``sequence`` number, never
by names or times. Mutable facts about a restore point (protected flag, result
of the last verify) live beside it in sealed *notes* (``notes/<id>.json``) and
are attached to the ``Manifest`` object when it is loaded.

Snapshot ids sort by creation time: ``YYYYMMDDTHHMMSSZ-<8 hex>``.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from kura.errors import IntegrityError, UnsupportedFormat, UsageError

FORMAT = "kura-manifest"
VERSION = 1
SourceKind = Literal["vm", "image"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}$")


def check_object_name(kind: str, name: str) -> str:
    """Validate a disk or configuration name (it becomes part of object names)."""
    if not _NAME_RE.match(name):
        raise UsageError(
            f"invalid {kind} name {name!r}",
            hint="use letters, digits, '.', '_', '+', '-' (at most 128, starting with a "
                 "letter or digit)")
    return name


def is_snapshot_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


def new_snapshot_id(created: datetime) -> str:
    return f"{created.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class SourceRef:
    """What a restore point backs up: a VM (key = UUID) or an image (key = name)."""

    kind: SourceKind
    key: str
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("vm", "image"):
            raise UsageError(f"unknown source kind {self.kind!r} (expected 'vm' or 'image')")
        for what, value in (("key", self.key), ("name", self.name)):
            if not value or len(value) > 256 or any(ord(c) < 32 for c in value):
                raise UsageError(f"invalid source {what} {value!r}")

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "name": self.name}


@dataclass(frozen=True)
class DiskEntry:
    """One disk of a restore point: its size and the index naming its chunks."""

    name: str
    size: int
    chunk_size: int
    index: str
    index_sha256: str
    chunk_count: int
    attrs: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "chunk_size": self.chunk_size,
                "index": self.index, "index_sha256": self.index_sha256,
                "chunk_count": self.chunk_count, "attrs": self.attrs, "stats": self.stats}


@dataclass(frozen=True)
class ConfigEntry:
    """A configuration blob (domain XML, NVRAM, TPM state), stored as chunks."""

    name: str
    size: int
    chunks: list[bytes]

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "chunks": [c.hex() for c in self.chunks]}


@dataclass(frozen=True)
class Manifest:
    id: str
    repository: str
    source: SourceRef
    created: datetime
    node: str
    kind: str
    reason: str
    parent: str | None
    sequence: int
    chain: str
    consistency: str
    meta: dict[str, Any]
    disks: list[DiskEntry]
    configs: dict[str, ConfigEntry]
    protected: bool = False
    verify_state: str | None = None

    def disk(self, name: str) -> DiskEntry:
        for d in self.disks:
            if d.name == name:
                return d
        names = ", ".join(d.name for d in self.disks) or "none"
        raise UsageError(f"restore point {self.id} has no disk {name!r} (disks: {names})")

    @property
    def size(self) -> int:
        return sum(d.size for d in self.disks)

    @property
    def stored_bytes(self) -> int:
        return sum(int(d.stats.get("bytes_stored", 0)) for d in self.disks)

    def to_json(self) -> bytes:
        """The sealed document (without notes)."""
        doc = {
            "format": FORMAT, "version": VERSION, "repository": self.repository, "id": self.id,
            "source": self.source.to_dict(), "created": self.created.isoformat(),
            "node": self.node, "kind": self.kind, "reason": self.reason, "parent": self.parent,
            "sequence": self.sequence, "chain": self.chain, "consistency": self.consistency,
            "meta": self.meta, "disks": [d.to_dict() for d in self.disks],
            "configs": {k: v.to_dict() for k, v in self.configs.items()},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def to_dict(self) -> dict[str, Any]:
        """Everything, notes included, for ``--json`` output."""
        doc: dict[str, Any] = json.loads(self.to_json())
        doc.pop("format")
        doc["protected"] = self.protected
        doc["verify_state"] = self.verify_state
        doc["size"] = self.size
        return doc

    @classmethod
    def from_json(cls, data: bytes, what: str) -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"{what}: manifest is not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise IntegrityError(f"{what}: not a kura manifest")
        if doc.get("version") != VERSION:
            raise UnsupportedFormat(
                f"{what}: manifest format version {doc.get('version')!r} is not supported "
                f"(this kura reads {VERSION})", hint="written by a newer kura? upgrade kura")
        try:
            src = doc["source"]
            disks = [DiskEntry(name=str(d["name"]), size=int(d["size"]),
                               chunk_size=int(d["chunk_size"]), index=str(d["index"]),
                               index_sha256=str(d["index_sha256"]),
                               chunk_count=int(d["chunk_count"]), attrs=dict(d["attrs"]),
                               stats=dict(d["stats"])) for d in doc["disks"]]
            configs = {str(k): ConfigEntry(name=str(k), size=int(v["size"]),
                                           chunks=[bytes.fromhex(c) for c in v["chunks"]])
                       for k, v in doc["configs"].items()}
            created = datetime.fromisoformat(doc["created"])
            if created.tzinfo is None:
                raise ValueError("created has no time zone")
            return cls(
                id=str(doc["id"]), repository=str(doc["repository"]),
                source=SourceRef(kind=src["kind"], key=src["key"], name=src["name"]),
                created=created, node=str(doc["node"]), kind=str(doc["kind"]),
                reason=str(doc["reason"]),
                parent=None if doc["parent"] is None else str(doc["parent"]),
                sequence=int(doc["sequence"]), chain=str(doc["chain"]),
                consistency=str(doc["consistency"]), meta=dict(doc["meta"]),
                disks=disks, configs=configs)
        except (KeyError, TypeError, ValueError, AttributeError, UsageError) as exc:
            raise IntegrityError(f"{what}: manifest fields are damaged ({exc})") from None
