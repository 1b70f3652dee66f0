"""The scenarios of issue 6, run one after the other on one lab, in one process.

Each scenario adds :class:`~suite.model.Row` objects to the run's results;
a scenario that fails is recorded as "not measured: <why>" and the run goes
on. Sizes come from a :class:`Profile` (``FULL`` is issue 6's, ``QUICK`` a
quarter-scale check for development).

1. **Full backup of a running VM** (``s1``): vdb = the base image (2 GiB,
   1 GiB allocated). kura (``kura backup``), ``virtnbdbackup -l copy -z``,
   the NBD read limit (nbdcopy; and kura's own libnbd reader alone) and the
   CPU floor; borg and restic read the
   same data as a raw file. The repository engineer's ``bench/repo_bench.py``
   is run as is (a child process, its JSON read back) for kura's image path
   and borg, which are also issue 2's figures.
2. **Incremental after 1 % changed**: two identical VMs (``s2k`` for kura,
   ``s2v`` for virtnbdbackup: virtnbdbackup refuses to run next to another
   tool's checkpoints) with an 8 GiB vdb holding the same 1 GiB; a full
   backup each; then 1 % of the disk is rewritten *by the guest* in random
   1 MiB ``dd`` writes from ``/dev/urandom`` at the same offsets in both VMs;
   then kura's incremental and ``virtnbdbackup -l inc``. Bytes read: kura's
   own count; virtnbdbackup's uncompressed data file.
3. **Restore** of 1 and of 2 (the full + incremental chain) to a qcow2 disk,
   by kura and virtnbdrestore (and borg/restic for 1), each result checked
   against the source with ``qemu-img compare`` (not timed).
4. **Dedup**: N shut-off VMs whose vdb are clones of one template with 5 %
   scattered unique data each; one ``kura backup`` job over all of them, and
   one borg archive and one restic snapshot of the same disks as raw files;
   stored bytes. virtnbdbackup has no dedup: one clone is measured and its
   output counted N times (marked as derived).
5. **Server job**: 8 running VMs (4 per node, 64 MiB of unique data each)
   in one server job, against the same VMs backed up one by one with the
   standalone CLI (one ``kura backup`` per node, its VMs in turn); the server's
   share of the CPU (see :mod:`suite.serverjob`). The server engineer's
   ``bench/server_bench.py`` makes the same comparison against the engine
   called in-process (no CLI start-up at all).
6. **Scaling**: running VMs with disks of 1, 4 and 16 GiB, once with the same
   256 MiB allocated ("sparse") and once with an eighth to a quarter allocated
   (256 MiB, 512 MiB, 2 GiB: "proportional"); kura's full backup time and peak
   memory, and the NBD read limit for each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite import cpu, data, serverjob
from suite.labenv import BenchLab
from suite.measure import GIB, MIB, BenchError, drop_caches, du, quiet
from suite.model import (
    BORG,
    G1,
    G2F,
    G2I,
    G3A,
    G3B,
    G4,
    G5,
    G6,
    KURA_IMAGE,
    KURA_IMAGE_RESTORE,
    NBDCOPY,
    ONE_BY_ONE,
    READ_LOOP,
    SERVER_JOB,
    VNB_COPY,
    Results,
    Row,
)
from suite.tools import PASSPHRASE, Borg, Kura, Restic, VirtNbdBackup

HERE = Path(__file__).resolve().parent.parent  # bench/



@dataclass(frozen=True)
class Profile:
    name: str
    scale: float  # of the base image (1.0 = 2 GiB, 1 GiB allocated)
    s2_virtual: int
    change_fraction: float
    clones: int
    clone_unique: float
    clone_virtual: int
    scaling: tuple[tuple[int, int], ...]  # (virtual, allocated)
    job_vms: int
    job_allocated: int
    repeat: int


FULL = Profile("full", 1.0, 8 * GIB, 0.01, 10, 0.05, GIB,
               ((GIB, 256 * MIB), (4 * GIB, 256 * MIB), (16 * GIB, 256 * MIB),
                (4 * GIB, 512 * MIB), (16 * GIB, 2 * GIB)), job_vms=8, job_allocated=64 * MIB,
               repeat=1)
QUICK = Profile("quick", 0.25, 2 * GIB, 0.01, 3, 0.05, 256 * MIB,
                ((256 * MIB, 64 * MIB), (1 * GIB, 64 * MIB), (1 * GIB, 256 * MIB)),
                job_vms=4, job_allocated=32 * MIB, repeat=1)


def engine_note(results: list[Any]) -> str:
    """Where a kura backup's time went, from its own JSON: the data phase and the
    engine's total; the rest of the measured time is process start-up and exit."""
    data = total = 0.0
    for r in results:
        if isinstance(r, dict):
            phases = r.get("phases")
            data += float(phases.get("data", 0.0)) if isinstance(phases, dict) else 0.0
            total += float(r.get("seconds", 0.0))
    return f"engine {total:.2f} s, of which data phase {data:.2f} s"


def size_label(n: int) -> str:
    return f"{n / GIB:g} GiB" if n >= GIB else f"{n / MIB:g} MiB"


class Suite:
    """One run of the scenarios (see the module docstring)."""

    def __init__(self, workdir: Path, profile: Profile, results: Results,
                 log: Callable[[str], None]) -> None:
        self.work = workdir
        self.p = profile
        self.r = results
        self.log = log
        self.cache = workdir / "cache" / profile.name
        self.lab = BenchLab(workdir)
        self.base: data.BaseImage | None = None
        self.speeds: cpu.CpuSpeeds | None = None

    # -- plumbing ----------------------------------------------------------------------

    def path(self, name: str) -> Path:
        p = self.work / "runs" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def guarded(self, label: str, fn: Callable[[], None]) -> None:
        t0 = time.monotonic()
        self.log(f"== {label}")
        try:
            fn()
        except Exception as exc:  # one scenario's failure must not end the run
            self.r.skipped[label] = f"failed: {exc}".splitlines()[0][:300]
            self.log(f"!! {label} failed: {exc}")
            traceback.print_exc(file=sys.stderr)
        self.log(f"   {label}: {time.monotonic() - t0:.0f} s")

    def verify(self, image: Path, fmt: str, reference: Path, ref_fmt: str) -> None:
        """Untimed: the restored image must equal the source, byte for byte."""
        out = quiet(["qemu-img", "compare", "-U", "-f", fmt, "-F", ref_fmt, str(image),
                     str(reference)])
        if "identical" not in out:
            raise BenchError(f"restored {image} differs from {reference}: {out.strip()}")

    @property
    def base_image(self) -> data.BaseImage:
        if self.base is None:
            raise BenchError("the base image was not prepared")
        return self.base

    # -- set-up ------------------------------------------------------------------------

    def prepare(self) -> None:
        self.log("preparing data (cached after the first run) and the lab")
        self.base = data.base_image(self.cache, self.p.scale)
        self.lab.up()
        b = self.base
        pieces = cpu.sample(b.raw, 0, b.random, min(b.random, 128 * MIB))
        self.speeds = cpu.measure(pieces)
        self.r.context.update({
            "profile": self.p.name, "cpus": os.cpu_count(), "accel": self.lab.lab.accel,
            "base_image": {"size": b.size, "random": b.random, "text": b.text},
            "cpu": {"hash": self.speeds.hash, "compress": self.speeds.compress,
                    "encrypt": self.speeds.encrypt, "pipeline": self.speeds.pipeline,
                    "compressed_ratio": self.speeds.compressed_ratio,
                    "sample_bytes": self.speeds.sample_bytes},
            "versions": tool_versions(),
            "cold_cache": True,
            "kura_tree": kura_tree(),
            "load_start": os.getloadavg()[0],
        })

    # -- 1 and 3a ----------------------------------------------------------------------

    def scenario1(self) -> None:
        b = self.base_image
        uri = self.lab.uri("node-a")
        vm = self.lab.create("s1", b.qcow2)
        kura = Kura(self.path("s1-kura"))
        vnb = VirtNbdBackup(uri, self.lab.peer_scratch)
        restic = Restic(self.path("s1-restic"))
        samples: dict[str, list[float]] = {}
        engine_notes: list[str] = []
        extra: dict[str, dict[str, int | None]] = {}

        def note(tool: str, seconds: float, **kw: int | None) -> None:
            samples.setdefault(tool, []).append(seconds)
            extra[tool] = kw

        for i in range(self.p.repeat):
            self.log(f"   round {i + 1}/{self.p.repeat}")
            lim = self.lab.read_limit(vm)
            note(NBDCOPY, lim.seconds, rss=lim.rss)
            note(READ_LOOP, self.lab.read_loop(vm))
            kura.init()
            run_, res = kura.backup_vms(["s1"], uri, full=True)
            note("kura", run_.seconds, rss=run_.rss, stored=kura.stored(),
                 read=res[0].get("bytes_read"))
            engine_notes.append(engine_note(res))
            out = self.path("s1-vnb")
            v = vnb.backup("s1", out, "copy", compress=True)
            note(VNB_COPY, v.seconds, rss=v.rss, stored=du(out))
            restic.init()
            rr = restic.backup(b.raw)
            note("restic backup (raw file)", rr.seconds, rss=rr.rss, stored=restic.stored())
        roles = {"kura": "kura", NBDCOPY: "limit", READ_LOOP: "limit"}
        notes = {VNB_COPY: "output includes the guest kernel and initrd "
                 "(18 MB) it copies for direct-boot VMs",
                 NBDCOPY: "reads the allocated data of the same pull-mode export",
                 READ_LOOP: "kura's own reader alone, same export, in-process"}
        for tool, secs in samples.items():
            kw = extra[tool]
            note_text = notes.get(tool, "")
            if tool == "kura":
                note_text = "; ".join(engine_notes)
            self.r.add(Row(G1, tool, roles.get(tool, "peer"), secs, b.allocated,
                           stored=kw.get("stored"), rss=kw.get("rss"), read=kw.get("read"),
                           note=note_text))
        if self.speeds is not None:
            cores = os.cpu_count() or 1
            self.r.add(Row(G1, f"CPU: BLAKE3+zstd-3+AES-GCM on {cores} cores", "derived",
                           [self.speeds.limit_seconds(b.allocated, cores)], b.allocated,
                           note="computed from the one-core speed of the primitives"))
        self.repo_bench()

        # 3a: restores of scenario 1
        out = self.path("s1-restore.qcow2")
        kr = kura.restore_disk("s1", "vdb", out)
        self.verify(out, "qcow2", b.raw, "raw")
        self.r.add(Row(G3A, "kura", "kura", [kr.seconds], b.allocated, rss=kr.rss,
                       note="VM disk vdb → qcow2, verified"))
        out.unlink()
        dest = self.path("s1-vnr")
        vr = vnb.restore(self.path("s1-vnb"), "vdb", dest)
        restored = next(dest.glob("vdb*.qcow2"))
        self.verify(restored, "qcow2", b.raw, "raw")
        self.r.add(Row(G3A, "virtnbdrestore", "peer", [vr.seconds], b.allocated, rss=vr.rss,
                       note="vdb → qcow2, verified"))
        shutil.rmtree(dest)
        dest = self.path("s1-restic-restore")
        rs = restic.restore(dest)
        self.verify(dest / b.raw.name, "raw", b.raw, "raw")
        self.r.add(Row(G3A, "restic restore (raw file)", "peer", [rs.seconds], b.allocated,
                       rss=rs.rss, note="no sparse restore: writes the zeros too"))
        shutil.rmtree(dest)
        self.lab.remove("s1")
        del vm

    def repo_bench(self) -> None:
        """issue 2: the repository engineer's bench, run as it is, on the same image."""
        out = self.path("repo_bench.json")
        quiet([sys.executable, str(HERE / "repo_bench.py"), "--workdir", str(self.cache),
               "--scale", str(self.p.scale), "--json", str(out)])
        doc = json.loads(out.read_text())
        res = doc["results"]
        b = self.base_image

        def row(group: str, key: str, tool: str, role: str, note: str) -> None:
            if key not in res:
                return
            f = res[key]
            stored = f.get("repo_bytes")
            self.r.add(Row(group, tool, role, [float(f["seconds"])], b.allocated,
                           stored=int(stored) if stored is not None else None,
                           rss=int(f["rss"]) if "rss" in f else None, note=note))

        src = "bench/repo_bench.py"
        row(G1, "kura backup", KURA_IMAGE, "kura-alt", f"{src}; issue 2")
        row(G1, "borg create", BORG, "peer", f"{src}; issue 2")
        row(G3A, "kura restore", KURA_IMAGE_RESTORE, "kura-alt", f"{src}; issue 2")
        row(G3A, "borg extract", "borg extract --sparse (raw file)", "peer", src)
        for name in ("kura-repo", "borg-repo", "restored.raw", "borg-extract"):
            p = self.cache / name
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    # -- 2 and 3b ----------------------------------------------------------------------

    def scenario2(self) -> None:
        b = self.base_image
        disk8 = self.cache / f"image-{self.p.s2_virtual >> 20}M.qcow2"
        if not disk8.exists():
            tmp = disk8.with_suffix(".tmp")
            shutil.copyfile(b.qcow2, tmp)
            quiet(["qemu-img", "resize", "-q", "-f", "qcow2", str(tmp),
                   str(self.p.s2_virtual)])
            tmp.rename(disk8)
        uri = self.lab.uri("node-a")
        vk = self.lab.create("s2k", disk8)
        vv = self.lab.create("s2v", disk8)
        kura = Kura(self.path("s2-kura"))
        kura.init()
        vnb = VirtNbdBackup(uri, self.lab.peer_scratch)
        vout = self.path("s2-vnb")
        kf, fres = kura.backup_vms(["s2k"], uri, full=True)
        stored_full = kura.stored()
        self.r.add(Row(G2F, "kura", "kura", [kf.seconds], b.allocated, rss=kf.rss,
                       stored=stored_full, read=fres[0].get("bytes_read"),
                       note=engine_note(fres)))
        vf = vnb.backup("s2v", vout, "full")
        self.r.add(Row(G2F, "virtnbdbackup -l full", "peer", [vf.seconds], b.allocated,
                       rss=vf.rss, stored=du(vout)))

        blocks = round(self.p.s2_virtual * self.p.change_fraction / MIB)
        rng = np.random.default_rng(2026)
        offsets = sorted(int(o) for o in rng.choice(self.p.s2_virtual // MIB, blocks,
                                                    replace=False))
        script = ("for o in " + " ".join(map(str, offsets)) + "; do dd if=/dev/urandom "
                  "of=/dev/vdb bs=1048576 count=1 seek=$o 2>/dev/null || exit 1; done; sync")
        self.log(f"   guests write {blocks} random 1 MiB blocks")
        errors: list[BaseException] = []

        def write(vm_name: str) -> None:
            try:
                self.lab.lab.vm(vm_name).sh(script, timeout=600)
            except BaseException as exc:  # reported below, in the main thread
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(n,)) for n in ("s2k", "s2v")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        changed = blocks * MIB

        ki, res = kura.backup_vms(["s2k"], uri)
        kind = res[0].get("kind")
        self.r.add(Row(G2I, "kura", "kura", [ki.seconds], changed, rss=ki.rss,
                       stored=kura.stored() - stored_full, read=res[0].get("bytes_read"),
                       note=f"kind: {kind}; whole chunks touching a change are read; "
                            f"{engine_note(res)}"))
        vi = vnb.backup("s2v", vout, "inc")
        inc_bytes = VirtNbdBackup.data_bytes(vout, "*.inc.*.data")
        self.r.add(Row(G2I, "virtnbdbackup -l inc", "peer", [vi.seconds], changed, rss=vi.rss,
                       stored=inc_bytes, read=inc_bytes,
                       note="uncompressed stream: its size is what it read"))
        self.r.context["s2"] = {"changed_bytes": changed, "blocks": blocks,
                                "virtual": self.p.s2_virtual}
        # A running VM's qcow2 file is not a stable reference (QEMU keeps metadata in
        # memory): the restores below are compared with the disks once the VMs are down.
        vk.shutdown()
        vv.shutdown()

        # 3b: restore the chain
        out = self.path("s2-restore.qcow2")
        kr = kura.restore_disk("s2k", "vdb", out)
        self.verify(out, "qcow2", vk.disk_paths[1], "qcow2")
        self.r.add(Row(G3B, "kura", "kura", [kr.seconds], b.allocated + changed, rss=kr.rss,
                       note="latest restore point (the incremental), verified"))
        out.unlink()
        dest = self.path("s2-vnr")
        vr = vnb.restore(vout, "vdb", dest)
        restored = next(dest.glob("vdb*.qcow2"))
        self.verify(restored, "qcow2", vv.disk_paths[1], "qcow2")
        self.r.add(Row(G3B, "virtnbdrestore", "peer", [vr.seconds], b.allocated + changed,
                       rss=vr.rss, note="full + inc replayed, verified"))
        shutil.rmtree(dest)
        self.lab.remove("s2k")
        self.lab.remove("s2v")

    # -- 4 -----------------------------------------------------------------------------

    def scenario4(self) -> None:
        b = self.base_image
        fam = data.clone_family(self.cache, b, self.p.clones, self.p.clone_unique,
                                virtual=self.p.clone_virtual)
        n = len(fam.raws)
        total = n * fam.template_allocated
        names = [f"c{i:02d}" for i in range(n)]
        for name, q in zip(names, fam.qcow2s, strict=True):
            self.lab.create(name, q, node="node-a", start=False)
        uri = self.lab.uri("node-a")
        kura = Kura(self.path("s4-kura"))
        kura.init()
        kr, kres = kura.backup_vms(names, uri, full=True)
        ideal = fam.template_allocated + n * fam.unique_per_clone
        self.r.add(Row(G4, "kura", "kura", [kr.seconds], total, stored=kura.stored(),
                       rss=kr.rss, note=f"one job over {n} shut-off VMs; {engine_note(kres)}"))
        # Like kura's one job, one run of each peer over all the clones' raw images.
        borg = Borg(self.path("s4-borg"))
        borg.init()
        br = borg.create("clones", *fam.raws)
        self.r.add(Row(G4, "borg create zstd,3 (raw files)", "peer", [br.seconds], total,
                       stored=borg.stored(), rss=br.rss, note=f"one archive of the {n} images"))
        restic = Restic(self.path("s4-restic"))
        restic.init()
        rr = restic.backup(*fam.raws)
        self.r.add(Row(G4, "restic backup (raw files)", "peer", [rr.seconds], total,
                       stored=restic.stored(), rss=rr.rss, note=f"one snapshot of the {n} images"))
        vnb = VirtNbdBackup(uri, self.lab.peer_scratch)
        out = self.path("s4-vnb")
        vr = vnb.backup(names[0], out, "copy", compress=True)
        self.r.add(Row(G4, "virtnbdbackup -l copy -z", "peer", [vr.seconds * n], total,
                       stored=du(out) * n, rss=vr.rss,
                       note=f"no dedup: one clone measured, time and size ×{n}"))
        self.r.context["s4"] = {"clones": n, "template_allocated": fam.template_allocated,
                                "unique_per_clone": fam.unique_per_clone,
                                "ideal_uncompressed": ideal, "total_allocated": total}
        for name in names:
            self.lab.remove(name)

    # -- 5 -----------------------------------------------------------------------------

    def scenario5(self) -> None:
        b = self.base_image
        n = self.p.job_vms
        names = [f"j{i}" for i in range(n)]
        placement = {name: ("node-a", "node-b")[i % 2] for i, name in enumerate(names)}
        alloc = self.p.job_allocated
        disks = [data.synth_disk(self.cache, b, f"job-{i}-{alloc >> 20}M", GIB, alloc,
                                 seed=300 + i) for i in range(n)]
        vms = [self.lab.create(name, d.qcow2, node=placement[name], wait=False)
               for name, d in zip(names, disks, strict=True)]
        for vm in vms:
            vm.wait_agent(120)
        total = n * alloc

        alone = Kura(self.path("s5-standalone"))
        alone.init()
        secs, rss = [], 0
        for node in ("node-a", "node-b"):  # the standalone CLI backs up a node's VMs in turn
            on_node = [name for name in names if placement[name] == node]
            r, _ = alone.backup_vms(on_node, self.lab.uri(node), full=True)
            secs.append(r.seconds)
            rss = max(rss, r.rss)

        repo = Kura(self.path("s5-server-repo"))
        repo.init()
        work = self.path("s5-site")
        shutil.rmtree(work, ignore_errors=True)
        nodes = {node: self.lab.uri(node) for node in ("node-a", "node-b")}
        with serverjob.Site(work, repo.repo, nodes, PASSPHRASE) as site:
            site.wait_placed(placement)
            drop_caches()
            job = site.run_job(names)
        if job.vms_ok != n:
            raise BenchError(f"the server job ended {job.status} with {job.vms_ok} of {n} VMs "
                             f"backed up; see {work}")
        share = job.server_cpu / (job.server_cpu + job.agents_cpu)
        self.r.add(Row(G5, SERVER_JOB, "kura", [job.seconds], total, stored=repo.stored(),
                       rss=job.agent_rss,
                       note=f"{n} VMs, {n // 2} per node; server + agents CPU "
                            f"{job.server_cpu + job.agents_cpu:.1f} s, server "
                            f"{job.server_cpu:.1f} s; peak RSS: agent (column), server "
                            f"{job.server_rss / MIB:.0f} MiB"))
        self.r.add(Row(G5, ONE_BY_ONE, "kura-alt", [sum(secs)], total,
                       stored=alone.stored(), rss=rss,
                       note="standalone `kura backup VM... --full` on node-a, then on "
                            "node-b: one VM after the other"))
        self.r.context["server_cpu_share"] = share
        for name in names:
            self.lab.remove(name)

    # -- 6 -----------------------------------------------------------------------------

    def scenario6(self) -> None:
        b = self.base_image
        uri = self.lab.uri("node-a")
        for i, (virtual, alloc) in enumerate(self.p.scaling):
            label = f"{size_label(virtual)} disk, {size_label(alloc)} allocated"
            self.log(f"   {label}")
            disk = data.synth_disk(self.cache, b, f"scale-{virtual >> 20}M-{alloc >> 20}M",
                                   virtual, alloc, seed=100 + i)
            vm = self.lab.create("s6", disk.qcow2)
            kura = Kura(self.path("s6-kura"))
            kura.init()
            kr, res = kura.backup_vms(["s6"], uri, full=True)
            lim = self.lab.read_limit(vm)
            group = f"{G6}: {label}"
            self.r.add(Row(group, "kura", "kura", [kr.seconds], alloc, rss=kr.rss,
                           stored=kura.stored(), read=res[0].get("bytes_read"),
                           note=engine_note(res)))
            self.r.add(Row(group, NBDCOPY, "limit", [lim.seconds], alloc,
                           rss=lim.rss))
            self.r.scaling.append({"virtual": virtual, "allocated": alloc,
                                   "seconds": kr.seconds, "rss": kr.rss,
                                   "limit_seconds": lim.seconds,
                                   "series": "sparse" if alloc == self.p.scaling[0][1]
                                   else "proportional"})
            self.lab.remove("s6")
            shutil.rmtree(self.path("s6-kura"), ignore_errors=True)
        # the first point belongs to both series
        if self.r.scaling:
            first = dict(self.r.scaling[0])
            first["series"] = "proportional"
            self.r.scaling.insert(1, first)

    # -- the whole run -----------------------------------------------------------------

    def run_all(self, only: set[str] | None = None) -> None:
        t0 = time.monotonic()
        self.guarded("prepare", self.prepare)
        if "prepare" in self.r.skipped:
            return
        plan: list[tuple[str, str, Callable[[], None]]] = [
            ("1", "scenario 1 + 3 (restore of 1) + issue 2", self.scenario1),
            ("2", "scenario 2 + 3 (restore of 2)", self.scenario2),
            ("4", "scenario 4 (dedup)", self.scenario4),
            ("5", "scenario 5 (server job)", self.scenario5),
            ("6", "scenario 6 (scaling)", self.scenario6),
        ]
        for key, label, fn in plan:
            if only is None or key in only:
                self.guarded(label, fn)
        self.r.context["suite_seconds"] = time.monotonic() - t0
        self.r.context["load_end"] = os.getloadavg()[0]


def kura_tree() -> str:
    """The commit the measured kura was built from, and whether src/ had local changes."""
    root = HERE.parent
    try:
        head = quiet(["git", "-C", str(root), "rev-parse", "--short", "HEAD"]).strip()
        dirty = quiet(["git", "-C", str(root), "status", "--porcelain", "--", "src"]).strip()
    except (BenchError, OSError):
        return "unknown"
    n = len(dirty.splitlines())
    return head + (f" + uncommitted changes in {n} file{'s' if n > 1 else ''} of src/"
                   if dirty else "")


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20)
        except OSError:
            return "missing"
        text = (out.stdout or out.stderr).strip().splitlines()
        return text[0] if text else "?"

    return {"virtnbdbackup": first_line(["virtnbdbackup", "-V"]),
            "borg": first_line(["borg", "--version"]),
            "restic": first_line(["restic", "version"]),
            "nbdcopy": first_line(["nbdcopy", "--version"]),
            "qemu": first_line(["qemu-system-x86_64", "--version"])}
