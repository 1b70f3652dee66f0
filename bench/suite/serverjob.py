"""Scenario 5: several VMs on both nodes in one server job, against one by one.

The server engineer's test helpers start the real thing as child processes:
:class:`kura.server.testing.ServerProcess` (``kura server`` with its own CA,
catalog and an encrypted repository) and one
:class:`~kura.server.testing.AgentProcess` (``kura agent``) per lab node, each
enrolled with its own one-time token and talking to its node over the same
libvirt URI as the standalone runs. Once the inventory places every bench VM
on its node, one job over all of them (``full``, the job defaults for
concurrency: 2 per node, 4 in all) is started through the API and timed from
the request until the run is no longer ``running``.

The comparison is the same VMs backed up **one by one** with the standalone
CLI: ``kura backup VM... --full`` for node-a's VMs, then for node-b's (each
command backs its VMs up in turn), into an encrypted repository of their own:
the sum of the two commands' times.

CPU: the server's and the agents' CPU time (user + system, from
``/proc/<pid>/stat``) is sampled before and after the job; the server's
share is its part of the sum. Everything else on the machine (QEMU, other
engineers' tests) is outside both. Memory: the agents' and the server's
peak resident set (``VmHWM``) when the job has ended.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import AgentProcess, ServerProcess
from suite.measure import BenchError

CLK_TCK = os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> int:
    """A live process's peak resident set so far (``VmHWM``), bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its waited-for children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


@dataclass
class JobFigures:
    seconds: float
    server_cpu: float
    agents_cpu: float
    status: str
    vms_ok: int
    server_rss: int
    agent_rss: int  # the larger of the agents' peaks


class Site:
    """A server and one agent per node, for the duration of a ``with`` block."""

    def __init__(self, work: Path, repo: Path, nodes: dict[str, str], passphrase: str) -> None:
        self.work = work
        self.repo = repo
        self.nodes = nodes  # node name -> libvirt URI
        self.passphrase = passphrase
        self.server = ServerProcess(work / "server", repo)
        self.agents: list[AgentProcess] = []
        self.admin = ""

    def __enter__(self) -> Site:
        saved = os.environ.get("KURA_PASSPHRASE")
        os.environ["KURA_PASSPHRASE"] = self.passphrase  # inherited by the server only
        try:
            self.server.start()
        finally:
            if saved is None:
                os.environ.pop("KURA_PASSPHRASE", None)
            else:
                os.environ["KURA_PASSPHRASE"] = saved
        self.admin = self.server.token("admin")
        for node, uri in self.nodes.items():
            token = self.server.token("agent", cluster="bench")
            # The agents' production intervals (the test helpers' 1 s / 2 s would
            # add heartbeats and inventory reports to the server's measured CPU).
            self.agents.append(AgentProcess(self.server.url, token, node, uri,
                                            self.work / f"agent-{node}", heartbeat=5,
                                            inventory_interval=15).start())
        return self

    def __exit__(self, *exc: object) -> None:
        for a in self.agents:
            a.stop()
        self.server.stop()

    def client(self) -> ServerClient:
        return self.server.client(self.admin)

    def wait_placed(self, vms: dict[str, str], timeout: float = 120) -> None:
        c = self.client()
        deadline = time.monotonic() + timeout
        while True:
            placed = {v.name: n.name for cl in c.inventory().clusters for n in cl.nodes
                      for v in n.vms if n.status == "online"}
            if all(placed.get(k) == v for k, v in vms.items()):
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the server's inventory did not place {vms} within "
                                 f"{timeout:.0f} s (it has {placed}); see {self.work}")
            time.sleep(0.5)

    def run_job(self, vms: list[str], timeout: float = 900) -> JobFigures:
        c = self.client()
        c.create_job(schemas.JobSpec(name="bench", selection=schemas.Selection(names=vms),
                                     full=True, retries=0))
        pids = [a.proc.pid for a in self.agents if a.proc is not None]
        if self.server.proc is None:
            raise BenchError("the server is not running")
        spid = self.server.proc.pid
        s0, a0 = cpu_seconds(spid), sum(cpu_seconds(p) for p in pids)
        t0 = time.monotonic()
        run = c.run_job("bench")
        while True:  # the server answers when the run ends (no polling load on it)
            run = c.run(run.id, wait=10)
            if run.status != "running":
                break
            if time.monotonic() - t0 > timeout:
                raise BenchError(f"the server job did not finish within {timeout:.0f} s")
        seconds = time.monotonic() - t0
        s1, a1 = cpu_seconds(spid), sum(cpu_seconds(p) for p in pids)
        ok = sum(1 for v in run.vms if v.state == "succeeded")
        return JobFigures(seconds, s1 - s0, a1 - a0, run.status, ok, peak_rss(spid),
                          max((peak_rss(p) for p in pids), default=0))
