"""Freezing a guest's filesystems through qemu-guest-agent, and always thawing.

An application-consistent backup freezes the guest's filesystems
(``guest-fsfreeze-freeze``: the guest flushes and blocks writers) for the
instant it takes QEMU to set up the point-in-time view, then thaws them.
The frozen window is timed and reported.

Hazards, and how each is handled:

- *Agent absent* (no channel, daemon not running): libvirt fails the freeze
  at once; :class:`GuestAgentError` says so and the engine applies the job's
  policy (``require`` fails the VM, ``prefer`` falls back to crash-consistent).
- *Agent hung*: libvirt would wait forever by default; the agent response
  timeout is set (``virDomainAgentSetResponseTimeout``) for the duration of
  the freeze, then reset to libvirt's default.
- *A freeze that is never thawed* hangs every writer in the guest. Thaw runs
  in ``finally`` on every path (errors, Ctrl-C, SIGTERM turned into an
  exception by the CLI), is retried, and is also guaranteed from outside the
  process: the job's :class:`~kura.hypervisor.guard.Guard` is told the
  deadline before the freeze starts and thaws by itself if the main thread
  has not reported a thaw by then, or if the kura process dies.
- A freeze whose reply is lost (timeout) may still have happened in the
  guest, so a failed freeze is followed by a best-effort thaw too.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import libvirt

from kura.errors import GuestAgentError
from kura.hypervisor.guard import Guard


class Quiescer:
    """Freeze/thaw one domain's guest filesystems, with timing.

    ``agent_timeout``: how long libvirt waits for any agent answer.
    ``max_frozen``: after this many seconds frozen, the guard thaws.
    """

    def __init__(self, dom: Any, guard: Guard | None, *, agent_timeout: int = 10,
                 max_frozen: float = 60.0) -> None:
        self.dom = dom
        self.guard = guard
        self.agent_timeout = agent_timeout
        self.max_frozen = max_frozen
        self.frozen = False
        self.frozen_since: float | None = None
        self.frozen_seconds: float = 0.0
        self.filesystems = 0

    def _set_timeout(self, seconds: int) -> None:
        # Older libvirt or no agent: the freeze itself will say so.
        with contextlib.suppress(libvirt.libvirtError):
            self.dom.agentSetResponseTimeout(seconds, 0)

    def freeze(self) -> int:
        """Freeze every guest filesystem; returns how many were frozen."""
        self._set_timeout(self.agent_timeout)
        if self.guard is not None:
            self.guard.frozen(self.max_frozen)
        start = time.monotonic()
        try:
            count = int(self.dom.fsFreeze(None, 0))
        except libvirt.libvirtError as exc:
            self._thaw_quietly()
            self._set_timeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT)
            raise GuestAgentError(_explain(exc), hint=_hint(exc)) from exc
        self.frozen = True
        self.frozen_since = start
        self.filesystems = count
        return count

    def thaw(self) -> float:
        """Thaw; returns the seconds the guest was frozen. Safe to call twice."""
        if not self.frozen:
            return self.frozen_seconds
        last: libvirt.libvirtError | None = None
        for attempt in range(3):
            try:
                self.dom.fsThaw(None, 0)
                last = None
                break
            except libvirt.libvirtError as exc:
                if "not frozen" in str(exc).lower():
                    last = None
                    break
                last = exc
                time.sleep(0.5 * (attempt + 1))
        self.frozen = False
        if self.frozen_since is not None:
            self.frozen_seconds = time.monotonic() - self.frozen_since
        if self.guard is not None and last is None:
            self.guard.thawed()
        self._set_timeout(libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_DEFAULT)
        if last is not None:
            raise GuestAgentError(
                f"the guest agent did not thaw the filesystems: {last}",
                hint="the backup guard keeps retrying; check the guest with "
                     "`virsh domfsinfo` / `virsh domfsthaw`",
            )
        return self.frozen_seconds

    def _thaw_quietly(self) -> None:
        try:
            self.dom.fsThaw(None, 0)
        except libvirt.libvirtError:
            return
        if self.guard is not None:
            self.guard.thawed()


def _explain(exc: libvirt.libvirtError) -> str:
    msg = str(exc)
    low = msg.lower()
    if "not connected" in low or "not configured" in low or "channel" in low:
        return f"the guest agent is not running in the VM ({msg})"
    if "not responding" in low or "timeout" in low or "timed out" in low:
        return f"the guest agent did not answer ({msg})"
    return f"the guest agent could not freeze the filesystems ({msg})"


def _hint(exc: libvirt.libvirtError) -> str:
    return ("install and start qemu-guest-agent in the guest, add an "
            "org.qemu.guest_agent.0 channel, or back up with --consistency prefer/off")
