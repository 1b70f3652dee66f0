"""The cluster inventory: applying agents' reports and building the tree.

Each agent reports the full list of VMs its node knows (running or defined)
with their disks. The server keeps one row per VM, keyed by UUID, pointing at
the node that owns it *now*:

* a node that reports a VM as running takes it (a live migration ends with the
  VM running on the destination and gone or shut off on the source);
* a node that reports it in another state takes it only if no online node
  reports it running;
* a VM that its owner stops reporting is marked ``gone`` (undefined, or moved
  to a node that has not reported yet) and is not shown until a node claims it.

A VM therefore appears once, under the node that runs it. A VM whose node's
agent is silent stays in the tree, marked unreachable rather than lost.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from kura.catalog import Agent, Cluster, Disk, Node, Vm, utcnow
from kura.server import schemas

ACTIVE_STATES = ("running", "paused", "blocked", "pmsuspended")


def node_status(agent: Agent | None, dead_after: float, now: datetime | None = None) -> str:
    if agent is None or agent.last_seen is None:
        return "never-seen"
    now = now or utcnow()
    return "online" if now - agent.last_seen <= timedelta(seconds=dead_after) else "unreachable"


def apply_report(s: Session, node_id: int, report: schemas.InventoryReport,
                 dead_after: float) -> list[str]:
    """Record one node's inventory; returns notes about VMs it could not claim."""
    now = utcnow()
    node = s.get(Node, node_id)
    if node is None:
        return ["node is not in the catalog"]
    notes: list[str] = []
    node.uri = report.uri or node.uri
    node.facts = report.facts
    node.inventory_at = now
    reported = set()
    for vr in report.vms:
        uuid = vr.uuid.lower()
        reported.add(uuid)
        row = s.get(Vm, uuid)
        if row is None:
            row = Vm(uuid=uuid, name=vr.name, cluster_id=node.cluster_id)
            s.add(row)
        elif row.cluster_id != node.cluster_id:
            notes.append(f"VM {vr.name} ({uuid}) belongs to another cluster; ignored")
            continue
        elif row.node_id not in (None, node.id) and not _may_take(row, vr, dead_after, now):
            continue
        row.name = vr.name
        row.node_id = node.id
        row.state = vr.state
        row.persistent = vr.persistent
        row.tags = list(vr.tags)
        row.facts = vr.facts
        row.seen = now
        row.disks = [Disk(target=d.target, path=d.path, format=d.format, size=d.size,
                          storage=d.storage, storage_path=d.storage_path) for d in vr.disks]
    for row in s.scalars(select(Vm).where(Vm.node_id == node.id)):
        if row.uuid not in reported:
            row.node_id = None
            row.state = "gone"
    return notes


def _may_take(row: Vm, vr: schemas.VmReport, dead_after: float, now: datetime) -> bool:
    if vr.state == "running":
        return True
    owner = row.node
    owner_online = owner is not None and node_status(owner.agent, dead_after, now) == "online"
    return not (owner_online and row.state in ACTIVE_STATES)


def build_tree(s: Session, dead_after: float) -> schemas.Inventory:
    now = utcnow()
    clusters = []
    for c in s.scalars(select(Cluster).order_by(Cluster.name)):
        nodes = []
        for n in c.nodes:
            status = node_status(n.agent, dead_after, now)
            vms = s.scalars(select(Vm).where(Vm.node_id == n.id).order_by(Vm.name))
            nodes.append(schemas.NodeNode(
                name=n.name, uri=n.uri, status=status,  # type: ignore[arg-type]
                last_seen=n.agent.last_seen if n.agent else None,
                config_store=dict(n.facts.get("config_store", {})),
                facts={k: v for k, v in n.facts.items() if k != "config_store"},
                vms=[vm_node(v, status == "online") for v in vms]))
        clusters.append(schemas.ClusterNode(name=c.name, nodes=nodes))
    return schemas.Inventory(clusters=clusters)


def vm_node(v: Vm, reachable: bool) -> schemas.VmNode:
    return schemas.VmNode(
        uuid=v.uuid, name=v.name, state=v.state, reachable=reachable, persistent=v.persistent,
        tags=[str(t) for t in v.tags], facts=v.facts,
        disks=[schemas.DiskNode(target=d.target, path=d.path, format=d.format, size=d.size,
                                storage=d.storage, storage_path=d.storage_path)
               for d in v.disks])


@dataclass(frozen=True)
class Selected:
    uuid: str
    name: str


def select_vms(s: Session, sel: schemas.Selection) -> tuple[list[Selected], list[str]]:
    """The VMs a job selects (by UUID, each once) and the names that matched nothing."""
    vms = list(s.scalars(select(Vm).where(Vm.node_id.is_not(None)).order_by(Vm.name)))
    chosen: dict[str, Selected] = {}
    missing: list[str] = []

    def take(v: Vm) -> None:
        chosen.setdefault(v.uuid, Selected(v.uuid, v.name))

    for name in sel.names:
        hits = [v for v in vms if v.name == name or v.uuid == name.lower()]
        if not hits:
            missing.append(name)
        for v in hits:
            take(v)
    for pattern in sel.globs:
        for v in vms:
            if fnmatch.fnmatchcase(v.name, pattern):
                take(v)
    if sel.tags:
        wanted = set(sel.tags)
        for v in vms:
            if wanted & {str(t) for t in v.tags}:
                take(v)
    if sel.clusters or sel.all:
        names = set(sel.clusters)
        for v in vms:
            cluster = s.get(Cluster, v.cluster_id)
            if sel.all or (cluster is not None and cluster.name in names):
                take(v)
    return sorted(chosen.values(), key=lambda x: x.name), missing


def ensure_node(s: Session, cluster_name: str, node_name: str) -> Node:
    cluster = s.scalars(select(Cluster).where(Cluster.name == cluster_name)).first()
    if cluster is None:
        cluster = Cluster(name=cluster_name)
        s.add(cluster)
        s.flush()
    node = s.scalars(select(Node).where(Node.cluster_id == cluster.id,
                                        Node.name == node_name)).first()
    if node is None:
        node = Node(cluster_id=cluster.id, name=node_name)
        s.add(node)
        s.flush()
    return node
