"""One inbox, one queue: a lease file in the inbox names the daemon that ingests from it.

Two daemons with their own work folders and databases on one inbox would each make a job of
every drop. The work folder's lock cannot see that, and ``flock`` is unreliable on NFS and SMB.
So a daemon that ingests keeps ``inbox/.qie-hotfolder.lease``: a small JSON file naming it (pid
and host, work folder, database kind), created without ever replacing one that exists (a
rename that refuses an existing name, or a hard link: both atomic on network shares), and
touched every ``REFRESH_SECONDS`` by a thread of its own. A lease that nobody touched for
``STALE_SECONDS`` (its age read with the file system's own clock, so the clocks of two machines
need not agree), or that names a process of this host that is gone, is abandoned: a daemon
starting then takes it over (moving it aside only if it is still the very file it judged).

- An SQLite daemon holds the lease alone: any other daemon on that inbox refuses to start and
  names the holder.
- PostgreSQL daemons share one queue, and share the lease: any number of them join it (one at
  a time ingests, through the database), none of them joins an SQLite daemon's, and no SQLite
  daemon joins theirs. The one that made the lease removes it when it stops; the others make it
  again at their next refresh (should an SQLite daemon take the inbox in between, they find
  their lease taken and stop ingesting).

A daemon that finds its lease taken over (it was suspended or cut off for longer than
``STALE_SECONDS``) stops ingesting and raises an alarm; the one that took over ingests. A lease
that disappears (the inbox was replaced) is made again by its holder.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from processor.files import FileIdentity, remove_if_unchanged, write_new
from processor.lease import pid_alive

log = logging.getLogger(__name__)

LEASE_NAME = ".qie-hotfolder.lease"
REFRESH_SECONDS = 5.0
STALE_SECONDS = 30.0


class AlreadyRunning(RuntimeError):
    """Another daemon holds this work folder, or serves this inbox."""


@dataclass(frozen=True)
class Lease:
    """A lease file as read: what it says, which file it was, how old."""

    data: dict
    identity: FileIdentity

    @property
    def token(self) -> str:
        return str(self.data.get("token", ""))

    @property
    def database(self) -> str:
        return str(self.data.get("database", "unknown"))

    def describe(self) -> str:
        return (f"pid {self.data.get('pid', '?')} on {self.data.get('host', '?')}, work folder "
                f"{self.data.get('work', '?')}, {self.database} database")


class InboxLease:
    def __init__(self, inbox: Path, work: Path, shared: bool, refresh_seconds: float = REFRESH_SECONDS,
                 stale_seconds: float = STALE_SECONDS):
        self.inbox = inbox
        self.path = inbox / LEASE_NAME
        self.shared = shared  # PostgreSQL: several daemons share the inbox
        self.refresh_seconds = refresh_seconds
        self.stale_seconds = stale_seconds
        self.host = socket.gethostname()
        self.token = uuid.uuid4().hex
        self.lost: Optional[str] = None  # why this daemon no longer holds the inbox
        self._data = {"token": self.token, "pid": os.getpid(), "host": self.host, "work": str(work),
                      "database": "postgresql" if shared else "sqlite"}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # Taking and keeping ---------------------------------------------------------------------------

    def acquire(self) -> None:
        """Hold (or with PostgreSQL, join) the inbox's lease; AlreadyRunning naming the holder when
        another daemon serves the inbox."""
        for _ in range(5):
            if self._create():
                break
            current = self._read()
            if current is None:
                continue  # it went away meanwhile: try again
            if self._joins(current):
                os.utime(self.path, follow_symlinks=False)
                break
            age = self._age(current.identity)
            why = self._abandoned(current, age)
            if why is None:
                raise AlreadyRunning(
                    f"another qie-hotfolder daemon ({current.describe()}) serves the inbox {self.inbox}: its lease "
                    f"{LEASE_NAME} was refreshed {age:.0f} s ago. Stop it first, or give this one another "
                    "inbox; several daemons share an inbox only through PostgreSQL. (A lease nobody refreshes "
                    f"expires {self.stale_seconds:.0f} s after its last refresh.)")
            log.warning("taking over the inbox %s from %s: %s", self.inbox, current.describe(), why)
            remove_if_unchanged(self.path, current.identity)
        else:
            raise AlreadyRunning(f"cannot take the lease {self.path}: other daemons keep taking it (starting at "
                                 "the same time?)")
        self._thread = threading.Thread(target=self._keep, name="qie-inbox-lease", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the lease must not stop the daemon; try again next time
                log.exception("cannot refresh the inbox lease %s; trying again", self.path)

    def refresh(self) -> None:
        """Touch the lease; make it again where it went away; notice a takeover."""
        if self.lost is not None:
            return
        try:
            current = self._read()
        except OSError:
            return  # the inbox is missing or unreadable: the ingest loop raises that alarm
        if current is None:
            if self.inbox.is_dir() and self._create():
                log.warning("the lease %s was gone (the inbox replaced?); made it again", self.path)
            return
        if current.token == self.token or self._joins(current):
            os.utime(self.path, follow_symlinks=False)
            return
        self.lost = (f"another daemon ({current.describe()}) took over the inbox {self.inbox}: this one "
                     f"did not refresh its lease for more than {self.stale_seconds:.0f} s (suspended, or cut off "
                     "from the share?). This daemon no longer ingests; restart it once the other one stopped")
        log.error("ALARM: %s", self.lost)

    def release(self) -> None:
        """Stop refreshing; remove the lease where this daemon made it. (PostgreSQL daemons that
        joined it make it again at their next refresh.)"""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.lost is not None:
            return
        try:
            current = self._read()
            if current is not None and current.token == self.token:
                remove_if_unchanged(self.path, current.identity)
        except OSError as exc:
            log.warning("cannot remove the inbox lease %s: %s", self.path, exc)

    # The file -------------------------------------------------------------------------------------

    def _joins(self, current: Lease) -> bool:
        return self.shared and current.database == "postgresql"

    def _abandoned(self, current: Lease, age: float) -> Optional[str]:
        """Why a lease that is not ours may be taken over; None while its holder lives. ``age``:
        seconds since it was last touched, by the file system's clock."""
        if age > self.stale_seconds:
            return f"its lease was last refreshed {age:.0f} s ago"
        pid = current.data.get("pid")
        if current.data.get("host") == self.host and isinstance(pid, int) and pid != os.getpid() \
                and not pid_alive(pid):
            return f"process {pid} is gone"
        return None

    def _create(self) -> bool:
        """Make the lease unless one exists; True when this call made it. Never makes the inbox
        (a share that is not mounted must not get a local folder in its place)."""
        if not self.inbox.is_dir():
            raise FileNotFoundError(errno.ENOENT, "the inbox is missing", str(self.inbox))
        try:
            write_new(self.path, json.dumps(self._data).encode())
        except FileExistsError:
            return False
        return True

    def _read(self) -> Optional[Lease]:
        """The lease as it is now, None when there is none. Never through a link or a pipe."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            return Lease({"host": "?", "pid": "?", "work": f"(a symbolic link named {LEASE_NAME})"},
                         FileIdentity.of(self.path))
        with os.fdopen(fd, "rb") as handle:
            identity = FileIdentity.of_open(fd)
            is_file = stat.S_ISREG(os.fstat(fd).st_mode)
            raw = handle.read(65536) if is_file else b""
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"host": "?", "pid": "?", "work": f"(an unreadable {LEASE_NAME})"}
        return Lease(data, identity)

    def _age(self, identity: FileIdentity) -> float:
        return max(self._clock() - identity.mtime_ns / 1e9, 0.0)

    def _clock(self) -> float:
        """Now, by the clock of the file system holding the inbox (a share's server sets the
        times of files there): the modification time of a file just made."""
        probe = self.inbox / f".qie-hotfolder.clock.{os.getpid()}.tmp"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"x")
            return os.fstat(fd).st_mtime_ns / 1e9
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
