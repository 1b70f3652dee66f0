"""TPM state (swtpm) is captured and put back for the restored VM.

The lab's nodes keep /var/lib/libvirt in their own mount namespaces, which this
test process cannot see, so this one runs against the host's own libvirtd
(``qemu:///system``) and skips when there is none.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import libvirt
import pytest

from kura.engine.backup import BackupOptions, backup_vm
from kura.engine.restore import RestoreOptions, restore_vm
from kura.hypervisor.connection import open_connection
from kura.hypervisor.domain import SWTPM_ROOT
from kura.repository import Repository

pytestmark = pytest.mark.lab


@pytest.fixture
def host_libvirt() -> str:
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    try:
        libvirt.open("qemu:///system").close()
    except libvirt.libvirtError:
        pytest.skip("no libvirtd at qemu:///system on this host")
    return "qemu:///system"


def test_tpm_state_roundtrip(host_libvirt: str, repo: Repository) -> None:
    work = Path(tempfile.mkdtemp(prefix="kura-tpm-", dir="/var/tmp"))
    work.chmod(0o755)
    disk = work / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M"], check=True)
    os.chmod(disk, 0o666)
    name = work.name
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
           "<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>"
           "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           f"<source file='{disk}'/><target dev='sda' bus='sata'/></disk>"
           "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
           "</devices></domain>")
    with open_connection(host_libvirt) as hv:
        dom = hv.conn.defineXML(xml)
        restored = None
        try:
            dom.create()
            r = backup_vm(hv, repo, name, BackupOptions(consistency="off"))
            m = repo.get_snapshot(r.restore_point)
            assert "tpm.tar" in m.configs
            res = restore_vm(hv, repo, m, RestoreOptions(new_name=f"{name}-r",
                                                         target_dir=work / "r"))
            restored = hv.lookup(f"{name}-r")
            assert res.tpm == f"{SWTPM_ROOT}/{res.uuid}"
            old = Path(SWTPM_ROOT) / dom.UUIDString() / "tpm2" / "tpm2-00.permall"
            new = Path(res.tpm) / "tpm2" / "tpm2-00.permall"
            assert new.read_bytes() == old.read_bytes()
        finally:
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                              | libvirt.VIR_DOMAIN_UNDEFINE_TPM)
            if restored is not None:
                restored.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_TPM)
            shutil.rmtree(work, ignore_errors=True)
