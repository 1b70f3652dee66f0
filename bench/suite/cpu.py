"""The machine's raw hash / compress / encrypt speed (the CPU half of the limit).

A backup into a deduplicated, compressed, encrypted repository must at least
hash every byte it reads (the chunk id), compress it, and encrypt what the
compressor leaves. This module times exactly those primitives, with the same
libraries and parameters a new kura repository uses (keyed BLAKE3 ids, zstd
level 3 through the repository's own ``compress``, which skips data whose
samples do not shrink, AES-256-GCM), on a sample of the bench data (half
random, half text, in pieces of the default chunk size), on one thread, in
this process:

- ``hash``: keyed BLAKE3 of the plaintext (the chunk id);
- ``compress``: the repository's zstd level 3 of the plaintext;
- ``encrypt``: AES-256-GCM of the compressed output (timed per input byte);
- ``pipeline``: all three in a row, per input byte, one core.

``cpu_limit_seconds`` turns the one-core pipeline speed into the least time
``cores`` cores need for ``nbytes`` when they share the work perfectly: a
derived floor, not a measurement of any tool. It is an optimistic floor on a
machine whose cores are also running QEMU and other engineers' tests.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import blake3
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kura.repository.blob import compress
from kura.repository.config import DEFAULT_CHUNK_SIZE

PIECE = DEFAULT_CHUNK_SIZE


@dataclass(frozen=True)
class CpuSpeeds:
    """Bytes per second of plaintext, one core."""

    hash: float
    compress: float
    encrypt: float
    pipeline: float
    sample_bytes: int
    compressed_ratio: float  # compressed / plaintext on the sample

    def limit_seconds(self, nbytes: int, cores: int) -> float:
        return nbytes / (self.pipeline * max(1, cores))


def sample(raw: Path, random_at: int, text_at: int, each: int) -> list[bytes]:
    """``each`` bytes of random data and of text from the base image, in 4 MiB pieces."""
    pieces: list[bytes] = []
    with open(raw, "rb") as f:
        for start in (random_at, text_at):
            f.seek(start)
            left = each
            while left:
                block = f.read(min(PIECE, left))
                pieces.append(block)
                left -= len(block)
    return pieces


def measure(pieces: list[bytes]) -> CpuSpeeds:
    key = os.urandom(32)
    aes = AESGCM(os.urandom(32))
    total = sum(len(p) for p in pieces)

    t0 = time.perf_counter()
    for p in pieces:
        blake3.blake3(p, key=key).digest()
    t_hash = time.perf_counter() - t0

    t0 = time.perf_counter()
    compressed = [compress(p, 3) or p for p in pieces]
    t_comp = time.perf_counter() - t0

    t0 = time.perf_counter()
    for c in compressed:
        aes.encrypt(os.urandom(12), c, None)
    t_enc = time.perf_counter() - t0

    t0 = time.perf_counter()
    for p in pieces:
        blake3.blake3(p, key=key).digest()
        aes.encrypt(os.urandom(12), compress(p, 3) or p, None)
    t_all = time.perf_counter() - t0

    ratio = sum(len(c) for c in compressed) / total
    return CpuSpeeds(hash=total / t_hash, compress=total / t_comp, encrypt=total / t_enc,
                     pipeline=total / t_all, sample_bytes=total, compressed_ratio=ratio)
