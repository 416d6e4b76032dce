"""``submit``: place a job file and its images into the inbox the safe way.

The images and then the job file are copied (durably) into a hidden staging folder, which is
renamed into the inbox when complete, so the daemon never sees a job whose files are half
there; the rename never replaces a folder that is already there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from config import JobFileError, Settings, parse_job_file
from processor.files import copy_durably, fsync_dir, rename_noreplace
from processor.inbox import resolve_inside, unique_path


def submit(job_file: Path, settings: Settings) -> Path:
    """Copy ``job_file`` and the images it names into a new folder job in the inbox."""
    job, _ = parse_job_file(job_file.read_bytes(), str(job_file), settings.defaults)
    folder = job_file.parent
    images = {key: resolve_inside(folder, rel, str(job_file), key) for key, rel in job.images().items()}
    for key, path in images.items():
        if not path.is_file():
            raise JobFileError(str(job_file), f"image file {job.images()[key]!r} does not exist", key)
    settings.inbox.mkdir(parents=True, exist_ok=True)
    staging = settings.inbox / f".submit-{os.getpid()}-{job_file.stem}"
    staging.mkdir()
    try:
        for key, path in images.items():
            copy_durably(path, staging / job.images()[key])
        copy_durably(job_file, staging / "job.json")
        fsync_dir(staging)
        target = _move_into_inbox(staging, settings.inbox, job_file.stem)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(settings.inbox)
    return target


def _move_into_inbox(staging: Path, inbox: Path, stem: str) -> Path:
    while True:
        target, _ = unique_path(inbox, stem)
        try:
            rename_noreplace(staging, target)
            return target
        except FileExistsError:
            continue  # another submit took the name in between
