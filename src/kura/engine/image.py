"""Backing up and restoring disk image files (raw, qcow2, anything qemu-nbd reads).

Backup: the image is served read-only by a private qemu-nbd (``kura.nbd``);
``base:allocation`` says which fixed-size chunks hold data, and only those are
read and handed to the repository's writer. Holes and zero ranges become zero
chunks without being read. An image has no change tracking, so every backup
reads every data chunk; chunks already in the repository are deduplicated (their
ids are found and touched, nothing is rewritten). The source's latest restore
point is recorded as the parent (chain and sequence), unless ``full`` starts a
new chain. The restore point has one disk, ``image``, with the image's format,
path and virtual size in its attributes; consistency is ``offline``.

A raw image that is a regular file is read directly (``SEEK_DATA``/``SEEK_HOLE``
for its allocation, ``pread`` for data): the same extents and bytes qemu-nbd
would serve, without copying every byte through a second process and a socket.

Restore: the disk is written raw and sparse, or as a thin qcow2, by
:func:`kura.engine.diskout.write_disk` (every chunk checked against its id as
it is written; a temporary name until complete).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kura.engine.diskout import write_disk
from kura.errors import UsageError
from kura.nbd import NbdSource, image_format
from kura.repository import Manifest, Repository, SourceRef
from kura.repository.manifest import check_object_name

DISK_NAME = "image"
ProgressFn = Callable[[int], None]


class ImageSource(Protocol):
    size: int

    def data_chunks(self, chunk_size: int) -> list[int]: ...

    def read_chunks(self, indexes: Iterable[int], chunk_size: int) -> Iterator[tuple[int, bytes]]:
        ...


class RawFile:
    """A raw image file read directly (see module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise UsageError(f"cannot open image {path}: {exc.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def data_chunks(self, chunk_size: int) -> list[int]:
        out: list[int] = []
        pos = 0
        while pos < self.size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                return list(range(-(-self.size // chunk_size)))  # no hole support: read all
            end = os.lseek(self.fd, start, os.SEEK_HOLE)
            first = max(start // chunk_size, out[-1] + 1 if out else 0)
            out.extend(range(first, (end - 1) // chunk_size + 1))
            pos = end
        return out

    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as exc:
            raise UsageError(f"cannot read image {self.path} at {offset}: {exc.strerror}") \
                from None
        if len(data) != length:
            raise UsageError(f"image {self.path} shrank while it was being backed up")
        return data

    def read_chunks(self, indexes: Iterable[int], chunk_size: int) -> Iterator[tuple[int, bytes]]:
        for index in indexes:
            offset = index * chunk_size
            yield index, self.pread(offset, min(chunk_size, self.size - offset))

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def open_image(path: Path, fmt: str) -> Iterator[ImageSource]:
    """The image as a chunk source: a raw file directly, anything else through qemu-nbd."""
    if fmt == "raw" and path.is_file():
        raw = RawFile(path)
        try:
            yield raw
        finally:
            raw.close()
        return
    with NbdSource.open_image(path, fmt) as src:
        yield src


@dataclass(frozen=True)
class ImageBackupOptions:
    image: Path
    name: str
    node: str = field(default_factory=socket.gethostname)
    full: bool = False
    fmt: str | None = None


@dataclass(frozen=True)
class ImageRestoreOptions:
    output: Path
    fmt: str = "raw"
    force: bool = False


def backup_image(repo: Repository, options: ImageBackupOptions, *,
                 progress: ProgressFn | None = None,
                 on_total: ProgressFn | None = None) -> Manifest:
    """Back up one image file as a restore point of source ``options.name``."""
    check_object_name("image", options.name)
    image = Path(options.image)
    if not image.is_file() and not image.is_block_device():
        raise UsageError(f"image {image} does not exist or is not a file")
    fmt = options.fmt or image_format(image)
    source = SourceRef(kind="image", key=options.name, name=options.name)
    parent = None if options.full else repo.latest(source.key)
    if parent is not None and parent.verify_state == "failed":
        parent = None
    with open_image(image, fmt) as src:
        size = src.size
        if on_total:
            on_total(size)
        chunk_size = repo.chunk_size
        count = -(-size // chunk_size)
        data = [i for i in src.data_chunks(chunk_size) if i < count]
        kind = "incremental" if parent is not None else "full"
        reason = ("image files have no change tracking: every data chunk re-read, stored "
                  "chunks deduplicated") if parent is not None else (
                  "--full" if options.full else "first backup of this image")
        with repo.begin_snapshot(source, node=options.node, parent=parent, kind=kind,
                                 reason=reason) as writer:
            writer.meta["consistency"] = "offline"
            writer.meta["image"] = {"path": str(image.resolve()), "format": fmt}
            disk = writer.add_disk(DISK_NAME, size, attrs={
                "format": fmt, "path": str(image.resolve()), "virtual_size": size})
            done = 0
            for index, chunk in src.read_chunks(data, chunk_size):
                disk.write_chunk(index, chunk)
                if progress:
                    progress(len(chunk))
                done += len(chunk)
            disk.finish()
            manifest = writer.commit()
        if progress and size > done:
            progress(size - done)
    return manifest


def restore_image(repo: Repository, ref: Manifest | str, options: ImageRestoreOptions, *,
                  progress: ProgressFn | None = None,
                  on_total: ProgressFn | None = None) -> Manifest:
    """Write the image of restore point ``ref`` to ``options.output``."""
    manifest = repo.get_snapshot(ref)
    if not manifest.disks:
        raise UsageError(f"restore point {manifest.id} has no disk")
    disk = manifest.disks[0]
    output = Path(options.output)
    if options.fmt not in ("raw", "qcow2"):
        raise UsageError(f"unknown output format {options.fmt!r} (raw or qcow2)")
    if output.exists() and not output.is_block_device() and not options.force:
        raise UsageError(f"{output} already exists", hint="pass --force to overwrite it")
    if not output.parent.is_dir():
        raise UsageError(f"directory {output.parent} does not exist")
    if on_total:
        on_total(disk.size)
    write_disk(repo, manifest, disk.name, output, options.fmt, progress=progress)
    return manifest
