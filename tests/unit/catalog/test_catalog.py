"""The catalog on real SQLite and (when installed) a real PostgreSQL started here."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import StatementError

from kura.catalog import Catalog, Job, LogLine, Run, catalog_url, redact_url
from kura.catalog.models import SCHEMA_VERSION
from kura.errors import ServerError


def _roundtrip(cat: Catalog) -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    with cat.session() as s:
        job = Job(name="nightly", spec={"name": "nightly", "schedule": "0 2 * * *"},
                  next_run=when)
        s.add(job)
        s.flush()
        run = Run(job_id=job.id, job_name=job.name, spec=job.spec)
        s.add(run)
        s.flush()
        s.add(LogLine(run_id=run.id, message="hello"))
    with cat.session() as s:
        got = s.query(Job).one()
        assert got.next_run == when and got.next_run.tzinfo is not None
        assert got.spec["schedule"] == "0 2 * * *"
        assert s.query(LogLine).one().message == "hello"
    with pytest.raises(StatementError, match="naive datetime"), cat.session() as s:
        s.add(Job(name="naive", spec={}, next_run=datetime(2026, 1, 1)))
    assert cat.get_meta("schema_version") == str(SCHEMA_VERSION)


def test_sqlite_roundtrip_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "catalog.db"
    cat = Catalog.open(str(path))
    _roundtrip(cat)
    cat.close()
    again = Catalog.open(str(path))
    with again.session() as s:
        assert s.query(Job).count() == 1
    again.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    cat = Catalog.open(str(tmp_path / "c.db"))
    cat.set_meta("schema_version", str(SCHEMA_VERSION + 1))
    cat.close()
    with pytest.raises(ServerError, match="newer than this kura"):
        Catalog.open(str(tmp_path / "c.db"))


def test_urls() -> None:
    assert catalog_url("/x/y.db") == "sqlite:////x/y.db"
    assert catalog_url("postgresql://u@/kura").startswith("postgresql+psycopg://")
    assert redact_url("postgresql+psycopg://u:secret@h/db") == "postgresql+psycopg://u:***@h/db"
    assert "secret" not in redact_url("postgresql://kura:secret@db/kura")


def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(ServerError, match=r"cannot use the catalog postgresql\+psycopg://u:\*\*\*@"):
        Catalog.open("postgresql://u:pw@/nope?host=/nonexistent-dir")


@pytest.fixture
def postgres() -> Iterator[str]:
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL (Debian's postgresql package) or root is not available")
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="kura-pg-"))
    shutil.chown(root, "postgres", "postgres")
    data, sock = root / "data", root

    def as_pg(*argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True)
    as_pg(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_pg(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
          f"-k {sock} -c listen_addresses='' -c fsync=off", "start")
    try:
        as_pg(str(bindir / "createdb"), "-h", str(sock), "kura")
        yield f"postgresql://postgres@/kura?host={sock}"
    finally:
        as_pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)


def test_postgresql_roundtrip(postgres: str) -> None:
    cat = Catalog.open(postgres)
    _roundtrip(cat)
    with cat.session() as s:
        assert s.query(Run).count() == 1
        assert s.query(Run).one().started > datetime.now(UTC) - timedelta(minutes=5)
    cat.close()
