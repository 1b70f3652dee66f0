"""The guard's protocol, against a fake domain (the lab tests use real ones)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import libvirt
import pytest

from kura.errors import HypervisorError
from kura.hypervisor import guard as guard_mod
from kura.hypervisor.guard import Guard, _serve


class FakeDomain:
    def __init__(self, job_xml: str) -> None:
        self.calls: list[str] = []
        self.job_xml = job_xml
        self.operation = 9  # VIR_DOMAIN_JOB_OPERATION_BACKUP

    def fsThaw(self, _mounts: object, _flags: int) -> int:
        self.calls.append("thaw")
        return 1

    def backupGetXMLDesc(self, _flags: int) -> str:
        return self.job_xml

    def jobStats(self, _flags: int) -> dict[str, int]:
        return {"operation": self.operation}

    def abortJob(self) -> None:
        self.calls.append("abort")

    def checkpointLookupByName(self, name: str, _flags: int) -> FakeDomain:
        self.calls.append(f"lookup {name}")
        return self

    def delete(self, _flags: int) -> None:
        self.calls.append("delete")


def _run(dom: FakeDomain, lines: list[str], *, close: bool) -> threading.Thread:
    r, w = os.pipe()
    reader = os.fdopen(r, "r")
    thread = threading.Thread(target=_serve, args=(reader, dom), daemon=True)
    thread.start()
    os.write(w, "".join(line + "\n" for line in lines).encode())
    if close:
        os.close(w)
    return thread


def test_parent_death_undoes_everything(tmp_path: Path) -> None:
    scratch = tmp_path / "job"
    scratch.mkdir()
    dom = FakeDomain(f"<domainbackup><server socket='{scratch}/nbd.sock'/></domainbackup>")
    t = _run(dom, ["frozen 30", f"job kura-1 {scratch}"], close=True)
    t.join(5)
    assert not t.is_alive()
    assert dom.calls == ["thaw", "abort", "lookup kura-1", "delete"]
    assert not scratch.exists()


def test_committed_checkpoint_is_kept_and_foreign_jobs_untouched(tmp_path: Path) -> None:
    dom = FakeDomain("<domainbackup><server socket='/elsewhere/nbd.sock'/></domainbackup>")
    t = _run(dom, ["frozen 30", "thawed", f"job kura-1 {tmp_path}/job", "committed"],
             close=True)
    t.join(5)
    assert dom.calls == []


def test_deadline_thaws_a_stuck_parent_and_done_exits_quietly() -> None:
    dom = FakeDomain("")
    t = _run(dom, ["frozen 0.2"], close=False)
    time.sleep(0.6)
    assert dom.calls == ["thaw"]
    assert t.is_alive()  # still watching until the parent says done or dies


def test_checkpoint_is_kept_once_the_commit_has_started(tmp_path: Path) -> None:
    # kura died while the manifest was being written: the restore point may exist.
    scratch = tmp_path / "job"
    scratch.mkdir()
    dom = FakeDomain(f"<domainbackup><server socket='{scratch}/nbd.sock'/></domainbackup>")
    t = _run(dom, ["frozen 30", "thawed", f"job kura-1 {scratch}", "committing"], close=True)
    t.join(5)
    assert dom.calls == ["abort"]  # the job ends, the checkpoint stays
    assert not scratch.exists()


def test_a_guard_started_early_is_waited_for_before_use() -> None:
    conn = libvirt.open("test:///default")  # libvirt's built-in test driver: no daemon
    try:
        uuid = str(conn.listAllDomains(0)[0].UUIDString())
    finally:
        conn.close()
    guard = Guard("test:///default", uuid, wait=False)
    guard.wait_ready()
    guard.wait_ready()  # idempotent
    guard.done()
    lost = Guard("test:///default", "00000000-0000-0000-0000-000000000000", wait=False)
    with pytest.raises(HypervisorError, match="did not start"):
        lost.wait_ready()
    lost.close()


def test_a_migration_that_took_over_the_job_is_not_aborted(tmp_path: Path) -> None:
    # The backup ended (its XML still readable for a moment) and a waiting migration
    # took the domain's job: abortJob would cancel the migration.
    scratch = tmp_path / "job"
    scratch.mkdir()
    dom = FakeDomain(f"<domainbackup><server socket='{scratch}/nbd.sock'/></domainbackup>")
    dom.operation = 5  # VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT
    t = _run(dom, ["thawed", f"job kura-1 {scratch}"], close=True)
    t.join(5)
    assert dom.calls == ["lookup kura-1", "delete"]


def test_a_spare_guard_is_bound_to_the_first_vm_of_its_node() -> None:
    conn = libvirt.open("test:///default")
    try:
        uuid = str(conn.listAllDomains(0)[0].UUIDString())
    finally:
        conn.close()
    guard_mod.prestart("test:///default")
    spare = guard_mod._spares["test:///default"]
    guard_mod.prestart("test:///default")  # one spare per node is enough
    assert guard_mod._spares["test:///default"] is spare
    guard = Guard("test:///default", uuid, wait=False)
    assert guard.pid == spare.pid and "test:///default" not in guard_mod._spares
    guard.wait_ready()
    guard.done()
    guard_mod.prestart("test:///default")
    unused = guard_mod._spares["test:///default"]
    guard_mod.discard_spares()  # the command is over: the spare was not needed
    assert not guard_mod._spares and unused.wait(10) == 0


def test_commands_read_with_the_vm_line_are_not_lost(tmp_path: Path) -> None:
    scratch = tmp_path / "job"
    scratch.mkdir()
    dom = FakeDomain(f"<domainbackup><server socket='{scratch}/nbd.sock'/></domainbackup>")
    r, w = os.pipe()
    os.close(w)
    with os.fdopen(r, "r") as reader:
        _serve(reader, dom, f"frozen 30\njob kura-1 {scratch}\n")
    assert dom.calls == ["thaw", "abort", "lookup kura-1", "delete"]
