"""The host under the lab: commands, system packages, and processes.

Everything the lab does to the machine itself goes through this module:

* :func:`run` runs a command and turns a failure into a :class:`LabError` that
  shows the command and the tail of its error output.
* :func:`require_host` checks that we are root and that the binaries the lab
  needs exist; missing Debian packages are installed with apt-get (as
  ``scripts/bootstrap`` would), and a clear error says what is needed when that
  is impossible (not root, no apt).
* Processes are found by a *token*: each lab node runs in its own mount
  namespace in which a per-node directory is bind-mounted over
  ``/etc/libvirt``, and that directory holds a file with a random token. Reading
  ``/proc/PID/root/etc/libvirt/.kura-node-token`` follows that process's own
  mount namespace, so a process belongs to the node exactly when the file it
  sees there holds the node's token. That identifies libvirtd, tini and every
  QEMU of the node — even after libvirtd crashed, and without ever matching a
  process by name or touching another lab's (or the host's) processes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from kura.errors import LabError

TOKEN_FILE = ".kura-node-token"

#: Debian packages the lab needs, with one binary each that proves it is installed.
PACKAGES: dict[str, str] = {
    "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
    "qemu-utils": "/usr/bin/qemu-img",
    "libvirt-daemon-system": "/usr/sbin/libvirtd",
    "libvirt-clients": "/usr/bin/virsh",
    "python3-libvirt": "/usr/lib/python3/dist-packages/libvirt.py",
    "qemu-guest-agent": "/usr/sbin/qemu-ga",
    "tini": "/usr/bin/tini",
    "busybox-static": "/bin/busybox",
    "e2fsprogs": "/sbin/e2fsck",
    "cpio": "/usr/bin/cpio",
    "ovmf": "/usr/share/OVMF/OVMF_CODE_4M.fd",
    "util-linux": "/usr/bin/unshare",
    # Emulated TPMs (create_vm(tpm=True)): libvirt runs swtpm_setup, then swtpm.
    "swtpm": "/usr/bin/swtpm",
    "swtpm-tools": "/usr/bin/swtpm_setup",
}


def run(argv: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = 300,
        input_: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a command, capturing its output; raise LabError when it fails."""
    args = [str(a) for a in argv]
    try:
        proc = subprocess.run(args, cwd=cwd, input=input_, capture_output=True,
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"command not found: {args[0]}",
                       hint="run `kura lab up` as root so it can install what it needs") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"command timed out after {timeout:.0f} s: {' '.join(args)}") from exc
    if check and proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise LabError(f"command failed (exit {proc.returncode}): {' '.join(args)}: "
                       + " / ".join(tail))
    return proc


def is_root() -> bool:
    return os.geteuid() == 0


def missing_packages() -> list[str]:
    return [pkg for pkg, path in PACKAGES.items() if not Path(path).exists()]


def require_host(*, install: bool = True) -> None:
    """Make sure the lab can run here, installing missing packages with apt-get."""
    if not is_root():
        raise LabError("the lab must run as root",
                       hint="it starts libvirt daemons in their own mount namespaces; "
                            "run `sudo kura lab up`")
    missing = missing_packages()
    if not missing:
        return
    if not install or shutil.which("apt-get") is None:
        raise LabError(f"the lab needs these Debian packages: {' '.join(missing)}",
                       hint="install them with apt-get, or run scripts/bootstrap")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-qq"],
                 ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, capture_output=True, env=env, timeout=900, check=False)
        if proc.returncode != 0:
            raise LabError(f"`{' '.join(argv)}` failed: "
                           + proc.stderr.decode(errors="replace").strip()[-300:])
    still = missing_packages()
    if still:
        raise LabError(f"packages still missing after apt-get install: {' '.join(still)}")


def kvm_access() -> None:
    """Let QEMU (user libvirt-qemu) open /dev/kvm, as a distribution's udev rule would."""
    kvm = Path("/dev/kvm")
    if kvm.exists() and (kvm.stat().st_mode & 0o666) != 0o666:
        kvm.chmod(0o666)


def process_token(pid: int) -> str | None:
    """The node token visible to process ``pid`` in its own mount namespace."""
    try:
        return Path(f"/proc/{pid}/root/etc/libvirt/{TOKEN_FILE}").read_text().strip()
    except (OSError, ValueError):
        return None


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def pids_with_token(token: str) -> list[int]:
    """All processes that see ``token`` (i.e. run inside that node's namespace)."""
    me = os.getpid()
    return [pid for pid in all_pids() if pid != me and process_token(pid) == token]


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot, field 22 of /proc/PID/stat), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def kill_pids(pids: Iterable[int], *, grace: float = 3.0) -> None:
    """SIGTERM the given processes, then SIGKILL whatever still lives after ``grace``."""
    pending = set(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 20.0)):
        for pid in list(pending):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pending.discard(pid)
        deadline = time.monotonic() + wait
        while pending and time.monotonic() < deadline:
            pending = {p for p in pending if _alive(p)}
            if pending:
                time.sleep(0.05)
        if not pending:
            return
    raise LabError(f"processes did not die after SIGKILL: {sorted(pending)}")


def kill_token(token: str, *, grace: float = 3.0) -> int:
    """Kill every process of one node (found by token); return how many there were."""
    pids = pids_with_token(token)
    if pids:
        kill_pids(pids, grace=grace)
    return len(pids)
