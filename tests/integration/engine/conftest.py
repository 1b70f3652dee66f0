"""Fixtures for the engine's tests on the real lab (two libvirt nodes, real guests).

The engine's tests run their own lab (root ``KURA_ENGINE_LAB``, default
``/var/tmp/kura-elab``) so they can migrate and kill VMs without disturbing
anyone else's; it is left up between runs unless ``KURA_LAB_DOWN=1``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kura.lab import Lab, LabVM
from kura.repository import Repository

pytestmark = pytest.mark.lab


@pytest.fixture(scope="session")
def elab() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("the lab needs root")
    lab = Lab.create(Path(os.environ.get("KURA_ENGINE_LAB", "/var/tmp/kura-elab")))
    lab.up(nodes=2, vms=0)
    yield lab
    if os.environ.get("KURA_LAB_DOWN") == "1":
        lab.down()


@pytest.fixture(autouse=True)
def _shared_storage(elab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KURA_SHARED_STORAGE", str(elab.shared_dir))


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.init(str(tmp_path / "repo"), passphrase=None, encryption="none")


_counter = itertools.count()


@pytest.fixture
def make_vm(elab: Lab) -> Iterator[Callable[..., LabVM]]:
    made: list[str] = []

    def make(**kwargs: Any) -> LabVM:
        name = f"e{next(_counter)}-{secrets.token_hex(2)}"
        vm = elab.create_vm(name, **kwargs)
        made.append(name)
        return vm

    yield make
    for name in made:
        with contextlib.suppress(Exception):
            elab.remove_vm(name)
