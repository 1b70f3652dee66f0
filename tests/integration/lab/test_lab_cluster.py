"""The lab cluster itself: up/status/down, migrations, crash recovery."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from kura.cli.main import cli
from kura.errors import LabError
from kura.lab import Lab, LabVM, host
from kura.lab.testing import VMFactory, make_test_lab

pytestmark = pytest.mark.lab


def _kura(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _assert_gone(tokens: list[str], root: Path) -> None:
    assert all(not host.pids_with_token(t) for t in tokens)
    assert not root.exists()


def _wait_seq_above(vm: LabVM, seq: int, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while True:
        running, now = vm.workload_status()
        if running and now > seq:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"workload of {vm.name} stuck at {now} (running={running})")
        time.sleep(0.3)


def test_up_status_down_twice(tmp_path: Path) -> None:
    base = Path("/var/tmp") / f"kura-lab-cli-{os.getpid()}"
    base.mkdir(mode=0o755)
    (base / "owner.pid").write_text(f"{os.getpid()}\n")
    root = base / "lab"
    try:
        for _round in range(2):
            start = time.monotonic()
            out = _kura("--json", "lab", "--lab-dir", str(root), "up", "--vms", "3")
            took = time.monotonic() - start
            data = json.loads(out[out.index("{"):])
            assert [n["name"] for n in data["nodes"]] == ["node-a", "node-b"]
            assert all(n["up"] for n in data["nodes"])
            assert data["nodes"][0]["uri"].startswith("qemu+tcp://127.0.")
            storages = sorted(v["storage"] for v in data["vms"])
            assert storages == ["local", "shared", "shared"]
            assert all(v["state"] == "running" for v in data["vms"])
            assert took < 60, f"lab up took {took:.1f} s"
            status = json.loads(_kura("lab", "--lab-dir", str(root), "status", "--json"))
            assert {v["name"] for v in status["vms"]} == {"local-1", "shared-1", "shared-2"}
            lab = Lab.existing(root)
            assert lab is not None
            for vm in lab.vms():
                assert vm.workload_status()[0], f"workload not running in {vm.name}"
            tokens = [n.token for n in lab.nodes]
            _kura("lab", "--lab-dir", str(root), "down")
            _assert_gone(tokens, root)
    finally:
        leftover = Lab.existing(root)
        if leftover is not None:
            leftover.down()
        shutil.rmtree(base, ignore_errors=True)


def test_live_migration_both_ways_with_workload(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(workload=True, node="node-a")
    seq = _wait_seq_above(vm, 0)
    lab.migrate(vm.name, "node-b")
    assert vm.node == "node-b"
    vm.wait_agent(10)
    seq = _wait_seq_above(vm, seq)
    lab.migrate(vm.name, "node-a")
    assert vm.node == "node-a"
    assert vm.agent_exec(["/bin/true"]) == (0, "", "")
    _wait_seq_above(vm, seq)
    # The source no longer has the domain: it moved, it was not copied.
    assert vm.uuid not in {d.UUIDString() for d in lab.connect("node-b").listAllDomains()}


def test_offline_migration_moves_local_disks(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(storage="local", workload=True, node="node-a")
    assert vm.disk_paths[0].is_relative_to(lab.node("node-a").local_dir)
    with pytest.raises(LabError, match="--offline"):
        lab.migrate(vm.name, "node-b")  # live migration needs shared storage
    seq = _wait_seq_above(vm, 0)
    lab.migrate(vm.name, "node-b", offline=True)
    moved = lab.vm(vm.name)
    assert moved.node == "node-b"
    assert moved.disk_paths[0].is_relative_to(lab.node("node-b").local_dir)
    assert moved.disk_paths[0].exists()
    assert not vm.disk_paths[0].exists()
    moved.wait_agent(10)
    _wait_seq_above(moved, seq)


def test_offline_migration_and_cold_move_shared(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(node="node-b")
    lab.migrate(vm.name, "node-a", offline=True)
    assert vm.node == "node-a"
    vm.wait_agent(10)
    vm.shutdown()
    assert vm.state() == "shutoff"
    lab.cold_move(vm.name, "node-b")
    assert vm.node == "node-b"
    vm.start()
    assert vm.agent_exec(["/bin/true"])[0] == 0


def test_crash_recovery_and_down_after_crash() -> None:
    lab, base = make_test_lab()
    try:
        lab.create_vm("crash-local", node="node-a", storage="local", workload=True,
                      role="lab")
        lab.create_vm("crash-shared", node="node-b", workload=True, role="lab")
        node_a = lab.node("node-a")
        libvirtd = int((node_a.directory / "run" / "libvirtd.pid").read_text())
        os.kill(libvirtd, signal.SIGKILL)
        lab.wait_for(lambda: not node_a.is_up(), 10, "node-a to go down")
        lab.up(nodes=2, vms=0)
        assert node_a.is_up()
        for name in ("crash-local", "crash-shared"):
            vm = lab.vm(name)
            assert vm.state() == "running"
            vm.wait_agent(60)
            assert vm.workload_status()[0]
        # A second crash, this time followed directly by down: nothing may survive.
        node_b = lab.node("node-b")
        libvirtd_b = int((node_b.directory / "run" / "libvirtd.pid").read_text())
        os.kill(libvirtd_b, signal.SIGKILL)
        tokens = [n.token for n in lab.nodes]
        lab.down()
        _assert_gone(tokens, lab.root)
    finally:
        if lab.root.exists():
            lab.down()
        shutil.rmtree(base, ignore_errors=True)
