"""The catalog's tables (SQLAlchemy 2 declarative models).

The catalog is the server's memory: everything that must survive a restart
lives here, nothing else does. Two groups of tables:

*Cluster state* (rewritten from agents' reports): ``clusters``, ``nodes``,
``agents``, ``vms`` and ``disks``. A VM row is keyed by its libvirt UUID and
points at the node that last reported it, so a VM that migrated moves under its
new node instead of appearing twice.

*Work* (written by the server): ``tokens`` (API and enrolment tokens; only a
SHA-256 of the secret is stored), ``jobs`` (definitions), ``runs`` (one
execution of a job), ``run_vms`` (one VM inside a run, with its phases, counters
and diagnosis), ``tasks`` (the unit of work handed to one agent) and
``log_lines`` (the job log).

Timestamps are stored as UTC; :class:`UtcDateTime` gives aware datetimes back
on every database (SQLite keeps no zone). JSON columns hold small documents
whose shape is owned by :mod:`kura.server.schemas`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 1


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UtcDateTime, dict[str, Any]: JSON, list[Any]: JSON}


class Meta(Base):
    """Key/value facts about the catalog itself (schema version, server id)."""

    __tablename__ = "meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Token(Base):
    """An API token (role admin/operator/read-only) or a one-time enrolment token (agent)."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(128), default="")
    cluster: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    expires: Mapped[datetime | None] = mapped_column(nullable=True)
    used: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class Cluster(Base):
    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    nodes: Mapped[list[Node]] = relationship(back_populates="cluster", order_by="Node.name")


class Node(Base):
    __tablename__ = "nodes"
    __table_args__ = (UniqueConstraint("cluster_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"))
    name: Mapped[str] = mapped_column(String(128))
    uri: Mapped[str] = mapped_column(String(512), default="")
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # libvirt version, config store...
    inventory_at: Mapped[datetime | None] = mapped_column(nullable=True)
    cluster: Mapped[Cluster] = relationship(back_populates="nodes")
    agent: Mapped[Agent | None] = relationship(back_populates="node", uselist=False)


class Agent(Base):
    """An enrolled agent: one per node; authenticates with its own credential."""

    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"), unique=True)
    enrolled: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime | None] = mapped_column(nullable=True)
    version: Mapped[str] = mapped_column(String(32), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    node: Mapped[Node] = relationship(back_populates="agent")


class Vm(Base):
    __tablename__ = "vms"
    uuid: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    cluster_id: Mapped[int] = mapped_column(ForeignKey("clusters.id"))
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(32), default="unknown")
    persistent: Mapped[bool] = mapped_column(Boolean, default=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)  # guest agent, checkpoints...
    seen: Mapped[datetime] = mapped_column(default=utcnow)
    node: Mapped[Node | None] = relationship()
    disks: Mapped[list[Disk]] = relationship(cascade="all, delete-orphan", order_by="Disk.target")


class Disk(Base):
    __tablename__ = "disks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vm_uuid: Mapped[str] = mapped_column(ForeignKey("vms.uuid", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text, default="")
    format: Mapped[str] = mapped_column(String(16), default="")
    size: Mapped[int] = mapped_column(BigInteger, default=0)
    storage: Mapped[str] = mapped_column(String(16), default="local")  # local | shared
    storage_path: Mapped[str] = mapped_column(Text, default="")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    spec: Mapped[dict[str, Any]] = mapped_column()  # kura.server.schemas.JobSpec
    created: Mapped[datetime] = mapped_column(default=utcnow)
    next_run: Mapped[datetime | None] = mapped_column(nullable=True)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"),
                                               nullable=True)
    job_name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16), default="backup")  # backup | test
    trigger: Mapped[str] = mapped_column(String(16), default="manual")
    status: Mapped[str] = mapped_column(String(16), default="running")
    reason: Mapped[str] = mapped_column(Text, default="")
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the job spec as of the run
    started: Mapped[datetime] = mapped_column(default=utcnow)
    ended: Mapped[datetime | None] = mapped_column(nullable=True)
    vms: Mapped[list[RunVm]] = relationship(back_populates="run", order_by="RunVm.id")


class RunVm(Base):
    __tablename__ = "run_vms"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    vm_uuid: Mapped[str] = mapped_column(String(36))
    vm_name: Mapped[str] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    node: Mapped[str] = mapped_column(String(128), default="")
    nodes_tried: Mapped[list[Any]] = mapped_column(default=list)
    not_before: Mapped[datetime | None] = mapped_column(nullable=True)
    waiting_since: Mapped[datetime | None] = mapped_column(nullable=True)
    started: Mapped[datetime | None] = mapped_column(nullable=True)
    ended: Mapped[datetime | None] = mapped_column(nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)  # phases, bytes, consistency...
    diagnosis: Mapped[str] = mapped_column(Text, default="")
    run: Mapped[Run] = relationship(back_populates="vms")


class Task(Base):
    """One piece of work for one agent (a VM backup attempt, a pre-flight, a restore)."""

    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id"))
    run_vm_id: Mapped[int | None] = mapped_column(ForeignKey("run_vms.id", ondelete="CASCADE"),
                                                  nullable=True)
    kind: Mapped[str] = mapped_column(String(16))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued|sent|done|cancelled
    cancel_reason: Mapped[str] = mapped_column(Text, default="")
    created: Mapped[datetime] = mapped_column(default=utcnow)
    sent: Mapped[datetime | None] = mapped_column(nullable=True)
    touched: Mapped[datetime | None] = mapped_column(nullable=True)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)


class LogLine(Base):
    __tablename__ = "log_lines"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    run_vm_id: Mapped[int | None] = mapped_column(nullable=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text)


class BackupSession(Base):
    """A remote data-path session (see kura.server.sessions): kept so that a server
    restart can clean up the lock and writer registration an aborted session left."""

    __tablename__ = "backup_sessions"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(32))
    task_id: Mapped[int] = mapped_column(Integer)
    vm_uuid: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(16))
    created: Mapped[datetime] = mapped_column(default=utcnow)
    objects: Mapped[list[Any]] = mapped_column(default=list)  # locks/writers it created
