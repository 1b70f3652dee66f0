"""The lab's tiny guest: a Debian kernel plus an initramfs, built by kura itself.

The guest is booted by direct kernel boot (``<kernel>``/``<initrd>`` in the
domain XML), so it needs no bootloader and no root disk. Its parts all come
from Debian packages:

* the kernel of ``linux-image-cloud-amd64`` (downloaded with ``apt-get
  download``; ext4 is built in, the virtio drivers are modules),
* the initramfs: the static busybox of ``busybox-static`` (shell, init and
  tools), ``qemu-ga`` from ``qemu-guest-agent`` and ``mke2fs``/``e2fsck`` from
  ``e2fsprogs`` with the shared libraries ``ldd`` lists, the virtio modules in
  dependency order, and the scripts in ``kura/lab/guest/`` (init, workload).

The result is cached in ``KURA_GUEST_CACHE`` (default ``/var/cache/kura/guest``)
under ``<key>/`` where the key is a hash of every input (package versions,
scripts, builder version). Building holds an exclusive ``flock`` on
``<cache>/.lock`` and renames the finished directory into place, so concurrent
labs never see half an image and build it once. Cached images are never
deleted by kura: domain XML of lab VMs (and of VMs restored from backups)
refers to these paths.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kura.errors import LabError
from kura.lab.host import run

BUILDER_VERSION = "1"
DEFAULT_CACHE = Path("/var/cache/kura/guest")
KERNEL_META = "linux-image-cloud-amd64"
#: Debian packages whose installed binaries go into the initramfs.
HOST_PACKAGES = ("busybox-static", "qemu-guest-agent", "e2fsprogs", "libc6", "libglib2.0-0")
#: Binaries copied from the host (with their libraries), guest path = host path.
BINARIES = ("/usr/sbin/qemu-ga", "/sbin/mke2fs", "/sbin/e2fsck")
#: Kernel modules the guest loads; their dependencies are added from modules.dep.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "button", "evdev")
GUEST_FILES = {
    "inittab": "etc/inittab",
    "rc.sysinit": "etc/rc.sysinit",
    "rc.shutdown": "etc/rc.shutdown",
    "shutdown": "sbin/shutdown",
    "workload": "usr/lib/kura/workload",
    "check": "usr/lib/kura/check",
    "acpi-power": "etc/acpi/PWRF/00000080",
}


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs paths (stable as long as the cache lives)."""

    key: str
    kernel: Path
    initrd: Path
    kernel_release: str

    @property
    def directory(self) -> Path:
        return self.kernel.parent


def cache_dir() -> Path:
    return Path(os.environ.get("KURA_GUEST_CACHE") or DEFAULT_CACHE)


def _guest_file(name: str) -> bytes:
    return (importlib.resources.files("kura.lab") / "guest" / name).read_bytes()


def _dpkg_version(pkg: str) -> str:
    proc = run(["dpkg-query", "-W", "-f=${Version}", pkg], check=False)
    if proc.returncode != 0:
        raise LabError(f"Debian package {pkg} is not installed",
                       hint=f"apt-get install {pkg} (kura lab up does this when run as root)")
    return proc.stdout.decode().strip()


def _kernel_package() -> tuple[str, str]:
    """The versioned kernel package behind the cloud meta-package, and its version."""
    for attempt in range(2):
        proc = run(["apt-cache", "depends", KERNEL_META], check=False)
        match = re.search(r"Depends: (linux-image-\S+-cloud-amd64)", proc.stdout.decode())
        if match:
            pkg = match.group(1)
            policy = run(["apt-cache", "policy", pkg]).stdout.decode()
            version = re.search(r"Candidate: (\S+)", policy)
            if version and version.group(1) != "(none)":
                return pkg, version.group(1)
        if attempt == 0:
            run(["apt-get", "update", "-qq"], timeout=600)
    raise LabError(f"apt does not know {KERNEL_META}",
                   hint="this needs a Debian 12 machine with its main archive in apt's sources")


def _inputs() -> dict[str, str]:
    kpkg, kver = _kernel_package()
    inputs = {"builder": BUILDER_VERSION, "kernel": f"{kpkg}={kver}"}
    for pkg in HOST_PACKAGES:
        inputs[pkg] = _dpkg_version(pkg)
    for name in sorted(GUEST_FILES):
        inputs[f"file:{name}"] = hashlib.sha256(_guest_file(name)).hexdigest()
    return inputs


def _key(inputs: dict[str, str]) -> str:
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _load(directory: Path) -> GuestImage | None:
    info = directory / "info.json"
    if not info.exists():
        return None
    data = json.loads(info.read_text())
    return GuestImage(key=data["key"], kernel=directory / "vmlinuz",
                      initrd=directory / "initrd.img", kernel_release=data["kernel_release"])


def ensure_guest_image(cache: Path | None = None, *,
                       progress: Callable[[str], None] | None = None) -> GuestImage:
    """Return the cached guest image for the current inputs, building it if needed."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    inputs = _inputs()
    key = _key(inputs)
    found = _load(cache / key)
    if found:
        return found
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found = _load(cache / key)  # another lab may have built it meanwhile
        if found:
            return found
        if progress is not None:
            progress(f"building the guest image {key} in {cache} (first time only)")
        return _build(cache, key, inputs)


def _ldd(binary: str) -> list[str]:
    out = run(["ldd", binary]).stdout.decode()
    libs = []
    for line in out.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _copy_into(root: Path, host_path: str) -> None:
    dest = root / host_path.lstrip("/")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_symlink():
        # A busybox applet link points at /bin/busybox: never write through it.
        dest.unlink()
    shutil.copy2(os.path.realpath(host_path), dest)


def _module_order(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Module paths (relative to moddir) for ``names`` and their deps, deps first."""
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0].replace("-", "_"): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in names:
        if name not in by_name:
            raise LabError(f"kernel module {name} not found in {moddir}")
        visit(by_name[name])
    return order


def _build(cache: Path, key: str, inputs: dict[str, str]) -> GuestImage:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
    try:
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        kpkg, kver = inputs["kernel"].split("=", 1)
        wanted_deb = [d for d in debs.glob(f"{kpkg}_*.deb")
                      if d.name.split("_")[1].replace("%3a", ":") == kver]
        deb = wanted_deb[0] if wanted_deb else None
        if deb is None:
            run(["apt-get", "download", f"{kpkg}={kver}"], cwd=debs, timeout=600)
            deb = next(d for d in debs.glob(f"{kpkg}_*.deb"))
        kroot = work / "kernel"
        run(["dpkg-deb", "-x", deb, kroot])
        vmlinuz = next((kroot / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        moddir = kroot / "lib" / "modules" / release
        run(["/bin/busybox", "depmod", "-b", kroot, release])

        root = work / "root"
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "usr/lib/kura", "etc", "proc", "sys",
                  "dev", "run", "tmp", "data", "var", "lib/modules", "root"):
            (root / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2("/bin/busybox", root / "bin" / "busybox")
        applets = run(["/bin/busybox", "--list-full"]).stdout.decode().split()
        for applet in applets:
            link = root / applet
            if link.exists() or applet.endswith("/busybox") or applet == "sbin/shutdown":
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")
        (root / "init").symlink_to("/bin/busybox")
        for binary in BINARIES:
            _copy_into(root, binary)
            for lib in _ldd(binary):
                _copy_into(root, lib)
        _copy_into(root, "/etc/mke2fs.conf")
        for name, dest in GUEST_FILES.items():
            target = root / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_symlink():
                target.unlink()
            target.write_bytes(_guest_file(name))
            target.chmod(0o755 if name != "inittab" else 0o644)
        modules = _module_order(moddir, MODULES)
        for rel in modules:
            mod_dest = root / "lib" / "modules" / rel
            mod_dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(moddir / rel, mod_dest)
        (root / "etc" / "kura-modules").write_text("\n".join(modules) + "\n")
        (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (root / "etc" / "group").write_text("root:x:0:\n")

        files = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True,
                               check=True).stdout
        cpio = run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=root,
                   input_=files).stdout
        out = work / "out"
        out.mkdir()
        (out / "initrd.img").write_bytes(gzip.compress(cpio, compresslevel=9))
        shutil.copy2(vmlinuz, out / "vmlinuz")
        (out / "info.json").write_text(json.dumps(
            {"key": key, "kernel_release": release, "inputs": inputs}, indent=2))
        for f in out.iterdir():
            f.chmod(0o644)
        out.chmod(0o755)
        os.rename(out, cache / key)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = _load(cache / key)
    if image is None:  # pragma: no cover - rename above guarantees it
        raise LabError(f"guest image build in {cache} left no image")
    return image
