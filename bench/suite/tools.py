"""The command lines of kura and its peers, each run as a measured child.

Settings, chosen to be what a KVM user would type and to compare like with
like:

- **kura**: ``kura backup VM --connect URI`` into a repository made by ``kura
  repo init`` (defaults: AES-256-GCM, zstd level 3, 1 MiB chunks), with the
  guest filesystems frozen when the guest agent answers (``--consistency
  prefer``, the default); ``kura restore VM --disk vdb --output F --format
  qcow2``. ``--json`` output gives bytes read and stored.
- **virtnbdbackup** 1.9: ``-l copy -z`` (lz4) for scenario 1 as issue 4 asks;
  ``-l full`` / ``-l inc`` (uncompressed, so its output size is the data it
  read) for scenario 2; it freezes through the guest agent too. Its NBD socket
  and scratch files go to the bench's own directory. ``virtnbdrestore -d vdb``
  restores the disk as qcow2, like kura's restore above.
- **borg** 1.2: ``repokey`` (AES-CTR + HMAC-SHA256) and ``--compression
  zstd,3``; ``borg extract --sparse``.
- **restic** 0.14: repository version 2 (compressed, ``auto``), AES-256 +
  Poly1305; ``restic restore`` (0.14 has no sparse restore).

borg and restic read the same disk data as a raw image file (the base image
*is* that export: ``qemu-img convert`` of the VM's ``vdb`` gives it back
byte for byte). Passphrases are passed by environment, never on a command
line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from suite.measure import Run, du, quiet, run

PASSPHRASE = "kura-bench-passphrase"
KURA = str(Path(sys.executable).with_name("kura"))


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


class Kura:
    """One kura repository and the commands that use it."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env = _env(KURA_REPO=str(repo), KURA_PASSPHRASE=PASSPHRASE)

    def init(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        quiet([KURA, "repo", "init"], env=self.env)

    def stored(self) -> int:
        return du(self.repo)

    def backup_vms(self, vms: list[str], uri: str, *, full: bool = False) -> tuple[Run,
                                                                               list[Any]]:
        argv = [KURA, "--json", "backup", *vms, "--connect", uri]
        if full:
            argv.append("--full")
        r = run(argv, env=self.env)
        results = json.loads(r.stdout)
        return r, results if isinstance(results, list) else [results]

    def backup_image(self, image: Path, name: str) -> Run:
        return run([KURA, "--json", "backup", "--image", str(image), "--name", name],
                   env=self.env)

    def restore_disk(self, vm: str, disk: str, output: Path) -> Run:
        output.unlink(missing_ok=True)
        return run([KURA, "--json", "restore", vm, "--disk", disk, "--output", str(output),
                    "--format", "qcow2"], env=self.env)


class VirtNbdBackup:
    """virtnbdbackup / virtnbdrestore against one lab node."""

    def __init__(self, uri: str, scratch: Path) -> None:
        self.uri = uri
        self.scratch = scratch

    def backup(self, vm: str, out: Path, level: str, *, compress: bool = False) -> Run:
        if level in ("copy", "full"):
            shutil.rmtree(out, ignore_errors=True)
        argv = ["virtnbdbackup", "-U", self.uri, "-d", vm, "-l", level, "-o", str(out),
                "-S", str(self.scratch), "-f", str(self.scratch / f"vnb-{vm}.sock"), "-n"]
        if compress:
            argv.append("-z")
        return run(argv)

    def restore(self, backup: Path, disk: str, out: Path) -> Run:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return run(["virtnbdrestore", "-U", self.uri, "-i", str(backup), "-o", str(out),
                    "-d", disk, "-n", "-f", str(self.scratch / "vnr.sock"),
                    "-L", str(self.scratch / "virtnbdrestore.log")], settle=out)

    @staticmethod
    def data_bytes(out: Path, pattern: str) -> int:
        """Bytes of the backup's data files matching ``pattern`` (e.g. ``*.inc.*``)."""
        return sum(p.stat().st_size for p in out.glob(pattern) if p.is_file())


class Borg:
    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env = _env(BORG_PASSPHRASE=PASSPHRASE, BORG_BASE_DIR=str(repo.parent / "borg-home"),
                        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")

    def init(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        quiet(["borg", "init", "--encryption", "repokey", str(self.repo)], env=self.env)

    def create(self, archive: str, *paths: Path) -> Run:
        """One archive of ``paths`` (files of one directory), named relative to it."""
        return run(["borg", "create", "--compression", "zstd,3", f"{self.repo}::{archive}",
                    *(p.name for p in paths)], env=self.env, cwd=paths[0].parent)

    def extract(self, archive: str, dest: Path) -> Run:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        return run(["borg", "extract", "--sparse", f"{self.repo}::{archive}"], env=self.env,
                   cwd=dest)

    def stored(self) -> int:
        return du(self.repo)


class Restic:
    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.env = _env(RESTIC_PASSWORD=PASSPHRASE, RESTIC_REPOSITORY=str(repo),
                        RESTIC_CACHE_DIR=str(repo.parent / "restic-cache"))

    def init(self) -> None:
        shutil.rmtree(self.repo, ignore_errors=True)
        quiet(["restic", "init", "--repository-version", "2"], env=self.env)

    def backup(self, *paths: Path) -> Run:
        """One snapshot of ``paths`` (files of one directory), named relative to it."""
        return run(["restic", "backup", "--quiet", *(p.name for p in paths)], env=self.env,
                   cwd=paths[0].parent)

    def restore(self, dest: Path) -> Run:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        return run(["restic", "restore", "latest", "--target", str(dest)], env=self.env)

    def stored(self) -> int:
        return du(self.repo)
