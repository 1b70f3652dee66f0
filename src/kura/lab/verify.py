"""Checking a disk written by the guest workload, on the host, without booting it.

The workload (``kura/lab/guest/workload``) writes file *N* with the line
``kura-workload seq=N`` repeated ``((N % 8) + 1) * 64`` times, renames it into
``/workload/files/DDDDD/fNNNNNNNN`` and then commits ``last_seq=N`` to
``/workload/manifest``. A copy of the disk is consistent exactly when:

1. the file system is clean after what a mount would do first (replaying the
   journal): ``e2fsck -E journal_only -y`` on a scratch copy, then
   ``e2fsck -fn`` must report no problem;
2. the manifest parses, and every file 1..last_seq exists with exactly the
   expected content (files beyond last_seq may be there or not).

The disk image (qcow2 or raw) is first converted to a raw scratch copy with
``qemu-img convert`` (so the original is never modified, even by journal
replay), then the ``/workload`` tree is extracted with ``debugfs -R rdump``
and compared in Python. The result is a :class:`Verdict`.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kura.errors import LabError
from kura.lab.host import run

WORKLOAD_DIR = "workload"
MAX_REPORTED = 20


@dataclass
class Verdict:
    """The machine-readable result of checking a disk."""

    ok: bool
    fsck_clean: bool
    last_seq: int
    files_checked: int
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def expected_content(seq: int) -> bytes:
    """What the workload writes into file number ``seq``."""
    return f"kura-workload seq={seq}\n".encode() * (((seq % 8) + 1) * 64)


def file_relpath(seq: int) -> str:
    return f"files/{seq // 1000:05d}/f{seq:08d}"


def check_tree(tree: Path) -> tuple[int, int, list[str]]:
    """Check an extracted ``workload`` directory: (last_seq, files checked, errors)."""
    errors: list[str] = []
    manifest = tree / "manifest"
    if not manifest.exists():
        return 0, 0, ["workload manifest missing"]
    m = re.fullmatch(r"last_seq=(\d+)\n?", manifest.read_text(errors="replace"))
    if not m:
        return 0, 0, [f"workload manifest damaged: {manifest.read_bytes()[:60]!r}"]
    last_seq = int(m.group(1))
    checked = 0
    bad = 0
    for seq in range(1, last_seq + 1):
        checked += 1
        path = tree / file_relpath(seq)
        problem = None
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problem = f"file {seq} ({file_relpath(seq)}) missing"
        else:
            want = expected_content(seq)
            if data != want:
                problem = (f"file {seq} ({file_relpath(seq)}) has wrong content: "
                           f"{len(data)} bytes, expected {len(want)}")
        if problem:
            bad += 1
            if bad <= MAX_REPORTED:
                errors.append(problem)
    if bad > MAX_REPORTED:
        errors.append(f"... and {bad - MAX_REPORTED} more damaged files")
    return last_seq, checked, errors


def verify_image(image: Path, *, fmt: str = "qcow2", scratch_dir: Path | None = None) -> Verdict:
    """Check a disk image that carries the workload's ext4 file system."""
    if not image.exists():
        raise LabError(f"disk image {image} does not exist")
    if fmt not in ("qcow2", "raw"):
        raise LabError(f"disk format must be qcow2 or raw, not {fmt!r}")
    work = Path(tempfile.mkdtemp(prefix="kura-verify-", dir=scratch_dir))
    try:
        raw = work / "disk.raw"
        # -U: the image may be open in a running VM; we read a point-in-time copy.
        run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", image, raw], timeout=600)
        errors: list[str] = []
        replay = run(["e2fsck", "-E", "journal_only", "-y", raw], check=False)
        if replay.returncode >= 4:
            text = (replay.stdout + replay.stderr).decode(errors="replace").strip()
            return Verdict(False, False, 0, 0,
                           [f"no readable ext4 file system: {text.splitlines()[-1:] }"])
        fsck = run(["e2fsck", "-fn", raw], check=False, timeout=600)
        fsck_clean = fsck.returncode == 0
        if not fsck_clean:
            lines = [ln for ln in fsck.stdout.decode(errors="replace").splitlines()
                     if ln and not ln.startswith(("Pass ", "e2fsck "))]
            errors.append(f"e2fsck -fn exit {fsck.returncode}: " + " / ".join(lines[:8]))
        tree = work / "tree"
        tree.mkdir()
        run(["debugfs", "-R", f"rdump /{WORKLOAD_DIR} {tree}", raw], timeout=600)
        last_seq, checked, file_errors = check_tree(tree / WORKLOAD_DIR)
        errors += file_errors
        return Verdict(ok=fsck_clean and not errors, fsck_clean=fsck_clean,
                       last_seq=last_seq, files_checked=checked, errors=errors)
    finally:
        shutil.rmtree(work, ignore_errors=True)
