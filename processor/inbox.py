"""The inbox contract: what counts as a job, when its files are ready, where its paths may point.

A job is either a ``*.json`` file directly in the inbox (its images are resolved in the inbox)
or a folder holding ``job.json`` (its images are resolved in that folder, and every file in
the folder belongs to the job). Temporary and hidden names are never looked at. A file is
ready when its size and modification time have not changed for the settle time.

A folder holding ``preset.json`` is a **preset folder** (``inbox/make-it-winter/``): every
image directly in it is a job with the preset's values and that image as image1, named
``<preset>/<image stem>`` and published into ``outbox/<preset>/``; a sub-folder holding
``job.json`` is a folder job whose values go over the preset's. ``preset.json`` and the images
it names (image2, image3: references shared by all its jobs) stay in the folder. Other files
there are left alone, and ``ignored_files`` names them with the reason (``status`` shows them).

Nothing is read through a link or from anything but a regular file: a job file, ``job.json`` or
``preset.json`` that is a symbolic link, a named pipe, a folder or a device is refused (a job
file goes to ``failed/`` naming what it is). A path a job names is looked up as the file system
holds it: ``café.png`` in a job file finds ``café.png`` written in decomposed form (NFD, as
macOS and many SMB clients write names), as long as only one name matches.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from config import JobFileError
from stages.formats import readable_suffixes, unreadable_reason

FOLDER_JOB_FILE = "job.json"
PRESET_FILE = "preset.json"
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
    preset: Optional[str] = None  # the preset folder's name (its jobs are named "<preset>/<name>")
    image: Optional[Path] = None  # an image dropped into a preset folder: the job's image1

    @property
    def preset_folder(self) -> Optional[Path]:
        if self.preset is None:
            return None
        return self.folder if self.image is not None else self.folder.parent

    @property
    def preset_file(self) -> Optional[Path]:
        folder = self.preset_folder
        return folder / PRESET_FILE if folder is not None else None

    @property
    def output_stem(self) -> str:
        """The default output name: the job's name without its preset."""
        return self.name.rpartition("/")[2]

    def owned_files(self, images: Iterable[Path] = (), links: bool = False) -> list[Path]:
        """Every file that belongs to this job (and leaves the inbox with it): the whole folder,
        the file and its images, or the image dropped into a preset folder. Symbolic links are
        never ingested (their target may lie anywhere); ``links`` includes them as links, for
        moving a rejected job out of the inbox whole."""
        if self.image is not None:
            return [self.image]
        if self.is_folder:
            return sorted(p for p in self.folder.rglob("*")
                          if ((not p.is_dir() or p.is_symlink()) if links else (p.is_file() and not p.is_symlink()))
                          and not _hidden_below(p, self.folder))
        return [self.job_file, *images]


def readable(name: str) -> str:
    """A file name as text: bytes that are not UTF-8 become U+FFFD (names, sources, outputs)."""
    return os.fsencode(name).decode("utf-8", "replace")


def _hidden_below(path: Path, top: Path) -> bool:
    return any(is_ignored(part) for part in path.relative_to(top).parts)


def present(path: Path) -> bool:
    """Whether a name is there as anything but a folder (a file, a link, a pipe...): a
    ``job.json`` that is not a file is a job to refuse, not something to overlook."""
    try:
        return not stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def find_candidates(inbox: Path) -> list[Candidate]:
    """Job files in the inbox, oldest first by name order within a scan. A ``*.json`` name that
    is not a regular file (a link, a pipe) is a candidate too, which ingest refuses."""
    found = []
    for entry in sorted(os.scandir(inbox), key=lambda e: e.name):
        if is_ignored(entry.name):
            continue
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False) and entry.name.lower().endswith(".json"):
            found.append(Candidate(readable(path.stem), path, inbox, readable(entry.name), False))
        elif entry.is_dir(follow_symlinks=False) and present(path / PRESET_FILE):
            found += preset_candidates(path)
        elif entry.is_dir(follow_symlinks=False) and present(path / FOLDER_JOB_FILE):
            found.append(Candidate(readable(entry.name), path / FOLDER_JOB_FILE, path,
                                   f"{readable(entry.name)}/{FOLDER_JOB_FILE}", True))
    return found


def is_image_name(name: str) -> bool:
    """A name ending as a format the daemon reads (Pillow's, HEIC with pillow-heif)."""
    return name.lower().endswith(readable_suffixes())


def ignored_files(inbox: Path) -> list[tuple[str, str]]:
    """Files in preset folders that no job will take, as (path relative to the inbox, why)."""
    found = []
    try:
        entries = sorted(os.scandir(inbox), key=lambda e: e.name)
    except OSError:
        return []
    for top in entries:
        if is_ignored(top.name) or not top.is_dir(follow_symlinks=False) or not os.path.isfile(Path(top.path) / PRESET_FILE):
            continue
        shared = preset_references(Path(top.path) / PRESET_FILE)
        for entry in sorted(os.scandir(top.path), key=lambda e: e.name):
            if (is_ignored(entry.name) or entry.name == PRESET_FILE or entry.name in shared
                    or not entry.is_file(follow_symlinks=False) or is_image_name(entry.name)):
                continue
            found.append((f"{readable(top.name)}/{readable(entry.name)}", unreadable_reason(entry.name)))
    return found


def preset_candidates(folder: Path) -> list[Candidate]:
    """The jobs in a preset folder: its images (but the preset's own references) and its
    sub-folders holding ``job.json``."""
    preset = readable(folder.name)
    shared = preset_references(folder / PRESET_FILE)
    found = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if is_ignored(entry.name) or unicodedata.normalize("NFC", entry.name) in shared:
            continue
        path = Path(entry.path)
        if entry.is_file(follow_symlinks=False) and is_image_name(entry.name):
            found.append(Candidate(f"{preset}/{readable(path.stem)}", folder / PRESET_FILE, folder,
                                   f"{preset}/{readable(entry.name)}", False, preset=preset, image=path))
        elif entry.is_dir(follow_symlinks=False) and present(path / FOLDER_JOB_FILE):
            found.append(Candidate(f"{preset}/{readable(entry.name)}", path / FOLDER_JOB_FILE, path,
                                   f"{preset}/{readable(entry.name)}/{FOLDER_JOB_FILE}", True, preset=preset))
    return found


def preset_references(preset_file: Path) -> set[str]:
    """The file names a preset gives as image2/image3 (read leniently: a broken preset holds
    every job of its folder anyway)."""
    try:
        data = json.loads(read_regular(preset_file, 1 << 20, preset_file.name))
    except (OSError, ValueError):  # JobFileError is a ValueError
        return set()
    if not isinstance(data, dict):
        return set()
    return {unicodedata.normalize("NFC", os.path.normpath(value))
            for key in ("image2", "image3") if isinstance(value := data.get(key), str)}


def not_a_file(path: Path, follow: bool = False) -> Optional[str]:
    """None for a regular file; else what is there instead, in words ("missing", "a named pipe
    (FIFO)"...). ``follow``: a link counts as what it leads to."""
    try:
        mode = (os.stat(path) if follow else os.lstat(path)).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def read_regular(path: Path, limit: int, source: str) -> bytes:
    """The bytes of a regular file of the inbox, never through a symbolic link, never blocking on
    a pipe; a JobFileError (for ``source``) says what the name is instead, or that the file is
    larger than ``limit`` bytes."""
    what = not_a_file(path)
    if what is None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            what = "a symbolic link"
        else:
            with os.fdopen(fd, "rb") as handle:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    what = "not a regular file"
                elif st.st_size > limit:
                    raise JobFileError(source, f"{st.st_size} bytes is more than max_job_file_bytes={limit}")
                else:
                    return handle.read(limit + 1)
    if what == "missing":
        raise FileNotFoundError(errno.ENOENT, "no such file", str(path))
    raise refusal(path, what, source)


def refusal(path: Path, what: str, source: str) -> JobFileError:
    """The error for a job file (or preset file) that is ``what`` instead of a regular file."""
    return JobFileError(source, f"{path.name} is {what}, not a file; the daemon reads only regular files that "
                        "are in the inbox itself (links are never followed)")


def _as_stored(folder: Path, relative: str, source: str, field_name: str) -> Path:
    """``folder/relative`` with each name as the file system holds it: a name that is not there
    as written is looked up by its Unicode normal form (NFC), so a job file's composed "é"
    finds a file written with a decomposed one and the other way round."""
    current = folder
    parts = Path(relative).parts
    for index, part in enumerate(parts):
        following = current / part
        if os.path.lexists(following) or part.isascii():
            current = following
            continue
        wanted = unicodedata.normalize("NFC", part)
        try:
            names = os.listdir(current)
        except OSError:
            return current.joinpath(*parts[index:])
        matches = sorted(name for name in names if unicodedata.normalize("NFC", name) == wanted)
        if len(matches) > 1:
            raise JobFileError(source, f"{relative!r} matches {len(matches)} files whose names differ only in "
                               f"their Unicode form ({', '.join(map(ascii, matches))}); rename one of them",
                               field_name)
        current = current / matches[0] if matches else following
    return current


def resolve_inside(folder: Path, relative: str, source: str, field_name: str) -> Path:
    """The path a job file names, as the file system holds it, refusing anything that leads out
    of the job's folder."""
    if "\x00" in relative:
        raise JobFileError(source, "contains a NUL character", field_name)
    candidate = Path(relative)
    if candidate.is_absolute() or relative.startswith(("/", "\\")) or (len(relative) > 1 and relative[1] == ":"):
        raise JobFileError(source, f"absolute paths are not allowed ({relative!r}); give a path relative to the job file", field_name)
    if ".." in candidate.parts:
        raise JobFileError(source, f"'..' is not allowed in paths ({relative!r})", field_name)
    if any(is_ignored(part) for part in candidate.parts):
        raise JobFileError(source, f"{relative!r} is a hidden or temporary name, which the inbox ignores", field_name)
    path = _as_stored(folder, relative, source, field_name)
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
    """Tells when a file's size and mtime have stayed the same for ``settle_seconds``.

    Where the watcher hears a writer close a file (or a file renamed into place), it records
    the file's signature at that moment in ``closed``; such a file is ready once it has kept
    that signature for ``settle_after_close``, which is much shorter than ``settle_seconds``.
    """

    settle_seconds: float
    settle_after_close: float = 0.5
    stat: Callable[[Path], Optional[Signature]] = signature
    closed: dict[Path, tuple[Signature, float]] = field(default_factory=dict)
    _seen: dict[Path, tuple[Signature, float]] = field(default_factory=dict)

    def settled(self, path: Path, now: float) -> bool:
        current = self.stat(path)
        if current is None:
            self._seen.pop(path, None)
            return False
        at_close = self.closed.get(path)
        if at_close is not None and at_close[0] == current and now - at_close[1] >= self.settle_after_close:
            return True
        previous = self._seen.get(path)
        if previous is None or previous[0] != current:
            self._seen[path] = (current, now)
            return self.settle_seconds == 0
        return now - previous[1] >= self.settle_seconds

    def saw_close(self, path: Path, now: float) -> None:
        """A writer closed ``path`` (or it was renamed into place) at ``now``."""
        current = self.stat(path)
        if current is not None:
            self.closed[path] = (current, now)

    def stable_for(self, path: Path, now: float) -> float:
        previous = self._seen.get(path)
        return 0.0 if previous is None else now - previous[1]

    def forget(self, paths: Iterable[Path]) -> None:
        for path in paths:
            self._seen.pop(path, None)
            self.closed.pop(path, None)


def unique_path(folder: Path, stem: str, suffixes: Iterable[str] = ("",)) -> tuple[Path, str]:
    """A name ``stem``, ``stem-1``, ... for which no ``folder/<name><suffix>`` exists yet."""
    suffixes = tuple(suffixes)
    counter = 0
    while True:
        name = stem if counter == 0 else f"{stem}-{counter}"
        if not any(os.path.lexists(folder / f"{name}{suffix}") for suffix in suffixes):
            return folder / name, name
        counter += 1


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
