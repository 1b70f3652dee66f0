"""Plain-language diagnoses for the job log.

An agent reports a failure as an error *kind* (the kura.errors class name, or
one of the server's own: ``AgentLost``, ``AgentRestarted``, ``NodeUnreachable``,
``ServerRestarted``) plus the library's message. This module decides whether the
VM's backup is worth retrying and turns the facts into one sentence an
administrator can act on.
"""

from __future__ import annotations

from kura.server.schemas import ErrorInfo

# Failures that another attempt (maybe on another node) can cure.
RETRYABLE = frozenset({
    "MigratedError", "AgentLost", "AgentRestarted", "LockedError", "ServerError",
    "DomainNotFound", "ConnectionError", "Cancelled",
})


def retryable(err: ErrorInfo) -> bool:
    return err.kind in RETRYABLE


def explain(err: ErrorInfo, node: str) -> str:
    """One sentence for the job log, from an error reported by (or about) a node."""
    msg = err.message.rstrip(".")
    if err.kind == "MigratedError":
        where = f" to {err.moved_to}" if err.moved_to else ""
        how = "gave way to the migration and ended" if "gave way" in msg else "was ended"
        return f"VM migrated from {node}{where} during backup; the backup on {node} {how} " \
               f"cleanly (no restore point)"
    if err.kind == "AgentLost":
        return f"lost contact with the agent on {node}: {msg}"
    if err.kind == "AgentRestarted":
        return f"the agent on {node} restarted while it was backing up this VM"
    if err.kind == "GuestAgentError":
        return f"guest agent problem on {node}: {msg}"
    if err.kind == "LockedError":
        return f"another backup of this VM holds its lock: {msg}"
    if err.kind == "DomainNotFound":
        return f"the VM is not on {node} any more: {msg}"
    text = f"{err.kind} on {node}: {msg}" if node else f"{err.kind}: {msg}"
    if err.hint:
        text += f" ({err.hint})"
    return text


def consistency_note(consistency: str, wanted: str, warnings: list[str]) -> str:
    """A diagnosis for a backup that succeeded below the consistency it aimed for."""
    if consistency == "crash" and wanted == "prefer":
        why = next((w for w in warnings if "guest agent" in w.lower()), "")
        return (why.rstrip(".") + "; " if why else "guest filesystems were not frozen; ") + \
            "backed up crash-consistent"
    return ""
