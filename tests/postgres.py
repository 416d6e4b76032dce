"""A private PostgreSQL server for tests: its own cluster in a temporary folder, reached over a
unix socket in that folder (and, with ``tcp=True``, on 127.0.0.1), gone when the tests end.

``PostgresServer.start()`` raises ``Unavailable`` with the reason when there is no PostgreSQL
to start (not installed, no ``postgres`` account to run it as root, no psycopg); the fixtures
turn that into a skip. CI installs the Debian package (``.ci/run``); on a workstation:
``sudo apt-get install postgresql``.

The cluster runs with ``fsync=off``: it is thrown away after the tests, and crash safety of
PostgreSQL itself is not what they test.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tests.daemon import Folders

PG_ACCOUNT = "postgres"


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why."""


def _bindir() -> Path:
    """The folder of ``initdb``/``pg_ctl``: Debian keeps them off the PATH, per major version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise Unavailable("PostgreSQL is not installed (no initdb); on Debian: apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    def __init__(self, root: Path, port: int, bindir: Path, run_as: Optional[str], tcp: bool = False):
        self.root = root
        self.tcp = tcp  # listens on 127.0.0.1 too
        self.port = port
        self.bindir = bindir
        self.run_as = run_as  # the account the server runs as (None: this one)
        self.data = root / "data"
        self.log = root / "server.log"
        self._databases = 0

    @classmethod
    def start(cls, tcp: bool = False) -> "PostgresServer":
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise Unavailable(f"psycopg is not installed ({exc}); pip install -e '.[postgres]'") from exc
        bindir = _bindir()
        run_as = None
        if os.geteuid() == 0:  # the server refuses to run as root
            try:
                import pwd
                account = pwd.getpwnam(PG_ACCOUNT)
            except KeyError as exc:
                raise Unavailable(f"running as root and there is no {PG_ACCOUNT!r} account to run the server as") from exc
            run_as = PG_ACCOUNT
        # In /tmp: the server's account must reach it (TMPDIR may be private), and a unix
        # socket's path must stay short.
        root = Path(tempfile.mkdtemp(prefix="qie-pg-", dir="/tmp" if os.path.isdir("/tmp") else None))
        os.chmod(root, 0o700)
        if run_as is not None:
            os.chown(root, account.pw_uid, account.pw_gid)
        server = cls(root, _free_port(), bindir, run_as, tcp)
        try:
            server._initdb()
            server._pg_ctl("start")
        except Unavailable:
            server.stop()
            raise
        return server

    def _command(self, *args: str) -> list[str]:
        if self.run_as is None:
            return list(args)
        if shutil.which("runuser"):
            return ["runuser", "-u", self.run_as, "--", *args]
        import shlex
        return ["su", self.run_as, "-s", "/bin/sh", "-c", shlex.join(args)]

    def _run(self, *args: str, timeout: float = 120) -> None:
        try:
            result = subprocess.run(self._command(*args), capture_output=True, text=True, timeout=timeout,
                                    cwd=self.root)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{Path(args[0]).name} could not run: {exc}") from exc
        if result.returncode != 0:
            log = self.log.read_text()[-2000:] if self.log.exists() else ""
            raise Unavailable(f"{Path(args[0]).name} failed ({result.returncode}): "
                              f"{(result.stderr or result.stdout).strip()[-2000:]}\n{log}")

    def _initdb(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                  "--encoding=UTF8", "--locale=C", "--no-sync")

    def _pg_ctl(self, action: str) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses='{'127.0.0.1' if self.tcp else ''}' -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", "60", action)

    def url(self, database: str = "postgres", tcp: bool = False) -> str:
        """The SQLAlchemy URL of ``database``, over the unix socket or (``tcp``) 127.0.0.1."""
        if tcp:
            return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"
        return f"postgresql+psycopg://postgres@/{database}?host={self.root}&port={self.port}"

    def connect(self, database: str = "postgres"):
        import psycopg
        return psycopg.connect(host=str(self.root), port=self.port, user="postgres", dbname=database,
                               autocommit=True)

    def create_database(self, prefix: str = "qie", tcp: bool = False) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}_{time.monotonic_ns() % 1_000_000}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name, tcp)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            try:
                subprocess.run(self._command(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                                             "-w", "stop"), capture_output=True, timeout=60, cwd=self.root)
            except (OSError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PgFolders(Folders):
    """Test folders whose daemons share the PostgreSQL database ``url`` (``QIE_DATABASE_URL``)."""

    url: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.env_extra.setdefault("QIE_DATABASE_URL", self.url)

    def db_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of ``sql`` (``?`` placeholders, as for SQLite); [] before the schema exists."""
        from sqlalchemy import create_engine
        from sqlalchemy.exc import ProgrammingError
        from sqlalchemy.pool import NullPool
        engine = create_engine(self.url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.exec_driver_sql(sql.replace("?", "%s"), params)]
        except ProgrammingError:
            return []
        finally:
            engine.dispose()
