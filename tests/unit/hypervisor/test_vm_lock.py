"""The per-VM backup lock on a node (``kura.hypervisor.view.vm_lock``)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
from pathlib import Path

import pytest

from kura.errors import LockedError
from kura.hypervisor.view import vm_lock

UUID = "6f1c1f0e-4a8e-4c1e-9b5e-2d6c7a1f0b11"


def test_one_holder_at_a_time_and_no_file_left(tmp_path: Path) -> None:
    with vm_lock(tmp_path, UUID):
        assert (tmp_path / f"{UUID}.lock").exists()
        with pytest.raises(LockedError, match="another kura backup"), vm_lock(tmp_path, UUID):
            pass
    assert list(tmp_path.iterdir()) == []
    with vm_lock(tmp_path, UUID):  # free again
        pass
    assert list(tmp_path.iterdir()) == []


def _hold(root: str, ready: multiprocessing.synchronize.Event,
          release: multiprocessing.synchronize.Event) -> None:
    with vm_lock(Path(root), UUID):
        ready.set()
        release.wait(10)


def test_held_by_another_process_is_refused_then_free(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    p.start()
    try:
        assert ready.wait(10)
        with pytest.raises(LockedError), vm_lock(tmp_path, UUID):
            pass
    finally:
        release.set()
        p.join(10)
    with vm_lock(tmp_path, UUID):
        pass


def test_a_lock_file_removed_under_a_waiting_opener_is_not_trusted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An flock on a file the previous holder already removed protects nothing:
    the lock opens the path again and locks the file that is there now."""
    path = tmp_path / f"{UUID}.lock"
    path.write_text("")
    real_open = os.open
    calls: list[int] = []

    def open_then_unlink(p: Path, flags: int, mode: int = 0o777) -> int:
        fd = real_open(p, flags, mode)
        calls.append(fd)
        if len(calls) == 1:
            os.unlink(path)  # the previous holder finishes between our open and flock
        return fd

    monkeypatch.setattr(os, "open", open_then_unlink)
    with vm_lock(tmp_path, UUID):
        assert len(calls) == 2 and path.exists()  # opened again after the stale lock
    assert not path.exists()
