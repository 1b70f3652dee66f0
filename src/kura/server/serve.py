"""Starting a server: state directory, TLS, catalog, repository, uvicorn.

``ServerConfig`` is the frozen set of options ``kura server`` was given;
:func:`build_context` opens everything (creating the CA and certificate on
first start) and :func:`serve` runs uvicorn with TLS until interrupted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from kura.catalog import Catalog
from kura.errors import UsageError
from kura.procmem import return_large_buffers
from kura.repository import Repository
from kura.server import DEFAULT_LISTEN, DEFAULT_STATE_DIR, tls
from kura.server.app import create_app
from kura.server.dataport import DataPort
from kura.server.deps import ServerContext
from kura.server.engine import EngineSettings, JobEngine
from kura.server.repo_storage import RepositoryStorage
from kura.server.sessions import SessionManager

log = logging.getLogger(__name__)



def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"bad listen address {listen!r}",
                         hint="use HOST:PORT, e.g. 127.0.0.1:8443")
    return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True)
class ServerConfig:
    listen: str = DEFAULT_LISTEN
    state_dir: Path = DEFAULT_STATE_DIR
    catalog: str | None = None           # path or URL; default <state_dir>/catalog.db
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    dead_after: float = 45.0
    extra_names: tuple[str, ...] = field(default_factory=tuple)
    data_listen: str = "auto"  # HOST:PORT, "auto" (listen's port + 1) or "off"

    @property
    def catalog_location(self) -> str:
        return self.catalog or str(self.state_dir / "catalog.db")


def tls_files(cfg: ServerConfig) -> tls.TlsFiles:
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        return tls.TlsFiles(ca=cfg.tls_ca or cfg.tls_cert, cert=cfg.tls_cert, key=cfg.tls_key)
    host, _ = parse_listen(cfg.listen)
    return tls.ensure_tls(cfg.state_dir, [host, *cfg.extra_names])


def build_context(cfg: ServerConfig, repo: Repository | None,
                  server_checks: Callable[[], list[dict[str, Any]]] | None = None,
                  ) -> tuple[ServerContext, tls.TlsFiles]:
    """Open everything a server needs; ``repo`` None runs without a repository."""
    files = tls_files(cfg)
    catalog = Catalog.open(cfg.catalog_location)
    storage = RepositoryStorage(repo) if repo is not None else None
    engine = JobEngine(catalog, EngineSettings(dead_after=cfg.dead_after), storage=storage,
                       server_checks=server_checks)
    sessions = SessionManager(catalog, repo, on_commit=engine.note_commit) \
        if repo is not None else None
    ca_pem = files.ca.read_bytes()
    ctx = ServerContext(catalog=catalog, engine=engine, storage=storage, ca_pem=ca_pem,
                        ca_fingerprint=tls.fingerprint(ca_pem), dead_after=cfg.dead_after,
                        sessions=sessions)
    return ctx, files


def data_address(cfg: ServerConfig, api_port: int) -> tuple[str, int] | None:
    """Where the data port listens: None when it is off."""
    if cfg.data_listen == "off":
        return None
    if cfg.data_listen == "auto":
        host, _ = parse_listen(cfg.listen)
        return host, api_port + 1 if api_port else 0
    return parse_listen(cfg.data_listen)


def start_data_port(cfg: ServerConfig, ctx: ServerContext, files: tls.TlsFiles,
                    api_port: int) -> DataPort | None:
    """Start the data port (see :mod:`kura.server.dataport`) and tell ``ctx`` its port."""
    where = data_address(cfg, api_port)
    if where is None or ctx.sessions is None:
        return None
    port = DataPort(ctx.sessions, tls.server_context(files), *where)
    ctx.data_port = port.start()
    log.info("kura data port on %s:%d", where[0], ctx.data_port)
    return port


def serve(cfg: ServerConfig, ctx: ServerContext, files: tls.TlsFiles) -> None:
    host, port = parse_listen(cfg.listen)
    return_large_buffers()  # request bodies and chunk buffers go back to the system
    app = create_app(ctx)
    data = start_data_port(cfg, ctx, files, port)
    log.info("kura server on https://%s:%d (CA fingerprint %s)", host, port, ctx.ca_fingerprint)
    try:
        uvicorn.run(app, host=host, port=port, ssl_certfile=str(files.cert),
                    ssl_keyfile=str(files.key), log_level="warning", access_log=False,
                    timeout_keep_alive=30)
    finally:
        if data is not None:
            data.stop()
