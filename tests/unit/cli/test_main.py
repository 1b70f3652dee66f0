"""The entry point: exit codes, one-line errors, and a light start-up."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator

import click
import pytest

from kura.cli.main import cli, main
from kura.errors import LabError


@pytest.fixture
def scratch_commands() -> Iterator[click.Group]:
    before = dict(cli.commands)
    yield cli
    cli.commands.clear()
    cli.commands.update(before)


def test_ctx_exit_code_is_the_exit_code(scratch_commands: click.Group) -> None:
    @scratch_commands.command("zz-exit")
    @click.pass_context
    def zz(ctx: click.Context) -> None:
        ctx.exit(3)

    assert main(["zz-exit"]) == 3
    assert main(["--version"]) == 0


def test_kura_errors_are_one_line_with_their_code(scratch_commands: click.Group,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    @scratch_commands.command("zz-fail")
    def zz() -> None:
        raise LabError("node node-a [down] " + "x" * 300, hint="run `kura lab up`")

    assert main(["zz-fail"]) == LabError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("kura: error: node node-a [down] ")  # not eaten as markup


def _imported(run: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter has imported after running ``run``."""
    code = f"import sys, kura.cli.main as m; {run}; print(sorted(n for n in {modules!r} " \
           "if n in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    return list(ast.literal_eval(out.strip().splitlines()[-1]))


def test_start_up_does_not_import_the_server_stack() -> None:
    assert _imported("pass", ("fastapi", "sqlalchemy", "uvicorn", "pydantic")) == []


def test_a_command_imports_only_its_own_modules() -> None:
    assert _imported("m.main(['backup', '--help'])",
                     ("kura.cli.lab", "kura.cli.server", "kura.cli.jobs", "kura.cli.agent",
                      "kura.lab")) == []


def test_commands_with_a_server_mode_get_it_however_they_are_reached(
        capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("ls", "snapshots", "prune", "restore"):
        assert main([name, "--help"]) == 0
        assert "--server" in capsys.readouterr().out, name
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(c in listing for c in ("backup", "lab", "server", "agent", "job", "repo"))
