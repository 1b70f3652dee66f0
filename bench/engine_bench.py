"""Issue-4 benchmark: kura's VM backup/restore against virtnbdbackup, in one run.

Needs root and a libvirtd at ``--connect`` (default ``qemu:///system``). It
builds a 2 GiB qcow2 disk with 1 GiB allocated (512 MiB random, 512 MiB text,
every 4 MiB distinct), runs a VM on it (TCG, no guest OS needed: the block
layer does the work), then measures, on the same VM:

1. reading the allocated data over the pull-mode NBD export (libnbd, 8 in flight);
2. ``kura backup`` full (encrypted repository, zstd) — time and peak RSS;
3. ``virtnbdbackup -l copy -z`` (Debian's);
4. 1 % of the disk changed (random 1 MiB writes), ``kura backup`` incremental;
5. ``kura restore --disk --format qcow2`` vs ``virtnbdrestore`` of the full.

Prints a JSON document; ``--markdown`` prints the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import libvirt

from kura.hypervisor.connection import open_connection
from kura.hypervisor.domain import describe
from kura.hypervisor.view import PointInTimeView, job_dir
from kura.nbd import NbdSource

MIB = 1 << 20
VM = "kura-bench"


def make_image(work: Path) -> Path:
    raw = work / "data.raw"
    rng = random.Random(4)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 10)))
             for _ in range(3000)]
    lines = [b" ".join(rng.choices(words, k=12)) + b"\n" for _ in range(60000)]
    with open(raw, "wb") as f:
        for _ in range(128):  # 512 MiB random
            f.write(os.urandom(4 * MIB))
        for i in range(128):  # 512 MiB text, each 4 MiB different
            rng.shuffle(lines)
            block = (b"chunk %d\n" % i) + b"".join(lines)
            f.write(block[:4 * MIB].ljust(4 * MIB, b"\n"))
    disk = work / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                    str(disk)], check=True)
    subprocess.run(["qemu-img", "resize", "-q", str(disk), "2G"], check=True)
    raw.unlink()
    shutil.chown(disk, "libvirt-qemu", "kvm")
    return disk


def domain_xml(disk: Path) -> str:
    return f"""<domain type='qemu'><name>{VM}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/>
<target dev='sda' bus='sata'/></disk></devices></domain>"""


LAST_STDOUT = [""]


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one command, measured by GNU time."""
    t0 = time.monotonic()
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M", *argv], env=env,
                          capture_output=True, text=True,
                          check=False)
    LAST_STDOUT[0] = proc.stdout
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("maxrss=")]
    return seconds, int(rss[-1].split("=")[1]) * 1024 if rss else 0


def read_only(uri: str, work: Path) -> float:
    with open_connection(uri) as hv:
        dom = hv.lookup(VM)
        info = describe(dom)
        view = PointInTimeView(dom, list(info.disks), {}, None, job_dir(work / "ro", info.uuid))
        exports = view.start()
        try:
            t0 = time.monotonic()
            with NbdSource.connect_unix(view.socket, exports["sda"].export) as src:
                idx = src.data_chunks(4 * MIB)
                for _i, _data in src.read_chunks(idx, 4 * MIB, inflight=8):
                    pass
            return time.monotonic() - t0
        finally:
            view.end()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--connect", default="qemu:///system")
    ap.add_argument("--workdir", default="/var/tmp/kura-bench")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--compression-level", type=int, default=3,
                    help="zstd level of the benchmark repository (kura's default: 3)")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    work.chmod(0o755)
    kura = [sys.executable, "-m", "kura.cli.main"]
    env = dict(os.environ, KURA_REPO=str(work / "repo"), KURA_PASSPHRASE="bench")
    conn = libvirt.open(args.connect)
    try:
        old = conn.lookupByName(VM)
        if old.isActive():
            old.destroy()
        old.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    except libvirt.libvirtError:
        pass
    disk = make_image(work)
    dom = conn.defineXML(domain_xml(disk))
    dom.create()
    res: dict[str, Any] = {"disk": "2 GiB qcow2, 1 GiB allocated (512 MiB random + 512 MiB text)"}
    try:
        subprocess.run([*kura, "repo", "init", "--compression-level",
                        str(args.compression_level)], env=env, check=True, capture_output=True)
        res["compression_level"] = args.compression_level
        res["read_only_s"] = read_only(args.connect, work)
        res["kura_full_s"], res["kura_full_rss"] = timed(
            [*kura, "--json", "backup", "--connect", args.connect, VM, "--full"], env)
        res["kura_full_engine_s"] = json.loads(LAST_STDOUT[0])[0]["seconds"]
        vnb = work / "vnb"
        res["virtnbdbackup_s"], res["virtnbdbackup_rss"] = timed(
            ["virtnbdbackup", "-U", args.connect, "-d", VM, "-l", "copy", "-z", "-o", str(vnb)])
        rng = random.Random(7)
        for off in rng.sample(range(2048), 20):  # 20 MiB ≈ 1 % of 2 GiB
            cmd = f'qemu-io -d sata0-0-0 "write -P {rng.randint(1, 255)} {off}M 1M"'
            subprocess.run(["virsh", "-c", args.connect, "qemu-monitor-command", VM, "--hmp",
                            cmd], check=True, capture_output=True)
        res["kura_incremental_s"], _ = timed(
            [*kura, "--json", "backup", "--connect", args.connect, VM], env)
        res["kura_incremental_engine_s"] = json.loads(LAST_STDOUT[0])[0]["seconds"]
        res["kura_startup_s"] = timed([*kura, "--version"])[0]
        out = work / "restored.qcow2"
        res["kura_restore_s"], res["kura_restore_rss"] = timed(
            [*kura, "restore", VM, "--disk", "sda", "--output", str(out), "--format", "qcow2"],
            env)
        vnr = work / "vnr"
        res["virtnbdrestore_s"], _ = timed(["virtnbdrestore", "-i", str(vnb), "-o", str(vnr)])
        res["repo_bytes"] = sum(p.stat().st_size for p in (work / "repo").rglob("*")
                                if p.is_file())
        res["virtnbdbackup_bytes"] = sum(p.stat().st_size for p in vnb.rglob("*") if p.is_file())
    finally:
        dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    res["full_vs_virtnbdbackup"] = res["virtnbdbackup_s"] / res["kura_full_s"]
    res["full_vs_read_only"] = res["kura_full_s"] / res["read_only_s"]
    res["incremental_vs_full"] = res["kura_incremental_s"] / res["kura_full_s"]
    res["restore_vs_virtnbdrestore"] = res["virtnbdrestore_s"] / res["kura_restore_s"]
    if args.markdown:
        print(markdown(res))
    else:
        print(json.dumps(res, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def markdown(r: dict[str, Any]) -> str:
    mb = 1 << 20
    return "\n".join([
        "| measurement | time | note |",
        "|---|---|---|",
        f"| read allocated data over the NBD export | {r['read_only_s']:.2f} s | baseline |",
        f"| kura full backup | {r['kura_full_s']:.2f} s | {r['full_vs_read_only']:.2f}x the "
        f"read; peak RSS {r['kura_full_rss'] / mb:.0f} MiB |",
        f"| virtnbdbackup -l copy -z | {r['virtnbdbackup_s']:.2f} s | kura "
        f"{r['full_vs_virtnbdbackup']:.1f}x faster |",
        f"| (of which engine, without CLI start-up of {r['kura_startup_s']:.1f} s) | "
        f"{r['kura_full_engine_s']:.2f} s | {r['kura_full_engine_s'] / r['read_only_s']:.2f}x "
        "the read |",
        f"| kura incremental after 1 % changed | {r['kura_incremental_s']:.2f} s | "
        f"{100 * r['incremental_vs_full']:.0f} % of the full (engine: "
        f"{r['kura_incremental_engine_s']:.2f} s) |",
        f"| kura restore (qcow2) | {r['kura_restore_s']:.2f} s | peak RSS "
        f"{r['kura_restore_rss'] / mb:.0f} MiB |",
        f"| virtnbdrestore | {r['virtnbdrestore_s']:.2f} s | kura "
        f"{r['restore_vs_virtnbdrestore']:.1f}x faster |",
        f"| stored | kura {r['repo_bytes'] / mb:.0f} MiB (encrypted, zstd-{r['compression_level']})"
        f" | virtnbdbackup "
        f"{r['virtnbdbackup_bytes'] / mb:.0f} MiB (lz4) |",
    ])


if __name__ == "__main__":
    sys.exit(main())
