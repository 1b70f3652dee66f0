"""``kura lab``: bring the lab cluster up, look at it, move VMs, take it down.

A thin layer over :class:`kura.lab.Lab`; the lab is chosen by ``--lab-dir``
(env ``KURA_LAB_DIR``, default ``/var/lib/kura/lab``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from kura.cli.common import console, emit_json, err_console, state, table
from kura.errors import LabError, UsageError
from kura.lab import DiskSpec, Lab, host
from kura.lab.lab import default_root
from kura.lab.verify import verify_image

_DIR_HELP = "Lab root directory (env KURA_LAB_DIR; default /var/lib/kura/lab)."


def _root(ctx: click.Context) -> Path:
    value = state(ctx).extra.get("lab_dir")
    return Path(value) if value else default_root()


def _existing(ctx: click.Context) -> Lab:
    root = _root(ctx)
    lab = Lab.existing(root)
    if lab is None:
        raise LabError(f"there is no lab at {root}", hint="run `kura lab up` first")
    return lab


# Commands that pass on an exit status raise SystemExit, not click's Exit:
# ``kura.cli.main.main`` runs click with standalone_mode=False, in which click
# turns an Exit into a return value that main() does not use (so the process
# would exit 0).


def _progress_printer(quiet: bool) -> Any:
    start = time.monotonic()

    def show(msg: str) -> None:
        if not quiet:
            err_console.print(f"[dim]{time.monotonic() - start:5.1f}s[/dim] {msg}",
                              highlight=False)
    return show


def _json_flag(f: Any) -> Any:
    """A per-command ``--json`` (same as the global ``kura --json``)."""
    def set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            state(ctx).json = True
    return click.option("--json", "json_", is_flag=True, expose_value=False, callback=set_json,
                        is_eager=True, help="Machine-readable JSON output on stdout.")(f)


def _print_status(data: dict[str, Any]) -> None:
    console.print(f"lab {data['root']}  index {data['index']}  accel {data['accel']}  "
                  f"shared {data['shared_dir']}", highlight=False)
    table("Nodes", ["name", "uri", "up", "local storage"],
          [(n["name"], n["uri"], "yes" if n["up"] else "NO", n["local_dir"])
           for n in data["nodes"]])
    table("VMs", ["name", "node", "storage", "state", "disks"],
          [(v["name"], v["node"] or "-", v["storage"], v["state"], len(v["disks"]))
           for v in data["vms"]])


@click.group("lab")
@click.option("--lab-dir", type=click.Path(path_type=Path), envvar="KURA_LAB_DIR",
              help=_DIR_HELP)
@click.pass_context
def lab_group(ctx: click.Context, lab_dir: Path | None) -> None:
    """A real two-node KVM/libvirt cluster on this machine, for demos and tests.

    Nodes are libvirt daemons in their own namespaces on loopback addresses;
    VMs are tiny Debian-based guests with qemu-guest-agent and a workload.
    """
    st = state(ctx)
    if lab_dir is not None:
        st.extra["lab_dir"] = str(lab_dir)


@lab_group.command("up")
@click.option("--nodes", default=2, show_default=True, help="Number of nodes.")
@click.option("--vms", default=3, show_default=True,
              help="VMs to create the first time (one on local, the rest on shared storage).")
@click.option("--index", type=int, default=None, help="Lab index (addresses 127.0.INDEX.x).")
@_json_flag
@click.pass_context
def up_cmd(ctx: click.Context, nodes: int, vms: int, index: int | None) -> None:
    """Build (or recover) the lab and start its nodes and VMs."""
    st = state(ctx)
    host.require_host()  # before touching anything: a clear message when not root
    lab = Lab.create(_root(ctx), index=index)
    lab.progress = _progress_printer(st.json)
    lab.up(nodes=nodes, vms=vms)
    data = lab.status()
    if st.json:
        emit_json(data)
    else:
        _print_status(data)
        console.print(f"export KURA_SHARED_STORAGE={lab.shared_dir}", highlight=False)


@lab_group.command("status")
@_json_flag
@click.pass_context
def status_cmd(ctx: click.Context) -> None:
    """Show the lab's nodes and VMs."""
    data = _existing(ctx).status()
    if state(ctx).json:
        emit_json(data)
    else:
        _print_status(data)


@lab_group.command("migrate")
@click.argument("vm")
@click.option("--to", "to", required=True, metavar="NODE", help="Destination node.")
@click.option("--offline", is_flag=True,
              help="Quick migration: save, move (local disks too), restore.")
@_json_flag
@click.pass_context
def migrate_cmd(ctx: click.Context, vm: str, to: str, offline: bool) -> None:
    """Live-migrate VM to NODE (or quick-migrate it with --offline)."""
    lab = _existing(ctx)
    src = lab.vm(vm).node
    start = time.monotonic()
    lab.migrate(vm, to, offline=offline)
    took = time.monotonic() - start
    kind = "quick" if offline else "live"
    if state(ctx).json:
        emit_json({"vm": vm, "from": src, "to": to, "kind": kind, "seconds": round(took, 2)})
    else:
        console.print(f"{vm}: {kind} migration {src} -> {to} in {took:.1f} s", highlight=False)


@lab_group.command("move")
@click.argument("vm")
@click.option("--to", "to", required=True, metavar="NODE", help="Destination node.")
@_json_flag
@click.pass_context
def move_cmd(ctx: click.Context, vm: str, to: str) -> None:
    """Move a shut-off VM (definition and local disks) to NODE."""
    _existing(ctx).cold_move(vm, to)
    if not state(ctx).json:
        console.print(f"{vm}: moved to {to}", highlight=False)


def _disk_spec(text: str) -> DiskSpec:
    size, _, fmt = text.partition(":")
    return DiskSpec(size=size, fmt=fmt or "qcow2")


@lab_group.command("create")
@click.argument("vm")
@click.option("--node", default="node-a", show_default=True, help="Node to define it on.")
@click.option("--storage", type=click.Choice(["shared", "local"]), default="shared",
              show_default=True)
@click.option("--disk", "disks", multiple=True, metavar="SIZE[:raw]",
              help="A disk (repeat for vda, vdb, ...); default one 256M qcow2.")
@click.option("--uefi", is_flag=True, help="Boot through OVMF with a per-VM NVRAM.")
@click.option("--no-agent", is_flag=True, help="Without qemu-guest-agent.")
@click.option("--workload", is_flag=True, help="Run the file-writing workload from boot.")
@click.option("--tpm", is_flag=True, help="With an emulated TPM 2.0 (swtpm).")
@_json_flag
@click.pass_context
def create_cmd(ctx: click.Context, vm: str, node: str, storage: str, disks: tuple[str, ...],
               uefi: bool, no_agent: bool, workload: bool, tpm: bool) -> None:
    """Create and start a lab VM."""
    lab = _existing(ctx)
    specs = tuple(_disk_spec(d) for d in disks) or (DiskSpec(),)
    made = lab.create_vm(vm, node=node, storage=storage, disks=specs, agent=not no_agent,
                         workload=workload, uefi=uefi, tpm=tpm)
    if state(ctx).json:
        emit_json({"name": made.name, "uuid": made.uuid, "node": made.node,
                   "disks": [str(p) for p in made.disk_paths]})
    else:
        console.print(f"{made.name}: running on {made.node} ({storage} storage)",
                      highlight=False)


@lab_group.command("remove")
@click.argument("vm")
@_json_flag
@click.pass_context
def remove_cmd(ctx: click.Context, vm: str) -> None:
    """Destroy and undefine a lab VM and delete the disks the lab made for it."""
    _existing(ctx).remove_vm(vm)
    if not state(ctx).json:
        console.print(f"{vm}: removed", highlight=False)


@lab_group.command("exec")
@click.argument("vm")
@click.argument("command", nargs=-1, required=True)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait.")
@_json_flag
@click.pass_context
def exec_cmd(ctx: click.Context, vm: str, command: tuple[str, ...], timeout: float) -> None:
    """Run COMMAND in VM through the guest agent (kura lab exec VM -- CMD ARGS)."""
    code, out, err = _existing(ctx).vm(vm).agent_exec(list(command), timeout=timeout)
    if state(ctx).json:
        emit_json({"exit_code": code, "stdout": out, "stderr": err})
        return
    click.echo(out, nl=False)
    click.echo(err, nl=False, err=True)
    if code != 0:
        raise SystemExit(code)


@lab_group.command("node-exec", context_settings={"ignore_unknown_options": True,
                                                  "allow_interspersed_args": False})
@click.argument("node")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--cwd", metavar="DIR", help="Working directory as the node sees it (default /).")
@_json_flag
@click.pass_context
def node_exec_cmd(ctx: click.Context, node: str, command: tuple[str, ...],
                  cwd: str | None) -> None:
    """Run COMMAND on lab NODE, as an agent there would (kura lab node-exec NODE -- CMD ARGS).

    Options of node-exec go before NODE; everything after NODE is the command.

    The command runs in the node's mount and UTS namespaces: it sees the node's
    /var/lib/libvirt, /etc/libvirt and /run/libvirt, its hostname, and its
    libvirtd at qemu:///system; everything else (the lab root, /var/tmp, this
    kura, the environment) is as on the host. E.g.
    `kura lab node-exec node-a -- kura backup VM`.
    """
    if command[:1] == ("--",):  # click keeps a "--" that follows NODE
        command = command[1:]
    if not command:
        raise UsageError("no command given", hint="kura lab node-exec NODE -- CMD ARGS")
    lab = _existing(ctx)
    if state(ctx).json:
        proc = lab.node_run(node, list(command), cwd=cwd, capture_output=True, text=True,
                            check=False)
        emit_json({"node": node, "exit_code": proc.returncode, "stdout": proc.stdout,
                   "stderr": proc.stderr})
    else:
        proc = lab.node_run(node, list(command), cwd=cwd, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)


@lab_group.command("verify")
@click.argument("image", type=click.Path(path_type=Path, exists=True))
@click.option("--format", "fmt", type=click.Choice(["qcow2", "raw"]), default="qcow2",
              show_default=True)
@click.option("--boot", is_flag=True,
              help="Check inside a verifier guest of the lab instead of on the host.")
@_json_flag
@click.pass_context
def verify_cmd(ctx: click.Context, image: Path, fmt: str, boot: bool) -> None:
    """Check a disk written by the lab workload (e2fsck + every committed file)."""
    if boot:
        verdict = _existing(ctx).verify_disk(image, fmt=fmt, boot=True)
    else:
        verdict = verify_image(image, fmt=fmt)
    if state(ctx).json:
        emit_json(verdict.to_dict())
    else:
        mark = "[green]OK[/green]" if verdict.ok else "[red]FAILED[/red]"
        console.print(f"{mark} fsck clean: {verdict.fsck_clean}, last seq {verdict.last_seq}, "
                      f"{verdict.files_checked} files checked")
        for e in verdict.errors:
            console.print(f"  - {e}", highlight=False)
    if not verdict.ok:
        raise SystemExit(1)


@lab_group.command("down")
@_json_flag
@click.pass_context
def down_cmd(ctx: click.Context) -> None:
    """Stop every lab process (by PID) and remove the lab's files."""
    lab = Lab.remains(_root(ctx))
    if lab is None:
        if not state(ctx).json:
            console.print(f"no lab at {_root(ctx)}", highlight=False)
        return
    lab.progress = _progress_printer(state(ctx).json)
    lab.down()
    if state(ctx).json:
        emit_json({"down": str(lab.root)})


def register(cli: click.Group) -> None:
    cli.add_command(lab_group)
