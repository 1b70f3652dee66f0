"""The direct raw-file source of image backups: allocation from SEEK_DATA/SEEK_HOLE."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kura.engine.image import RawFile
from kura.errors import UsageError

MIB = 1 << 20


def test_data_chunks_follow_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse.raw"
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(5 * MIB)
        f.write(b"x" * 10)
        f.seek(20 * MIB - 1)
        f.write(b"y" * 2)  # straddles chunks 4 and 5 (4 MiB chunks)
    raw = RawFile(path)
    try:
        assert raw.size == 64 * MIB
        got = raw.data_chunks(4 * MIB)
        # file systems allocate in blocks: the chunks holding data must be there
        assert {1, 4} <= set(got) and set(got) <= {1, 4, 5}
        assert got == sorted(got)
        assert raw.pread(5 * MIB, 10) == b"x" * 10
        with pytest.raises(UsageError, match="shrank"):
            raw.pread(64 * MIB - 2, 10)
    finally:
        raw.close()


def test_full_file_and_empty_file(tmp_path: Path) -> None:
    full = tmp_path / "full.raw"
    full.write_bytes(os.urandom(3 * MIB + 5))
    raw = RawFile(full)
    assert raw.data_chunks(MIB) == [0, 1, 2, 3]
    raw.close()
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    raw = RawFile(empty)
    assert raw.size == 0 and raw.data_chunks(MIB) == []
    raw.close()
