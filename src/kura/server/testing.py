"""Test helpers: a real kura server (uvicorn, TLS) on a loopback port in-process.

``start_server(state_dir)`` builds the catalog, CA and certificate under
``state_dir``, starts uvicorn with TLS on ``127.0.0.1`` (a free port, or the
one given, so that a test can restart a server where it was), and returns a
:class:`RunningServer` that makes tokens and clients. ``stop()`` is a clean
shutdown; to test recovery from a crash, start a new server on the same state
directory: startup recovery does not care how the old one ended.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import uvicorn

from kura.repository import Repository
from kura.server import auth
from kura.server.app import create_app
from kura.server.client import ServerClient
from kura.server.deps import ServerContext
from kura.server.serve import ServerConfig, build_context
from kura.server.tls import TlsFiles


@dataclass
class RunningServer:
    url: str
    port: int
    ctx: ServerContext
    files: TlsFiles
    server: uvicorn.Server
    thread: threading.Thread

    def token(self, role: str, *, cluster: str | None = None,
              ttl: timedelta | None = None) -> str:
        with self.ctx.catalog.session() as s:
            return auth.create_token(s, role, cluster=cluster, ttl=ttl,
                                     ca_fingerprint=self.ctx.ca_fingerprint).secret

    def client(self, token: str | None = None, role: str = "admin") -> ServerClient:
        return ServerClient(self.url, token or self.token(role), ca=self.files.ca)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.ctx.catalog.close()


def start_server(state_dir: Path, *, port: int = 0, dead_after: float = 3.0,
                 repo: Repository | None = None) -> RunningServer:
    cfg = ServerConfig(listen=f"127.0.0.1:{port}", state_dir=state_dir, dead_after=dead_after)
    ctx, files = build_context(cfg, repo)
    app = create_app(ctx)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, ssl_certfile=str(files.cert),
                            ssl_keyfile=str(files.key), log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="kura-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    real_port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(url=f"https://127.0.0.1:{real_port}", port=real_port, ctx=ctx,
                         files=files, server=server, thread=thread)
