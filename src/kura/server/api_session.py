"""Endpoints of the remote data path (see :mod:`kura.server.sessions`).

Object bodies travel as raw ``application/octet-stream``, chunk uploads usually
as *packs* of several blobs (``POST .../chunks``); everything else is JSON.
``touch``, ``exists`` and ``stat`` are metadata calls of a few microseconds and
run on the event loop; reads and writes of objects, and ``chunks/touch`` (up to
``TOUCH_MAX`` touches), run in the thread pool.

Errors: 403 for what the session may not do, 404 for a missing object, 507 when
the repository's storage is full, 409 for other repository errors.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from kura.errors import KuraError
from kura.server import schemas
from kura.server.deps import AgentP, Ctx
from kura.server.sessions import Session, SessionManager, error_status

router = APIRouter(prefix="/api/agent/sessions", tags=["data path"])
Sid = Annotated[str, Path(min_length=1, max_length=64)]
Name = Annotated[str, Path(min_length=1, max_length=512)]
MAX_BODY = 64 << 20
T = TypeVar("T")


def _manager(ctx: Ctx) -> SessionManager:
    if ctx.sessions is None:
        raise HTTPException(409, "this server has no repository attached")
    return ctx.sessions


def _call(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except KuraError as exc:
        status = error_status(exc)
        raise HTTPException(status, str(exc) if status != 409
                            else f"{type(exc).__name__}: {exc}") from exc


def _found(found: bool) -> Response:
    """A ``schemas.Found`` answer, encoded without a model round trip (hot path)."""
    return Response(b'{"found":true}' if found else b'{"found":false}',
                    media_type="application/json")


def _session(ctx: Ctx, who: AgentP, sid: str) -> tuple[SessionManager, Session]:
    mgr = _manager(ctx)
    return mgr, _call(lambda: mgr.get(who.id, sid))


@router.post("", response_model=schemas.SessionOpened)
def begin(body: schemas.SessionBegin, who: AgentP, ctx: Ctx) -> schemas.SessionOpened:
    """Open a session for a dispatched backup or restore task."""
    mgr = _manager(ctx)
    sess, key = _call(lambda: mgr.begin(who.id, body.task_id))
    config = _call(lambda: mgr.backend.read("config"))
    port = ctx.data_port if sess.kind in ("backup", "restore") else None
    return schemas.SessionOpened(session_id=sess.id, master_key=base64.b64encode(key).decode(),
                                 config=base64.b64encode(config).decode(),
                                 location=f"kura-server:{mgr.repo.id}", data_port=port,
                                 data_secret=sess.data_secret if port else None)


@router.get("/{sid}/objects/{name:path}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def read_object(sid: Sid, name: Name, who: AgentP, ctx: Ctx) -> Response:
    mgr, sess = _session(ctx, who, sid)
    return Response(_call(lambda: mgr.read(sess, name)), media_type="application/octet-stream")


async def _body(request: Request, what: str) -> bytes:
    """The request's body, refused (413) when over MAX_BODY: before it is read when
    Content-Length says so, else once read."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise HTTPException(413, f"{what} larger than {MAX_BODY} bytes")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise HTTPException(413, f"{what} larger than {MAX_BODY} bytes")
    return body


@router.put("/{sid}/objects/{name:path}", response_model=schemas.Found)
async def write_object(sid: Sid, name: Name, request: Request, who: AgentP, ctx: Ctx,
                       create: Annotated[bool, Query()] = False) -> Response:
    """Store an object (``create=true``: only if absent; found=False when it existed)."""
    body = await _body(request, "object")

    def work() -> bool:
        mgr, sess = _session(ctx, who, sid)
        return _call(lambda: mgr.write(sess, name, body, create=create))
    return _found(await run_in_threadpool(work))


@router.post("/{sid}/chunks", response_model=schemas.Message)
async def write_chunks(sid: Sid, request: Request, who: AgentP, ctx: Ctx) -> schemas.Message:
    """Store several chunk blobs in one request (``application/octet-stream``): records
    of a 32-byte chunk id, the blob's length (u32, big-endian) and the blob."""
    body = await _body(request, "chunk pack")

    def work() -> int:
        mgr, sess = _session(ctx, who, sid)
        return _call(lambda: mgr.write_chunks(sess, body))
    return schemas.Message(message=f"stored {await run_in_threadpool(work)} chunks")


@router.delete("/{sid}/objects/{name:path}", response_model=schemas.Message)
def delete_object(sid: Sid, name: Name, who: AgentP, ctx: Ctx) -> schemas.Message:
    mgr, sess = _session(ctx, who, sid)
    _call(lambda: mgr.delete(sess, name))
    return schemas.Message(message="deleted")


@router.post("/{sid}/exists", response_model=schemas.Found)
async def exists(sid: Sid, body: schemas.ObjectRef, who: AgentP, ctx: Ctx) -> Response:
    mgr, sess = _session(ctx, who, sid)
    return _found(_call(lambda: mgr.exists(sess, body.name)))


@router.post("/{sid}/touch", response_model=schemas.Found)
async def touch(sid: Sid, body: schemas.ObjectRef, who: AgentP, ctx: Ctx) -> Response:
    """Mark an object in use; found=False when it does not exist (then upload it)."""
    mgr, sess = _session(ctx, who, sid)
    return _found(_call(lambda: mgr.touch(sess, body.name)))


@router.post("/{sid}/chunks/touch", response_model=schemas.ChunkIds)
async def touch_chunks(sid: Sid, body: schemas.ChunkIds, who: AgentP,
                       ctx: Ctx) -> schemas.ChunkIds:
    """``touch`` for up to ``TOUCH_MAX`` chunk ids (hex) at once; answers the missing ones."""
    ids = [bytes.fromhex(h) for h in body.ids]

    def work() -> list[bytes]:
        mgr, sess = _session(ctx, who, sid)
        return _call(lambda: mgr.touch_chunks(sess, ids))
    return schemas.ChunkIds(ids=[c.hex() for c in await run_in_threadpool(work)])


@router.post("/{sid}/stat", response_model=schemas.StatOut)
async def stat(sid: Sid, body: schemas.ObjectRef, who: AgentP, ctx: Ctx) -> schemas.StatOut:
    mgr, sess = _session(ctx, who, sid)
    st = _call(lambda: mgr.stat(sess, body.name))
    return schemas.StatOut(mtime=st.mtime, size=st.size)


@router.get("/{sid}/list", response_model=schemas.Names)
def list_objects(sid: Sid, who: AgentP, ctx: Ctx,
                 prefix: Annotated[str, Query(max_length=512)] = "") -> schemas.Names:
    mgr, sess = _session(ctx, who, sid)
    return schemas.Names(names=_call(lambda: mgr.names(sess, prefix)))


@router.post("/{sid}/rename", response_model=schemas.Message)
def rename(sid: Sid, body: schemas.RenameRequest, who: AgentP, ctx: Ctx) -> schemas.Message:
    mgr, sess = _session(ctx, who, sid)
    _call(lambda: mgr.rename(sess, body.src, body.dst))
    return schemas.Message(message="renamed")


@router.post("/{sid}/sync", response_model=schemas.Message)
def sync(sid: Sid, body: schemas.SyncRequest, who: AgentP, ctx: Ctx) -> schemas.Message:
    mgr, sess = _session(ctx, who, sid)
    _call(lambda: mgr.sync(sess, body.names))
    return schemas.Message(message="synced")


@router.post("/{sid}/end", response_model=schemas.SessionEnded)
def end(sid: Sid, who: AgentP, ctx: Ctx) -> schemas.SessionEnded:
    """Close the session; without a committed manifest it is aborted (no restore point)."""
    mgr = _manager(ctx)
    return schemas.SessionEnded(committed=_call(lambda: mgr.end(who.id, sid)))
