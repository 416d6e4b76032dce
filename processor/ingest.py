"""Ingest: turn a ready job in the inbox into a queued job, exactly once.

1. Wait until the job file and every file it names exist and have settled.
2. Copy the job's files into ``work/jobs/<dir>/originals``, hashing while copying, fsync.
3. Record the job with its input hashes in the database.
4. Only then remove the files from the inbox, and mark the job's inbox copy as cleared.

A crash between 3 and 4 leaves the files in the inbox; the next scan finds a job recorded
from the same bytes whose inbox copy was never cleared, and only finishes step 4. Bad job
files go to ``failed/`` with their files and a report naming the field; nothing is deleted.

An image in a preset folder is a job with the preset's values; a preset that is not usable
(bad JSON, a bad value) fails none of its images: they wait, an alarm names the problem, and
they are ingested once the preset is fixed. The preset file and its reference images stay.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from config import (IMAGE_KEYS, InputFile, check_job_name, JobFile, JobFileError, JobSpec, Settings, StageParameters, job_over_preset,
                    parse_job_file, parse_preset)
from db import Database, jobs
from processor import publish
from processor.files import copy_durably, digest_file, fsync_dir
from processor.faults import fault_point
from processor.inbox import (PRESET_FILE, Candidate, SettleTracker, find_candidates, remove_empty_dirs,
                             resolve_inside)
from processor.logs import job_context
from stages.prepare import ImageError, load_image

log = logging.getLogger(__name__)


@dataclass
class Waiting:
    """Why a candidate is not ingested yet."""

    first_seen: float
    reason: str = ""
    missing: bool = False  # waiting for a file that does not exist (waiting longer will not help --once)


@dataclass
class ScanResult:
    ingested: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # source -> reason
    inbox_missing: bool = False


class Ingestor:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.tracker = SettleTracker(settings.settle_seconds, settings.settle_after_close)
        self.waiting: dict[str, Waiting] = {}
        self._preset_errors: dict[str, str] = {}  # preset name -> the error last reported
        self._presets_usable: set[str] = set()  # presets found usable since their last error

    def scan(self, now: float) -> ScanResult:
        """Look at everything in the inbox once; ingest what is ready."""
        result = ScanResult()
        inbox = self.settings.inbox
        if not inbox.is_dir():
            result.inbox_missing = True
            return result
        candidates = find_candidates(inbox)
        present = {c.source for c in candidates}
        for gone in set(self.waiting) - present:
            del self.waiting[gone]
        for candidate in candidates:
            waiting = self.waiting.setdefault(candidate.source, Waiting(first_seen=now))
            previous_reason = waiting.reason
            try:
                job_id = self._consider(candidate, waiting, now)
            except JobFileError as exc:
                self._reject(candidate, exc)
                result.failed.append(candidate.source)
                continue
            except OSError as exc:
                # The inbox vanished mid-scan, a file is unreadable, the work disk is full: the
                # files stay where they are and the next scan tries again.
                waiting.reason = f"cannot ingest yet: {exc}"
                log.warning("%s: %s", candidate.source, waiting.reason)
                result.waiting[candidate.source] = waiting.reason
                continue
            except Exception as exc:  # noqa: BLE001 - a fault of ours must not stop the other drops
                waiting.reason = f"unexpected error, left in the inbox: {type(exc).__name__}: {exc}"
                if waiting.reason != previous_reason:
                    log.exception("%s: %s", candidate.source, waiting.reason)
                result.waiting[candidate.source] = waiting.reason
                continue
            if job_id is None:
                result.waiting[candidate.source] = waiting.reason
                if waiting.reason != previous_reason:
                    log.info("%s: not ready: %s", candidate.source, waiting.reason)
            else:
                self.waiting.pop(candidate.source, None)
                result.ingested.append(job_id)
        return result

    # 1. Readiness ---------------------------------------------------------------------------

    def _consider(self, candidate: Candidate, waiting: Waiting, now: float) -> Optional[int]:
        for part in candidate.name.split("/"):  # the preset's folder name and the job's own
            check_job_name(part, candidate.source)
        waiting.missing = False
        if candidate.is_folder:
            # Every file of a folder is watched from the first look, so that they settle
            # together rather than one after the other.
            for path in candidate.owned_files():
                self.tracker.settled(path, now)
        if not self.tracker.settled(candidate.job_file, now):
            waiting.reason = "job file still changing"
            return None
        size = candidate.job_file.stat().st_size
        if size > self.settings.max_job_file_bytes:
            raise JobFileError(candidate.source, f"{size} bytes is more than max_job_file_bytes="
                               f"{self.settings.max_job_file_bytes}")
        parsed = self._parse(candidate, waiting, now)
        if parsed is None:
            return None
        job, params, from_preset = parsed
        images = {key: resolve_inside(candidate.preset_folder if key in from_preset else candidate.folder,
                                      rel, candidate.source, key)
                  for key, rel in job.images().items()}
        for key, path in images.items():
            reason = self._image_not_ready(candidate, key, path, waiting, now)
            if reason:
                waiting.reason = reason
                return None
        if candidate.is_folder and not all(self.tracker.settled(p, now) for p in candidate.owned_files()):
            waiting.reason = "other files in the job folder still changing"
            return None
        return self._ingest(candidate, job, params, images)

    def _parse(self, candidate: Candidate, waiting: Waiting,
               now: float) -> Optional[tuple[JobFile, StageParameters, set[str]]]:
        """The job's values (over its preset's), and which images the preset named; None while
        its preset is not usable."""
        if candidate.preset is None:
            job, params = parse_job_file(candidate.job_file.read_bytes(), candidate.source, self.settings.defaults)
            return job, params, set()
        preset = self._preset(candidate, waiting, now)
        if preset is None:
            return None
        job_raw = candidate.job_file.read_bytes() if candidate.image is None else None
        image1 = candidate.image.name if candidate.image is not None else None
        job, params = job_over_preset(preset, job_raw, image1, candidate.source, self.settings.defaults)
        own = set(json.loads(job_raw)) if job_raw is not None else {"image1"}
        return job, params, {key for key in IMAGE_KEYS if key in preset and key not in own}

    def _preset(self, candidate: Candidate, waiting: Waiting, now: float) -> Optional[dict]:
        """The preset's values; None (the job waits, it does not fail) while it is not usable."""
        name, path = candidate.preset, candidate.preset_file
        if not self.tracker.settled(path, now):
            waiting.reason = f"the preset file {name}/{PRESET_FILE} is still changing"
            return None
        try:
            size = path.stat().st_size
            if size > self.settings.max_job_file_bytes:
                raise JobFileError(f"{name}/{PRESET_FILE}", f"{size} bytes is more than max_job_file_bytes="
                                   f"{self.settings.max_job_file_bytes}")
            preset = parse_preset(path.read_bytes(), f"{name}/{PRESET_FILE}", self.settings.defaults)
        except JobFileError as exc:
            waiting.reason = f"its preset is not usable ({exc}); it waits until the preset is fixed"
            waiting.missing = True  # waiting alone will not help
            self._preset_alarm(name, str(exc))
            return None
        if name not in self._presets_usable:
            self._presets_usable.add(name)
            self._preset_errors.pop(name, None)
            with self.db.begin() as session:  # an alarm raised before (perhaps by an earlier process) ends
                alarm = jobs.last_alarm(session, f"preset {name} ")
                if alarm is not None and alarm.level == "error":
                    log.warning("preset %s is usable again", name)
                    jobs.add_event(session, None, "alarm", f"preset {name} is usable again", level="warning")
        return preset

    def _preset_alarm(self, name: str, message: str) -> None:
        self._presets_usable.discard(name)
        if self._preset_errors.get(name) == message:
            return
        self._preset_errors[name] = message
        text = f"preset {name} is not usable: {message}. Its images wait in the inbox until it is fixed."
        log.error("ALARM: %s", text)
        with self.db.begin() as session:
            jobs.add_event(session, None, "alarm", text, level="error")

    def _image_not_ready(self, candidate: Candidate, key: str, path: Path, waiting: Waiting,
                         now: float) -> Optional[str]:
        rel = relative_name(path, candidate.folder)
        if not path.is_file():
            waiting.missing = True
            if now - waiting.first_seen > self.settings.missing_file_timeout:
                raise JobFileError(candidate.source, f"image file {rel!r} did not appear within "
                                   f"{self.settings.missing_file_timeout:.0f} s", key)
            return f"waiting for {key} ({rel})"
        if not self.tracker.settled(path, now):
            return f"{key} ({rel}) still being written"
        try:
            load_image(path, key, self.settings.max_image_pixels)
        except ImageError as exc:
            # A writer that paused longer than the settle time leaves a truncated image: give it
            # a while before calling the file broken.
            if self.tracker.stable_for(path, now) < self.settings.corrupt_grace_seconds:
                return f"{key} ({rel}) is not a complete image yet"
            raise JobFileError(candidate.source, str(exc), key) from exc
        return None

    # 2-4. Ingest ----------------------------------------------------------------------------

    def _ingest(self, candidate: Candidate, job: JobFile, params: StageParameters,
                images: dict[str, Path]) -> int:
        files = candidate.owned_files(images.values())
        shared = [path for path in images.values() if path not in files]  # a preset's references stay
        key = ingest_key(candidate, files)
        with self.db.begin() as session:
            existing = jobs.find_uncleared_ingest(session, key)
            existing_id = existing.id if existing else None
        if existing_id is not None:
            log.info("%s: already recorded as job %d; finishing its removal from the inbox",
                     candidate.source, existing_id)
            self._clear_inbox(candidate, files, key)
            return existing_id

        work_dir = self.settings.work / "jobs" / f"{key[:16]}-{uuid.uuid4().hex[:8]}"
        originals = work_dir / "originals"
        inputs = []
        for path in files + shared:
            relative = stored_name(candidate, path)
            sha, size = copy_durably(path, originals / relative)
            label = next((k for k, p in images.items() if p == path), None)
            inputs.append(InputFile(key=label, name=relative, sha256=sha, size=size))
        fsync_dir(originals)
        fault_point("ingest.copied")

        seeds, seed_source = job_seeds(job)
        base_name = job.output_name or candidate.output_stem
        spec = dict(job_file=job.model_dump(exclude_none=True, mode="json"),
                    job_file_name=candidate.job_file.relative_to(candidate.folder).as_posix(),
                    prompt=job.prompt, negative_prompt=job.negative_prompt,
                    images={k: stored_name(candidate, p) for k, p in images.items()}, seed_source=seed_source,
                    parameters=params, is_folder=candidate.is_folder, preset=candidate.preset,
                    outbox_subfolder=candidate.preset)
        # One job per seed: a seed sweep shares the originals and, through the fingerprints,
        # every checkpoint before ``sample``.
        with self.db.begin() as session:
            job_ids = []
            for seed in seeds:
                suffix = f"-{seed}" if len(seeds) > 1 else ""
                row = jobs.create_job(session, name=candidate.name + suffix, source=candidate.source,
                                      ingest_key=key,
                                      spec=JobSpec(**spec, seed=seed, output_name=base_name + suffix),
                                      inputs=inputs, work_dir=str(work_dir), priority=job.priority,
                                      preset=candidate.preset)
                job_ids.append(row.id)
        with job_context(job_ids[0], "ingest"):
            log.info("job %s ingested from %s (seed %s)", ", ".join(map(str, job_ids)), candidate.source,
                     ", ".join(map(str, seeds)))
        fault_point("ingest.recorded")
        self._clear_inbox(candidate, files, key)
        return job_ids[0]

    def _clear_inbox(self, candidate: Candidate, files: list[Path], key: str) -> None:
        for path in files:
            path.unlink(missing_ok=True)
        if candidate.is_folder:
            remove_empty_dirs(candidate.folder)
        fsync_dir(candidate.preset_folder if candidate.preset is not None else self.settings.inbox)
        self.tracker.forget(files)
        with self.db.begin() as session:
            jobs.mark_inbox_cleared(session, key)

    # Rejection ------------------------------------------------------------------------------

    def _reject(self, candidate: Candidate, error: JobFileError) -> None:
        log.error("%s", error)
        images = []
        try:
            raw = candidate.job_file.read_bytes()
            job, _ = parse_job_file(raw, candidate.source, self.settings.defaults)
            for key, rel in job.images().items():
                try:
                    path = resolve_inside(candidate.folder, rel, candidate.source, key)
                except JobFileError:
                    continue
                if path.is_file() or path.is_symlink():
                    images.append(path)  # a link moves as a link: its target is not touched
        except (JobFileError, OSError):
            pass
        files = candidate.owned_files(images, links=True)
        publish.report_rejected(self.settings, candidate.name, candidate.folder, files,
                                source=candidate.source, error=str(error), field=error.field)
        if candidate.is_folder:
            remove_empty_dirs(candidate.folder)
        self.tracker.forget(files)
        self.waiting.pop(candidate.source, None)
        with self.db.begin() as session:
            jobs.add_event(session, None, "rejected", str(error), level="error")


def job_seeds(job: JobFile) -> tuple[list[int], str]:
    """The seeds a job file asks for (``seed``, ``seeds`` or ``variations``), and where they came from."""
    if job.seeds:
        return list(job.seeds), "job file"
    count = job.variations or 1
    if job.seed is not None:
        return [job.seed + i for i in range(count)], "job file" if count == 1 else "job file seed + variation"
    return [secrets.randbelow(2**32) for _ in range(count)], "chosen at ingest"


def stored_name(candidate: Candidate, path: Path) -> str:
    """Where a job's file goes below ``originals/``: its path in the job's folder; a preset's
    reference image of a folder job inside the preset, below ``preset/``."""
    try:
        return path.relative_to(candidate.folder).as_posix()
    except ValueError:
        return "preset/" + path.relative_to(candidate.preset_folder).as_posix()


def relative_name(path: Path, folder: Path) -> str:
    """``path`` as the job file wrote it (relative to the job's folder) where possible."""
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return str(path)


def ingest_key(candidate: Candidate, files: list[Path]) -> str:
    """Identity of one drop: where it came from and the bytes of every file it owns."""
    digest = hashlib.sha256(os.fsencode(candidate.source))
    for path in files:
        digest.update(os.fsencode(path.relative_to(candidate.folder).as_posix()) + b"\0")
        digest.update(digest_file(path).encode())
    return digest.hexdigest()
