"""The FastAPI application: routers, the OpenAPI document, error mapping.

``create_app(ctx)`` builds the app around a ready :class:`ServerContext`; the
job engine's thread starts and stops with the app (lifespan), so a test can run
the whole server in-process. The OpenAPI document is served at
``/api/openapi.json`` to authenticated callers; FastAPI's unauthenticated
default routes (``/openapi.json``, ``/docs``) are switched off. The only
unauthenticated route is ``GET /api/ca``: the public CA certificate, which a
client checks against a fingerprint it got out of band.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kura import __version__
from kura.errors import AuthError, KuraError
from kura.server import api_agent, api_session, api_user
from kura.server.deps import ServerContext, Who

log = logging.getLogger(__name__)


def create_app(ctx: ServerContext, *, run_engine: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if ctx.sessions is not None:
            ctx.sessions.recover()
            ctx.engine.on_tick.append(ctx.sessions.sweep)
        if run_engine:
            ctx.engine.start()
        try:
            yield
        finally:
            if run_engine:
                ctx.engine.stop()

    app = FastAPI(title="kura server", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,
                  description="Cluster-aware backup for KVM/QEMU VMs: inventory, jobs, runs, "
                              "restore points, and the agents' protocol. Every route needs "
                              "'Authorization: Bearer TOKEN' except GET /api/ca.")
    app.state.kura = ctx
    app.include_router(api_user.router)
    app.include_router(api_agent.router)
    app.include_router(api_session.router)

    @app.get("/api/ca", tags=["auth"], response_class=Response,
             responses={200: {"content": {"application/x-pem-file": {}}}})
    def ca_certificate() -> Response:
        """The server's CA certificate (public). Verify its fingerprint before trusting it."""
        return Response(ctx.ca_pem, media_type="application/x-pem-file")

    @app.get("/api/openapi.json", tags=["auth"], include_in_schema=False)
    def openapi(who: Who) -> dict[str, Any]:
        return app.openapi()

    @app.exception_handler(AuthError)
    async def _auth(request: Request, exc: AuthError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=401)

    @app.exception_handler(KuraError)
    async def _kura(request: Request, exc: KuraError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    return app
