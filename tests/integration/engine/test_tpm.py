"""TPM state (swtpm) is captured by a backup and put back for the restored VM.

A lab node keeps its VMs' swtpm state in its own ``/var/lib/libvirt`` (a bind
mount inside the node's mount namespace), which a process on the host does not
see. So kura runs *on the node*, as the agent does in production: the CLI is
started through ``Lab.node_run`` (nsenter into the node's mount and UTS
namespaces) and talks to the node's libvirtd at ``qemu:///system``. The
repository lives under the lab root, which both sides see. The test itself
reads the node's files through ``LabNode.host_path``.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt
import pytest

from kura.hypervisor.domain import SWTPM_ROOT
from kura.lab import Lab, LabNode
from kura.lab.testing import VMFactory
from kura.repository import Repository

pytestmark = pytest.mark.lab

KURA = [sys.executable, "-m", "kura.cli.main"]
PASSPHRASE = "tpm-test-passphrase"
MARKER = "kura-test-marker"


def _files(directory: Path) -> dict[str, bytes]:
    """Every regular file below ``directory`` (relative path -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _tar_files(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member) if member.isfile() else None
            if f is not None:
                out[os.path.normpath(member.name)] = f.read()
    return out


def _kura_on(lab: Lab, node: str, repo: Path, *args: str) -> Any:
    """Run ``kura --json ARGS`` on ``node``; its parsed JSON output."""
    env = dict(os.environ, KURA_REPO=str(repo), KURA_PASSPHRASE=PASSPHRASE,
               KURA_SHARED_STORAGE=str(lab.shared_dir))
    proc = lab.node_run(node, [*KURA, "--json", *args], env=env, capture_output=True,
                        text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"kura {' '.join(args)} on {node}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def test_tpm_state_roundtrip_on_node(lab: Lab, lab_vm: VMFactory) -> None:
    vm = lab_vm(tpm=True, agent=False, node="node-b")
    node: LabNode = lab.node(vm.node)
    state_dir = f"{SWTPM_ROOT}/{vm.uuid}"
    seen = node.host_path(state_dir)
    # libvirt made the state on the node when the VM started: the node sees it,
    # the host's own /var/lib/libvirt does not.
    assert (seen / "tpm2" / "tpm2-00.permall").is_file()
    assert not Path(state_dir).exists()
    assert lab.node_run(node.name, ["test", "-f", f"{state_dir}/tpm2/tpm2-00.permall"]
                        ).returncode == 0
    repo_dir = lab.root / "tmp" / f"repo-{vm.name}"
    repo_dir.parent.mkdir(exist_ok=True)
    Repository.init(str(repo_dir), passphrase=PASSPHRASE.encode())
    repo = Repository.open(str(repo_dir), passphrase=PASSPHRASE.encode())

    # A live backup (swtpm running) takes the state directory as it is.
    live_marker = secrets.token_bytes(32)
    (seen / "tpm2" / MARKER).write_bytes(live_marker)
    live = _kura_on(lab, node.name, repo_dir, "backup", vm.name, "--connect",
                    "qemu:///system")
    assert len(live) == 1 and live[0]["ok"] and live[0]["consistency"] == "crash", live
    m_live = repo.get_snapshot(live[0]["restore_point"])
    assert m_live.node == node.name
    live_tar = _tar_files(repo.read_config(m_live, "tpm.tar"))
    assert live_tar[f"tpm2/{MARKER}"] == live_marker
    assert "tpm2/tpm2-00.permall" in live_tar

    # Shut off, swtpm leaves the state alone: the next backup's state is known exactly.
    vm.destroy()
    (seen / "tpm2" / MARKER).write_bytes(secrets.token_bytes(64))
    backed_up = _files(seen)
    assert {"tpm2/tpm2-00.permall", f"tpm2/{MARKER}"} <= set(backed_up)
    offline = _kura_on(lab, node.name, repo_dir, "backup", vm.name, "--connect",
                       "qemu:///system")
    assert len(offline) == 1 and offline[0]["ok"], offline
    assert (offline[0]["consistency"], offline[0]["kind"]) == ("offline", "incremental")
    manifest = repo.get_snapshot(offline[0]["restore_point"])
    assert _tar_files(repo.read_config(manifest, "tpm.tar")) == backed_up

    # The original moves on: what comes back must be the backed-up state.
    (seen / "tpm2" / MARKER).write_bytes(b"changed after the backup")
    new = f"{vm.name}-r"
    target = lab.shared_dir / new
    target.mkdir(mode=0o777)
    conn = lab.connect(node)
    try:
        res = _kura_on(lab, node.name, repo_dir, "restore", vm.name, "--as", new,
                       "--target-dir", str(target), "--connect", "qemu:///system")
        assert res["restore_point"] == manifest.id and res["defined"]
        assert res["tpm"] == f"{SWTPM_ROOT}/{res['uuid']}"
        restored_dir = node.host_path(res["tpm"])
        assert _files(restored_dir) == backed_up
        # The node's libvirtd starts swtpm (user tss) on the restored state.
        dom = conn.lookupByName(new)
        dom.create()
        time.sleep(1)
        assert dom.isActive()
        assert ET.fromstring(dom.XMLDesc(0)).find("devices/tpm/backend[@type='emulator']") \
            is not None

        # In place over the (shut-off) original: its state becomes the backed-up
        # one exactly, without files the original gained since.
        (seen / "tpm2" / "tpm2-00.volatilestate").write_bytes(b"stale")
        res = _kura_on(lab, node.name, repo_dir, "restore", vm.name, "--force",
                       "--connect", "qemu:///system")
        assert res["uuid"] == vm.uuid and res["tpm"] == state_dir
        assert _files(seen) == backed_up
    finally:
        try:
            dom = conn.lookupByName(new)
        except libvirt.libvirtError:
            pass
        else:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
