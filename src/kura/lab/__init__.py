"""kura's lab: a real KVM/QEMU cluster on one machine, for demos and tests.

The lab builds a cluster from real parts — two (or more) libvirt nodes, each a
``libvirtd`` in its own mount/UTS namespace listening on its own loopback
address; a shared storage directory both nodes see (the cluster-shared
volume) and a local directory per node; small Linux guests booted from a
kernel + initramfs that kura builds from Debian packages, with qemu-guest-agent
and a file-writing workload whose output can be checked for consistency.

Entry points:

* :class:`Lab` — ``Lab.create(root).up()``, ``create_vm``, ``migrate``,
  ``cold_move``, ``status``, ``verify_disk``, ``down``;
* :class:`LabVM` — one VM wherever it runs: ``domain()``, ``agent_exec``,
  workload control, ``write_pattern``, life cycle;
* :mod:`kura.lab.testing` — the pytest plugin (fixtures ``lab``, ``lab_vm``).

Modules: ``state`` (state file, lab indexes), ``host`` (packages, processes),
``guestimage`` (the guest build and cache), ``accel`` (KVM or TCG),
``node`` (libvirtd per node), ``domain`` (domain XML), ``vm`` (LabVM),
``verify`` (the host-side workload check), ``moves`` (live and quick
migration, cold move), ``lab`` (the cluster).
"""

from kura.lab.domain import DiskSpec
from kura.lab.lab import DEFAULT_ROOT, Lab
from kura.lab.node import LabNode
from kura.lab.verify import Verdict
from kura.lab.vm import LabVM

__all__ = ["DEFAULT_ROOT", "DiskSpec", "Lab", "LabNode", "LabVM", "Verdict"]
