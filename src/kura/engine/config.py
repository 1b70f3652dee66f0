"""Phase 2, configuration capture: what a VM is besides its disks.

Stored in the restore point as configuration blobs (deduplicated like disk
data):

``domain.xml``
    the persistent definition (``virsh dumpxml --inactive --security-info``;
    the live XML for a transient domain), what a restore redefines;
``nvram``
    the UEFI variable store named by ``<os><nvram>``, when there is one;
``tpm.tar``
    the swtpm state directory of an emulated TPM (``/var/lib/libvirt/swtpm/<uuid>``),
    as an uncompressed tar, when there is one.

A file that the domain names but that does not exist yet (an NVRAM store is
created on first start) is reported and skipped; one that exists but cannot be
read fails the phase, since a restore without it would not boot the same way.
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Any

from kura.engine.events import JobLog
from kura.errors import HypervisorError
from kura.hypervisor.domain import DomainInfo, inactive_xml
from kura.repository import SnapshotWriter

DOMAIN_XML = "domain.xml"
NVRAM = "nvram"
TPM = "tpm.tar"


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise HypervisorError(f"cannot read the {what} {path}: {exc.strerror}",
                              hint="kura must run as root on the VM's node") from exc


def tar_directory(path: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=".")
    return buf.getvalue()


def capture(w: SnapshotWriter, dom: Any, info: DomainInfo, log: JobLog) -> dict[str, int]:
    """Store the domain XML, NVRAM and TPM state; returns name -> bytes."""
    stored: dict[str, int] = {}
    xml = inactive_xml(dom).encode()
    w.add_config(DOMAIN_XML, xml)
    stored[DOMAIN_XML] = len(xml)
    if info.nvram:
        if os.path.exists(info.nvram):
            data = _read(info.nvram, "UEFI NVRAM")
            w.add_config(NVRAM, data)
            stored[NVRAM] = len(data)
        else:
            log.warning(f"UEFI NVRAM {info.nvram} does not exist yet (never started?): skipped")
    if info.tpm_dir:
        if os.path.isdir(info.tpm_dir):
            try:
                data = tar_directory(info.tpm_dir)
            except OSError as exc:
                raise HypervisorError(f"cannot read the TPM state {info.tpm_dir}: {exc}") from exc
            w.add_config(TPM, data)
            stored[TPM] = len(data)
        else:
            log.warning(f"TPM state directory {info.tpm_dir} does not exist: skipped")
    parts = ", ".join(f"{k} ({v} bytes)" for k, v in stored.items())
    log.info(f"stored {parts}")
    return stored
