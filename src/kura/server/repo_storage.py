"""The server's repository, behind the :class:`~kura.server.storage.Storage` protocol.

The server opens one repository (``kura server --repo``; the passphrase comes
from ``KURA_PASSPHRASE`` or ``--passphrase-file``, never from arguments) and
keeps it open. Everything here is a thin translation between the repository's
objects and the API's models; a lock serialises maintenance (prune, verify)
so that two API calls never prune the same source at once.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

from kura.repository import Manifest, Repository, RetentionPolicy
from kura.server.schemas import Retention, SnapshotOut


def snapshot_out(m: Manifest) -> SnapshotOut:
    return SnapshotOut(id=m.id, source=m.source.name, source_key=m.source.key,
                       created=m.created, node=m.node, kind=m.kind, consistency=m.consistency,
                       sequence=m.sequence, parent=m.parent, size=m.size, protected=m.protected)


class RepositoryStorage:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.location = repo.location
        self._lock = threading.Lock()

    def free_bytes(self) -> int | None:
        path = Path(self.location)
        if not path.is_dir():
            return None
        return shutil.disk_usage(path).free

    def resolve(self, ref: str) -> SnapshotOut:
        return snapshot_out(self.repo.get_snapshot(ref))

    def snapshots(self, source: str | None = None) -> list[SnapshotOut]:
        return [snapshot_out(m) for m in self.repo.list_snapshots(source)]

    def prune(self, retention: Retention, *, source: str | None, dry_run: bool) -> dict[str, Any]:
        policy = RetentionPolicy(**retention.model_dump())
        with self._lock:
            res = self.repo.prune(policy, source=source, dry_run=dry_run)
        return {"kept": len(res.kept), "removed": len(res.removed), "dry_run": dry_run,
                "removed_ids": [m.id for m in res.removed]}

    def verify(self) -> dict[str, Any]:
        with self._lock:
            report = self.repo.verify()
        return report.to_dict()
