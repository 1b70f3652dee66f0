#!/usr/bin/env python3
"""Benchmark: the server's CPU per GiB on the remote data path, without a lab.

Starts a real ``kura server`` process (TLS, catalog, an encrypted repository with
the default chunk size) and, in this process, agents on a fake two-node cluster
whose runner backs up in-memory disks through the real agent data path
(:func:`kura.agent.remote.open_session`, the repository writer over
``RemoteBackend``). One job backs every VM up (``--per-node`` at once on each
node), first into the empty repository (everything is uploaded), then again
(everything is found stored; with ``--incremental`` as incrementals of the
previous restore point that write nothing, so every chunk is an inherited one
touched at the end). Prints, per round, the wall time, the server
process's CPU seconds (user + system, from ``/proc``) per GiB of disk data and
per GiB uploaded, and this process's CPU (the agents' side) for comparison.
Not a timed test; a minute or so:

    .venv/bin/python bench/upload_bench.py [--vms 8] [--mib 64] [--rounds 2] [--incremental]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kura.agent.enrol import enrol
from kura.agent.loop import Agent, AgentSettings
from kura.agent.remote import open_session
from kura.agent.runner import TaskContext
from kura.agent.testing import AgentThread, FakeCluster, FakeRunner, wait_for
from kura.repository import Repository, SourceRef
from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import ServerProcess

PASSPHRASE = "kura-upload-bench"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) << 10
    return 0


class UploadRunner(FakeRunner):
    """Backs a VM's in-memory disk up through the server, as the real agent does."""

    def __init__(self, cluster: FakeCluster, node: str, client: ServerClient,
                 disks: dict[str, bytes], workers: int, incremental: bool) -> None:
        super().__init__(cluster, node)
        self.client = client
        self.disks = disks
        self.workers = workers
        self.incremental = incremental

    def backup(self, ctx: TaskContext) -> schemas.TaskResult:
        uuid, name = str(ctx.payload["vm_uuid"]), str(ctx.payload["vm_name"])
        data = memoryview(self.disks[name])
        sess = open_session(self.client, ctx.task.id)
        try:
            repo = sess.repo
            cs = repo.chunk_size
            parent = repo.latest(uuid) if self.incremental else None
            with repo.begin_snapshot(SourceRef("vm", uuid, name), node=self.node, parent=parent,
                                     kind="incremental" if parent else "full",
                                     workers=self.workers) as w:
                if parent is not None:  # nothing changed: every chunk is inherited
                    dw = w.add_disk("vda", len(data), base=parent.disk("vda"))
                else:
                    dw = w.add_disk("vda", len(data))
                    for i in range(0, len(data), cs):
                        dw.write_chunk(i // cs, data[i:i + cs])
                m = w.commit()
        finally:
            sess.abort_quietly()
        return schemas.TaskResult(ok=True, snapshot=m.id, kind=m.kind, consistency="crash",
                                  bytes_read=len(data),
                                  bytes_stored=dw.stats["bytes_stored"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--mib", type=int, default=64, help="disk data per VM (random)")
    ap.add_argument("--per-node", type=int, default=2, help="backups at once per node")
    ap.add_argument("--workers", type=int, default=2, help="writer threads per backup")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--incremental", action="store_true",
                    help="rounds after the first are incrementals that change nothing")
    ap.add_argument("--dir", default="/var/tmp", help="where the repository goes")
    ap.add_argument("--profile", metavar="FILE",
                    help="py-spy samples (raw) of the server during round 1 (needs py-spy)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kura-upload-bench-", dir=args.dir))
    agents: list[AgentThread] = []
    server: ServerProcess | None = None
    try:
        os.environ["KURA_PASSPHRASE"] = PASSPHRASE
        Repository.init(str(work / "repo"), passphrase=PASSPHRASE.encode())
        server = ServerProcess(work / "server", work / "repo").start()
        assert server.proc is not None
        cluster = FakeCluster()
        cluster.phase_seconds = 0.0
        disks: dict[str, bytes] = {}
        nodes = ("node-a", "node-b")
        for i in range(args.vms):
            cluster.add(f"vm{i}", nodes[i % 2])
            disks[f"vm{i}"] = os.urandom(args.mib << 20)
        for node in nodes:
            creds = enrol(server.url, server.token("agent", cluster="bench"), node=node)
            runner = UploadRunner(cluster, node, creds.client(), disks, args.workers,
                                  args.incremental)
            agents.append(AgentThread(Agent(creds.client(), runner, AgentSettings())))
        c = server.client(server.token("admin"))
        wait_for(lambda: sum(len(n.vms) for cl in c.inventory().clusters
                             for n in cl.nodes) == args.vms, 60, "inventory")
        c.create_job(schemas.JobSpec(name="bench", selection=schemas.Selection(all=True),
                                     max_per_node=args.per_node,
                                     max_total=args.per_node * len(nodes), full=True))
        gib = args.vms * args.mib / 1024
        for rnd in range(args.rounds):
            spy = None
            if args.profile and rnd == 0:
                spy = subprocess.Popen([os.environ.get("PY_SPY", "py-spy"), "record", "--gil",
                                        "--rate", "500", "--pid", str(server.proc.pid),
                                        "--threads", "-f", "raw", "-o", args.profile],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.5)
            s0, a0, t0 = cpu_seconds(server.proc.pid), self_cpu(), time.monotonic()
            run = c.run_job("bench")
            while (run := c.run(run.id)).status == "running":
                time.sleep(0.05)
            wall = time.monotonic() - t0
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            server_cpu = cpu_seconds(server.proc.pid) - s0
            agents_cpu = self_cpu() - a0
            stored = sum(int(v.result.get("bytes_stored", 0)) for v in run.vms)
            print(json.dumps({
                "round": rnd + 1, "status": run.status, "wall_s": round(wall, 2),
                "uploaded_MiB": stored >> 20, "server_cpu_s": round(server_cpu, 2),
                "agents_cpu_s": round(agents_cpu, 2),
                "server_share": round(server_cpu / (server_cpu + agents_cpu), 3),
                "server_cpu_s_per_GiB_data": round(server_cpu / gib, 2),
                "server_cpu_s_per_GiB_uploaded":
                    round(server_cpu / (stored / 2**30), 2) if stored else None,
                "server_peak_rss_MiB": peak_rss(server.proc.pid) >> 20}), flush=True)
            if run.status != "succeeded":
                print(json.dumps([v.model_dump(mode="json") for v in run.vms])[:2000])
                return 1
        return 0
    finally:
        for a in agents:
            a.kill()
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
