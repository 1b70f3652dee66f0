"""The API's request and response models (pydantic 2).

Every request body is a model with bounded fields, so malformed input is
refused with 422 before any handler runs; responses are models too, which is
what the OpenAPI document at ``/api/openapi.json`` describes. The same models
are used by :mod:`kura.server.client` and by the agent, so both ends of the
protocol share one definition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Glob = Annotated[str, Field(min_length=1, max_length=256)]
Uuid = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                                    r"[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
Count = Annotated[int, Field(ge=0, le=100_000)]
ShortText = Annotated[str, Field(max_length=4096)]
Role = Literal["admin", "operator", "read-only", "agent"]
Consistency = Literal["require", "prefer", "off"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- tokens ---------------------------------------------------------------

class TokenCreate(Strict):
    role: Role
    name: Annotated[str, Field(max_length=128)] = ""
    cluster: Name | None = None
    ttl_seconds: Annotated[int, Field(ge=60, le=10 * 365 * 86400)] | None = None


class TokenOut(BaseModel):
    id: str
    role: str
    name: str
    cluster: str | None
    created: datetime
    expires: datetime | None
    used: datetime | None
    revoked: bool


class TokenCreated(TokenOut):
    token: str  # shown once
    ca_fingerprint: str


class WhoAmI(BaseModel):
    kind: str
    id: str
    role: str
    name: str
    cluster: str | None


# ---- agents and inventory -------------------------------------------------

class EnrolRequest(Strict):
    node: Name
    uri: Annotated[str, Field(max_length=512)] = ""
    version: Annotated[str, Field(max_length=32)] = ""


class EnrolResponse(BaseModel):
    agent_id: str
    credential: str
    cluster: str
    node: str


class DiskReport(Strict):
    target: Annotated[str, Field(min_length=1, max_length=32)]
    path: Annotated[str, Field(max_length=4096)] = ""
    format: Annotated[str, Field(max_length=16)] = ""
    size: Annotated[int, Field(ge=0, le=1 << 60)] = 0
    storage: Literal["local", "shared"] = "local"
    storage_path: Annotated[str, Field(max_length=4096)] = ""


class VmReport(Strict):
    uuid: Uuid
    name: Annotated[str, Field(min_length=1, max_length=256)]
    state: Annotated[str, Field(max_length=32)] = "unknown"
    persistent: bool = True
    tags: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=64)] = []
    facts: dict[str, Any] = {}
    disks: Annotated[list[DiskReport], Field(max_length=64)] = []


class InventoryReport(Strict):
    uri: Annotated[str, Field(max_length=512)] = ""
    facts: dict[str, Any] = {}
    vms: Annotated[list[VmReport], Field(max_length=10_000)] = []


class PollRequest(Strict):
    instance: Annotated[str, Field(min_length=1, max_length=64)]
    wait: Annotated[float, Field(ge=0, le=60)] = 20.0
    running: Annotated[list[Annotated[int, Field(ge=1, le=2**62)]], Field(max_length=1000)] = []


class TaskOut(BaseModel):
    id: int
    kind: str
    payload: dict[str, Any]


class PollResponse(BaseModel):
    tasks: list[TaskOut]


class TaskEvent(Strict):
    kind: Literal["phase", "log", "progress"]
    phase: Annotated[str, Field(max_length=32)] = ""
    status: Literal["start", "end", "failed", ""] = ""
    seconds: Annotated[float, Field(ge=0, le=1e7)] | None = None
    level: Literal["debug", "info", "warning", "error"] = "info"
    message: ShortText = ""
    data: dict[str, Any] = {}


class TaskEvents(Strict):
    events: Annotated[list[TaskEvent], Field(max_length=1000)]


class TaskControl(BaseModel):
    cancel: bool
    reason: str = ""


class ErrorInfo(Strict):
    kind: Annotated[str, Field(max_length=64)]
    message: ShortText
    hint: ShortText = ""
    node: Annotated[str, Field(max_length=128)] = ""
    moved_to: Annotated[str, Field(max_length=128)] = ""


class TaskResult(Strict):
    ok: bool
    error: ErrorInfo | None = None
    snapshot: Annotated[str, Field(max_length=128)] = ""
    kind: Annotated[str, Field(max_length=16)] = ""  # full | incremental
    consistency: Annotated[str, Field(max_length=16)] = ""
    bytes_read: Annotated[int, Field(ge=0)] = 0
    bytes_stored: Annotated[int, Field(ge=0)] = 0
    warnings: Annotated[list[ShortText], Field(max_length=100)] = []
    diagnosis: ShortText = ""
    checks: Annotated[list[dict[str, Any]], Field(max_length=100)] = []  # pre-flight
    data: dict[str, Any] = {}


class DiskNode(BaseModel):
    target: str
    path: str
    format: str
    size: int
    storage: str
    storage_path: str


class VmNode(BaseModel):
    uuid: str
    name: str
    state: str
    reachable: bool
    persistent: bool
    tags: list[str]
    facts: dict[str, Any]
    disks: list[DiskNode]


class NodeNode(BaseModel):
    name: str
    uri: str
    status: Literal["online", "unreachable", "never-seen"]
    last_seen: datetime | None
    config_store: dict[str, Any]
    facts: dict[str, Any]
    vms: list[VmNode]


class ClusterNode(BaseModel):
    name: str
    nodes: list[NodeNode]


class Inventory(BaseModel):
    clusters: list[ClusterNode]


# ---- jobs -----------------------------------------------------------------

class Selection(Strict):
    names: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]],
                     Field(max_length=1000)] = []
    globs: Annotated[list[Glob], Field(max_length=100)] = []
    tags: Annotated[list[Annotated[str, Field(min_length=1, max_length=128)]],
                    Field(max_length=100)] = []
    clusters: Annotated[list[Name], Field(max_length=100)] = []
    all: bool = False


class Retention(Strict):
    keep_last: Count | None = None
    keep_hourly: Count | None = None
    keep_daily: Count | None = None
    keep_weekly: Count | None = None
    keep_monthly: Count | None = None
    keep_yearly: Count | None = None

    def empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


class JobSpec(Strict):
    name: Name
    selection: Selection = Selection()
    schedule: Annotated[str, Field(max_length=128)] | None = None
    retention: Retention = Retention()
    consistency: Consistency = "prefer"
    max_per_node: Annotated[int, Field(ge=1, le=64)] = 2
    max_total: Annotated[int, Field(ge=1, le=1024)] = 4
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retry_delay: Annotated[float, Field(ge=0, le=3600)] = 5.0
    node_wait: Annotated[float, Field(ge=0, le=86400)] = 600.0
    full: bool = False

    @field_validator("schedule")
    @classmethod
    def _cron(cls, v: str | None) -> str | None:
        if v is None or v.strip() == "":
            return None
        if not croniter.is_valid(v):
            raise ValueError("not a valid cron expression (5 fields, or 6 with seconds last)")
        return v.strip()


class JobOut(BaseModel):
    name: str
    spec: JobSpec
    created: datetime
    next_run: datetime | None
    last_run: RunSummary | None = None


class RunSummary(BaseModel):
    id: int
    job: str
    kind: str
    trigger: str
    status: str
    reason: str
    started: datetime
    ended: datetime | None
    vms_total: int
    vms_ok: int
    vms_failed: int


class RunVmOut(BaseModel):
    vm_uuid: str
    vm_name: str
    state: str
    attempt: int
    node: str
    nodes_tried: list[str]
    started: datetime | None
    ended: datetime | None
    diagnosis: str
    result: dict[str, Any]


class RunOut(RunSummary):
    vms: list[RunVmOut]


class LogLineOut(BaseModel):
    ts: datetime
    level: str
    vm: str | None
    message: str


class RunLog(BaseModel):
    run: RunOut
    lines: list[LogLineOut]


# ---- repository -----------------------------------------------------------

class SnapshotOut(BaseModel):
    id: str
    source: str
    source_key: str
    created: datetime
    node: str
    kind: str
    consistency: str
    sequence: int
    parent: str | None
    size: int
    protected: bool


class PruneRequest(Strict):
    retention: Retention
    source: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    dry_run: bool = False


class RestoreRequest(Strict):
    ref: Annotated[str, Field(min_length=1, max_length=256)]
    node: Name | None = None
    new_name: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    target_dir: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    disk: Annotated[str, Field(min_length=1, max_length=32)] | None = None
    # One disk to a file on the node (absolute path there) instead of a whole VM.
    output: Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/")] | None = None
    format: Literal["raw", "qcow2"] | None = None
    start: bool = False
    force: bool = False


class Message(BaseModel):
    message: str
    data: dict[str, Any] = {}


JobOut.model_rebuild()


# ---- remote data path -----------------------------------------------------

ObjectName = Annotated[str, Field(min_length=1, max_length=512)]
ChunkIdHex = Annotated[str, Field(min_length=64, max_length=64, pattern=r"^[0-9a-f]{64}$")]
# At most this many chunk ids in one ``POST .../chunks/touch``.
TOUCH_MAX = 4096


class SessionBegin(Strict):
    task_id: Annotated[int, Field(ge=1, le=2**62)]


class SessionOpened(BaseModel):
    session_id: str
    master_key: str  # base64; see the threat model in docs/design.md
    config: str      # base64 of the repository's config object
    location: str
    # The data port (kura.server.dataport) for this session's chunks, on the server's
    # host, and the session's credential there; None: use the HTTPS routes.
    data_port: int | None = None
    data_secret: str | None = None


class ObjectRef(Strict):
    name: ObjectName


class RenameRequest(Strict):
    src: ObjectName
    dst: ObjectName


class SyncRequest(Strict):
    names: Annotated[list[ObjectName], Field(max_length=100_000)]


class ChunkIds(Strict):
    ids: Annotated[list[ChunkIdHex], Field(max_length=TOUCH_MAX)]


class Found(BaseModel):
    found: bool


class StatOut(BaseModel):
    mtime: float
    size: int


class Names(BaseModel):
    names: list[str]


class SessionEnded(BaseModel):
    committed: bool
