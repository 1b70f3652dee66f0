"""Choosing the accelerator: KVM only where a real guest boots under it.

``/dev/kvm`` existing is not enough: on the machines kura is developed on it is
a nested ``kvm_pvm`` device on which a guest with no OS starts but a stock
Debian kernel fails ("KVM internal error"). So the lab boots the real guest
kernel once under KVM with ``kura.probe=1`` (the guest prints
``KURA-PROBE-OK`` and powers off at once) and uses KVM only if that marker
appears; otherwise every lab VM runs under TCG. The answer is cached per guest
image and host kernel in the guest cache (``probe-<key>.json``).
``KURA_LAB_ACCEL=kvm|tcg`` overrides the probe.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from kura.errors import LabError
from kura.lab.guestimage import GuestImage

PROBE_TIMEOUT = 20.0
MARKER = b"KURA-PROBE-OK"


def _boots_under_kvm(image: GuestImage) -> bool:
    if not os.path.exists("/dev/kvm"):
        return False
    with tempfile.TemporaryDirectory(prefix="kura-probe-") as tmp:
        out = Path(tmp) / "serial.log"
        proc = subprocess.Popen(
            ["qemu-system-x86_64", "-accel", "kvm", "-m", "128", "-display", "none",
             "-no-reboot", "-monitor", "none", "-serial", f"file:{out}", "-nodefaults",
             "-kernel", str(image.kernel), "-initrd", str(image.initrd),
             "-append", "console=ttyS0 quiet kura.probe=1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + PROBE_TIMEOUT
        try:
            while time.monotonic() < deadline:
                if out.exists() and MARKER in out.read_bytes():
                    return True
                if proc.poll() is not None:
                    return out.exists() and MARKER in out.read_bytes()
                time.sleep(0.1)
            return False
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def probe_accel(image: GuestImage, cache: Path) -> str:
    """``kvm`` or ``tcg`` for lab VMs on this host (cached)."""
    forced = os.environ.get("KURA_LAB_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise LabError(f"KURA_LAB_ACCEL must be kvm or tcg, not {forced!r}")
        return forced
    record = cache / f"probe-{image.key}.json"
    release = os.uname().release
    try:
        data = json.loads(record.read_text())
        if data.get("host_kernel") == release and data.get("accel") in ("kvm", "tcg"):
            return str(data["accel"])
    except (OSError, ValueError):
        pass
    accel = "kvm" if _boots_under_kvm(image) else "tcg"
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"accel": accel, "host_kernel": release}))
    os.replace(tmp, record)
    return accel
