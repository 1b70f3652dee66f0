"""A small typed client for the kura server, used by the CLI, the agent and tests.

It speaks HTTPS only and trusts only the CA it is given (the pinned server
CA); ``fetch_ca`` bootstraps that pin from a fingerprint. HTTP errors become
kura errors: 401/403 → :class:`AuthError`, anything else → :class:`ServerError`
with the server's own message, and a server that cannot be reached is a
:class:`ServerError` that says so. The credential is sent as a bearer header
and never appears in an error message.
"""

from __future__ import annotations

import hashlib
import os
import ssl
import struct
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kura.errors import AuthError, ServerError, UsageError
from kura.server import schemas, tls

DEFAULT_CA = Path("/var/lib/kura/server/ca.pem")
# The data path's chunk packs (``POST /api/agent/sessions/ID/chunks``): records of
# this header (chunk id, blob length) followed by the blob.
PACK_RECORD = struct.Struct(">32sI")


def fetch_ca(url: str, fingerprint: str, *, timeout: float = 10.0) -> bytes:
    """The server's CA certificate, checked against its expected SHA-256 fingerprint.

    The first request cannot verify the server (that is what it fetches), so
    nothing secret is sent on it; the certificate is accepted only if its
    fingerprint matches the one the administrator was given.
    """
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        r = httpx.get(url.rstrip("/") + "/api/ca", verify=ctx, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach the kura server at {url}: {exc}") from exc
    if r.status_code != 200:
        raise ServerError(f"the server at {url} did not give its CA (HTTP {r.status_code})")
    pem = r.content
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ServerError(f"the server at {url} sent something that is not a certificate") \
            from exc
    got = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    if got != fingerprint.lower().replace(":", ""):
        raise AuthError(f"the server at {url} presented a CA with fingerprint {got}, not the "
                        "expected one", hint="check the URL; someone may be intercepting")
    return pem


class ServerClient:
    def __init__(self, url: str, token: str, *, ca: Path | None = None,
                 ca_pem: bytes | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith("https://") and transport is None:
            raise UsageError(f"the server URL must start with https:// (got {url!r})")
        self.url = url.rstrip("/")
        self.host = urlsplit(self.url).hostname or "127.0.0.1"
        self.data_port: int | None = None  # the data port as reached from here, if not the named
        verify = self.ssl_context = tls.client_context(ca, ca_pem)
        self._http = httpx.Client(base_url=self.url, verify=verify, timeout=timeout,
                                  headers={"Authorization": f"Bearer {token}"},
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, *, json: Any = None,
                params: dict[str, Any] | None = None, timeout: float | None = None,
                content: bytes | None = None) -> Any:
        try:
            kwargs: dict[str, Any] = {"json": json, "params": params}
            if content is not None:
                kwargs["content"] = content
                kwargs["headers"] = {"Content-Type": "application/octet-stream"}
            if timeout is not None:
                kwargs["timeout"] = timeout
            r = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerError(f"the kura server at {self.url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach the kura server at {self.url}: {exc}",
                              hint="check KURA_SERVER/--server, that the server runs, and "
                                   "the CA (--ca/KURA_CA)") from exc
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            if isinstance(detail, list):  # pydantic validation errors
                detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', []))}: "
                                   f"{d.get('msg', '')}" for d in detail if isinstance(d, dict))
            text = f"{method} {path}: {detail}"
            if r.status_code == 401 or (r.status_code == 403
                                        and not path.startswith("/api/agent/sessions")):
                raise AuthError(text, hint="check KURA_TOKEN/--token and its role")
            err = ServerError(text)
            err.status = r.status_code  # type: ignore[attr-defined]
            raise err
        if r.headers.get("content-type", "").startswith("application/json"):
            return r.json()
        return r.content

    # ---- users ---------------------------------------------------------

    def whoami(self) -> schemas.WhoAmI:
        return schemas.WhoAmI.model_validate(self.request("GET", "/api/whoami"))

    def inventory(self) -> schemas.Inventory:
        return schemas.Inventory.model_validate(self.request("GET", "/api/inventory"))

    def create_token(self, body: schemas.TokenCreate) -> schemas.TokenCreated:
        data = self.request("POST", "/api/tokens", json=body.model_dump())
        return schemas.TokenCreated.model_validate(data)

    def create_job(self, spec: schemas.JobSpec) -> schemas.JobOut:
        return schemas.JobOut.model_validate(self.request("POST", "/api/jobs",
                                                          json=spec.model_dump()))

    def jobs(self) -> list[schemas.JobOut]:
        return [schemas.JobOut.model_validate(j) for j in self.request("GET", "/api/jobs")]

    def job(self, name: str) -> schemas.JobOut:
        return schemas.JobOut.model_validate(self.request("GET", f"/api/jobs/{name}"))

    def delete_job(self, name: str) -> None:
        self.request("DELETE", f"/api/jobs/{name}")

    def run_job(self, name: str, *, test: bool = False) -> schemas.RunOut:
        what = "test" if test else "run"
        return schemas.RunOut.model_validate(self.request("POST", f"/api/jobs/{name}/{what}"))

    def runs(self, job: str | None = None, limit: int = 50) -> list[schemas.RunSummary]:
        params: dict[str, Any] = {"limit": limit}
        if job:
            params["job"] = job
        return [schemas.RunSummary.model_validate(r)
                for r in self.request("GET", "/api/runs", params=params)]

    def run(self, run_id: int, *, wait: float = 0) -> schemas.RunOut:
        """A run; ``wait``: seconds the server may hold the answer until the run ends."""
        params = {"wait": wait} if wait else None
        return schemas.RunOut.model_validate(self.request(
            "GET", f"/api/runs/{run_id}", params=params, timeout=wait + 30 if wait else None))

    def run_log(self, run_id: int) -> schemas.RunLog:
        return schemas.RunLog.model_validate(self.request("GET", f"/api/runs/{run_id}/log"))

    def snapshots(self, source: str | None = None) -> list[schemas.SnapshotOut]:
        params = {"source": source} if source else None
        return [schemas.SnapshotOut.model_validate(x)
                for x in self.request("GET", "/api/snapshots", params=params)]

    def prune(self, body: schemas.PruneRequest) -> schemas.Message:
        return schemas.Message.model_validate(self.request("POST", "/api/prune",
                                                           json=body.model_dump()))

    def verify(self) -> schemas.Message:
        return schemas.Message.model_validate(self.request("POST", "/api/repo/verify",
                                                           timeout=3600))

    def restore(self, body: schemas.RestoreRequest) -> schemas.RunOut:
        return schemas.RunOut.model_validate(self.request("POST", "/api/restore",
                                                          json=body.model_dump()))

    # ---- agents --------------------------------------------------------

    def enrol(self, body: schemas.EnrolRequest) -> schemas.EnrolResponse:
        return schemas.EnrolResponse.model_validate(
            self.request("POST", "/api/agent/enrol", json=body.model_dump()))

    def put_inventory(self, report: schemas.InventoryReport) -> schemas.Message:
        return schemas.Message.model_validate(
            self.request("PUT", "/api/agent/inventory", json=report.model_dump()))

    def heartbeat(self) -> None:
        self.request("POST", "/api/agent/heartbeat")

    def poll(self, instance: str, wait: float,
             running: list[int] | None = None) -> list[schemas.TaskOut]:
        data = self.request("POST", "/api/agent/poll",
                            json={"instance": instance, "wait": wait,
                                  "running": running or []}, timeout=wait + 30)
        return schemas.PollResponse.model_validate(data).tasks

    def task_events(self, task_id: int, events: list[schemas.TaskEvent]) -> schemas.TaskControl:
        data = self.request("POST", f"/api/agent/tasks/{task_id}/events",
                            json={"events": [e.model_dump() for e in events]})
        return schemas.TaskControl.model_validate(data)

    def task_result(self, task_id: int, result: schemas.TaskResult) -> str:
        data = self.request("POST", f"/api/agent/tasks/{task_id}/result",
                            json=result.model_dump())
        return str(schemas.Message.model_validate(data).message)


def from_env(server: str | None, token: str | None, ca: Path | None) -> ServerClient:
    """A client from options or KURA_SERVER / KURA_TOKEN / KURA_CA."""
    url = server or os.environ.get("KURA_SERVER")
    if not url:
        raise UsageError("no server given", hint="set KURA_SERVER or pass --server URL")
    tok = token or os.environ.get("KURA_TOKEN")
    if not tok:
        raise UsageError("no API token given",
                         hint="set KURA_TOKEN (create one with `kura server token create`)")
    ca_path = ca or (Path(os.environ["KURA_CA"]) if os.environ.get("KURA_CA") else None)
    if ca_path is None and DEFAULT_CA.exists():
        ca_path = DEFAULT_CA
    return ServerClient(url, tok, ca=ca_path)
