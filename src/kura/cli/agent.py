"""``kura agent``: the node agent (enrol once, then serve the server's tasks)."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path
from types import FrameType

import click

from kura.cli.common import err_console
from kura.errors import KuraError
from kura.hypervisor.connection import open_connection

# Where an agent keeps its credential; kura.agent.enrol uses the same default.
# The agent modules themselves are imported when the command runs: they pull
# in the server's pydantic models, which would slow every kura command down.
DEFAULT_STATE_DIR = Path("/var/lib/kura/agent")

log = logging.getLogger(__name__)


@click.command("agent")
@click.option("--server", envvar="KURA_SERVER", required=True, metavar="URL",
              help="The kura server, e.g. https://backup.example:8443 (env KURA_SERVER).")
@click.option("--token", envvar="KURA_AGENT_TOKEN", metavar="TOKEN",
              help="One-time enrolment token (env KURA_AGENT_TOKEN); only needed once.")
@click.option("--connect", "-c", default="qemu:///system", show_default=True, metavar="URI",
              help="libvirt URI of this node.")
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False),
              help="The server's CA certificate (default: fetched and checked against the "
                   "fingerprint in the token).")
@click.option("--state-dir", type=click.Path(path_type=Path, file_okay=False),
              default=DEFAULT_STATE_DIR, show_default=True,
              help="Where the agent keeps its credential and the pinned CA.")
@click.option("--node", metavar="NAME", help="Node name (default: libvirt's host name).")
@click.option("--scratch-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Scratch directory for backup views (default: the engine's).")
@click.option("--libvirt-admin", metavar="URI",
              help="libvirt admin URI of this node's daemon, through which backups notice a "
                   "migration waiting for them and give way (default: libvirtd:///system or "
                   "virtqemud:///system when --connect is local; 'none' turns it off).")
@click.option("--heartbeat", type=float, default=5.0, show_default=True, metavar="SECONDS")
@click.option("--inventory-interval", type=float, default=15.0, show_default=True,
              metavar="SECONDS")
@click.option("--max-tasks", type=int, default=4, show_default=True,
              help="VMs this node backs up at once (the server's job limits apply too).")
@click.option("--data-port", type=click.IntRange(1, 65535), envvar="KURA_DATA_PORT",
              metavar="PORT", help="The server's data port as this node reaches it, on the "
              "--server host (default: the port the server names; set it when a port "
              "forward or NAT sits in between).")
def agent(server: str, token: str | None, connect: str, ca: Path | None, state_dir: Path,
          node: str | None, scratch_dir: Path | None, libvirt_admin: str | None,
          heartbeat: float, inventory_interval: float, max_tasks: int,
          data_port: int | None) -> None:
    """Run the kura agent of this node: report inventory, run dispatched backups.

    The first start enrols with a one-time token from `kura server token create
    --role agent`; later starts reuse the saved credential. The agent always
    connects out to the server and reconnects by itself after network or
    server failures.

    \b
    Example:
      kura agent --server https://10.0.0.5:8443 --token kura_... --connect qemu:///system
    """
    from kura.agent import enrol
    from kura.agent.engine_runner import EngineRunner
    from kura.agent.loop import Agent, AgentSettings
    from kura.hypervisor.jobwatch import default_admin_uri
    from kura.procmem import return_large_buffers

    if node is None:
        try:
            with open_connection(connect) as hv:
                node = hv.node.hostname
        except KuraError as exc:  # libvirt down now; the agent retries it later
            node = socket.gethostname()
            log.warning("cannot ask libvirt for the node name (%s); using %s", exc, node)
    creds = enrol.ensure_enrolled(state_dir, server, token, node=node, uri=connect, ca=ca)
    err_console.print(f"kura agent: node {creds.node} of cluster {creds.cluster}, "
                      f"server {creds.server}", highlight=False)
    client = creds.client()
    client.data_port = data_port
    return_large_buffers()
    settings = AgentSettings(heartbeat_interval=heartbeat, inventory_interval=inventory_interval,
                             max_tasks=max_tasks)
    admin = (None if libvirt_admin == "none"
             else libvirt_admin or default_admin_uri(connect))
    if admin is None:
        log.warning("backups will not give way early to a migration waiting for them "
                    "(no local libvirt admin socket; see --libvirt-admin)")
    runner = EngineRunner(connect, client, scratch_root=scratch_dir, admin_uri=admin)
    runner.jobwatch.drop_leftovers()
    worker = Agent(client, runner, settings)

    def stop(signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: stopping (running backups end cleanly)", signum)
        worker.stop()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    finally:
        worker.wait_idle(60)
        client.close()


def register(cli: click.Group) -> None:
    cli.add_command(agent)
