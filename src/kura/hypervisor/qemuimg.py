"""What ``qemu-img`` says about an image file: sizes, backing chain, bitmaps.

``qemu-img info -U --backing-chain --output=json`` is read with ``-U``
(force-share) so it works while a VM has the image open; the answer is then a
snapshot that may be slightly stale, which is fine for inventory and for
checking that a persistent bitmap exists. Bitmap flags matter: a bitmap that
carries ``in-use`` in a closed image was not written back cleanly (QEMU
crashed) and is *inconsistent*: it must not be trusted.

Also the two small operations kura needs on shut-off images: creating an empty
image for a restore and removing a stray persistent bitmap.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

from kura.errors import HypervisorError


@dataclass(frozen=True)
class Bitmap:
    name: str
    granularity: int
    flags: tuple[str, ...]

    @property
    def consistent(self) -> bool:
        return "in-use" not in self.flags


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing: tuple[tuple[str, str], ...] = ()  # (path, format) from the first backing file down
    bitmaps: tuple[Bitmap, ...] = field(default=())

    def bitmap(self, name: str) -> Bitmap | None:
        return next((b for b in self.bitmaps if b.name == name), None)


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except FileNotFoundError as exc:
        raise HypervisorError("qemu-img is not installed", hint="apt-get install qemu-utils") \
            from exc
    except subprocess.TimeoutExpired as exc:
        raise HypervisorError(f"{' '.join(argv[:2])} timed out on {argv[-1]}") from exc
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise HypervisorError(f"qemu-img {argv[1]} {argv[-1]}: {msg}")
    return proc.stdout


def _bitmaps(entry: dict[str, Any]) -> tuple[Bitmap, ...]:
    data = entry.get("format-specific", {}).get("data", {})
    return tuple(Bitmap(str(b["name"]), int(b.get("granularity", 0)), tuple(b.get("flags", ())))
                 for b in data.get("bitmaps", ()))


def image_info(path: str) -> ImageInfo:
    """Sizes, format, backing chain and persistent bitmaps of an image file."""
    out = _run(["qemu-img", "info", "-U", "--backing-chain", "--output=json", path])
    entries = json.loads(out)
    if isinstance(entries, dict):
        entries = [entries]
    top = entries[0]
    backing = tuple((str(e.get("filename", "")), str(e.get("format", ""))) for e in entries[1:])
    return ImageInfo(
        path=path,
        format=str(top.get("format", "raw")),
        virtual_size=int(top.get("virtual-size", 0)),
        actual_size=int(top.get("actual-size", 0)),
        backing=backing,
        bitmaps=_bitmaps(top),
    )


def add_bitmap(path: str, name: str) -> None:
    """Add an enabled persistent bitmap to a qcow2 image no process has open."""
    _run(["qemu-img", "bitmap", "--add", "--enable", path, name])


def remove_bitmap(path: str, name: str) -> None:
    """Remove a persistent bitmap from a qcow2 image no process has open."""
    _run(["qemu-img", "bitmap", "--remove", path, name])
