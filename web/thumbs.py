"""Files the web serves: a job's output, its manifest, and thumbnails of its images.

Every file is found from the job's record (by its id), never from a path in the request, and
is served only if it lies inside the folder it belongs to: outputs and manifests in the outbox,
inputs in the work folder (before the job finished) or the archive (after). Thumbnails are made
once, on first request, and kept in ``<work>/thumbs/`` (a cache: removing it is harmless). With
``originals = "delete"`` a finished job's inputs are gone, so its "before" thumbnail is shown only
if it was made while the job was still running.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional

from PIL import Image, ImageOps

from config import Settings
from db import Job
from processor import files

WHICH = ("output", "image1", "image2", "image3")
SIZE = 320


def inside(path: Path, root: Path) -> Optional[Path]:
    """``path`` resolved, if it is a regular file inside ``root``; else None."""
    try:
        real = path.resolve(strict=True)
        root_real = root.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if root_real not in real.parents or not real.is_file():
        return None
    return real


def output_file(settings: Settings, job: Job) -> Optional[Path]:
    if job.state != "done" or job.result is None:
        return None
    return inside(Path(job.result.image), settings.outbox)


def manifest_file(settings: Settings, job: Job) -> Optional[Path]:
    if job.state != "done" or job.result is None or not job.result.manifest:
        return None
    return inside(Path(job.result.manifest), settings.outbox)


def input_file(settings: Settings, job: Job, which: str) -> Optional[Path]:
    name = job.spec.images.get(which)
    if not name:
        return None
    found = inside(Path(job.work_dir) / "originals" / name, settings.work)
    if found is None and job.result is not None and job.result.originals.startswith("/"):
        found = inside(Path(job.result.originals) / name, settings.archive)
    return found


class Thumbnails:
    def __init__(self, settings: Settings, size: int = SIZE):
        self.settings = settings
        self.folder = settings.work / "thumbs"
        self.size = size

    def cached(self, job_id: int, which: str) -> Path:
        return self.folder / f"{job_id}-{which}.jpg"

    def get(self, job: Job, which: str) -> Optional[Path]:
        """The thumbnail of a job's ``which`` (output, image1..3), made now if need be."""
        if which not in WHICH:
            return None
        target = self.cached(job.id, which)
        if target.is_file():
            return target
        source = output_file(self.settings, job) if which == "output" else input_file(self.settings, job, which)
        if source is None:
            return None
        data = self._make(source)
        if data is None:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        files.write_atomic(target, data)
        return target

    def _make(self, source: Path) -> Optional[bytes]:
        try:
            with Image.open(source) as image:
                if image.width * image.height > self.settings.max_image_pixels:
                    return None
                image.draft("RGB", (self.size * 2, self.size * 2))  # JPEG: decode at a fraction of the size
                picture = ImageOps.exif_transpose(image).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
        picture.thumbnail((self.size, self.size))
        buffer = io.BytesIO()
        picture.save(buffer, format="JPEG", quality=80)
        return buffer.getvalue()
