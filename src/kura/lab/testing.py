"""pytest plugin: the lab as fixtures (registered by ``tests/conftest.py``).

Fixtures:

``lab`` (session)
    A running two-node lab with no VMs, in its own temporary root under
    ``/var/tmp`` with its own lab index, so concurrent pytest sessions (and a
    human's ``kura lab up``) never collide. ``KURA_SHARED_STORAGE`` is set to
    its shared directory for the session. At the end it is taken down: every
    process killed by PID, every file removed. Labs left behind by a pytest
    session that was killed are taken down when the next session starts
    (found through the ``owner.pid`` file next to their root).

``lab_vm`` (function)
    A factory: ``lab_vm(name=None, node="node-a", storage="shared",
    disks=(DiskSpec(),), agent=True, workload=False, uefi=False, tpm=False)``
    returns a started :class:`~kura.lab.LabVM` (its agent answering, if it has
    one; ``tpm`` adds an emulated TPM 2.0 whose swtpm state the node keeps);
    ``lab_vm.from_disks(name, disks=[...], node=...)`` defines one on existing
    images. Every VM made through it is destroyed and undefined (and its lab
    directory removed) when the test ends.

Tests that need the lab carry ``@pytest.mark.lab``; they (and the fixtures)
skip with the reason when this machine cannot run the lab (not root, libvirt
or QEMU missing). Set ``KURA_LAB_REQUIRED=1`` (CI does) to make that a
failure instead of a skip.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from kura.errors import KuraError
from kura.lab import host
from kura.lab.domain import DiskSpec
from kura.lab.lab import Lab
from kura.lab.vm import LabVM

TEST_LAB_PARENT = Path("/var/tmp")
TEST_LAB_PREFIX = "kura-lab-"


def lab_skip_reason() -> str | None:
    """Why the lab cannot run here, or None."""
    if not host.is_root():
        return "the lab needs root (it runs libvirt daemons in namespaces)"
    missing = host.missing_packages()
    if missing and shutil.which("apt-get") is None:
        return f"the lab needs these Debian packages: {' '.join(missing)}"
    return None


def _skip_or_fail(reason: str) -> None:
    if os.environ.get("KURA_LAB_REQUIRED") == "1":
        pytest.fail(f"lab required (KURA_LAB_REQUIRED=1) but unavailable: {reason}")
    pytest.skip(reason)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "lab: needs the real lab cluster (root, libvirt, QEMU)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = lab_skip_reason()
    if reason is None or os.environ.get("KURA_LAB_REQUIRED") == "1":
        return
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_abandoned_labs(parent: Path = TEST_LAB_PARENT) -> list[Path]:
    """Take down test labs whose pytest process is gone; return their roots."""
    reaped = []
    for owner in parent.glob(f"{TEST_LAB_PREFIX}*/owner.pid"):
        try:
            pid = int(owner.read_text().strip())
        except (OSError, ValueError):
            continue
        if pid == os.getpid() or _pid_alive(pid):
            continue
        base = owner.parent
        lab = Lab.existing(base / "lab")
        if lab is not None:
            with contextlib.suppress(KuraError):
                lab.down()
        shutil.rmtree(base, ignore_errors=True)
        reaped.append(base)
    return reaped


def make_test_lab(nodes: int = 2) -> tuple[Lab, Path]:
    """A fresh lab in its own temporary root (caller takes it down and removes base)."""
    base = Path(tempfile.mkdtemp(prefix=TEST_LAB_PREFIX, dir=TEST_LAB_PARENT))
    base.chmod(0o755)
    (base / "owner.pid").write_text(f"{os.getpid()}\n")
    lab = Lab.create(base / "lab")
    try:
        lab.up(nodes=nodes, vms=0)
    except BaseException:
        with contextlib.suppress(KuraError):
            lab.down()
        shutil.rmtree(base, ignore_errors=True)
        raise
    return lab, base


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """A running two-node lab with no VMs, private to this pytest session."""
    reason = lab_skip_reason()
    if reason:
        _skip_or_fail(reason)
    reap_abandoned_labs()
    the_lab, base = make_test_lab()
    old = os.environ.get("KURA_SHARED_STORAGE")
    os.environ["KURA_SHARED_STORAGE"] = str(the_lab.shared_dir)
    try:
        yield the_lab
    finally:
        if old is None:
            os.environ.pop("KURA_SHARED_STORAGE", None)
        else:
            os.environ["KURA_SHARED_STORAGE"] = old
        tokens = [n.token for n in the_lab.nodes]
        the_lab.down()
        shutil.rmtree(base, ignore_errors=True)
        left = [pid for t in tokens for pid in host.pids_with_token(t)]
        if left:
            raise RuntimeError(f"lab teardown left processes behind: {left}")


class VMFactory:
    """The ``lab_vm`` fixture: creates VMs and removes them at the end of the test."""

    def __init__(self, lab: Lab, test_name: str) -> None:
        self.lab = lab
        self._prefix = re.sub(r"[^A-Za-z0-9]+", "-", test_name).strip("-")[:28] or "vm"
        self._counter = itertools.count(1)
        self.created: list[str] = []

    def _name(self, name: str | None) -> str:
        if name:
            return name
        existing = {v.name for v in self.lab.vms()}
        while True:
            candidate = f"{self._prefix}-{next(self._counter)}"
            if candidate not in existing:
                return candidate

    def __call__(self, name: str | None = None, *, node: str = "node-a",
                 storage: str = "shared", disks: Sequence[DiskSpec] = (DiskSpec(),),
                 agent: bool = True, workload: bool = False, uefi: bool = False,
                 memory_mib: int = 128, start: bool = True, tpm: bool = False) -> LabVM:
        vm_name = self._name(name)
        self.created.append(vm_name)
        return self.lab.create_vm(vm_name, node=node, storage=storage, disks=disks,
                                  agent=agent, workload=workload, uefi=uefi,
                                  memory_mib=memory_mib, start=start, tpm=tpm)

    def from_disks(self, name: str | None = None, *, disks: Sequence[Path | tuple[Path, str]],
                   node: str = "node-a", agent: bool = True, workload: bool = False,
                   nvram: Path | None = None, start: bool = True) -> LabVM:
        vm_name = self._name(name)
        self.created.append(vm_name)
        return self.lab.define_vm_from_disks(vm_name, node=node, disks=disks, agent=agent,
                                             workload=workload, nvram=nvram, start=start)

    def cleanup(self) -> None:
        errors = []
        for name in reversed(self.created):
            try:
                self.lab.remove_vm(name)
            except KuraError as exc:
                if "has no VM" not in str(exc):
                    errors.append(f"{name}: {exc}")
        self.created.clear()
        if errors:
            raise RuntimeError("lab_vm teardown failed: " + "; ".join(errors))


@pytest.fixture
def lab_vm(lab: Lab, request: pytest.FixtureRequest) -> Iterator[VMFactory]:
    """Factory for VMs that are destroyed and undefined when the test ends."""
    factory = VMFactory(lab, request.node.name)
    try:
        yield factory
    finally:
        factory.cleanup()
