"""The bench data: deterministic disk images, built once and cached.

- **base image** (scenarios 1-3 and issue 2): the repository engineer's
  synthetic image from ``bench/repo_bench.py`` (:func:`repo_bench.make_image`):
  2 GiB raw, 512 MiB random, then 512 MiB of unique log-like text, then 1 GiB
  of zeros (a hole). Converted to qcow2 it is a VM disk with 1 GiB allocated;
  grown to 8 GiB it is scenario 2's disk.
- **synthetic disks** (scenario 6): ``allocated`` bytes spread as up to 16
  equal segments over a disk of ``virtual`` bytes, each segment half random
  and half text. The text is the base image's text half, re-used but made
  unique: every 4 KiB page gets an 8-byte stamp (seed, page number), so no two
  chunks of any disk are equal and neither kura's fixed chunks nor the peers'
  content-defined chunks can deduplicate them (dedup would flatter the tool).
- **clone family** (scenario 4): a template (half the size of the base
  image's random part: 256 MiB at full scale, half random, half stamped text)
  and clones of it, each with ``unique_fraction`` of
  its allocated data overwritten by fresh random data in 1 MiB blocks at
  random 1 MiB-aligned offsets inside the allocated area (scattered, as a
  cloned VM diverges).

Everything is written as a sparse raw file and converted with ``qemu-img
convert -O qcow2`` (zeros stay unallocated). Results are cached under the
cache directory with a stamp of their parameters, so a rerun costs only
copies: the VMs always get fresh copies (``cp --sparse=always``), since
backups add bitmaps to qcow2 files and scenario 2 writes into them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import repo_bench

from suite.measure import MIB, quiet

PAGE = 4096


@dataclass(frozen=True)
class BaseImage:
    raw: Path
    qcow2: Path
    size: int  # virtual bytes
    random: int  # bytes of random data at offset 0
    text: int  # bytes of text right after it

    @property
    def allocated(self) -> int:
        return self.random + self.text


def _fresh(stamp: Path, params: dict[str, object], *outputs: Path) -> bool:
    """True when ``outputs`` exist and were made with exactly ``params``."""
    if not stamp.exists() or not all(p.exists() for p in outputs):
        return False
    try:
        return bool(json.loads(stamp.read_text()) == params)
    except ValueError:
        return False


def to_qcow2(raw: Path, dest: Path, *, virtual: int | None = None) -> None:
    tmp = dest.with_suffix(".tmp")
    quiet(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536",
           str(raw), str(tmp)])
    if virtual is not None:
        quiet(["qemu-img", "resize", "-q", "-f", "qcow2", str(tmp), str(virtual)])
    tmp.rename(dest)


def base_image(cache: Path, scale: float) -> BaseImage:
    """The issue-2 image (``repo_bench.make_image``) as raw and qcow2."""
    cache.mkdir(parents=True, exist_ok=True)
    raw = cache / "image.raw"
    repo_bench.make_image(raw, scale)  # cached by repo_bench itself
    part = raw.stat().st_size // 4
    qcow2 = cache / "image.qcow2"
    params: dict[str, object] = {"raw_size": raw.stat().st_size,
                                 "raw_mtime": raw.stat().st_mtime_ns}
    stamp = cache / "image.qcow2.json"
    if not _fresh(stamp, params, qcow2):
        to_qcow2(raw, qcow2)
        stamp.write_text(json.dumps(params))
    return BaseImage(raw=raw, qcow2=qcow2, size=raw.stat().st_size, random=part, text=part)


def stamp_pages(block: bytearray, seed: int, first_page: int) -> None:
    """Make every 4 KiB page of ``block`` unique: its first 8 bytes become a tag."""
    pages = np.frombuffer(block, dtype=np.uint64).reshape(-1, PAGE // 8)
    pages[:, 0] = (np.uint64(seed) << np.uint64(40)) + np.arange(
        first_page, first_page + len(pages), dtype=np.uint64)


class TextSource:
    """Endless unique text: the base image's text half, cycled and page-stamped."""

    def __init__(self, base: BaseImage, seed: int) -> None:
        self.base = base
        self.seed = seed
        self.pos = 0
        self.page = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        with open(self.base.raw, "rb") as f:
            while len(out) < n:
                f.seek(self.base.random + self.pos)
                piece = f.read(min(n - len(out), self.base.text - self.pos))
                out += piece
                self.pos = (self.pos + len(piece)) % self.base.text
        stamp_pages(out, self.seed, self.page)
        self.page += len(out) // PAGE
        return bytes(out)


def _write_segment(f: BinaryIO, offset: int, length: int, rng: np.random.Generator,
                   text: TextSource) -> None:
    """Half random, half text, in 16 MiB writes, at ``offset`` of an open file."""
    f.seek(offset)
    half = length // 2 // PAGE * PAGE
    left = half
    while left:
        n = min(left, 16 * MIB)
        f.write(rng.bytes(n))
        left -= n
    left = length - half
    while left:
        n = min(left, 16 * MIB)
        f.write(text.read(n))
        left -= n


@dataclass(frozen=True)
class SynthDisk:
    name: str
    virtual: int
    allocated: int
    qcow2: Path


def synth_disk(cache: Path, base: BaseImage, name: str, virtual: int, allocated: int,
               seed: int) -> SynthDisk:
    """A qcow2 disk of ``virtual`` bytes with ``allocated`` bytes of unique data."""
    qcow2 = cache / f"{name}.qcow2"
    stamp = cache / f"{name}.json"
    params: dict[str, object] = {"virtual": virtual, "allocated": allocated, "seed": seed,
                                 "text": base.text, "version": 1}
    if not _fresh(stamp, params, qcow2):
        raw = cache / f"{name}.raw"
        segments = max(1, min(16, allocated // (64 * MIB)))
        seg = allocated // segments // MIB * MIB
        spacing = virtual // segments // MIB * MIB
        rng = np.random.default_rng(seed)
        text = TextSource(base, seed)
        with open(raw, "wb") as f:
            f.truncate(virtual)
            for i in range(segments):
                _write_segment(f, i * spacing, seg, rng, text)
        to_qcow2(raw, qcow2)
        raw.unlink()
        stamp.write_text(json.dumps(params))
    return SynthDisk(name, virtual, allocated, qcow2)


@dataclass(frozen=True)
class CloneFamily:
    template_allocated: int
    unique_per_clone: int
    raws: list[Path]
    qcow2s: list[Path]


def clone_family(cache: Path, base: BaseImage, count: int, unique_fraction: float,
                 *, virtual: int) -> CloneFamily:
    """``count`` clones of one template, each with its own scattered unique data."""
    half = base.random // 4
    allocated = 2 * half
    blocks = max(1, round(allocated * unique_fraction / MIB))
    params: dict[str, object] = {"count": count, "fraction": unique_fraction,
                                 "virtual": virtual, "half": half, "version": 1}
    fam_dir = cache / "clones"
    raws = [fam_dir / f"clone-{i:02d}.raw" for i in range(count)]
    qcow2s = [fam_dir / f"clone-{i:02d}.qcow2" for i in range(count)]
    stamp = fam_dir / "family.json"
    if not _fresh(stamp, params, *raws, *qcow2s):
        shutil.rmtree(fam_dir, ignore_errors=True)
        fam_dir.mkdir(parents=True)
        template = fam_dir / "template.raw"
        rng = np.random.default_rng(4242)
        with open(template, "wb") as f:
            f.truncate(virtual)
            _write_segment(f, 0, allocated, rng, TextSource(base, 77))
        for i, (raw, qcow2) in enumerate(zip(raws, qcow2s, strict=True)):
            quiet(["cp", "--sparse=always", str(template), str(raw)])
            crng = np.random.default_rng(1000 + i)
            offsets = crng.choice(allocated // MIB, size=blocks, replace=False)
            with open(raw, "r+b") as f:
                for mib in sorted(int(o) for o in offsets):
                    f.seek(mib * MIB)
                    f.write(crng.bytes(MIB))
            to_qcow2(raw, qcow2)
        template.unlink()
        stamp.write_text(json.dumps(params))
    return CloneFamily(allocated, blocks * MIB, raws, qcow2s)


def fresh_copy(src: Path, dest: Path) -> Path:
    """A private sparse copy of a cached disk for one VM (mode 0666 for QEMU)."""
    dest.unlink(missing_ok=True)
    quiet(["cp", "--sparse=always", str(src), str(dest)])
    dest.chmod(0o666)
    return dest
