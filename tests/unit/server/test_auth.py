"""Authentication and roles over real HTTPS."""

from __future__ import annotations

import ssl

import httpx
import pytest

from kura.agent.enrol import enrol
from kura.errors import AuthError, ServerError
from kura.server import schemas
from kura.server.client import ServerClient
from kura.server.testing import RunningServer


def test_no_token_wrong_token_and_unknown_scheme_are_refused(server: RunningServer) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(server.files.ca))) as h:
        assert h.get(f"{server.url}/api/inventory").status_code == 401
        bad = {"Authorization": "Bearer kura_0123456789abcdef_" + "0" * 64}
        assert h.get(f"{server.url}/api/inventory", headers=bad).status_code == 401
        junk = {"Authorization": "Bearer nonsense"}
        r = h.get(f"{server.url}/api/jobs", headers=junk)
        assert r.status_code == 401
        assert "nonsense" not in r.text
        assert h.get(f"{server.url}/api/openapi.json").status_code == 401
        # The CA is public.
        assert h.get(f"{server.url}/api/ca").status_code == 200


def test_roles(server: RunningServer) -> None:
    spec = schemas.JobSpec(name="j", selection=schemas.Selection(all=True))
    with server.client(role="read-only") as ro:
        assert ro.jobs() == []
        with pytest.raises(AuthError):
            ro.create_job(spec)
    with server.client(role="operator") as op:
        op.create_job(spec)
        with pytest.raises(AuthError):
            op.create_token(schemas.TokenCreate(role="admin"))
    with server.client(role="admin") as adm:
        made = adm.create_token(schemas.TokenCreate(role="read-only", name="ci"))
        assert made.token.startswith("kura_")
        assert all(t.id != made.token for t in [made])


def test_agent_credential_is_refused_for_user_actions(server: RunningServer) -> None:

    creds = enrol(server.url, server.token("agent", cluster="lab"), node="node-a")
    with creds.client() as agent_client:
        assert agent_client.request("POST", "/api/agent/heartbeat")["message"] == "ok"
        for call in (agent_client.inventory, agent_client.jobs,
                     lambda: agent_client.create_token(schemas.TokenCreate(role="admin"))):
            with pytest.raises(AuthError):
                call()
    with server.client(role="admin") as adm, pytest.raises(AuthError):
        adm.heartbeat()  # user tokens cannot act as agents


def test_enrolment_token_works_once(server: RunningServer) -> None:

    tok = server.token("agent", cluster="lab")
    enrol(server.url, tok, node="node-a")
    with pytest.raises(AuthError, match="already used"):
        enrol(server.url, tok, node="node-b")


def test_wrong_ca_fingerprint_is_refused_before_sending_the_token(server: RunningServer) -> None:

    tok = server.token("agent")
    forged = tok[: -64] + "ab" * 32
    with pytest.raises(AuthError, match="fingerprint"):
        enrol(server.url, forged, node="node-a")
    enrol(server.url, tok, node="node-a")  # the real token was not spent


def test_client_refuses_a_server_it_cannot_verify(server: RunningServer, tmp_path: object) -> None:
    c = ServerClient(server.url, server.token("admin"))  # system CAs only
    with pytest.raises(ServerError, match="cannot reach"):
        c.whoami()
