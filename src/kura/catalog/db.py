"""Opening the catalog database: SQLite by default, PostgreSQL by URL.

``Catalog.open(url_or_path)`` accepts a file path (SQLite; the default is
``/var/lib/kura/catalog.db``) or an SQLAlchemy URL (``sqlite:///...``,
``postgresql+psycopg://user@/db?host=/run/postgresql``). Tables are created on
first open and the schema version is recorded in ``meta``; a catalog written by
a newer kura is refused rather than misread.

SQLite is opened in WAL mode with a busy timeout and foreign keys on: the
server's API threads, its job engine and its scheduler share one file, and a
reader never blocks the writer. Every unit of work is one short session
(:meth:`Catalog.session`), committed on success and rolled back on error, so a
crash never leaves a half-applied change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from kura.catalog.models import SCHEMA_VERSION, Base, Meta
from kura.errors import ServerError

DEFAULT_CATALOG = "/var/lib/kura/catalog.db"


def catalog_url(location: str) -> str:
    """An SQLAlchemy URL for a path or URL given by the user."""
    if "://" in location:
        if location.startswith("postgresql://"):
            # Use psycopg 3 (the driver kura depends on) rather than psycopg2.
            return "postgresql+psycopg://" + location[len("postgresql://"):]
        return location
    return f"sqlite:///{Path(location).expanduser().absolute()}"


def redact_url(url: str) -> str:
    """The URL with any password removed, for messages and logs."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in creds else url


class Catalog:
    """The server's database: a connection pool plus a session factory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, location: str = DEFAULT_CATALOG) -> Catalog:
        url = catalog_url(location)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.removeprefix("sqlite:///")
            if path and path != ":memory:":
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ServerError(f"cannot create the catalog directory for {path}: "
                                      f"{exc.strerror}") from exc
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            engine = create_engine(url, **kwargs)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ServerError(f"cannot open the catalog {redact_url(url)}: {exc}",
                              hint="give a file path or a sqlite:// or postgresql:// URL") from exc
        if url.startswith("sqlite"):
            event.listen(engine, "connect", _sqlite_pragmas)
        catalog = cls(engine)
        catalog._prepare(redact_url(url))
        return catalog

    def _prepare(self, shown: str) -> None:
        try:
            Base.metadata.create_all(self.engine)
            with self.session() as s:
                row = s.get(Meta, "schema_version")
                if row is None:
                    s.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                elif int(row.value) > SCHEMA_VERSION:
                    raise ServerError(
                        f"the catalog {shown} has schema version {row.value}, newer than this "
                        f"kura understands ({SCHEMA_VERSION})", hint="upgrade kura")
        except SQLAlchemyError as exc:
            raise ServerError(f"cannot use the catalog {shown}: {exc.__class__.__name__}: "
                              f"{str(exc).splitlines()[0]}",
                              hint="check that the database is reachable and writable") from exc

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: committed on success, rolled back on any error."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def get_meta(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(Meta, key)
            return None if row is None else row.value

    def set_meta(self, key: str, value: str) -> None:
        with self.session() as s:
            row = s.scalars(select(Meta).where(Meta.key == key)).first()
            if row is None:
                s.add(Meta(key=key, value=value))
            else:
                row.value = value

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
