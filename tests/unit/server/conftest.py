"""Fixtures: a real HTTPS server on loopback, and fake agents on a fake cluster."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kura.agent.enrol import enrol
from kura.agent.loop import Agent
from kura.agent.testing import FAST, AgentThread, FakeCluster, FakeRunner
from kura.server.testing import RunningServer, start_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    srv = start_server(tmp_path / "server", dead_after=2.0)
    yield srv
    srv.stop()


@pytest.fixture
def fake_cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def start_agent(server: RunningServer, fake_cluster: FakeCluster
                ) -> Iterator[Callable[[str], AgentThread]]:
    handles: list[AgentThread] = []

    def start(node: str, cluster: str = "lab") -> AgentThread:
        creds = enrol(server.url, server.token("agent", cluster=cluster), node=node)
        h = AgentThread(Agent(creds.client(), FakeRunner(fake_cluster, node), FAST))
        handles.append(h)
        return h

    yield start
    for h in handles:
        h.kill()
