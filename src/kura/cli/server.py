"""``kura server`` (run the server, manage tokens) and the client side of the CLI.

``kura server [--listen ...]`` runs the server in the foreground;
``kura server token create|list|revoke`` and ``kura server agent list|revoke``
work on the catalog directly (run them on the server host as the
administrator: that is how the first admin token is made). The ``remote_*``
functions are what the standalone commands (``ls``,
``snapshots``, ``restore``, ``prune``, ``repo verify``) call when
``KURA_SERVER``/``--server`` is set; :func:`server_client` builds the client
from ``--server``/``--token``/``--ca`` or ``KURA_SERVER``/``KURA_TOKEN``/
``KURA_CA``.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from kura.cli.common import (
    DEFAULT_REPO,
    console,
    emit_json,
    human_bytes,
    read_passphrase,
    state,
    table,
)
from kura.errors import KuraError, RepositoryNotFound, UsageError
from kura.repository import Repository
from kura.server import DEFAULT_LISTEN, DEFAULT_STATE_DIR, ROLES

# The server stack (FastAPI, SQLAlchemy, pydantic models) takes most of a second
# to import: every command would pay it at start-up, so the functions that need
# it import it themselves and only type checkers see it here.
if TYPE_CHECKING:
    from kura.catalog import Catalog
    from kura.server import schemas
    from kura.server.client import ServerClient

log = logging.getLogger(__name__)

MIN_FREE = 1 << 30  # pre-flight: warn below 1 GiB free in the repository


def server_options(f: Any) -> Any:
    """--server/--token/--ca, stored on the CLI state for :func:`server_client`."""
    def store(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            state(ctx).extra[str(param.name)] = value
        return value

    f = click.option("--ca", type=click.Path(path_type=Path, dir_okay=False), expose_value=False,
                     callback=store, help="The server's CA certificate (env KURA_CA).")(f)
    f = click.option("--token", expose_value=False, callback=store, metavar="TOKEN",
                     help="API token (env KURA_TOKEN; prefer the env: arguments are visible "
                          "to other users).")(f)
    f = click.option("--server", expose_value=False, callback=store, metavar="URL",
                     help="kura server URL (env KURA_SERVER).")(f)
    return f


def server_client(ctx: click.Context | None = None) -> ServerClient:
    from kura.server.client import from_env

    extra = state(ctx).extra
    return from_env(extra.get("server"), extra.get("token"), extra.get("ca"))


def remote_enabled(ctx: click.Context | None = None) -> bool:
    """True when the CLI should talk to a server instead of working standalone."""
    return bool(state(ctx).extra.get("server") or os.environ.get("KURA_SERVER"))


# ---- the server itself ----------------------------------------------------

def _open_repo(location: str, create: bool) -> Repository:
    st = state()
    try:
        needs = Repository.needs_passphrase(location)
        repo = Repository.open(location, passphrase=read_passphrase(st) if needs else None)
    except RepositoryNotFound:
        if not create:
            raise
        repo = Repository.init(location, passphrase=read_passphrase(st, confirm=True))
        log.warning("created a new repository at %s", location)
    return repo


@click.group("server", invoke_without_command=True)
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, metavar="HOST:PORT",
              help="Address to listen on (HTTPS).")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="TLS files and the default catalog live here.")
@click.option("--catalog", metavar="PATH|URL",
              help="Catalog: SQLite file or postgresql:// URL (default STATE_DIR/catalog.db).")
@click.option("--repo", "repo_opt", metavar="PATH", help="Repository (default: global --repo, "
              f"KURA_REPO, or {DEFAULT_REPO}); created on first start if missing.")
@click.option("--tls-cert", type=click.Path(path_type=Path, dir_okay=False),
              help="Use this certificate instead of the server's own CA.")
@click.option("--tls-key", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--tls-ca", type=click.Path(path_type=Path, dir_okay=False),
              help="CA that clients should trust with --tls-cert.")
@click.option("--name", "names", multiple=True, metavar="HOST",
              help="Extra host name or address for the certificate (repeatable).")
@click.option("--dead-after", type=float, default=45.0, show_default=True,
              help="Seconds of silence after which an agent's node is unreachable.")
@click.option("--data-listen", default="auto", show_default=True, metavar="HOST:PORT|auto|off",
              help="Data port for the agents' chunk uploads (TLS, same certificate); auto: "
                   "the --listen address with the next port. off: chunks go over HTTPS "
                   "(slower).")
@click.pass_context
def server(ctx: click.Context, listen: str, state_dir: Path, catalog: str | None,
           repo_opt: str | None, tls_cert: Path | None, tls_key: Path | None,
           tls_ca: Path | None, names: tuple[str, ...], dead_after: float,
           data_listen: str) -> None:
    """Run the kura server: catalog, scheduler, job engine and HTTPS API.

    On first start it creates its own CA and certificate in STATE_DIR. Make the
    first admin token with `kura server token create --role admin` on this host.

    \b
    Examples:
      KURA_PASSPHRASE=... kura server --listen 127.0.0.1:8443 --repo /srv/kura
      kura server token create --role agent --cluster lab
    """
    st = state(ctx)
    st.extra.update(state_dir=state_dir, catalog=catalog)
    if ctx.invoked_subcommand is not None:
        return
    from kura.server.repo_storage import RepositoryStorage
    from kura.server.serve import (
        ServerConfig,
        build_context,
        data_address,
        parse_listen,
        serve,
    )

    cfg = ServerConfig(listen=listen, state_dir=state_dir, catalog=catalog, tls_cert=tls_cert,
                       tls_key=tls_key, tls_ca=tls_ca, dead_after=dead_after,
                       extra_names=names, data_listen=data_listen)
    repo = _open_repo(repo_opt or st.repo_location, create=True)
    storage = RepositoryStorage(repo)

    def checks() -> list[dict[str, Any]]:
        free = storage.free_bytes()
        out: list[dict[str, Any]] = [{"check": "repository credentials", "ok": True,
                                      "detail": f"repository {storage.location} is open"}]
        if free is not None:
            out.append({"check": "repository room", "ok": free >= MIN_FREE,
                        "detail": f"{human_bytes(free)} free in {storage.location}"})
        return out

    context, files = build_context(cfg, repo, checks)
    where = data_address(cfg, parse_listen(listen)[1])
    data = "off" if where is None else f"{where[0]}:{where[1]}"
    console.print(f"kura server: https://{listen}  data port: {data}  CA fingerprint "
                  f"{context.ca_fingerprint}", highlight=False)
    serve(cfg, context, files)


def _catalog(ctx: click.Context) -> tuple[Catalog, str]:
    from kura.catalog import Catalog
    from kura.server.tls import fingerprint

    extra = state(ctx).extra
    state_dir: Path = extra.get("state_dir") or DEFAULT_STATE_DIR
    catalog = Catalog.open(extra.get("catalog") or str(state_dir / "catalog.db"))
    ca = state_dir / "ca.pem"
    if not ca.exists():
        raise UsageError(f"no server CA in {state_dir}",
                         hint="start `kura server` once, or give --state-dir")
    return catalog, fingerprint(ca.read_bytes())


@server.group("token")
def token() -> None:
    """Create, list and revoke API and enrolment tokens (on the server host)."""


@token.command("create")
@click.option("--role", type=click.Choice(list(ROLES)), required=True,
              help="admin, operator, read-only, or agent (a one-time enrolment token).")
@click.option("--name", default="", help="A note saying what the token is for.")
@click.option("--cluster", default=None, help="Cluster the enrolling agent joins (agent role).")
@click.option("--ttl", type=float, default=None, metavar="HOURS",
              help="Lifetime in hours (agent tokens default to 24 h).")
@click.pass_context
def token_create(ctx: click.Context, role: str, name: str, cluster: str | None,
                 ttl: float | None) -> None:
    """Create a token and print it once (only a hash is stored)."""
    if role != "agent" and cluster:
        raise UsageError("--cluster applies to agent enrolment tokens only")
    if ttl is None and role == "agent":
        ttl = 24.0
    from kura.server.auth import create_token

    catalog, fp = _catalog(ctx)
    with catalog.session() as s:
        new = create_token(s, role, name=name, cluster=cluster,
                           ttl=timedelta(hours=ttl) if ttl else None, ca_fingerprint=fp)
    if state(ctx).json:
        emit_json({"id": new.id, "role": role, "token": new.secret, "ca_fingerprint": fp})
        return
    click.echo(new.secret)
    click.echo(f"# role {role}, id {new.id}; CA fingerprint (SHA-256) {fp}", err=True)
    if role == "agent":
        click.echo(f"# on the node: kura agent --server https://THIS-HOST:PORT --token "
                   f"<the token above>  (cluster {cluster or 'default'})", err=True)


@token.command("list")
@click.pass_context
def token_list(ctx: click.Context) -> None:
    from sqlalchemy import select

    from kura.catalog import Token

    catalog, _ = _catalog(ctx)
    with catalog.session() as s:
        rows = [(t.id, t.role, t.name, t.cluster or "", t.created.strftime("%Y-%m-%d %H:%M"),
                 t.expires.strftime("%Y-%m-%d %H:%M") if t.expires else "never",
                 "revoked" if t.revoked else ("used" if t.used else "active"))
                for t in s.scalars(select(Token).order_by(Token.created))]
    if state(ctx).json:
        emit_json([dict(zip(("id", "role", "name", "cluster", "created", "expires", "state"),
                            r, strict=True)) for r in rows])
        return
    table("tokens", ("id", "role", "name", "cluster", "created", "expires", "state"), rows)


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(ctx: click.Context, token_id: str) -> None:
    from kura.catalog import Token

    catalog, _ = _catalog(ctx)
    with catalog.session() as s:
        tok = s.get(Token, token_id)
        if tok is None:
            raise UsageError(f"no token with id {token_id}", hint="see `kura server token list`")
        tok.revoked = True
    click.echo(f"token {token_id} revoked")


@server.group("agent")
def agent_group() -> None:
    """List enrolled agents; revoke a node's agent credential (on the server host)."""


@agent_group.command("list")
@click.pass_context
def agent_list(ctx: click.Context) -> None:
    from sqlalchemy import select

    from kura.catalog import Agent

    catalog, _ = _catalog(ctx)
    with catalog.session() as s:
        rows = [(a.node.cluster.name, a.node.name, a.id, a.version or "-",
                 a.last_seen.strftime("%Y-%m-%d %H:%M:%S") if a.last_seen else "never",
                 "revoked" if a.revoked else "active")
                for a in s.scalars(select(Agent).order_by(Agent.node_id))]
    if state(ctx).json:
        emit_json([dict(zip(("cluster", "node", "id", "version", "last_seen", "state"), r,
                            strict=True)) for r in rows])
        return
    table("agents", ("cluster", "node", "id", "version", "last seen", "state"), rows)


@agent_group.command("revoke")
@click.argument("node")
@click.option("--cluster", default=None, help="The node's cluster (when names repeat).")
@click.pass_context
def agent_revoke(ctx: click.Context, node: str, cluster: str | None) -> None:
    """Revoke NODE's agent credential (takes effect within seconds); enrol again to undo."""
    from sqlalchemy import select

    from kura.catalog import Agent

    catalog, _ = _catalog(ctx)
    with catalog.session() as s:
        hits = [a for a in s.scalars(select(Agent))
                if a.node.name == node and (cluster is None or a.node.cluster.name == cluster)]
        if not hits:
            raise UsageError(f"no agent for node {node!r}", hint="see `kura server agent list`")
        if len(hits) > 1:
            raise UsageError(f"node {node!r} exists in several clusters", hint="add --cluster")
        hits[0].revoked = True
    click.echo(f"agent of node {node} revoked")


# ---- client side: the standalone commands through a server -----------------

def print_inventory(inv: schemas.Inventory) -> None:
    for c in inv.clusters:
        console.print(f"[bold]cluster {c.name}[/bold]", highlight=False)
        for n in c.nodes:
            mark = {"online": "[green]online[/green]", "unreachable": "[red]UNREACHABLE[/red]",
                    "never-seen": "[yellow]never seen[/yellow]"}[n.status]
            console.print(f"  node {n.name}  {mark}  {n.uri}", highlight=False)
            store = n.config_store
            if store:
                console.print(f"    configuration store: {store.get('path', '?')} "
                              f"({store.get('domains', '?')} domains)", highlight=False)
            for v in n.vms:
                reach = "" if v.reachable else "  [red](unreachable)[/red]"
                tags = f"  tags {','.join(v.tags)}" if v.tags else ""
                console.print(f"    vm {v.name}  {v.state}  {v.uuid}{tags}{reach}",
                              highlight=False)
                for d in v.disks:
                    console.print(f"      disk {d.target}  {human_bytes(d.size)}  {d.format}  "
                                  f"{d.path}  [{d.storage}: {d.storage_path}]", highlight=False)


def remote_ls(ctx: click.Context) -> None:
    with server_client(ctx) as c:
        inv = c.inventory()
    if state(ctx).json:
        emit_json(inv.model_dump(mode="json"))
    else:
        print_inventory(inv)


def remote_snapshots(ctx: click.Context, source: str | None) -> None:
    with server_client(ctx) as c:
        snaps = c.snapshots(source)
    if state(ctx).json:
        emit_json([s.model_dump(mode="json") for s in snaps])
        return
    table("restore points", ("id", "source", "created", "node", "kind", "consistency", "size"),
          [(s.id, s.source, s.created.strftime("%Y-%m-%d %H:%M:%S"), s.node, s.kind,
            s.consistency, human_bytes(s.size)) for s in snaps])


def remote_prune(ctx: click.Context, retention: schemas.Retention, source: str | None,
                 dry_run: bool) -> None:
    with server_client(ctx) as c:
        from kura.server import schemas

        res = c.prune(schemas.PruneRequest(retention=retention, source=source, dry_run=dry_run))
    if state(ctx).json:
        emit_json(res.model_dump())
    else:
        click.echo(f"{res.message}: kept {res.data.get('kept')}, removed {res.data.get('removed')}")


def remote_verify(ctx: click.Context) -> None:
    with server_client(ctx) as c:
        res = c.verify()
    if state(ctx).json:
        emit_json(res.model_dump())
        return
    damaged = res.data.get("damaged") or []
    click.echo(f"verified {len(res.data.get('snapshots', []))} restore points: "
               f"{'ok' if not damaged else f'{len(damaged)} problems'}")
    if damaged:
        raise KuraError("the repository has damaged restore points",
                        hint="see `kura repo verify --json` on the server")


def remote_restore(ctx: click.Context, req: schemas.RestoreRequest, *, wait: bool = True) -> None:
    with server_client(ctx) as c:
        run = c.restore(req)
        click.echo(f"restore run {run.id} started on {run.vms[0].node if run.vms else '?'}",
                   err=True)
        if wait:
            follow_run(ctx, c, run.id)


def follow_run(ctx: click.Context, c: ServerClient, run_id: int, *,
               poll: float = 1.0) -> schemas.RunOut:
    """Print a run's log lines as they come, until it ends; returns the final run."""
    seen = 0
    while True:
        lg = c.run_log(run_id)
        for line in lg.lines[seen:]:
            if not state(ctx).json:
                print_log_line(line)
        seen = len(lg.lines)
        if lg.run.status != "running":
            return lg.run
        time.sleep(poll)


def print_log_line(line: schemas.LogLineOut) -> None:
    style = {"error": "red", "warning": "yellow"}.get(line.level, "")
    text = f"{line.ts.strftime('%H:%M:%S')} {line.message}"
    console.print(f"[{style}]{text}[/{style}]" if style else text, highlight=False,
                  markup=bool(style))


def register(cli: click.Group) -> None:
    cli.add_command(server)
