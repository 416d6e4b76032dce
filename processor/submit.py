"""``submit``: place a job file and its images into the inbox the safe way.

Images are copied first under hidden temporary names and renamed into place; the job file
comes last, so the daemon never sees a job whose files are half there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from config import JobFileError, Settings, parse_job_file
from processor.inbox import resolve_inside, unique_path
from stages.checkpoint import fsync_dir


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.submit.tmp")
    shutil.copyfile(source, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, target)


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
            _place(path, staging / job.images()[key])
        _place(job_file, staging / "job.json")
        fsync_dir(staging)
        target, _ = unique_path(settings.inbox, job_file.stem)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(settings.inbox)
    return target
