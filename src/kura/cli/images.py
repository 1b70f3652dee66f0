"""Image backup/restore, ``kura snapshots`` and ``kura prune``.

``kura backup --image`` and ``kura restore`` are parsed in ``kura.cli.backup``,
which calls ``backup_image_command``, ``resolve_restore_target`` and
``restore_image_command`` here. ``open_repo`` is the one way CLI modules open
the repository: ``--repo``/``KURA_REPO``/default, and the passphrase only when
the repository is encrypted. ``open_repo_soon`` does the same on a thread, so
that the key derivation (scrypt, a tenth of a second, outside the GIL) overlaps
with the imports and libvirt work of ``kura backup VM``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import click

from kura.cli.common import (
    byte_progress,
    console,
    emit_json,
    err_console,
    human_bytes,
    read_passphrase,
    state,
    table,
)
from kura.engine.image import ImageBackupOptions, ImageRestoreOptions, backup_image, restore_image
from kura.errors import UsageError
from kura.repository import Manifest, Repository, RetentionPolicy

ProgressFn = Callable[[int], None]


def open_repo(ctx: click.Context | None = None) -> Repository:
    """Open the repository named by the global options (asks for the passphrase if needed)."""
    st = state(ctx)
    location = st.repo_location
    passphrase = read_passphrase(st) if Repository.needs_passphrase(location) else None
    return Repository.open(location, passphrase=passphrase)


def open_repo_soon(ctx: click.Context | None = None) -> Future[Repository]:
    """Like :func:`open_repo`, but the key is unwrapped on a thread (``.result()`` raises
    what ``open_repo`` would). The passphrase is read (maybe prompted) here, first."""
    st = state(ctx)
    location = st.repo_location
    passphrase = read_passphrase(st) if Repository.needs_passphrase(location) else None
    pool = ThreadPoolExecutor(1, thread_name_prefix="kura-repo-open")
    try:
        return pool.submit(Repository.open, location, passphrase=passphrase)
    finally:
        pool.shutdown(wait=False)


@contextmanager
def progress_bar(description: str, *, enabled: bool = True
                 ) -> Iterator[tuple[ProgressFn, ProgressFn]]:
    """(advance(bytes), set_total(bytes)) callbacks driving a Rich byte progress bar."""
    with byte_progress(enabled) as bar:
        task = bar.add_task(description, total=None)
        yield (lambda n: bar.advance(task, n)), (lambda total: bar.update(task, total=total))


def _rate(nbytes: int, seconds: float) -> str:
    return f"{human_bytes(nbytes / seconds if seconds > 0 else 0)}/s"


def backup_image_command(ctx: click.Context, *, image: Path, name: str | None,
                         full: bool) -> None:
    st = state(ctx)
    name = name or image.stem
    repo = open_repo(ctx)
    t0 = time.monotonic()
    with progress_bar(f"backup {name}", enabled=not st.json) as (advance, total):
        manifest = backup_image(repo, ImageBackupOptions(image=image, name=name, full=full),
                                progress=advance, on_total=total)
    seconds = time.monotonic() - t0
    if st.json:
        doc = manifest.to_dict()
        doc["seconds"] = round(seconds, 3)
        emit_json(doc)
        return
    stats = manifest.disks[0].stats
    console.print(
        f"restore point [bold]{manifest.id}[/bold] of image {name}: {manifest.kind}, "
        f"{human_bytes(manifest.size)} image, {human_bytes(stats.get('bytes_in', 0))} read, "
        f"{stats.get('chunks_written', 0)} new chunks ({human_bytes(stats.get('bytes_stored', 0))}"
        f" stored), {stats.get('chunks_reused', 0)} deduplicated, "
        f"{stats.get('chunks_zero', 0)} zero; {seconds:.1f}s "
        f"({_rate(manifest.size, seconds)})", highlight=False)


@dataclass(frozen=True)
class RestoreTarget:
    """What ``kura restore NAME[@ID]`` resolved to."""

    repo: Repository
    manifest: Manifest

    @property
    def is_image(self) -> bool:
        return self.manifest.source.kind == "image"


def resolve_restore_target(ctx: click.Context, ref: str) -> RestoreTarget:
    repo = open_repo(ctx)
    return RestoreTarget(repo=repo, manifest=repo.get_snapshot(ref))


def restore_image_command(ctx: click.Context, target: RestoreTarget, *, output: Path,
                          fmt: str, force: bool) -> None:
    st = state(ctx)
    m = target.manifest
    t0 = time.monotonic()
    with progress_bar(f"restore {m.source.name}", enabled=not st.json) as (advance, total):
        restore_image(target.repo, m, ImageRestoreOptions(output=output, fmt=fmt, force=force),
                      progress=advance, on_total=total)
    seconds = time.monotonic() - t0
    if st.json:
        emit_json({"snapshot": m.id, "source": m.source.name, "output": str(output),
                   "format": fmt, "size": m.size, "seconds": round(seconds, 3)})
        return
    console.print(f"restored {m.source.name}@{m.id} to {output} ({fmt}, "
                  f"{human_bytes(m.size)}) in {seconds:.1f}s ({_rate(m.size, seconds)})",
                  highlight=False)


# -- kura snapshots -------------------------------------------------------------


def _frozen(m: Manifest) -> str:
    value = m.meta.get("frozen_seconds")
    return f"{float(value):.2f}s" if isinstance(value, int | float) else "-"


@click.command("snapshots")
@click.argument("name", required=False)
@click.option("--json", "json_", is_flag=True, help="Machine-readable JSON output.")
@click.pass_context
def snapshots(ctx: click.Context, name: str | None, json_: bool) -> None:
    """List restore points, oldest first (of one VM or image with NAME)."""
    st = state(ctx)
    repo = open_repo(ctx)
    items = repo.list_snapshots(name)
    for sid, reason in sorted(repo.damaged.items()):
        err_console.print(f"[yellow]kura: warning:[/yellow] restore point {sid} is damaged: "
                          f"{reason}", highlight=False)
    if json_ or st.json:
        emit_json([m.to_dict() for m in items])
        return
    if not items:
        console.print(f"no restore points{f' of {name}' if name else ''} in {repo.location}")
        return
    rows = [(m.id, m.source.name, m.created.strftime("%Y-%m-%d %H:%M:%S"),
             m.kind, m.parent or "-", m.sequence, m.node, m.consistency, _frozen(m),
             human_bytes(m.size), "yes" if m.protected else "", m.verify_state or "-",
             m.reason) for m in items]
    table(None, ["id", "source", "created (UTC)", "kind", "parent", "seq", "node",
                 "consistency", "frozen", "size", "protected", "verified", "reason"], rows)


# -- kura prune -----------------------------------------------------------------


@click.command("prune")
@click.argument("name", required=False)
@click.option("--keep-last", type=int, metavar="N", help="Keep the N newest restore points.")
@click.option("--keep-hourly", type=int, metavar="N", help="Keep one per hour for N hours.")
@click.option("--keep-daily", type=int, metavar="N", help="Keep one per day for N days.")
@click.option("--keep-weekly", type=int, metavar="N", help="Keep one per ISO week for N weeks.")
@click.option("--keep-monthly", type=int, metavar="N", help="Keep one per month for N months.")
@click.option("--keep-yearly", type=int, metavar="N", help="Keep one per year for N years.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be removed; remove nothing.")
@click.pass_context
def prune(ctx: click.Context, name: str | None, keep_last: int | None, keep_hourly: int | None,
          keep_daily: int | None, keep_weekly: int | None, keep_monthly: int | None,
          keep_yearly: int | None, dry_run: bool) -> None:
    """Apply retention to each VM or image (or only NAME).

    Rules add to each other (newest first): --keep-last, then one restore point per
    hour/day/week/month/year not already covered. Protected restore points are
    never removed. Prune removes restore points only; 'kura repo gc' frees space.
    """
    st = state(ctx)
    policy = RetentionPolicy(keep_last=keep_last, keep_hourly=keep_hourly,
                             keep_daily=keep_daily, keep_weekly=keep_weekly,
                             keep_monthly=keep_monthly, keep_yearly=keep_yearly)
    if policy.empty:
        raise UsageError("no retention rule given; pass at least one --keep-... option",
                         hint="e.g. --keep-last 3 --keep-daily 7")
    repo = open_repo(ctx)
    result = repo.prune(policy, source=name, dry_run=dry_run)
    if st.json:
        emit_json(result.to_dict())
        return
    rows = [(d.manifest.id, d.manifest.source.name,
             d.manifest.created.strftime("%Y-%m-%d %H:%M:%S"),
             ("keep" if d.keep else ("would remove" if dry_run else "removed")),
             ", ".join(d.reasons)) for d in result.decisions]
    table(None, ["id", "source", "created (UTC)", "action", "kept by"], rows)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(result.removed)} restore point(s), kept {len(result.kept)}"
                  + ("" if dry_run or not result.removed else
                     "; run 'kura repo gc' to free their space"))


def register(cli: click.Group) -> None:
    cli.add_command(snapshots)
    cli.add_command(prune)
