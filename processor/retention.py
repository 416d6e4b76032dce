"""Retention: what the daemon removes so that ``work/`` and ``archive/`` do not grow for ever.

1. Checkpoints unused for ``cache_max_age_days`` (``last_used_at`` in the index), then the
   least recently used until the cache is within ``cache_max_bytes``. A checkpoint that an
   unfinished job (waiting, queued, running) computed or reused is never removed, nor are the
   partials of its sampling. Index rows whose file is gone are dropped.
2. Files in ``work/cache`` that the index does not know (a crash between writing and
   recording, a removal interrupted) once they are an hour old, and stale temporary files.
3. Archived originals older than ``archive_max_age_days``, then the oldest until the archive
   is within ``archive_max_bytes`` (both unset by default: keep everything).
4. ``work/jobs/<dir>`` folders whose jobs are all done, or done/cancelled longer than
   ``cache_max_age_days`` ago; folders no job refers to once they are a day old (a crash
   during ingest). Failed jobs keep theirs, for ``run.py retry``.

The index row goes first and the file after it: a crash in between leaves an orphan file,
which step 2 removes later; a checkpoint whose file vanished is recomputed by the runner.
``collect(..., dry_run=True)`` reports the same list and removes nothing.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

from config import Settings
from db import Database, checkpoints, jobs

log = logging.getLogger(__name__)

ORPHAN_AGE = timedelta(hours=1)
UNKNOWN_WORK_DIR_AGE = timedelta(days=1)
SUFFIX = ".safetensors"
_ARCHIVED = re.compile(r"^\d+-")  # archive entries are "<job id>-<name>"


@dataclass
class Removal:
    kind: str  # checkpoint, orphan, archive, work
    path: str
    bytes: int
    reason: str


@dataclass
class Report:
    dry_run: bool = False
    removed: list[Removal] = field(default_factory=list)

    def add(self, kind: str, path: Path | str, size: int, reason: str) -> None:
        self.removed.append(Removal(kind, str(path), size, reason))

    def summary(self) -> str:
        if not self.removed:
            return "nothing to remove"
        parts = []
        for kind, label in (("checkpoint", "checkpoints"), ("index", "index entries of missing files"),
                            ("orphan", "orphan files"), ("archive", "archived jobs"), ("work", "work folders")):
            items = [r for r in self.removed if r.kind == kind]
            if items:
                parts.append(f"{len(items)} {label} ({_size(sum(r.bytes for r in items))})")
        verb = "would remove" if self.dry_run else "removed"
        return f"{verb} " + ", ".join(parts)

    def as_dict(self) -> dict:
        return {"dry_run": self.dry_run, "summary": self.summary(),
                "removed": [r.__dict__ for r in self.removed]}


def collect(settings: Settings, db: Database, now: datetime, dry_run: bool = False) -> Report:
    """Apply every retention rule once; ``now`` is naive UTC (as stored in the database)."""
    report = Report(dry_run=dry_run)
    cache = settings.work / "cache"
    _checkpoints(settings, db, now, report)
    _orphans(cache, db, now, report)
    _archive(settings, now, report)
    _work_dirs(settings, db, now, report)
    return report


# 1. Checkpoints ----------------------------------------------------------------------------

def _checkpoints(settings: Settings, db: Database, now: datetime, report: Report) -> None:
    with db.begin() as session:
        protected = checkpoints.in_use(session)
        rows = [(r.fingerprint, Path(r.path), r.size, r.last_used_at) for r in checkpoints.all_by_age(session)]
    missing = [(fp, path) for fp, path, _, _ in rows if not path.is_file()]
    for fp, path in missing:
        report.add("index", path, 0, "its file is gone")
    present = [row for row in rows if row[1].is_file()]

    def is_protected(fingerprint: str) -> bool:
        return fingerprint in protected or fingerprint.split(".step", 1)[0] in protected

    cutoff = now - timedelta(days=settings.cache_max_age_days)
    doomed: dict[str, tuple[Path, int, str]] = {}
    for fp, path, size, last_used in present:
        if last_used < cutoff and not is_protected(fp):
            doomed[fp] = (path, size, f"unused since {last_used:%Y-%m-%d}")
    if settings.cache_max_bytes is not None:
        total = sum(size for fp, _, size, _ in present if fp not in doomed)
        for fp, path, size, last_used in present:  # least recently used first
            if total <= settings.cache_max_bytes:
                break
            if fp in doomed or is_protected(fp):
                continue
            doomed[fp] = (path, size, f"cache over cache_max_bytes={settings.cache_max_bytes}")
            total -= size
    for fp, (path, size, reason) in doomed.items():
        report.add("checkpoint", path, size, reason)
    if report.dry_run:
        return
    forget = [fp for fp, _ in missing] + list(doomed)
    if forget:
        with db.begin() as session:
            checkpoints.forget_many(session, forget)
    for path, _, _ in doomed.values():
        path.unlink(missing_ok=True)


# 2. Orphans -----------------------------------------------------------------------------------

def _orphans(cache: Path, db: Database, now: datetime, report: Report) -> None:
    if not cache.is_dir():
        return
    with db.begin() as session:
        known = {r.fingerprint for r in checkpoints.all_by_age(session)}
    # Taken after the index was read: a checkpoint recorded meanwhile is younger than an hour.
    cutoff = _timestamp(now - ORPHAN_AGE)
    for path in sorted(cache.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        name = path.name
        temporary = name.startswith(".") and name.endswith(".tmp")
        if not temporary and not (name.endswith(SUFFIX) and name[:-len(SUFFIX)] not in known):
            continue
        stat = path.stat()
        if stat.st_mtime >= cutoff:
            continue
        report.add("orphan", path, stat.st_size, "temporary file left by a crash" if temporary
                   else "not in the checkpoint index")
        if not report.dry_run:
            path.unlink(missing_ok=True)


# 3. Archive -----------------------------------------------------------------------------------

def archive_entries(archive: Path) -> list[Path]:
    """Archived jobs: ``archive/<id>-<name>`` and, for presets, ``archive/<preset>/<id>-<name>``."""
    if not archive.is_dir():
        return []
    entries = []
    for child in archive.iterdir():
        if _ARCHIVED.match(child.name):
            entries.append(child)
        elif child.is_dir() and not child.is_symlink():
            entries += [grandchild for grandchild in child.iterdir() if _ARCHIVED.match(grandchild.name)]
    return entries


def _archive(settings: Settings, now: datetime, report: Report) -> None:
    if settings.archive_max_age_days is None and settings.archive_max_bytes is None:
        return
    entries = sorted(((p.lstat().st_mtime, p, _tree_size(p)) for p in archive_entries(settings.archive)),
                     key=lambda e: (e[0], str(e[1])))
    doomed: list[tuple[Path, int, str]] = []
    if settings.archive_max_age_days is not None:
        cutoff = _timestamp(now - timedelta(days=settings.archive_max_age_days))
        doomed += [(p, size, f"archived more than {settings.archive_max_age_days:g} days ago")
                   for mtime, p, size in entries if mtime < cutoff]
    if settings.archive_max_bytes is not None:
        gone = {p for p, _, _ in doomed}
        total = sum(size for _, p, size in entries if p not in gone)
        for _, p, size in entries:
            if total <= settings.archive_max_bytes:
                break
            if p in gone:
                continue
            doomed.append((p, size, f"archive over archive_max_bytes={settings.archive_max_bytes}"))
            total -= size
    for path, size, reason in doomed:
        report.add("archive", path, size, reason)
        if not report.dry_run:
            _remove(path)
            if path.parent != settings.archive:
                _rmdir_if_empty(path.parent)


# 4. Work folders ------------------------------------------------------------------------------

def _work_dirs(settings: Settings, db: Database, now: datetime, report: Report) -> None:
    folder = settings.work / "jobs"
    if not folder.is_dir():
        return
    with db.begin() as session:
        owners = jobs.work_dir_jobs(session)
    finished_cutoff = now - timedelta(days=settings.cache_max_age_days)
    unknown_cutoff = _timestamp(now - UNKNOWN_WORK_DIR_AGE)
    for path in sorted(folder.iterdir()):
        if not path.is_dir() or path.is_symlink():
            continue
        rows = owners.get(path.name)
        reason: Optional[str] = None
        if rows is None:
            if path.stat().st_mtime < unknown_cutoff:
                reason = "no job refers to it"
        elif all(state == "done" for state, _ in rows):
            reason = "its job is done"
        elif all(state in ("done", "cancelled") for state, _ in rows) and \
                max((at for _, at in rows if at is not None), default=now) < finished_cutoff:
            reason = f"its job was cancelled more than {settings.cache_max_age_days:g} days ago"
        if reason is None:
            continue
        report.add("work", path, _tree_size(path), reason)
        if not report.dry_run:
            _remove(path)


# Helpers --------------------------------------------------------------------------------------

def _timestamp(naive_utc: datetime) -> float:
    """A naive UTC datetime as a POSIX timestamp (to compare with file times)."""
    return (naive_utc - datetime(1970, 1, 1)).total_seconds()


def _tree_size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
