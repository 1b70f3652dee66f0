"""NbdSource against a real qemu-nbd serving real qcow2 and raw images."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kura.errors import HypervisorError, UsageError
from kura.nbd import NbdSource

MiB = 1 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-io") is None,
    reason="needs qemu-utils (qemu-nbd, qemu-io)",
)
nbd = pytest.importorskip("nbd", reason="needs python3-libnbd")


def _image(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"disk.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "100M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", fmt, "-c", "write -P 0x41 0 1M", "-c", "write -P 0x42 10M 5M",
         "-c", "write -z 20M 4M", "-c", "write -P 0x43 99M 1M", str(path)],
        check=True, capture_output=True,
    )
    return path


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_reads_only_allocated_chunks_with_right_bytes(tmp_path: Path, fmt: str) -> None:
    path = _image(tmp_path, fmt)
    with NbdSource.open_image(path) as src:
        assert src.size == 100 * MiB
        chunks = src.data_chunks(4 * MiB)
        assert chunks == [0, 2, 3, 24]
        got = dict(src.read_chunks(chunks, 4 * MiB, inflight=3))
    raw = path.read_bytes() if fmt == "raw" else None
    expected0 = b"A" * MiB + bytes(3 * MiB)
    assert got[0] == expected0
    assert got[2] == bytes(2 * MiB) + b"B" * 2 * MiB
    assert got[3] == b"B" * 3 * MiB + bytes(MiB)
    assert got[24] == bytes(3 * MiB) + b"C" * MiB
    if raw is not None:
        for idx, data in got.items():
            assert data == raw[idx * 4 * MiB:(idx + 1) * 4 * MiB]


def test_short_last_chunk(tmp_path: Path) -> None:
    path = tmp_path / "odd.raw"
    path.write_bytes(b"x" * (5 * MiB + 4096))  # qemu-nbd exports whole sectors
    with NbdSource.open_image(path, "raw") as src:
        chunks = src.data_chunks(4 * MiB)
        assert chunks == [0, 1]
        sizes = [len(d) for _, d in src.read_chunks(chunks, 4 * MiB)]
    assert sizes == [4 * MiB, MiB + 4096]


def test_exported_qcow2_bitmap_gives_dirty_chunks(tmp_path: Path) -> None:
    path = tmp_path / "bm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 1 0 8M", str(path)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(path), "cp1"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 2 40M 64k", str(path)], check=True,
                   capture_output=True)
    with NbdSource.open_image(path, bitmap="cp1") as src:
        assert src.dirty_chunks(4 * MiB) == [10]
        assert src.data_chunks(4 * MiB) == [0, 1, 10]


def test_missing_bitmap_and_missing_image_are_clear_errors(tmp_path: Path) -> None:
    path = _image(tmp_path, "qcow2")
    with pytest.raises(HypervisorError, match="cannot serve image"):
        NbdSource.open_image(path, bitmap="nope")
    with pytest.raises(UsageError, match="does not exist"):
        NbdSource.open_image(tmp_path / "absent.qcow2")


def test_read_buffers_are_pooled_across_sources(tmp_path: Path) -> None:
    # libnbd 1.14 keeps a reference to every buffer it reads into: every source must
    # draw on one shared pool, or memory grows by each source's read window.
    from kura.nbd.source import _POOL

    path = tmp_path / "pool.raw"
    path.write_bytes(b"y" * (16 * MiB))
    before = _POOL.free_count()  # earlier reads in this process left buffers there
    sizes = []
    for _ in range(5):
        with NbdSource.open_image(path, "raw") as src:
            for _ in src.read_chunks(src.data_chunks(4 * MiB), 4 * MiB, inflight=4):
                pass
        sizes.append(_POOL.free_count())
    assert len(set(sizes)) == 1, sizes
    assert sizes[0] <= before + 4  # 4 chunks in flight at the most


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("piece", [MiB, 4 * MiB, 3 * MiB])
def test_reused_buffers_never_show_stale_bytes(tmp_path: Path, fmt: str, piece: int) -> None:
    # Reading into pooled buffers that held other chunks: holes and zeroes inside
    # a chunk must read as zeroes, never as what the buffer held before.
    from kura.nbd.source import _POOL

    path = _image(tmp_path, fmt)
    expected = {0: b"A" * MiB + bytes(3 * MiB), 2: bytes(2 * MiB) + b"B" * 2 * MiB,
                3: b"B" * 3 * MiB + bytes(MiB), 24: bytes(3 * MiB) + b"C" * MiB}
    with NbdSource.open_image(path) as src:
        for order in ([24, 3, 2, 0], [0, 2, 3, 24], [3, 0, 24, 2]):
            for inflight in (1, 2):
                held = []
                for idx, data, release in src.read_buffers(order, 4 * MiB, inflight=inflight,
                                                           piece=piece):
                    assert bytes(data) == expected[idx], (order, inflight, idx)
                    held.append(release)
                    if len(held) > 1:
                        held.pop(0)()
                for release in held:
                    release()
                    release()  # a second call must not give the buffer twice
    free = _POOL.free_count()
    assert len({id(b) for bufs in _POOL._free.values() for b in bufs}) == free


def test_abandoned_read_gives_its_buffers_back(tmp_path: Path) -> None:
    from kura.nbd.source import _POOL

    path = tmp_path / "big.raw"
    path.write_bytes(b"z" * (32 * MiB))
    with NbdSource.open_image(path, "raw") as src:
        for _ in src.read_chunks(range(8), 4 * MiB, inflight=4):
            pass
        before = _POOL.free_count()
        gen = src.read_buffers(range(8), 4 * MiB, inflight=4)
        _idx, _data, release = next(gen)
        gen.close()  # three reads were still in flight: drained, their buffers back
        assert _POOL.free_count() == before - 1
        release()
        assert _POOL.free_count() == before
        # The handle is still usable.
        assert dict(src.read_chunks([7], 4 * MiB))[7] == b"z" * 4 * MiB


def test_second_connection_to_a_shared_export(tmp_path: Path) -> None:
    path = _image(tmp_path, "qcow2")
    with NbdSource.open_image(path) as private:
        assert private.connect_again() is None  # a private qemu-nbd serves one client
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(sock), "-e", "2",
                               "-t", str(path)])
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        with NbdSource.connect_unix(sock, "") as src:
            other = src.connect_again()
            assert other is not None
            with other:
                assert other.size == src.size
                assert dict(other.read_chunks([24], 4 * MiB)) == dict(
                    src.read_chunks([24], 4 * MiB))
                assert other.connect_again(timeout=1) is None  # the server takes two clients
    finally:
        server.terminate()
        server.wait()
