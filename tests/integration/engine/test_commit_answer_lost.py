"""A commit whose answer is lost must not cost the next backup its incremental.

Seen on the server's fault test: the network to the server was cut just after
the manifest reached it; the agent saw an error, took the backup as failed and
deleted the new checkpoint, so the next backup found the committed restore
point's checkpoint gone and read the whole VM again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kura.engine.backup import BackupOptions, backup_vm
from kura.engine.testing import node_of
from kura.errors import ServerError
from kura.hypervisor import checkpoints
from kura.lab import Lab
from kura.repository import Repository
from kura.repository.backend import LocalBackend
from kura.repository.testing import FaultyBackend

pytestmark = pytest.mark.lab


class AnswerLost(FaultyBackend):
    """Stores the manifest, then acts as if the network went down before the answer."""

    def __init__(self, root: Path) -> None:
        super().__init__(LocalBackend(root))
        self.cut = False
        self.armed = False

    def _down(self) -> None:
        if self.cut:
            raise ServerError("cannot reach the kura server: Server disconnected "
                              "without sending a response")

    def write(self, name: str, data: bytes | bytearray, *, sync_dir: bool = True) -> None:
        self._down()
        super().write(name, data, sync_dir=sync_dir)
        if self.armed and name.startswith("snapshots/"):
            self.cut = True
            self._down()

    def exists(self, name: str) -> bool:
        self._down()
        return super().exists(name)

    def delete(self, name: str) -> None:
        self._down()
        super().delete(name)


def test_lost_commit_answer_keeps_the_checkpoint(lab: Lab, lab_vm, tmp_path: Path) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    backend = AnswerLost(tmp_path / "repo")
    repo = Repository.init(backend, passphrase=None, encryption="none")
    with node_of(lab, vm) as hv:
        first = backup_vm(hv, repo, vm.name, BackupOptions())
        assert first.kind == "full"
        backend.armed = True
        with pytest.raises(ServerError):
            backup_vm(hv, repo, vm.name, BackupOptions())
        backend.armed = backend.cut = False
        for held in ("locks", "writers"):  # what the server does when the session ends
            for name in list(backend.list(held)):
                backend.delete(name)
        second = repo.latest(vm.uuid)
        assert second is not None and second.parent == first.restore_point  # it did commit
        assert checkpoints.lookup(vm.domain(), f"kura-{second.id}") is not None
        third = backup_vm(hv, repo, vm.name, BackupOptions())
    assert third.kind == "incremental" and third.parent == second.id, third.reason
    names = {c.getName() for c in vm.domain().listAllCheckpoints()}
    assert names == {f"kura-{third.restore_point}"}
