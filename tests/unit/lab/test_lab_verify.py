"""The workload check on an extracted tree (no disk image needed)."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import time
from pathlib import Path

import pytest

from kura.lab.verify import check_tree, expected_content, file_relpath


def _tree(tmp_path: Path, last: int, written: int | None = None) -> Path:
    tree = tmp_path / "workload"
    for seq in range(1, (written or last) + 1):
        p = tree / file_relpath(seq)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(expected_content(seq))
    tree.mkdir(exist_ok=True)
    (tree / "manifest").write_text(f"last_seq={last}\n")
    return tree


def test_expected_content_matches_the_guest_script() -> None:
    # workload: yes "kura-workload seq=$seq" | head -n $(((seq % 8 + 1) * 64))
    assert expected_content(7) == b"kura-workload seq=7\n" * 512
    assert expected_content(8) == b"kura-workload seq=8\n" * 64
    assert file_relpath(1234) == "files/00001/f00001234"


def test_consistent_tree(tmp_path: Path) -> None:
    tree = _tree(tmp_path, 1005, written=1007)  # files past the manifest are fine
    assert check_tree(tree) == (1005, 1005, [])


def test_missing_and_wrong_files(tmp_path: Path) -> None:
    tree = _tree(tmp_path, 30)
    (tree / file_relpath(4)).unlink()
    (tree / file_relpath(9)).write_bytes(b"")
    last, checked, errors = check_tree(tree)
    assert (last, checked) == (30, 30)
    assert errors == [f"file 4 ({file_relpath(4)}) missing",
                      f"file 9 ({file_relpath(9)}) has wrong content: 0 bytes, expected "
                      f"{len(expected_content(9))}"]


def test_many_errors_are_summarised(tmp_path: Path) -> None:
    tree = _tree(tmp_path, 50, written=10)
    _, _, errors = check_tree(tree)
    assert len(errors) == 21 and errors[-1] == "... and 20 more damaged files"


def test_manifest_missing_or_damaged(tmp_path: Path) -> None:
    assert check_tree(tmp_path / "nothing")[2] == ["workload manifest missing"]
    tree = _tree(tmp_path, 3)
    (tree / "manifest").write_bytes(b"last_s\0\0")
    assert "damaged" in check_tree(tree)[2][0]


def test_the_guest_workload_script_writes_what_the_check_expects(tmp_path: Path) -> None:
    """Run the real guest script (busybox sh on the host) and check its output."""
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        pytest.skip("needs busybox-static")
    script = tmp_path / "workload.sh"
    script.write_bytes((importlib.resources.files("kura.lab") / "guest" / "workload")
                       .read_bytes())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = dict(os.environ, KURA_WORKLOAD_DIR=str(tmp_path / "workload"),
               KURA_WORKLOAD_RUN=str(run_dir))
    proc = subprocess.Popen([str(busybox), "sh", str(script), "loop"], env=env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            manifest = tmp_path / "workload" / "manifest"
            if manifest.exists() and int(manifest.read_text().split("=")[1]) >= 9:
                break
            time.sleep(0.1)
        (run_dir / "workload.stop").touch()
        proc.wait(timeout=10)
    finally:
        proc.kill()
    last, checked, errors = check_tree(tmp_path / "workload")
    assert errors == [] and last >= 9 and checked == last
