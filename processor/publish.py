"""The outbox, failed/ and archive/ contracts.

- outbox: ``<name>.<png|jpg|webp>`` then ``<name>.json`` (the manifest), each written under a
  hidden temporary name beside the target and renamed into place, so a watcher downstream
  never sees half a file. A name already taken gets a suffix (``name-1``), never an overwrite;
  the chosen name is reserved in the database first, so a publish repeated after a crash
  rewrites the same files instead of making a duplicate.
- failed: ``<name>.error.json`` and a folder ``<name>/`` with the job's original files.
- archive: a folder ``<job id>-<name>/`` with the original files of a finished job.

A job from a preset folder is named ``<preset>/<name>``: its files go into the same sub-folder
of failed/ and archive/ (``failed/<preset>/<name>.error.json``, ``archive/<preset>/<id>-<name>/``),
as its outputs go into ``outbox/<preset>/``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from PIL import Image, PngImagePlugin

from config import Settings
from processor.faults import fault_point
from processor.inbox import move_files, unique_path
from stages.checkpoint import sha256_bytes, write_atomic
from stages.definitions import to_8bit

log = logging.getLogger(__name__)

EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


def image_bytes(image: torch.Tensor, output_format: str, quality: int, text: dict[str, str]) -> bytes:
    """Encode an [H, W, 3] image, 8-bit or float 0..1; PNGs carry ``text`` as tEXt chunks."""
    picture = Image.fromarray(to_8bit(image).numpy(), "RGB")
    buffer = io.BytesIO()
    if output_format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        picture.save(buffer, format="PNG", pnginfo=info)
    elif output_format == "jpg":
        picture.save(buffer, format="JPEG", quality=quality)
    elif output_format == "webp":
        picture.save(buffer, format="WEBP", quality=quality)
    else:
        raise ValueError(f"unknown output format {output_format!r}")
    return buffer.getvalue()


def outbox_for(settings: Settings, spec: dict[str, Any]) -> Path:
    """The folder a job publishes into: the outbox, or its preset's sub-folder of it."""
    subfolder = spec.get("outbox_subfolder")
    return settings.outbox / subfolder if subfolder else settings.outbox


def choose_output_name(outbox: Path, wanted: str, output_format: str) -> str:
    """A base name free for both the image and the manifest."""
    _, name = unique_path(outbox, wanted, (EXTENSIONS[output_format], ".json"))
    return name


def publish(outbox: Path, name: str, image: bytes, output_format: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Write image then manifest into the outbox under the reserved ``name``."""
    outbox.mkdir(parents=True, exist_ok=True)
    image_path = outbox / f"{name}{EXTENSIONS[output_format]}"
    manifest_path = outbox / f"{name}.json"
    # The name is reserved for this job, so nobody else writes it: a fixed temporary name means
    # that a publish repeated after a crash replaces the leftover of the first attempt.
    fault_point("publish.write")
    write_atomic(image_path, image, before_rename=lambda: fault_point("publish.rename"), shared=False)
    fault_point("publish.image")
    manifest = {**manifest, "output": {**manifest.get("output", {}), "file": image_path.name,
                                       "sha256": sha256_bytes(image), "bytes": len(image)}}
    write_atomic(manifest_path, (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode(), shared=False)
    fault_point("publish.manifest")
    return {"image": str(image_path), "manifest": str(manifest_path), "sha256": sha256_bytes(image)}


def _write_error(failed: Path, name: str, report: dict[str, Any]) -> Path:
    path = failed / f"{name}.error.json"
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def report_rejected(settings: Settings, name: str, base: Path, files: Iterable[Path], *, source: str,
                    error: str, field: Optional[str]) -> Path:
    """Move a job that was never ingested to failed/, with a report naming the problem."""
    failed, name = _nested(settings.failed, name)
    failed.mkdir(parents=True, exist_ok=True)
    folder, name = unique_path(failed, name, ("", ".error.json"))
    moved = move_files(files, base, folder)
    report = {"job": name, "source": source, "error": error, "field": field, "kind": "permanent",
              "stage": "ingest", "files": moved, "at": _now(),
              "hint": "fix the job file, then move the files in this folder back into the inbox"}
    return _write_error(failed, name, report)


def report_failed(settings: Settings, name: str, originals: Path, report: dict[str, Any]) -> Path:
    """Copy a failed job's originals to failed/ beside its error report (work keeps its copy for retry)."""
    failed, name = _nested(settings.failed, name)
    failed.mkdir(parents=True, exist_ok=True)
    folder, name = unique_path(failed, name, ("", ".error.json"))
    copied = []
    if originals.is_dir():
        shutil.copytree(originals, folder)
        copied = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return _write_error(failed, name, {**report, "files": copied, "at": _now(),
                                       "hint": "fix the problem, then run: python run.py retry "
                                               f"{report.get('job_id')} (or move these files back into the inbox)"})


def archive_originals(settings: Settings, job_id: int, name: str, originals: Path) -> Optional[Path]:
    """Move a finished job's originals to archive/ or delete them, as configured."""
    if not originals.is_dir():
        return None
    if settings.originals == "delete":
        shutil.rmtree(originals)
        return None
    archive, name = _nested(settings.archive, name)
    archive.mkdir(parents=True, exist_ok=True)
    target, _ = unique_path(archive, f"{job_id}-{name}")
    shutil.move(str(originals), str(target))
    os.utime(target)  # its age is the time it was archived (retention goes by it)
    return target


def _nested(folder: Path, name: str) -> tuple[Path, str]:
    """``preset/name`` -> (``folder/preset``, ``name``); a plain name stays in ``folder``."""
    parent, _, leaf = name.rpartition("/")
    return (folder / parent if parent else folder), leaf


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
