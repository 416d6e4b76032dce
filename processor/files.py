"""The file-system rules, in one place: atomic writes, durable copies, digests, publishing
without replacing, and removing only the very file that was looked at.

- **Atomic write**: the bytes go to a hidden temporary file in the same folder, are fsynced,
  renamed into place, and the folder is fsynced: a reader sees the old file or the whole new
  one, and after a power cut the new name points to the whole file.
- **Durable copy**: the bytes of a file, hashed while copied, fsynced. Only the bytes and the
  modification time travel: never the set-user-ID, set-group-ID or sticky bits, never the
  owner, never an execute bit; the copy's mode comes from the daemon's umask.
- **Publish without replacing**: ``rename_noreplace`` moves a finished temporary file onto a name
  only if nothing is there (``renameat2(RENAME_NOREPLACE)``, else a hard link), so an output is
  never overwritten, whatever the database believes.
- **Remove what was ingested, nothing else**: ``FileIdentity`` is a file's device, inode, size
  and modification time when it was read; ``remove_if_unchanged`` first moves the name aside,
  then deletes it only if it is still that file, and puts a newer file back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def digest_file(path: Path) -> str:
    """The sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: Path, unique: bool = True) -> Path:
    """A hidden name beside ``path`` that the inbox and outbox conventions ignore. ``unique``:
    other processes may write the same path at once; else a retry after a crash reuses it."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp" if unique else f".{path.name}.tmp")


def write_temporary(path: Path, data: bytes, mode: Optional[int] = None, unique: bool = True) -> Path:
    """Write and fsync ``data`` under a temporary name beside ``path``; the temporary path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, unique)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)  # the mode asked for, whatever the umask
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes, *, mode: Optional[int] = None, unique: bool = True,
                 before_rename: Optional[Callable[[], None]] = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old file or the whole new one."""
    tmp = write_temporary(path, data, mode, unique)
    try:
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes, *, unique: bool = True,
              before_rename: Optional[Callable[[], None]] = None) -> None:
    """Write ``data`` to ``path`` atomically, refusing (FileExistsError) when ``path`` exists.
    ``unique=False`` for a name reserved to the caller: a retry after a crash then replaces the
    temporary file the first attempt left."""
    tmp = write_temporary(path, data, unique=unique)
    try:
        if before_rename is not None:
            before_rename()
        rename_noreplace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# Renaming without replacing -------------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@functools.cache
def libc() -> Optional[ctypes.CDLL]:
    """The C library, found once (``find_library`` runs ``ldconfig``); None where it cannot load."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _renameat2() -> Optional[Callable]:
    function = getattr(libc(), "renameat2", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2_function = _renameat2()


def rename_noreplace(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` atomically unless ``target`` exists (FileExistsError).

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and file system have it; else a hard link
    (which refuses an existing name too) and the removal of the source; else, on a file system
    with neither (some network shares), a rename after a check, which a concurrent writer of
    the same name could still race.
    """
    if _renameat2_function is not None:
        result = _renameat2_function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target),
                                     _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(target))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(source))
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


# Copies ---------------------------------------------------------------------------------------

def copy_durably(source: Path, target: Path, mode: Optional[int] = None) -> tuple[str, int]:
    """Copy a file's bytes (and modification time), fsync, and return the sha256 and size of
    exactly the bytes copied. The copy never carries the source's owner or special mode bits."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o666 if mode is None else mode)
        with os.fdopen(fd, "wb") as dst:
            while block := src.read(CHUNK):
                digest.update(block)
                dst.write(block)
                size += len(block)
            dst.flush()
            os.fsync(dst.fileno())
        source_stat = os.fstat(src.fileno())
    if mode is not None:
        os.chmod(target, mode)
    os.utime(target, ns=(source_stat.st_atime_ns, source_stat.st_mtime_ns), follow_symlinks=False)
    return digest.hexdigest(), size


def copy_stream(source: BinaryIO, target: Path, limit: Optional[int] = None) -> tuple[str, int]:
    """Write what a readable stream holds to a new file (refusing an existing one), fsync, and
    return its sha256 and size. More than ``limit`` bytes raise ``ValueError`` (the file stays
    behind for the caller to remove with its folder)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
    with os.fdopen(fd, "wb") as dst:
        while block := source.read(CHUNK):
            size += len(block)
            if limit is not None and size > limit:
                raise ValueError(f"more than {limit} bytes")
            digest.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest(), size


def copy_tree(source: Path, target: Path) -> list[str]:
    """Copy every regular file below ``source`` to ``target`` (links and special files are
    left out); the copied paths, relative and sorted."""
    copied = []
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        relative = path.relative_to(source)
        copy_durably(path, target / relative)
        copied.append(relative.as_posix())
    return copied


def move_files(paths: Iterable[Path], base: Path, destination: Path) -> list[str]:
    """Move files (paths below ``base``) to the same relative paths below ``destination``, each
    as ``move_file`` does; those already gone are left out. Their relative paths, POSIX style."""
    moved = []
    for path in paths:
        if os.path.lexists(path):
            relative = path.relative_to(base)
            move_file(path, destination / relative)
            moved.append(relative.as_posix())
    return moved


def move_file(source: Path, target: Path) -> None:
    """Move a file into one of the daemon's folders: a rename on the same file system (the file
    keeps its owner, whose file it is), else a durable copy of the bytes and the removal of the
    source; either way without set-user-ID, set-group-ID or sticky bits."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        else:
            copy_durably(source, target)
        os.unlink(source)
    plain_mode(target)


def plain_mode(path: Path) -> None:
    """Drop the set-user-ID, set-group-ID and sticky bits of a file moved into our folders."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode) and mode & _SPECIAL_BITS:
            os.chmod(path, stat.S_IMODE(mode) & ~_SPECIAL_BITS)
    except OSError:
        pass


# Removing exactly what was read -----------------------------------------------------------------

@dataclass(frozen=True)
class FileIdentity:
    """Which file a name pointed to when it was read: device, inode, size, mtime."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path, follow: bool = False) -> "FileIdentity":
        """The name itself (a link as a link), or with ``follow`` the file it leads to."""
        st = os.stat(path) if follow else os.lstat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def of_open(cls, fd: int) -> "FileIdentity":
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def remove_if_unchanged(path: Path, identity: FileIdentity) -> bool:
    """Remove ``path`` only if it is still the file ``identity`` describes; True when removed.

    The name is first renamed to a hidden one (atomic: whatever is at ``path`` then moves), the
    moved file is checked, and a file that is not the one read (a new version renamed into place
    meanwhile) is put back, without replacing anything that arrived at ``path`` in between.
    """
    aside = path.with_name(f".{path.name}.{os.getpid()}.removing")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        moved = FileIdentity.of(aside)
    except FileNotFoundError:
        return False
    if moved == identity:
        os.unlink(aside)
        return True
    try:
        rename_noreplace(aside, path)
    except FileExistsError:
        keep = unused_name(path.parent, f"{path.stem} (newer)", path.suffix)
        os.rename(aside, keep)
        log.warning("%s changed while it was ingested and was replaced again meanwhile; the changed "
                    "version is kept as %s", path, keep.name)
    return False


def unused_name(folder: Path, stem: str, suffix: str = "") -> Path:
    """``folder/stem<suffix>``, or ``stem-1``, ``stem-2``... whichever does not exist yet."""
    counter = 0
    while True:
        candidate = folder / (f"{stem}{suffix}" if counter == 0 else f"{stem}-{counter}{suffix}")
        if not os.path.lexists(candidate):
            return candidate
        counter += 1


def make_private_dir(path: Path) -> None:
    """Create a folder (and its parents) readable only by the daemon's user; an existing one is
    tightened when the daemon owns it."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
    try:
        if path.stat().st_uid == os.geteuid() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, stat.S_IMODE(path.stat().st_mode) & ~0o077)
    except OSError:
        pass


def create_private_file(path: Path) -> None:
    """Create ``path`` empty and readable by its owner only, unless it exists (so that what the
    daemon keeps there, such as the database with every prompt, is private from the start)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE))
    except FileExistsError:
        pass


def private_files(paths: Iterable[Path]) -> None:
    """Make existing files readable only by their owner (the database and its journal files)."""
    for path in paths:
        try:
            if path.exists() and path.stat().st_uid == os.geteuid():
                os.chmod(path, stat.S_IMODE(path.stat().st_mode) & ~0o077)
        except OSError:
            pass
