"""Opening the database: engine, sessions, SQLite pragmas and the schema version check.

A new, empty database is created at the newest schema version. An existing database at an
older version is refused with the command that upgrades it, so a daemon never runs against a
schema it does not understand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS = Path(__file__).parent / "migrations"


class DatabaseError(RuntimeError):
    """The database cannot be used as it is; the message says what to do."""


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def create_db_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def head_revision() -> str:
    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> Optional[str]:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(url: str) -> None:
    """Bring the database at ``url`` to the newest schema."""
    create_db_engine(url).dispose()
    command.upgrade(alembic_config(url), "head")


class Database:
    """The engine and session factory of one database; ``begin()`` opens a unit of work."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        self.engine = create_db_engine(url)
        self._check_schema(create)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

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
        raise DatabaseError(
            f"the database {self.url} is at schema version {revision or 'unknown'}, this version "
            f"needs {head}. Back it up, then run: python run.py db-upgrade")

    def begin(self):
        """``with db.begin() as session:`` commits on success, rolls back on error."""
        return self.sessions.begin()

    def session(self) -> Session:
        return self.sessions()

    def close(self) -> None:
        self.engine.dispose()
