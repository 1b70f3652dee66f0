"""The job log and the options objects."""

from __future__ import annotations

import pytest

from kura.engine.backup import BackupOptions
from kura.engine.events import Event, JobLog
from kura.engine.restore import RestoreOptions
from kura.errors import UsageError


def test_phases_are_timed_and_forwarded() -> None:
    seen: list[Event] = []
    log = JobLog("web", [seen.append])
    with log.phase("accepted"):
        log.info("hello", x=1)
        log.progress(1, 2)
    with pytest.raises(RuntimeError), log.phase("data"):
        raise RuntimeError("boom")
    kinds = [e.kind for e in seen]
    assert kinds == ["phase-start", "info", "progress", "phase-end", "phase-start", "phase-end"]
    assert seen[1].phase == "accepted" and seen[1].data == {"x": 1}
    assert seen[3].data["ok"] is True and seen[5].data["ok"] is False
    assert "progress" not in [e.kind for e in log.events]
    assert set(log.phases) == {"accepted", "data"}
    assert log.lines()[-1].startswith("[data] FAILED")


def test_options_validate() -> None:
    with pytest.raises(UsageError):
        BackupOptions(consistency="maybe")
    with pytest.raises(UsageError):
        BackupOptions(inflight=0)
    with pytest.raises(UsageError):
        RestoreOptions(fmt="vmdk")
    assert BackupOptions().consistency == "prefer"
