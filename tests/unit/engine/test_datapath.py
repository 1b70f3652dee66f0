"""The data path's hand-off: NBD chunk buffers go to the writer and come back."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import cast

import pytest

from kura.engine import datapath
from kura.errors import HypervisorError, IntegrityError
from kura.nbd import NbdSource
from kura.repository import SourceRef, StoreSink
from kura.repository.testing import TEST_CHUNK, make_repo

CS = TEST_CHUNK


class FakeSource:
    """``read_buffers`` over bytes in memory, with pooled, scribbled-on-release buffers."""

    def __init__(self, data: bytes, *, fail_at: int | None = None,
                 second: FakeSource | None = None) -> None:
        self.data = data
        self.second = second
        self.closed = False
        self.size = len(data)
        self.fail_at = fail_at
        self.free: list[bytearray] = []
        self.out = 0
        self.made = 0

    def connect_again(self) -> FakeSource | None:
        return self.second

    def close(self) -> None:
        self.closed = True

    def read_buffers(self, indexes: Iterable[int], chunk_size: int, *,
                     inflight: int = 6) -> Iterator[tuple[int, memoryview, Callable[[], None]]]:
        self.read: list[int] = []
        for idx in indexes:
            self.read.append(idx)
            if idx == self.fail_at:
                raise HypervisorError("export went away")
            piece = self.data[idx * chunk_size:(idx + 1) * chunk_size]
            if not self.free:
                self.free.append(bytearray(chunk_size))
                self.made += 1
            buf = self.free.pop()
            buf[:len(piece)] = piece
            self.out += 1
            yield idx, memoryview(buf)[:len(piece)], self._release(buf)

    def _release(self, buf: bytearray) -> Callable[[], None]:
        done: list[int] = []

        def release() -> None:
            assert not done, "released twice"
            done.append(1)
            self.out -= 1
            buf[:] = b"\xee" * len(buf)
            self.free.append(buf)

        return release


def _data() -> bytes:
    same = os.urandom(CS)
    return b"".join([same, bytes(CS), os.urandom(CS), b"x" * CS, same] * 4) + os.urandom(100)


@pytest.mark.parametrize("connections", [1, 2])
def test_copy_stores_every_chunk_and_gives_every_buffer_back(tmp_path: Path,
                                                             connections: int) -> None:
    repo = make_repo(tmp_path / "r")
    data = _data()
    second = FakeSource(data)
    src = FakeSource(data, second=second)
    indexes = list(range(-(-len(data) // CS)))
    plan = datapath.ReadPlan("vda", "full", indexes, CS, len(data))
    seen: list[int] = []
    with repo.begin_snapshot(SourceRef("image", "i", "i"), node="n", workers=2) as w:
        dw = w.add_disk("vda", len(data))
        done = datapath.copy(cast(NbdSource, src), dw, plan, inflight=3, on_bytes=seen.append,
                             connections=connections)
        m = w.commit()
    assert done == len(data) == sum(seen) and src.out == second.out == 0
    # Buffers held at once by one source: its reader's, the queue's, the one being
    # handed over, the writer's window.
    assert max(src.made, second.made) <= 1 + 3 + 1 + 2 * 2
    if connections == 2:  # each connection read one half, in order; the second is closed
        assert src.read == indexes[:len(indexes) // 2] and second.closed
        assert second.read == indexes[len(indexes) // 2:]
    else:
        assert src.read == indexes and not hasattr(second, "read")
    assert not src.closed
    assert repo.open_disk(m, "vda").pread(0, len(data)) == data


@pytest.mark.parametrize("fail", ["reader", "writer"])
def test_copy_gives_buffers_back_when_it_fails(tmp_path: Path, fail: str) -> None:
    repo = make_repo(tmp_path / "r")
    data = _data()
    second = FakeSource(data, fail_at=12 if fail == "reader" else None)
    src = FakeSource(data, second=second)
    plan = datapath.ReadPlan("vda", "full", list(range(len(data) // CS)), CS, len(data))

    class Broken(StoreSink):
        def put(self, chunk_id: bytes, blob: bytes | bytearray) -> None:
            raise IntegrityError("disk on fire")

    sink = Broken(repo.store) if fail == "writer" else None
    with repo.begin_snapshot(SourceRef("image", "i", "i"), node="n", sink=sink) as w:
        dw = w.add_disk("vda", len(data))
        with pytest.raises((HypervisorError, IntegrityError)):
            datapath.copy(cast(NbdSource, src), dw, plan, inflight=3)
            dw.finish()
        w.abort()
    assert src.out == second.out == 0 and second.closed
