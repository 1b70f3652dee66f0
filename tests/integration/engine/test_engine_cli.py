"""``kura ls``, ``kura backup`` and ``kura restore`` for VMs, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kura.cli.main import main
from kura.lab import Lab
from kura.repository import Repository

pytestmark = pytest.mark.lab


def test_ls_backup_restore_commands(lab: Lab, lab_vm, repo: Repository, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    vm = lab_vm(node="node-b", storage="shared")
    uri = lab.node("node-b").uri
    monkeypatch.setenv("KURA_REPO", repo.location)

    assert main(["ls", "--connect", uri, "--json"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert tree["node"]["hostname"] == "node-b" and tree["node"]["host_uuid"]
    entry = next(v for v in tree["vms"] if v["name"] == vm.name)
    disk = entry["disks"][0]
    assert disk["storage"]["kind"] == "shared" and disk["format"] == "qcow2"
    assert disk["virtual_size"] == 256 << 20 and disk["change_tracking"]

    assert main(["--json", "backup", "--connect", uri, vm.name]) == 0
    assert main(["--json", "backup", "--connect", uri, vm.name, "--consistency", "require"]) == 0
    out = capsys.readouterr().out
    results = [json.loads(part) for part in out.replace("]\n[", "]\n\x00[").split("\x00")]
    assert results[0][0]["kind"] == "full" and results[1][0]["kind"] == "incremental"
    assert results[1][0]["consistency"] == "application"

    assert main(["backup", "--connect", uri, "no-such-vm"]) == 1
    assert "no VM named" in capsys.readouterr().err

    target = tmp_path / "vda.raw"
    assert main(["restore", f"{vm.name}@{results[1][0]['restore_point']}", "--disk", "vda",
                 "--output", str(target)]) == 0
    assert target.stat().st_size == 256 << 20
