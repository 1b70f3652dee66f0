"""The exception tree of kura.

Library code raises these; only the CLI entry point (``kura.cli.main``) turns
them into one line on stderr and an exit code, and the job layer records them in
the job log. Every message is written for an administrator: it names what is
wrong, where, and what to do about it.

    KuraError                      exit 1
    ├── UsageError                 exit 2   bad arguments or options
    ├── RepositoryError            exit 3
    │   ├── RepositoryNotFound         no repository at that location
    │   ├── RepositoryExists           init over an existing repository
    │   ├── UnsupportedFormat          written by a newer kura / unknown version
    │   ├── WrongPassphrase            key cannot be unwrapped
    │   ├── IntegrityError             a chunk, index or manifest fails its check
    │   ├── SnapshotNotFound           no such restore point
    │   ├── LockedError                another writer holds the lock
    │   └── StorageFull                no space left on the repository's storage
    ├── HypervisorError            exit 4   libvirt / QEMU / NBD failures
    │   ├── DomainNotFound
    │   ├── GuestAgentError            guest agent absent, hung or refusing
    │   ├── CheckpointError            checkpoint/bitmap cannot be used
    │   └── MigratedError              the VM moved to another node mid-job
    ├── LabError                   exit 5   the lab cluster cannot be built/run
    ├── ServerError                exit 6   talking to the kura server failed
    │   └── AuthError                  missing/wrong credentials or role
    └── Interrupted                exit 130 the user pressed Ctrl-C
"""

from __future__ import annotations


class KuraError(Exception):
    """Base of all errors kura reports to users."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} ({self.hint})"
        return self.message


class UsageError(KuraError):
    exit_code = 2


class RepositoryError(KuraError):
    exit_code = 3


class RepositoryNotFound(RepositoryError):
    pass


class RepositoryExists(RepositoryError):
    pass


class UnsupportedFormat(RepositoryError):
    pass


class WrongPassphrase(RepositoryError):
    pass


class IntegrityError(RepositoryError):
    pass


class SnapshotNotFound(RepositoryError):
    pass


class LockedError(RepositoryError):
    pass


class StorageFull(RepositoryError):
    pass


class HypervisorError(KuraError):
    exit_code = 4


class DomainNotFound(HypervisorError):
    pass


class GuestAgentError(HypervisorError):
    pass


class CheckpointError(HypervisorError):
    pass


class MigratedError(HypervisorError):
    pass


class LabError(KuraError):
    exit_code = 5


class ServerError(KuraError):
    exit_code = 6


class AuthError(ServerError):
    pass


class Interrupted(KuraError):
    exit_code = 130
