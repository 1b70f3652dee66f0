"""``kura repo``: create, inspect, verify, collect garbage, protect, keys."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kura.cli.common import console, emit_json, err_console, human_bytes, read_passphrase, state
from kura.cli.images import open_repo, progress_bar
from kura.errors import IntegrityError, UsageError
from kura.repository import DEFAULT_CHUNK_SIZE, Repository


@click.group("repo")
def repo() -> None:
    """Create and maintain the repository (--repo / KURA_REPO)."""


@repo.command("init")
@click.option("--encryption", type=click.Choice(["aes-256-gcm", "none"]), default="aes-256-gcm",
              show_default=True, help="Encrypt chunks and metadata (AES-256-GCM) or not.")
@click.option("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, show_default=True,
              metavar="BYTES", help="Fixed chunk size (power of two, 64 KiB to 64 MiB).")
@click.option("--compression-level", type=click.IntRange(0, 22), default=3, show_default=True,
              help="zstd level (0 = no compression).")
@click.pass_context
def init(ctx: click.Context, encryption: str, chunk_size: int, compression_level: int) -> None:
    """Create a new repository."""
    st = state(ctx)
    passphrase = read_passphrase(st, confirm=True) if encryption != "none" else None
    r = Repository.init(st.repo_location, passphrase=passphrase, encryption=encryption,
                        chunk_size=chunk_size, compression_level=compression_level)
    if st.json:
        emit_json({"location": r.location, "id": r.id, "encryption": r.encryption,
                   "chunk_size": r.chunk_size})
        return
    console.print(f"created repository {r.id} at {r.location} (encryption {r.encryption}, "
                  f"chunks of {human_bytes(r.chunk_size)})", highlight=False)
    if r.encrypted:
        console.print("keep the passphrase safe, and a copy of the key: "
                      "'kura repo key export FILE'")


@repo.command("info")
@click.pass_context
def info(ctx: click.Context) -> None:
    """Settings and space used."""
    st = state(ctx)
    data = open_repo(ctx).info()
    if st.json:
        emit_json(data)
        return
    for key in ("location", "id", "created", "encryption", "compression"):
        console.print(f"{key:<18} {data[key]}", highlight=False)
    console.print(f"{'chunk size':<18} {human_bytes(data['chunk_size'])}")
    console.print(f"{'restore points':<18} {data['snapshots']} of {data['sources']} source(s)")
    console.print(f"{'logical size':<18} {human_bytes(data['logical_bytes'])}")
    console.print(f"{'stored':<18} {human_bytes(data['stored_bytes'])} in {data['chunks']} "
                  "chunks")
    if data["damaged_snapshots"]:
        console.print(f"[red]damaged restore points: {', '.join(data['damaged_snapshots'])}"
                      "[/red] (run 'kura repo verify')")


@repo.command("verify")
@click.option("--snapshot", "snapshot_refs", multiple=True, metavar="ID",
              help="Verify only this restore point (NAME, NAME@ID or ID; repeatable).")
@click.option("--workers", type=int, default=0, help="Parallel readers (default: CPU count).")
@click.pass_context
def verify(ctx: click.Context, snapshot_refs: tuple[str, ...], workers: int) -> None:
    """Re-read chunks and check every id and authentication tag.

    Reports exactly which restore points, disks and byte ranges are damaged, and
    records the result (shown by 'kura snapshots'). Exit code 3 when damaged.
    """
    st = state(ctx)
    r = open_repo(ctx)
    with progress_bar("verify", enabled=not st.json) as (advance, total):
        report = r.verify(list(snapshot_refs) or None, workers=workers or None,
                          progress=advance, on_total=total)
    if st.json:
        emit_json(report.to_dict())
    else:
        console.print(f"checked {len(report.snapshots)} restore point(s), "
                      f"{report.chunks_checked} chunks, {human_bytes(report.bytes_checked)} "
                      f"in {report.seconds:.1f}s", highlight=False)
        for damage in report.damaged:
            err_console.print(f"[red]damaged:[/red] {damage.describe()}", highlight=False)
    if not report.ok:
        raise IntegrityError(
            f"{len(report.failed_snapshots)} restore point(s) damaged: "
            f"{', '.join(report.failed_snapshots)}",
            hint="damaged chunks were moved to bad/; the next backup of the same data stores "
                 "them again")
    if not st.json:
        console.print("[green]no damage found[/green]")


@repo.command("gc")
@click.option("--dry-run", "-n", is_flag=True, help="Count what would be freed; delete nothing.")
@click.option("--grace", type=int, default=300, show_default=True, metavar="SECONDS",
              help="Never delete unreferenced chunks younger than this (clock skew margin).")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, grace: int) -> None:
    """Free chunks no restore point references (safe while backups run)."""
    st = state(ctx)
    r = open_repo(ctx)
    with Progress(TextColumn("[bold]gc[/bold] chunks examined"), BarColumn(),
                  MofNCompleteColumn(), TimeElapsedColumn(), console=err_console,
                  disable=st.json or not err_console.is_terminal) as bar:
        task = bar.add_task("gc", total=None)
        result = r.gc(grace_seconds=grace, dry_run=dry_run,
                      progress=lambda n: bar.advance(task, n))
    if st.json:
        emit_json(result.to_dict())
        return
    verb = "would free" if dry_run else "freed"
    console.print(
        f"{verb} {result.chunks_removed} chunk(s), {human_bytes(result.bytes_removed)}; "
        f"{result.chunks_referenced} referenced by {result.snapshots} restore point(s), "
        f"{result.chunks_recent} unreferenced but too recent; "
        f"{result.indexes_removed} orphan index folder(s), {result.tmp_removed} temporary "
        f"file(s) {'to remove' if dry_run else 'removed'}", highlight=False)


def _set_protected(ctx: click.Context, ref: str, value: bool) -> None:
    st = state(ctx)
    m = open_repo(ctx).protect(ref, value)
    if st.json:
        emit_json(m.to_dict())
        return
    console.print(f"restore point {m.id} of {m.source.name} is "
                  f"{'protected' if value else 'no longer protected'}")


@repo.command("protect")
@click.argument("ref", metavar="ID")
@click.pass_context
def protect(ctx: click.Context, ref: str) -> None:
    """Protect a restore point: prune never removes it."""
    _set_protected(ctx, ref, True)


@repo.command("unprotect")
@click.argument("ref", metavar="ID")
@click.pass_context
def unprotect(ctx: click.Context, ref: str) -> None:
    """Let prune remove a restore point again."""
    _set_protected(ctx, ref, False)


@repo.command("forget")
@click.argument("snapshot_id", metavar="ID")
@click.pass_context
def forget(ctx: click.Context, snapshot_id: str) -> None:
    """Remove one restore point by its full id (also a damaged one)."""
    open_repo(ctx).forget(snapshot_id)
    if not state(ctx).json:
        console.print(f"removed restore point {snapshot_id}; 'kura repo gc' frees its space")


@repo.group("key")
def key() -> None:
    """Export or import the repository key."""


@key.command("export")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False))
@click.pass_context
def key_export(ctx: click.Context, path: Path) -> None:
    """Write the key (wrapped by the passphrase) to PATH."""
    r = open_repo(ctx)
    r.export_key(path)
    if not state(ctx).json:
        console.print(f"key of repository {r.id} written to {path}")
        if not r.encrypted:
            console.print("[yellow]the repository is not encrypted: the key file is in the "
                          "clear[/yellow]")


@key.command("import")
@click.argument("path", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.pass_context
def key_import(ctx: click.Context, path: Path) -> None:
    """Put the key from PATH back into the repository (checked with the passphrase)."""
    st = state(ctx)
    location = st.repo_location
    try:
        needs = json.loads(path.read_text()).get("key", {}).get("kdf") != "none"
    except (OSError, ValueError, AttributeError) as exc:
        raise UsageError(f"{path} is not a kura key file ({exc})") from None
    passphrase = read_passphrase(st) if needs else None
    Repository.import_key(location, path, passphrase=passphrase)
    if not st.json:
        console.print(f"key imported from {path} into {location}")


def register(cli: click.Group) -> None:
    cli.add_command(repo)
