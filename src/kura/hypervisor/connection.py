"""Opening a libvirt connection and naming the node behind it.

A *node* is identified by two things libvirt reports: its hostname and its
host UUID (``<host><uuid>`` in the capabilities XML, set by ``host_uuid`` in
libvirtd.conf). Restore points record both, so that ``kura snapshots`` can
say where each one was taken even when hostnames repeat (as in the lab, whose
nodes are network namespaces on one machine).

libvirt's default error handler prints every error to stderr, including the
ones kura expects and handles (a missing checkpoint, a domain that is not
running); :func:`open_connection` installs a silent handler once, and every
libvirt error is turned into a :class:`~kura.errors.HypervisorError` with a
message that says what to do.
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import libvirt

from kura.errors import DomainNotFound, HypervisorError

DEFAULT_URI = "qemu:///system"

_handler_installed = False


def _silence_libvirt() -> None:
    global _handler_installed
    if not _handler_installed:
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        _handler_installed = True


@dataclass(frozen=True)
class NodeIdentity:
    """Who the node is: hostname, libvirt host UUID and the URI used to reach it."""

    hostname: str
    host_uuid: str
    uri: str

    @property
    def name(self) -> str:
        return self.hostname

    def to_dict(self) -> dict[str, str]:
        return {"hostname": self.hostname, "host_uuid": self.host_uuid, "uri": self.uri}


class Hypervisor:
    """One open libvirt connection to one node.

    Use as a context manager, or call :meth:`close`. ``conn`` is the raw
    ``virConnect`` for the hypervisor modules; the engine goes through the
    methods here and in :mod:`kura.hypervisor.domain`.
    """

    def __init__(self, conn: Any, uri: str) -> None:
        self.conn = conn
        self.uri = uri
        self._node: NodeIdentity | None = None

    @property
    def node(self) -> NodeIdentity:
        if self._node is None:
            try:
                hostname = str(self.conn.getHostname())
                caps = ET.fromstring(self.conn.getCapabilities())
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot query node {self.uri}: {exc}") from exc
            host_uuid = caps.findtext("host/uuid") or ""
            self._node = NodeIdentity(hostname=hostname, host_uuid=host_uuid, uri=self.uri)
        return self._node

    def lookup(self, ref: str) -> Any:
        """The ``virDomain`` named ``ref`` (a name or a UUID)."""
        errors: list[str] = []
        for finder in (self.conn.lookupByName, self.conn.lookupByUUIDString):
            try:
                return finder(ref)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    errors.append(str(exc))
        if errors:
            raise HypervisorError(f"cannot look up VM {ref!r} on {self.uri}: {errors[0]}")
        raise DomainNotFound(
            f"no VM named {ref!r} on node {self.uri}",
            hint="`kura ls --connect URI` lists the VMs of a node",
        )

    def find(self, ref: str) -> Any | None:
        """Like :meth:`lookup`, but ``None`` when there is no such VM."""
        try:
            return self.lookup(ref)
        except DomainNotFound:
            return None

    def domains(self) -> list[Any]:
        """Every domain of the node (running and defined), sorted by name."""
        try:
            doms = list(self.conn.listAllDomains(0))
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot list VMs on {self.uri}: {exc}") from exc
        return sorted(doms, key=lambda d: str(d.name()))

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_connection(uri: str = DEFAULT_URI) -> Hypervisor:
    """Open a read-write connection to the libvirt daemon at ``uri``."""
    _silence_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"cannot connect to libvirt at {uri}: {exc}",
            hint="is libvirtd running there, and may this user connect?",
        ) from exc
    return Hypervisor(conn, uri)
