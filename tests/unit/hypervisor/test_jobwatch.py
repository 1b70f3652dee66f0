"""Reading libvirt's job log: which lines mean "a job waits for this VM's backup"."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from kura.hypervisor.jobwatch import JobRequest, JobWatch, default_admin_uri, parse

# Lines logged by libvirt 9.0 (conf.virdomainjob, debug) on the lab during a backup.
PREFIX = "2026-11-27 13:45:19.030+0000: 20251: debug : virDomainObjBeginJobInternal:318 : "
MIGRATION = PREFIX + (
    "Starting job: API=remoteDispatchDomainMigratePerform3Params job=none agentJob=none "
    "asyncJob=migration out (vm=0x7f1014004ae0 name=shared-2, current job=none "
    "agentJob=none async=backup)")
OURS = PREFIX + (
    "Starting job: API=remoteDispatchDomainBackupBegin job=none agentJob=none "
    "asyncJob=backup (vm=0x7f1014004ae0 name=shared-2, current job=none agentJob=none "
    "async=none)")
NESTED = PREFIX + (
    "Starting job: API=remoteDispatchDomainBackupBegin job=async nested agentJob=none "
    "asyncJob=none (vm=0x7f1014004ae0 name=shared-2, current job=none agentJob=none "
    "async=backup)")
QUERY = PREFIX + (
    "Starting job: API=remoteDispatchDomainGetJobStats job=query agentJob=none "
    "asyncJob=none (vm=0x7f1014004ae0 name=shared-2, current job=none agentJob=none "
    "async=backup)")
WAITING = PREFIX.replace(":318", ":347") + "Waiting for async job (vm=0x7f10 name=shared-2)"
SAVE_IDLE = PREFIX + (
    "Starting job: API=remoteDispatchDomainSave job=none agentJob=none asyncJob=save "
    "(vm=0x7f10 name=web 1, current job=none agentJob=none async=none)")


def test_a_migration_waiting_for_the_backup_is_recognised() -> None:
    req = parse(MIGRATION)
    assert req == JobRequest(vm="shared-2", job="migration out",
                             api="remoteDispatchDomainMigratePerform3Params")
    assert req.migration


def test_the_backups_own_jobs_queries_and_idle_vms_are_not_requests() -> None:
    for line in (OURS, NESTED, QUERY, WAITING, SAVE_IDLE, "", "garbage"):
        assert parse(line) is None, line
    snapshot = MIGRATION.replace("asyncJob=migration out", "asyncJob=snapshot")
    req = parse(snapshot.replace("name=shared-2", "name=web 1"))
    assert req is not None and req.vm == "web 1" and not req.migration


def test_requests_reach_only_the_watchers_of_that_vm(tmp_path: Path) -> None:
    watch = JobWatch(None, tmp_path)  # no admin access: nothing is tailed
    seen: list[str] = []
    with watch.watch("shared-2", lambda r: seen.append(f"a {r.job}")) as active, \
            watch.watch("other", lambda r: seen.append("other")):
        assert active is False
        watch._dispatch(MIGRATION)
        watch._dispatch(QUERY)
    watch._dispatch(MIGRATION)  # nobody watches any more
    assert seen == ["a migration out"]


def test_the_tail_reads_whole_lines_as_they_are_appended(tmp_path: Path) -> None:
    watch = JobWatch(None, tmp_path, poll=0.02)
    got: list[JobRequest] = []
    watch._watchers[0] = ("shared-2", got.append)
    stop = threading.Event()
    t = threading.Thread(target=watch._tail, args=(stop,), daemon=True)
    t.start()
    with open(watch.path, "a") as f:
        f.write(QUERY + "\n" + MIGRATION[:40])
        f.flush()
        time.sleep(0.1)
        assert got == []  # half a line is not a line
        f.write(MIGRATION[40:] + "\n")
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    t.join(5)
    assert [r.job for r in got] == ["migration out"]


def test_only_local_connections_have_an_admin_uri() -> None:
    assert default_admin_uri("qemu+tcp://10.0.0.2/system") is None
    assert default_admin_uri("qemu+ssh://root@h/system") is None


class FakeDaemon:
    def __init__(self, filters: list[str], outputs: list[str]) -> None:
        self.filters, self.outputs = filters, outputs

    def get(self) -> tuple[list[str], list[str]]:
        return list(self.filters), list(self.outputs)


def test_each_process_adds_and_removes_only_its_own_output(tmp_path: Path) -> None:
    watch = JobWatch("libvirtd:///system", tmp_path)
    other = f"1:file:{tmp_path}/libvirt-jobs-{watch.digest}-{os.getppid()}.log"  # alive
    dead = f"1:file:{tmp_path}/libvirt-jobs-{watch.digest}-999999999.log"
    mine = f"1:file:{watch.path}"
    own = ["3:file:/var/log/libvirt/libvirtd.log"]
    daemon = FakeDaemon(["3:remote", "1:*conf.virdomainjob*", "1:*qemu.qemu_domainjob*"],
                        [*own, other, dead])
    filters, outputs = watch._settings(daemon, mine=True)  # type: ignore[arg-type]
    assert outputs == [*own, other, mine]
    assert filters == ["3:remote", "1:conf.virdomainjob", "1:qemu.qemu_domainjob"]
    daemon.outputs = outputs
    filters, outputs = watch._settings(daemon, mine=False)  # type: ignore[arg-type]
    assert outputs == [*own, other] and "1:conf.virdomainjob" in filters  # other still watches
    daemon.outputs = [*own, dead]
    filters, outputs = watch._settings(daemon, mine=False)  # type: ignore[arg-type]
    assert outputs == own and filters == ["3:remote"]  # the last watcher gone: filters too
