"""``submit`` and uploads: place jobs into the inbox the safe way.

Every file of a job is copied (durably) into a hidden staging folder in the inbox, which the
daemon ignores, and the job appears only when complete: a folder job is the staging folder
renamed into the inbox, a photo for a preset is renamed from it into the preset's folder. A
rename never replaces what is there. So nothing a person submits, from the command line or the
web page, bypasses ingest or is seen half-written; and a submission that fails validation
leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Optional

from config import JobFileError, Settings, job_over_preset, parse_job_file, parse_preset
from processor.files import copy_durably, copy_stream, fsync_dir, rename_noreplace
from processor.inbox import PRESET_FILE, is_ignored, is_image_name, resolve_inside, unique_path
from stages.prepare import ImageError, load_image


def submit(job_file: Path, settings: Settings) -> Path:
    """Copy ``job_file`` and the images it names into a new folder job in the inbox."""
    job, _ = parse_job_file(job_file.read_bytes(), str(job_file), settings.defaults)
    folder = job_file.parent
    images = {key: resolve_inside(folder, rel, str(job_file), key) for key, rel in job.images().items()}
    for key, path in images.items():
        if not path.is_file():
            raise JobFileError(str(job_file), f"image file {job.images()[key]!r} does not exist", key)
    with Staging(settings.inbox) as staging:
        for key, path in images.items():
            copy_durably(path, staging.folder / job.images()[key])
        copy_durably(job_file, staging.folder / "job.json")
        return staging.place_folder_job(job_file.stem)


class Staging:
    """A hidden folder in the inbox where a submission is put together; removed with whatever is
    left in it when the ``with`` block ends."""

    def __init__(self, inbox: Path):
        self.inbox = inbox
        inbox.mkdir(parents=True, exist_ok=True)
        self.folder = inbox / f".submit-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.folder.mkdir()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc: Any) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def place_folder_job(self, stem: str, folder: Optional[Path] = None) -> Path:
        """Rename the staging folder (or ``folder`` inside it) into the inbox as a folder job."""
        source = folder or self.folder
        fsync_dir(source)
        target = _rename_unique(source, self.inbox, stem, "")
        fsync_dir(self.inbox)
        return target

    def place_in_preset(self, path: Path, preset_folder: Path) -> Path:
        """Rename a staged photo into a preset folder, under its own name or the next free one."""
        target = _rename_unique(path, preset_folder, path.stem, path.suffix)
        fsync_dir(preset_folder)
        return target


def _rename_unique(source: Path, folder: Path, stem: str, suffix: str) -> Path:
    while True:
        base, _ = unique_path(folder, stem, (suffix,))
        target = base.with_name(base.name + suffix)
        try:
            rename_noreplace(source, target)
            return target
        except FileExistsError:
            continue  # another submission took the name in between


# Uploads ------------------------------------------------------------------------------------------

class UploadError(ValueError):
    """An upload that is refused; the message names the file or field."""


def upload_name(name: str) -> str:
    """A file name from an upload, checked like an inbox drop: a plain image name that the inbox
    would not ignore."""
    base = name
    if not base or base in (".", "..") or any(c in base for c in "/\\\x00"):
        raise UploadError(f"{name!r}: not a plain file name")
    if is_ignored(base):
        raise UploadError(f"{base!r}: a hidden or temporary name, which the inbox ignores")
    if not is_image_name(base):
        raise UploadError(f"{base!r}: not an image name (.png, .jpg, .jpeg, .webp, ...)")
    if len(base.encode()) > 200:
        raise UploadError(f"{base[:40]!r}...: the name is too long")
    return base


def preset_names(inbox: Path) -> list[str]:
    """The preset folders of the inbox."""
    if not inbox.is_dir():
        return []
    return sorted(entry.name for entry in os.scandir(inbox)
                  if not is_ignored(entry.name) and entry.is_dir(follow_symlinks=False)
                  and (Path(entry.path) / PRESET_FILE).is_file())


def submit_upload(settings: Settings, photos: list[tuple[str, BinaryIO]], *, preset: Optional[str] = None,
                  prompt: Optional[str] = None, values: Optional[dict[str, Any]] = None,
                  job_file: Optional[bytes] = None, limit: Optional[int] = None) -> list[Path]:
    """Put uploaded photos into the inbox: each photo into ``preset``'s folder, or each photo as a
    folder job with ``prompt`` (and job file ``values``), or all of them as one folder job with
    ``job_file``. Every photo and the job are validated as ingest would; on any error
    (``UploadError``) nothing is left in the inbox. The placed paths."""
    if sum(x is not None for x in (preset, prompt, job_file)) != 1:
        raise UploadError("give exactly one of: a preset, a prompt, a job file")
    if not photos:
        raise UploadError("no photo uploaded")
    names = [upload_name(name) for name, _ in photos]
    if len(set(names)) != len(names):
        raise UploadError("two uploaded files have the same name")
    preset_folder = _usable_preset(settings, preset) if preset is not None else None
    if job_file is not None:
        job = _checked_job(job_file, "uploaded job file", settings)
        missing = set(job.images().values()) - set(names)
        if missing:
            raise UploadError(f"uploaded job file: image {sorted(missing)[0]!r} was not uploaded")
    jobs = []
    if prompt is not None:
        for name in names:
            data = {**(values or {}), "prompt": prompt, "image1": name}
            jobs.append(json.dumps(data).encode())
            _checked_job(jobs[-1], f"the job for {name}", settings)
    with Staging(settings.inbox) as staging:
        staged = []
        remaining = limit
        for name, (_, stream) in zip(names, photos):
            target = staging.folder / name
            try:
                _, size = copy_stream(stream, target, remaining)
            except ValueError as exc:
                raise UploadError(f"{name}: the upload is larger than max_upload_bytes") from exc
            remaining = None if remaining is None else remaining - size
            try:
                load_image(target, name, settings.max_image_pixels)
            except ImageError as exc:
                raise UploadError(str(exc)) from exc
            staged.append(target)
        if preset_folder is not None:
            return [staging.place_in_preset(path, preset_folder) for path in staged]
        if job_file is not None:
            copy_stream(io.BytesIO(job_file), staging.folder / "job.json")
            return [staging.place_folder_job("upload")]
        placed = []
        for path, job_bytes in zip(staged, jobs):
            folder = staging.folder / f"job-{len(placed)}"
            folder.mkdir()
            os.rename(path, folder / path.name)
            copy_stream(io.BytesIO(job_bytes), folder / "job.json")
            placed.append(staging.place_folder_job(path.stem, folder))
        return placed


def _checked_job(raw: bytes, label: str, settings: Settings):
    try:
        job, _ = parse_job_file(raw, label, settings.defaults)
    except JobFileError as exc:
        raise UploadError(str(exc)) from exc
    return job


def _usable_preset(settings: Settings, preset: str) -> Path:
    if preset not in preset_names(settings.inbox):
        raise UploadError(f"no preset folder {preset!r} in the inbox")
    folder = settings.inbox / preset
    path = folder / PRESET_FILE
    try:
        values = parse_preset(path.read_bytes(), f"{preset}/{PRESET_FILE}", settings.defaults)
        job_over_preset(values, None, "image.png", f"{preset}/{PRESET_FILE}", settings.defaults)
    except (JobFileError, OSError) as exc:
        raise UploadError(f"the preset {preset!r} is not usable: {exc}") from exc
    return folder
