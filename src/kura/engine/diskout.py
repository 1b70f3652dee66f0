"""Writing a restored disk: raw (sparse file) or qcow2 (thin), without QEMU.

Both formats are written by the repository's restore loop
(:func:`kura.repository.reader.write_chunks`): worker threads each read,
decrypt, decompress and verify a chunk against its id (the repository's own id
function) and write it straight into the output, so nothing is written before
it is checked and no single thread carries every byte.

Raw images are written by the repository's own restorer: a sparse file, zero
chunks and zero 64 KiB ranges inside chunks left as holes.

qcow2 images are laid out and written by :class:`kura.engine.qcow2.Qcow2Writer`
(the index says up front which chunks hold data): zero chunks and zero
clusters stay unallocated, so the image is thin. No qemu-nbd, no socket: each
byte is copied once, from the verified chunk into the file.

Both are written under a temporary name beside the target, fsynced, and
renamed into place (then the directory is fsynced), so an interrupted or
failed restore (damaged chunk, full disk) never leaves a half-written image
under the real name; the temporary file is removed on every failure path.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

from kura.engine.qcow2 import Qcow2Writer
from kura.errors import UsageError
from kura.repository import Manifest, Repository
from kura.repository.backend import fsync_dir
from kura.repository.index import ZERO_CHUNK
from kura.repository.reader import write_chunks, write_error

FORMATS = ("raw", "qcow2")


def default_workers() -> int:
    """Chunks verified and written at once: hashing, zstd, AES and writes release the
    GIL, and a worker waiting for a (cold) chunk read leaves its core to another."""
    return 2 * (os.cpu_count() or 2)


def write_disk(repo: Repository, manifest: Manifest, disk: str, output: Path, fmt: str, *,
               workers: int | None = None,
               progress: Callable[[int], None] | None = None) -> int:
    """Restore ``disk`` of ``manifest`` to ``output`` in ``fmt``; returns its size."""
    if fmt not in FORMATS:
        raise UsageError(f"restore format must be raw or qcow2, not {fmt!r}")
    entry = manifest.disk(disk)
    workers = workers or default_workers()
    if fmt == "raw":
        repo.restore_disk(manifest, disk, output, progress=progress, workers=workers)
        return entry.size
    reader = repo.open_disk(manifest, disk)
    data = (i for i, chunk_id in enumerate(reader.ids) if chunk_id != ZERO_CHUNK)
    tmp = output.parent / f".{output.name}.kura-{uuid.uuid4().hex[:8]}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            image = Qcow2Writer(fd, entry.size, reader.chunk_size, data)

            def sink(index: int, plain: bytes | None) -> None:
                if plain is not None:  # zero chunks are not passed (no ``zeros=True``)
                    image.write_chunk(index, plain)

            write_chunks(reader, sink, workers=workers, progress=progress)
            image.finish()
            os.fsync(fd)  # durable before it is published under the real name
        finally:
            os.close(fd)
        os.rename(tmp, output)
        fsync_dir(output.parent)
    except OSError as exc:
        raise write_error(exc, output) from None
    finally:
        tmp.unlink(missing_ok=True)
    return entry.size
