"""The repository ``config`` object: the one plain (unsealed) file.

JSON, written once at ``repo init`` (and when a key file is imported)::

    {"format": "kura-repository", "version": 1, "id": "<32 hex>", "created": ISO 8601,
     "chunk_size": 4194304, "compression": {"algorithm": "zstd", "level": 3},
     "encryption": "aes-256-gcm" | "none", "key": {wrapped master key, see crypto},
     "mac": "<hex HMAC-SHA256 under the mac key of every other member but key and mac>"}

Once the key is unwrapped the ``mac`` is checked, so a changed chunk size,
compression or encryption setting is detected. ``version`` greater than this
kura understands raises ``UnsupportedFormat`` before anything else is read.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from kura.errors import IntegrityError, RepositoryNotFound, UnsupportedFormat
from kura.repository.backend import Backend, ObjectNotFound
from kura.repository.crypto import ENCRYPTIONS, MasterKey

FORMAT = "kura-repository"
VERSION = 1
CONFIG = "config"
MIN_CHUNK = 64 << 10
MAX_CHUNK = 64 << 20


@dataclass(frozen=True)
class RepoConfig:
    id: str
    created: str
    chunk_size: int
    compression_level: int
    encryption: str
    key: dict[str, Any]
    mac: str = ""

    def _authenticated(self) -> bytes:
        doc = {"format": FORMAT, "version": VERSION, "id": self.id, "created": self.created,
               "chunk_size": self.chunk_size,
               "compression": {"algorithm": "zstd", "level": self.compression_level},
               "encryption": self.encryption}
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, master: MasterKey) -> RepoConfig:
        return RepoConfig(self.id, self.created, self.chunk_size, self.compression_level,
                          self.encryption, self.key, master.mac(self._authenticated()).hex())

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
        if version != VERSION:
            raise UnsupportedFormat(
                f"{where}: repository format version {version!r} is not supported (this kura "
                f"reads version {VERSION})", hint="written by a newer kura? upgrade kura")
        try:
            comp = doc["compression"]
            if comp.get("algorithm") != "zstd":
                raise UnsupportedFormat(f"{where}: unknown compression {comp.get('algorithm')!r}")
            cfg = cls(id=str(doc["id"]), created=str(doc["created"]),
                      chunk_size=int(doc["chunk_size"]), compression_level=int(comp["level"]),
                      encryption=str(doc["encryption"]), key=dict(doc["key"]),
                      mac=str(doc.get("mac", "")))
            datetime.fromisoformat(cfg.created)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise IntegrityError(f"{where}: repository config is damaged (missing or invalid "
                                 "fields)", hint="restore it from a copy") from None
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
