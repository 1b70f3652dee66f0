"""Disk indexes: the chunk ids of one disk of one restore point.

An index is stored as a blob at ``indexes/<snapshot id>/<disk>.idx`` (binding:
that name). Its plaintext (integers big-endian)::

    magic "KURI" | version u8 (=1) | 3 zero bytes | size u64 | chunk_size u32 |
    count u32 | count x 32-byte chunk id

``count`` is ``ceil(size / chunk_size)``; chunk ``i`` covers bytes
``[i*chunk_size, min((i+1)*chunk_size, size))``. The id ``ZERO_CHUNK`` (32 zero
bytes) marks an all-zero chunk, which is never stored. Every index describes a
complete disk, whatever its restore point's parent. The manifest records the
SHA-256 of the index blob, so an index cannot be swapped for another one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kura.errors import IntegrityError, UnsupportedFormat
from kura.repository.crypto import ID_SIZE

MAGIC = b"KURI"
VERSION = 1
HEADER = struct.Struct(">4sB3sQII")
ZERO_CHUNK = bytes(ID_SIZE)


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def chunk_length(index: int, size: int, chunk_size: int) -> int:
    """Length of chunk ``index`` of a disk of ``size`` bytes (the last may be short)."""
    return min(chunk_size, size - index * chunk_size)


@dataclass(frozen=True)
class DiskIndex:
    size: int
    chunk_size: int
    ids: list[bytes]

    def encode(self) -> bytes:
        if len(self.ids) != chunk_count(self.size, self.chunk_size):
            raise ValueError("index chunk count does not match its size")
        header = HEADER.pack(MAGIC, VERSION, bytes(3), self.size, self.chunk_size, len(self.ids))
        return header + b"".join(self.ids)

    @classmethod
    def decode(cls, data: bytes, what: str) -> DiskIndex:
        if len(data) < HEADER.size:
            raise IntegrityError(f"{what}: index truncated ({len(data)} bytes)")
        magic, version, pad, size, chunk_size, count = HEADER.unpack_from(data)
        if magic != MAGIC or pad != bytes(3):
            raise IntegrityError(f"{what}: not a kura index (bad magic)")
        if version != VERSION:
            raise UnsupportedFormat(
                f"{what}: index format version {version} is not supported (this kura reads "
                f"{VERSION})", hint="written by a newer kura? upgrade kura")
        if chunk_size <= 0 or count != chunk_count(size, chunk_size):
            raise IntegrityError(
                f"{what}: index header inconsistent (size {size}, chunk size {chunk_size}, "
                f"{count} chunks)")
        if len(data) != HEADER.size + count * ID_SIZE:
            raise IntegrityError(
                f"{what}: index has {len(data)} bytes, expected {HEADER.size + count * ID_SIZE}")
        body = memoryview(data)[HEADER.size:]
        ids = [bytes(body[i * ID_SIZE:(i + 1) * ID_SIZE]) for i in range(count)]
        return cls(size=size, chunk_size=chunk_size, ids=ids)
