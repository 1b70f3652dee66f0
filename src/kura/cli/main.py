"""Entry point of the ``kura`` command: global options, command registration,
and the one place where errors become exit codes.

Command modules are imported when their command runs, not at start-up: a
``kura backup`` does not pay for the lab, server, agent and job modules
(about a quarter of the start-up CPU). ``--help`` imports them all.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import click

from kura import __version__
from kura.cli.common import CliState, err_console, print_error
from kura.errors import Interrupted, KuraError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

# The module of ``kura.cli`` that defines each top-level command (its ``register``
# adds it), in the order they are registered when every command is wanted.
_MODULES = ("repo", "backup", "images", "lab", "vms", "server", "agent", "jobs")
_COMMANDS = {"repo": "repo", "backup": "backup", "restore": "backup", "snapshots": "images",
             "prune": "images", "lab": "lab", "ls": "vms", "server": "server", "agent": "agent",
             "job": "jobs"}
# Commands to which ``jobs.register`` adds a server mode: it must run after their module.
_SERVER_MODE = {"repo", "restore", "snapshots", "prune", "ls", "job"}


class _LazyGroup(click.Group):
    """A group whose commands are registered when they are first asked for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loaded: set[str] = set()

    def _load(self, name: str, *, again: bool = False) -> None:
        if name in self._loaded and not again:
            return
        self._loaded.add(name)
        try:
            module = importlib.import_module(f"kura.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"kura.cli.{name}":
                return  # command group not built yet
            raise
        module.register(self)

    def load_all(self) -> None:
        for name in _MODULES:
            self._load(name)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = _COMMANDS.get(cmd_name)
        if module is not None:
            self._load(module)
        if cmd_name in _SERVER_MODE:
            self._load("jobs", again=True)  # idempotent: wraps what is not wrapped yet
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_all()
        return super().list_commands(ctx)


@click.group(cls=_LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="kura")
@click.option("--json", "json_", is_flag=True, help="Machine-readable JSON output on stdout.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--repo", envvar="KURA_REPO", metavar="PATH",
              help="Repository location (env KURA_REPO; default /var/lib/kura/repo).")
@click.option("--passphrase-file", envvar="KURA_PASSPHRASE_FILE",
              type=click.Path(path_type=Path), metavar="FILE",
              help="Read the repository passphrase from FILE (env KURA_PASSPHRASE_FILE; "
                   "or set KURA_PASSPHRASE).")
@click.pass_context
def cli(ctx: click.Context, json_: bool, verbose: int, repo: str | None,
        passphrase_file: Path | None) -> None:
    """kura — cluster-aware backup for KVM/QEMU virtual machines.

    Back up running and stopped VMs from every node of a libvirt cluster into a
    deduplicated, compressed, encrypted repository; keep incremental chains
    across live migration; restore whole VMs, single disks or disk images.
    """
    ctx.obj = CliState(json=json_, verbose=verbose, repo=repo, passphrase_file=passphrase_file)
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    try:
        # Without standalone mode click returns ctx.exit(N)'s code instead of
        # exiting; commands themselves return None.
        rv = cli.main(args=argv, prog_name="kura", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):
            return rv
    except click.exceptions.Abort:
        err_console.print("kura: interrupted")
        return Interrupted.exit_code
    except KeyboardInterrupt:
        err_console.print("kura: interrupted")
        return Interrupted.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except KuraError as exc:
        print_error(str(exc))
        return exc.exit_code
    except OSError as exc:
        # Anything the library did not translate: still one line, never a traceback.
        print_error(str(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
