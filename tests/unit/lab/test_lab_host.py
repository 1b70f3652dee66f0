"""Host checks and process handling of the lab (no libvirt needed)."""

from __future__ import annotations

import subprocess

import pytest

from kura.errors import LabError
from kura.lab import host, testing


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "is_root", lambda: False)
    with pytest.raises(LabError, match="must run as root") as exc:
        host.require_host()
    assert "sudo kura lab up" in str(exc.value)
    assert testing.lab_skip_reason() is not None
    assert "root" in (testing.lab_skip_reason() or "")


def test_missing_packages_without_apt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "is_root", lambda: True)
    monkeypatch.setattr(host, "missing_packages", lambda: ["tini", "ovmf"])
    monkeypatch.setattr(host.shutil, "which", lambda _name: None)
    with pytest.raises(LabError, match="tini ovmf"):
        host.require_host()


def test_run_reports_command_and_stderr() -> None:
    with pytest.raises(LabError, match=r"exit 3.*boom"):
        host.run(["sh", "-c", "echo boom >&2; exit 3"])
    with pytest.raises(LabError, match="command not found"):
        host.run(["/nonexistent/kura-tool"])
    assert host.run(["sh", "-c", "echo hi"]).stdout == b"hi\n"


def test_kill_pids_and_unknown_token() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        host.kill_pids([proc.pid], grace=1)
        assert proc.wait(timeout=5) is not None
    finally:
        proc.kill()
    assert host.pids_with_token("no-such-token-" + "0" * 16) == []
    assert host.kill_token("no-such-token") == 0
