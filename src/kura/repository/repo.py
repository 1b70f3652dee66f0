"""``Repository``: the one entry point to a kura repository.

Creating and opening (``init``/``open``: config, key unwrapping, config MAC),
finding restore points (``list_snapshots``, ``get_snapshot``, ``latest``),
writing them (``begin_snapshot`` → ``SnapshotWriter``), reading them
(``open_disk``, ``restore_disk``, ``read_config``), and maintenance (``verify``,
``prune``, ``protect``, ``gc``, key export/import). The work itself lives in
the modules named after it; this class wires them to one opened store.

Restore point references (``get_snapshot``): an exact id; ``NAME`` (a source
name or key: its latest restore point); ``NAME@ID`` (an id or unique id
prefix among that source's restore points); or a unique id prefix.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kura.errors import (
    IntegrityError,
    RepositoryError,
    RepositoryExists,
    SnapshotNotFound,
    UnsupportedFormat,
    UsageError,
)
from kura.repository import gc as gc_mod
from kura.repository import prune as prune_mod
from kura.repository import verify as verify_mod
from kura.repository.backend import TMP_DIR, Backend, LocalBackend, ObjectNotFound, open_backend
from kura.repository.config import (
    CONFIG,
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK,
    MIN_CHUNK,
    RepoConfig,
    read_config,
)
from kura.repository.crypto import (
    DEFAULT_ID_ALGORITHM,
    DEFAULT_SCRYPT_N,
    ENCRYPTIONS,
    ID_ALGORITHMS,
    MasterKey,
    key_needs_passphrase,
    unwrap_key,
    wrap_key,
)
from kura.repository.index import DiskIndex
from kura.repository.manifest import DiskEntry, Manifest, SourceRef, is_snapshot_id
from kura.repository.reader import DiskReader
from kura.repository.reader import restore_disk as _restore_disk
from kura.repository.store import CHUNKS_DIR, RepoStore, chunk_dirs, manifest_name
from kura.repository.writer import ChunkSink, SnapshotWriter

log = logging.getLogger(__name__)

KEYFILE_FORMAT = "kura-keyfile"
ProgressFn = Callable[[int], None]


def _workers(n: int | None) -> int:
    # Twice the CPUs: hashing, zstd and AES release the GIL, and a worker waiting in
    # fsync or a read leaves its core to another one.
    return n if n and n > 0 else 2 * (os.cpu_count() or 2)


class Repository:
    """An opened repository (see module docstring)."""

    def __init__(self, store: RepoStore) -> None:
        self.store = store
        self.damaged: dict[str, str] = {}

    # -- create / open -------------------------------------------------------

    @classmethod
    def init(cls, location: str | os.PathLike[str] | Backend, *, passphrase: bytes | None,
             encryption: str = "aes-256-gcm", chunk_size: int = DEFAULT_CHUNK_SIZE,
             compression_level: int = 3, scrypt_n: int = DEFAULT_SCRYPT_N,
             id_algorithm: str = DEFAULT_ID_ALGORITHM) -> Repository:
        """Create a repository; the passphrase is needed unless ``encryption='none'``.

        ``id_algorithm="hmac-sha256"`` makes a repository of format version 1 (the
        chunk ids before keyed BLAKE3), which older kura releases can open.
        """
        if id_algorithm not in ID_ALGORITHMS:
            raise UsageError(f"unknown chunk id algorithm {id_algorithm!r}",
                             hint=f"choose one of {', '.join(ID_ALGORITHMS)}")
        if encryption not in ENCRYPTIONS:
            raise UsageError(f"unknown encryption {encryption!r}",
                             hint=f"choose one of {', '.join(ENCRYPTIONS)}")
        if encryption != "none" and not passphrase:
            raise UsageError("an encrypted repository needs a passphrase",
                             hint="set KURA_PASSPHRASE, or use --encryption none")
        if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise UsageError(f"chunk size {chunk_size} must be a power of two between "
                             f"{MIN_CHUNK} and {MAX_CHUNK}")
        if not 0 <= compression_level <= 22:
            raise UsageError(f"zstd compression level {compression_level} is out of 0..22")
        backend = open_backend(location)
        if backend.exists(CONFIG):
            raise RepositoryExists(f"a repository already exists at {backend.location}",
                                   hint="use it, or choose another --repo")
        if isinstance(backend, LocalBackend) and backend.root.is_dir() and any(
                backend.root.iterdir()):
            raise UsageError(f"{backend.location} is not empty and is not a kura repository",
                             hint="choose an empty or new directory")
        master = MasterKey.generate()
        repo_id = uuid.uuid4().hex
        key = wrap_key(master, repo_id, passphrase if encryption != "none" else None,
                       scrypt_n=scrypt_n)
        config = RepoConfig(id=repo_id, created=datetime.now(UTC).isoformat(),
                            chunk_size=chunk_size, compression_level=compression_level,
                            encryption=encryption, key=key,
                            id_algorithm=id_algorithm).signed(master)
        if not backend.create(CONFIG, config.to_json()):
            raise RepositoryExists(f"a repository already exists at {backend.location}")
        if isinstance(backend, LocalBackend):  # after the config: valid even if this fails
            backend.make_dirs([TMP_DIR, *chunk_dirs()])
        return cls(RepoStore(backend, config, master))

    @staticmethod
    def needs_passphrase(location: str | os.PathLike[str] | Backend) -> bool:
        """True if opening the repository at ``location`` needs a passphrase."""
        return key_needs_passphrase(read_config(open_backend(location)).key)

    @classmethod
    def open(cls, location: str | os.PathLike[str] | Backend, *,
             passphrase: bytes | None = None) -> Repository:
        backend = open_backend(location)
        config = read_config(backend)
        where = f"{backend.location}/{CONFIG}"
        master = unwrap_key(config.key, config.id, passphrase, where)
        config.check_mac(master, where)
        return cls(RepoStore(backend, config, master))

    # -- properties --------------------------------------------------------------

    @property
    def id(self) -> str:
        return self.store.id

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def chunk_size(self) -> int:
        return self.store.chunk_size

    @property
    def encrypted(self) -> bool:
        return self.store.encrypted

    @property
    def encryption(self) -> str:
        return self.store.config.encryption

    def info(self) -> dict[str, Any]:
        """Settings and usage: counts and bytes of chunks and restore points."""
        chunks = stored = 0
        for name in self.store.backend.list(CHUNKS_DIR):
            try:
                stored += self.store.backend.stat(name).size
                chunks += 1
            except ObjectNotFound:
                continue
        snaps = self.list_snapshots()
        return {
            "location": self.location, "id": self.id, "format_version": self.store.config.version,
            "chunk_id": self.store.config.id_algorithm,
            "created": self.store.config.created, "encryption": self.encryption,
            "chunk_size": self.chunk_size,
            "compression": f"zstd-{self.store.compression_level}",
            "snapshots": len(snaps), "sources": len({m.source.key for m in snaps}),
            "damaged_snapshots": sorted(self.damaged),
            "logical_bytes": sum(m.size for m in snaps),
            "chunks": chunks, "stored_bytes": stored,
        }

    # -- finding restore points -------------------------------------------------

    def list_snapshots(self, source: str | None = None, *,
                       with_notes: bool = True) -> list[Manifest]:
        """Restore points (of one source: key or name), oldest first.

        Damaged manifests are skipped with a warning and listed in ``self.damaged``.
        ``with_notes=False`` leaves out what the notes say (protection, verify
        state): one read per restore point instead of two.
        """
        out = []
        self.damaged = {}
        for sid in self.store.list_snapshot_ids():
            try:
                m = self.store.load_manifest(sid, with_notes=with_notes)
            except SnapshotNotFound:
                continue  # removed meanwhile
            except (IntegrityError, UnsupportedFormat) as exc:
                log.warning("skipping restore point %s: %s", sid, exc)
                self.damaged[sid] = exc.message
                continue
            if source is None or source in (m.source.key, m.source.name):
                out.append(m)
        out.sort(key=lambda m: (m.created, m.sequence, m.id))
        return out

    def latest(self, source_key: str) -> Manifest | None:
        """The newest restore point of a source (with its notes), or None.

        Every backup asks this (its parent); the notes of the older restore points
        are not read (through a server, each read is a request)."""
        snaps = [m for m in self.list_snapshots(source_key, with_notes=False)
                 if m.source.key == source_key]
        if not snaps:
            return None
        try:
            return self.store.load_manifest(snaps[-1].id)
        except SnapshotNotFound:  # pruned meanwhile: look again
            return self.latest(source_key)

    def get_snapshot(self, ref: str | Manifest) -> Manifest:
        if isinstance(ref, Manifest):
            return ref
        ref = ref.strip()
        if not ref:
            raise UsageError("empty restore point reference")
        if "@" in ref:
            name, _, prefix = ref.rpartition("@")
            candidates = self.list_snapshots(name)
            if not candidates:
                raise SnapshotNotFound(f"no restore points of {name!r} in {self.location}",
                                       hint="'kura snapshots' lists them")
            return self._pick(ref, [m for m in candidates if m.id.startswith(prefix)])
        if is_snapshot_id(ref):
            try:
                return self.store.load_manifest(ref)
            except SnapshotNotFound:
                pass
        by_source = self.list_snapshots(ref)
        if by_source:
            return by_source[-1]
        ids = [i for i in self.store.list_snapshot_ids() if i.startswith(ref)]
        if len(ids) == 1:
            return self.store.load_manifest(ids[0])
        if len(ids) > 1:
            raise UsageError(f"restore point reference {ref!r} is ambiguous ({len(ids)} match: "
                             f"{', '.join(ids[:4])}...)", hint="give more of the id")
        raise SnapshotNotFound(f"no restore point or source named {ref!r} in {self.location}",
                               hint="'kura snapshots' lists them")

    def _pick(self, ref: str, matches: list[Manifest]) -> Manifest:
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise SnapshotNotFound(f"no restore point matches {ref!r} in {self.location}",
                                   hint="'kura snapshots' lists them")
        raise UsageError(f"restore point reference {ref!r} is ambiguous ({len(matches)} match: "
                         f"{', '.join(m.id for m in matches[:4])}...)",
                         hint="give more of the id")

    # -- writing ----------------------------------------------------------------

    def begin_snapshot(self, source: SourceRef, *, node: str, parent: Manifest | None = None,
                       kind: str = "full", reason: str = "", writer: str | None = None,
                       sink: ChunkSink | None = None, workers: int | None = None,
                       stale_after: float | None = None,
                       heartbeat: float | None = None) -> SnapshotWriter:
        """Start a restore point: takes the source lock and registers the writer."""
        return SnapshotWriter(self.store, source, node=node, parent=parent, kind=kind,
                              reason=reason, writer=writer, sink=sink,
                              workers=_workers(workers), stale_after=stale_after,
                              heartbeat=heartbeat)

    # -- reading ------------------------------------------------------------------

    def read_index(self, manifest: Manifest | str, disk: DiskEntry | str) -> list[bytes]:
        m = self.get_snapshot(manifest)
        entry = disk if isinstance(disk, DiskEntry) else m.disk(disk)
        return self.store.read_index(m, entry).ids

    def disk_index(self, manifest: Manifest | str, disk: DiskEntry | str) -> DiskIndex:
        m = self.get_snapshot(manifest)
        entry = disk if isinstance(disk, DiskEntry) else m.disk(disk)
        return self.store.read_index(m, entry)

    def open_disk(self, ref: Manifest | str, disk: str) -> DiskReader:
        m = self.get_snapshot(ref)
        return DiskReader(self.store, m, m.disk(disk))

    def restore_disk(self, ref: Manifest | str, disk: str, output: Path, *,
                     progress: ProgressFn | None = None, workers: int | None = None) -> None:
        """Write a disk to ``output`` (raw, sparse), checking every chunk."""
        _restore_disk(self.open_disk(ref, disk), Path(output), workers=_workers(workers),
                      progress=progress)

    def read_config(self, ref: Manifest | str, name: str) -> bytes:
        m = self.get_snapshot(ref)
        entry = m.configs.get(name)
        if entry is None:
            raise UsageError(f"restore point {m.id} has no configuration {name!r} "
                             f"(it has: {', '.join(sorted(m.configs)) or 'none'})")
        parts = []
        for i, cid in enumerate(entry.chunks):
            length = min(self.chunk_size, entry.size - i * self.chunk_size)
            try:
                parts.append(self.store.read_chunk(cid, expected_len=length))
            except IntegrityError as exc:
                raise IntegrityError(f"restore point {m.id}, configuration {name}: "
                                     f"{exc.message}") from None
        return b"".join(parts)

    # -- maintenance ----------------------------------------------------------------

    def verify(self, snapshots: Sequence[str] | None = None, *, workers: int | None = None,
               progress: ProgressFn | None = None,
               on_total: ProgressFn | None = None) -> verify_mod.VerifyReport:
        """Re-read and check restore points (all by default); records verify state."""
        ids = None
        if snapshots is not None:
            ids = []
            for ref in snapshots:
                if is_snapshot_id(ref):
                    if not self.store.backend.exists(manifest_name(ref)):
                        raise SnapshotNotFound(f"restore point {ref} does not exist in "
                                               f"{self.location}")
                    ids.append(ref)  # exact ids are checked even if damaged
                else:
                    ids.append(self.get_snapshot(ref).id)
        return verify_mod.verify(self.store, ids, workers=_workers(workers), progress=progress,
                                 on_total=on_total)

    def prune(self, policy: prune_mod.RetentionPolicy, *, source: str | None = None,
              dry_run: bool) -> prune_mod.PruneResult:
        snaps = self.list_snapshots(source)
        if source is not None and not snaps:
            raise SnapshotNotFound(f"no restore points of {source!r} in {self.location}")
        return prune_mod.prune(self.store, snaps, policy, dry_run=dry_run)

    def protect(self, ref: Manifest | str, protected: bool = True) -> Manifest:
        m = self.get_snapshot(ref)
        self.store.update_notes(m.id, protected=protected)
        return self.store.load_manifest(m.id)

    def forget(self, snapshot_id: str) -> None:
        """Remove one restore point by exact id, even a damaged one (not if protected)."""
        if not is_snapshot_id(snapshot_id):
            raise UsageError(f"{snapshot_id!r} is not a full restore point id")
        if not self.store.backend.exists(manifest_name(snapshot_id)):
            raise SnapshotNotFound(f"restore point {snapshot_id} does not exist")
        if self.store.read_notes(snapshot_id).get("protected"):
            raise UsageError(f"restore point {snapshot_id} is protected",
                             hint=f"'kura repo unprotect {snapshot_id}' first")
        prune_mod.remove_snapshot(self.store, snapshot_id)

    def gc(self, *, grace_seconds: float = gc_mod.DEFAULT_GRACE,
           progress: ProgressFn | None = None, dry_run: bool = False) -> gc_mod.GcResult:
        return gc_mod.gc(self.store, grace_seconds=grace_seconds, dry_run=dry_run,
                         progress=progress)

    # -- keys -----------------------------------------------------------------

    def export_key(self, path: Path) -> None:
        """Write the (wrapped) key to ``path`` (mode 0600); refuses to overwrite."""
        doc = {"format": KEYFILE_FORMAT, "version": 1, "repository": self.id,
               "encryption": self.encryption, "key": self.store.config.key}
        data = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise UsageError(f"{path} already exists; not overwriting it") from None
        except OSError as exc:
            raise RepositoryError(f"cannot write key file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def import_key(cls, location: str | os.PathLike[str] | Backend, path: Path, *,
                   passphrase: bytes | None = None) -> None:
        """Put the key from a key file back into the repository's config.

        The key file must belong to this repository. With ``passphrase`` the key is
        unwrapped and checked against the config before anything is written.
        """
        backend = open_backend(location)
        config = read_config(backend)
        try:
            doc = json.loads(Path(path).read_bytes())
        except OSError as exc:
            raise UsageError(f"cannot read key file {path}: {exc.strerror}") from None
        except ValueError:
            raise IntegrityError(f"{path} is not a kura key file (not JSON)") from None
        if not isinstance(doc, dict) or doc.get("format") != KEYFILE_FORMAT:
            raise IntegrityError(f"{path} is not a kura key file")
        if doc.get("version") != 1:
            raise UnsupportedFormat(f"{path}: key file version {doc.get('version')!r} is not "
                                    "supported", hint="written by a newer kura? upgrade kura")
        if doc.get("repository") != config.id:
            raise RepositoryError(
                f"key file {path} belongs to repository {doc.get('repository')}, not to "
                f"{config.id} at {backend.location}")
        key = doc.get("key")
        if not isinstance(key, dict):
            raise IntegrityError(f"{path}: the key is missing")
        if passphrase is not None or not key_needs_passphrase(key):
            master = unwrap_key(key, config.id, passphrase, str(path))
            config.check_mac(master, f"{backend.location}/{CONFIG}")
        backend.write(CONFIG, config.with_key(key).to_json())

    # -- low-level hooks for remote writers (agent hashes and seals, server stores) ---

    def chunk_id(self, data: bytes | memoryview) -> bytes:
        return self.store.chunk_id(data)

    def seal_chunk(self, chunk_id: bytes, data: bytes | memoryview) -> bytes | bytearray:
        return self.store.seal_chunk(chunk_id, data)

    def open_chunk(self, chunk_id: bytes, blob: bytes) -> bytes:
        return self.store.open_chunk(chunk_id, blob)

    def has_chunk(self, chunk_id: bytes) -> bool:
        return self.store.has_chunk(chunk_id)

    def store_chunk_blob(self, chunk_id: bytes, blob: bytes | bytearray) -> None:
        self.store.store_chunk_blob(chunk_id, blob)

