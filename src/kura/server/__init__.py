"""The kura server: one per site; the cluster's catalog, scheduler, job engine and API.

Where things are:

- ``serve``        options (:class:`~kura.server.serve.ServerConfig`), start-up, uvicorn;
- ``tls``          the server's own CA and certificate;
- ``auth``, ``deps``  tokens, roles, agent credentials; the request dependencies;
- ``app``, ``api_user``, ``api_agent``, ``api_session``  the HTTPS API (URL tree =
  module tree: ``/api/...`` for people, ``/api/agent/...`` for agents,
  ``/api/agent/sessions/...`` for the data path);
- ``schemas``      every request and response model (shared with the client and agent);
- ``inventory``    agents' reports → one cluster tree, VM placement by UUID;
- ``engine``       the job engine and scheduler (dispatch, retries, recovery);
- ``diagnosis``    retry decisions and plain-language diagnoses for the job log;
- ``sessions``     the remote data path: what an agent may read and write, the commit check;
- ``storage``, ``repo_storage``  the engine's narrow view of the repository;
- ``client``       the typed HTTPS client (CLI, agent, tests);
- ``testing``      test helpers: in-process server, server/agent processes, a cuttable proxy.

The protocol, the trust bootstrap and the threat model are in docs/design.md.
"""

from pathlib import Path

# Light constants the CLI needs at import time (the modules above pull in
# FastAPI and SQLAlchemy, which take most of a second to import).
DEFAULT_STATE_DIR = Path("/var/lib/kura/server")
DEFAULT_LISTEN = "127.0.0.1:8443"
USER_ROLES = ("read-only", "operator", "admin")
ROLES = (*USER_ROLES, "agent")
