"""Enrolment: turning a one-time token into this node's own credential.

``kura agent --server URL --token T`` on a node that has never enrolled:

1. the CA fingerprint is taken from the enrolment token (or the CA from
   ``--ca FILE``); the agent fetches ``/api/ca`` without sending anything
   secret and accepts it only if the fingerprint matches;
2. over a connection that now verifies the server against that CA, it posts
   the token and its node name; the server marks the token used and returns
   a credential for this agent;
3. the credential, the server URL and the CA are saved in the state directory
   (``agent.json`` mode 0600, ``ca.pem``). Later starts use them and ignore
   ``--token``; removing the directory forces a new enrolment.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from kura import __version__
from kura.errors import AuthError, ServerError, UsageError
from kura.server import schemas, tls
from kura.server.auth import parse_enrolment_token
from kura.server.client import ServerClient, fetch_ca

DEFAULT_STATE_DIR = Path("/var/lib/kura/agent")  # kura.cli.agent repeats it (start-up time)


@dataclass(frozen=True)
class Credentials:
    server: str
    agent_id: str
    credential: str
    cluster: str
    node: str
    ca_pem: bytes

    def client(self, *, timeout: float = 30.0) -> ServerClient:
        return ServerClient(self.server, self.credential, ca_pem=self.ca_pem, timeout=timeout)


def load(state_dir: Path) -> Credentials | None:
    path = state_dir / "agent.json"
    try:
        data = json.loads(path.read_text())
        ca_pem = (state_dir / "ca.pem").read_bytes()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ServerError(f"cannot read the agent state in {state_dir}: {exc}",
                          hint="remove the directory and enrol again") from exc
    try:
        return Credentials(server=data["server"], agent_id=data["agent_id"],
                           credential=data["credential"], cluster=data["cluster"],
                           node=data["node"], ca_pem=ca_pem)
    except KeyError as exc:
        raise ServerError(f"the agent state in {state_dir} lacks {exc}",
                          hint="remove the directory and enrol again") from exc


def save(state_dir: Path, creds: Credentials) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    (state_dir / "ca.pem").write_bytes(creds.ca_pem)
    tmp = state_dir / "agent.json.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"server": creds.server, "agent_id": creds.agent_id,
                   "credential": creds.credential, "cluster": creds.cluster,
                   "node": creds.node}, f)
    os.replace(tmp, state_dir / "agent.json")


def enrol(server: str, token: str, *, node: str | None = None, uri: str = "",
          ca: Path | None = None) -> Credentials:
    """Enrol with a one-time token; returns the credentials (not yet saved)."""
    _, _, fp = parse_enrolment_token(token)
    if ca is not None:
        try:
            ca_pem = ca.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {ca}: {exc.strerror}") from exc
        if tls.fingerprint(ca_pem) != fp:
            raise AuthError(f"the CA in {ca} is not the one this token was made for",
                            hint="check --ca, or leave it out to fetch and check the CA")
    else:
        ca_pem = fetch_ca(server, fp)
    name = node or socket.gethostname()
    with ServerClient(server, token, ca_pem=ca_pem) as client:
        resp = client.enrol(schemas.EnrolRequest(node=name, uri=uri, version=__version__))
    return Credentials(server=server.rstrip("/"), agent_id=resp.agent_id,
                       credential=resp.credential, cluster=resp.cluster, node=resp.node,
                       ca_pem=ca_pem)


def ensure_enrolled(state_dir: Path, server: str, token: str | None, *, node: str | None,
                    uri: str, ca: Path | None) -> Credentials:
    """Saved credentials for ``server``, enrolling first if there are none."""
    creds = load(state_dir)
    if creds is not None and creds.server == server.rstrip("/"):
        if node is not None and node != creds.node:
            raise UsageError(f"this agent is enrolled as node {creds.node!r}, not {node!r}",
                             hint=f"remove {state_dir} to enrol again")
        return creds
    if not token:
        raise UsageError("this agent is not enrolled with that server yet",
                         hint="pass --token (create one with `kura server token create "
                              "--role agent`)")
    creds = enrol(server, token, node=node, uri=uri, ca=ca)
    save(state_dir, creds)
    return creds
