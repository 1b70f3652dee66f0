"""Jobs through real agents (fake runner): dispatch, migration, failures, restart."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from kura.agent.enrol import enrol
from kura.agent.loop import Agent
from kura.agent.testing import FAST, AgentThread, FakeCluster, FakeRunner, FakeVm, wait_for
from kura.errors import LockedError
from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import RunningServer, start_server


def _ready(c: ServerClient, vms: int) -> None:
    def seen() -> bool:
        inv = c.inventory()
        return sum(len(n.vms) for cl in inv.clusters for n in cl.nodes) == vms
    wait_for(seen, what=f"{vms} VMs in the inventory")


def _run(c: ServerClient, name: str, timeout: float = 30.0) -> schemas.RunOut:
    run = c.run_job(name)
    wait_for(lambda: c.run(run.id).status != "running", timeout, f"run {run.id}")
    return c.run(run.id)


def test_inventory_tree_and_job_over_two_nodes(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    fake_cluster.add("web1", "node-a", tags=["prod"])
    fake_cluster.add("db1", "node-b", storage="local")
    fake_cluster.add("scratch", "node-b", guest_agent=False)
    start_agent("node-a")
    start_agent("node-b")
    with server.client() as c:
        _ready(c, 3)
        inv = c.inventory()
        (cl,) = inv.clusters
        assert cl.name == "lab"
        assert [n.name for n in cl.nodes] == ["node-a", "node-b"]
        b = cl.nodes[1]
        assert b.status == "online" and b.config_store["path"] == "/etc/libvirt/qemu"
        assert {v.name: v.disks[0].storage for v in b.vms} == {"db1": "local", "scratch": "shared"}
        c.create_job(schemas.JobSpec(name="all", selection=schemas.Selection(all=True)))
        run = _run(c, "all")
        assert run.status == "succeeded", run
        by = {v.vm_name: v for v in run.vms}
        assert by["db1"].node == "node-b" and by["web1"].node == "node-a"
        assert by["scratch"].result["consistency"] == "crash"
        assert "backed up crash-consistent" in by["scratch"].diagnosis
        lines = [ln.message for ln in c.run_log(run.id).lines]
        assert any("web1: [node-a] data done in" in m for m in lines)
        c.create_job(schemas.JobSpec(name="prod", selection=schemas.Selection(tags=["prod"])))
        assert [v.vm_name for v in _run(c, "prod").vms] == ["web1"]


def test_migration_during_backup_is_retried_on_the_new_node(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    vm = fake_cluster.add("web1", "node-a")
    fake_cluster.add("db1", "node-b", fail=LockedError("held by a test"))
    moved = threading.Event()

    def during(node: str, v: FakeVm, phase: str) -> None:
        if v is vm and phase == "data" and not moved.is_set():
            moved.set()
            fake_cluster.migrate("web1", "node-b")
    fake_cluster.on_phase = during
    start_agent("node-a")
    start_agent("node-b")
    with server.client() as c:
        _ready(c, 2)
        c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True),
                                     retry_delay=0.2, retries=1))
        run = _run(c, "j")
        by = {v.vm_name: v for v in run.vms}
        assert by["web1"].state == "succeeded"
        assert by["web1"].nodes_tried == ["node-a", "node-b"]
        assert by["web1"].diagnosis == ("VM migrated from node-a to node-b during backup; "
                                        "retried on node-b")
        # One failing VM fails alone.
        assert by["db1"].state == "failed" and "lock" in by["db1"].diagnosis
        assert run.status == "partial"
        assert vm.backups == ["node-b"]


def test_agent_death_fails_the_vm_with_a_reason_and_the_next_run_succeeds(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    hold = threading.Event()
    vm = fake_cluster.add("web1", "node-a", hold=hold)
    a = start_agent("node-a")
    with server.client() as c:
        _ready(c, 1)
        c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True),
                                     retries=0, node_wait=1))
        run = c.run_job("j")
        wait_for(lambda: c.run(run.id).vms[0].state == "running", what="backup running")
        a.kill()
        wait_for(lambda: c.run(run.id).status != "running", what="run end")
        rv = c.run(run.id).vms[0]
        assert rv.state == "failed"
        assert "lost contact with the agent on node-a" in rv.diagnosis
        hold.set()
        start_agent("node-a")  # enrols again: a new credential, same node
        wait_for(lambda: c.inventory().clusters[0].nodes[0].status == "online", what="online")
        assert _run(c, "j").status == "succeeded"
        assert vm.backups[-1] == "node-a"


def test_unreachable_node_makes_vms_wait_then_fail(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    fake_cluster.add("web1", "node-a")
    a = start_agent("node-a")
    with server.client() as c:
        _ready(c, 1)
        a.kill()
        wait_for(lambda: c.inventory().clusters[0].nodes[0].status == "unreachable",
                 what="node unreachable")
        node = c.inventory().clusters[0].nodes[0]
        assert [v.reachable for v in node.vms] == [False]  # shown, not lost
        c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(names=["web1"]),
                                     node_wait=1))
        run = _run(c, "j")
        assert run.status == "failed"
        assert "node node-a is unreachable" in run.vms[0].diagnosis


def test_preflight_gives_a_verdict_per_vm(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    fake_cluster.add("web1", "node-a")
    fake_cluster.add("old", "node-a", guest_agent=False)
    start_agent("node-a")
    with server.client() as c:
        _ready(c, 2)
        c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(
            names=["web1", "old", "ghost"])))
        run = c.run_job("j", test=True)
        wait_for(lambda: c.run(run.id).status != "running", what="test run")
        by = {v.vm_name: v for v in c.run(run.id).vms}
        assert by["web1"].state == "succeeded"
        assert "next backup will be full" in str(by["web1"].result["checks"])
        assert by["old"].state == "succeeded" and "crash-consistent" in by["old"].diagnosis
        assert by["ghost"].state == "failed" and "no VM named 'ghost'" in by["ghost"].diagnosis
        assert fake_cluster.vm("web1").backups == []


def test_server_restart_fails_the_running_run_and_the_schedule_retries(
        tmp_path: Path, fake_cluster: FakeCluster) -> None:


    hold = threading.Event()
    fake_cluster.add("web1", "node-a", hold=hold)
    srv = start_server(tmp_path / "s", dead_after=2.0)
    creds = enrol(srv.url, srv.token("agent", cluster="lab"), node="node-a")
    agent = AgentThread(Agent(creds.client(), FakeRunner(fake_cluster, "node-a"), FAST))
    try:
        with srv.client() as c:
            _ready(c, 1)
            c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True),
                                         schedule="* * * * * */2"))
            wait_for(lambda: c.runs("j") and c.run(c.runs("j")[0].id).vms[0].state == "running",
                     what="scheduled run running")
            first = c.runs("j")[0].id
            admin = srv.token("admin")
        srv.stop()  # the run is in progress
        srv = start_server(tmp_path / "s", port=srv.port, dead_after=2.0)
        with srv.client(admin) as c:
            r = c.run(first)
            assert r.status == "failed"
            assert r.reason == "server restarted while the run was in progress"
            assert "server restarted" in r.vms[0].diagnosis
            hold.set()
            wait_for(lambda: any(x.status == "succeeded" for x in c.runs("j")), timeout=30,
                     what="the schedule's next run")
            assert any(ln.message.startswith("run failed: server restarted")
                       for ln in c.run_log(first).lines)
    finally:
        agent.kill()
        srv.stop()


def test_concurrency_limits_per_node_and_total(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    for i in range(3):
        fake_cluster.add(f"a{i}", "node-a")
        fake_cluster.add(f"b{i}", "node-b")
    fake_cluster.phase_seconds = 0.05
    active: dict[str, int] = {}
    peak = {"node-a": 0, "node-b": 0, "total": 0}
    lock = threading.Lock()

    def track(node: str, vm: FakeVm, phase: str) -> None:
        with lock:
            if phase == "accepted":
                active[vm.name] = 1
            elif phase == "finish":
                active.pop(vm.name, None)
            per = sum(1 for n in active if fake_cluster.vm(n).node == node)
            peak[node] = max(peak[node], per)
            peak["total"] = max(peak["total"], len(active))
    fake_cluster.on_phase = track
    start_agent("node-a")
    start_agent("node-b")
    with server.client() as c:
        _ready(c, 6)
        c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True),
                                     max_per_node=1, max_total=2))
        assert _run(c, "j").status == "succeeded"
    assert peak["node-a"] == 1 and peak["node-b"] == 1 and peak["total"] <= 2


def test_a_client_can_wait_for_a_run_to_end_instead_of_polling(
        server: RunningServer, fake_cluster: FakeCluster,
        start_agent: Callable[[str], AgentThread]) -> None:
    import time

    fake_cluster.add("web1", "node-a")
    fake_cluster.phase_seconds = 0.3  # a backup of ~2 s
    start_agent("node-a")
    with server.client() as c:
        _ready(c, 1)
        c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True)))
        run = c.run_job("j")
        t0 = time.monotonic()
        assert c.run(run.id, wait=0.5).status == "running"  # the wait ran out first
        assert time.monotonic() - t0 >= 0.5
        done = c.run(run.id, wait=30)
        waited = time.monotonic() - t0
        assert done.status == "succeeded" and waited < 10  # answered at the end
        t0 = time.monotonic()
        assert c.run(run.id, wait=30).status == "succeeded"  # ended: at once
        assert time.monotonic() - t0 < 1
