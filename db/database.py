"""Opening the database: engine, sessions, SQLite pragmas and the schema version check.

A new, empty database is created at the newest schema version. An existing database at an
older version is refused with the command that upgrades it, so a daemon never runs against a
schema it does not understand.

SQLite (the default) serves one daemon on one machine. PostgreSQL (``postgresql+psycopg://``)
serves several processes on several machines with the same schema and migrations; there,
``Database.exclusive(name)`` is a cluster-wide lock (a PostgreSQL advisory lock) for work that
exactly one process may do at a time (ingesting the inbox, retention), and creating or
upgrading the schema is serialised the same way. Connections ask the server to notice a dead
peer within about a minute (TCP keepalives), so the locks of a machine that lost power are
released instead of being held for the operating system's default two hours.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseError(RuntimeError):
    """The database cannot be used as it is; the message says what to do."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def create_db_engine(url: str, durable: bool = True) -> Engine:
    """An engine for ``url``. ``durable=False`` (SQLite): its commits are not fsynced (WAL with
    ``synchronous=NORMAL``), which survives a crash of the process but not of the machine."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas if durable else _sqlite_pragmas_normal)
        return engine
    engine = create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "postgresql":
        event.listen(engine, "connect", _postgresql_session)
    return engine


def _postgresql_session(dbapi_connection, _record) -> None:
    """Server-side keepalives (about 60 s to notice a dead machine; no effect on unix sockets),
    committed at once so that they outlive the first transaction."""
    cursor = dbapi_connection.cursor()
    cursor.execute("SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; "
                   "SET tcp_keepalives_count = 3")
    cursor.close()
    dbapi_connection.commit()


def _sqlite_pragmas(dbapi_connection, _record, synchronous: str = "FULL") -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def _sqlite_pragmas_normal(dbapi_connection, record) -> None:
    _sqlite_pragmas(dbapi_connection, record, "NORMAL")


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> Optional[str]:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def known_revision(revision: str) -> bool:
    """Whether this version's migrations include ``revision``."""
    try:
        return ScriptDirectory.from_config(alembic_config("sqlite://")).get_revision(revision) is not None
    except Exception:  # noqa: BLE001 - alembic raises several kinds for an unknown revision
        return False


def unusable(url: str, exc: BaseException) -> str:
    """One plain sentence for a database that cannot be opened or read."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if "not a database" in reason or "malformed" in reason or "corrupt" in reason:
        return (f"the database {url} is damaged ({reason}). Stop every qie-hotfolder process, then restore a "
                "backup or move the file (and its -wal and -shm files) aside to start with an empty queue "
                "(docs/operations.md)")
    return f"cannot use the database {url}: {reason}"


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema."""
    engine = create_db_engine(url)
    try:
        with _schema_lock(engine):
            command.upgrade(alembic_config(url), "head")
    finally:
        engine.dispose()


def lock_key(name: str) -> int:
    """The advisory lock number of a named lock: stable, and unlikely to meet another program's."""
    return int.from_bytes(hashlib.sha256(f"qie-hotfolder:{name}".encode()).digest()[:8], "big", signed=True)


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[None]:
    """On PostgreSQL, wait for the cluster-wide schema lock: several workers starting at once
    against an empty database must not all create the tables."""
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": lock_key("schema")})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": lock_key("schema")})
            connection.commit()


class Database:
    """The engine and session factory of one database; ``begin()`` opens a unit of work."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        self.engine = create_db_engine(url)
        try:
            with _schema_lock(self.engine):
                self._check_schema(create)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise DatabaseError(unusable(url, exc)) from exc
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._fast_engine: Optional[Engine] = None
        self._fast_sessions: Optional[sessionmaker] = None

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @property
    def shared(self) -> bool:
        """Whether several processes (on several machines) may use this database at once."""
        return self.dialect != "sqlite"

    @contextmanager
    def exclusive(self, name: str) -> Iterator[bool]:
        """``with db.exclusive("ingest") as mine:`` -- ``mine`` is True for exactly one process of
        all those sharing the database while the block runs (a PostgreSQL advisory lock, tried,
        never waited for: the others skip the work). Always True on SQLite, which one daemon
        holds alone (the folder lock sees to that)."""
        if not self.shared:
            yield True
            return
        key = lock_key(name)
        with self.engine.connect() as connection:
            mine = bool(connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": key}).scalar())
            connection.commit()
            try:
                yield mine
            finally:
                if mine:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                    connection.commit()

    def _check_schema(self, create: bool) -> None:
        revision = current_revision(self.engine)
        head = head_revision()
        if revision == head:
            return
        if revision is None and not inspect(self.engine).get_table_names():
            if not create:
                raise DatabaseError(f"no database at {self.url}; start the daemon once to create it")
            command.upgrade(alembic_config(self.url), "head")
            return
        if revision is not None and not known_revision(revision):
            raise DatabaseError(
                f"the database {self.url} has schema version {revision}, which this version of qie-hotfolder "
                f"(schema {head}) does not know: it was written by a newer version. Run that newer version, "
                "or restore a backup made before the upgrade (docs/operations.md)")
        raise DatabaseError(
            f"the database {self.url} is at schema version {revision or 'unknown'}, this version "
            f"needs {head}. Back it up, then run: python run.py db-upgrade")

    def begin(self, durable: bool = True):
        """``with db.begin() as session:`` commits on success, rolls back on error.

        ``durable=False`` for what only informs (progress, leases): the commit survives a crash
        of the process but may be lost with the machine's power, and costs no disk flush (SQLite:
        a second connection with ``synchronous=NORMAL``; PostgreSQL: ``synchronous_commit`` off
        for the transaction). A later durable commit makes it durable too."""
        if durable:
            return self.sessions.begin()
        if self.dialect == "postgresql":
            return _without_sync_commit(self.sessions)
        if self._fast_sessions is None:
            self._fast_engine = create_db_engine(self.url, durable=False)
            self._fast_sessions = sessionmaker(self._fast_engine, expire_on_commit=False)
        return self._fast_sessions.begin()

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()
        if self._fast_engine is not None:
            self._fast_engine.dispose()


@contextmanager
def _without_sync_commit(sessions: sessionmaker) -> Iterator[Session]:
    with sessions.begin() as session:
        session.execute(text("SET LOCAL synchronous_commit TO OFF"))
        yield session
