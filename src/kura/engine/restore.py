"""Restoring a VM from a restore point: disks, definition, NVRAM, TPM state.

``restore_vm`` runs three phases:

``plan``
    Decide where everything goes. The stored domain XML is the template.
    Under its own name the VM gets its disks back at their original paths (or
    in ``target_dir`` under their original file names). Under a new name
    (``--as``) it also gets a new UUID and new MAC addresses, and its files
    are named ``<name>-<dev>.<fmt>`` and ``<name>_VARS.fd``. Refusals come
    first, before any byte is written: a disk path in use by a running VM
    (never overwritten, even with ``force``), a running VM of that name or
    UUID, and existing files or definitions without ``force``.
``disks``
    Each disk goes to ``target_dir`` or into a directory storage pool's target
    (refreshed afterwards so libvirt lists the volumes). It is written thin
    and verified (:mod:`kura.engine.diskout`), in its backed-up format unless
    another is asked for.
``define``
    The XML is rewritten (names, UUID, disk sources and formats, flattened
    backing chains, NVRAM path) and defined; NVRAM and TPM state are put in
    place; the VM is started if asked.

``restore_disk_file`` restores one disk to a file (``--disk vda --output F``).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import time
import uuid as uuidlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import libvirt

from kura.engine import config
from kura.engine.diskout import FORMATS, write_disk
from kura.engine.events import JobLog, Listener
from kura.errors import HypervisorError, UsageError
from kura.hypervisor.connection import Hypervisor
from kura.hypervisor.domain import SWTPM_ROOT, describe, domain_state, parse_disks
from kura.repository import Manifest, Repository


@dataclass(frozen=True)
class RestoreOptions:
    target_dir: Path | None = None
    pool: str | None = None  # a libvirt directory pool: disks go to its target path
    new_name: str | None = None
    fmt: str | None = None  # raw | qcow2 | None (as backed up)
    start: bool = False
    force: bool = False
    define: bool = True
    workers: int | None = None  # default: diskout.default_workers()

    def __post_init__(self) -> None:
        if self.fmt is not None and self.fmt not in FORMATS:
            raise UsageError(f"format must be raw or qcow2, not {self.fmt!r}")


@dataclass
class RestoreResult:
    vm: str
    restore_point: str
    uuid: str = ""
    disks: dict[str, str] = field(default_factory=dict)  # target -> path
    nvram: str | None = None
    tpm: str | None = None
    defined: bool = False
    started: bool = False
    bytes: int = 0
    seconds: float = 0.0
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "restore_point": self.restore_point, "uuid": self.uuid,
                "disks": dict(self.disks), "nvram": self.nvram, "tpm": self.tpm,
                "defined": self.defined, "started": self.started, "bytes": self.bytes,
                "seconds": self.seconds, "log": list(self.log)}


@dataclass
class _Placement:
    xml: ET.Element
    name: str
    uuid: str
    disks: dict[str, tuple[Path, str]]  # target -> (path, format)
    nvram: Path | None


def _ext(fmt: str) -> str:
    return "qcow2" if fmt == "qcow2" else "img"


def _plan(manifest: Manifest, domain_xml: str, options: RestoreOptions) -> _Placement:
    root = ET.fromstring(domain_xml)
    old_name = root.findtext("name") or manifest.source.name
    name = options.new_name or old_name
    renamed = options.new_name is not None and options.new_name != old_name
    vm_uuid = str(uuidlib.uuid4()) if renamed else (root.findtext("uuid") or manifest.source.key)
    disks: dict[str, tuple[Path, str]] = {}
    for entry in manifest.disks:
        attrs = entry.attrs
        fmt = options.fmt or str(attrs.get("format") or "raw")
        if fmt not in FORMATS:
            fmt = "raw"
        original = attrs.get("path")
        orig_path = Path(str(original)) if original else None
        if renamed or orig_path is None:
            filename = f"{name}-{entry.name}.{_ext(fmt)}"
        else:
            filename = orig_path.name
        if options.target_dir is not None:
            directory = options.target_dir
        elif orig_path is not None:
            directory = orig_path.parent
        else:
            raise UsageError(f"disk {entry.name} has no original path (network disk)",
                             hint="restore with --target-dir DIR")
        disks[entry.name] = (directory / filename, fmt)
    nvram: Path | None = None
    old_nvram = root.findtext("os/nvram")
    if "nvram" in manifest.configs or old_nvram:
        base = Path(old_nvram.strip()) if old_nvram else None
        nv_dir = options.target_dir or (base.parent if base else None)
        if nv_dir is None:
            raise UsageError("the VM's NVRAM has no original path", hint="use --target-dir")
        fname = f"{name}_VARS.fd" if renamed or base is None else base.name
        nvram = nv_dir / fname
    return _Placement(root, name, vm_uuid, disks, nvram)


def _active_paths(hv: Hypervisor) -> dict[str, str]:
    """Disk paths of every active domain on the node -> its name."""
    used: dict[str, str] = {}
    for dom in hv.domains():
        try:
            if not dom.isActive():
                continue
            xml = str(dom.XMLDesc(0))
        except libvirt.libvirtError:
            continue
        disks, _ = parse_disks(xml)
        for d in disks:
            if d.path:
                used[os.path.realpath(d.path)] = str(dom.name())
    return used


def _check(hv: Hypervisor, place: _Placement, options: RestoreOptions, define: bool) -> None:
    used = _active_paths(hv)
    for target, (path, _fmt) in place.disks.items():
        owner = used.get(os.path.realpath(path))
        if owner is not None:
            raise UsageError(f"{path} (disk {target}) is in use by running VM {owner}: "
                             "refusing to overwrite it",
                             hint="shut that VM down, or restore with --as NEW --target-dir DIR")
        if path.exists() and not options.force:
            raise UsageError(f"{path} exists (disk {target})",
                             hint="add --force to overwrite it, or use --target-dir/--as")
    if not define:
        return
    for ref in (place.name, place.uuid):
        dom = hv.find(ref)
        if dom is None:
            continue
        state = domain_state(dom)
        if state not in ("shut off", "saved"):
            raise UsageError(f"VM {dom.name()} exists on this node and is {state}: "
                             "refusing to replace it",
                             hint="shut it down first, or restore under a new name with --as")
        if not options.force:
            raise UsageError(f"VM {dom.name()} is already defined on this node",
                             hint="add --force to replace its definition and disks, "
                                  "or restore with --as NEWNAME")


def _rewrite(place: _Placement, renamed: bool) -> str:
    root = place.xml
    name_el = root.find("name")
    if name_el is None:
        name_el = ET.SubElement(root, "name")
    name_el.text = place.name
    uuid_el = root.find("uuid")
    if uuid_el is None:
        uuid_el = ET.SubElement(root, "uuid")
    uuid_el.text = place.uuid
    if renamed:
        for iface in root.findall("devices/interface"):
            for mac in iface.findall("mac"):
                iface.remove(mac)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev not in place.disks:
            continue
        path, fmt = place.disks[dev]
        disk.set("type", "file")
        for child in list(disk):
            if child.tag in ("source", "backingStore"):
                disk.remove(child)
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", name="qemu")
        driver.set("type", fmt)
        src = ET.Element("source", file=str(path))
        disk.insert(list(disk).index(driver) + 1, src)
    nv = root.find("os/nvram")
    if nv is not None and place.nvram is not None:
        nv.text = str(place.nvram)
    return ET.tostring(root, encoding="unicode")


def restore_vm(hv: Hypervisor, repo: Repository, manifest: Manifest, options: RestoreOptions,
               listeners: list[Listener] | None = None) -> RestoreResult:
    """Restore a whole VM from ``manifest`` onto node ``hv``."""
    start = time.monotonic()
    if manifest.source.kind != "vm":
        raise UsageError(f"restore point {manifest.id} is of an image, not a VM")
    log = JobLog(manifest.source.name, listeners)
    result = RestoreResult(vm=manifest.source.name, restore_point=manifest.id)
    renamed = options.new_name is not None and options.new_name != manifest.source.name
    with log.phase("plan"):
        domain_xml = repo.read_config(manifest, config.DOMAIN_XML).decode()
        pool = None
        if options.pool is not None:
            pool, pool_dir = _pool(hv, options.pool)
            options = replace(options, target_dir=pool_dir)
            log.info(f"disks go to storage pool {options.pool} ({pool_dir})")
        place = _plan(manifest, domain_xml, options)
        _check(hv, place, options, options.define)
        existing = hv.find(place.name) if renamed else None
        if existing is not None:  # replaced with --force: keep its UUID so define overwrites
            place.uuid = str(existing.UUIDString())
        result.vm, result.uuid = place.name, place.uuid
        for target, (path, fmt) in place.disks.items():
            log.info(f"disk {target} -> {path} ({fmt})")
    total = sum(manifest.disk(t).size for t in place.disks)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        log.progress(done, total)

    with log.phase("disks"):
        for target, (path, fmt) in place.disks.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_disk(repo, manifest, target, path, fmt, workers=options.workers,
                       progress=advance)
            result.disks[target] = str(path)
            log.info(f"disk {target} restored and verified: {path}")
        result.bytes = total
        if pool is not None:
            try:
                pool.refresh(0)
            except libvirt.libvirtError as exc:
                log.warning(f"cannot refresh storage pool {options.pool}: {exc}")
    with log.phase("define"):
        if place.nvram is not None and "nvram" in manifest.configs:
            place.nvram.parent.mkdir(parents=True, exist_ok=True)
            place.nvram.write_bytes(repo.read_config(manifest, config.NVRAM))
            result.nvram = str(place.nvram)
            log.info(f"UEFI NVRAM restored to {place.nvram}")
        if config.TPM in manifest.configs:
            tpm_dir = Path(SWTPM_ROOT) / place.uuid
            _untar(repo.read_config(manifest, config.TPM), tpm_dir)
            result.tpm = str(tpm_dir)
            log.info(f"TPM state restored to {tpm_dir}")
        if options.define:
            xml = _rewrite(place, renamed)
            try:
                dom = hv.conn.defineXML(xml)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"cannot define the restored VM {place.name}: {exc}") \
                    from exc
            result.defined = True
            log.info(f"VM {place.name} ({place.uuid}) defined on {hv.node.hostname}")
            if options.start:
                try:
                    dom.create()
                except libvirt.libvirtError as exc:
                    raise HypervisorError(f"the restored VM {place.name} does not start: {exc}") \
                        from exc
                result.started = True
                log.info(f"VM {place.name} started ({describe(dom).state})")
    result.seconds = time.monotonic() - start
    result.log = log.lines()
    return result


def _pool(hv: Hypervisor, name: str) -> tuple[Any, Path]:
    """A directory-backed storage pool and its target directory."""
    try:
        pool = hv.conn.storagePoolLookupByName(name)
        target = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")
    except libvirt.libvirtError as exc:
        raise UsageError(f"no storage pool {name!r} on {hv.uri}: {exc}",
                         hint="`virsh pool-list --all` lists them") from exc
    if not target:
        raise UsageError(f"storage pool {name} has no target directory",
                         hint="restore into a directory pool, or use --target-dir")
    return pool, Path(target)


def _untar(data: bytes, directory: Path) -> None:
    """Extract the TPM state: regular files and directories only, inside ``directory``.

    The backed-up state replaces the directory: files the VM gained since (e.g. a
    ``tpm2-00.volatilestate`` that swtpm would resume from) must not survive
    next to the restored ones. ``restore_vm`` has refused a running VM of this
    name or UUID before (``_check``, with ``define``, the only way it is called).
    """
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    root = directory.resolve()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar.getmembers():
            target = (root / member.name).resolve()
            if target != root and root not in target.parents:
                raise UsageError(f"TPM state entry {member.name!r} points outside {root}")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                target.chmod(member.mode & 0o777)
            elif member.isfile():
                src = tar.extractfile(member)
                if src is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(src.read())
                target.chmod(member.mode & 0o777)
                with contextlib.suppress(OSError):
                    os.chown(target, member.uid, member.gid)


def restore_disk_file(repo: Repository, manifest: Manifest, disk: str, output: Path, *,
                      fmt: str = "raw", force: bool = False, workers: int | None = None,
                      listeners: list[Listener] | None = None) -> int:
    """Restore one disk of a VM restore point to ``output``; returns its size."""
    log = JobLog(manifest.source.name, listeners)
    entry = manifest.disk(disk)
    if output.exists() and not output.is_block_device() and not force:
        raise UsageError(f"{output} exists", hint="add --force to overwrite it")
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        log.progress(done, entry.size)

    with log.phase("disks", f"disk {disk} of {manifest.id} -> {output} ({fmt})"):
        write_disk(repo, manifest, disk, output, fmt, workers=workers, progress=advance)
        log.info(f"disk {disk} restored and verified: {output}")
    return entry.size
