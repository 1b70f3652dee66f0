"""LabNode helpers that need no running node: path mapping, anchor lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kura.errors import LabError
from kura.lab import host
from kura.lab.node import LabNode


def _node(tmp_path: Path) -> LabNode:
    return LabNode(name="node-a", address="127.0.9.2", directory=tmp_path / "node-a",
                   token="f" * 32, host_uuid="")


def test_host_path_maps_the_bind_mounts(tmp_path: Path) -> None:
    node = _node(tmp_path)
    d = node.directory
    assert node.host_path("/var/lib/libvirt/swtpm/U/tpm2") == d / "lib" / "swtpm" / "U" / "tpm2"
    assert node.host_path("/etc/libvirt") == d / "etc"
    assert node.host_path("/run/libvirt/libvirt-sock") == d / "run" / "libvirt-sock"
    assert node.host_path("/etc/hosts") == d / "hosts"
    assert node.host_path("/var/log/swtpm/libvirt") == d / "log" / "swtpm" / "libvirt"
    # Not under a bind mount: the same path on both sides (no prefix confusion).
    assert node.host_path("/var/lib/libvirtx/a") == Path("/var/lib/libvirtx/a")
    assert node.host_path("/var/tmp/repo") == Path("/var/tmp/repo")
    with pytest.raises(LabError, match="absolute"):
        node.host_path("var/lib/libvirt")


def test_anchor_is_the_oldest_process_with_the_token(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    node = _node(tmp_path)
    started = {101: 500, 102: 300, 103: 300, 104: None}
    monkeypatch.setattr(host, "pids_with_token", lambda token: list(started))
    monkeypatch.setattr(host, "start_time", lambda pid: started[pid])
    monkeypatch.setattr(host, "process_token", lambda pid: node.token)
    assert node.anchor_pid() == 102
    argv = node.exec_argv()
    assert argv == ["/usr/bin/nsenter", "--target", "102", "--mount", "--uts", "--"]
    # A PID that no longer carries the token (reused) is not taken.
    monkeypatch.setattr(host, "process_token", lambda pid: None if pid < 104 else node.token)
    with pytest.raises(LabError, match="not running"):
        node.anchor_pid()


def test_start_time_of_this_process() -> None:
    mine = host.start_time(os.getpid())
    assert mine is not None and mine > 0
    assert host.start_time(2**22 + 7) is None
