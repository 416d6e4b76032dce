"""The inbox contract: what counts as a job, when its files are ready, where its paths may point.

A job is either a ``*.json`` file directly in the inbox (its images are resolved in the inbox)
or a folder holding ``job.json`` (its images are resolved in that folder, and every file in
the folder belongs to the job). Temporary and hidden names are never looked at. A file is
ready when its size and modification time have not changed for the settle time.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from config import JobFileError

FOLDER_JOB_FILE = "job.json"
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".!sync",
                 ".!qb", ".filepart", ".swp", "~")
IGNORED_NAMES = {"Thumbs.db", "desktop.ini", "@eaDir", "#recycle", "$RECYCLE.BIN", "lost+found"}


def is_ignored(name: str) -> bool:
    """Hidden, temporary and system names that never start or belong to a job."""
    lowered = name.lower()
    return (name.startswith((".", "~$")) or name in IGNORED_NAMES
            or any(lowered.endswith(suffix) for suffix in TEMP_SUFFIXES))


@dataclass(frozen=True)
class Candidate:
    """A job file seen in the inbox, not yet ingested."""

    name: str  # the job's name: the file's stem or the folder's name
    job_file: Path
    folder: Path  # where its relative paths are resolved
    source: str  # the job file's path relative to the inbox
    is_folder: bool

    def owned_files(self, images: Iterable[Path] = ()) -> list[Path]:
        """Every file that belongs to this job: the whole folder, or the file and its images."""
        if self.is_folder:
            return sorted(p for p in self.folder.rglob("*")
                          if p.is_file() and not p.is_symlink() and not _hidden_below(p, self.folder))
        return [self.job_file, *images]


def _hidden_below(path: Path, top: Path) -> bool:
    return any(is_ignored(part) for part in path.relative_to(top).parts)


def find_candidates(inbox: Path) -> list[Candidate]:
    """Job files in the inbox, oldest first by name order within a scan."""
    found = []
    for entry in sorted(os.scandir(inbox), key=lambda e: e.name):
        if is_ignored(entry.name):
            continue
        path = Path(entry.path)
        if entry.is_file(follow_symlinks=False) and entry.name.lower().endswith(".json"):
            found.append(Candidate(path.stem, path, inbox, entry.name, False))
        elif entry.is_dir(follow_symlinks=False) and (path / FOLDER_JOB_FILE).is_file():
            found.append(Candidate(entry.name, path / FOLDER_JOB_FILE, path,
                                   f"{entry.name}/{FOLDER_JOB_FILE}", True))
    return found


def resolve_inside(folder: Path, relative: str, source: str, field_name: str) -> Path:
    """The path a job file names, refusing anything that leads out of the job's folder."""
    if "\x00" in relative:
        raise JobFileError(source, "contains a NUL character", field_name)
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise JobFileError(source, f"absolute paths are not allowed ({relative!r}); give a path relative to the job file", field_name)
    if ".." in candidate.parts:
        raise JobFileError(source, f"'..' is not allowed in paths ({relative!r})", field_name)
    if any(is_ignored(part) for part in candidate.parts):
        raise JobFileError(source, f"{relative!r} is a hidden or temporary name, which the inbox ignores", field_name)
    path = folder / candidate
    real_folder = folder.resolve()
    if path.is_symlink() or path.exists():
        real = path.resolve()
        if real != real_folder and real_folder not in real.parents:
            raise JobFileError(source, f"{relative!r} is a link leading out of the job's folder", field_name)
    return path


Signature = tuple[int, int]


def signature(path: Path) -> Optional[Signature]:
    """(size, mtime in ns) of a file, None when it does not exist (or is not a file)."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not os.path.isfile(path):
        return None
    return st.st_size, st.st_mtime_ns


@dataclass
class SettleTracker:
    """Tells when a file's size and mtime have stayed the same for ``settle_seconds``."""

    settle_seconds: float
    stat: Callable[[Path], Optional[Signature]] = signature
    _seen: dict[Path, tuple[Signature, float]] = field(default_factory=dict)

    def settled(self, path: Path, now: float) -> bool:
        current = self.stat(path)
        if current is None:
            self._seen.pop(path, None)
            return False
        previous = self._seen.get(path)
        if previous is None or previous[0] != current:
            self._seen[path] = (current, now)
            return self.settle_seconds == 0
        return now - previous[1] >= self.settle_seconds

    def stable_for(self, path: Path, now: float) -> float:
        previous = self._seen.get(path)
        return 0.0 if previous is None else now - previous[1]

    def forget(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self._seen.pop(path, None)


def unique_path(folder: Path, stem: str, suffixes: Iterable[str] = ("",)) -> tuple[Path, str]:
    """A name ``stem``, ``stem-1``, ... for which no ``folder/<name><suffix>`` exists yet."""
    suffixes = tuple(suffixes)
    counter = 0
    while True:
        name = stem if counter == 0 else f"{stem}-{counter}"
        if not any(os.path.lexists(folder / f"{name}{suffix}") for suffix in suffixes):
            return folder / name, name
        counter += 1


def move_files(files: Iterable[Path], base: Path, destination: Path) -> list[str]:
    """Move files (paths below ``base``) to the same relative paths below ``destination``."""
    moved = []
    for path in files:
        if not os.path.lexists(path):
            continue
        relative = path.relative_to(base)
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        moved.append(str(relative))
    return moved


def remove_empty_dirs(top: Path) -> None:
    """Remove ``top`` and the folders below it that are empty (a drained folder job)."""
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:
            pass
    try:
        top.rmdir()
    except OSError:
        pass
