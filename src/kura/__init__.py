"""kura (蔵, "storehouse"): cluster-aware backup for KVM/QEMU virtual machines.

Layers, each depending only on the ones before it:

- ``kura.errors``: the exception tree shared by every layer.
- ``kura.repository``: chunks, indexes, manifests, crypto, verify, prune, GC.
- ``kura.nbd``, ``kura.hypervisor``: reading disks over NBD, talking to libvirt
  and the guest agent.
- ``kura.engine``: backing up and restoring VMs and images on one node.
- ``kura.lab``: a real two-node KVM cluster on one machine, for demo and tests.
- ``kura.catalog``, ``kura.server``, ``kura.agent``: the site-wide service.
- ``kura.cli``: the ``kura`` command line.
"""

__version__ = "0.1.0"
