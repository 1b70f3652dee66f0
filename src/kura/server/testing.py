"""Test helpers: a real kura server (uvicorn, TLS) on a loopback port in-process.

``start_server(state_dir)`` builds the catalog, CA and certificate under
``state_dir``, starts uvicorn with TLS on ``127.0.0.1`` (a free port, or the
one given, so that a test can restart a server where it was), and returns a
:class:`RunningServer` that makes tokens and clients. ``stop()`` is a clean
shutdown; to test recovery from a crash, start a new server on the same state
directory: startup recovery does not care how the old one ended.

For the lab tests, :class:`ServerProcess` and :class:`AgentProcess` run the
real ``kura server`` and ``kura agent`` commands as child processes (so they
can be SIGKILLed), and :class:`TcpProxy` relays an agent's connection so a test
can cut the network between it and the server.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import uvicorn

from kura.repository import Repository
from kura.server import auth
from kura.server.app import create_app
from kura.server.client import ServerClient
from kura.server.dataport import DataPort
from kura.server.deps import ServerContext
from kura.server.serve import ServerConfig, build_context, start_data_port
from kura.server.tls import TlsFiles


@dataclass
class RunningServer:
    url: str
    port: int
    ctx: ServerContext
    files: TlsFiles
    server: uvicorn.Server
    thread: threading.Thread
    data: DataPort | None = None

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
        if self.data is not None:
            self.data.stop()
        self.ctx.catalog.close()


def start_server(state_dir: Path, *, port: int = 0, dead_after: float = 3.0,
                 repo: Repository | None = None, data_port: bool = True) -> RunningServer:
    """``data_port``: also start the data port (on a free port); False: HTTPS only."""
    cfg = ServerConfig(listen=f"127.0.0.1:{port}", state_dir=state_dir, dead_after=dead_after,
                       data_listen="127.0.0.1:0" if data_port else "off")
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
    data = start_data_port(cfg, ctx, files, real_port)
    return RunningServer(url=f"https://127.0.0.1:{real_port}", port=real_port, ctx=ctx,
                         files=files, server=server, thread=thread, data=data)


# ---- real processes, for the lab tests ------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _kura(*args: str) -> list[str]:
    return [sys.executable, "-m", "kura.cli.main", *args]


class _Child:
    """A kura child process a test can stop (SIGTERM, then SIGKILL) or kill."""

    proc: subprocess.Popen[bytes] | None = None
    stop_timeout = 15.0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class ServerProcess(_Child):
    """``kura server`` as a child process (so that a test can SIGKILL it)."""

    def __init__(self, state_dir: Path, repo: Path, *, port: int | None = None,
                 dead_after: float = 6.0, data_port: int | None = None) -> None:
        self.state_dir = state_dir
        self.data_port = data_port or free_port()
        self.repo = repo
        self.port = port or free_port()
        self.dead_after = dead_after
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir / "server.log"

    def start(self) -> ServerProcess:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                _kura("-v", "server", "--listen", f"127.0.0.1:{self.port}", "--state-dir",
                      str(self.state_dir), "--repo", str(self.repo), "--dead-after",
                      str(self.dead_after), "--data-listen", f"127.0.0.1:{self.data_port}"),
                stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kura server exited; see {self.log}")
            try:
                ctx = ssl.create_default_context(cafile=str(self.state_dir / "ca.pem"))
                if httpx.get(f"{self.url}/api/ca", verify=ctx, timeout=2).status_code == 200:
                    return self
            except (httpx.HTTPError, OSError, ssl.SSLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"kura server did not come up; see {self.log}")

    def token(self, role: str, cluster: str | None = None) -> str:
        args = ["server", "--state-dir", str(self.state_dir), "token", "create", "--role", role]
        if cluster:
            args += ["--cluster", cluster]
        out = subprocess.run(_kura(*args), capture_output=True, check=True)
        return out.stdout.decode().strip().splitlines()[-1]

    def client(self, token: str) -> ServerClient:
        return ServerClient(self.url, token, ca=self.state_dir / "ca.pem")



class AgentProcess(_Child):
    """``kura agent`` for one lab node as a child process."""

    stop_timeout = 60.0  # it finishes (or cleanly ends) running backups first

    def __init__(self, server_url: str, token: str, node: str, uri: str, state_dir: Path,
                 *, ca: Path | None = None, heartbeat: float = 1.0,
                 inventory_interval: float = 2.0, libvirt_admin: str | None = None,
                 data_port: int | None = None) -> None:
        self.args = ["-v", "agent", "--server", server_url, "--token", token, "--connect", uri,
                     "--node", node, "--state-dir", str(state_dir), "--heartbeat",
                     str(heartbeat), "--inventory-interval", str(inventory_interval)]
        if ca is not None:
            self.args += ["--ca", str(ca)]
        if libvirt_admin is not None:
            self.args += ["--libvirt-admin", libvirt_admin]
        if data_port is not None:  # reach the data port through a relay
            self.args += ["--data-port", str(data_port)]
        self.state_dir = state_dir
        self.log = state_dir.parent / f"agent-{node}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(_kura(*self.args), stdout=out,
                                         stderr=subprocess.STDOUT)
        return self



class TcpProxy:
    """A loopback TCP relay whose traffic a test can cut and restore (a network cut)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.rate: float | None = None  # bytes per second per connection and direction
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        lsn = socket.socket()
        lsn.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsn.bind(("127.0.0.1", self.port))
        lsn.listen(64)
        self._listener = lsn
        threading.Thread(target=self._accept, args=(lsn,), daemon=True).start()
        return self

    def _accept(self, lsn: socket.socket) -> None:
        while True:
            try:
                client, _ = lsn.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
                if self.rate:  # a slow link: long uploads, so that faults land inside them
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            # Closed, not only shut down: a peer still sending gets a reset, as from a
            # dead process (a shut-down socket that nobody reads would stall it).
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        if self._listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() and stops listening
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.start()
