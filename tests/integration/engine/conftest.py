"""Fixtures for the engine's lab tests; the lab itself comes from kura.lab.testing
(``lab``: a private two-node cluster, ``lab_vm``: VMs removed after each test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kura.repository import Repository


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), passphrase=None, encryption="none")
