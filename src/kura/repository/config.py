"""The repository ``config`` object: the one plain (unsealed) file.

JSON, written once at ``repo init`` (and when a key file is imported)::

    {"format": "kura-repository", "version": 2, "id": "<32 hex>", "created": ISO 8601,
     "chunk_size": 1048576, "compression": {"algorithm": "zstd", "level": 3},
     "encryption": "aes-256-gcm" | "none", "chunk_id": "blake3-keyed",
     "key": {wrapped master key, see crypto},
     "mac": "<hex HMAC-SHA256 under the mac key of every other member but key and mac>"}

Version 2 adds ``chunk_id``, the chunk id algorithm (keyed BLAKE3 for new
repositories). Version 1 has no such member: its ids are HMAC-SHA256, and it
is still read and written unchanged (a version-1 config is never rewritten as
version 2, so an older kura keeps opening it). A kura that only knows version
1 refuses a version-2 repository with "upgrade kura" instead of computing the
wrong ids.

Once the key is unwrapped the ``mac`` is checked, so a changed chunk size,
compression, encryption or id setting is detected. ``version`` greater than
this kura understands raises ``UnsupportedFormat`` before anything else is read.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from kura.errors import IntegrityError, RepositoryNotFound, UnsupportedFormat
from kura.repository.backend import Backend, ObjectNotFound
from kura.repository.crypto import ENCRYPTIONS, ID_ALGORITHMS, ID_HMAC_SHA256, MasterKey

FORMAT = "kura-repository"
VERSION = 2
VERSIONS = (1, 2)
CONFIG = "config"
MIN_CHUNK = 64 << 10
MAX_CHUNK = 64 << 20
# For new repositories only: an existing one keeps the chunk_size in its config.
# 1 MiB: an incremental reads and stores whole chunks, so scattered small guest
# writes cost 4x less than with 4 MiB, and clones dedup at a finer grain; full
# backups and restores cost about the same (docs/design.md, "Chunk size").
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class RepoConfig:
    id: str
    created: str
    chunk_size: int
    compression_level: int
    encryption: str
    key: dict[str, Any]
    mac: str = ""
    id_algorithm: str = ID_HMAC_SHA256

    @property
    def version(self) -> int:
        """1 for HMAC-SHA256 ids (the format before ``chunk_id``), else 2."""
        return 1 if self.id_algorithm == ID_HMAC_SHA256 else 2

    def _authenticated(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT, "version": self.version, "id": self.id, "created": self.created,
            "chunk_size": self.chunk_size,
            "compression": {"algorithm": "zstd", "level": self.compression_level},
            "encryption": self.encryption}
        if self.version >= 2:
            doc["chunk_id"] = self.id_algorithm
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, master: MasterKey) -> RepoConfig:
        return replace(self, mac=master.mac(self._authenticated()).hex())

    def with_key(self, key: dict[str, Any]) -> RepoConfig:
        """The same settings with another wrapped key (the MAC does not cover it)."""
        return replace(self, key=key)

    def check_mac(self, master: MasterKey, where: str) -> None:
        if not hmac.compare_digest(master.mac(self._authenticated()).hex(), self.mac):
            raise IntegrityError(
                f"{where}: repository config fails its authentication check (settings were "
                "changed or damaged)", hint="restore config from a copy, or re-import the key "
                "file if only the key was damaged")

    def to_json(self) -> bytes:
        doc = json.loads(self._authenticated())
        doc["key"] = self.key
        doc["mac"] = self.mac
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> RepoConfig:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise IntegrityError(f"{where}: repository config is not valid JSON (damaged?)",
                                 hint="restore it from a copy") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RepositoryNotFound(f"{where} is not a kura repository config")
        version = doc.get("version")
        if version not in VERSIONS:
            raise UnsupportedFormat(
                f"{where}: repository format version {version!r} is not supported (this kura "
                f"reads versions {VERSIONS[0]} to {VERSIONS[-1]})",
                hint="written by a newer kura? upgrade kura")
        try:
            comp = doc["compression"]
            if comp.get("algorithm") != "zstd":
                raise UnsupportedFormat(f"{where}: unknown compression {comp.get('algorithm')!r}")
            cfg = cls(id=str(doc["id"]), created=str(doc["created"]),
                      chunk_size=int(doc["chunk_size"]), compression_level=int(comp["level"]),
                      encryption=str(doc["encryption"]), key=dict(doc["key"]),
                      mac=str(doc.get("mac", "")),
                      id_algorithm=str(doc["chunk_id"]) if version >= 2 else ID_HMAC_SHA256)
            datetime.fromisoformat(cfg.created)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError(f"{where}: repository config is damaged (missing or invalid "
                                 "fields)", hint="restore it from a copy") from None
        if cfg.id_algorithm not in ID_ALGORITHMS or cfg.version != version:
            raise UnsupportedFormat(f"{where}: unknown chunk id algorithm {cfg.id_algorithm!r} "
                                    f"for format version {version}",
                                    hint="written by a newer kura? upgrade kura")
        if cfg.encryption not in ENCRYPTIONS:
            raise UnsupportedFormat(f"{where}: unknown encryption {cfg.encryption!r}",
                                    hint="written by a newer kura? upgrade kura")
        if not MIN_CHUNK <= cfg.chunk_size <= MAX_CHUNK:
            raise IntegrityError(f"{where}: implausible chunk size {cfg.chunk_size}")
        return cfg


def read_config(backend: Backend) -> RepoConfig:
    where = f"{backend.location}/{CONFIG}"
    try:
        data = backend.read(CONFIG)
    except ObjectNotFound:
        raise RepositoryNotFound(
            f"no kura repository at {backend.location}",
            hint="check --repo / KURA_REPO, or create one with 'kura repo init'") from None
    return RepoConfig.from_json(data, where)
