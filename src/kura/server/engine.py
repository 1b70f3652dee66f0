"""The job engine: scheduling runs, dispatching VMs to agents, collecting results.

State lives in the catalog; the engine's own memory is only a cache of which
agent process (``instance``) is polling, so a server restart loses nothing.

One engine thread runs :meth:`JobEngine.tick` about once a second (and at once
when something changes). A tick:

1. **schedules**: every job whose ``next_run`` has passed gets a run (unless
   its previous run is still going: then the tick is skipped and logged), and
   its next time is computed by croniter from *now* (missed ticks are not
   replayed);
2. **reaps**: a task sent to an agent that has been silent for ``dead_after``
   seconds fails with ``AgentLost`` (the agent died, or the network is cut);
3. **dispatches**: each pending VM goes to the node whose agent last reported
   it (by UUID), within the job's per-node and total limits. A VM whose node is
   unreachable, or that is on no node (mid-migration), *waits* for up to the
   job's ``node_wait`` and then fails with that reason;
4. **finishes** runs whose VMs are all done, then applies retention to each VM
   that got a new restore point.

Agents long-poll :meth:`claim_tasks`; they report phases and log lines through
:meth:`task_events` (whose answer tells them to stop if the task was
cancelled) and the outcome through :meth:`task_result`. A failure that another
attempt can cure (migration, agent death, lock) is retried after
``retry_delay`` up to ``retries`` times, on whatever node runs the VM then; any
other failure ends that VM only. Nothing that happens to one VM, task or run
can stop the thread: every step is guarded and logged.

On startup :meth:`recover` fails every run that was in progress ("server
restarted while the run was in progress") and cancels its tasks; the job's
schedule runs it again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from croniter import croniter
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from kura.catalog import Agent, Catalog, Job, LogLine, Node, Run, RunVm, Task, Vm, utcnow
from kura.errors import ServerError
from kura.server import diagnosis, inventory, schemas
from kura.server.storage import Storage

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE_TASK = ("queued", "sent")


@dataclass(frozen=True)
class EngineSettings:
    dead_after: float = 45.0       # seconds of agent silence before it is considered lost
    tick: float = 1.0
    poll_wait: float = 20.0


def next_run(schedule: str | None, after: datetime) -> datetime | None:
    if not schedule:
        return None
    nxt: datetime = croniter(schedule, after).get_next(datetime)
    return nxt


class JobEngine:
    def __init__(self, catalog: Catalog, settings: EngineSettings | None = None,
                 storage: Storage | None = None,
                 server_checks: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.catalog = catalog
        self.settings = settings or EngineSettings()
        self.storage = storage
        self.server_checks = server_checks
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ended = threading.Condition()  # notified after a tick that ended runs
        self._just_ended: list[int] = []
        self._thread: threading.Thread | None = None
        self._instances: dict[str, str] = {}
        self.on_tick: list[Callable[[], object]] = []  # e.g. the data path's session sweep

    # ---- lifecycle -----------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._thread = threading.Thread(target=self._loop, name="kura-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the engine never dies from one bad tick
                log.exception("job engine tick failed; continuing")
            self._wake.wait(self.settings.tick)
            self._wake.clear()

    def recover(self) -> int:
        """Fail what was in progress when the server stopped; returns the runs failed."""
        reason = "server restarted while the run was in progress"
        with self._lock, self.catalog.session() as s:
            runs = list(s.scalars(select(Run).where(Run.status == "running")))
            for run in runs:
                for rv in run.vms:
                    if rv.state not in TERMINAL:
                        rv.state = "failed"
                        rv.ended = utcnow()
                        rv.diagnosis = reason + "; not backed up (the schedule retries it)"
                        _log(s, run.id, rv.id, "error", f"{rv.vm_name}: {rv.diagnosis}")
                run.status = "failed"
                run.reason = reason
                run.ended = utcnow()
                _log(s, run.id, None, "error", f"run failed: {reason}")
            for task in s.scalars(select(Task).where(Task.state.in_(ACTIVE_TASK))):
                task.state = "cancelled"
                task.cancel_reason = reason
            return len(runs)

    # ---- runs ----------------------------------------------------------

    def create_run(self, job_name: str, *, kind: str = "backup", trigger: str = "manual") -> int:
        with self._lock, self.catalog.session() as s:
            job = s.scalars(select(Job).where(Job.name == job_name)).first()
            if job is None:
                raise ServerError(f"no job named {job_name!r}", hint="see `kura job list`")
            run_id = self._start_run(s, job, kind=kind, trigger=trigger)
        self.wake()
        return run_id

    def _start_run(self, s: Session, job: Job, *, kind: str, trigger: str) -> int:
        spec = schemas.JobSpec.model_validate(job.spec)
        run = Run(job_id=job.id, job_name=job.name, kind=kind, trigger=trigger,
                  spec=job.spec, status="running")
        s.add(run)
        s.flush()
        what = "pre-flight test" if kind == "test" else "run"
        _log(s, run.id, None, "info", f"{what} of job {job.name} started ({trigger})")
        selected, missing = inventory.select_vms(s, spec.selection)
        for name in missing:
            rv = RunVm(run_id=run.id, vm_uuid="", vm_name=name, state="failed", ended=utcnow(),
                       diagnosis=f"no VM named {name!r} in the inventory of any cluster")
            s.add(rv)
            s.flush()
            _log(s, run.id, rv.id, "error", f"{name}: {rv.diagnosis}")
        for vm in selected:
            s.add(RunVm(run_id=run.id, vm_uuid=vm.uuid, vm_name=vm.name))
        if not selected and not missing:
            _log(s, run.id, None, "warning", "the job's selection matches no VM")
        return run.id

    def submit_restore(self, req: schemas.RestoreRequest, vm_uuid: str, vm_name: str,
                       node_name: str | None, snapshot: str) -> int:
        """A one-VM run of kind ``restore``: the chosen node's agent writes the disks."""
        with self._lock, self.catalog.session() as s:
            run = Run(job_id=None, job_name="(restore)", kind="restore", trigger="manual",
                      spec={"restore": req.model_dump(), "snapshot": snapshot,
                            "node": node_name, "retries": 0}, status="running")
            s.add(run)
            s.flush()
            s.add(RunVm(run_id=run.id, vm_uuid=vm_uuid, vm_name=vm_name))
            _log(s, run.id, None, "info", f"restore of {vm_name} from {snapshot} started")
            run_id = run.id
        self.wake()
        return run_id

    # ---- the tick ------------------------------------------------------

    def tick(self) -> None:
        now = utcnow()
        for step in (self._schedule, self._reap, self._dispatch, self._finish):
            try:
                with self._lock, self.catalog.session() as s:
                    step(s, now)
            except Exception:
                log.exception("job engine step %s failed", step.__name__)
        if self._just_ended:  # committed: whoever waits for a run's end may look
            self._just_ended.clear()
            with self._ended:
                self._ended.notify_all()
        for hook in list(self.on_tick):
            try:
                hook()
            except Exception:
                log.exception("job engine hook %r failed", hook)

    def wait_run_end(self, running: Callable[[], bool], timeout: float) -> None:
        """Return once ``running()`` is false (checked when runs end) or after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._ended:
            while running():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._ended.wait(left)

    def _schedule(self, s: Session, now: datetime) -> None:
        for job in s.scalars(select(Job).where(Job.next_run.is_not(None), Job.next_run <= now)):
            spec = schemas.JobSpec.model_validate(job.spec)
            job.next_run = next_run(spec.schedule, now)
            active = s.scalars(select(Run).where(Run.job_id == job.id,
                                                 Run.status == "running")).first()
            if active is not None:
                _log(s, active.id, None, "warning",
                     f"scheduled run of {job.name} skipped: run {active.id} is still going")
                continue
            self._start_run(s, job, kind="backup", trigger="schedule")

    def _reap(self, s: Session, now: datetime) -> None:
        for task in s.scalars(select(Task).where(Task.state == "sent")):
            agent = s.get(Agent, task.agent_id)
            if agent is None or agent.last_seen is None:
                continue
            silent = (now - agent.last_seen).total_seconds()
            if silent > self.settings.dead_after:
                err = schemas.ErrorInfo(
                    kind="AgentLost",
                    message=f"no word from it for {silent:.0f} s (the agent died, or the "
                            f"network to {agent.node.name} is cut)")
                self._fail_task(s, task, err, agent.node.name)

    def _fail_task(self, s: Session, task: Task, err: schemas.ErrorInfo, node: str) -> None:
        task.state = "cancelled"
        task.cancel_reason = err.message
        rv = s.get(RunVm, task.run_vm_id) if task.run_vm_id else None
        if rv is None or rv.state in TERMINAL:
            return
        committed = str(task.result.get("committed", ""))
        if committed and task.kind == "backup":
            # The restore point was committed through the data path; only the
            # agent's report of it was lost. The VM is backed up.
            rv.state = "succeeded"
            rv.ended = utcnow()
            rv.result = {**rv.result, "snapshot": committed}
            rv.diagnosis = f"restore point {committed} was committed; then " + \
                diagnosis.explain(err, node) + " (its final report was lost)"
            _log(s, rv.run_id, rv.id, "warning", f"{rv.vm_name}: {rv.diagnosis}")
            return
        self._attempt_failed(s, rv, err, node)

    def note_commit(self, task_id: int, snapshot: str) -> None:
        """The data path committed ``snapshot`` for ``task_id`` (see kura.server.sessions)."""
        with self._lock, self.catalog.session() as s:
            task = s.get(Task, task_id)
            if task is not None:
                task.result = {**task.result, "committed": snapshot}

    def _attempt_failed(self, s: Session, rv: RunVm, err: schemas.ErrorInfo, node: str) -> None:
        run = rv.run
        retries = int(run.spec.get("retries", 2))
        delay = float(run.spec.get("retry_delay", 5.0))
        text = diagnosis.explain(err, node)
        result = dict(rv.result)
        result.setdefault("attempts", []).append({"node": node, "error": err.model_dump()})
        if err.kind == "MigratedError":
            result["migrated_from"] = node
        rv.result = result
        if diagnosis.retryable(err) and rv.attempt <= retries and run.kind != "restore":
            rv.state = "pending"
            rv.not_before = utcnow() + timedelta(seconds=delay)
            rv.diagnosis = text
            _log(s, run.id, rv.id, "warning",
                 f"{rv.vm_name}: attempt {rv.attempt} failed: {text}; retrying in {delay:g} s")
        else:
            rv.state = "failed"
            rv.ended = utcnow()
            rv.diagnosis = text
            _log(s, run.id, rv.id, "error", f"{rv.vm_name}: failed: {text}")

    def _dispatch(self, s: Session, now: datetime) -> None:
        runs = list(s.scalars(select(Run).where(Run.status == "running")))
        for run in runs:
            spec = run.spec
            per_node = int(spec.get("max_per_node", 2))
            total = int(spec.get("max_total", 4))
            busy: dict[str, int] = {}
            for rv in run.vms:
                if rv.state in ("dispatched", "running"):
                    busy[rv.node] = busy.get(rv.node, 0) + 1
            for rv in run.vms:
                if rv.state not in ("pending", "waiting"):
                    continue
                if rv.not_before is not None and rv.not_before > now:
                    continue
                if sum(busy.values()) >= total:
                    break
                target = self._locate(s, run, rv, now)
                if target is None:
                    continue
                agent, node = target
                if busy.get(node.name, 0) >= per_node:
                    continue
                busy[node.name] = busy.get(node.name, 0) + 1
                self._send(s, run, rv, agent, node)

    def _locate(self, s: Session, run: Run, rv: RunVm,
                now: datetime) -> tuple[Agent, Node] | None:
        vm = s.get(Vm, rv.vm_uuid)
        node: Node | None = None
        wanted = run.spec.get("node") if run.kind == "restore" else None
        if wanted:
            node = s.scalars(select(Node).where(Node.name == wanted)).first()
        elif vm is not None:
            node = vm.node
        agent = node.agent if node is not None else None
        status = inventory.node_status(agent, self.settings.dead_after, now)
        if node is not None and agent is not None and not agent.revoked and status == "online":
            if rv.state == "waiting":
                _log(s, run.id, rv.id, "info", f"{rv.vm_name}: {node.name} is reachable again")
            rv.waiting_since = None
            return agent, node
        if node is None:
            why = "it is on no node right now (migrating, or undefined)"
        else:
            why = f"its node {node.name} is unreachable"
            if agent is not None and agent.last_seen is not None:
                why += f" (agent last seen {(now - agent.last_seen).total_seconds():.0f} s ago)"
        limit = float(run.spec.get("node_wait", 600.0))
        if rv.waiting_since is None:
            rv.waiting_since = now
            rv.state = "waiting"
            _log(s, run.id, rv.id, "warning",
                 f"{rv.vm_name}: waiting up to {limit:g} s: {why}")
        elif (now - rv.waiting_since).total_seconds() >= limit:
            rv.state = "failed"
            rv.ended = now
            rv.diagnosis = f"not backed up: {why}; waited {limit:g} s"
            _log(s, run.id, rv.id, "error", f"{rv.vm_name}: {rv.diagnosis}")
        return None

    def _send(self, s: Session, run: Run, rv: RunVm, agent: Agent, node: Node) -> None:
        rv.attempt += 1
        previous = rv.node
        rv.node = node.name
        rv.nodes_tried = [*rv.nodes_tried, node.name]
        rv.state = "dispatched"
        rv.started = rv.started or utcnow()
        moved_from = rv.result.get("migrated_from")
        if moved_from and moved_from != node.name:
            rv.diagnosis = f"VM migrated from {moved_from} to {node.name} during backup; " \
                           f"retried on {node.name}"
            _log(s, run.id, rv.id, "warning", f"{rv.vm_name}: {rv.diagnosis}")
        elif previous and previous != node.name:
            _log(s, run.id, rv.id, "info", f"{rv.vm_name}: now on {node.name} (was {previous})")
        kind = {"test": "preflight", "restore": "restore"}.get(run.kind, "backup")
        payload: dict[str, Any] = {
            "run": run.id, "job": run.job_name, "vm_uuid": rv.vm_uuid, "vm_name": rv.vm_name,
            "attempt": rv.attempt, "consistency": run.spec.get("consistency", "prefer"),
            "full": bool(run.spec.get("full", False)),
        }
        if kind == "restore":
            payload["restore"] = run.spec.get("restore", {})
            payload["snapshot"] = run.spec.get("snapshot", "")
        s.add(Task(agent_id=agent.id, run_vm_id=rv.id, kind=kind, payload=payload))
        _log(s, run.id, rv.id, "info",
             f"{rv.vm_name}: dispatched to {node.name} (attempt {rv.attempt})")
        self._cond.notify_all()

    def _finish(self, s: Session, now: datetime) -> None:
        for run in s.scalars(select(Run).where(Run.status == "running")):
            if any(rv.state not in TERMINAL for rv in run.vms):
                continue
            ok = [rv for rv in run.vms if rv.state == "succeeded"]
            failed = [rv for rv in run.vms if rv.state != "succeeded"]
            run.status = "succeeded" if not failed else ("failed" if not ok else "partial")
            run.ended = now
            self._just_ended.append(run.id)
            if run.kind == "backup":
                self._retention(s, run, ok)
            _log(s, run.id, None, "info" if not failed else "warning",
                 f"run {run.status}: {len(ok)} of {len(run.vms)} VMs ok")

    def _retention(self, s: Session, run: Run, ok: list[RunVm]) -> None:
        retention = schemas.Retention.model_validate(run.spec.get("retention", {}))
        if retention.empty() or not ok:
            return
        if self.storage is None:
            _log(s, run.id, None, "warning", "retention not applied: no repository attached")
            return
        for rv in ok:
            try:
                res = self.storage.prune(retention, source=rv.vm_uuid, dry_run=False)
                _log(s, run.id, rv.id, "info",
                     f"{rv.vm_name}: retention kept {res.get('kept', '?')}, "
                     f"removed {res.get('removed', '?')} restore points")
            except Exception as exc:  # retention problems never fail the run
                _log(s, run.id, rv.id, "warning",
                     f"{rv.vm_name}: retention not applied: {exc}")

    # ---- agent side ----------------------------------------------------

    def touch_agent(self, agent_id: str, instance: str | None = None) -> None:
        """Record that an agent is alive; a new instance fails the old one's tasks."""
        with self._lock, self.catalog.session() as s:
            agent = s.get(Agent, agent_id)
            if agent is None:
                return
            agent.last_seen = utcnow()
            if instance is None:
                return
            old = self._instances.get(agent_id)
            self._instances[agent_id] = instance
            if old is None or old == instance:
                return
            for task in s.scalars(select(Task).where(Task.agent_id == agent_id,
                                                     Task.state == "sent")):
                self._fail_task(s, task, schemas.ErrorInfo(
                    kind="AgentRestarted", message="the agent process restarted"),
                    agent.node.name)

    def claim_tasks(self, agent_id: str, instance: str, wait: float,
                    running: list[int] | None = None) -> list[schemas.TaskOut]:
        """Long poll: the agent's queued tasks, waiting up to ``wait`` seconds for one.

        ``running`` is what the agent says it is working on: a task sent to it a
        while ago that it does not list never reached it (the answer to an
        earlier poll was lost with its connection), and fails so it is retried.
        A poll from a process that is no longer the agent's current instance
        returns nothing, so a dead process's pending poll cannot take work.
        """
        self.touch_agent(agent_id, instance)
        if running is not None:
            self._forget_lost(agent_id, set(running))
        deadline = utcnow() + timedelta(seconds=min(wait, self.settings.poll_wait))
        with self._cond:
            while True:
                if self._instances.get(agent_id) != instance:
                    return []
                with self.catalog.session() as s:
                    tasks = list(s.scalars(select(Task).where(Task.agent_id == agent_id,
                                                              Task.state == "queued")))
                    out = []
                    for t in tasks:
                        t.state = "sent"
                        t.sent = t.touched = utcnow()
                        rv = s.get(RunVm, t.run_vm_id) if t.run_vm_id else None
                        if rv is not None and rv.state == "dispatched":
                            rv.state = "running"
                        out.append(schemas.TaskOut(id=t.id, kind=t.kind, payload=t.payload))
                if out:
                    return out
                left = (deadline - utcnow()).total_seconds()
                if left <= 0 or self._stop.is_set():
                    return []
                # A waiting poll does not count as a sign of life: the server would not
                # notice its connection drop. The agent's heartbeats do that.
                self._cond.wait(min(left, 5.0))

    def _forget_lost(self, agent_id: str, running: set[int]) -> None:
        cutoff = utcnow() - timedelta(seconds=10)
        with self._lock, self.catalog.session() as s:
            for task in s.scalars(select(Task).where(Task.agent_id == agent_id,
                                                     Task.state == "sent")):
                if task.id not in running and task.sent is not None and task.sent < cutoff:
                    agent = s.get_one(Agent, agent_id)
                    self._fail_task(s, task, schemas.ErrorInfo(
                        kind="AgentLost", message="the task never reached the agent (the "
                        "connection that carried it dropped)"), agent.node.name)

    def _own_task(self, s: Session, agent_id: str, task_id: int) -> Task:
        task = s.get(Task, task_id)
        if task is None or task.agent_id != agent_id:
            raise ServerError(f"task {task_id} is not this agent's")
        return task

    def task_events(self, agent_id: str, task_id: int,
                    events: list[schemas.TaskEvent]) -> schemas.TaskControl:
        with self._lock, self.catalog.session() as s:
            task = self._own_task(s, agent_id, task_id)
            agent = s.get(Agent, agent_id)
            if agent is not None:
                agent.last_seen = utcnow()
            task.touched = utcnow()
            if task.state != "sent":
                return schemas.TaskControl(cancel=True, reason=task.cancel_reason or
                                           f"task is {task.state}")
            rv = s.get(RunVm, task.run_vm_id) if task.run_vm_id else None
            if rv is None:
                return schemas.TaskControl(cancel=False)
            result = dict(rv.result)
            phases = list(result.get("phases", []))
            for ev in events:
                if ev.kind == "phase":
                    phases.append({"attempt": rv.attempt, "node": rv.node, "phase": ev.phase,
                                   "status": ev.status, "seconds": ev.seconds,
                                   "message": ev.message})
                    if ev.status in ("end", "failed"):
                        took = f" in {ev.seconds:.2f} s" if ev.seconds is not None else ""
                        verb = "done" if ev.status == "end" else "failed"
                        extra = f": {ev.message}" if ev.message else ""
                        _log(s, rv.run_id, rv.id, "info" if ev.status == "end" else "warning",
                             f"{rv.vm_name}: [{rv.node}] {ev.phase} {verb}{took}{extra}")
                elif ev.kind == "log":
                    _log(s, rv.run_id, rv.id, ev.level,
                         f"{rv.vm_name}: [{rv.node}] {ev.message}")
                else:
                    result["progress"] = ev.data
            result["phases"] = phases
            rv.result = result
            return schemas.TaskControl(cancel=False)

    def task_result(self, agent_id: str, task_id: int, res: schemas.TaskResult) -> str:
        with self._lock, self.catalog.session() as s:
            task = self._own_task(s, agent_id, task_id)
            if task.state != "sent":
                return f"ignored: task is {task.state} ({task.cancel_reason})"
            task.state = "done"
            task.result = {**task.result, **res.model_dump()}
            rv = s.get(RunVm, task.run_vm_id) if task.run_vm_id else None
            if rv is None or rv.state in TERMINAL:
                return "recorded"
            node = rv.node
            if res.ok:
                self._succeeded(s, rv, res)
            else:
                err = res.error or schemas.ErrorInfo(kind="KuraError", message="no reason given")
                self._attempt_failed(s, rv, err, node)
        self.wake()
        return "recorded"

    def _succeeded(self, s: Session, rv: RunVm, res: schemas.TaskResult) -> None:
        run = rv.run
        result = dict(rv.result)
        result.update(snapshot=res.snapshot, kind=res.kind, consistency=res.consistency,
                      bytes_read=res.bytes_read, bytes_stored=res.bytes_stored,
                      warnings=res.warnings, checks=res.checks, data=res.data)
        rv.result = result
        rv.ended = utcnow()
        for w in res.warnings:
            _log(s, run.id, rv.id, "warning", f"{rv.vm_name}: {w}")
        if run.kind == "test":
            self._preflight_verdict(s, rv, res)
            return
        rv.state = "succeeded"
        note = diagnosis.consistency_note(res.consistency,
                                          str(run.spec.get("consistency", "prefer")),
                                          res.warnings)
        if note:
            rv.diagnosis = f"{rv.diagnosis}; {note}" if rv.diagnosis else note
        what = f"restore point {res.snapshot}" if res.snapshot else "done"
        if run.kind == "restore" and res.data.get("output"):
            what = (f"disk {res.data.get('disk')} of restore point {res.snapshot} written to "
                    f"{res.data['output']} ({res.data.get('format')})")
        _log(s, run.id, rv.id, "info",
             f"{rv.vm_name}: {what} on {rv.node} ({res.kind or run.kind}, "
             f"{res.consistency or '-'}; read {res.bytes_read} B, stored {res.bytes_stored} B)")

    def _preflight_verdict(self, s: Session, rv: RunVm, res: schemas.TaskResult) -> None:
        checks = list(res.checks)
        if self.server_checks is not None:
            try:
                checks += self.server_checks()
            except Exception as exc:
                checks.append({"check": "server", "ok": False, "detail": str(exc)})
        failed = [c for c in checks if c.get("ok") is False]
        rv.result = {**rv.result, "checks": checks}
        rv.state = "failed" if failed else "succeeded"
        verdict = "FAIL" if failed else "OK"
        rv.diagnosis = "; ".join(str(c.get("detail", "")) for c in failed) or \
            "; ".join(str(c.get("detail", "")) for c in checks if c.get("warn"))
        for c in checks:
            mark = "ok" if c.get("ok") else ("FAIL" if c.get("ok") is False else "note")
            _log(s, rv.run_id, rv.id, "info" if c.get("ok") else "warning",
                 f"{rv.vm_name}: [{rv.node}] {c.get('check', '?')}: {mark}: "
                 f"{c.get('detail', '')}")
        _log(s, rv.run_id, rv.id, "info" if not failed else "error",
             f"{rv.vm_name}: verdict {verdict}")

    def active_tasks(self) -> int:
        with self.catalog.session() as s:
            return int(s.scalar(select(func.count()).select_from(Task)
                                .where(Task.state.in_(ACTIVE_TASK))) or 0)

    def task_for_agent(self, agent_id: str, task_id: int) -> Task:
        with self.catalog.session() as s:
            return self._own_task(s, agent_id, task_id)


def _log(s: Session, run_id: int, run_vm_id: int | None, level: str, message: str) -> None:
    s.add(LogLine(run_id=run_id, run_vm_id=run_vm_id, level=level, message=message))
    getattr(log, "warning" if level == "warning" else "error" if level == "error" else "info")(
        "run %s: %s", run_id, message)
