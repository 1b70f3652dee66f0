"""Endpoints for agents: enrolment, inventory, the task long-poll and reports.

Agents always dial out to the server (simpler firewalls, works through NAT):
they enrol once with a one-time token, then poll ``/api/agent/poll`` for work,
push their node's inventory, and report each task's events and result. An
agent acts only for its own node: the node comes from its credential, never
from the request.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path
from sqlalchemy import select

from kura.catalog import Agent, Token, utcnow
from kura.errors import ServerError
from kura.server import auth, inventory, schemas
from kura.server.deps import AgentP, Ctx, Enrolling

router = APIRouter(prefix="/api/agent", tags=["agent"])
TaskId = Annotated[int, Path(ge=1, le=2**62)]


@router.post("/enrol", response_model=schemas.EnrolResponse)
def enrol(body: schemas.EnrolRequest, who: Enrolling, ctx: Ctx) -> schemas.EnrolResponse:
    """Trade a one-time enrolment token for this node's own agent credential."""
    secret = auth.new_agent_secret()
    with ctx.catalog.session() as s:
        tok = s.get(Token, who.id)
        if tok is None or tok.used is not None:
            raise HTTPException(401, "this enrolment token was already used")
        tok.used = utcnow()
        cluster = who.cluster or "default"
        node = inventory.ensure_node(s, cluster, body.node)
        agent = s.scalars(select(Agent).where(Agent.node_id == node.id)).first()
        if agent is None:
            agent = Agent(id=secrets.token_hex(8), node_id=node.id)
            s.add(agent)
        # Re-enrolment of a node replaces its credential; the old one stops working.
        agent.secret_hash = auth.hash_secret(secret)
        agent.version = body.version
        agent.revoked = False
        agent.enrolled = agent.last_seen = utcnow()
        node.uri = body.uri
        s.flush()
        resp = schemas.EnrolResponse(agent_id=agent.id, credential=f"kagent_{agent.id}_{secret}",
                                     cluster=cluster, node=node.name)
    ctx.auth_cache.clear()  # the node's previous credential stops working now
    return resp


@router.put("/inventory", response_model=schemas.Message)
def put_inventory(body: schemas.InventoryReport, who: AgentP, ctx: Ctx) -> schemas.Message:
    """Replace this node's part of the inventory (its VMs, disks and facts)."""
    if who.node_id is None:
        raise HTTPException(403, "agent has no node")
    ctx.engine.touch_agent(who.id)
    with ctx.catalog.session() as s:
        notes = inventory.apply_report(s, who.node_id, body, ctx.dead_after)
    ctx.engine.wake()
    return schemas.Message(message="inventory recorded", data={"notes": notes})


@router.post("/heartbeat", response_model=schemas.Message)
def heartbeat(who: AgentP, ctx: Ctx) -> schemas.Message:
    ctx.engine.touch_agent(who.id)
    return schemas.Message(message="ok")


@router.post("/poll", response_model=schemas.PollResponse)
def poll(body: schemas.PollRequest, who: AgentP, ctx: Ctx) -> schemas.PollResponse:
    """Long poll: returns this agent's new tasks, or an empty list after ``wait`` seconds."""
    return schemas.PollResponse(tasks=ctx.engine.claim_tasks(who.id, body.instance, body.wait,
                                                             running=body.running))


@router.post("/tasks/{task_id}/events", response_model=schemas.TaskControl)
def task_events(task_id: TaskId, body: schemas.TaskEvents, who: AgentP,
                ctx: Ctx) -> schemas.TaskControl:
    """Phase events and log lines of a running task; the answer says whether to stop."""
    try:
        return ctx.engine.task_events(who.id, task_id, body.events)
    except ServerError as exc:
        raise HTTPException(404, str(exc)) from exc


@router.post("/tasks/{task_id}/result", response_model=schemas.Message)
def task_result(task_id: TaskId, body: schemas.TaskResult, who: AgentP,
                ctx: Ctx) -> schemas.Message:
    try:
        return schemas.Message(message=ctx.engine.task_result(who.id, task_id, body))
    except ServerError as exc:
        raise HTTPException(404, str(exc)) from exc
