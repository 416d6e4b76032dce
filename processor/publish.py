"""The outbox, failed/ and archive/ contracts, and publishing a finished job.

- outbox: ``<name>.<png|jpg|webp>`` then ``<name>.json`` (the manifest), each written under a
  hidden temporary name beside the target and moved into place only if the name is free, so a
  watcher downstream never sees half a file and no file is ever replaced. The name is chosen
  free of existing files and of every name another job has reserved, and reserved in the
  database before anything is written, so a publish repeated after a crash writes the same
  files (and recognises its own image by its sha256) instead of making a duplicate. The name
  follows the job's ``name_template`` (``{name}``, ``{preset}``, ``{seed}``, ``{date}``,
  ``{time}``, ``{n}``); what the file holds besides pixels is ``processor/output.py``'s.
- failed: ``<name>.error.json`` and a folder ``<name>/`` with the job's original files.
- archive: a folder ``<job id>-<name>/`` with the original files of a finished job.

A job from a preset folder is named ``<preset>/<name>``: its files go into the same sub-folder
of failed/ and archive/ (``failed/<preset>/<name>.error.json``, ``archive/<preset>/<id>-<name>/``),
as its outputs go into ``outbox/<preset>/``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional


from config import MAX_NAME_BYTES, NUMBER_MARKER, JobSpec, Published, Settings, render_output_name
from config.untrusted import control_characters
from db import Database, Job, checkpoints, jobs, utcnow
from processor import files
from processor.faults import fault_point
from processor.inbox import remove_empty_dirs, unique_path
from processor.manifest import build_manifest, engine_text
from processor.output import Output, make_output, source_of
from processor.plan import JobPlan
from stages import Engine

log = logging.getLogger(__name__)

EXTENSIONS = {"png": ".png", "jpg": ".jpg", "webp": ".webp"}


class LeaseLost(Exception):
    """Another worker took the job over before it was published."""


def outbox_for(settings: Settings, spec: JobSpec) -> Path:
    """The folder a job publishes into: the outbox, or its preset's sub-folder of it."""
    return settings.outbox / spec.outbox_subfolder if spec.outbox_subfolder else settings.outbox


def choose_output_name(outbox: Path, wanted: str, output_format: str, reserved: Iterable[str] = ()) -> str:
    """A base name free for both the image and the manifest, and not reserved by another job.
    ``wanted`` holding NUMBER_MARKER (a template's ``{n}``) takes the first free number 1, 2, ...
    there; else a taken name gets ``-1``, ``-2``, ..."""
    taken = set(reserved)
    counter = 0
    while True:
        if NUMBER_MARKER in wanted:
            name = wanted.replace(NUMBER_MARKER, str(counter + 1))
        else:
            name = wanted if counter == 0 else f"{wanted}-{counter}"
        if name not in taken and not any(os.path.lexists(outbox / f"{name}{suffix}")
                                         for suffix in (EXTENSIONS[output_format], ".json")):
            return name
        counter += 1


# Publishing a job -------------------------------------------------------------------------------

def publish_job(settings: Settings, db: Database, worker: str, job: Job, plan: JobPlan, final: Any,
                engine: Engine, model_loads: dict[str, int]) -> Published:
    """Publish a job's final result into the outbox, archive its originals, mark it done."""
    spec = job.spec
    params = plan.params
    outbox = outbox_for(settings, spec)
    with db.begin() as session:
        if not jobs.renew_lease(session, job.id, worker, settings.lease_seconds, utcnow()):
            raise LeaseLost(job.id)
        row = jobs.get_job(session, job.id)
        wanted = render_output_name(spec.output.name_template, spec.output_name, spec.preset, spec.seed, datetime.now())
        name = row.output_name or _reserve(session, job, outbox, wanted, params.output_format)
        runs = checkpoints.runs_for(session, job.id)
        keep_originals = jobs.siblings_unfinished(session, job.id, job.work_dir)
        attempts, crashes = row.attempts, row.crashes
    source = source_of(Path(job.work_dir), spec)
    text = engine_text(engine, spec)

    def encode(name: str) -> Output:
        return make_output(spec, params, final, source, f"{name}.json", text)

    manifest = build_manifest(settings, job, plan, engine, runs, attempts, crashes, model_loads, text)
    written = _write_outputs(db, job, outbox, name, encode, params.output_format, manifest)
    originals = "kept for the other jobs of the same drop" if keep_originals else _archive(settings, job)
    result = Published(image=str(written["image"]), manifest=str(written["manifest"]), sha256=written["sha256"],
                       originals=originals)
    with db.begin() as session:
        jobs.mark_done(session, job.id, worker, result)
    log.info("job %d done: %s", job.id, result.image)
    return result


def _reserve(session: Any, job: Job, outbox: Path, wanted: str, output_format: str) -> str:
    name = choose_output_name(outbox, wanted, output_format,
                              jobs.reserved_output_names(session, job.id, job.spec.outbox_subfolder))
    jobs.reserve_output_name(session, job.id, name)
    return name


def _write_outputs(db: Database, job: Job, outbox: Path, name: str, encode: Callable[[str], Output],
                   output_format: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write image then manifest under ``name`` without replacing anything that is not this
    job's own earlier attempt; a name taken meanwhile by a file of someone else's moves the job
    to the next free name (reserved anew). ``encode(name)``: the image (its provenance names
    the manifest)."""
    outbox.mkdir(parents=True, exist_ok=True)
    while True:
        output = encode(name)
        image = output.data
        sha = files.digest_bytes(image)
        image_path = outbox / f"{name}{EXTENSIONS[output_format]}"
        manifest_path = outbox / f"{name}.json"
        fault_point("publish.write")
        try:
            files.write_new(image_path, image, unique=False, before_rename=lambda: fault_point("publish.rename"))
        except FileExistsError:
            if not _is_ours(image_path, sha):
                name = _move_on(db, job, outbox, name, output_format, image_path)
                continue
        fault_point("publish.image")
        document = {**manifest, "output": {**output.info, "file": image_path.name, "sha256": sha,
                                           "bytes": len(image)}}
        data = (json.dumps(document, indent=2) + "\n").encode()
        try:
            files.write_new(manifest_path, data, unique=False)
        except FileExistsError:
            if not _is_our_manifest(manifest_path, job.id, sha):
                name = _move_on(db, job, outbox, name, output_format, manifest_path)
                continue
            files.write_atomic(manifest_path, data, unique=False)  # ours, from an attempt a crash cut short
        fault_point("publish.manifest")
        return {"image": image_path, "manifest": manifest_path, "sha256": sha}


def _is_ours(path: Path, sha: str) -> bool:
    try:
        return files.digest_file(path) == sha
    except OSError:
        return False


def _is_our_manifest(path: Path, job_id: int, sha: str) -> bool:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return document.get("job", {}).get("id") == job_id and document.get("output", {}).get("sha256") == sha


def _move_on(db: Database, job: Job, outbox: Path, name: str, output_format: str, taken: Path) -> str:
    log.warning("job %d: %s appeared in the outbox before this job published; publishing under another name",
                job.id, taken.name)
    with db.begin() as session:
        return _reserve(session, job, outbox, name, output_format)


def _archive(settings: Settings, job: Job) -> str:
    """Archive (or delete) the originals, which no other job made from the same drop still needs."""
    archived = archive_originals(settings, job.id, job.name, Path(job.work_dir) / "originals")
    remove_empty_dirs(Path(job.work_dir))
    return str(archived) if archived else settings.originals


# failed/ and archive/ ---------------------------------------------------------------------------

@dataclass
class FailureReport:
    """``failed/<name>.error.json`` of a job that failed after ingest."""

    job_id: int
    job: str
    source: str
    error: str
    kind: str  # permanent | transient | crash
    stage: Optional[str]
    attempts: int
    exception: str
    files: list[str] = field(default_factory=list)


def _write_error(failed: Path, name: str, report: dict[str, Any]) -> Path:
    path = failed / f"{name}.error.json"
    files.write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())
    return path


def report_rejected(settings: Settings, name: str, base: Path, moved_files: Iterable[Path], *, source: str,
                    error: str, field: Optional[str]) -> Path:
    """Move a job that was never ingested to failed/, with a report naming the problem."""
    failed, name = _nested(settings.failed, name)
    failed.mkdir(parents=True, exist_ok=True)
    folder, name = unique_path(failed, name, ("", ".error.json"))
    moved = files.move_files(moved_files, base, folder)
    report = {"job": name, "source": source, "error": error, "field": field, "kind": "permanent",
              "stage": "ingest", "files": moved, "at": _now(),
              "hint": "fix the job file, then move the files in this folder back into the inbox"}
    return _write_error(failed, name, report)


def report_failed(settings: Settings, name: str, originals: Path, report: FailureReport) -> Path:
    """Copy a failed job's originals to failed/ beside its error report (work keeps its copy for retry)."""
    failed, name = _nested(settings.failed, name)
    failed.mkdir(parents=True, exist_ok=True)
    folder, name = unique_path(failed, name, ("", ".error.json"))
    report.files = files.copy_tree(originals, folder) if originals.is_dir() else []
    return _write_error(failed, name, {**asdict(report), "at": _now(),
                                       "hint": "fix the problem, then run: python run.py retry "
                                               f"{report.job_id} (or move these files back into the inbox)"})


def remove_failure_report(settings: Settings, name: str, job_id: int) -> list[Path]:
    """Remove the failed/ report of job ``job_id`` (and the copies of its originals beside it),
    once the job is retried: left there they would only invite a duplicate drop. Reports of
    other jobs with the same name stay. The paths removed."""
    failed, leaf = _nested(settings.failed, name)
    removed = []
    for report in sorted(failed.glob(f"{glob.escape(leaf)}*.error.json")):
        try:
            if json.loads(report.read_text()).get("job_id") != job_id:
                continue
        except (OSError, ValueError):
            continue
        copies = report.with_name(report.name[:-len(".error.json")])
        if copies.is_dir() and not copies.is_symlink():
            shutil.rmtree(copies)
            removed.append(copies)
        report.unlink(missing_ok=True)
        removed.append(report)
    return removed


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
    """``preset/name`` -> (``folder/preset``, ``name``); a plain name stays in ``folder``. Both
    parts are made usable as file names (a rejected job's name may be neither)."""
    parent, _, leaf = name.rpartition("/")
    return (folder / file_name(parent) if parent else folder), file_name(leaf)


def file_name(name: str) -> str:
    """``name`` made safe for a report's file name: control characters replaced by ``_``, and
    cut (with a short hash of the whole, so different names stay different) to MAX_NAME_BYTES."""
    safe = "".join("_" if control_characters(c) or c in "/\\" else c for c in name) or "_"
    encoded = safe.encode("utf-8", "surrogateescape")
    if len(encoded) <= MAX_NAME_BYTES:
        return safe
    digest = hashlib.sha256(encoded).hexdigest()[:8]
    cut = encoded[:MAX_NAME_BYTES - 9].decode("utf-8", "ignore")
    return f"{cut}-{digest}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
