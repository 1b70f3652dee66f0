"""Agent pieces: saved credentials, backoff, and that no secret reaches a log."""

from __future__ import annotations

import base64
import logging
import stat
from pathlib import Path

import pytest

from kura.agent import enrol as enrolment
from kura.agent.loop import Agent, Backoff
from kura.agent.remote import open_session
from kura.agent.runner import TaskContext
from kura.agent.testing import FAST, AgentThread, FakeCluster, FakeRunner, wait_for
from kura.errors import AuthError, UsageError
from kura.repository import Repository
from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import start_server


class KeyRunner(FakeRunner):
    """Opens a real data-path session (and so receives the key) before a fake backup."""

    def __init__(self, cluster: FakeCluster, node: str, client: ServerClient) -> None:
        super().__init__(cluster, node)
        self.client = client
        self.key = b""

    def backup(self, ctx: TaskContext) -> schemas.TaskResult:
        sess = open_session(self.client, ctx.task.id)
        self.key = sess.repo.store.master.to_bytes()
        sess.end()
        return super().backup(ctx)


def test_backoff_grows_to_its_cap_and_resets() -> None:
    b = Backoff(8.0)
    delays = [b.fail() for _ in range(6)]
    assert delays[0] < 1.3 and max(delays) <= 8.0 * 1.2 and delays[-1] >= 8.0 * 0.8
    b.ok()
    assert b.fail() < 1.3


def test_credentials_are_saved_private_and_reused(tmp_path: Path) -> None:
    srv = start_server(tmp_path / "srv")
    try:
        state = tmp_path / "agent"
        creds = enrolment.ensure_enrolled(state, srv.url, srv.token("agent", cluster="c1"),
                                          node="n1", uri="qemu:///system", ca=None)
        assert creds.cluster == "c1" and creds.node == "n1"
        assert stat.S_IMODE((state / "agent.json").stat().st_mode) == 0o600
        # A second start needs no token and reuses the credential.
        again = enrolment.ensure_enrolled(state, srv.url, None, node=None, uri="", ca=None)
        assert again.credential == creds.credential
        with pytest.raises(UsageError, match="enrolled as node 'n1'"):
            enrolment.ensure_enrolled(state, srv.url, None, node="other", uri="", ca=None)
        with pytest.raises(AuthError, match="not an enrolment token"):
            enrolment.enrol(srv.url, srv.token("admin"), node="x")
    finally:
        srv.stop()


def test_no_secret_reaches_logs_or_job_output(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    repo = Repository.init(tmp_path / "repo", passphrase=b"correct-horse-42", scrypt_n=2**10)
    srv = start_server(tmp_path / "srv", repo=repo)
    fc = FakeCluster()
    fc.add("web1", "node-a")
    enrol_token = srv.token("agent", cluster="lab")
    admin = srv.token("admin")
    creds = enrolment.enrol(srv.url, enrol_token, node="node-a")
    runner = KeyRunner(fc, "node-a", creds.client())
    agent = AgentThread(Agent(creds.client(), runner, FAST))
    try:
        with srv.client(admin) as c:
            wait_for(lambda: c.inventory().clusters, what="inventory")
            c.create_job(schemas.JobSpec(name="j", selection=schemas.Selection(all=True)))
            run = c.run_job("j")
            wait_for(lambda: c.run(run.id).status != "running", what="run")
            output = c.run_log(run.id).model_dump_json()
    finally:
        agent.kill()
        srv.stop()
    key = repo.store.master.to_bytes()
    assert runner.key == key  # the agent did get the key...
    secrets = [enrol_token.split("_")[2], admin.split("_")[2], creds.credential.split("_")[2],
               base64.b64encode(key).decode(), key.hex(), "correct-horse-42"]
    text = caplog.text + output
    for secret in secrets:  # ... but nothing logged or shown it
        assert secret not in text
