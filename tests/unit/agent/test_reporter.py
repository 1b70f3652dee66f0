"""The agent's reporter: a VM that arrives on or leaves the node is reported at once."""

from __future__ import annotations

import threading
import time
from typing import Any

from kura.agent.loop import Agent, AgentSettings
from kura.agent.testing import FakeCluster, FakeRunner, wait_for
from kura.server import schemas


class CountingClient:
    def __init__(self) -> None:
        self.reports: list[set[str]] = []
        self.heartbeats = 0

    def heartbeat(self) -> None:
        self.heartbeats += 1

    def put_inventory(self, report: schemas.InventoryReport) -> Any:
        self.reports.append({v.name for v in report.vms})


def test_a_vm_migrating_in_is_reported_before_the_inventory_interval() -> None:
    cluster = FakeCluster()
    cluster.add("web1", "node-a")
    client = CountingClient()
    agent = Agent(client, FakeRunner(cluster, "node-b"),  # type: ignore[arg-type]
                  AgentSettings(heartbeat_interval=0.05, inventory_interval=3600))
    t = threading.Thread(target=agent._report_loop, daemon=True)
    t.start()
    try:
        wait_for(lambda: client.heartbeats >= 3, 5, "heartbeats")
        assert client.reports == [set()]  # the first report only
        cluster.migrate("web1", "node-b")
        wait_for(lambda: len(client.reports) == 2, 5, "a report after the migration")
        assert client.reports[-1] == {"web1"}
        time.sleep(0.3)
        assert len(client.reports) == 2  # nothing changed since
    finally:
        agent.stop_event.set()
        agent._inventory_due.set()
        t.join(5)
