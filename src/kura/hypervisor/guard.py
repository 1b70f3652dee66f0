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
removes DIR. It answers ``ready`` once it has its libvirt connection, so a
freeze never starts without a working guard.
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


class Guard:
    """The parent's handle on a guard process (one per VM backup)."""

    def __init__(self, uri: str, uuid: str, *, start_timeout: float = 20.0,
                 wait: bool = True) -> None:
        """Start the guard; with ``wait=False`` call :meth:`wait_ready` before relying on it.

        A Python process that imports libvirt and connects takes a tenth of a second
        or more: the engine starts it early and lets it come up while it does other work.
        """
        self._start_timeout = start_timeout
        self._ready = False
        _exiting[:] = [p for p in _exiting if p.poll() is None]
        env = dict(os.environ)
        src = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        try:
            self._proc: subprocess.Popen[str] | None = subprocess.Popen(
                [sys.executable, "-m", "kura.hypervisor.guard", uri, uuid],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                text=True, start_new_session=True, close_fds=True, env=env,
            )
        except OSError as exc:
            raise HypervisorError(f"cannot start the backup guard process: {exc}") from exc
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
        for pipe in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if pipe:
                    pipe.close()
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


def _serve(stdin: IO[str], dom: Any) -> None:
    deadline: float | None = None
    checkpoint: str | None = None
    scratch: str | None = None
    committed = False
    buf = ""
    fd = stdin.fileno()
    while True:
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


def main(argv: list[str]) -> int:
    import signal

    import libvirt

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    uri, uuid = argv[0], argv[1]
    try:
        conn = libvirt.open(uri)
        dom = conn.lookupByUUIDString(uuid)
    except libvirt.libvirtError as exc:
        print(f"error {exc}", flush=True)
        return 1
    print("ready", flush=True)
    with contextlib.suppress(OSError):
        sys.stdout.close()
    _serve(sys.stdin, dom)
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
