"""Disk space alarms: a folder's disk nearly full is an alarm (an event, and a notification).

Checked every ``interval`` seconds from the notification thread (never on the compute loop).
One alarm per disk, however many folders it holds; an all-clear (a warning event) when the space
is back. The last alarm in the database says whether one is already raised, so a restart does
not repeat it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from config import Settings
from db import Database, jobs

log = logging.getLogger(__name__)


class DiskSpaceWatch:
    def __init__(self, settings: Settings, db: Database, interval: float = 30.0):
        self.settings = settings
        self.db = db
        self.interval = interval
        self._next = 0.0

    def check_when_due(self, now: float) -> None:
        if self.settings.disk_alarm_bytes and now >= self._next:
            self._next = now + self.interval
            self.check()

    def check(self) -> None:
        disks: dict[int, list[tuple[str, Path]]] = {}
        for name, folder in self.settings.folders().items():
            try:
                disks.setdefault(os.stat(folder).st_dev, []).append((name, folder))
            except OSError:
                continue  # a missing inbox is the ingest thread's alarm
        for folders in disks.values():
            names = ", ".join(name for name, _ in folders)
            prefix = f"disk of {names} ({folders[0][1]}) "
            try:
                free = shutil.disk_usage(folders[0][1]).free
            except OSError:
                continue
            low = free < self.settings.disk_alarm_bytes
            with self.db.begin() as session:
                last = jobs.last_alarm(session, prefix)
                raised = last is not None and last.level == "error"
                if low and not raised:
                    message = (f"{prefix}is nearly full: {free / 1e9:.2f} GB free, less than disk_alarm_bytes = "
                               f"{self.settings.disk_alarm_bytes / 1e9:.2f} GB; jobs will fail to write")
                    log.error("ALARM: %s", message)
                    jobs.add_event(session, None, "alarm", message, level="error")
                elif raised and not low:
                    log.warning("%shas free space again", prefix)
                    jobs.add_event(session, None, "alarm", f"{prefix}has {free / 1e9:.2f} GB free again",
                                   level="warning")
