"""Shut-off and saved VMs: read the disk images themselves, and keep the VM off.

A shut-off VM needs no freeze and no copy-before-write view: its images do
not change as long as nothing opens them for writing. kura serves each image
read-only with its own ``qemu-nbd`` *with QEMU's image locking on*
(``NbdSource.open_image(..., share=False)``). qemu-nbd then holds the
"consistent read" lock, which excludes writers: if anyone starts the VM while
the backup runs, its QEMU fails with ``Failed to get "write" lock`` and the
VM stays off until the backup ends. The order is: open every disk (taking
the locks), *then* re-check that the VM is still off, so there is no window
in which a start could slip through; the job log says so.

A *saved* VM (``virsh managedsave``) is off too, but its disks belong with the
memory image in the save file: the disks alone are crash-consistent, and the
restore point says so. Network disks are never read offline.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from kura.engine.events import JobLog
from kura.errors import HypervisorError
from kura.hypervisor.domain import DomainInfo, domain_state
from kura.nbd import NbdSource

LOCK_NOTE = ("disks are served read-only by qemu-nbd holding QEMU's image lock: "
             "a start of the VM fails with 'Failed to get \"write\" lock' until the backup ends")


def prepare(dom: Any, info: DomainInfo, stack: contextlib.ExitStack, log: JobLog
            ) -> tuple[str, list[tuple[str, NbdSource]]]:
    """Phases 3 and 4 for a VM that is off: (consistency, open sources per disk)."""
    with log.phase("quiesce"):
        if info.state == "saved":
            consistency = "crash"
            log.warning("the VM is saved (managed save): its disks go with the memory state in "
                        "the save image, so the disks alone are crash-consistent")
        else:
            consistency = "offline"
            log.info("the VM is shut off: nothing to freeze (offline-consistent)")
    sources: list[tuple[str, NbdSource]] = []
    with log.phase("view"):
        for d in info.disks:
            if not d.path:
                raise HypervisorError(f"disk {d.target} of {info.name} has no local path")
            try:
                src = stack.enter_context(NbdSource.open_image(Path(d.path), d.format,
                                                               share=False))
            except HypervisorError as exc:
                raise HypervisorError(
                    f"cannot open disk {d.target} of {info.name} for an offline backup: "
                    f"{exc.message}", hint="is the VM starting, or is the image used elsewhere?",
                ) from exc
            sources.append((d.target, src))
        now = domain_state(dom)
        if now not in ("shut off", "saved"):
            raise HypervisorError(f"VM {info.name} started ({now}) while its offline backup "
                                  "began", hint="back it up again: it will be read live")
        log.info(LOCK_NOTE)
    return consistency, sources
