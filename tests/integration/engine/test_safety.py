"""Guest agent absent or hung, kura killed: the guest is never left frozen, and
nothing (restore point, checkpoint, backup job, scratch file) is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import libvirt
import pytest

from kura.engine.backup import BackupOptions, backup_vm, backup_vms
from kura.engine.testing import node_of
from kura.errors import GuestAgentError, LockedError
from kura.hypervisor.guard import Guard
from kura.hypervisor.guestagent import Quiescer
from kura.hypervisor.view import DEFAULT_SCRATCH_ROOT
from kura.lab import Lab, LabVM
from kura.repository import Repository

pytestmark = pytest.mark.lab


def test_agent_absent_prefer_falls_back_require_fails_that_vm_only(
        lab: Lab, lab_vm, repo: Repository) -> None:
    no_agent = lab_vm(node="node-a", storage="shared", agent=False)
    with_agent = lab_vm(node="node-a", storage="shared")
    with node_of(lab, no_agent) as hv:
        r = backup_vm(hv, repo, no_agent.name, BackupOptions(consistency="prefer"))
        assert r.ok and r.consistency == "crash"
        assert any("guest agent" in line and "crash-consistent" in line for line in r.log)
        m = repo.get_snapshot(r.restore_point)
        assert m.consistency == "crash" and "guest agent" in m.meta["consistency_note"]

        results = backup_vms(hv, repo, [no_agent.name, with_agent.name],
                             BackupOptions(consistency="require"))
    assert not results[0].ok and "guest agent" in (results[0].error or "")
    assert results[1].ok and results[1].consistency == "application"
    assert len(repo.list_snapshots(no_agent.uuid)) == 1  # the failed run left nothing


def test_hung_agent_prefer_falls_back_require_fails(lab: Lab, lab_vm,
                                                    repo: Repository) -> None:
    vm = lab_vm(node="node-a", storage="shared")
    # Stop qemu-ga inside the guest (asynchronously, so this call still gets its answer).
    vm.agent_command("guest-exec", {"path": "/bin/sh",
                                    "arg": ["-c", "sleep 1; kill -STOP $(pidof qemu-ga)"]})
    time.sleep(2.5)
    opts = {"agent_timeout": 3}
    with node_of(lab, vm) as hv:
        t0 = time.monotonic()
        r = backup_vm(hv, repo, vm.name, BackupOptions(consistency="prefer", **opts))
        assert r.ok and r.consistency == "crash"
        assert time.monotonic() - t0 < 30
        with pytest.raises(GuestAgentError):
            backup_vm(hv, repo, vm.name, BackupOptions(consistency="require", **opts))
    assert len(repo.list_snapshots(vm.uuid)) == 1


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from kura.engine.backup import BackupOptions, backup_vm
    from kura.hypervisor.connection import open_connection
    from kura.repository import Repository
    uri, repo_path, vm, when = sys.argv[1:5]
    def listener(e):
        if when == "data" and e.kind == "progress" and e.data["done"] > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if when == "frozen" and e.kind == "phase-start" and e.phase == "view":
            os.kill(os.getpid(), signal.SIGKILL)
    with open_connection(uri) as hv:
        backup_vm(hv, Repository.open(repo_path), vm, BackupOptions(), [listener])
    sys.exit(3)
""")


def _kill_backup(lab: Lab, vm: LabVM, repo: Repository, when: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[3] / "src"))
    proc = subprocess.run([sys.executable, "-c", _KILLER, lab.node(vm.node).uri,
                           repo.location, vm.name, when], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr


def _wait_clean(vm: LabVM, keep: set[str]) -> None:
    """The guard thaws and removes the job, checkpoint and scratch files."""
    dom = vm.domain()
    deadline = time.monotonic() + 20
    while True:
        try:
            dom.backupGetXMLDesc(0)
            job = True
        except libvirt.libvirtError:
            job = False
        cps = {c.getName() for c in dom.listAllCheckpoints()}
        scratch = list((DEFAULT_SCRATCH_ROOT / vm.uuid).glob("*"))
        thawed = vm.agent_command("guest-fsfreeze-status") == "thawed"
        if not job and cps == keep and not scratch and thawed:
            return
        assert time.monotonic() < deadline, (job, cps, scratch, thawed)
        time.sleep(0.2)


def test_sigkill_during_data_and_during_freeze_leaves_nothing(lab: Lab, lab_vm,
                                                              repo: Repository) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    with node_of(lab, vm) as hv:
        first = backup_vm(hv, repo, vm.name, BackupOptions())
    base = {f"kura-{first.restore_point}"}

    _kill_backup(lab, vm, repo, "data")
    _wait_clean(vm, base)
    assert [m.id for m in repo.list_snapshots(vm.uuid)] == [first.restore_point]

    _kill_backup(lab, vm, repo, "frozen")
    _wait_clean(vm, base)  # the guard thawed the guest
    _running, seq1 = vm.workload_status()
    time.sleep(1.5)
    assert vm.workload_status()[1] > seq1  # the guest writes again

    with node_of(lab, vm) as hv:
        r = backup_vm(hv, repo, vm.name, BackupOptions())
    assert r.ok and r.kind == "incremental" and r.parent == first.restore_point


def test_guard_thaws_when_the_main_thread_is_stuck(lab: Lab, lab_vm) -> None:
    vm = lab_vm(node="node-a", storage="shared")
    guard = Guard(lab.node(vm.node).uri, vm.uuid)
    try:
        q = Quiescer(vm.domain(), guard, max_frozen=2)
        assert q.freeze() >= 1
        assert vm.agent_command("guest-fsfreeze-status") == "frozen"
        time.sleep(4)  # "stuck": no thaw from this side
        assert vm.agent_command("guest-fsfreeze-status") == "thawed"
    finally:
        guard.done()


def test_paused_vm_is_backed_up_crash_consistent(lab: Lab, lab_vm, repo: Repository) -> None:
    vm = lab_vm(node="node-a", storage="shared")
    with node_of(lab, vm) as hv:
        backup_vm(hv, repo, vm.name, BackupOptions())
        vm.domain().suspend()
        try:
            r = backup_vm(hv, repo, vm.name, BackupOptions())
            assert r.ok and r.state == "paused" and r.kind == "incremental"
            assert r.consistency == "crash" and any("paused" in line for line in r.log)
            with pytest.raises(GuestAgentError):
                backup_vm(hv, repo, vm.name, BackupOptions(consistency="require"))
        finally:
            vm.domain().resume()


def test_second_backup_of_the_same_vm_is_refused_without_harm(lab: Lab, lab_vm,
                                                               repo: Repository) -> None:
    vm = lab_vm(node="node-a", storage="shared")
    errors: list[Exception] = []
    with node_of(lab, vm) as hv:

        def second(event) -> None:  # type: ignore[no-untyped-def]
            if event.kind == "phase-start" and event.phase == "data":
                try:
                    backup_vm(hv, repo, vm.name, BackupOptions())
                except LockedError as exc:
                    errors.append(exc)

        r = backup_vm(hv, repo, vm.name, BackupOptions(), [second])
    assert r.ok and len(errors) == 1 and "another kura backup" in str(errors[0])
    assert len(repo.list_snapshots(vm.uuid)) == 1


def test_interrupt_during_data_cleans_up_in_process(lab: Lab, lab_vm,
                                                    repo: Repository) -> None:
    vm = lab_vm(node="node-a", storage="shared", workload=True)
    with node_of(lab, vm) as hv:
        first = backup_vm(hv, repo, vm.name, BackupOptions())

        def ctrl_c(event) -> None:  # type: ignore[no-untyped-def]
            if event.kind == "progress" and event.data["done"] > 0:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            backup_vm(hv, repo, vm.name, BackupOptions(), [ctrl_c])
        _wait_clean(vm, {f"kura-{first.restore_point}"})
        assert [m.id for m in repo.list_snapshots(vm.uuid)] == [first.restore_point]
        r = backup_vm(hv, repo, vm.name, BackupOptions())
    assert r.ok and r.kind == "incremental" and r.parent == first.restore_point
