"""Endpoints for people and scripts: inventory, jobs, runs, logs, repository.

Roles: ``read-only`` may read everything except tokens; ``operator`` may also
create, run and delete jobs, prune and restore; ``admin`` may also manage
tokens. The URL tree mirrors the nouns: ``/api/inventory``, ``/api/jobs/NAME``,
``/api/runs/ID/log``, ``/api/snapshots``, ``/api/tokens``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from kura.catalog import Job, LogLine, Node, Run, Token, Vm, utcnow
from kura.errors import KuraError
from kura.server import auth, inventory, schemas
from kura.server.deps import Admin, Ctx, Operator, Reader, Who
from kura.server.engine import next_run
from kura.server.storage import Storage

router = APIRouter(prefix="/api")
RunId = Annotated[int, Path(ge=1, le=2**62)]
JobName = Annotated[str, Path(min_length=1, max_length=128)]


@router.get("/whoami", response_model=schemas.WhoAmI, tags=["auth"])
def whoami(who: Who) -> schemas.WhoAmI:
    return schemas.WhoAmI(kind=who.kind, id=who.id, role=who.role, name=who.name,
                          cluster=who.cluster)


# ---- tokens ---------------------------------------------------------------

def _token_out(t: Token) -> schemas.TokenOut:
    return schemas.TokenOut(id=t.id, role=t.role, name=t.name, cluster=t.cluster,
                            created=t.created, expires=t.expires, used=t.used, revoked=t.revoked)


@router.post("/tokens", response_model=schemas.TokenCreated, status_code=201, tags=["auth"])
def create_token(body: schemas.TokenCreate, who: Admin, ctx: Ctx) -> schemas.TokenCreated:
    """Create a token; its secret is in this response only."""
    ttl = timedelta(seconds=body.ttl_seconds) if body.ttl_seconds else None
    if body.role == "agent" and ttl is None:
        ttl = timedelta(hours=24)
    with ctx.catalog.session() as s:
        new = auth.create_token(s, body.role, name=body.name, cluster=body.cluster, ttl=ttl,
                                ca_fingerprint=ctx.ca_fingerprint)
        s.flush()
        out = _token_out(s.get_one(Token, new.id))
    return schemas.TokenCreated(**out.model_dump(), token=new.secret,
                                ca_fingerprint=ctx.ca_fingerprint)


@router.get("/tokens", response_model=list[schemas.TokenOut], tags=["auth"])
def list_tokens(who: Admin, ctx: Ctx) -> list[schemas.TokenOut]:
    with ctx.catalog.session() as s:
        return [_token_out(t) for t in s.scalars(select(Token).order_by(Token.created))]


@router.delete("/tokens/{token_id}", response_model=schemas.Message, tags=["auth"])
def revoke_token(token_id: Annotated[str, Path(max_length=64)], who: Admin,
                 ctx: Ctx) -> schemas.Message:
    with ctx.catalog.session() as s:
        tok = s.get(Token, token_id)
        if tok is None:
            raise HTTPException(404, f"no token {token_id}")
        tok.revoked = True
    ctx.auth_cache.clear()
    return schemas.Message(message=f"token {token_id} revoked")


# ---- inventory ------------------------------------------------------------

@router.get("/inventory", response_model=schemas.Inventory, tags=["inventory"])
def get_inventory(who: Reader, ctx: Ctx) -> schemas.Inventory:
    """The cluster tree: clusters → nodes → VMs → disks → storage."""
    with ctx.catalog.session() as s:
        return inventory.build_tree(s, ctx.dead_after)


# ---- jobs and runs --------------------------------------------------------

def _summary(run: Run) -> schemas.RunSummary:
    return schemas.RunSummary(
        id=run.id, job=run.job_name, kind=run.kind, trigger=run.trigger, status=run.status,
        reason=run.reason, started=run.started, ended=run.ended, vms_total=len(run.vms),
        vms_ok=sum(1 for v in run.vms if v.state == "succeeded"),
        vms_failed=sum(1 for v in run.vms if v.state in ("failed", "cancelled")))


def _run_out(run: Run) -> schemas.RunOut:
    return schemas.RunOut(**_summary(run).model_dump(), vms=[
        schemas.RunVmOut(vm_uuid=v.vm_uuid, vm_name=v.vm_name, state=v.state, attempt=v.attempt,
                         node=v.node, nodes_tried=[str(n) for n in v.nodes_tried],
                         started=v.started, ended=v.ended, diagnosis=v.diagnosis,
                         result=v.result) for v in run.vms])


def _job_out(s: Session, job: Job) -> schemas.JobOut:
    last = s.scalars(select(Run).where(Run.job_id == job.id).order_by(Run.id.desc())).first()
    return schemas.JobOut(name=job.name, spec=schemas.JobSpec.model_validate(job.spec),
                          created=job.created, next_run=job.next_run,
                          last_run=_summary(last) if last else None)


def _job(s: Session, name: str) -> Job:
    job = s.scalars(select(Job).where(Job.name == name)).first()
    if job is None:
        raise HTTPException(404, f"no job named {name!r}")
    return job


@router.post("/jobs", response_model=schemas.JobOut, status_code=201, tags=["jobs"])
def create_job(body: schemas.JobSpec, who: Operator, ctx: Ctx) -> schemas.JobOut:
    with ctx.catalog.session() as s:
        if s.scalars(select(Job).where(Job.name == body.name)).first() is not None:
            raise HTTPException(409, f"a job named {body.name!r} exists; delete it first")
        job = Job(name=body.name, spec=body.model_dump(),
                  next_run=next_run(body.schedule, utcnow()))
        s.add(job)
        s.flush()
        out = _job_out(s, job)
    ctx.engine.wake()
    return out


@router.get("/jobs", response_model=list[schemas.JobOut], tags=["jobs"])
def list_jobs(who: Reader, ctx: Ctx) -> list[schemas.JobOut]:
    with ctx.catalog.session() as s:
        return [_job_out(s, j) for j in s.scalars(select(Job).order_by(Job.name))]


@router.get("/jobs/{name}", response_model=schemas.JobOut, tags=["jobs"])
def show_job(name: JobName, who: Reader, ctx: Ctx) -> schemas.JobOut:
    with ctx.catalog.session() as s:
        return _job_out(s, _job(s, name))


@router.delete("/jobs/{name}", response_model=schemas.Message, tags=["jobs"])
def delete_job(name: JobName, who: Operator, ctx: Ctx) -> schemas.Message:
    """Delete a job definition; its past runs and logs stay."""
    with ctx.catalog.session() as s:
        job = _job(s, name)
        if s.scalars(select(Run).where(Run.job_id == job.id,
                                       Run.status == "running")).first() is not None:
            raise HTTPException(409, f"job {name!r} is running; wait for the run to end")
        s.delete(job)
    return schemas.Message(message=f"job {name} deleted")


def _start(ctx: Ctx, name: str, kind: str) -> schemas.RunOut:
    with ctx.catalog.session() as s:
        job = _job(s, name)
        if s.scalars(select(Run).where(Run.job_id == job.id,
                                       Run.status == "running")).first() is not None:
            raise HTTPException(409, f"job {name!r} is already running")
    try:
        run_id = ctx.engine.create_run(name, kind=kind, trigger="manual")
    except KuraError as exc:
        raise HTTPException(404, str(exc)) from exc
    with ctx.catalog.session() as s:
        return _run_out(s.get_one(Run, run_id))


@router.post("/jobs/{name}/run", response_model=schemas.RunOut, status_code=202, tags=["jobs"])
def run_job(name: JobName, who: Operator, ctx: Ctx) -> schemas.RunOut:
    """Start a run now (the schedule is unchanged)."""
    return _start(ctx, name, "backup")


@router.post("/jobs/{name}/test", response_model=schemas.RunOut, status_code=202, tags=["jobs"])
def test_job(name: JobName, who: Operator, ctx: Ctx) -> schemas.RunOut:
    """A pre-flight run: checks every selected VM and backs up nothing."""
    return _start(ctx, name, "test")


@router.get("/runs", response_model=list[schemas.RunSummary], tags=["jobs"])
def list_runs(who: Reader, ctx: Ctx,
              job: Annotated[str | None, Query(max_length=128)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[schemas.RunSummary]:
    with ctx.catalog.session() as s:
        q = select(Run).order_by(Run.id.desc()).limit(limit)
        if job:
            q = q.where(Run.job_name == job)
        return [_summary(r) for r in s.scalars(q)]


@router.get("/runs/{run_id}", response_model=schemas.RunOut, tags=["jobs"])
def show_run(run_id: RunId, who: Reader, ctx: Ctx,
             wait: Annotated[float, Query(ge=0, le=60)] = 0) -> schemas.RunOut:
    """A run; ``wait=S``: answer when the run has ended or after S seconds (at most the
    server's long-poll time, 20 s), whichever is first: a client following a run asks
    again, instead of polling."""
    wait = min(wait, ctx.engine.settings.poll_wait)
    if wait:
        def running() -> bool:
            with ctx.catalog.session() as s:
                run = s.get(Run, run_id)
                return run is not None and run.status == "running"
        ctx.engine.wait_run_end(running, wait)
    with ctx.catalog.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        return _run_out(run)


@router.get("/runs/{run_id}/log", response_model=schemas.RunLog, tags=["jobs"])
def run_log(run_id: RunId, who: Reader, ctx: Ctx) -> schemas.RunLog:
    with ctx.catalog.session() as s:
        run = s.get(Run, run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        names = {v.id: v.vm_name for v in run.vms}
        lines = [schemas.LogLineOut(ts=ln.ts, level=ln.level, message=ln.message,
                                    vm=names.get(ln.run_vm_id) if ln.run_vm_id else None)
                 for ln in s.scalars(select(LogLine).where(LogLine.run_id == run_id)
                                     .order_by(LogLine.id))]
        return schemas.RunLog(run=_run_out(run), lines=lines)


# ---- repository -----------------------------------------------------------

def _storage(ctx: Ctx) -> Storage:
    if ctx.storage is None:
        raise HTTPException(409, "this server has no repository attached",
                            headers={"X-Kura-Hint": "start the server with --repo"})
    return ctx.storage


@router.get("/snapshots", response_model=list[schemas.SnapshotOut], tags=["repository"])
def list_snapshots(who: Reader, ctx: Ctx,
                   source: Annotated[str | None, Query(max_length=256)] = None
                   ) -> list[schemas.SnapshotOut]:
    try:
        return _storage(ctx).snapshots(source)
    except KuraError as exc:
        raise HTTPException(409, str(exc)) from exc


@router.post("/prune", response_model=schemas.Message, tags=["repository"])
def prune(body: schemas.PruneRequest, who: Operator, ctx: Ctx) -> schemas.Message:
    try:
        res = _storage(ctx).prune(body.retention, source=body.source, dry_run=body.dry_run)
    except KuraError as exc:
        raise HTTPException(409, str(exc)) from exc
    return schemas.Message(message="pruned" if not body.dry_run else "dry run", data=res)


@router.post("/repo/verify", response_model=schemas.Message, tags=["repository"])
def verify(who: Operator, ctx: Ctx) -> schemas.Message:
    try:
        res = _storage(ctx).verify()
    except KuraError as exc:
        raise HTTPException(409, str(exc)) from exc
    return schemas.Message(message="verified", data=res)


@router.post("/restore", response_model=schemas.RunOut, status_code=202, tags=["repository"])
def restore(body: schemas.RestoreRequest, who: Operator, ctx: Ctx) -> schemas.RunOut:
    """Restore a VM through an agent: on ``node``, or where the VM runs, or any online node."""
    try:
        snap = _storage(ctx).resolve(body.ref)
    except KuraError as exc:
        raise HTTPException(404, str(exc)) from exc
    with ctx.catalog.session() as s:
        node_name = body.node
        if node_name is None:
            vm = s.get(Vm, snap.source_key)
            candidates = [vm.node] if vm is not None and vm.node is not None else []
            candidates += list(s.scalars(select(Node).order_by(Node.name)))
            for n in candidates:
                if inventory.node_status(n.agent, ctx.dead_after) == "online":
                    node_name = n.name
                    break
        if node_name is None:
            raise HTTPException(409, "no node is online to restore on", headers=None)
        if s.scalars(select(Node).where(Node.name == node_name)).first() is None:
            raise HTTPException(404, f"no node named {node_name!r}")
    run_id = ctx.engine.submit_restore(body, snap.source_key, snap.source, node_name, snap.id)
    with ctx.catalog.session() as s:
        return _run_out(s.get_one(Run, run_id))

