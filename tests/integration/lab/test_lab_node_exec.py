"""Running commands on a lab node: its mount and UTS namespaces, its libvirtd."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from kura.cli.main import cli
from kura.errors import LabError
from kura.lab import Lab, host
from kura.lab.node import LabNode

pytestmark = pytest.mark.lab


def test_node_run_sees_the_node(lab: Lab) -> None:
    for node in lab.nodes:
        out = lab.node_run(node.name, ["hostname"], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == node.name
        token = lab.node_run(node.name, ["cat", f"/etc/libvirt/{host.TOKEN_FILE}"],
                             capture_output=True, text=True, check=True)
        assert token.stdout.strip() == node.token
        # qemu:///system on the node is the node's own libvirtd (its host UUID).
        probe = ("import libvirt; c = libvirt.open('qemu:///system'); "
                 "print(c.getCapabilities()); c.close()")
        caps = lab.node_run(node.name, [sys.executable, "-c", probe], capture_output=True,
                            text=True, check=True)
        assert f"<uuid>{node.host_uuid}</uuid>" in caps.stdout
    # The host keeps its own view.
    assert not os.path.exists(f"/etc/libvirt/{host.TOKEN_FILE}")


def test_node_run_cwd_env_and_prefix(lab: Lab) -> None:
    node = lab.nodes[0]
    # cwd is resolved on the node: /var/lib/libvirt there is the node's lib directory.
    (node.directory / "lib" / "kura-probe").write_text("here\n")
    try:
        out = lab.node_run(node.name, ["cat", "kura-probe"], cwd="/var/lib/libvirt",
                           capture_output=True, text=True, check=True)
        assert out.stdout == "here\n"
        assert node.host_path("/var/lib/libvirt/kura-probe").read_text() == "here\n"
    finally:
        (node.directory / "lib" / "kura-probe").unlink()
    env = dict(os.environ, KURA_PROBE="42")
    out = lab.node_run(node.name, ["sh", "-c", "echo $KURA_PROBE; exit 3"], env=env,
                       capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (3, "42\n")
    argv = lab.node_argv(node.name)
    assert argv[:2] == ["/usr/bin/nsenter", "--target"]
    assert int(argv[2]) in node.pids()
    done = subprocess.run([*argv, "hostname"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == node.name


def test_node_run_errors(lab: Lab) -> None:
    with pytest.raises(LabError, match="command not found"):
        lab.node_run("node-a", ["kura-no-such-command"], capture_output=True)
    with pytest.raises(LabError, match="no node"):
        lab.node_run("node-z", ["true"])
    gone = LabNode(name="node-gone", address="127.0.0.254", directory=lab.root / "nodes" / "x",
                   token="0" * 32, host_uuid="")
    with pytest.raises(LabError, match="not running"):
        gone.run(["true"])


def test_cli_node_exec(lab: Lab) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--json", "lab", "--lab-dir", str(lab.root), "node-exec",
                                 "node-b", "--", "hostname"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["exit_code"] == 0 and data["stdout"].strip() == "node-b"
    # Everything after the node is the command (even without --); its exit code is kept.
    proc = subprocess.run([sys.executable, "-m", "kura.cli.main", "lab", "--lab-dir",
                           str(lab.root), "node-exec", "--cwd", "/etc/libvirt", "node-a",
                           "sh", "-c", "hostname; cat .kura-node-token; exit 5", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 5, proc.stderr
    assert proc.stdout.split() == ["node-a", lab.node("node-a").token]
    # A node that does not exist: one clear line, not a traceback.
    proc = subprocess.run([sys.executable, "-m", "kura.cli.main", "lab", "--lab-dir",
                           str(lab.root), "node-exec", "node-q", "--", "true"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no node 'node-q'" in proc.stderr, proc.stderr
