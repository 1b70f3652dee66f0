"""Noticing a migration (or save, snapshot, dump) that waits for a VM's backup.

libvirt runs one *async job* per domain at a time. A pull-mode backup is one
for as long as kura reads the view, so a live migration requested meanwhile
waits for libvirt's job lock and fails after 30 s ("cannot acquire state
change lock"). To give way quickly, kura (the node agent, or ``kura backup``
on the node) must notice the waiter.

What libvirt 9.0 / QEMU 7.2 offer, measured on the two-node lab with a
migration requested during a pull-mode backup (``virsh migrate --p2p --live``):

* domain events: nothing until the migration holds the job (then LIFECYCLE
  suspended/migrated, MIGRATION_ITERATION, JOB_COMPLETED);
* ``virDomainGetJobInfo``/``GetJobStats``/``GetControlInfo``: only the backup;
* the ``qemu`` hook's ``migrate`` operation runs on the *destination*, during
  Prepare, which the source reaches only after it acquired the job;
* the admin API's thread-pool counters: one more busy worker, but not which
  call, VM or job (any slow call looks the same);
* libvirt's own debug log of its job code (``conf.virdomainjob``): the instant
  the request arrives it logs, e.g.::

    Starting job: API=remoteDispatchDomainMigratePerform3Params job=none
    agentJob=none asyncJob=migration out (vm=0x7f.. name=web1, current job=none
    agentJob=none async=backup)

  followed by "Waiting for async job". That names the VM, what is asked for and
  that a backup holds the job.

So :class:`JobWatch` uses the last one. While at least one live backup runs on
the node it adds, through the admin API (``virt-admin daemon-log-filters`` and
``daemon-log-outputs``, keeping whatever else is configured), a debug filter for
the job code and a file output of its own (debug messages reach only that
output: the others keep their own priority), tails that file, and calls the
backup's callback when another async job asks for that VM while a backup holds
it. When the last backup ends the daemon's settings are put back and the file
is removed; a leftover of a killed process is dropped the next time.

Limits: debug messages are not a stable API (the pattern is checked against
9.0; when it stops matching, backups just stop giving way early and a waiting
migration fails after 30 s as before); the admin socket is local, so the
agent must run on the node as root (``kura agent --libvirt-admin``); an administrator's
change of the daemon's log settings while a backup runs is undone when it
ends. The agent drops a killed predecessor's filter and output when it starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kura.errors import HypervisorError

log = logging.getLogger(__name__)

# The job code lives in conf.virdomainjob since libvirt 8.x, in
# qemu.qemu_domainjob before; both log the same line.
FILTERS = ("1:conf.virdomainjob", "1:qemu.qemu_domainjob")

_STARTING = re.compile(
    r"Starting job: API=(?P<api>\S+) job=.+? agentJob=\S+ asyncJob=(?P<want>.+?) "
    r"\(vm=0x[0-9a-f]+ name=(?P<name>.+?), current job=.+? agentJob=\S+ "
    r"async=(?P<held>[^)]+)\)")


@dataclass(frozen=True)
class JobRequest:
    """Someone asked libvirt for an async job on a VM whose backup holds one."""

    vm: str
    job: str  # libvirt's async job name: "migration out", "save", "snapshot", "dump"...
    api: str  # the API that asked, e.g. remoteDispatchDomainMigratePerform3Params

    @property
    def migration(self) -> bool:
        return self.job == "migration out"


def parse(line: str) -> JobRequest | None:
    """The request in one libvirt log line, if it is one that waits for a backup."""
    m = _STARTING.search(line)
    if m is None or m["held"] != "backup" or m["want"] in ("none", "backup"):
        return None
    return JobRequest(vm=m["name"], job=m["want"], api=m["api"])


def default_admin_uri(connect: str) -> str | None:
    """The admin URI of the daemon behind ``connect``, when it is local."""
    if connect != "qemu:///system":
        return None  # remote (the admin socket is local only), or a session daemon
    for sock, uri in (("virtqemud-admin-sock", "virtqemud:///system"),
                      ("libvirt-admin-sock", "libvirtd:///system")):
        if (Path("/run/libvirt") / sock).exists():
            return uri
    return None


class DaemonLog:
    """A libvirt daemon's log filters and outputs, through ``virt-admin``."""

    def __init__(self, admin_uri: str) -> None:
        self.admin_uri = admin_uri

    def _run(self, *args: str) -> str:
        try:
            out = subprocess.run(["virt-admin", "-c", self.admin_uri, *args],
                                 capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HypervisorError(f"cannot run virt-admin: {exc}") from exc
        if out.returncode != 0:
            raise HypervisorError(f"virt-admin {' '.join(args[:1])} failed on "
                                  f"{self.admin_uri}: {out.stderr.strip()[:300]}")
        return out.stdout

    def get(self) -> tuple[list[str], list[str]]:
        def field(text: str) -> list[str]:
            return text.split(":", 1)[1].split() if ":" in text else []
        return field(self._run("daemon-log-filters")), field(self._run("daemon-log-outputs"))

    def set(self, filters: list[str], outputs: list[str]) -> None:
        self._run("daemon-log-filters", " ".join(filters))
        self._run("daemon-log-outputs", " ".join(outputs))


class JobWatch:
    """Tells running backups when another async job waits for their VM (see module doc).

    Several kura processes on one node (the agent, a ``kura backup``) may watch
    at once: each adds its own output (``libvirt-jobs-<daemon>-<pid>.log``) and
    removes only that; the shared filters go with the last output. Outputs of
    processes that no longer run are dropped whenever settings are changed.
    """

    def __init__(self, admin_uri: str | None, log_dir: Path, *, poll: float = 0.2) -> None:
        self.admin_uri = admin_uri
        self.digest = hashlib.sha256((admin_uri or "").encode()).hexdigest()[:10]
        self.log_dir = log_dir
        self.path = log_dir / f"libvirt-jobs-{self.digest}-{os.getpid()}.log"
        self.poll = poll
        self._lock = threading.Lock()  # the watchers
        self._control = threading.Lock()  # the daemon's settings and the tail thread
        self._watchers: dict[int, tuple[str, Callable[[JobRequest], None]]] = {}
        self._next = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._broken = False

    @property
    def output(self) -> str:
        return f"1:file:{self.path}"

    @contextlib.contextmanager
    def watch(self, vm: str, on_request: Callable[[JobRequest], None]) -> Iterator[bool]:
        """Call ``on_request`` while inside when a job request waits for ``vm``'s backup.

        Yields whether the watch works (False: no admin access; nothing noticed).
        """
        with self._lock:
            key = self._next
            self._next += 1
            self._watchers[key] = (vm, on_request)
        with self._control:  # starting and stopping; the tail thread never takes it
            if self._thread is None and not self._broken and self.admin_uri:
                self._start()
            active = self._thread is not None
        try:
            yield active
        finally:
            with self._lock:
                del self._watchers[key]
            with self._control:
                with self._lock:
                    idle = not self._watchers
                if idle and self._thread is not None:
                    self._stop_watching()

    def _kura_output(self, item: str) -> int | None:
        """The pid whose job-watch output ``item`` is (for this daemon), else None."""
        prefix = f":file:{self.log_dir / f'libvirt-jobs-{self.digest}-'}"
        if prefix not in item or not item.endswith(".log"):
            return None
        pid = item.rsplit("-", 1)[1][:-len(".log")]
        return int(pid) if pid.isdigit() else None

    def _settings(self, daemon: DaemonLog, *, mine: bool) -> tuple[list[str], list[str]]:
        """The daemon's settings without dead processes' outputs, with or without ours."""
        filters, outputs = daemon.get()
        kept = []
        for o in outputs:
            pid = self._kura_output(o)
            if pid is not None and (pid == os.getpid() or not Path(f"/proc/{pid}").exists()):
                continue
            kept.append(o)
        if mine:
            kept.append(self.output)
        watching = mine or any(self._kura_output(o) is not None for o in kept)
        filters = [f for f in filters if f.replace("*", "") not in FILTERS]
        if watching:  # libvirt reports a filter back as a glob: 1:*conf.virdomainjob*
            filters += FILTERS
        return filters, kept

    def drop_leftovers(self) -> None:
        """Remove job-watch outputs (and then filters) of kura processes that died."""
        if not self.admin_uri:
            return
        daemon = DaemonLog(self.admin_uri)
        with self._control:
            if self._thread is not None:
                return
            try:
                before = daemon.get()
                after = self._settings(daemon, mine=False)
                if [sorted(x) for x in after] != [sorted(x) for x in before]:
                    daemon.set(*after)
                    log.info("removed libvirt log settings left by a killed kura process")
            except HypervisorError as exc:
                log.debug("cannot check libvirt's log settings: %s", exc)

    def _start(self) -> None:
        if not self.admin_uri:
            return
        daemon = DaemonLog(self.admin_uri)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            daemon.set(*self._settings(daemon, mine=True))
        except (HypervisorError, OSError) as exc:
            self._broken = True
            log.warning("backups on this node will not give way early to a waiting migration: "
                        "%s (run kura as root on the node; kura agent: --libvirt-admin)", exc)
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tail, args=(self._stop,),
                                        name="kura-jobwatch", daemon=True)
        self._thread.start()

    def _stop_watching(self) -> None:
        thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None:
            thread.join(5)
        if self.admin_uri:
            daemon = DaemonLog(self.admin_uri)
            try:
                daemon.set(*self._settings(daemon, mine=False))
            except HypervisorError as exc:
                log.warning("cannot restore libvirt's log settings: %s", exc)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _tail(self, stop: threading.Event) -> None:
        fd: int | None = None
        pending = b""
        try:
            while not stop.is_set():
                if fd is None:
                    with contextlib.suppress(FileNotFoundError):
                        fd = os.open(self.path, os.O_RDONLY)
                if fd is not None:
                    while chunk := os.read(fd, 1 << 16):
                        pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        self._dispatch(raw.decode(errors="replace"))
                stop.wait(self.poll)
        finally:
            if fd is not None:
                os.close(fd)

    def _dispatch(self, line: str) -> None:
        req = parse(line)
        if req is None:
            return
        with self._lock:
            targets = [cb for vm, cb in self._watchers.values() if vm == req.vm]
        for cb in targets:
            try:
                cb(req)
            except Exception:  # a watcher's bug never stops the others
                log.exception("job watch callback failed")
