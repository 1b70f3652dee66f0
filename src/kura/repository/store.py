"""The keyed object store under a repository: chunks, indexes, manifests, notes.

``RepoStore`` joins a backend with the unwrapped master key and knows where
each kind of object lives and how it is sealed:

- ``chunks/<2 hex>/<64 hex>``: chunk blobs bound to their chunk id. Opening a
  chunk checks the blob, decompresses it and re-hashes the plaintext against
  the id, so a chunk can never return data other than what was backed up.
- ``indexes/<snapshot id>/<disk>.idx``: index blobs bound to their name; the
  manifest pins each index's SHA-256, checked on every read.
- ``snapshots/<snapshot id>.manifest``: manifest blobs (the commit point).
- ``notes/<snapshot id>.json``: small sealed JSON with mutable facts
  (``protected``, ``verify_state``, ``verified_at``).

Every higher module (writer, reader, verify, prune, gc, Repository) works
through this class; none of them touches keys or object names directly.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from dataclasses import replace
from typing import Any

from kura.errors import IntegrityError, SnapshotNotFound
from kura.repository import blob
from kura.repository.backend import Backend, ObjectNotFound
from kura.repository.config import RepoConfig
from kura.repository.crypto import MasterKey
from kura.repository.index import ZERO_CHUNK, DiskIndex
from kura.repository.manifest import DiskEntry, Manifest

log = logging.getLogger(__name__)

CHUNKS_DIR = "chunks"
INDEXES_DIR = "indexes"
SNAPSHOTS_DIR = "snapshots"
NOTES_DIR = "notes"
MANIFEST_SUFFIX = ".manifest"
MAX_META = 256 << 20


class ChunkMissing(IntegrityError):
    """A chunk named by an index or manifest is not in the repository."""


def chunk_name(chunk_id: bytes) -> str:
    h = chunk_id.hex()
    return f"{CHUNKS_DIR}/{h[:2]}/{h}"


def chunk_dirs() -> list[str]:
    """Every folder a chunk can be in (the first byte of its id names it)."""
    return [f"{CHUNKS_DIR}/{i:02x}" for i in range(256)]


def manifest_name(snapshot_id: str) -> str:
    return f"{SNAPSHOTS_DIR}/{snapshot_id}{MANIFEST_SUFFIX}"


def notes_name(snapshot_id: str) -> str:
    return f"{NOTES_DIR}/{snapshot_id}.json"


def index_name(snapshot_id: str, disk: str) -> str:
    return f"{INDEXES_DIR}/{snapshot_id}/{disk}.idx"


class RepoStore:
    """Backend + keys + settings of one opened repository."""

    def __init__(self, backend: Backend, config: RepoConfig, master: MasterKey) -> None:
        self.backend = backend
        self.config = config
        # The config says how chunk ids are computed (its MAC, checked by whoever
        # opened it, covers that setting).
        self.master = master.with_id_algorithm(config.id_algorithm)
        self.id = config.id
        self.chunk_size = config.chunk_size
        self.compression_level = config.compression_level
        self.encrypted = config.encryption != "none"
        self._manifests: dict[str, Manifest] = {}
        self._cache_lock = threading.Lock()

    @property
    def location(self) -> str:
        return self.backend.location

    # -- chunks ------------------------------------------------------------

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return self.master.chunk_id(data)

    def seal_chunk(self, chunk_id: bytes, data: bytes | memoryview) -> bytes | bytearray:
        return blob.seal(self.master, chunk_id, data, encrypt=self.encrypted,
                         level=self.compression_level)

    def open_chunk(self, chunk_id: bytes, data: bytes, *, expected_len: int | None = None) -> bytes:
        """Plaintext of a chunk blob, checked against its id (``IntegrityError`` if not)."""
        what = f"chunk {chunk_id.hex()}"
        plain = blob.open_blob(self.master, chunk_id, data, encrypted=self.encrypted, what=what,
                               max_size=self.chunk_size)
        if not hmac.compare_digest(self.chunk_id(plain), chunk_id):
            raise IntegrityError(f"{what}: content does not match its id")
        if expected_len is not None and len(plain) != expected_len:
            raise IntegrityError(f"{what}: {len(plain)} bytes, expected {expected_len}")
        return plain

    def read_chunk(self, chunk_id: bytes, *, expected_len: int | None = None) -> bytes:
        try:
            data = self.backend.read(chunk_name(chunk_id))
        except ObjectNotFound:
            raise ChunkMissing(f"chunk {chunk_id.hex()} is missing") from None
        return self.open_chunk(chunk_id, data, expected_len=expected_len)

    def has_chunk(self, chunk_id: bytes) -> bool:
        """True if the chunk is stored; touches it (marks it in use for GC)."""
        return self.backend.touch(chunk_name(chunk_id))

    def store_chunk_blob(self, chunk_id: bytes, data: bytes | bytearray) -> None:
        if chunk_id == ZERO_CHUNK:
            return
        self.backend.write(chunk_name(chunk_id), data, sync_dir=False)

    # -- sealed metadata -----------------------------------------------------

    def write_object(self, name: str, data: bytes) -> bytes:
        """Seal and store a metadata object; returns the blob (for its hash)."""
        sealed = bytes(blob.seal(self.master, name.encode(), data, encrypt=self.encrypted,
                                 level=self.compression_level))
        self.backend.write(name, sealed)
        return sealed

    def open_object(self, name: str, data: bytes) -> bytes:
        return blob.open_blob(self.master, name.encode(), data, encrypted=self.encrypted,
                              what=f"{self.location}/{name}", max_size=MAX_META)

    def read_object(self, name: str) -> bytes:
        return self.open_object(name, self.backend.read(name))

    # -- indexes ---------------------------------------------------------------

    def write_index(self, snapshot_id: str, disk: str, index: DiskIndex) -> tuple[str, str]:
        name = index_name(snapshot_id, disk)
        sealed = self.write_object(name, index.encode())
        return name, hashlib.sha256(sealed).hexdigest()

    def read_index(self, manifest: Manifest, disk: DiskEntry) -> DiskIndex:
        what = f"index of disk {disk.name} of restore point {manifest.id} ({disk.index})"
        try:
            data = self.backend.read(disk.index)
        except ObjectNotFound:
            raise IntegrityError(f"{what} is missing") from None
        if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), disk.index_sha256):
            raise IntegrityError(f"{what} does not match the hash in its manifest "
                                 "(damaged or replaced)")
        index = DiskIndex.decode(self.open_object(disk.index, data), what)
        if index.size != disk.size or index.chunk_size != disk.chunk_size:
            raise IntegrityError(f"{what}: size/chunk size disagree with the manifest")
        return index

    # -- manifests and notes -----------------------------------------------------

    def list_snapshot_ids(self) -> list[str]:
        out = []
        for name in self.backend.list(SNAPSHOTS_DIR):
            base = name.rsplit("/", 1)[-1]
            if base.endswith(MANIFEST_SUFFIX):
                out.append(base[: -len(MANIFEST_SUFFIX)])
        return sorted(out)

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_object(manifest_name(manifest.id), manifest.to_json())

    def load_manifest(self, snapshot_id: str, *, with_notes: bool = True) -> Manifest:
        with self._cache_lock:
            cached = self._manifests.get(snapshot_id)
        if cached is None:
            name = manifest_name(snapshot_id)
            try:
                data = self.backend.read(name)
            except ObjectNotFound:
                raise SnapshotNotFound(
                    f"restore point {snapshot_id} does not exist in {self.location}") from None
            what = f"manifest of restore point {snapshot_id} ({self.location}/{name})"
            try:
                plain = self.open_object(name, data)
            except IntegrityError as exc:
                raise IntegrityError(f"{what}: {exc.message}") from None
            cached = Manifest.from_json(plain, what)
            if cached.id != snapshot_id or cached.repository != self.id:
                raise IntegrityError(f"{what}: belongs to another restore point or repository")
            with self._cache_lock:
                self._manifests[snapshot_id] = cached
        if not with_notes:
            return cached
        notes = self.read_notes(snapshot_id)
        return replace(cached, protected=bool(notes.get("protected", False)),
                       verify_state=notes.get("verify_state"))

    def forget_cached(self, snapshot_id: str) -> None:
        with self._cache_lock:
            self._manifests.pop(snapshot_id, None)

    def read_notes(self, snapshot_id: str) -> dict[str, Any]:
        name = notes_name(snapshot_id)
        try:
            doc = json.loads(self.read_object(name))
        except ObjectNotFound:
            return {}
        except (IntegrityError, ValueError) as exc:
            # Fail safe: a restore point whose notes cannot be read counts as protected.
            log.warning("notes of restore point %s are damaged (%s); treating it as protected",
                        snapshot_id, exc)
            return {"protected": True, "verify_state": "unknown", "damaged": True}
        return doc if isinstance(doc, dict) else {}

    def update_notes(self, snapshot_id: str, **changes: Any) -> None:
        notes = self.read_notes(snapshot_id)
        notes.pop("damaged", None)
        notes.update(changes)
        self.write_object(notes_name(snapshot_id), json.dumps(notes, sort_keys=True).encode())
