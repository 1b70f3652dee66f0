"""The job log: what a VM's backup or restore reports while it runs.

The engine never prints. It reports :class:`Event` records to a
:class:`JobLog`, which keeps them (for the result and the restore point) and
passes each to its listeners: the CLI renders them as one line per phase plus
a progress bar; the node agent forwards them to the server, which stores them
with the run.

Event kinds:

``phase-start`` / ``phase-end``
    a named phase (``accepted``, ``configuration``, ``quiesce``, ``view``,
    ``data``, ``finish``; restores use ``plan``, ``disks``, ``define``) began
    or ended; ``phase-end`` carries ``seconds`` and ``ok`` (False when the
    phase raised).
``info`` / ``warning`` / ``error``
    a line for the administrator, attributed to the current phase.
``progress``
    bytes done and total of the data phase (``data``: ``done``, ``total``);
    not kept in :attr:`JobLog.events`, only passed to listeners.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

PHASES = ("accepted", "configuration", "quiesce", "view", "data", "finish")


@dataclass(frozen=True)
class Event:
    kind: str
    vm: str
    phase: str | None
    message: str = ""
    time: float = field(default_factory=time.time)
    seconds: float | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "vm": self.vm, "phase": self.phase, "message": self.message,
                "time": self.time, "seconds": self.seconds, "data": dict(self.data)}


Listener = Callable[[Event], None]


class JobLog:
    """Collects one VM's events and fans them out to listeners."""

    def __init__(self, vm: str, listeners: list[Listener] | None = None) -> None:
        self.vm = vm
        self.listeners: list[Listener] = list(listeners or [])
        self.events: list[Event] = []
        self.phases: dict[str, float] = {}
        self.current: str | None = None

    def _emit(self, event: Event) -> None:
        if event.kind != "progress":
            self.events.append(event)
        for listener in self.listeners:
            listener(event)

    @contextmanager
    def phase(self, name: str, message: str = "") -> Iterator[None]:
        """Run a block as phase ``name``: start/end events with timing."""
        previous, self.current = self.current, name
        self._emit(Event("phase-start", self.vm, name, message))
        start = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = time.monotonic() - start
            self.phases[name] = self.phases.get(name, 0.0) + seconds
            self._emit(Event("phase-end", self.vm, name, "", seconds=seconds,
                             data={"ok": ok}))
            self.current = previous

    def info(self, message: str, **data: Any) -> None:
        self._emit(Event("info", self.vm, self.current, message, data=data))

    def warning(self, message: str, **data: Any) -> None:
        self._emit(Event("warning", self.vm, self.current, message, data=data))

    def error(self, message: str, **data: Any) -> None:
        self._emit(Event("error", self.vm, self.current, message, data=data))

    def progress(self, done: int, total: int, **data: Any) -> None:
        self._emit(Event("progress", self.vm, self.current, "",
                         data={"done": done, "total": total, **data}))

    def lines(self) -> list[str]:
        """The log as text lines (phase ends with their timing)."""
        out = []
        for e in self.events:
            if e.kind == "phase-end":
                state = "done" if e.data.get("ok") else "FAILED"
                out.append(f"[{e.phase}] {state} in {e.seconds or 0:.2f}s")
            elif e.kind == "phase-start":
                if e.message:
                    out.append(f"[{e.phase}] {e.message}")
            else:
                out.append(f"[{e.phase or '-'}] {e.kind}: {e.message}")
        return out
