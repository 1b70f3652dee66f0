"""Credentials: API tokens with roles, one-time enrolment tokens, agent credentials.

Every credential is a random secret shown once; the catalog stores only its
SHA-256. (The secrets are 256-bit random values, so a fast hash is enough: there
is nothing to brute-force; a slow KDF would only slow down every request.)

Formats (the prefix lets a reader tell them apart; ``_`` separates fields)::

    kura_<id>_<secret>              API token (roles admin, operator, read-only)
    kura_<id>_<secret>_<ca sha256>  enrolment token (role agent, one-time): it carries
                                    the CA fingerprint so that ``kura agent --token T``
                                    can pin the server's CA before sending anything
    kagent_<agent id>_<secret>      an agent's own credential, issued at enrolment

Roles are ordered ``read-only < operator < admin``. Agents are a separate kind
of principal: an agent credential is refused on every user endpoint (and a user
token on every agent endpoint), and an agent may only act for its own node and
VMs of its own cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from kura.catalog import Agent, Token, utcnow
from kura.errors import AuthError, UsageError
from kura.server import ROLES, USER_ROLES

_RANK = {r: i for i, r in enumerate(USER_ROLES)}


@dataclass(frozen=True)
class Principal:
    """Who is making a request."""

    kind: str  # "user" | "agent"
    id: str
    role: str
    name: str = ""
    cluster: str | None = None
    node_id: int | None = None

    def allows(self, role: str) -> bool:
        return self.kind == "user" and _RANK.get(self.role, -1) >= _RANK[role]


@dataclass(frozen=True)
class NewToken:
    id: str
    secret: str  # the full token string; shown once, never stored


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(s: Session, role: str, *, name: str = "", cluster: str | None = None,
                 ttl: timedelta | None = None, ca_fingerprint: str | None = None) -> NewToken:
    """Store a new token (hash only) and return its secret form once."""
    if role not in ROLES:
        raise UsageError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
    if role == "agent" and not ca_fingerprint:
        raise UsageError("an enrolment token needs the server's CA fingerprint")
    tid = secrets.token_hex(8)
    secret = secrets.token_hex(32)
    expires = utcnow() + ttl if ttl else None
    if role == "agent":
        cluster = cluster or "default"
    s.add(Token(id=tid, secret_hash=hash_secret(secret), role=role, name=name,
                cluster=cluster if role == "agent" else None, expires=expires))
    text = f"kura_{tid}_{secret}"
    if role == "agent":
        text += f"_{ca_fingerprint}"
    return NewToken(id=tid, secret=text)


def parse_enrolment_token(token: str) -> tuple[str, str, str]:
    """(token id, secret, CA fingerprint) of an enrolment token."""
    parts = token.strip().split("_")
    if len(parts) != 4 or parts[0] != "kura" or len(parts[3]) != 64:
        raise AuthError("this is not an enrolment token", hint="create one on the server with "
                        "`kura server token create --role agent`")
    return parts[1], parts[2], parts[3]


def _check(stored_hash: str, secret: str) -> bool:
    return hmac.compare_digest(stored_hash, hash_secret(secret))


def authenticate(s: Session, credential: str, *, now: datetime | None = None) -> Principal:
    """The principal a bearer credential stands for; AuthError if none.

    The error never echoes the credential: messages end up in logs.
    """
    now = now or utcnow()
    parts = credential.strip().split("_")
    if len(parts) == 3 and parts[0] == "kagent":
        agent = s.get(Agent, parts[1])
        if agent is None or agent.revoked or not _check(agent.secret_hash, parts[2]):
            raise AuthError("unknown or revoked agent credential",
                            hint="enrol the agent again with a new token")
        return Principal(kind="agent", id=agent.id, role="agent", name=agent.node.name,
                         cluster=agent.node.cluster.name, node_id=agent.node_id)
    if len(parts) in (3, 4) and parts[0] == "kura":
        tok = s.get(Token, parts[1])
        if tok is None or tok.revoked or not _check(tok.secret_hash, parts[2]):
            raise AuthError("unknown or revoked token")
        if tok.expires is not None and tok.expires < now:
            raise AuthError("this token has expired", hint="create a new one")
        if tok.role == "agent":
            if tok.used is not None:
                raise AuthError("this enrolment token was already used",
                                hint="enrolment tokens work once; create a new one")
            return Principal(kind="enrol", id=tok.id, role="agent", name=tok.name,
                             cluster=tok.cluster)
        return Principal(kind="user", id=tok.id, role=tok.role, name=tok.name)
    raise AuthError("malformed credential",
                    hint="pass a token created by `kura server token create`")


def new_agent_secret() -> str:
    return secrets.token_hex(32)
