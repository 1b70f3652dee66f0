"""Shared plumbing for CLI commands: global options, output and progress."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from kura.errors import UsageError

DEFAULT_REPO = "/var/lib/kura/repo"

def _console(stderr: bool = False) -> Console:
    # Rich falls back to 80 columns when not on a terminal (pipes, logs, CI),
    # which folds wide tables into unreadable slivers; use a wide page there.
    probe = Console(stderr=stderr)
    if probe.is_terminal or "COLUMNS" in os.environ:
        return probe
    return Console(stderr=stderr, width=200)


console = _console()
err_console = _console(stderr=True)


@dataclass
class CliState:
    """Global options, carried on the click context as ``ctx.obj``."""

    json: bool = False
    verbose: int = 0
    repo: str | None = None
    passphrase_file: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def repo_location(self) -> str:
        return self.repo or os.environ.get("KURA_REPO") or DEFAULT_REPO


def state(ctx: click.Context | None = None) -> CliState:
    ctx = ctx or click.get_current_context()
    obj = ctx.find_object(CliState)
    if obj is None:  # invoked outside the main group (tests)
        obj = CliState()
        ctx.obj = obj
    return obj


def read_passphrase(st: CliState, *, confirm: bool = False) -> bytes:
    """The repository passphrase: KURA_PASSPHRASE, --passphrase-file, or a prompt."""
    env = os.environ.get("KURA_PASSPHRASE")
    if env is not None:
        return env.encode()
    if st.passphrase_file is not None:
        try:
            return st.passphrase_file.read_text().rstrip("\n").encode()
        except OSError as exc:
            raise UsageError(
                f"cannot read passphrase file {st.passphrase_file}: {exc.strerror}") from exc
    if not sys.stdin.isatty():
        raise UsageError(
            "the repository passphrase is needed",
            hint="set KURA_PASSPHRASE or pass --passphrase-file",
        )
    value: str = click.prompt("Repository passphrase", hide_input=True,
                              confirmation_prompt=confirm, err=True)
    return value.encode()


def print_error(message: str) -> None:
    """One line on stderr, never wrapped or interpreted as markup."""
    err_console.print(Text.assemble(("kura: error: ", "red"), message), soft_wrap=True,
                      highlight=False)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    cells = [["" if v is None else str(v) for v in r] for r in rows]
    t = Table(title=title, show_lines=False, header_style="bold")
    for i, c in enumerate(columns):
        # Identifiers (cells without spaces: ids, names, paths) must never be
        # cut short with an ellipsis, since admins copy them into commands;
        # only free text may wrap when the table is too wide.
        tokens = [row[i] for row in cells if i < len(row) and row[i] and " " not in row[i]]
        widest = min(max((len(v) for v in tokens), default=0), 40)
        t.add_column(c, min_width=widest or None, overflow="fold")
    for r in cells:
        t.add_row(*r)
    console.print(t)


def human_bytes(n: float | int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def byte_progress(enabled: bool = True) -> Progress:
    """A progress bar for byte-sized work: bar, bytes done, throughput, ETA.

    Written to stderr so that ``--json`` output on stdout stays clean; disabled
    when not on a terminal.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled or not err_console.is_terminal,
        transient=False,
    )
