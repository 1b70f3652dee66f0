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

Incrementals work offline too: libvirt creates checkpoints only for running
domains, so kura adds the new checkpoint's bitmaps to the images itself
(``qemu-img bitmap --add --enable``, before qemu-nbd takes its lock) and
defines the metadata with ``REDEFINE``; the changed blocks since the parent's
checkpoint come from qemu-nbd exporting that bitmap (``-B``). The next start
of the VM records every write in the new bitmap.

A *saved* VM (``virsh managedsave``) is off too, but its disks belong with the
memory image in the save file: the disks alone are crash-consistent, the
restore point says so, and it is read in full without a new checkpoint (its
bitmaps may live in the save image). Network disks are never read offline.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from kura.engine.chain import ChainPlan
from kura.engine.events import JobLog
from kura.errors import HypervisorError
from kura.hypervisor import checkpoints
from kura.hypervisor.checkpoints import StoredCheckpoint
from kura.hypervisor.domain import DomainInfo, domain_state
from kura.nbd import NbdSource

LOCK_NOTE = ("disks are served read-only by qemu-nbd holding QEMU's image lock: "
             "a start of the VM fails with 'Failed to get \"write\" lock' until the backup ends")


def prepare(dom: Any, info: DomainInfo, plan: ChainPlan, new_checkpoint: str | None,
            node: str, stack: contextlib.ExitStack, log: JobLog
            ) -> tuple[str, list[tuple[str, NbdSource]], StoredCheckpoint | None]:
    """Phases 3 and 4 for a VM that is off: (consistency, sources per disk, new checkpoint)."""
    with log.phase("quiesce"):
        if info.state == "saved":
            consistency = "crash"
            log.warning("the VM is saved (managed save): its disks go with the memory state in "
                        "the save image, so the disks alone are crash-consistent")
        else:
            consistency = "offline"
            log.info("the VM is shut off: nothing to freeze (offline-consistent)")
    sources: list[tuple[str, NbdSource]] = []
    stored: StoredCheckpoint | None = None
    with log.phase("view"):
        if new_checkpoint is not None:
            checkpoints.create_offline(dom, info, new_checkpoint,
                                       f"kura restore point {new_checkpoint[5:]} (offline)")
            stored = checkpoints.stored_form(dom, new_checkpoint, node)
            log.info(f"new checkpoint {new_checkpoint}: bitmaps added to the qcow2 images "
                     "(qemu-img bitmap) and defined in libvirt")
        for d in info.disks:
            if not d.path:
                raise HypervisorError(f"disk {d.target} of {info.name} has no local path")
            dp = plan.disks[d.target]
            bitmap = dp.bitmap if dp.mode == "incremental" else None
            try:
                src = stack.enter_context(NbdSource.open_image(Path(d.path), d.format,
                                                               bitmap=bitmap, share=False))
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
    return consistency, sources, stored
