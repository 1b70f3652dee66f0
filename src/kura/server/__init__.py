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
