"""What the job engine needs from the repository, as a narrow protocol.

The engine applies retention after each run, checks free space in pre-flight
runs and lists restore points for the API. It sees the repository only through
:class:`Storage`, so the engine's tests run without one and the repository can
evolve behind :mod:`kura.server.repo_storage`.
"""

from __future__ import annotations

from typing import Any, Protocol

from kura.server.schemas import Retention, SnapshotOut


class Storage(Protocol):
    location: str

    def free_bytes(self) -> int | None: ...

    def resolve(self, ref: str) -> SnapshotOut: ...

    def snapshots(self, source: str | None = None) -> list[SnapshotOut]: ...

    def prune(self, retention: Retention, *, source: str | None, dry_run: bool) -> dict[str, Any]:
        ...

    def verify(self) -> dict[str, Any]: ...
