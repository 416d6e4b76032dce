"""Watching the inbox: events are hints that wake the daemon, the periodic scan is the truth.

The native observer (inotify on Linux) reacts at once but hears nothing on NFS or SMB mounts,
so ``auto`` picks watchdog's PollingObserver when the inbox lives on a network or FUSE file
system. Whatever the observer, the daemon also scans at start-up and every rescan interval.
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
    def __init__(self, wake: threading.Event, on_complete: Optional[Callable[[Path, float], None]]):
        self.wake = wake
        self.on_complete = on_complete

    def on_any_event(self, event: FileSystemEvent) -> None:
        name = os.path.basename(os.fsdecode(event.dest_path or event.src_path))
        if event.event_type in ("opened", "closed_no_write") or (is_ignored(name) and not event.dest_path):
            return
        if self.on_complete is not None and _completes(event):
            self._complete(Path(os.fsdecode(event.dest_path or event.src_path)), event.is_directory)
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
                 on_complete: Optional[Callable[[Path, float], None]] = None):
        self.inbox = inbox
        self.mode = mode
        self.poll_interval = poll_interval
        self.wake = wake
        self.on_complete = on_complete  # told of files a writer closed (native events only)
        self._observer: Optional[BaseObserver] = None

    @property
    def running(self) -> bool:
        return self._observer is not None and self._observer.is_alive()

    def start(self) -> None:
        observer = PollingObserver(timeout=self.poll_interval) if self.mode == "polling" else Observer()
        observer.schedule(_Wake(self.wake, self.on_complete if self.mode != "polling" else None),
                          str(self.inbox), recursive=True)
        observer.daemon = True
        observer.start()
        self._observer = observer
        log.info("watching %s (%s)", self.inbox, "polling" if self.mode == "polling" else "native events")

    def stop(self) -> None:
        if self._observer is None:
            return
        try:
            self._observer.stop()
            self._observer.join(timeout=5)
        except Exception:  # noqa: BLE001 - an observer on a vanished folder may fail to stop cleanly
            log.debug("observer did not stop cleanly", exc_info=True)
        self._observer = None

    def restart(self) -> None:
        self.stop()
        self.start()
