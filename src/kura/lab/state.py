"""The lab's state file and lab-index allocation.

A lab is identified by its root directory. ``<root>/lab.json`` records what
the lab owns: its *lab index*, its nodes (name, loopback address, the random
token that identifies the node's processes, its libvirt host UUID) and its
VMs (name, UUID, storage kind, disks). It is written atomically (tmp + rename)
under ``<root>/lab.lock``, so a crash never leaves half a state file, and
everything the lab started can be found again from it after a crash.

Lab indexes keep concurrent labs apart: index *k* gives node *i* the address
``127.0.k.(2+i)`` (index 0: 127.0.0.2, 127.0.0.3, ...), so every lab's
libvirtd and migration ports listen on their own addresses. Indexes are
claimed in a registry directory (``KURA_LAB_REGISTRY``, default
``/run/kura/lab-index``): file ``<k>`` holds the root of the lab that owns it,
created under an flock. A claim is stale (and may be taken over) when that
root no longer has a state file naming index *k*, e.g. after ``down`` or a
reboot.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kura.errors import LabError

STATE_VERSION = 1
MAX_INDEX = 255
MAX_NODES = 8
LIBVIRTD_PORT = 16509
DEFAULT_REGISTRY = Path("/run/kura/lab-index")


def node_name(i: int) -> str:
    """node-a, node-b, ... for i = 0, 1, ..."""
    if not 0 <= i < MAX_NODES:
        raise LabError(f"a lab has at most {MAX_NODES} nodes (asked for node #{i + 1})")
    return f"node-{chr(ord('a') + i)}"


def node_address(index: int, i: int) -> str:
    """The loopback address of node ``i`` of the lab with index ``index``."""
    if not 0 <= index <= MAX_INDEX:
        raise LabError(f"lab index must be 0..{MAX_INDEX}, not {index}")
    node_name(i)
    return f"127.0.{index}.{2 + i}"


@dataclass
class NodeRecord:
    name: str
    address: str
    token: str
    host_uuid: str


@dataclass
class DiskRecord:
    path: str
    fmt: str
    target: str
    size: str


@dataclass
class VMRecord:
    name: str
    uuid: str
    storage: str
    home: str
    disks: list[DiskRecord]
    agent: bool = True
    workload: bool = False
    uefi: bool = False
    memory_mib: int = 128
    nvram: str | None = None
    role: str = "test"
    directory: str | None = None
    tpm: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VMRecord:
        data = dict(data)
        data["disks"] = [DiskRecord(**d) for d in data.get("disks", [])]
        return cls(**data)


@dataclass
class LabState:
    index: int
    nodes: list[NodeRecord] = field(default_factory=list)
    vms: list[VMRecord] = field(default_factory=list)
    accel: str = ""
    version: int = STATE_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LabState:
        data = json.loads(text)
        if data.get("version") != STATE_VERSION:
            raise LabError(f"lab state version {data.get('version')} is not supported",
                           hint="run `kura lab down` with the kura that created it")
        return cls(index=int(data["index"]),
                   nodes=[NodeRecord(**n) for n in data.get("nodes", [])],
                   vms=[VMRecord.from_dict(v) for v in data.get("vms", [])],
                   accel=data.get("accel", ""), version=data["version"])

    def vm(self, name: str) -> VMRecord | None:
        return next((v for v in self.vms if v.name == name), None)


def state_path(root: Path) -> Path:
    return root / "lab.json"


def load_state(root: Path) -> LabState | None:
    path = state_path(root)
    try:
        return LabState.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise LabError(f"lab state file {path} is damaged: {exc}",
                       hint="remove the lab with `kura lab down`") from exc


def save_state(root: Path, state: LabState) -> None:
    path = state_path(root)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(state.to_json())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``path`` (created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def registry_dir() -> Path:
    return Path(os.environ.get("KURA_LAB_REGISTRY") or DEFAULT_REGISTRY)


def _address_free(address: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As libvirtd itself does: connections in TIME_WAIT do not block a new lab.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address, LIBVIRTD_PORT))
        except OSError:
            return False
    return True


def _claim_live(claim: Path, owner: str, index: int) -> bool:
    try:
        state = load_state(Path(owner))
    except LabError:
        return True  # be conservative: a damaged lab may still run
    if state is None:
        # Claimed but not saved yet: a lab being created right now.
        try:
            return time.time() - claim.stat().st_mtime < 120
        except FileNotFoundError:
            return False
    return state.index == index


def allocate_index(root: Path, preferred: int | None = None, *, start: int = 0) -> int:
    """Claim a lab index for ``root`` (the preferred one, or the lowest free from ``start``)."""
    reg = registry_dir()
    candidates = [preferred] if preferred is not None else list(range(start, MAX_INDEX + 1))
    with locked(reg / ".lock"):
        for k in candidates:
            if not 0 <= k <= MAX_INDEX:
                raise LabError(f"lab index must be 0..{MAX_INDEX}, not {k}")
            claim = reg / str(k)
            if claim.exists():
                owner = claim.read_text().strip()
                if owner == str(root):
                    return k
                if _claim_live(claim, owner, k):
                    continue
            if not _address_free(node_address(k, 0)):
                continue
            claim.write_text(f"{root}\n")
            return k
    if preferred is not None:
        raise LabError(f"lab index {preferred} is in use by another lab",
                       hint="pick another --index or leave it out")
    raise LabError("no free lab index: every 127.0.k.2 address is claimed or has port "
                   f"{LIBVIRTD_PORT} in use", hint="bring down unused labs with `kura lab down`")


def ensure_claim(root: Path, index: int) -> None:
    """Re-assert ``root``'s claim on its index (the registry lives in /run: a reboot
    empties it). Raises LabError if another live lab has claimed the index meanwhile."""
    reg = registry_dir()
    claim = reg / str(index)
    with locked(reg / ".lock"):
        if claim.exists():
            owner = claim.read_text().strip()
            if owner == str(root):
                return
            if _claim_live(claim, owner, index):
                raise LabError(f"lab index {index} of {root} is now used by the lab at {owner}",
                               hint=f"run `kura lab down` for {root} and bring it up again")
        claim.write_text(f"{root}\n")


def release_index(root: Path, index: int) -> None:
    claim = registry_dir() / str(index)
    with locked(registry_dir() / ".lock"):
        try:
            if claim.read_text().strip() == str(root):
                claim.unlink()
        except FileNotFoundError:
            pass
