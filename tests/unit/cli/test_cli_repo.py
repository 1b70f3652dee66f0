"""``kura repo``, ``backup --image``, ``snapshots``, ``restore``, ``prune`` end to end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kura.cli.main import main

needs_qemu = pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils")
MIB = 1 << 20


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    repo = tmp_path / "repo"
    monkeypatch.setenv("KURA_REPO", str(repo))
    monkeypatch.setenv("KURA_PASSPHRASE", "test-passphrase")
    return repo


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def kura(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kura.cli.main", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=120)


def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(MIB) + bytes(6 * MIB) + b"text " * (MIB // 5) + os.urandom(1000)
    path = tmp_path / "disk.raw"
    path.write_bytes(data)
    return path, data


def test_init_info(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "repo", "init", "--chunk-size", str(MIB))
    assert code == 0 and "created repository" in out
    code, _, err = run(capsys, "repo", "init")
    assert code == 3 and "already exists" in err
    code, out, _ = run(capsys, "--json", "repo", "info")
    info = json.loads(out)
    assert code == 0 and info["encryption"] == "aes-256-gcm" and info["chunk_size"] == MIB
    code, out, _ = run(capsys, "repo", "info")
    assert code == 0 and "restore points" in out


def test_init_unencrypted(env: Path, capsys: pytest.CaptureFixture[str],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KURA_PASSPHRASE")
    assert run(capsys, "repo", "init", "--encryption", "none")[0] == 0
    assert json.loads(run(capsys, "--json", "repo", "info")[1])["encryption"] == "none"


@needs_qemu
def test_image_backup_restore_cycle(env: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "repo", "init", "--chunk-size", str(MIB))[0] == 0
    path, data = image(tmp_path)
    code, out, err = run(capsys, "backup", "--image", str(path), "--name", "tpl")
    assert code == 0, err
    assert "restore point" in out and "full" in out
    code, out, _ = run(capsys, "--json", "backup", "--image", str(path), "--name", "tpl")
    second = json.loads(out)
    assert second["kind"] == "incremental" and second["sequence"] == 1
    assert second["disks"][0]["stats"]["chunks_written"] == 0
    code, out, _ = run(capsys, "snapshots", "tpl", "--json")
    snaps = json.loads(out)
    assert [s["id"] for s in snaps][1] == second["id"] and snaps[0]["parent"] is None
    assert snaps[1]["parent"] == snaps[0]["id"] and snaps[1]["consistency"] == "offline"
    code, out, _ = run(capsys, "snapshots")
    assert code == 0 and "tpl" in out
    # restore (latest, then by NAME@ID), refuse to overwrite without --force
    out_file = tmp_path / "restored.raw"
    assert run(capsys, "restore", "tpl", "--output", str(out_file))[0] == 0
    assert out_file.read_bytes() == data
    code, _, err = run(capsys, "restore", f"tpl@{snaps[0]['id']}", "-o", str(out_file))
    assert code == 2 and "already exists" in err
    assert run(capsys, "restore", f"tpl@{snaps[0]['id']}", "-o", str(out_file), "--force")[0] == 0
    assert out_file.read_bytes() == data
    code, _, err = run(capsys, "restore", "tpl")
    assert code == 2 and "--output" in err
    code, _, err = run(capsys, "restore", "nosuch", "-o", str(tmp_path / "x"))
    assert code == 3 and "nosuch" in err
    # verify, protect, prune, gc
    code, out, _ = run(capsys, "repo", "verify")
    assert code == 0 and "no damage" in out
    assert run(capsys, "repo", "protect", snaps[0]["id"])[0] == 0
    code, out, _ = run(capsys, "--json", "prune", "--keep-last", "1", "--dry-run")
    assert json.loads(out)["removed"] == 0
    assert run(capsys, "repo", "unprotect", snaps[0]["id"])[0] == 0
    code, out, _ = run(capsys, "prune", "tpl", "--keep-last", "1")
    assert code == 0 and "removed 1" in out
    code, out, _ = run(capsys, "--json", "repo", "gc")
    assert code == 0 and json.loads(out)["snapshots"] == 1
    code, _, err = run(capsys, "prune")
    assert code == 2 and "--keep" in err


@needs_qemu
def test_verify_reports_damage(env: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "repo", "init", "--chunk-size", str(MIB))
    path, _ = image(tmp_path)
    run(capsys, "backup", "--image", str(path), "--name", "tpl")
    chunk = next(p for p in (env / "chunks").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-3])
    code, out, err = run(capsys, "--json", "repo", "verify")
    report = json.loads(out)
    assert code == 3 and not report["ok"] and report["damaged"][0]["disk"] == "image"
    assert "damaged" in err
    code, out, _ = run(capsys, "--json", "snapshots")
    assert json.loads(out)[0]["verify_state"] == "failed"


def test_key_export_import(env: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "repo", "init")
    key = tmp_path / "key.json"
    assert run(capsys, "repo", "key", "export", str(key))[0] == 0
    assert json.loads(key.read_text())["format"] == "kura-keyfile"
    assert run(capsys, "repo", "key", "import", str(key))[0] == 0
    code, _, err = run(capsys, "repo", "key", "export", str(key))
    assert code == 2 and "already exists" in err


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    repo = tmp_path / "r"
    base = {"KURA_REPO": str(repo), "KURA_PASSPHRASE": "right"}
    missing = kura("repo", "info", env=base)
    assert missing.returncode == 3 and "no kura repository" in missing.stderr
    assert kura("repo", "init", env=base).returncode == 0
    wrong = kura("repo", "info", env={**base, "KURA_PASSPHRASE": "wrong"})
    assert wrong.returncode == 3 and "wrong passphrase" in wrong.stderr
    env_no_pw = {k: v for k, v in os.environ.items() if k != "KURA_PASSPHRASE"}
    no_pw = subprocess.run([sys.executable, "-m", "kura.cli.main", "--repo", str(repo), "repo",
                            "info"], capture_output=True, text=True, env=env_no_pw,
                           stdin=subprocess.DEVNULL)
    assert no_pw.returncode == 2 and "KURA_PASSPHRASE" in no_pw.stderr
    cfg = repo / "config"
    doc = json.loads(cfg.read_text())
    doc["version"] = 99
    cfg.write_text(json.dumps(doc))
    newer = kura("snapshots", env=base)
    assert newer.returncode == 3 and "version 99" in newer.stderr
    for proc in (missing, wrong, no_pw, newer):
        assert "Traceback" not in proc.stderr
        # one message (Rich may wrap it at 80 columns when stderr is not a terminal)
        assert proc.stderr.count("kura: error:") == 1, proc.stderr


def test_passphrase_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    env = {k: v for k, v in os.environ.items() if k != "KURA_PASSPHRASE"}
    args = [sys.executable, "-m", "kura.cli.main", "--repo", str(tmp_path / "r"),
            "--passphrase-file", str(pw)]
    assert subprocess.run([*args, "repo", "init"], env=env, capture_output=True).returncode == 0
    ok = subprocess.run([*args, "repo", "info"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
