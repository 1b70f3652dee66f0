"""The CLI against a real server: job commands, ls, and the standalone commands' server mode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kura.agent.enrol import enrol
from kura.agent.loop import Agent
from kura.agent.testing import FAST, AgentThread, FakeCluster, FakeRunner, wait_for
from kura.cli.main import main
from kura.repository import Repository
from kura.server.testing import start_server


def test_cli_through_a_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    repo = Repository.init(tmp_path / "repo", passphrase=None, encryption="none")
    srv = start_server(tmp_path / "srv", repo=repo)
    fc = FakeCluster()
    fc.add("web1", "node-a", tags=["prod"])
    agent = AgentThread(Agent(enrol(srv.url, srv.token("agent", cluster="lab"),
                                    node="node-a").client(), FakeRunner(fc, "node-a"), FAST))
    try:
        monkeypatch.setenv("KURA_SERVER", srv.url)
        monkeypatch.setenv("KURA_TOKEN", srv.token("operator"))
        monkeypatch.setenv("KURA_CA", str(srv.files.ca))
        with srv.client() as c:
            wait_for(lambda: c.inventory().clusters, what="inventory")
        assert main(["--json", "ls"]) == 0
        tree = json.loads(capsys.readouterr().out)
        assert tree["clusters"][0]["nodes"][0]["vms"][0]["name"] == "web1"
        assert main(["ls"]) == 0
        assert "vm web1" in capsys.readouterr().out
        assert main(["job", "create", "prod", "--tag", "prod", "--keep-last", "3"]) == 0
        assert main(["job", "create", "bad", "--all", "--schedule", "not cron"]) == 2
        assert main(["job", "run", "prod"]) == 0
        capsys.readouterr()
        assert main(["--json", "job", "runs", "prod"]) == 0
        runs = json.loads(capsys.readouterr().out)
        assert runs[0]["status"] == "succeeded"
        assert main(["job", "log", str(runs[0]["id"])]) == 0
        assert "web1: [node-a] data done in" in capsys.readouterr().out
        assert main(["job", "test", "prod"]) == 0
        capsys.readouterr()
        assert main(["--json", "snapshots"]) == 0  # the server's repository (empty here)
        assert json.loads(capsys.readouterr().out) == []
        assert main(["job", "delete", "prod"]) == 0
        # One disk through a server: to a file on the node, named by an absolute path.
        assert main(["restore", "web1", "--disk", "vda"]) == 2
        assert "add --output FILE" in capsys.readouterr().err
        assert main(["restore", "web1", "--disk", "vda", "--output", "rel.raw"]) == 2
        assert "give it absolute" in capsys.readouterr().err
        monkeypatch.setenv("KURA_TOKEN", srv.token("read-only"))
        assert main(["job", "create", "x", "--all"]) == 6  # AuthError: role
        monkeypatch.setenv("KURA_TOKEN", "kura_0000000000000000_" + "0" * 64)
        assert main(["ls"]) == 6
        # Without a server the standalone command runs as before.
        monkeypatch.delenv("KURA_SERVER")
        assert main(["--repo", str(tmp_path / "repo"), "--json", "snapshots"]) == 0
    finally:
        agent.kill()
        srv.stop()


def test_revoking_an_agent_locks_it_out(tmp_path: Path) -> None:
    from kura.errors import AuthError

    srv = start_server(tmp_path / "srv")
    try:
        creds = enrol(srv.url, srv.token("agent", cluster="lab"), node="node-a")
        with creds.client() as ac:
            ac.heartbeat()
            state = str(tmp_path / "srv")
            assert main(["server", "--state-dir", state, "agent", "list"]) == 0
            assert main(["server", "--state-dir", state, "agent", "revoke", "node-x"]) == 2
            assert main(["server", "--state-dir", state, "agent", "revoke", "node-a"]) == 0

            def refused() -> bool:
                try:
                    ac.heartbeat()
                except AuthError:
                    return True
                return False
            wait_for(refused, 10, "revocation")  # within the credential cache's lifetime
    finally:
        srv.stop()
