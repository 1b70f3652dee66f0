"""Request plumbing shared by the API modules: the server context and auth.

Every endpoint except ``GET /api/ca`` depends on :func:`principal`, which reads
the ``Authorization: Bearer ...`` header and resolves it in the catalog. The
role checks are small dependencies (:func:`reader`, :func:`operator`,
:func:`admin`, :func:`agent`) so each route states its requirement in its
signature, and the OpenAPI document shows the bearer scheme on every route.
Failures are 401 (no or bad credential) or 403 (valid, but the wrong kind or
role); the response never contains the credential.

The dependencies are ``async``: they run on the event loop instead of costing a
thread-pool hop each (a verified credential is cached; a miss is one short
catalog query), which matters for the data path's many small requests.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from kura.catalog import Catalog
from kura.errors import AuthError
from kura.server import auth
from kura.server.engine import JobEngine
from kura.server.sessions import SessionManager
from kura.server.storage import Storage


@dataclass
class ServerContext:
    catalog: Catalog
    engine: JobEngine
    storage: Storage | None
    ca_pem: bytes
    ca_fingerprint: str
    dead_after: float
    sessions: SessionManager | None = None
    data_port: int | None = None  # where the data port listens, once it does
    auth_cache: AuthCache = field(default_factory=lambda: AuthCache())


class AuthCache:
    """Recently verified credentials, so that the data path's many small requests do not
    each cost a catalog query. Entries live ``ttl`` seconds (so a revocation takes
    effect within that time everywhere, and at once on this server via :meth:`clear`);
    keys are SHA-256 digests, never the credentials themselves."""

    def __init__(self, ttl: float = 5.0) -> None:
        self.ttl = ttl
        self._entries: dict[str, tuple[auth.Principal, float]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> auth.Principal | None:
        with self._lock:
            hit = self._entries.get(key)
        if hit is None or hit[1] < time.monotonic():
            return None
        return hit[0]

    def put(self, key: str, who: auth.Principal) -> None:
        with self._lock:
            if len(self._entries) > 10_000:
                self._entries.clear()
            self._entries[key] = (who, time.monotonic() + self.ttl)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


bearer = HTTPBearer(auto_error=False, description="A kura API token or agent credential")


async def context(request: Request) -> ServerContext:
    ctx: ServerContext = request.app.state.kura
    return ctx


Ctx = Annotated[ServerContext, Depends(context)]


async def principal(ctx: Ctx,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
              ) -> auth.Principal:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(401, "authentication required: send 'Authorization: Bearer TOKEN'",
                            headers={"WWW-Authenticate": "Bearer"})
    key = auth.hash_secret(creds.credentials)
    cached = ctx.auth_cache.get(key)
    if cached is not None:
        return cached
    try:
        with ctx.catalog.session() as s:
            who = auth.authenticate(s, creds.credentials)
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from exc
    if who.kind != "enrol":  # one-time tokens are checked against the catalog every time
        ctx.auth_cache.put(key, who)
    return who


Who = Annotated[auth.Principal, Depends(principal)]


async def reader(who: Who) -> auth.Principal:
    if not who.allows("read-only"):
        raise HTTPException(403, f"a user token is needed here, not an {who.kind} credential")
    return who


async def operator(who: Who) -> auth.Principal:
    if not who.allows("operator"):
        raise HTTPException(403, "this needs the operator or admin role"
                            if who.kind == "user" else
                            f"a user token is needed here, not an {who.kind} credential")
    return who


async def admin(who: Who) -> auth.Principal:
    if not who.allows("admin"):
        raise HTTPException(403, "this needs the admin role" if who.kind == "user" else
                            f"a user token is needed here, not an {who.kind} credential")
    return who


async def agent(who: Who) -> auth.Principal:
    if who.kind != "agent":
        raise HTTPException(403, "this endpoint is for enrolled agents only")
    return who


async def enrolling(who: Who) -> auth.Principal:
    if who.kind != "enrol":
        raise HTTPException(403, "enrolment needs a one-time enrolment token")
    return who


Reader = Annotated[auth.Principal, Depends(reader)]
Operator = Annotated[auth.Principal, Depends(operator)]
Admin = Annotated[auth.Principal, Depends(admin)]
AgentP = Annotated[auth.Principal, Depends(agent)]
Enrolling = Annotated[auth.Principal, Depends(enrolling)]
