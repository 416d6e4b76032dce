"""Ingest: turn a ready job in the inbox into a queued job, exactly once.

1. Wait until the job file and every file it names exist and have settled.
2. Copy the job's files into ``work/jobs/<key>-<n>/originals``, hashing while copying, fsync.
3. Record the job with its input hashes in the database.
4. Only then remove the files from the inbox, and mark the job's inbox copy as cleared.

A crash between 3 and 4 leaves the files in the inbox; the next scan finds a job recorded
from the same bytes whose inbox copy was never cleared, and only finishes step 4. Bad job
files go to ``failed/`` with their files and a report naming the field; nothing is deleted.

Step 2 is idempotent too: the work folder's name comes from the drop's content, and a finished
copy is marked, so a record the database refused (read-only, full, locked) is tried again from
the same copy instead of a new one; the scan stops at the first refusal and the ingest loop
pauses. A file that changes while it is copied makes no job (the drop is looked at again once
it settles); step 4 removes only the very files that were copied (same inode, size and mtime):
a new version renamed into place meanwhile stays in the inbox, with its job file, as a new drop.

A job never takes a file another job still needs: an image that two job files in the inbox
name is copied for each and removed with the last; a preset's reference images stay; an image
inside a job folder or dropped into a preset folder belongs to that job, and a job file in the
inbox naming it fails at once, naming the owner.

An image in a preset folder is a job with the preset's values; a preset that is not usable
(bad JSON, a bad value) fails none of its images: they wait, an alarm names the problem, and
they are ingested once the preset is fixed. The preset file and its reference images stay.

A job waiting for a file that does not exist (or held by an unusable preset, an I/O error, a
full work disk) is looked at again after a growing pause (up to ``BLOCKED_LOOK_MAX`` seconds) or
as soon as the watcher reports a change where it waits, not on every pass: a waiting job folder
of thousands of files costs next to nothing, and ``serve --once`` does not wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sqlalchemy.exc import DBAPIError

from config import (IMAGE_KEYS, InputFile, JobFile, JobFileError, JobSpec, Settings, StageParameters, check_job_name,
                    check_output_name,
                    job_over_preset, parse_job_file, parse_preset)
from db import Database, jobs
from processor import publish
from processor.files import FileIdentity, copy_durably, digest_file, fsync_dir, remove_if_unchanged, write_atomic
from processor.faults import fault_point
from processor.inbox import (FOLDER_JOB_FILE, PRESET_FILE, Candidate, SettleTracker, find_candidates, is_image_name,
                             not_a_file, present, preset_references, read_regular, refusal, remove_empty_dirs,
                             resolve_inside, signature)
from processor.logs import job_context
from stages.engine import engine_class
from stages.prepare import ImageError, check_proportions, load_image

log = logging.getLogger(__name__)

BLOCKED_LOOK_FIRST = 0.5  # seconds until a blocked candidate (a missing file, an error) is looked at again...
BLOCKED_LOOK_MAX = 5.0  # ...doubling up to this, unless the watcher reports a change where it waits
COPY_MARKER = ".ingest.json"  # in a work folder: its copy is complete (key and inputs)


@dataclass
class Waiting:
    """Why a candidate is not ingested yet."""

    first_seen: float
    reason: str = ""
    blocked: bool = False  # waiting alone will not help (a missing file, an unusable preset, an error)
    wakers: frozenset[str] = frozenset()  # names in the inbox whose change is worth a look at once
    next_look: float = 0.0  # while ``blocked``: when to look again anyway
    pause: float = 0.0


@dataclass
class ScanResult:
    ingested: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: dict[str, str] = field(default_factory=dict)  # source -> reason
    inbox_missing: bool = False
    database_error: Optional[str] = None  # the database refused a write: the scan stopped there


class Ingestor:
    def __init__(self, settings: Settings, db: Database):
        self.settings = settings
        self.db = db
        self.tracker = SettleTracker(settings.settle_seconds, settings.settle_after_close)
        self.waiting: dict[str, Waiting] = {}
        self._preset_errors: dict[str, str] = {}  # preset name -> the error last reported
        self._presets_usable: set[str] = set()  # presets found usable since their last error
        self._named: dict[str, tuple[tuple, frozenset[str]]] = {}  # job file -> (its signature, what it names)
        self._job_folders: set[str] = set()  # the job folders of this scan (also once ingested during it)
        self._decoded: dict[Path, tuple[tuple, tuple[int, int]]] = {}  # images that decoded: (signature, size)
        self._engine_ratio: Optional[tuple[float, str]] = None  # the engine's max_aspect_ratio

    def scan(self, now: float, touched: Optional[set[str]] = None) -> ScanResult:
        """Look at everything in the inbox once; ingest what is ready. ``touched``: names directly
        in the inbox that the watcher saw change since the last scan."""
        result = ScanResult()
        inbox = self.settings.inbox
        if not inbox.is_dir():
            result.inbox_missing = True
            return result
        candidates = find_candidates(inbox)
        present_sources = {c.source for c in candidates}
        for gone in set(self.waiting) - present_sources:
            del self.waiting[gone]
        for gone in set(self._named) - present_sources:
            del self._named[gone]
        claims = self._claims(candidates)
        self._job_folders = {c.folder.name for c in candidates if c.is_folder and c.preset is None}
        for candidate in candidates:
            waiting = self.waiting.setdefault(candidate.source, Waiting(first_seen=now))
            if waiting.blocked and now < waiting.next_look and not (touched and waiting.wakers & touched):
                result.waiting[candidate.source] = waiting.reason  # nothing changed where it waits
                continue
            previous_reason = waiting.reason
            try:
                try:  # nested: a rejection writes to the database too, which may refuse
                    job_id = self._consider(candidate, waiting, now, claims)
                except JobFileError as exc:
                    result.failed.append(candidate.source)
                    self._reject(candidate, exc, claims)
                    _release(claims, candidate.source)
                    continue
            except DBAPIError as exc:
                result.database_error = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                waiting.reason = f"the database refuses writes ({result.database_error}); left in the inbox"
                result.waiting[candidate.source] = waiting.reason
                break
            except OSError as exc:
                # The inbox vanished mid-scan, a file is unreadable, the work disk is full: the
                # files stay where they are and a later look tries again.
                job_id, waiting.blocked = None, True
                waiting.reason = f"cannot ingest yet: {exc}"
                if waiting.reason != previous_reason:
                    log.warning("%s: %s", candidate.source, waiting.reason)
            except Exception as exc:  # noqa: BLE001 - a fault of ours must not stop the other drops
                job_id, waiting.blocked = None, True
                waiting.reason = f"unexpected error, left in the inbox: {type(exc).__name__}: {exc}"
                if waiting.reason != previous_reason:
                    log.exception("%s: %s", candidate.source, waiting.reason)
            if job_id is None:
                result.waiting[candidate.source] = waiting.reason
                if waiting.reason != previous_reason and not waiting.reason.startswith(("cannot", "unexpected")):
                    log.info("%s: not ready: %s", candidate.source, waiting.reason)
                waiting.pause = min(max(waiting.pause * 2, BLOCKED_LOOK_FIRST), BLOCKED_LOOK_MAX) if waiting.blocked else 0.0
                waiting.next_look = now + waiting.pause
            else:
                self.waiting.pop(candidate.source, None)
                _release(claims, candidate.source)
                result.ingested.append(job_id)
        return result

    def settling(self) -> bool:
        """Candidates that will become ready by waiting (not blocked ones)."""
        return any(not w.blocked for w in self.waiting.values())

    def next_look(self) -> Optional[float]:
        """When the first blocked candidate is due for its next look."""
        return min((w.next_look for w in self.waiting.values() if w.blocked), default=None)

    # 1. Readiness ---------------------------------------------------------------------------

    def _consider(self, candidate: Candidate, waiting: Waiting, now: float, claims: dict[str, set[str]]) -> Optional[int]:
        for part in candidate.name.split("/"):  # the preset's folder name and the job's own
            check_job_name(part, candidate.source)
        was_blocked = waiting.blocked
        waiting.blocked = False
        waiting.wakers = frozenset({top_name(relative_name(candidate.image or candidate.job_file, self.settings.inbox))})
        if candidate.image is None and (what := not_a_file(candidate.job_file)) not in (None, "missing"):
            raise refusal(candidate.job_file, what, candidate.source)
        if candidate.is_folder and not was_blocked:
            # Every file of a folder is watched from the first look, so that they settle
            # together rather than one after the other (not while it waits for a missing file:
            # its thousands of files would be looked at for nothing).
            for path in candidate.owned_files():
                self.tracker.settled(path, now)
        if not self.tracker.settled(candidate.job_file, now):
            waiting.reason = "job file still changing"
            return None
        parsed = self._parse(candidate, waiting, now)
        if parsed is None:
            return None
        job, params, from_preset = parsed
        images = {key: resolve_inside(candidate.preset_folder if key in from_preset else candidate.folder,
                                      rel, candidate.source, key)
                  for key, rel in job.images().items()}
        # A job file in the inbox naming another job's file is refused before any waiting; a
        # folder is listed only once its images are there.
        split = self._split(candidate, images, claims) if not candidate.is_folder and candidate.image is None else None
        reason = self._images_not_ready(candidate, images, waiting, now, params)
        if reason:
            waiting.reason = reason
            return None
        if candidate.is_folder and not all(self.tracker.settled(p, now) for p in candidate.owned_files()):
            waiting.reason = "other files in the job folder still changing"
            return None
        owned, shared = split or self._split(candidate, images, claims)
        return self._ingest(candidate, job, params, images, owned, shared, waiting)

    def _parse(self, candidate: Candidate, waiting: Waiting,
               now: float) -> Optional[tuple[JobFile, StageParameters, set[str]]]:
        """The job's values (over its preset's), and which images the preset named; None while
        its preset is not usable."""
        limit = self.settings.max_job_file_bytes
        if candidate.preset is None:
            raw = read_regular(candidate.job_file, limit, candidate.source)
            job, params = parse_job_file(raw, candidate.source, self.settings.defaults)
            return job, params, set()
        preset = self._preset(candidate, waiting, now)
        if preset is None:
            return None
        job_raw = read_regular(candidate.job_file, limit, candidate.source) if candidate.image is None else None
        image1 = candidate.image.name if candidate.image is not None else None
        job, params = job_over_preset(preset, job_raw, image1, candidate.source, self.settings.defaults)
        own = set(json.loads(job_raw)) if job_raw is not None else {"image1"}
        return job, params, {key for key in IMAGE_KEYS if key in preset and key not in own}

    def _preset(self, candidate: Candidate, waiting: Waiting, now: float) -> Optional[dict]:
        """The preset's values; None (the job waits, it does not fail) while it is not usable."""
        name, path = candidate.preset, candidate.preset_file
        source = f"{name}/{PRESET_FILE}"
        try:
            if (what := not_a_file(path)) not in (None, "missing"):
                raise refusal(path, what, source)
            if not self.tracker.settled(path, now):
                waiting.reason = f"the preset file {source} is still changing"
                return None
            preset = parse_preset(read_regular(path, self.settings.max_job_file_bytes, source), source,
                                  self.settings.defaults)
        except JobFileError as exc:
            waiting.reason = f"its preset is not usable ({exc}); it waits until the preset is fixed"
            waiting.blocked = True  # waiting alone will not help
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

    def _images_not_ready(self, candidate: Candidate, images: dict[str, Path], waiting: Waiting,
                          now: float, params: StageParameters) -> Optional[str]:
        """Why the images are not ready yet, None when they are: first that each is there and a
        file, then that all settled, and only then that each decodes (once per version of the
        file), so that a job waiting for one image does not decode the others again and again."""
        for key, path in images.items():
            rel = relative_name(path, candidate.folder)
            what = not_a_file(path, follow=True)
            if what == "missing":
                waiting.blocked = True
                waiting.wakers |= {top_name(relative_name(path, self.settings.inbox))}
                if now - waiting.first_seen > self.settings.missing_file_timeout:
                    raise JobFileError(candidate.source, f"image file {rel!r} did not appear within "
                                       f"{self.settings.missing_file_timeout:.0f} s", key)
                return f"waiting for {key} ({rel})"
            if what is not None:
                raise JobFileError(candidate.source, f"{rel!r} is {what}, not an image file", key)
        for key, path in images.items():
            if not self.tracker.settled(path, now):
                return f"{key} ({relative_name(path, candidate.folder)}) still being written"
        for key, path in images.items():
            version = signature(path)
            decoded = self._decoded.get(path)
            if decoded is not None and decoded[0] == version:
                # Decoded before (by this or another job): its proportions are this job's to check.
                self._check_proportions(candidate, key, path, decoded[1], params)
                continue
            try:
                image = load_image(path, key, self.settings.max_image_pixels)
            except ImageError as exc:
                # A writer that paused longer than the settle time leaves a truncated image: give
                # it a while before calling the file broken.
                if self.tracker.stable_for(path, now) < self.settings.corrupt_grace_seconds:
                    return f"{key} ({relative_name(path, candidate.folder)}) is not a complete image yet"
                raise JobFileError(candidate.source, str(exc), key) from exc
            self._check_proportions(candidate, key, path, image.size, params)
            self._decoded[path] = (version, image.size)
        return None

    def _check_proportions(self, candidate: Candidate, key: str, path: Path, size: tuple[int, int],
                           params: StageParameters) -> None:
        """JobFileError unless the image (and, for image1, a custom output size) keeps within the
        aspect ratio the daemon and the engine accept."""
        if self._engine_ratio is None:
            self._engine_ratio = engine_class(self.settings.engine).max_aspect_ratio(self.settings)
        try:
            check_proportions(size, key, path.name, self.settings.max_aspect_ratio, *self._engine_ratio,
                              megapixels=params.megapixels if key == "image1" else None)
        except ImageError as exc:
            raise JobFileError(candidate.source, str(exc), key) from exc
        if key == "image1" and params.width is not None and params.height is not None:
            try:  # a custom output size meets the same limits
                check_proportions((params.width, params.height), "width x height", "the output size",
                                  self.settings.max_aspect_ratio, *self._engine_ratio)
            except ImageError as exc:
                raise JobFileError(candidate.source, str(exc), "width") from exc

    # Whose files -----------------------------------------------------------------------------

    def _claims(self, candidates: list[Candidate]) -> dict[str, set[str]]:
        """For each name in the inbox (relative, NFC) that job files directly in the inbox name
        (the job files themselves included): the sources of those job files."""
        claims: dict[str, set[str]] = {}
        for candidate in candidates:
            if not candidate.is_folder and candidate.preset is None:
                for name in self._names_of(candidate):
                    claims.setdefault(name, set()).add(candidate.source)
        return claims

    def _names_of(self, candidate: Candidate) -> frozenset[str]:
        """What a job file in the inbox names (read leniently, once per version of the file)."""
        try:
            st = os.lstat(candidate.job_file)
        except OSError:
            return frozenset()
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        known = self._named.get(candidate.source)
        if known is not None and known[0] == signature:
            return known[1]
        names = {claim_name(candidate.job_file.name)}
        try:
            data = json.loads(read_regular(candidate.job_file, self.settings.max_job_file_bytes, candidate.source))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict):
            names |= {claim_name(value) for key in IMAGE_KEYS if isinstance(value := data.get(key), str)}
        self._named[candidate.source] = (signature, frozenset(names))
        return self._named[candidate.source][1]

    def _split(self, candidate: Candidate, images: dict[str, Path],
               claims: dict[str, set[str]]) -> tuple[list[Path], list[Path]]:
        """The files the job takes out of the inbox, and those it only copies (another job, or a
        preset, still needs them). JobFileError when it names a file another job owns."""
        if candidate.image is not None or candidate.is_folder:
            owned = candidate.owned_files()
            return owned, _unique(p for p in images.values() if p not in owned)
        owned, shared = [candidate.job_file], []
        for key, path in images.items():
            owner = self._owner(path)
            if owner is not None and not owner[1]:
                raise JobFileError(candidate.source, f"{relative_name(path, candidate.folder)!r} {owner[0]}; "
                                   "name only files of your own (copy it beside the job file)", key)
            others = claims.get(claim_name(relative_name(path, candidate.folder)), set()) - {candidate.source}
            (shared if owner is not None or others else owned).append(path)
        shared = _unique(p for p in shared if p not in owned)
        return _unique(owned), shared

    def _owner(self, path: Path) -> Optional[tuple[str, bool]]:
        """For a file a job file in the inbox names: which folder's it is, and whether a job may
        copy it (True) or its owner takes it (False); None for a file of nobody's."""
        parts = path.relative_to(self.settings.inbox).parts
        if len(parts) < 2:
            return None
        top = self.settings.inbox / parts[0]
        if present(top / PRESET_FILE):
            name = f"the preset folder '{parts[0]}'"
            if len(parts) == 2 and unicodedata.normalize("NFC", parts[1]) in preset_references(top / PRESET_FILE):
                return f"is a reference image of {name}", True
            if len(parts) == 2 and is_image_name(parts[1]):
                return f"is a photo in {name}, which is a job of its own", False
            if len(parts) > 2 and present(top / parts[1] / FOLDER_JOB_FILE):
                return f"belongs to the job folder '{parts[0]}/{parts[1]}'", False
            return f"lies in {name}, whose other files stay there", True
        if parts[0] in self._job_folders or present(top / FOLDER_JOB_FILE):
            return f"belongs to the job folder '{parts[0]}', whose job takes its files", False
        return None

    # 2-4. Ingest ----------------------------------------------------------------------------

    def _ingest(self, candidate: Candidate, job: JobFile, params: StageParameters, images: dict[str, Path],
                owned: list[Path], shared: list[Path], waiting: Waiting) -> Optional[int]:
        copied = owned + shared
        identities = {path: FileIdentity.of(path) for path in owned}  # the names to remove afterwards
        contents = {path: FileIdentity.of(path, follow=True) for path in copied}
        key = ingest_key(candidate, copied)
        with self.db.begin() as session:
            existing = jobs.find_uncleared_ingest(session, key)
            existing_id = existing.id if existing else None
            taken = jobs.ingest_work_dirs(session, key) if existing is None else set()
        if existing_id is not None:
            log.info("%s: already recorded as job %d; finishing its removal from the inbox",
                     candidate.source, existing_id)
            self._clear_inbox(candidate, owned, identities, key, existing_id)
            return existing_id

        seeds, seed_source = job_seeds(job)
        base_name = job.output_name or candidate.output_stem
        output = job.output_options(self.settings.output)
        # Several seeds are told apart by "-<seed>" unless the template names the seed.
        seed_suffix = len(seeds) > 1 and "{seed}" not in output.name_template
        for seed in seeds:
            try:
                check_output_name(output.name_template, base_name + (f"-{seed}" if seed_suffix else ""),
                                  candidate.preset, seed)
            except ValueError as exc:
                raise JobFileError(candidate.source, str(exc),
                                   "output_name" if job.output_name else "name_template") from exc

        work_dir = self.settings.work / "jobs" / work_dir_name(key, taken)
        inputs = self._copy(candidate, work_dir, copied, images, key)
        changed = [path for path in copied if _content(path) != contents[path]]
        if changed:
            shutil.rmtree(work_dir, ignore_errors=True)  # no job refers to it
            waiting.reason = (f"{relative_name(changed[0], candidate.folder)} changed while it was copied; "
                              "ingested once it settles")
            return None

        spec = dict(job_file=job.model_dump(exclude_none=True, mode="json"),
                    job_file_name=candidate.job_file.relative_to(candidate.folder).as_posix(),
                    prompt=job.prompt, negative_prompt=job.negative_prompt,
                    images={k: stored_name(candidate, p) for k, p in images.items()}, seed_source=seed_source,
                    parameters=params, is_folder=candidate.is_folder, preset=candidate.preset,
                    outbox_subfolder=candidate.preset, output=output)
        # One job per seed: a seed sweep shares the originals and, through the fingerprints,
        # every checkpoint before ``sample``.
        with self.db.begin() as session:
            job_ids = []
            for seed in seeds:
                suffix = f"-{seed}" if len(seeds) > 1 else ""
                row = jobs.create_job(session, name=candidate.name + suffix, source=candidate.source,
                                      ingest_key=key,
                                      spec=JobSpec(**spec, seed=seed,
                                                   output_name=base_name + (suffix if seed_suffix else "")),
                                      inputs=inputs, work_dir=str(work_dir), priority=job.priority,
                                      preset=candidate.preset)
                job_ids.append(row.id)
        (work_dir / COPY_MARKER).unlink(missing_ok=True)
        with job_context(job_ids[0], "ingest"):
            log.info("job %s ingested from %s (seed %s)", ", ".join(map(str, job_ids)), candidate.source,
                     ", ".join(map(str, seeds)))
        fault_point("ingest.recorded")
        self._clear_inbox(candidate, owned, identities, key, job_ids[0])
        return job_ids[0]

    def _copy(self, candidate: Candidate, work_dir: Path, files: list[Path], images: dict[str, Path],
              key: str) -> list[InputFile]:
        """Copy the job's files below ``work_dir/originals`` (or find the copy an earlier attempt
        finished, whose record the database refused): the inputs as recorded."""
        originals = work_dir / "originals"
        marker = work_dir / COPY_MARKER
        try:
            done = json.loads(marker.read_bytes())
            if done.get("key") == key:
                inputs = [InputFile(**item) for item in done["inputs"]]
                if all((originals / i.name).is_file() and (originals / i.name).stat().st_size == i.size for i in inputs):
                    log.info("%s: using the copy in %s made by an earlier attempt", candidate.source, work_dir.name)
                    return inputs
        except (OSError, ValueError, KeyError, TypeError):
            pass
        inputs = []
        for path in files:
            relative = stored_name(candidate, path)
            sha, size = copy_durably(path, originals / relative)
            label = next((k for k, p in images.items() if p == path), None)
            inputs.append(InputFile(key=label, name=relative, sha256=sha, size=size))
        fsync_dir(originals)
        write_atomic(marker, json.dumps({"key": key, "inputs": [i.model_dump() for i in inputs]}).encode())
        fault_point("ingest.copied")
        return inputs

    def _clear_inbox(self, candidate: Candidate, files: list[Path], identities: dict[Path, FileIdentity],
                     key: str, job_id: int) -> None:
        """Remove exactly the files that were copied. A file replaced meanwhile stays, and so
        does the job file then: together they are a new drop."""
        job_file = candidate.job_file if candidate.job_file in files else None
        changed = [path for path in files if path != job_file and not _remove(path, identities[path])]
        if job_file is not None and (changed or not _remove(job_file, identities[job_file])):
            changed.append(job_file)
        if candidate.is_folder:
            remove_empty_dirs(candidate.folder)
        fsync_dir(candidate.preset_folder if candidate.preset is not None else self.settings.inbox)
        self._forget(files)
        note = None
        if changed:
            names = ", ".join(relative_name(path, self.settings.inbox) for path in changed)
            note = (f"{names} changed while job {job_id} was being ingested (the job has the version it copied); "
                    "the new version stays in the inbox as a new drop")
            log.warning("%s: %s", candidate.source, note)
        with self.db.begin() as session:
            jobs.mark_inbox_cleared(session, key)
            if note is not None:
                jobs.add_event(session, job_id, "inbox", note, level="warning")

    def _forget(self, files: list[Path]) -> None:
        self.tracker.forget(files)
        for path in files:
            self._decoded.pop(path, None)

    # Rejection ------------------------------------------------------------------------------

    def _reject(self, candidate: Candidate, error: JobFileError, claims: dict[str, set[str]]) -> None:
        """Move the job's own files (never one another job or a preset still needs) to failed/."""
        log.error("%s", error)
        images = []
        try:
            raw = read_regular(candidate.job_file, self.settings.max_job_file_bytes, candidate.source)
            job, _ = parse_job_file(raw, candidate.source, self.settings.defaults)
            for key, rel in job.images().items():
                try:
                    path = resolve_inside(candidate.folder, rel, candidate.source, key)
                    owned, _ = self._split(candidate, {key: path}, claims)
                except JobFileError:
                    continue
                if path in owned and os.path.lexists(path):
                    images.append(path)  # a link moves as a link: its target is not touched
        except (JobFileError, OSError):
            pass
        files = candidate.owned_files(images, links=True)
        publish.report_rejected(self.settings, candidate.name, candidate.folder, files,
                                source=candidate.source, error=str(error), field=error.field)
        if candidate.is_folder:
            remove_empty_dirs(candidate.folder)
        self._forget(files)
        self.waiting.pop(candidate.source, None)
        with self.db.begin() as session:
            jobs.add_event(session, None, "rejected", str(error), level="error")


def _remove(path: Path, identity: FileIdentity) -> bool:
    """Remove ``path`` if it is still the file that was copied; True when it is gone."""
    return remove_if_unchanged(path, identity) or not os.path.lexists(path)


def _content(path: Path) -> Optional[FileIdentity]:
    try:
        return FileIdentity.of(path, follow=True)
    except OSError:
        return None


def _unique(paths) -> list[Path]:
    return list(dict.fromkeys(paths))


def _release(claims: dict[str, set[str]], source: str) -> None:
    """A job file that left the inbox (ingested or rejected) needs nothing any more."""
    for sources in claims.values():
        sources.discard(source)


def claim_name(relative: str) -> str:
    """A name relative to the inbox as the claims compare it: normalised path, NFC."""
    return unicodedata.normalize("NFC", os.path.normpath(relative))


def top_name(relative: str) -> str:
    """The first name of a path relative to the inbox (``a/b.png`` -> ``a``)."""
    return relative.split("/", 1)[0]


def work_dir_name(key: str, taken: set[str]) -> str:
    """``<key>-<n>``: the same for every attempt at one drop, another for a later drop of the
    same bytes (whose jobs already have ``taken``)."""
    n = 0
    while f"{key[:16]}-{n}" in taken:
        n += 1
    return f"{key[:16]}-{n}"


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
    """Identity of one drop: where it came from and the bytes of every file it copies."""
    digest = hashlib.sha256(os.fsencode(candidate.source))
    for path in files:
        digest.update(os.fsencode(stored_name(candidate, path)) + b"\0")
        digest.update(digest_file(path).encode())
    return digest.hexdigest()
