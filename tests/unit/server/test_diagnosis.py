"""The job log's plain-language sentences for failures reported by agents."""

from __future__ import annotations

from kura.server.diagnosis import explain, retryable
from kura.server.schemas import ErrorInfo


def test_a_backup_that_gave_way_to_a_migration_says_so() -> None:
    err = ErrorInfo(kind="MigratedError", message=(
        "VM web1 migrated away from node-a during its backup; the backup gave way as soon "
        "as the migration asked for the VM (ended cleanly: no restore point, guest thawed)"))
    assert retryable(err)
    assert explain(err, "node-a") == (
        "VM migrated from node-a during backup; the backup on node-a gave way to the "
        "migration and ended cleanly (no restore point)")
    other = ErrorInfo(kind="MigratedError", message="VM web1 left node-a during the backup")
    assert "the backup on node-a was ended cleanly" in explain(other, "node-a")


def test_a_backup_that_gave_way_to_another_job_is_retried() -> None:
    err = ErrorInfo(kind="Cancelled", message="the backup of VM web1 on node-a gave way to a "
                    "snapshot job requested meanwhile (no restore point); it is retried")
    assert retryable(err)
