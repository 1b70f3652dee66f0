"""``kura ls`` and the VM halves of ``kura backup`` / ``kura restore``.

``kura restore VM --target-dir pool:NAME`` restores into a libvirt directory
storage pool. The job log is printed live on stderr (one line per phase with its timing,
info and warning lines, a progress bar with throughput during the data
phase), then a summary table per VM on stdout; ``--json`` prints only the
results, as JSON, on stdout.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.progress import Progress, TaskID
from rich.tree import Tree

from kura.cli.common import (
    byte_progress,
    console,
    emit_json,
    human_bytes,
    state,
    table,
)
from kura.engine.backup import BackupOptions, BackupResult, backup_vm
from kura.engine.events import Event
from kura.engine.inventory import NodeTree, describe_node
from kura.engine.restore import RestoreOptions, restore_disk_file, restore_vm
from kura.errors import Interrupted, KuraError, UsageError
from kura.hypervisor.connection import DEFAULT_URI, open_connection
from kura.hypervisor.jobwatch import JobRequest, JobWatch, default_admin_uri
from kura.repository import Repository


class JobPrinter:
    """Renders job-log events: lines above a progress bar on stderr."""

    def __init__(self, progress: Progress, *, quiet: bool) -> None:
        self.progress = progress
        self.quiet = quiet
        self.task: TaskID | None = None

    def __call__(self, event: Event) -> None:
        if event.kind == "progress":
            done, total = int(event.data["done"]), int(event.data["total"])
            if self.task is None:
                self.task = self.progress.add_task(f"{event.vm} {event.phase}", total=total)
            self.progress.update(self.task, completed=done, total=total)
            return
        if event.kind == "phase-end" and self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if self.quiet:
            return
        out = self.progress.console
        tag = f"[bold]{event.vm}[/bold] [cyan]{event.phase or '-'}[/cyan]"
        if event.kind == "phase-end":
            ok = "[green]done[/green]" if event.data.get("ok") else "[red]failed[/red]"
            out.print(f"{tag} {ok} in {event.seconds or 0:.2f}s", highlight=False)
        elif event.kind == "phase-start":
            if event.message:
                out.print(f"{tag} {event.message}", highlight=False)
        elif event.kind == "warning":
            out.print(f"{tag} [yellow]warning:[/yellow] {event.message}", highlight=False,
                      markup=True)
        elif event.kind == "error":
            out.print(f"{tag} [red]error:[/red] {event.message}", highlight=False)
        else:
            out.print(f"{tag} {event.message}", highlight=False)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every cleanup path runs."""

    def handler(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- kura backup VM... -----------------------------------------------------------


def backup_vms_command(ctx: click.Context, *, vms: list[str], all_vms: bool, connect: str,
                       consistency: str, full: bool,
                       repo: Future[Repository] | None = None) -> None:
    """``repo``: the repository being opened (``images.open_repo_soon``), else opened here."""
    from kura.cli.images import open_repo

    st = state(ctx)
    options = BackupOptions(consistency=consistency, full=full)
    repository = repo.result() if repo is not None else open_repo(ctx)
    results: list[BackupResult] = []
    with open_connection(connect) as hv:
        refs = list(vms)
        if all_vms:
            refs = [str(d.name()) for d in hv.domains()]
            if not refs:
                # An empty node is not an error for --all (a scheduled sweep of
                # every node must not fail on a node that has nothing now).
                if st.json:
                    emit_json([])
                else:
                    console.print(f"no VMs on node {connect}: nothing to back up")
                return
        watch = JobWatch(default_admin_uri(connect), options.scratch_root)
        with byte_progress(enabled=not st.json) as progress, _terminate_as_interrupt():
            printer = JobPrinter(progress, quiet=st.json)
            for ref in refs:
                try:
                    dom = hv.find(ref)
                    gw = _GiveWay()
                    watching = (watch.watch(str(dom.name()), gw.asked)
                                if dom is not None and dom.isActive()
                                else contextlib.nullcontext(False))
                    with watching:
                        results.append(backup_vm(hv, repository, ref, options, [printer, gw]))
                except KeyboardInterrupt:
                    raise Interrupted(f"backup of {ref} interrupted; nothing was kept") from None
                except KuraError as exc:
                    progress.console.print(f"[bold]{ref}[/bold] [red]failed:[/red] {exc}",
                                           highlight=False)
                    results.append(BackupResult(vm=ref, error=str(exc)))
    if st.json:
        emit_json([r.to_dict() for r in results])
    else:
        table("backup", ["VM", "restore point", "kind", "consistency", "frozen", "read",
                         "stored", "time", "result"],
              [_row(r) for r in results])
    failed = [r for r in results if not r.ok]
    if failed:
        raise KuraError(f"{len(failed)} of {len(results)} VM backups failed: "
                        + "; ".join(f"{r.vm}: {r.error}" for r in failed))


class _GiveWay:
    """Stops a VM's backup when a migration (or save, snapshot...) waits for it.

    See :mod:`kura.hypervisor.jobwatch`: libvirt would make the migration wait
    for the backup's job and fail it after 30 s; ended early, the backup
    leaves nothing behind and the migration proceeds.
    """

    def __init__(self) -> None:
        self.request: JobRequest | None = None
        self.phase = ""

    def asked(self, req: JobRequest) -> None:
        if self.request is None and self.phase != "finish":  # finish: ends in moments
            self.request = req

    def __call__(self, ev: Event) -> None:
        if ev.kind == "phase-start":
            self.phase = ev.phase or ""
        req = self.request
        if req is not None and ev.kind in ("phase-start", "progress"):
            what = "a migration" if req.migration else f"a {req.job} job"
            raise Interrupted(f"{what} of VM {req.vm} was waiting for its backup: the backup "
                              "gave way (ended cleanly, no restore point)",
                              hint="back it up again where it runs now")


def _row(r: BackupResult) -> list[Any]:
    frozen = f"{r.frozen_seconds:.2f}s" if r.frozen_seconds is not None else "-"
    if not r.ok:  # nothing was kept: no figures to show, only why
        return [r.vm, "-", "-", "-", "-", "-", "-", "-", f"FAILED: {r.error}"]
    return [r.vm, r.restore_point, r.kind or "-", r.consistency or "-", frozen,
            human_bytes(r.bytes_read), human_bytes(r.bytes_stored), f"{r.seconds:.1f}s", "ok"]


# -- kura restore VM[@ID] -----------------------------------------------------------


def restore_vm_command(ctx: click.Context, target: Any, *, output: Path | None,
                       disk: str | None, fmt: str | None, new_name: str | None,
                       target_dir: Path | None, connect: str, start: bool,
                       force: bool) -> None:
    st = state(ctx)
    repo, manifest = target.repo, target.manifest
    t0 = time.monotonic()
    with byte_progress(enabled=not st.json) as progress, _terminate_as_interrupt():
        printer = JobPrinter(progress, quiet=st.json)
        if output is not None or disk is not None:
            if output is None:
                raise UsageError("--disk restores one disk to a file: add --output FILE")
            if disk is None:
                if len(manifest.disks) != 1:
                    raise UsageError("this restore point has several disks: name one with "
                                     f"--disk ({', '.join(d.name for d in manifest.disks)})")
                disk = manifest.disks[0].name
            size = restore_disk_file(repo, manifest, disk, output, fmt=fmt or "raw",
                                     force=force, listeners=[printer])
            seconds = time.monotonic() - t0
            if st.json:
                emit_json({"restore_point": manifest.id, "vm": manifest.source.name,
                           "disk": disk, "output": str(output), "format": fmt or "raw",
                           "size": size, "seconds": round(seconds, 3)})
            else:
                console.print(f"restored disk {disk} of {manifest.source.name}@{manifest.id} "
                              f"to {output} ({human_bytes(size)}) in {seconds:.1f}s",
                              highlight=False)
            return
        pool = None
        if target_dir is not None and str(target_dir).startswith("pool:"):
            pool, target_dir = str(target_dir)[5:], None
        options = RestoreOptions(target_dir=target_dir, pool=pool, new_name=new_name, fmt=fmt,
                                 start=start, force=force)
        with open_connection(connect) as hv:
            result = restore_vm(hv, repo, manifest, options, [printer])
    if st.json:
        emit_json(result.to_dict())
        return
    table(f"restored {manifest.source.name}@{manifest.id} as {result.vm}",
          ["disk", "path"], sorted(result.disks.items()))
    console.print(f"VM {result.vm} ({result.uuid}) "
                  f"{'defined and started' if result.started else 'defined'} in "
                  f"{result.seconds:.1f}s", highlight=False)


# -- kura ls ------------------------------------------------------------------------------


def _tree(t: NodeTree) -> Tree:
    n = t.node
    root = Tree(f"[bold]node {n.hostname}[/bold]  host uuid {n.host_uuid or '?'}  {n.uri}  "
                f"({t.hypervisor}, libvirt {t.libvirt_version})")
    store = root.add(f"configuration store {t.config_store}: {len(t.vms)} VMs")
    for v in t.vms:
        i = v.info
        vm = store.add(f"[bold]{i.name}[/bold]  {i.uuid}  [cyan]{i.state}[/cyan]"
                       f"{'' if i.persistent else '  (transient)'}  firmware {i.firmware}")
        if i.nvram:
            vm.add(f"NVRAM {i.nvram}")
        if i.tpm_dir:
            vm.add(f"TPM state {i.tpm_dir}")
        if v.checkpoints:
            vm.add(f"checkpoints: {', '.join(v.checkpoints)}")
        for d in v.disks:
            dd = d.disk
            where = dd.path or dd.network or "?"
            size = (f"{human_bytes(d.virtual_size)} virtual, {human_bytes(d.allocated)} "
                    "allocated") if d.virtual_size is not None else "size unknown"
            node = vm.add(f"disk {dd.target} ({dd.bus}) {where}  {dd.format}  {size}")
            s = dd.storage
            loc = f"{s.kind} storage: {s.fstype or '?'} at {s.mount_point or '?'}"
            if s.pool:
                loc += f", pool {s.pool}"
            node.add(f"{loc} ({s.why})")
            for path, fmt in dd.backing:
                node.add(f"backing {path} ({fmt})")
            node.add(f"change tracking: {dd.tracking_note}")
        for target, why in i.skipped:
            vm.add(f"[dim]{target}: not backed up ({why})[/dim]")
    for e in t.errors:
        root.add(f"[red]{e}[/red]")
    return root


@click.command("ls")
@click.option("--connect", "-c", default=DEFAULT_URI, show_default=True, metavar="URI",
              help="libvirt URI of the node.")
@click.option("--json", "json_", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def ls(ctx: click.Context, connect: str, json_: bool) -> None:
    """Show the node as a tree: configuration store, VMs, disks and their storage."""
    st = state(ctx)
    with open_connection(connect) as hv:
        tree = describe_node(hv)
    if json_ or st.json:
        emit_json(tree.to_dict())
        return
    console.print(_tree(tree))


def register(cli: click.Group) -> None:
    cli.add_command(ls)
