"""The agent process: enrol once, then poll, report and run tasks forever.

Connection model: the agent always dials out. After enrolment (see
:mod:`kura.agent.enrol`) it runs three kinds of activity:

* the **reporter** thread sends a heartbeat every few seconds and the node's
  full inventory every ``inventory_interval`` (and at once after a task saw the
  VM migrate, or when the set of VMs running on the node changed since the last
  heartbeat: a VM migrated in or out), so the server always knows where each VM
  runs;
* the **poll** loop long-polls the server for tasks, identifying this process
  by a random *instance* id, so the server can tell a restarted agent from a
  slow one and fail the tasks the old process never finished;
* one **worker** thread per task (at most ``max_tasks``) runs it through the
  :class:`~kura.agent.runner.Runner`, flushing its events every second. The
  server's answer to a flush can cancel the task; so can losing the server for
  longer than ``orphan_after`` (the server has given the task up by then).

Any network or server failure is retried with exponential backoff (1 s doubling
to ``backoff_max``, with jitter); only a refused credential stops the agent,
with a message that says to enrol again.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from dataclasses import dataclass

from kura.agent.runner import Runner, TaskContext
from kura.errors import AuthError, Interrupted, KuraError, MigratedError, ServerError
from kura.server import schemas
from kura.server.client import ServerClient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    heartbeat_interval: float = 5.0
    inventory_interval: float = 15.0
    poll_wait: float = 20.0
    max_tasks: int = 4
    backoff_max: float = 30.0
    orphan_after: float = 60.0
    flush_interval: float = 1.0


class Backoff:
    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self.delay = 0.0

    def fail(self) -> float:
        self.delay = min(self.maximum, max(1.0, self.delay * 2))
        return self.delay * random.uniform(0.8, 1.2)

    def ok(self) -> None:
        self.delay = 0.0


class Agent:
    def __init__(self, client: ServerClient, runner: Runner,
                 settings: AgentSettings | None = None) -> None:
        self.client = client
        self.runner = runner
        self.settings = settings or AgentSettings()
        self.instance = secrets.token_hex(8)
        self.stop_event = threading.Event()
        self._inventory_due = threading.Event()
        self._slots = threading.Semaphore(self.settings.max_tasks)
        self._workers: list[threading.Thread] = []
        self._running: dict[int, TaskContext] = {}
        self._silent = False
        self._claimed: set[int] = set()
        self.fatal: KuraError | None = None

    # ---- main loop -----------------------------------------------------

    def run(self) -> None:
        """Run until :meth:`stop` (or a refused credential, raised as AuthError)."""
        reporter = threading.Thread(target=self._report_loop, name="kura-agent-report",
                                    daemon=True)
        reporter.start()
        backoff = Backoff(self.settings.backoff_max)
        while not self.stop_event.is_set():
            try:
                tasks = self.client.poll(self.instance, self.settings.poll_wait,
                                         running=sorted(self._claimed))
                backoff.ok()
            except AuthError as exc:
                self.fatal = exc
                self.stop_event.set()
                break
            except ServerError as exc:
                delay = backoff.fail()
                log.warning("server unreachable (%s); retrying in %.0f s", exc, delay)
                self.stop_event.wait(delay)
                continue
            for task in tasks:
                self._claimed.add(task.id)
                self._slots.acquire()
                t = threading.Thread(target=self._work, args=(task,),
                                     name=f"kura-task-{task.id}", daemon=True)
                self._workers.append(t)
                t.start()
        reporter.join(timeout=5)
        if self.fatal is not None:
            raise AuthError(f"the server refused this agent's credential: {self.fatal}",
                            hint="enrol again with a new token (kura server token create "
                                 "--role agent), after removing the agent's state directory")

    def stop(self) -> None:
        """Graceful stop: running tasks are told to end (cleanly) and report; no new work."""
        for ctx in list(self._running.values()):
            ctx.cancel_reason = "the agent is stopping"
            ctx.cancel.set()
        self.stop_event.set()

    def kill(self) -> None:
        """Go silent at once, as if the process died (for tests of agent death)."""
        self._silent = True
        self.stop()

    def _report_loop(self) -> None:
        backoff = Backoff(self.settings.backoff_max)
        next_inventory = 0.0
        running: frozenset[str] | None = None
        while not self.stop_event.is_set():
            try:
                now = time.monotonic()
                # A VM that arrived (e.g. migrated in) or left is reported at once,
                # so the server retries an interrupted backup on its new node quickly.
                before, running = running, self._running_vms()
                moved = before is not None and running is not None and running != before
                if now >= next_inventory or self._inventory_due.is_set() or moved:
                    self._inventory_due.clear()
                    self.push_inventory()
                    next_inventory = now + self.settings.inventory_interval
                else:
                    self.client.heartbeat()
                backoff.ok()
                wait = self.settings.heartbeat_interval
            except AuthError as exc:
                self.fatal = exc
                self.stop_event.set()
                return
            except KuraError as exc:
                wait = backoff.fail()
                log.warning("cannot report to the server (%s); retrying in %.0f s", exc, wait)
            self._inventory_due.wait(wait)

    def _running_vms(self) -> frozenset[str] | None:
        try:
            return self.runner.running_vms()
        except KuraError as exc:
            log.debug("cannot list the node's running VMs: %s", exc)
            return None

    def push_inventory(self) -> None:
        report = self.runner.inventory()
        self.client.put_inventory(report)

    # ---- one task ------------------------------------------------------

    def _work(self, task: schemas.TaskOut) -> None:
        try:
            self._run_task(task)
        except Exception:  # one task never takes the agent down
            log.exception("task %d crashed", task.id)
        finally:
            self._claimed.discard(task.id)
            self._slots.release()

    def _run_task(self, task: schemas.TaskOut) -> None:
        pending: list[schemas.TaskEvent] = []
        lock = threading.Lock()

        def emit(ev: schemas.TaskEvent) -> None:
            with lock:
                pending.append(ev)

        ctx = self._running[task.id] = TaskContext(task, emit)
        done = threading.Event()
        last_contact = [time.monotonic()]

        def flush() -> None:
            if self._silent:
                return
            with lock:
                batch = pending[:1000]
                del pending[:len(batch)]
            try:
                control = self.client.task_events(task.id, batch)
                last_contact[0] = time.monotonic()
            except KuraError as exc:
                with lock:
                    pending[:0] = batch  # keep for the next try
                    del pending[5000:]
                silent = time.monotonic() - last_contact[0]
                if silent > self.settings.orphan_after and not ctx.cancel.is_set():
                    ctx.cancel_reason = f"lost contact with the server for {silent:.0f} s ({exc})"
                    ctx.cancel.set()
                return
            if control.cancel and not ctx.cancel.is_set():
                ctx.cancel_reason = control.reason or "cancelled by the server"
                ctx.cancel.set()

        def flusher() -> None:
            while not done.wait(self.settings.flush_interval):
                flush()

        ft = threading.Thread(target=flusher, name=f"kura-task-{task.id}-events", daemon=True)
        ft.start()
        try:
            result = self._execute(ctx)
        finally:
            self._running.pop(task.id, None)
        done.set()
        ft.join()
        if result.error is not None and result.error.kind == "MigratedError":
            try:  # tell the server where the VM went before it retries
                self.push_inventory()
            except KuraError as exc:
                log.warning("cannot push inventory after a migration: %s", exc)
        flush()
        self._send_result(task.id, result)

    def _execute(self, ctx: TaskContext) -> schemas.TaskResult:
        kind = ctx.task.kind
        try:
            if kind == "backup":
                return self.runner.backup(ctx)
            if kind == "preflight":
                return self.runner.preflight(ctx)
            if kind == "restore":
                return self.runner.restore(ctx)
            return _failure("UsageError", f"this agent does not know task kind {kind!r}",
                            hint="upgrade the agent")
        except MigratedError as exc:
            return _failure("MigratedError", exc.message, hint=exc.hint or "",
                            moved_to=str(getattr(exc, "moved_to", "") or ""))
        except Interrupted as exc:
            return _failure("Cancelled", exc.message, hint=exc.hint or "")
        except KuraError as exc:
            return _failure(type(exc).__name__, exc.message, hint=exc.hint or "")
        except Exception as exc:
            log.exception("task %d failed unexpectedly", ctx.task.id)
            return _failure("InternalError", f"{type(exc).__name__}: {exc}",
                            hint="this is a bug in kura; the agent log has details")

    def _send_result(self, task_id: int, result: schemas.TaskResult) -> None:
        backoff = Backoff(self.settings.backoff_max)
        give_up = time.monotonic() + max(self.settings.orphan_after, 5.0) * 5
        while time.monotonic() < give_up and not self._silent:
            try:
                answer = self.client.task_result(task_id, result)
                log.info("task %d result sent: %s", task_id, answer)
                return
            except AuthError:
                raise
            except ServerError as exc:
                if getattr(exc, "status", 0) == 404:
                    return
                delay = backoff.fail()
                log.warning("cannot send task %d result (%s); retrying in %.0f s",
                            task_id, exc, delay)
                if self.stop_event.wait(delay):
                    return
        log.error("gave up sending the result of task %d", task_id)

    def wait_idle(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        for t in list(self._workers):
            t.join(max(0.0, end - time.monotonic()))


def _failure(kind: str, message: str, *, hint: str = "", moved_to: str = "") -> schemas.TaskResult:
    return schemas.TaskResult(ok=False, error=schemas.ErrorInfo(
        kind=kind, message=message[:4000], hint=hint[:4000], moved_to=moved_to[:128]))
