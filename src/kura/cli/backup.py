"""``kura backup`` and ``kura restore``: one command each for images and VMs.

These commands only parse options and dispatch: disk images to
``kura.cli.images``, VMs to ``kura.cli.vms``. Each of those modules owns its
half and exposes ``backup_*_command`` / ``restore_*_command`` functions.
"""

from __future__ import annotations

from pathlib import Path

import click

from kura.errors import UsageError


@click.command("backup")
@click.argument("vms", nargs=-1, metavar="[VM]...")
@click.option("--all", "all_vms", is_flag=True, help="Back up every VM on the node.")
@click.option("--connect", "-c", default="qemu:///system", show_default=True, metavar="URI",
              help="libvirt URI of the node that runs the VMs.")
@click.option("--image", type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Back up a raw or qcow2 disk image file instead of a VM.")
@click.option("--name", metavar="NAME", help="Name of the image's restore points (with --image).")
@click.option("--consistency", type=click.Choice(["require", "prefer", "off"]), default="prefer",
              show_default=True,
              help="Guest filesystem freeze through the guest agent: require it, prefer it "
                   "(fall back to crash-consistent), or skip it.")
@click.option("--full", is_flag=True, help="Take a full backup even if an incremental is possible.")
@click.pass_context
def backup(ctx: click.Context, vms: tuple[str, ...], all_vms: bool, connect: str,
           image: Path | None, name: str | None, consistency: str, full: bool) -> None:
    """Back up VMs (running, paused or shut off) or a disk image file.

    \b
    Examples:
      kura backup web01 db01            # VMs on this node, incremental when possible
      kura backup --all --connect qemu+tcp://node-a/system
      kura backup --image base.qcow2 --name debian-template
    """
    if image is not None:
        if vms or all_vms:
            raise UsageError("--image backs up one image file; do not name VMs with it")
        from kura.cli import images

        images.backup_image_command(ctx, image=image, name=name, full=full)
        return
    if not vms and not all_vms:
        raise UsageError("name one or more VMs, or use --all, or --image FILE")
    from kura.cli import images
    from kura.hypervisor import guard

    guard.prestart(connect)  # the guard of the first running VM comes up meanwhile
    try:
        repo = images.open_repo_soon(ctx)  # the key derivation overlaps the imports below
        from kura.cli import vms as vms_cli

        vms_cli.backup_vms_command(ctx, vms=list(vms), all_vms=all_vms, connect=connect,
                                   consistency=consistency, full=full, repo=repo)
    finally:
        guard.discard_spares()


@click.command("restore")
@click.argument("ref", metavar="NAME[@ID]")
@click.option("--output", "-o", type=click.Path(path_type=Path), metavar="FILE",
              help="Write one disk to FILE (raw, sparse unless --format qcow2); through a "
                   "server, an absolute path on the node that restores.")
@click.option("--disk", metavar="DEV", help="Which disk of a VM restore point (e.g. vda).")
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default=None,
              help="Format of restored disks (default: as backed up; raw for --output).")
@click.option("--as", "new_name", metavar="NEWNAME",
              help="Restore the VM under a new name and a new UUID.")
@click.option("--target-dir", type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Directory for the restored VM's disks (default: where they were).")
@click.option("--connect", "-c", default="qemu:///system", show_default=True, metavar="URI",
              help="libvirt URI of the node to restore the VM on.")
@click.option("--start", is_flag=True, help="Start the VM once restored.")
@click.option("--force", is_flag=True, help="Overwrite existing (stopped) disks and definition.")
@click.pass_context
def restore(ctx: click.Context, ref: str, output: Path | None, disk: str | None,
            fmt: str | None, new_name: str | None, target_dir: Path | None, connect: str,
            start: bool, force: bool) -> None:
    """Restore a whole VM, one disk of it, or an image, from a restore point.

    NAME is a VM or image name (or VM UUID); @ID picks a restore point (a unique
    prefix is enough); without it the latest one is used. Every byte written is
    checked against its chunk id.

    \b
    Examples:
      kura restore debian-template --output /tmp/t.raw
      kura restore web01 --as web01-test --target-dir /var/lib/libvirt/images
      kura restore web01@2026 --disk vdb --output /tmp/vdb.raw
    """
    from kura.cli import images

    target = images.resolve_restore_target(ctx, ref)
    if target.is_image:
        if output is None:
            raise UsageError("restoring an image needs --output FILE")
        images.restore_image_command(ctx, target, output=output, fmt=fmt or "raw", force=force)
        return
    from kura.cli import vms as vms_cli

    vms_cli.restore_vm_command(ctx, target, output=output, disk=disk, fmt=fmt,
                               new_name=new_name, target_dir=target_dir, connect=connect,
                               start=start, force=force)


def register(cli: click.Group) -> None:
    cli.add_command(backup)
    cli.add_command(restore)
