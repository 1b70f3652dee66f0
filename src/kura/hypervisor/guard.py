"""A watchdog process that cleans up after a backup whose kura process died.

A backup changes a running VM in three ways that must never outlive the job:
the guest's filesystems are frozen (for well under a second), a libvirt
backup job holds an NBD export and a scratch file, and a new checkpoint (a
dirty bitmap) exists that is only valid once the restore point commits.
``try/finally`` handles exceptions and Ctrl-C, but not ``SIGKILL``, an OOM
kill, or a main thread stuck inside a libvirt call while the guest is frozen.

So each VM's backup starts a tiny *guard*: ``python -m kura.hypervisor.guard
URI UUID`` in its own session (a Ctrl-C on the terminal does not reach it),
with its own libvirt connection, reading commands on a pipe from its parent:

=================== ==========================================================
``vm UUID``         (a spare only, first) the VM to guard: a spare is started by
                    :func:`prestart` as ``... guard URI`` before the VM is known
``frozen SECONDS``  the guest is about to be frozen: thaw it if ``thawed`` has
                    not arrived within SECONDS (the main thread is stuck)
``thawed``          the guest is thawed
``job CP DIR``      a backup job runs with new checkpoint CP (``-`` if none)
                    and scratch directory DIR
``committing``      the manifest is being written: from now on CP is kept, as
                    the restore point may exist even if kura dies before it
                    hears so (a kept CP whose restore point did not commit is a
                    stray the next backup removes; a deleted one whose restore
                    point did commit would cost the next backup a full)
``committed``       the restore point is committed: CP is now the base of the
                    chain and must be kept
``done``            the job cleaned up after itself: exit, do nothing
=================== ==========================================================

When the pipe reaches end-of-file without ``done`` — the kernel closes it when
the parent dies, however it dies — the guard thaws the guest (if frozen),
aborts the domain's backup job (only if it exports on a socket inside DIR, so
it never touches someone else's job), deletes CP unless committing or committed, and
removes DIR. It answers ``ready`` once it has its libvirt connection and the VM, so a
freeze never starts without a working guard. A spare that reaches end-of-file
before ``vm`` was not needed and exits.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import time
from typing import IO, Any

from kura.errors import HypervisorError

# Guards told ``done`` that may still be exiting: reaped when the next guard starts.
_exiting: list[subprocess.Popen[str]] = []
# Spare guard processes (URI -> process), started by :func:`prestart`, not yet bound to a VM.
_spares: dict[str, subprocess.Popen[str]] = {}


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "kura.hypervisor.guard", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, start_new_session=True, close_fds=True, env=env,
        )
    except OSError as exc:
        raise HypervisorError(f"cannot start the backup guard process: {exc}") from exc


def prestart(uri: str) -> None:
    """Start a spare guard for the next VM backup on ``uri``, to be bound to it later.

    A command that will back up VMs calls this first, so that the guard's start-up
    (a Python process that imports libvirt and connects: a tenth of a second or
    more) overlaps with its own; an unused spare exits when this process does.
    """
    if uri in _spares and _spares[uri].poll() is None:
        return
    with contextlib.suppress(HypervisorError):  # the backup starts its own then
        _spares[uri] = _spawn([uri])


def discard_spares() -> None:
    """Let every unused spare exit (its pipe closes: it was not needed)."""
    while _spares:
        _, proc = _spares.popitem()
        _close_pipes(proc)
        if proc.poll() is None:
            _exiting.append(proc)


class Guard:
    """The parent's handle on a guard process (one per VM backup)."""

    def __init__(self, uri: str, uuid: str, *, start_timeout: float = 20.0,
                 wait: bool = True) -> None:
        """Start the guard; with ``wait=False`` call :meth:`wait_ready` before relying on it.

        A Python process that imports libvirt and connects takes a tenth of a second
        or more: the engine starts it early and lets it come up while it does other work,
        and a spare one from :func:`prestart` is used when there is one.
        """
        self._start_timeout = start_timeout
        self._ready = False
        _exiting[:] = [p for p in _exiting if p.poll() is None]
        spare = _spares.pop(uri, None)
        if spare is not None and spare.poll() is None:
            self._proc: subprocess.Popen[str] | None = spare
            self._send(f"vm {uuid}")
        else:
            if spare is not None:
                _close_pipes(spare)
            self._proc = _spawn([uri, uuid])
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the guard has its libvirt connection (raises if it has none)."""
        if self._ready:
            return
        out = self._proc.stdout if self._proc else None
        ready, _, _ = select.select([out], [], [], self._start_timeout) if out else ([], [], [])
        line = out.readline().strip() if ready and out else ""
        if line == "ready":
            self._ready = True
        else:
            self._kill()
            raise HypervisorError(
                f"the backup guard process did not start ({line or 'no answer'})",
                hint=f"check that `{sys.executable} -m kura.hypervisor.guard` works and "
                     "that libvirt accepts one more connection",
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _send(self, line: str) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()

    def frozen(self, seconds: float) -> None:
        self._send(f"frozen {seconds:.3f}")

    def thawed(self) -> None:
        self._send("thawed")

    def job(self, checkpoint: str | None, scratch_dir: str) -> None:
        self._send(f"job {checkpoint or '-'} {scratch_dir}")

    def committing(self) -> None:
        self._send("committing")

    def committed(self) -> None:
        self._send("committed")

    def done(self) -> None:
        """The job has cleaned up: let the guard exit without acting.

        Nothing is left for it to do, so its exit (closing its libvirt connection,
        interpreter shutdown: tens of milliseconds) is not waited for; the next
        guard reaps it.
        """
        self._send("done")
        proc, self._proc = self._proc, None
        if proc is None:
            return
        _close_pipes(proc)
        if proc.poll() is None:
            _exiting.append(proc)

    def close(self) -> None:
        """Close the pipe; without a prior :meth:`done`, the guard cleans up."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if proc.stdin:
                proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError, ValueError):
            if pipe:
                pipe.close()


# -- the guard process itself ------------------------------------------------------


def _thaw(dom: Any) -> None:
    import libvirt

    for _ in range(5):
        try:
            dom.fsThaw(None, 0)
            return
        except libvirt.libvirtError as exc:
            if "not frozen" in str(exc).lower() or exc.get_error_code() in (
                    libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_NO_DOMAIN):
                return
            time.sleep(1)


def _cleanup_job(dom: Any, checkpoint: str | None, scratch: str | None, committed: bool) -> None:
    import libvirt

    if scratch:
        with contextlib.suppress(libvirt.libvirtError):
            # abortJob ends whatever async job runs: a backup that just ended may
            # have let a waiting migration in, which must not be cancelled.
            if (scratch in str(dom.backupGetXMLDesc(0)) and dom.jobStats(0).get("operation")
                    == libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP):
                dom.abortJob()
    if checkpoint and not committed:
        with contextlib.suppress(libvirt.libvirtError):
            dom.checkpointLookupByName(checkpoint, 0).delete(0)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


def _first_line(fd: int) -> tuple[str | None, str]:
    """The first line on ``fd`` (None at end-of-file) and what was read after it."""
    buf = ""
    while "\n" not in buf:
        data = os.read(fd, 4096).decode(errors="replace")
        if not data:
            return None, ""
        buf += data
    line, rest = buf.split("\n", 1)
    return line, rest


def _serve(stdin: IO[str], dom: Any, buf: str = "") -> None:
    """Follow the parent's commands; ``buf`` holds any already read (a spare's)."""
    deadline: float | None = None
    checkpoint: str | None = None
    scratch: str | None = None
    committed = False
    fd = stdin.fileno()
    while True:
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "frozen":
                deadline = time.monotonic() + float(arg)
            elif cmd == "thawed":
                deadline = None
            elif cmd == "job":
                cp, _, directory = arg.partition(" ")
                checkpoint = None if cp == "-" else cp
                scratch = directory or None
            elif cmd in ("committing", "committed"):
                committed = True
            elif cmd == "done":
                return
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:  # frozen for too long: the parent is stuck
            _thaw(dom)
            deadline = None
            continue
        data = os.read(fd, 4096).decode(errors="replace")
        if not data:  # the parent is gone
            if deadline is not None:
                _thaw(dom)
            _cleanup_job(dom, checkpoint, scratch, committed)
            return
        buf += data


def main(argv: list[str]) -> int:
    import signal

    import libvirt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    uri = argv[0]
    rest = ""
    try:
        conn = libvirt.open(uri)
        if len(argv) > 1:
            uuid: str | None = argv[1]
        else:  # a spare: wait for ``vm UUID`` (end-of-file: it was not needed)
            line, rest = _first_line(sys.stdin.fileno())
            cmd, _, uuid = (line or "").strip().partition(" ")
            if cmd != "vm" or not uuid:
                return 0
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        print(f"error {exc}", flush=True)
        return 1
    print("ready", flush=True)
    with contextlib.suppress(OSError):
        sys.stdout.close()
    _serve(sys.stdin, dom, rest)
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
