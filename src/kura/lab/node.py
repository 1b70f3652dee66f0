"""Lab nodes: one libvirtd per node, each in its own mount and UTS namespace.

A node is ``tini -s`` (a subreaper, so domain stops are not slowed by a slow
PID 1) running a tiny shell that, inside a private mount namespace made by
``unshare --mount --uts --propagation private``, bind-mounts the node's own
directories over libvirt's fixed paths and then execs ``libvirtd --listen``::

    <root>/nodes/<name>/etc     -> /etc/libvirt     libvirtd.conf, qemu.conf, domain XML,
                                                   and the node token file
    <root>/nodes/<name>/run     -> /run/libvirt     sockets, pid files (wiped at each start,
                                                   as a reboot would)
    <root>/nodes/<name>/lib     -> /var/lib/libvirt checkpoints, channel sockets, save files
    <root>/nodes/<name>/log     -> /var/log/libvirt libvirtd.log, qemu/<vm>.log
    <root>/nodes/<name>/cache   -> /var/cache/libvirt
    <root>/nodes/<name>/hosts   -> /etc/hosts       node names -> lab addresses
    <root>/nodes/<name>/log/swtpm -> /var/log/swtpm swtpm logs of TPM VMs (only when the
                                                   host has swtpm: the directory exists)
    <root>/nodes/<name>/local   (not mounted)       the node's local storage

The host's own ``/etc/libvirt``, ``/run/libvirt`` and any system libvirtd are
never touched: the bind mounts exist only inside the node's namespace and
vanish with its last process. libvirtd listens on plain TCP without auth on
the node's loopback address only (``qemu+tcp://ADDR/system``); QEMU's
migration traffic uses the same address. The node's processes (tini, libvirtd,
every QEMU) are found through the node token (see :mod:`kura.lab.host`) and
killed by PID.

Running a command *on* a node: a kura agent on a real node sees that node's
``/var/lib/libvirt`` (checkpoint metadata, swtpm state), its hostname and its
``qemu:///system`` unix socket. :meth:`LabNode.exec_argv` gives the same view to
any command started on this machine: it prefixes it with ``nsenter --target
PID --mount --uts --``, where PID is the node's *anchor*, the oldest process
carrying the node's token (``tini``, which lives exactly as long as the node).
The command then runs in the node's mount namespace (every bind mount above,
the rest of the file system shared with the host: ``/var/tmp``, the lab root,
the kura installation) and in its UTS namespace (``hostname`` = the node
name). It keeps the host's network (libvirtd listens on loopback anyway), PID
namespace, user and environment. ``nsenter`` starts the command in ``/``;
:meth:`LabNode.run` changes to ``cwd`` *inside* the node (``env --chdir``), so
a relative or bind-mounted directory resolves as the node sees it. The anchor
is looked up right before each command (a node that is down is a
:class:`LabError`, never a command silently run on the host); what is left is
the moment between that lookup and nsenter opening ``/proc/PID/ns/*``, and the
anchor only goes away when the node itself stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import libvirt

from kura.errors import LabError
from kura.lab import host

MOUNTS = (("etc", "/etc/libvirt"), ("run", "/run/libvirt"), ("lib", "/var/lib/libvirt"),
          ("log", "/var/log/libvirt"), ("cache", "/var/cache/libvirt"))
NSENTER = "/usr/bin/nsenter"
SWTPM_LOG = "/var/log/swtpm"


def _quiet_libvirt(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; we raise them instead."""


libvirt.registerErrorHandler(_quiet_libvirt, None)


@dataclass(frozen=True)
class LabNode:
    """One node of the lab: a libvirtd reachable at ``uri``."""

    name: str
    address: str
    directory: Path
    token: str
    host_uuid: str

    @property
    def uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def local_dir(self) -> Path:
        """The node's local storage (the "classic cluster disk" of one owner)."""
        return self.directory / "local"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / "libvirtd.log"

    def connect(self) -> libvirt.virConnect:
        try:
            return libvirt.open(self.uri)
        except libvirt.libvirtError as exc:
            raise LabError(f"cannot connect to lab node {self.name} at {self.uri}: "
                           f"{exc.get_error_message()}",
                           hint="run `kura lab up` to (re)start the lab") from exc

    def pids(self) -> list[int]:
        return host.pids_with_token(self.token)

    def host_path(self, path: str | Path) -> Path:
        """Where a path as seen on the node lives as seen from the host.

        ``/var/lib/libvirt/swtpm/U`` on node-a is ``<node dir>/lib/swtpm/U`` on
        the host; paths outside the node's bind mounts are the same on both.
        """
        p = PurePosixPath(path)
        if not p.is_absolute():
            raise LabError(f"{path} is not an absolute path")
        for sub, target in (*MOUNTS, ("hosts", "/etc/hosts"), ("log/swtpm", SWTPM_LOG)):
            if p == PurePosixPath(target) or PurePosixPath(target) in p.parents:
                return self.directory / sub / p.relative_to(target)
        return Path(p)

    def anchor_pid(self) -> int:
        """The PID whose mount and UTS namespaces are the node's.

        That is the oldest process that sees the node's token (the node's
        ``tini``): found by token, never by name, and checked again after its
        start time is read so that a PID reused meanwhile is not taken.
        """
        best: tuple[int, int] | None = None
        for pid in self.pids():
            started = host.start_time(pid)
            if started is None or host.process_token(pid) != self.token:
                continue
            if best is None or (started, pid) < best:
                best = (started, pid)
        if best is None:
            raise LabError(f"lab node {self.name} is not running (no process carries its "
                           "token)", hint="run `kura lab up` to (re)start the lab")
        return best[1]

    def exec_argv(self) -> list[str]:
        """The prefix that runs a command on this node: ``nsenter --target PID
        --mount --uts --`` (see the module docstring). The PID is looked up now:
        use the prefix right away, not after the node may have been restarted."""
        if not os.path.exists(NSENTER):
            raise LabError(f"{NSENTER} is missing", hint="apt-get install util-linux")
        return [NSENTER, "--target", str(self.anchor_pid()), "--mount", "--uts", "--"]

    def run(self, argv: Sequence[str | os.PathLike[str]], *, cwd: str | Path | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` on this node, as a kura agent on it would run it.

        ``cwd`` is a directory as the node sees it (default ``/``); every other
        keyword goes to :func:`subprocess.run` (``env``, ``check``,
        ``capture_output``, ``text``, ``timeout``, ``input``...). A missing
        command is a :class:`LabError`; its exit status is the caller's business
        unless ``check=True``.
        """
        if not argv:
            raise LabError("no command given to run on lab node " + self.name)
        prefix = self.exec_argv()
        if cwd is not None:
            prefix += ["/usr/bin/env", f"--chdir={cwd}"]
        args = [*prefix, *(os.fspath(a) for a in argv)]
        proc: subprocess.CompletedProcess[Any] = subprocess.run(args, **kwargs)
        # nsenter (or env) exits 127 when it cannot find the command.
        if proc.returncode == 127 and shutil.which(os.fspath(argv[0])) is None:
            raise LabError(f"cannot run {os.fspath(argv[0])!r} on lab node {self.name}: "
                           "command not found")
        return proc

    def is_up(self) -> bool:
        """True if the node's libvirtd answers."""
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError:
            return False
        try:
            conn.getHostname()
            return True
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()


def libvirtd_conf(node: LabNode) -> str:
    return "\n".join([
        "listen_tls = 0",
        "listen_tcp = 1",
        f'listen_addr = "{node.address}"',
        'auth_tcp = "none"',
        'auth_unix_rw = "none"',
        'auth_unix_ro = "none"',
        f'host_uuid = "{node.host_uuid}"',
        'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"',
        "keepalive_interval = 5",
        "",
    ])


def qemu_conf(node: LabNode) -> str:
    return "\n".join([
        # No virtlogd: QEMU writes its stdio to log files directly.
        'stdio_handler = "file"',
        f'migration_address = "{node.address}"',
        f'migration_host = "{node.address}"',
        # Both daemons number domains from 1: without cgroups they cannot collide.
        "cgroup_controllers = [ ]",
        'security_driver = "none"',
        # Do not restore owners from xattrs: disks on shared storage are used by
        # two daemons, and a restore on one would take the disk from the other.
        "remember_owner = 0",
        "",
    ])


def hosts_file(nodes: list[LabNode], self_name: str) -> str:
    lines = ["127.0.0.1 localhost"]
    lines += [f"{n.address} {n.name}" for n in nodes]
    return "\n".join(lines) + "\n"


def _node_script(node: LabNode) -> str:
    d = node.directory
    cmds = ["set -e"]
    for sub, target in MOUNTS:
        cmds.append(f"mkdir -p {target}")
        cmds.append(f"mount --bind '{d / sub}' {target}")
    cmds.append(f"mount --bind '{d / 'hosts'}' /etc/hosts")
    # libvirt logs swtpm to a fixed /var/log/swtpm/libvirt/qemu: keep that per node too.
    cmds.append(f"if [ -d {SWTPM_LOG} ]; then mount --bind '{d / 'log' / 'swtpm'}' "
                f"{SWTPM_LOG}; fi")
    cmds.append(f"hostname {node.name}")
    cmds.append("exec /usr/sbin/libvirtd --listen -f /etc/libvirt/libvirtd.conf "
                "--pid-file /run/libvirt/libvirtd.pid")
    return "\n".join(cmds) + "\n"


def prepare(node: LabNode, all_nodes: list[LabNode]) -> None:
    """Write the node's directories and configuration; wipe its volatile state."""
    d = node.directory
    shutil.rmtree(d / "run", ignore_errors=True)
    for sub, _ in MOUNTS:
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "etc" / "qemu").mkdir(exist_ok=True)
    (d / "log" / "swtpm").mkdir(exist_ok=True)
    (d / "log" / "swtpm").chmod(0o711)
    node.local_dir.mkdir(exist_ok=True)
    node.local_dir.chmod(0o777)
    (d / "etc" / host.TOKEN_FILE).write_text(node.token + "\n")
    (d / "etc" / "libvirtd.conf").write_text(libvirtd_conf(node))
    (d / "etc" / "qemu.conf").write_text(qemu_conf(node))
    (d / "hosts").write_text(hosts_file(all_nodes, node.name))
    (d / "start.sh").write_text(_node_script(node))


def start(node: LabNode, *, timeout: float = 60) -> None:
    """Start the node's libvirtd (the node must be down) and wait until it answers."""
    d = node.directory
    out = open(d / "node.out", "ab")  # noqa: SIM115 - handed to the child process
    try:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--uts", "--propagation", "private", "--",
             "tini", "-s", "--", "/bin/sh", str(d / "start.sh")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
            close_fds=True)
    finally:
        out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if node.is_up():
            return
        time.sleep(0.05)
    if proc.poll() is None:
        host.kill_token(node.token)
        proc.kill()
    proc.wait(timeout=5)
    raise LabError(f"lab node {node.name} did not start: {_tail(d / 'node.out')} "
                   f"{_tail(node.log_file)}",
                   hint=f"see {d / 'node.out'} and {node.log_file}")


def stop(node: LabNode) -> int:
    """Kill all of the node's processes by PID; return how many there were."""
    return host.kill_token(node.token)


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
