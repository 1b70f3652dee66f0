"""Writing a new qcow2 image directly, chunk by chunk, from several threads.

A restore knows before it reads any data which chunks of the disk hold data
(the index), so the whole image layout can be fixed up front, without QEMU:

    cluster 0        header (version 3, 64 KiB clusters, 16-bit refcounts)
    L1 table         one entry per 512 MiB of virtual disk
    refcount table   and the refcount blocks, sized for the largest possible file
    L2 tables        one per 512 MiB region holding at least one data chunk
    data clusters    allocated in the order the chunks are written

``Qcow2Writer.write_chunk`` may be called from several threads at once: it
takes the next free host clusters for the chunk's non-zero 64 KiB clusters (a
counter under a lock), writes them with one ``pwritev``, and writes the
chunk's L2 entries in place. All-zero clusters and chunks are not written and
stay unallocated: they read as zeros (no backing file), and the image stays
thin. ``finish`` writes the refcounts (every cluster up to the end of the file
is used exactly once), the L1 table and, last, the header; until then the file
is not a valid image. Nothing is cached: memory is the caller's chunks.

Every L1/L2 entry carries the COPIED flag (refcount exactly 1), as QEMU writes
them; ``qemu-img check`` finds no leak and no error in the result.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable

from kura.repository.reader import GRANULE, nonzero_runs, pwritev_all, start_writeback

CLUSTER_BITS = GRANULE.bit_length() - 1  # 64 KiB, QEMU's default
REFCOUNT_ORDER = 4  # 16-bit refcounts, QEMU's default
COPIED = 1 << 63

# version 3 header up to and including the compression type byte (+ padding)
_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQIIB7x")
HEADER_LENGTH = _HEADER.size  # 112
_MAGIC = b"QFI\xfb"


class Qcow2Writer:
    """A new qcow2 file of ``size`` bytes whose data chunks are ``data_chunks``.

    ``cluster_bits`` other than 16 only serve tests (small clusters reach several
    L2 tables and refcount blocks with small images).
    """

    def __init__(self, fd: int, size: int, chunk_size: int, data_chunks: Iterable[int], *,
                 cluster_bits: int = CLUSTER_BITS) -> None:
        self.cluster = cluster = 1 << cluster_bits
        self.cluster_bits = cluster_bits
        self.l2_entries = cluster // 8
        self.refs_per_block = cluster * 8 >> REFCOUNT_ORDER
        if not 9 <= cluster_bits <= 21 or chunk_size % cluster or \
                (self.l2_entries * cluster) % chunk_size:
            raise ValueError(f"chunk size {chunk_size} does not fit {cluster}-byte clusters")
        self.fd = fd
        self.size = -(-size // 512) * 512  # QEMU counts whole sectors (as qemu-img create)
        self.chunk_size = chunk_size
        self.l1_size = max(1, -(-self._clusters(self.size) // self.l2_entries))
        chunks_per_l2 = self.l2_entries * cluster // chunk_size
        used: set[int] = set()
        data_max = 0  # data clusters if no cluster of the data chunks were zero
        for i in data_chunks:
            used.add(i // chunks_per_l2)
            data_max += self._clusters(min(chunk_size, size - i * chunk_size))
        tables = sorted(used)
        l1_clusters = self._clusters(self.l1_size * 8)
        # refcount blocks must cover every cluster, themselves and their table included
        blocks = table_clusters = 1
        while True:
            total = 1 + l1_clusters + table_clusters + blocks + len(tables) + data_max
            need = -(-total // self.refs_per_block)
            need_table = self._clusters(need * 8)
            if need <= blocks and need_table <= table_clusters:
                break
            blocks, table_clusters = max(blocks, need), max(table_clusters, need_table)
        self.l1_offset = cluster
        self.reftable_offset = self.l1_offset + l1_clusters * cluster
        self.reftable_clusters = table_clusters
        self.refblocks_offset = self.reftable_offset + table_clusters * cluster
        self.refblocks = blocks
        l2_start = self.refblocks_offset + blocks * cluster
        self.l2_offsets = {t: l2_start + n * cluster for n, t in enumerate(tables)}
        self._next = (l2_start + len(tables) * cluster) // cluster  # next free host cluster
        self._lock = threading.Lock()

    def _clusters(self, nbytes: int) -> int:
        return -(-nbytes // self.cluster)

    def write_chunk(self, index: int, data: bytes) -> None:
        """Write chunk ``index`` (its full plaintext): data clusters and L2 entries."""
        cluster = self.cluster
        runs = nonzero_runs(data, cluster)
        if not runs:
            return
        count = sum(self._clusters(end - start) for start, end in runs)
        with self._lock:
            host = self._next
            self._next += count
        view = memoryview(data)
        pwritev_all(self.fd, [view[start:end] for start, end in runs], host * cluster)
        start_writeback(self.fd, host * cluster, count * cluster)
        entries = [0] * self._clusters(len(data))
        for start, end in runs:
            for c in range(start // cluster, self._clusters(end)):
                entries[c] = (host * cluster) | COPIED
                host += 1
        first = index * self.chunk_size // cluster  # guest cluster of the chunk's start
        table, slot = divmod(first, self.l2_entries)
        pwritev_all(self.fd, [memoryview(struct.pack(f">{len(entries)}Q", *entries))],
                    self.l2_offsets[table] + slot * 8)

    def finish(self) -> None:
        """Write refcounts, the L1 table and the header; size the file."""
        cluster, per_block = self.cluster, self.refs_per_block
        end = self._next  # clusters in use: [0, end)
        os.ftruncate(self.fd, end * cluster)
        table = [self.refblocks_offset + n * cluster for n in range(self.refblocks)]
        pwritev_all(self.fd, [memoryview(struct.pack(f">{len(table)}Q", *table))],
                    self.reftable_offset)
        ones = memoryview(struct.pack(">H", 1) * per_block)
        for n in range(self.refblocks):
            used = min(per_block, max(0, end - n * per_block))
            if used:
                pwritev_all(self.fd, [ones[: used * 2]], self.refblocks_offset + n * cluster)
        l1 = [0] * self.l1_size
        for t, offset in self.l2_offsets.items():
            l1[t] = offset | COPIED
        pwritev_all(self.fd, [memoryview(struct.pack(f">{len(l1)}Q", *l1))], self.l1_offset)
        header = _HEADER.pack(
            _MAGIC, 3,  # magic, version
            0, 0,  # backing file offset, size
            self.cluster_bits, self.size,
            0,  # no encryption
            self.l1_size, self.l1_offset,
            self.reftable_offset, self.reftable_clusters,
            0, 0,  # snapshots
            0, 0, 0,  # incompatible, compatible, autoclear features
            REFCOUNT_ORDER, HEADER_LENGTH,
            0)  # compression type: zlib
        # followed by the end of the header extensions (8 zero bytes, already there)
        pwritev_all(self.fd, [memoryview(header)], 0)
