"""Schemathesis against the server's OpenAPI document: malformed input is 4xx, never 500."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings

from kura.repository import Repository
from kura.server import auth
from kura.server.app import create_app
from kura.server.engine import EngineSettings
from kura.server.serve import ServerConfig, build_context

_root = Path(tempfile.mkdtemp(prefix="kura-fuzz-"))
atexit.register(shutil.rmtree, _root, True)
_repo = Repository.init(_root / "repo", passphrase=None, encryption="none")
_ctx, _ = build_context(ServerConfig(listen="127.0.0.1:0", state_dir=_root / "server"), _repo)
_ctx.engine.settings = EngineSettings(poll_wait=0.0)  # long polls answer at once here
app = create_app(_ctx, run_engine=False)
with _ctx.catalog.session() as s:
    ADMIN = auth.create_token(s, "admin").secret
    ENROL = auth.create_token(s, "agent", cluster="lab", ca_fingerprint=_ctx.ca_fingerprint).secret
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
schema = schemathesis.openapi.from_asgi("/api/openapi.json", app, headers=HEADERS)


def _agent_credential() -> str:
    from fastapi.testclient import TestClient

    with TestClient(app) as tc:
        r = tc.post("/api/agent/enrol", json={"node": "node-a"},
                    headers={"Authorization": f"Bearer {ENROL}"})
        assert r.status_code == 200, r.text
        return str(r.json()["credential"])


AGENT = _agent_credential()


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_requests_never_cause_a_server_error(case: Any) -> None:
    response = case.call(headers=HEADERS)
    assert response.status_code < 500, (case.method, case.path, response.text)


@schema.parametrize()
@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
def test_agent_requests_never_cause_a_server_error(case: Any) -> None:
    response = case.call(headers={"Authorization": f"Bearer {AGENT}"})
    assert response.status_code < 500, (case.method, case.path, response.text)


@schema.parametrize()
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
def test_requests_without_a_token_are_refused(case: Any) -> None:
    response = case.call(headers={"Authorization": ""})
    if case.path != "/api/ca":
        assert 400 <= response.status_code < 500, (case.method, case.path, response.status_code)
