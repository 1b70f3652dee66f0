#!/usr/bin/env python3
"""Benchmark: one server job over both lab nodes vs. the standalone engine, VM by VM.

Builds a private two-node lab with N VMs (default 8, spread over node-a and
node-b, shared and local storage), then:

1. **standalone**: backs the VMs up one after the other with the node engine
   (``kura.engine.backup.backup_vm``) into a local repository: the baseline;
2. **server job**: starts ``kura server`` and one ``kura agent`` per node (real
   processes, HTTPS, the remote data path) and runs one job selecting every VM,
   into a second, empty repository.

Both are full backups of the same data, alternated for ``--rounds`` rounds (the
first stores the data, later ones find it stored) so that load from other work
on the machine hits both alike. It prints, per round and best-of, the aggregate
throughput (bytes read / wall time) of each, and the CPU time of the server
process as a share of server + agents. Targets: the job at least as fast as the baseline,
and the server's CPU under 20 % of the total. Not a timed test: run by hand
(as root; a few minutes):

    .venv/bin/python bench/server_bench.py [--vms 8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kura.engine.backup import BackupOptions, backup_vm
from kura.hypervisor.connection import open_connection
from kura.lab.testing import make_test_lab
from kura.repository import Repository
from kura.server import schemas
from kura.server.testing import AgentProcess, ServerProcess


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vms", type=int, default=8)
    ap.add_argument("--unique-mib", type=int, default=32,
                    help="random data written into each VM before the backups")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--encryption", default="aes-256-gcm", choices=["aes-256-gcm", "none"])
    ap.add_argument("--profile", metavar="FILE",
                    help="write py-spy samples of the server during the job to FILE")
    ap.add_argument("--keep", action="store_true", help="leave the lab and files in place")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kura-server-bench-", dir="/var/tmp"))
    lab, base = make_test_lab()
    os.environ["KURA_SHARED_STORAGE"] = str(lab.shared_dir)
    procs: list[AgentProcess] = []
    server: ServerProcess | None = None
    try:
        vms = []
        for i in range(args.vms):
            node = "node-a" if i % 2 == 0 else "node-b"
            storage = "local" if i % 4 == 3 else "shared"
            vms.append(lab.create_vm(f"bench-{i}", node=node, storage=storage, agent=True))
        for vm in vms:  # unique data per VM, so that dedup does not hide the data path
            vm.agent_exec(["dd", "if=/dev/urandom", "of=/data/unique.bin", "bs=1M",
                           f"count={args.unique_mib}", "conv=fsync"])
        print(f"{len(vms)} VMs up on both nodes, {args.unique_mib} MiB unique data each",
              flush=True)

        passphrase = b"kura-bench" if args.encryption != "none" else None
        os.environ["KURA_PASSPHRASE"] = "kura-bench"  # for the server process
        solo = Repository.init(str(work / "solo"), passphrase=passphrase,
                               encryption=args.encryption)
        Repository.init(str(work / "job"), passphrase=passphrase, encryption=args.encryption)
        server = ServerProcess(work / "server", work / "job").start()
        admin = server.token("admin")
        for n in lab.nodes:
            procs.append(AgentProcess(server.url, server.token("agent", cluster="lab"), n.name,
                                      n.uri, work / f"agent-{n.name}", heartbeat=5,
                                      inventory_interval=15).start())
        c = server.client(admin)
        deadline = time.monotonic() + 120
        while sum(len(nd.vms) for cl in c.inventory().clusters for nd in cl.nodes) < len(vms):
            if time.monotonic() > deadline:
                raise RuntimeError("agents did not report every VM")
            time.sleep(0.5)
        c.create_job(schemas.JobSpec(name="bench", selection=schemas.Selection(all=True),
                                     max_per_node=4, max_total=8, full=True))
        assert server.proc is not None
        pids = [server.proc.pid] + [p.proc.pid for p in procs if p.proc is not None]
        rounds = []
        ok = True
        # Alternate the two ways (full backups each time; round 1 stores the data, later
        # rounds find it stored) so that load from other work on the machine hits both.
        for rnd in range(args.rounds):
            t0 = time.monotonic()
            solo_bytes = 0
            for vm in vms:
                node = lab.node(lab.vm(vm.name).node)
                with open_connection(node.uri) as hv:
                    r = backup_vm(hv, solo, vm.name, BackupOptions(full=True))
                solo_bytes += r.bytes_read
            solo_s = time.monotonic() - t0

            cpu0 = {pid: cpu_seconds(pid) for pid in pids}
            spy = None
            if args.profile and rnd == 0:  # sample the server's stacks (needs py-spy)
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(server.proc.pid),
                                        "--format", "raw", "-o", args.profile, "--duration",
                                        "60", "--nonblocking", "--threads"])
                time.sleep(1)
            t0 = time.monotonic()
            run = c.run_job("bench")
            while (run := c.run(run.id, wait=10)).status == "running":
                pass
            job_s = time.monotonic() - t0
            cpu = {pid: cpu_seconds(pid) - cpu0[pid] for pid in pids}
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            ok = ok and run.status == "succeeded"
            job_bytes = sum(int(v.result.get("bytes_read", 0)) for v in run.vms)
            server_cpu = cpu[server.proc.pid]
            total_cpu = sum(cpu.values())
            rounds.append({
                "round": rnd + 1, "stores_data": rnd == 0,
                "standalone_MiB_s": round(solo_bytes / solo_s / 2**20, 1),
                "job_MiB_s": round(job_bytes / job_s / 2**20, 1),
                "bytes": job_bytes, "server_cpu_s": round(server_cpu, 2),
                "agents_cpu_s": round(total_cpu - server_cpu, 2),
                "server_cpu_share": round(server_cpu / total_cpu, 3) if total_cpu else None})
            print(json.dumps(rounds[-1]), flush=True)
        best_solo = max(r["standalone_MiB_s"] for r in rounds)
        best_job = max(r["job_MiB_s"] for r in rounds)
        shares = [r["server_cpu_share"] for r in rounds if r["server_cpu_share"] is not None]
        result = {"vms": len(vms), "encryption": args.encryption, "all_runs_ok": ok,
                  "best_standalone_MiB_s": best_solo, "best_job_MiB_s": best_job,
                  "job_at_least_as_fast": best_job >= best_solo,
                  "server_cpu_share_max": max(shares) if shares else None,
                  "server_cpu_under_20pct": bool(shares) and max(shares) < 0.20}
        print(json.dumps(result, indent=2))
        return 0 if ok else 1
    finally:
        for p in procs:
            p.stop()
        if server is not None:
            server.stop()
        if not args.keep:
            lab.down()
            shutil.rmtree(base, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
