"""Reading disks over NBD with libnbd.

Every disk kura backs up is read through an NBD export: libvirt's pull-mode
backup export of a running VM (a unix socket), or ``qemu-nbd`` serving an
image file read-only (for shut-off VMs and plain images). One reader serves
both, so the data path is the same whatever the source.

What to read comes from NBD *meta contexts*:

- ``base:allocation`` tells which ranges are holes or read as zeros; those
  are never read (and never stored: the index records them as zero chunks).
- ``qemu:dirty-bitmap:NAME`` tells which ranges changed since a checkpoint;
  an incremental backup reads only those.

Both are queried with ``block_status`` over the whole disk in large steps,
then turned into the list of fixed-size chunk indexes to read. Reading uses
libnbd's asynchronous API on one connection with several requests in flight,
and yields chunks in ascending order so the caller can stream them into the
repository with bounded memory.
"""

from kura.nbd.source import Extent, NbdSource, image_format

__all__ = ["Extent", "NbdSource", "image_format"]
