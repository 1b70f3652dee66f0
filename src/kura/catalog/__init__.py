"""The kura server's catalog: cluster inventory, tokens, jobs, runs and logs.

The catalog is a relational database (SQLite by default, PostgreSQL by URL)
reached through SQLAlchemy 2. It holds everything the server must remember
across restarts; the restore points themselves live in the repository, which
the catalog only refers to by id. See :mod:`kura.catalog.models` for the tables
and :mod:`kura.catalog.db` for how it is opened.
"""

from kura.catalog.db import DEFAULT_CATALOG, Catalog, catalog_url, redact_url
from kura.catalog.models import (
    Agent,
    BackupSession,
    Base,
    Cluster,
    Disk,
    Job,
    LogLine,
    Node,
    Run,
    RunVm,
    Task,
    Token,
    Vm,
    utcnow,
)

__all__ = [
    "DEFAULT_CATALOG",
    "Agent",
    "BackupSession",
    "Base",
    "Catalog",
    "Cluster",
    "Disk",
    "Job",
    "LogLine",
    "Node",
    "Run",
    "RunVm",
    "Task",
    "Token",
    "Vm",
    "catalog_url",
    "redact_url",
    "utcnow",
]
