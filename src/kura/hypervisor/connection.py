"""Opening a libvirt connection and naming the node behind it.

A *node* is identified by what libvirt reports: its hostname (recorded in
every restore point, with the URI kura used) and its host UUID
(``<host><uuid>`` in the capabilities XML, set by ``host_uuid`` in
libvirtd.conf), which the inventory shows. The UUID is fetched only on
demand: libvirt builds the whole capabilities document for it, which takes
seconds on some hosts.

libvirt's default error handler prints every error to stderr, including the
ones kura expects and handles (a missing checkpoint, a domain that is not
running); :func:`open_connection` installs a silent handler once, and every
libvirt error is turned into a :class:`~kura.errors.HypervisorError` with a
message that says what to do.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import libvirt

from kura.errors import DomainNotFound, HypervisorError

DEFAULT_URI = "qemu:///system"
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?"
                      r"[0-9a-fA-F]{12}$")

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
    uri: str
    host_uuid: str | None = None  # only when asked for: libvirt can take seconds for it

    @property
    def name(self) -> str:
        return self.hostname

    def to_dict(self) -> dict[str, str | None]:
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
        """The node's hostname and URI (cheap)."""
        if self._node is None:
            try:
                hostname = str(self.conn.getHostname())
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot query node {self.uri}: {exc}") from exc
            self._node = NodeIdentity(hostname=hostname, uri=self.uri)
        return self._node

    def identity(self) -> NodeIdentity:
        """The node with its libvirt host UUID (``<host><uuid>`` of the capabilities).

        Building the capabilities XML probes the host and can take seconds, so
        only the inventory asks for it.
        """
        node = self.node
        if node.host_uuid is None:
            try:
                caps = ET.fromstring(self.conn.getCapabilities())
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot query node {self.uri}: {exc}") from exc
            node = NodeIdentity(node.hostname, node.uri, caps.findtext("host/uuid") or "")
            self._node = node
        return node

    def lookup(self, ref: str) -> Any:
        """The ``virDomain`` named ``ref`` (a name or a UUID)."""
        errors: list[str] = []
        finders = [self.conn.lookupByName]
        if _UUID_RE.match(ref):
            finders.append(self.conn.lookupByUUIDString)
        for finder in finders:
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
