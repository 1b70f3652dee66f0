"""Test helpers for the engine, shipped with it (used by its lab tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kura.engine.events import Event
from kura.hypervisor.connection import Hypervisor, open_connection
from kura.nbd import NbdSource

if TYPE_CHECKING:
    from kura.lab import Lab, LabVM


def node_of(lab: Lab, vm: LabVM) -> Hypervisor:
    """A kura connection to the node that runs ``vm`` now."""
    return open_connection(lab.node(vm.node).uri)


class ViewCopier:
    """A job-log listener that copies every disk of the point-in-time view to a
    raw file when the data phase starts (the reference for block-identity checks)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket: str | None = None
        self.exports: dict[str, str] = {}
        self.copies: dict[str, Path] = {}
        self.n = 0

    def __call__(self, event: Event) -> None:
        if event.kind == "info" and "socket" in event.data:
            self.socket = str(event.data["socket"])
            self.exports = dict(event.data["exports"])
        if event.kind == "phase-start" and event.phase == "data" and self.socket:
            self.n += 1
            for target, export in self.exports.items():
                out = self.directory / f"view{self.n}-{target}.raw"
                with NbdSource.connect_unix(Path(self.socket), export) as src, \
                        open(out, "wb") as f:
                    f.truncate(src.size)
                    step = 4 << 20
                    for off in range(0, src.size, step):
                        data = src.pread(off, min(step, src.size - off))
                        if data.count(0) != len(data):
                            f.seek(off)
                            f.write(data)
                self.copies[target] = out
