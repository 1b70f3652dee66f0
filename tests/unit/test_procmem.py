"""The daemons' malloc setting (glibc)."""

from __future__ import annotations

import platform

import pytest

from kura.procmem import return_large_buffers


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_large_buffers_are_mapped_on_their_own() -> None:
    assert return_large_buffers() is True
    buf = bytearray(4 << 20)  # served by mmap now; freed back to the system
    del buf
