"""``kura job ...``: job definitions, runs and their logs, through the server.

Every command here talks to the server given by ``--server``/``KURA_SERVER``
with ``--token``/``KURA_TOKEN``.

The standalone commands that make sense against a server (``ls``,
``snapshots``, ``restore``, ``prune``, ``repo verify``) are defined by their own
modules; :func:`register` (which runs last) gives each of them ``--server``,
``--token`` and ``--ca`` options and a thin dispatch: when a server is given
(option or ``KURA_SERVER``) the command goes to the server, otherwise it runs
standalone exactly as before. Their own code is untouched.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from kura.cli.common import console, emit_json, human_bytes, state, table
from kura.cli.server import (
    follow_run,
    print_log_line,
    remote_enabled,
    remote_ls,
    remote_prune,
    remote_restore,
    remote_snapshots,
    remote_verify,
    server_client,
    server_options,
)
from kura.errors import KuraError, UsageError

if TYPE_CHECKING:  # pydantic models: imported where used, to keep start-up fast
    from kura.server import schemas


@click.group("job")
@server_options
def job() -> None:
    """Define, run and inspect backup jobs on the kura server."""


@job.command("create")
@click.argument("name")
@click.option("--vm", "names", multiple=True, metavar="NAME|UUID", help="A VM (repeatable).")
@click.option("--glob", "globs", multiple=True, metavar="PATTERN",
              help="VM name pattern, e.g. 'web*' (repeatable).")
@click.option("--tag", "tags", multiple=True, help="VMs with this tag in their domain metadata.")
@click.option("--cluster", "clusters", multiple=True, help="Every VM of this cluster.")
@click.option("--all", "all_vms", is_flag=True, help="Every VM of every cluster.")
@click.option("--schedule", metavar="CRON", help="Cron schedule, e.g. '0 2 * * *'.")
@click.option("--consistency", type=click.Choice(["require", "prefer", "off"]),
              default="prefer", show_default=True)
@click.option("--keep-last", type=int)
@click.option("--keep-hourly", type=int)
@click.option("--keep-daily", type=int)
@click.option("--keep-weekly", type=int)
@click.option("--keep-monthly", type=int)
@click.option("--keep-yearly", type=int)
@click.option("--max-per-node", type=int, default=2, show_default=True)
@click.option("--max-total", type=int, default=4, show_default=True)
@click.option("--retries", type=int, default=2, show_default=True)
@click.option("--node-wait", type=float, default=600.0, show_default=True,
              help="Seconds a VM waits for its unreachable node before it fails.")
@click.pass_context
def create(ctx: click.Context, name: str, names: tuple[str, ...], globs: tuple[str, ...],
           tags: tuple[str, ...], clusters: tuple[str, ...], all_vms: bool,
           schedule: str | None, consistency: str, keep_last: int | None,
           keep_hourly: int | None, keep_daily: int | None, keep_weekly: int | None,
           keep_monthly: int | None, keep_yearly: int | None, max_per_node: int,
           max_total: int, retries: int, node_wait: float) -> None:
    """Create job NAME.

    \b
    Examples:
      kura job create nightly --all --schedule '0 2 * * *' --keep-daily 7 --keep-weekly 4
      kura job create web --glob 'web*' --tag prod --consistency require
    """
    if not (names or globs or tags or clusters or all_vms):
        raise UsageError("select VMs with --vm, --glob, --tag, --cluster or --all")
    from kura.server import schemas

    try:
        spec = schemas.JobSpec(
            name=name, schedule=schedule, consistency=consistency,  # type: ignore[arg-type]
            selection=schemas.Selection(names=list(names), globs=list(globs), tags=list(tags),
                                        clusters=list(clusters), all=all_vms),
            retention=schemas.Retention(keep_last=keep_last, keep_hourly=keep_hourly,
                                        keep_daily=keep_daily, keep_weekly=keep_weekly,
                                        keep_monthly=keep_monthly, keep_yearly=keep_yearly),
            max_per_node=max_per_node, max_total=max_total, retries=retries,
            node_wait=node_wait)
    except ValueError as exc:
        raise UsageError(f"invalid job: {exc}") from exc
    with server_client(ctx) as c:
        out = c.create_job(spec)
    if state(ctx).json:
        emit_json(out.model_dump(mode="json"))
    else:
        nxt = out.next_run.strftime("%Y-%m-%d %H:%M:%S UTC") if out.next_run else "manual only"
        click.echo(f"job {out.name} created; next run: {nxt}")


@job.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List jobs with their schedule and last run."""
    with server_client(ctx) as c:
        jobs = c.jobs()
    if state(ctx).json:
        emit_json([j.model_dump(mode="json") for j in jobs])
        return
    table("jobs", ("name", "schedule", "next run", "last run", "status"),
          [(j.name, j.spec.schedule or "-",
            j.next_run.strftime("%Y-%m-%d %H:%M") if j.next_run else "-",
            f"#{j.last_run.id} {j.last_run.started:%Y-%m-%d %H:%M}" if j.last_run else "-",
            j.last_run.status if j.last_run else "-") for j in jobs])


@job.command("show")
@click.argument("name")
@click.pass_context
def show(ctx: click.Context, name: str) -> None:
    """Show a job's definition and recent runs."""
    with server_client(ctx) as c:
        j = c.job(name)
        runs = c.runs(name, limit=10)
    if state(ctx).json:
        emit_json({"job": j.model_dump(mode="json"),
                   "runs": [r.model_dump(mode="json") for r in runs]})
        return
    console.print_json(j.spec.model_dump_json())
    table("recent runs", ("run", "kind", "trigger", "started", "status", "ok", "failed"),
          [(r.id, r.kind, r.trigger, f"{r.started:%Y-%m-%d %H:%M:%S}", r.status, r.vms_ok,
            r.vms_failed) for r in runs])


@job.command("delete")
@click.argument("name")
@click.pass_context
def delete(ctx: click.Context, name: str) -> None:
    """Delete a job definition (its runs and logs are kept)."""
    with server_client(ctx) as c:
        c.delete_job(name)
    click.echo(f"job {name} deleted")


def _finish(ctx: click.Context, run: schemas.RunOut) -> None:
    if state(ctx).json:
        emit_json(run.model_dump(mode="json"))
    else:
        _verdicts(run)
    if run.status != "succeeded":
        raise KuraError(f"run {run.id} {run.status}: {run.vms_failed} of {run.vms_total} "
                        f"VMs failed", hint=f"see `kura job log {run.id}`")


def _verdicts(run: schemas.RunOut) -> None:
    table(f"run {run.id} ({run.kind}): {run.status}",
          ("vm", "state", "node", "attempts", "kind", "consistency", "stored", "diagnosis"),
          [(v.vm_name, v.state, v.node, v.attempt, v.result.get("kind", ""),
            v.result.get("consistency", ""), human_bytes(v.result.get("bytes_stored")),
            v.diagnosis) for v in run.vms])


@job.command("run")
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="Start the run and return at once.")
@click.pass_context
def run_(ctx: click.Context, name: str, no_wait: bool) -> None:
    """Run a job now and follow its log."""
    with server_client(ctx) as c:
        run = c.run_job(name)
        click.echo(f"run {run.id} of job {name} started", err=True)
        if no_wait:
            return
        _finish(ctx, follow_run(ctx, c, run.id))


@job.command("test")
@click.argument("name")
@click.pass_context
def test(ctx: click.Context, name: str) -> None:
    """Pre-flight: check every selected VM without backing anything up.

    Each VM is looked up and reached through its node's agent; its guest agent,
    checkpoints, the repository's room and the credentials are checked; a
    verdict is printed per VM.
    """
    with server_client(ctx) as c:
        run = c.run_job(name, test=True)
        _finish(ctx, follow_run(ctx, c, run.id))


@job.command("log")
@click.argument("run_id", type=int)
@click.pass_context
def log_(ctx: click.Context, run_id: int) -> None:
    """Print a run's log: phases with timings, bytes, consistency, diagnoses."""
    with server_client(ctx) as c:
        lg = c.run_log(run_id)
    if state(ctx).json:
        emit_json(lg.model_dump(mode="json"))
        return
    r = lg.run
    click.echo(f"run {r.id} of job {r.job} ({r.kind}, {r.trigger}): {r.status}"
               f"{' — ' + r.reason if r.reason else ''}")
    for line in lg.lines:
        print_log_line(line)
    _verdicts(r)


@job.command("runs")
@click.argument("name", required=False)
@click.option("--limit", type=int, default=20, show_default=True)
@click.pass_context
def runs(ctx: click.Context, name: str | None, limit: int) -> None:
    """List recent runs (of one job, or of all)."""
    with server_client(ctx) as c:
        rs = c.runs(name, limit=limit)
    if state(ctx).json:
        emit_json([r.model_dump(mode="json") for r in rs])
        return
    table("runs", ("run", "job", "kind", "trigger", "started", "status", "ok", "failed"),
          [(r.id, r.job, r.kind, r.trigger, f"{r.started:%Y-%m-%d %H:%M:%S}", r.status,
            r.vms_ok, r.vms_failed) for r in rs])


@click.command("ls")
@server_options
@click.pass_context
def ls(ctx: click.Context) -> None:
    """Show the cluster inventory from the server: clusters, nodes, VMs, disks, storage."""
    remote_ls(ctx)


def _retention(kw: dict[str, Any]) -> schemas.Retention:
    from kura.server import schemas

    return schemas.Retention(**{k: kw.get(k) for k in schemas.Retention.model_fields})


def _remote_restore(ctx: click.Context, kw: dict[str, Any]) -> None:
    output = kw.get("output")
    if kw.get("disk") is not None and output is None:
        raise UsageError("--disk restores one disk to a file: add --output FILE")
    if output is not None and not str(output).startswith("/"):
        raise UsageError(f"through a server, --output is a path on the node that restores: "
                         f"give it absolute (not {output})")
    target = kw.get("target_dir")
    from kura.server import schemas

    remote_restore(ctx, schemas.RestoreRequest(
        ref=kw["ref"], node=kw.get("node"), new_name=kw.get("new_name"),
        target_dir=str(target) if target else None, disk=kw.get("disk"),
        output=str(output) if output is not None else None, format=kw.get("fmt"),
        start=bool(kw.get("start")), force=bool(kw.get("force"))))


REMOTE: dict[str, Callable[[click.Context, dict[str, Any]], None]] = {
    "ls": lambda ctx, kw: remote_ls(ctx),
    "snapshots": lambda ctx, kw: remote_snapshots(ctx, kw.get("name")),
    "prune": lambda ctx, kw: remote_prune(ctx, _retention(kw), kw.get("name"),
                                          bool(kw.get("dry_run"))),
    "restore": _remote_restore,
    "verify": lambda ctx, kw: remote_verify(ctx),
}


def _through_server(cmd: click.Command, name: str) -> None:
    """Give a standalone command a server mode (see the module docstring)."""
    local = cmd.callback
    if local is None or getattr(local, "_kura_remote", False):
        return
    server_options(cmd)  # appends --server/--token/--ca to cmd.params
    if name == "restore":
        cmd.params.append(click.Option(["--node"], metavar="NODE",
                                       help="With a server: the node whose agent restores "
                                            "(default: where the VM runs)."))

    @functools.wraps(local)
    def callback(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        if not remote_enabled(ctx):
            if name == "restore" and kwargs.pop("node", None):
                raise UsageError("--node needs a server (--server or KURA_SERVER)")
            return ctx.invoke(local, *args, **kwargs)
        if kwargs.get("json_"):
            state(ctx).json = True
        REMOTE[name](ctx, kwargs)
        return None

    callback._kura_remote = True  # type: ignore[attr-defined]
    cmd.callback = callback


def register(cli: click.Group) -> None:
    cli.add_command(job)
    if "ls" not in cli.commands:
        cli.add_command(ls)
    for name in ("ls", "snapshots", "prune", "restore"):
        cmd = cli.commands.get(name)
        if cmd is not None and cmd is not ls:
            _through_server(cmd, name)
    repo = cli.commands.get("repo")
    if isinstance(repo, click.Group) and "verify" in repo.commands:
        _through_server(repo.commands["verify"], "verify")
