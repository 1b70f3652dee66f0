"""The kura repository: deduplicated, compressed, encrypted restore points.

The format and the rules every layer relies on (write ordering, GC safety) are
in docs/design.md; each module's docstring details its own part:

- ``backend``  storage interface and the local directory backend;
- ``crypto``   master key, passphrase wrapping, chunk ids;
- ``blob``     sealed (compressed + encrypted/MACed) objects;
- ``config``   the repository's plain ``config`` file;
- ``index``, ``manifest``  disk indexes and restore point manifests;
- ``store``    where each object lives and how it is sealed;
- ``locks``    writer registrations, source locks, heartbeats;
- ``writer``, ``reader``  writing and reading restore points;
- ``verify``, ``prune``, ``gc``  maintenance;
- ``repo``     ``Repository``, the entry point tying them together.
"""

from kura.repository.backend import Backend, LocalBackend, ObjectNotFound, ObjectStat, open_backend
from kura.repository.config import DEFAULT_CHUNK_SIZE
from kura.repository.gc import GcResult
from kura.repository.index import ZERO_CHUNK
from kura.repository.manifest import ConfigEntry, DiskEntry, Manifest, SourceRef
from kura.repository.prune import PruneDecision, PruneResult, RetentionPolicy
from kura.repository.reader import DiskReader
from kura.repository.repo import Repository
from kura.repository.verify import Damage, VerifyReport
from kura.repository.writer import ChunkSink, DiskWriter, SnapshotWriter, StoreSink

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ZERO_CHUNK",
    "Backend",
    "ChunkSink",
    "ConfigEntry",
    "Damage",
    "DiskEntry",
    "DiskReader",
    "DiskWriter",
    "GcResult",
    "LocalBackend",
    "Manifest",
    "ObjectNotFound",
    "ObjectStat",
    "PruneDecision",
    "PruneResult",
    "Repository",
    "RetentionPolicy",
    "SnapshotWriter",
    "SourceRef",
    "StoreSink",
    "VerifyReport",
    "open_backend",
]
