"""One measurement = one fresh child process, timed, with its peak memory.

Every backup, restore or read in the suite runs as its own child process
(kura through ``.venv/bin/kura``, the peers through their Debian commands), so
the figures of one tool never include another's warm interpreter or caches:

- **time** is wall-clock from ``fork`` to the child's exit (``time.monotonic``);
- **peak memory** is the child's ``ru_maxrss`` as GNU ``time`` (``%M``) reports
  it from its own ``wait4``: the largest resident set of the child *or of any
  descendant it waited for* (``qemu-nbd`` started by ``kura restore --format
  qcow2``, the helpers virtnbdrestore runs): the maximum, not a sum. The
  small ``time`` process stands between the suite and the tool on purpose:
  Linux seeds a child's ``ru_maxrss`` with the high-water mark of the
  process that forked it (the memory it shares until ``exec``), so a child
  forked straight from this Python process (hundreds of MiB after building
  the data) would report the suite's size, not its own. Processes the tool
  merely talks to (QEMU serving the NBD export, libvirtd) are not counted,
  for kura and the peers alike;
- **settling**: a tool that leaves a daemon writing its output after it exits
  (virtnbdrestore's ``qemu-nbd --fork``) is not done until that output is
  closed: with ``settle=DIR`` the time runs on until no process has a file
  under ``DIR`` open (``fuser``);
- **page cache**: before each measured run the suite calls ``sync`` and drops
  the page cache (``/proc/sys/vm/drop_caches``, as root; ``--warm`` skips it),
  so every tool starts cold and reads from disk.

``Run`` holds one such figure; :func:`run` makes one and raises
:class:`BenchError` with the tool's stderr if the child fails.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20
GIB = 1 << 30


class BenchError(RuntimeError):
    """A benchmarked command failed (message carries its stderr tail)."""


@dataclass
class Settings:
    """Global switches of a suite run."""

    drop_caches: bool = True


SETTINGS = Settings()


@dataclass
class Run:
    """The outcome of one measured child process."""

    seconds: float
    rss: int  # peak resident set, bytes
    stdout: str


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache (root only; silently skipped otherwise)."""
    if not SETTINGS.drop_caches:
        return
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def busy(directory: Path) -> bool:
    """Does any process have a file under ``directory`` open?"""
    files = [str(p) for p in directory.rglob("*") if p.is_file()]
    if not files:
        return False
    proc = subprocess.run(["fuser", "-s", *files], capture_output=True, check=False)
    return proc.returncode == 0


def run(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
        cold: bool = True, settle: Path | None = None) -> Run:
    """Run ``argv`` as a fresh child; return its time, peak RSS and stdout."""
    if cold:
        drop_caches()
    tag = f"/tmp/kura-bench-{os.getpid()}"
    out_path, err_path, rss_path = (Path(f"{tag}.{s}") for s in ("out", "err", "rss"))
    wrapped = ["/usr/bin/time", "-f", "%M", "-o", str(rss_path), *argv]
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.run(wrapped, env=env, cwd=cwd, stdout=out, stderr=err,
                              stdin=subprocess.DEVNULL, check=False)
        if settle is not None and proc.returncode == 0:
            while busy(settle):
                time.sleep(0.02)
        seconds = time.monotonic() - t0
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    rss_text = rss_path.read_text() if rss_path.exists() else ""
    for p in (out_path, err_path, rss_path):
        p.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-12:])
        raise BenchError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{tail}")
    try:
        rss = int(rss_text.strip().splitlines()[-1]) * 1024
    except (ValueError, IndexError) as exc:
        raise BenchError(f"no peak memory figure from GNU time for {argv[0]}: "
                         f"{rss_text!r}") from exc
    return Run(seconds=seconds, rss=rss, stdout=stdout)


def quiet(argv: list[str], *, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> str:
    """Run an unmeasured set-up command; return stdout; raise BenchError on failure."""
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-12:])
        raise BenchError(f"`{' '.join(argv)}` exited {proc.returncode}:\n{tail}")
    return proc.stdout


def du(path: Path) -> int:
    """Bytes of all regular files under ``path`` (apparent sizes: what a store holds)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def allocated(path: Path) -> int:
    """Bytes a (sparse) file really occupies on disk."""
    return path.stat().st_blocks * 512
