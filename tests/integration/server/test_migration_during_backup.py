"""A live migration requested while the VM's backup runs: the backup gives way.

Real server, two real agents, real libvirt: ``virDomainMigrateToURI3`` (what
``virsh migrate --p2p`` calls) is started while the pull-mode backup job of the
VM is in its data phase. Without kura noticing, libvirt would make the
migration wait for the job lock and fail it after 30 s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import libvirt
import pytest

from kura.agent.testing import wait_for
from kura.hypervisor.jobwatch import DaemonLog, JobWatch
from kura.hypervisor.view import DEFAULT_SCRATCH_ROOT
from kura.lab import Lab, LabVM
from kura.repository import Repository
from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import AgentProcess, ServerProcess

pytestmark = pytest.mark.lab


def _admin_uri(lab: Lab, node: str) -> str:
    sock = lab.node(node).host_path("/run/libvirt/libvirt-admin-sock")
    return f"libvirtd:///system?socket={sock}"


@pytest.fixture
def site(lab: Lab, tmp_path: Path) -> Iterator[tuple[ServerProcess, str, Path]]:
    repo = tmp_path / "repo"
    Repository.init(str(repo), passphrase=None, encryption="none")
    server = ServerProcess(tmp_path / "server", repo).start()
    agents = [AgentProcess(server.url, server.token("agent", cluster="lab"), node.name,
                           node.uri, tmp_path / f"agent-{node.name}",
                           ca=tmp_path / "server" / "ca.pem",
                           libvirt_admin=_admin_uri(lab, node.name)).start()
              for node in lab.nodes]
    try:
        yield server, server.token("admin"), repo
    finally:
        for a in agents:
            a.stop()
        server.stop()


def _placed(c: ServerClient) -> dict[str, str]:
    return {v.name: n.name for cl in c.inventory().clusters for n in cl.nodes for v in n.vms
            if n.status == "online"}


def _finished(c: ServerClient, run_id: int) -> schemas.RunOut:
    wait_for(lambda: c.run(run_id).status != "running", 300, f"run {run_id}")
    return c.run(run_id)


def _log(c: ServerClient, run_id: int) -> str:
    return "\n".join(ln.message for ln in c.run_log(run_id).lines)


def _backing_up(dom: libvirt.virDomain) -> bool:
    try:
        dom.backupGetXMLDesc(0)
        return True
    except libvirt.libvirtError:
        return False


def test_migration_waiting_for_a_backup_is_not_blocked(
        lab: Lab, lab_vm: Callable[..., LabVM],
        site: tuple[ServerProcess, str, Path]) -> None:
    server, admin, repo_path = site
    vm = lab_vm("srv-mig", node="node-a", storage="shared", workload=True)
    c = server.client(admin)
    wait_for(lambda: _placed(c).get(vm.name) == "node-a", 60, "inventory")
    c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(names=[vm.name]),
                                 retry_delay=1, retries=3, node_wait=120))
    first = _finished(c, c.run_job("j").id)
    assert first.status == "succeeded", _log(c, first.id)

    # Enough new data that the next backup's data phase lasts a while.
    vm.sh("dd if=/dev/urandom of=/data/mig.bin bs=1M count=96 2>/dev/null && sync",
          timeout=240)
    run = c.run_job("j")
    conn = lab.node("node-a").connect()
    try:
        dom = conn.lookupByUUIDString(vm.uuid)
        wait_for(lambda: _backing_up(dom), 120, "the backup job on node-a")
        t0 = time.monotonic()
        lab.migrate(vm.name, "node-b")  # virDomainMigrateToURI3, P2P, live
        took = time.monotonic() - t0
    finally:
        conn.close()
    done = _finished(c, run.id)
    text = _log(c, run.id)
    print(f"migration requested during the data phase completed in {took:.1f} s")
    assert took < 15, text  # libvirt alone: fails after ~30 s
    assert done.status == "succeeded", text
    (v,) = done.vms
    assert v.node == "node-b" and v.nodes_tried == ["node-a", "node-b"], text
    assert "VM migrated from node-a to node-b during backup; retried on node-b" in text
    assert "the backup gives way" in text
    assert v.result["kind"] == "incremental", text  # the base checkpoint travelled

    # Nothing left behind: no restore point of the ended attempt, only the new
    # checkpoint, no backup job, no scratch, the guest thawed.
    repo = Repository.open(str(repo_path))
    assert [p.id for p in repo.list_snapshots(vm.uuid)] == [
        first.vms[0].result["snapshot"], v.result["snapshot"]]
    dom_b = vm.domain()
    assert {cp.getName() for cp in dom_b.listAllCheckpoints()} == {f"kura-{v.result['snapshot']}"}
    assert not _backing_up(dom_b)
    assert not list((DEFAULT_SCRATCH_ROOT / vm.uuid).glob("*"))
    assert vm.agent_command("guest-fsfreeze-status") == "thawed"


def test_the_watch_restores_libvirts_log_settings(lab: Lab, tmp_path: Path) -> None:
    admin = _admin_uri(lab, "node-a")
    daemon = DaemonLog(admin)
    before = daemon.get()
    watch = JobWatch(admin, tmp_path)
    with watch.watch("some-vm", lambda _r: None) as active:
        assert active
        filters, outputs = daemon.get()
        assert "1:*conf.virdomainjob*" in filters and f"1:file:{watch.path}" in outputs
        assert all(o in outputs for o in before[1])  # the daemon's own outputs stay
    assert daemon.get() == before and not watch.path.exists()
    # A killed agent's leftovers are dropped by the next agent's start.
    dead = f"1:file:{tmp_path}/libvirt-jobs-{watch.digest}-999999999.log"
    daemon.set([*before[0], "1:conf.virdomainjob"], [*before[1], dead])
    JobWatch(admin, tmp_path).drop_leftovers()
    assert daemon.get() == before
