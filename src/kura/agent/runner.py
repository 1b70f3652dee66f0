"""What an agent runs on its node: the seam between the agent and the node engine.

The agent's loop (:mod:`kura.agent.loop`) knows nothing of libvirt; it calls a
:class:`Runner`. :class:`TaskContext` is what a runner gets for one task: a
cancel event (set when the server says stop, e.g. the run was aborted) and
callbacks to report phases, log lines and progress, which the loop batches to
the server.

The real runner, :class:`EngineRunner` in :mod:`kura.agent.engine_runner`,
maps these calls onto ``kura.engine``; keeping every call into the engine in
that one module keeps adapting to the engine's API cheap. Tests use
:class:`kura.agent.testing.FakeRunner`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from kura.server import schemas

PHASES = ("accepted", "configuration", "quiesce", "view", "data", "finish")


class TaskContext:
    """One task as a runner sees it."""

    def __init__(self, task: schemas.TaskOut,
                 emit: Callable[[schemas.TaskEvent], None]) -> None:
        self.task = task
        self.cancel = threading.Event()
        self.cancel_reason = ""
        self._emit = emit

    @property
    def payload(self) -> dict[str, Any]:
        return self.task.payload

    def log(self, message: str, level: str = "info") -> None:
        self._emit(schemas.TaskEvent(kind="log", level=level,  # type: ignore[arg-type]
                                     message=message))

    def progress(self, **data: Any) -> None:
        self._emit(schemas.TaskEvent(kind="progress", data=data))

    def phase_event(self, phase: str, status: str, seconds: float | None = None,
                    message: str = "") -> None:
        self._emit(schemas.TaskEvent(kind="phase", phase=phase, status=status,  # type: ignore[arg-type]
                                     seconds=seconds, message=message))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Report a phase's start, and its end (or failure) with its duration."""
        self.phase_event(name, "start")
        t0 = time.monotonic()
        try:
            yield
        except BaseException as exc:
            self.phase_event(name, "failed", time.monotonic() - t0, str(exc))
            raise
        self.phase_event(name, "end", time.monotonic() - t0)


class Runner(Protocol):
    """Node-side operations the server can ask an agent for."""

    def inventory(self) -> schemas.InventoryReport: ...

    def running_vms(self) -> frozenset[str]:
        """UUIDs of the VMs running on this node now (cheap: every heartbeat)."""
        ...

    def backup(self, ctx: TaskContext) -> schemas.TaskResult: ...

    def preflight(self, ctx: TaskContext) -> schemas.TaskResult: ...

    def restore(self, ctx: TaskContext) -> schemas.TaskResult: ...
