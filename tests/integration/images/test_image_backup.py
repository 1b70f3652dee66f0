"""Image backups through the real CLI, qemu-nbd and file systems: qcow2 images,
a backup killed with SIGKILL, and a repository whose disk fills up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils")
MIB = 1 << 20


def kura(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kura.cli.main", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    e = {**os.environ, "KURA_REPO": str(tmp_path / "repo"), "KURA_PASSPHRASE": "pw"}
    assert kura("repo", "init", "--chunk-size", str(MIB), env=e).returncode == 0
    return e


def test_qcow2_roundtrip(tmp_path: Path, env: dict[str, str]) -> None:
    img = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "100M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x55 1M 3M", "-c", "write -P 0x11 50M 512k",
                    "-c", "write -z 60M 1M", str(img)], check=True, capture_output=True)
    first = kura("--json", "backup", "--image", str(img), "--name", "tpl", env=env)
    assert first.returncode == 0, first.stderr
    m = json.loads(first.stdout)
    assert m["disks"][0]["attrs"]["format"] == "qcow2" and m["size"] == 100 * MIB
    assert m["disks"][0]["stats"]["bytes_in"] == 4 * MIB  # only allocated chunks were read
    subprocess.run(["qemu-io", "-c", "write -P 0x77 10M 1M", str(img)], check=True,
                   capture_output=True)
    second = json.loads(kura("--json", "backup", "--image", str(img), "--name", "tpl",
                             env=env).stdout)
    assert second["parent"] == m["id"] and second["disks"][0]["stats"]["chunks_written"] == 1
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        proc = kura("restore", "tpl", "--output", str(out), "--format", fmt, env=env)
        assert proc.returncode == 0, proc.stderr
        cmp = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "qcow2", str(out),
                              str(img)], capture_output=True, text=True)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    old = tmp_path / "old.raw"
    assert kura("restore", f"tpl@{m['id']}", "-o", str(old), env=env).returncode == 0
    assert old.stat().st_blocks * 512 < 10 * MIB  # sparse


def test_sigkill_mid_backup_leaves_no_restore_point(tmp_path: Path,
                                                    env: dict[str, str]) -> None:
    repo = Path(env["KURA_REPO"])
    other = tmp_path / "other.raw"
    other.write_bytes(os.urandom(2 * MIB))
    assert kura("backup", "--image", str(other), "--name", "other", env=env).returncode == 0
    before = len(list((repo / "chunks").rglob("*")))
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(MIB))
    proc = subprocess.Popen([sys.executable, "-m", "kura.cli.main", "backup", "--image",
                             str(img), "--name", "victim"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if len(list((repo / "chunks").rglob("*"))) > before + 8:
                break
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    listing = json.loads(kura("--json", "snapshots", env=env).stdout)
    assert [s["source"]["name"] for s in listing] == ["other"]
    assert list((repo / "writers").glob("*.json"))  # the dead writer's registration...
    assert kura("repo", "verify", env=env).returncode == 0
    again = kura("--json", "backup", "--image", str(img), "--name", "victim", env=env)
    assert again.returncode == 0, again.stderr  # ...and lock do not block the next backup
    assert json.loads(again.stdout)["disks"][0]["stats"]["chunks_reused"] > 0
    out = tmp_path / "out.raw"
    assert kura("restore", "victim", "-o", str(out), env=env).returncode == 0
    assert out.read_bytes() == img.read_bytes()


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        yield mnt / "repo"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_existing_restore_points(tmp_path: Path, tiny_repo: Path) -> None:
    env = {**os.environ, "KURA_REPO": str(tiny_repo), "KURA_PASSPHRASE": "pw"}
    assert kura("repo", "init", "--chunk-size", str(MIB), env=env).returncode == 0
    small = tmp_path / "small.raw"
    small.write_bytes(os.urandom(4 * MIB))
    assert kura("backup", "--image", str(small), "--name", "small", env=env).returncode == 0
    big = tmp_path / "big.raw"
    with open(big, "wb") as f:
        for _ in range(40):
            f.write(os.urandom(MIB))
    proc = kura("backup", "--image", str(big), "--name", "big", env=env)
    assert proc.returncode == 3
    flat = proc.stderr.replace("\n", "")
    assert "no space left" in flat and str(tiny_repo) in flat
    assert proc.stderr.count("kura: error:") == 1 and "Traceback" not in proc.stderr
    listing = json.loads(kura("--json", "snapshots", env=env).stdout)
    assert [s["source"]["name"] for s in listing] == ["small"]
    assert kura("repo", "verify", env=env).returncode == 0
    out = tmp_path / "out.raw"
    assert kura("restore", "small", "-o", str(out), env=env).returncode == 0
    assert out.read_bytes() == small.read_bytes()
    gc = kura("--json", "repo", "gc", "--grace", "0", env=env)
    assert gc.returncode == 0, gc.stderr
    assert kura("backup", "--image", str(small), "--name", "small", env=env).returncode == 0
