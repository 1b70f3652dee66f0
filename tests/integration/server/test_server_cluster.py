"""The server with two real agents on the two-node lab (real libvirt, real migrations)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

from kura.agent.testing import wait_for
from kura.engine.restore import restore_disk_file
from kura.lab import Lab, LabVM
from kura.repository import Repository
from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import AgentProcess, ServerProcess, TcpProxy

pytestmark = pytest.mark.lab


@dataclass
class Site:
    lab: Lab
    server: ServerProcess
    repo_path: Path
    admin: str
    agents: dict[str, AgentProcess]
    proxies: dict[str, Link]
    tmp: Path

    def client(self) -> ServerClient:
        return self.server.client(self.admin)

    def repo(self) -> Repository:
        return Repository.open(str(self.repo_path))

    def restart_agent(self, node: str) -> None:
        self.agents[node].kill()
        self.agents[node].start()


class Link:
    """A node's network path to the server (API and data port), cuttable."""

    def __init__(self, server: ServerProcess) -> None:
        self.api = TcpProxy(server.port).start()
        self.data = TcpProxy(server.data_port).start()

    def cut(self) -> None:
        self.api.cut()
        self.data.cut()

    def restore(self) -> None:
        self.api.restore()
        self.data.restore()


@pytest.fixture
def site(lab: Lab, tmp_path: Path) -> Iterator[Site]:
    repo_path = tmp_path / "repo"
    Repository.init(str(repo_path), passphrase=None, encryption="none")
    server = ServerProcess(tmp_path / "server", repo_path).start()
    admin = server.token("admin")
    agents, proxies = {}, {}
    for node in lab.nodes:
        proxy = Link(server)  # the agent's network path, cuttable
        token = server.token("agent", cluster="lab")
        agents[node.name] = AgentProcess(f"https://127.0.0.1:{proxy.api.port}", token,
                                         node.name, node.uri, tmp_path / f"agent-{node.name}",
                                         data_port=proxy.data.port).start()
        proxies[node.name] = proxy
    s = Site(lab, server, repo_path, admin, agents, proxies, tmp_path)
    try:
        yield s
    finally:
        for a in agents.values():
            a.stop()
        server.stop()
        for p in proxies.values():
            p.cut()


def _placed(c: ServerClient) -> dict[str, str]:
    return {v.name: n.name for cl in c.inventory().clusters for n in cl.nodes for v in n.vms
            if n.status == "online"}


def _wait_placed(c: ServerClient, vms: dict[str, str], timeout: float = 60) -> None:
    wait_for(lambda: all(_placed(c).get(k) == v for k, v in vms.items()), timeout,
             f"inventory placing {vms}")


def _finished(c: ServerClient, run_id: int, timeout: float = 300) -> schemas.RunOut:
    wait_for(lambda: c.run(run_id).status != "running", timeout, f"run {run_id}")
    return c.run(run_id)


def _vm(run: schemas.RunOut, name: str) -> schemas.RunVmOut:
    return next(v for v in run.vms if v.vm_name == name)


def _log(c: ServerClient, run_id: int) -> str:
    return "\n".join(ln.message for ln in c.run_log(run_id).lines)


def _when_running(c: ServerClient, run_id: int, vm: str, phase: str | None,
                  action: Callable[[], None]) -> threading.Thread:
    """Run ``action`` once ``vm``'s backup reported starting ``phase`` (None: as soon as
    an agent has taken the VM's task)."""
    def watch() -> None:
        end = time.monotonic() + 240
        while time.monotonic() < end:
            r = c.run(run_id)
            v = _vm(r, vm)
            phases = v.result.get("phases", [])
            started = v.state == "running" if phase is None else any(
                p["phase"] == phase and p["status"] == "start" for p in phases)
            if started:
                action()
                return
            if r.status != "running":
                return
            time.sleep(0.1)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_inventory_schedule_and_migrations(site: Site, lab_vm: Callable[..., LabVM]) -> None:
    local = lab_vm("srv-local", node="node-a", storage="local")
    moving = lab_vm("srv-shared-a", node="node-a", storage="shared", workload=True)
    other = lab_vm("srv-shared-b", node="node-b", storage="shared")
    c = site.client()
    _wait_placed(c, {local.name: "node-a", moving.name: "node-a", other.name: "node-b"})
    inv = c.inventory()
    (cl,) = inv.clusters
    assert [n.name for n in cl.nodes] == ["node-a", "node-b"]
    disks = {v.name: v.disks[0].storage for n in cl.nodes for v in n.vms}
    assert disks[local.name] == "local" and disks[moving.name] == "shared"
    assert all(n.config_store.get("path") for n in cl.nodes)

    # A scheduled job backs up every VM of the cluster.
    c.create_job(schemas.JobSpec(name="nightly", schedule="* * * * * */10",
                                 selection=schemas.Selection(clusters=["lab"]),
                                 retention=schemas.Retention(keep_last=5), retry_delay=1))
    wait_for(lambda: any(r.trigger == "schedule" for r in c.runs("nightly")), 60, "schedule")
    first = _finished(c, c.runs("nightly")[-1].id)
    c.delete_job("nightly")  # no more scheduled runs
    assert first.status == "succeeded", _log(c, first.id)
    assert {v.vm_name: v.node for v in first.vms} == {
        local.name: "node-a", moving.name: "node-a", other.name: "node-b"}

    # Live migration between two runs: the next one is incremental, on the other node.
    site.lab.migrate(moving.name, "node-b")
    _wait_placed(c, {moving.name: "node-b"})
    c.create_job(schemas.JobSpec(name="again", selection=schemas.Selection(all=True),
                                 retry_delay=1))
    second = _finished(c, c.run_job("again").id)
    assert second.status == "succeeded", _log(c, second.id)
    m = _vm(second, moving.name)
    assert m.node == "node-b" and m.result["kind"] == "incremental", m

    # The pre-flight run: a verdict per VM, nothing backed up.
    before = len(site.repo().list_snapshots())
    test = _finished(c, c.run_job("again", test=True).id)
    assert test.status == "succeeded", _log(c, test.id)
    checks = {v.vm_name: {ch["check"]: ch for ch in v.result["checks"]} for v in test.vms}
    assert checks[moving.name]["guest agent"]["ok"] is True
    assert "incremental" in checks[moving.name]["checkpoints"]["detail"]
    assert checks[local.name]["repository room"]["ok"] is True
    assert len(site.repo().list_snapshots()) == before

    # A migration during a run: the run still ends with a good restore point for it.
    run = c.run_job("again")
    outcome: list[str] = []

    def migrate() -> None:
        try:
            site.lab.migrate(other.name, "node-a")
            outcome.append("migrated")
        except Exception as exc:  # libvirt may refuse while the backup job runs
            outcome.append(f"migration refused: {exc}")
    mover = _when_running(c, run.id, other.name, None, migrate)
    third = _finished(c, run.id)
    mover.join(120)
    o = _vm(third, other.name)
    print(f"migration during the run: {outcome}; {other.name} backed up on "
          f"{o.nodes_tried} ({o.diagnosis or 'no retry needed'})")
    assert o.state == "succeeded", _log(c, third.id)
    assert third.status == "succeeded", _log(c, third.id)
    repo = site.repo()
    point = repo.get_snapshot(o.result["snapshot"])
    assert repo.verify([point.id]).ok
    chain = repo.list_snapshots(other.uuid)
    assert [p.sequence for p in chain] == list(range(len(chain)))


def test_agent_killed_server_killed_and_network_cut(site: Site,
                                                    lab_vm: Callable[..., LabVM]) -> None:
    vm = lab_vm("srv-faults", node="node-a", storage="shared", workload=True)
    c = site.client()
    _wait_placed(c, {vm.name: "node-a"})
    c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(names=[vm.name]),
                                 retry_delay=2, retries=3, node_wait=120))
    repo = site.repo()
    # New random data before each fault and a slow data link (8 MiB/s): the upload
    # lasts seconds, so that each fault lands inside it (the phases reach the
    # server with the agent's events, up to a second late).
    site.proxies["node-a"].data.rate = 8 << 20
    vm.sh("dd if=/dev/urandom of=/data/kill-agent.bin bs=1M count=48 2>/dev/null && sync",
          timeout=120)

    # 1. The agent dies mid-backup: the attempt fails with that reason and is retried.
    run = c.run_job("j")
    killer = _when_running(c, run.id, vm.name, "view", lambda: site.restart_agent("node-a"))
    done = _finished(c, run.id)
    killer.join(60)
    text = _log(c, run.id)
    assert done.status == "succeeded", text
    assert "agent on node-a restarted" in text or "lost contact with the agent" in text, text
    assert len(repo.list_snapshots(vm.uuid)) == 1

    # 2. The network to the agent is cut mid-backup; restored later.
    vm.sh("dd if=/dev/urandom of=/data/cut.bin bs=1M count=48 2>/dev/null && sync",
          timeout=120)
    run = c.run_job("j")

    def cut() -> None:
        site.proxies["node-a"].cut()
        time.sleep(12)
        site.proxies["node-a"].restore()
    cutter = _when_running(c, run.id, vm.name, "view", cut)
    done = _finished(c, run.id)
    cutter.join(60)
    text = _log(c, run.id)
    assert "lost contact with the agent on node-a" in text, text
    assert done.status == "succeeded", text
    assert len(repo.list_snapshots(vm.uuid)) == 2

    # 3. The server dies mid-job and is restarted: the run is failed with that reason.
    vm.sh("dd if=/dev/urandom of=/data/kill.bin bs=1M count=48 2>/dev/null && sync",
          timeout=120)
    run = c.run_job("j")
    killed = threading.Event()

    def kill_server() -> None:
        site.server.kill()
        killed.set()
    _when_running(c, run.id, vm.name, "data", kill_server)
    assert killed.wait(240)
    site.server.start()
    c = site.client()
    r = c.run(run.id)
    assert r.status == "failed" and r.reason == "server restarted while the run was in progress"
    # ... nothing half-written: the restore points are the two committed ones ...
    wait_for(lambda: len(repo.list_snapshots(vm.uuid)) == 2, 5, "no third restore point")
    # ... and the next run succeeds (its lock was cleaned up, the guest is thawed).
    _wait_placed(c, {vm.name: "node-a"})
    final = _finished(c, c.run_job("j").id)
    assert final.status == "succeeded", _log(c, final.id)
    # ... incrementally: no fault above lost the last restore point's checkpoint
    # (a commit whose answer the network cut lost used to delete it).
    assert final.vms[0].result["kind"] == "incremental", _log(c, final.id)
    assert vm.agent_exec(["true"]) is not None  # guest answers: not left frozen


def test_restore_through_the_server_on_a_chosen_node(site: Site,
                                                     lab_vm: Callable[..., LabVM]) -> None:
    vm = lab_vm("srv-restore-src", node="node-a", storage="shared")
    c = site.client()
    _wait_placed(c, {vm.name: "node-a"})
    c.create_job(schemas.JobSpec(name="one", selection=schemas.Selection(names=[vm.name])))
    backed = _finished(c, c.run_job("one").id)
    assert backed.status == "succeeded", _log(c, backed.id)
    point = backed.vms[0].result["snapshot"]
    # The yardstick: the restore point's disk as the repository gives it here.
    reference = site.tmp / "reference.raw"
    repo = site.repo()
    restore_disk_file(repo, repo.get_snapshot(point), "vda", reference)
    target = site.lab.node("node-b").local_dir
    run = c.restore(schemas.RestoreRequest(ref=point, node="node-b", new_name="srv-restored",
                                           target_dir=str(target)))
    done = _finished(c, run.id)
    conn = site.lab.node("node-b").connect()
    # One disk to a file on node-a, as qcow2.
    single = site.lab.node("node-a").local_dir / "srv-single.qcow2"
    try:
        assert done.status == "succeeded", _log(c, done.id)
        assert done.vms[0].node == "node-b"
        dom = conn.lookupByName("srv-restored")
        assert dom.UUIDString() != vm.uuid  # restored as a new VM
        disks = done.vms[0].result["data"]["disks"]
        assert all(Path(p).parent == target and Path(p).exists() for p in disks.values())
        _same_disk(reference, Path(disks["vda"]))
        run = c.restore(schemas.RestoreRequest(ref=point, node="node-a", disk="vda",
                                               output=str(single), format="qcow2"))
        one = _finished(c, run.id)
        assert one.status == "succeeded", _log(c, one.id)
        assert one.vms[0].node == "node-a"
        assert one.vms[0].result["data"]["output"] == str(single)
        assert f"written to {single}" in _log(c, one.id)
        _same_disk(reference, single)
        assert site.lab.verify_disk(single, fmt="qcow2", boot=True).fsck_clean
        # Not over an existing file without --force.
        again = _finished(c, c.restore(schemas.RestoreRequest(
            ref=point, node="node-a", disk="vda", output=str(single))).id)
        assert again.status == "failed" and "exists" in _log(c, again.id)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName("srv-restored").undefineFlags(
                libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        for f in target.glob("srv-restored*"):
            f.unlink()
        single.unlink(missing_ok=True)
        conn.close()


def _same_disk(raw: Path, image: Path) -> None:
    """``image`` (any format) holds exactly the bytes of the raw file ``raw``."""
    info = subprocess.run(["qemu-img", "info", "-U", "--output", "json", str(image)],
                          check=True, capture_output=True, text=True)
    fmt = json.loads(info.stdout)["format"]
    subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", fmt, str(raw), str(image)],
                   check=True, capture_output=True)
