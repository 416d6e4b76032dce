"""Watching the inbox: events are hints that wake the daemon, the periodic scan is the truth.

The native observer (inotify on Linux) reacts at once but hears nothing on NFS or SMB mounts,
so ``auto`` picks watchdog's PollingObserver when the inbox lives on a network or FUSE file
system. Whatever the observer, the daemon also scans at start-up and every rescan interval.

The observer watches the folder the inbox path leads to (an inbox that is a symbolic link is
watched through its target; events are reported under the inbox path). ``InboxWatcher.moved``
tells when that is no longer the folder the path leads to (the inbox moved away and made again,
the link pointed elsewhere) or the observer stopped, so that the caller raises an alarm and
watches again; a native observer that cannot start (the inotify watch limit) falls back to
polling.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from processor.inbox import is_ignored

log = logging.getLogger(__name__)

NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "9p", "afs", "ncpfs",
                       "davfs", "glusterfs", "ceph", "lustre", "gpfs", "beegfs", "virtiofs", "vboxsf"}


def filesystem_type(path: Path, mounts_file: str = "/proc/mounts") -> Optional[str]:
    """The file system type of the mount holding ``path`` (Linux), None when unknown."""
    try:
        lines = Path(mounts_file).read_text().splitlines()
    except OSError:
        return None
    target = os.path.realpath(path)
    best, fstype = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, fstype = mount_point, parts[2]
    return fstype


def choose_mode(configured: str, inbox: Path) -> str:
    """``native`` or ``polling`` for the configured mode and where the inbox lives."""
    if configured != "auto":
        return configured
    fstype = filesystem_type(inbox) or ""
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith("fuse"):
        log.info("inbox is on %s: watching by polling", fstype)
        return "polling"
    return "native"


def _completes(event: FileSystemEvent) -> bool:
    """Whether the event tells that its file, or every file in its folder, has been written.

    A new folder is watched only once its own event has been read: files written and closed in
    it before then (a copy that outruns a busy daemon) send no close event, so they count as
    closed when the folder's event arrives. Writes after that change their signature, which
    voids the hint, and their close gives a new one."""
    return event.event_type in ("closed", "moved") or (event.event_type == "created" and event.is_directory)


class _Wake(FileSystemEventHandler):
    def __init__(self, wake: threading.Event, on_complete: Optional[Callable[[Path, float], None]],
                 on_change: Optional[Callable[[Path], None]] = None, watched: Optional[Path] = None,
                 inbox: Optional[Path] = None):
        self.wake = wake
        self.on_complete = on_complete
        self.on_change = on_change  # told of every path that changed (under the inbox path)
        self.watched = watched  # the folder the observer watches, when it is not ``inbox`` itself
        self.inbox = inbox

    def _path(self, raw: bytes | str) -> Path:
        """An event's path under the inbox path (the observer reports the link's target)."""
        path = Path(os.fsdecode(raw))
        if self.watched is not None and self.inbox is not None and self.watched != self.inbox:
            try:
                return self.inbox / path.relative_to(self.watched)
            except ValueError:
                pass
        return path

    def on_any_event(self, event: FileSystemEvent) -> None:
        name = os.path.basename(os.fsdecode(event.dest_path or event.src_path))
        if event.event_type in ("opened", "closed_no_write") or (is_ignored(name) and not event.dest_path):
            return
        if self.on_change is not None:
            for raw in filter(None, (event.src_path, event.dest_path)):
                self.on_change(self._path(raw))
        if self.on_complete is not None and _completes(event):
            self._complete(self._path(event.dest_path or event.src_path), event.is_directory)
        self.wake.set()

    def _complete(self, path: Path, is_directory: bool) -> None:
        """A file closed after writing, or renamed into place; with a folder (renamed into place or
        new): every file in it."""
        now = time.monotonic()
        files = [path] if not is_directory else [p for p in path.rglob("*") if p.is_file()][:1000]
        for file in files:
            self.on_complete(file, now)


class InboxWatcher:
    """Sets ``wake`` whenever something changes in the inbox."""

    def __init__(self, inbox: Path, mode: str, poll_interval: float, wake: threading.Event,
                 on_complete: Optional[Callable[[Path, float], None]] = None,
                 on_change: Optional[Callable[[Path], None]] = None):
        self.inbox = inbox
        self.mode = mode
        self.poll_interval = poll_interval
        self.wake = wake
        self.on_complete = on_complete  # told of files a writer closed (native events only)
        self.on_change = on_change
        self._observer: Optional[BaseObserver] = None
        self._watched: Optional[tuple[str, int, int]] = None  # real path, device, inode

    @property
    def running(self) -> bool:
        return (self._observer is not None and self._observer.is_alive()
                and all(emitter.is_alive() for emitter in self._observer.emitters))

    def start(self) -> None:
        watched = Path(os.path.realpath(self.inbox))
        st = os.stat(watched)
        self._watched = (str(watched), st.st_dev, st.st_ino)
        try:
            self._observer = self._start(watched, self.mode)
        except OSError as exc:
            if self.mode == "polling":
                raise
            log.error("ALARM: cannot watch %s with native events (%s; the inotify watch limit?): polling it instead",
                      self.inbox, exc)
            self.mode = "polling"
            self._observer = self._start(watched, self.mode)
        through = f" through the link to {watched}" if str(watched) != os.path.abspath(self.inbox) else ""
        log.info("watching %s%s (%s)", self.inbox, through, "polling" if self.mode == "polling" else "native events")

    def _start(self, watched: Path, mode: str) -> BaseObserver:
        observer = PollingObserver(timeout=self.poll_interval) if mode == "polling" else Observer()
        handler = _Wake(self.wake, self.on_complete if mode != "polling" else None, self.on_change,
                        watched=watched, inbox=Path(os.path.abspath(self.inbox)))
        observer.schedule(handler, str(watched), recursive=True)
        observer.daemon = True
        try:
            observer.start()
        except BaseException:
            _stop(observer)
            raise
        return observer

    def moved(self) -> Optional[str]:
        """Why the watch no longer hears the inbox, None while it does (or while the inbox is
        missing, which the scan reports)."""
        if self._watched is None:
            return None
        try:
            real = os.path.realpath(self.inbox)
            st = os.stat(real)
        except OSError:
            return None
        if real != self._watched[0]:
            return f"the inbox {self.inbox} now leads to {real} (the watched folder was {self._watched[0]})"
        if (st.st_dev, st.st_ino) != self._watched[1:]:
            return (f"the inbox {self.inbox} is no longer the folder that was watched (moved away and made "
                    "again?); drops left in the old folder are not looked at")
        if not self.running:
            return f"the watcher of the inbox {self.inbox} stopped"
        return None

    def stop(self) -> None:
        if self._observer is not None:
            _stop(self._observer)
        self._observer = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _stop(observer: BaseObserver) -> None:
    try:
        observer.stop()
        if observer.is_alive():
            observer.join(timeout=5)
    except Exception:  # noqa: BLE001 - an observer on a vanished folder may fail to stop cleanly
        log.debug("observer did not stop cleanly", exc_info=True)
