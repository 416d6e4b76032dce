"""The checkpoint store: stage results on disk (``work/cache/<stage>/<fingerprint>.safetensors``),
their index in the database, and the recent ones in memory.

- ``obtain``-side: ``load`` reads a recorded checkpoint and checks it against its recorded
  sha256; a bad one is unrecorded (and recomputed by the caller), never trusted.
- ``save``: the result goes into memory at once (the next stage reads it from there) and to the
  writer, which encodes, hashes, writes durably and only then records it, in one transaction
  with the stage run and whatever the caller adds (the job's release).
- Partials of a stepped stage (``partial_fingerprint``) go the same way; when the stage's
  result is recorded its partials are unrecorded and removed.

Memory entries whose write is still pending are pinned (never evicted), so a result is always
found in memory or in the index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from sqlalchemy.orm import Session

from db import Database, checkpoints, jobs
from processor import files
from processor.faults import fault_point
from processor.writer import Writer
from stages import SampleResume
from stages import checkpoint as codec
from stages.errors import RetryableError

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"


@dataclass
class Remembered:
    payload: Any
    sha256: Optional[str]  # None while its write is pending
    size: int
    pinned: bool


class Memo:
    """Recent stage results in memory, least recently used evicted beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: "OrderedDict[str, Remembered]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fingerprint: str) -> Optional[Remembered]:
        with self._lock:
            item = self._items.get(fingerprint)
            if item is not None:
                self._items.move_to_end(fingerprint)
            return item

    def put(self, fingerprint: str, item: Remembered) -> None:
        with self._lock:
            self._items[fingerprint] = item
            self._items.move_to_end(fingerprint)
            self._trim()

    def written(self, fingerprint: str, sha256: str, size: int) -> None:
        with self._lock:
            item = self._items.get(fingerprint)
            if item is not None:
                item.sha256, item.size, item.pinned = sha256, size, False
            self._trim()

    def drop(self, fingerprint: str) -> None:
        with self._lock:
            self._items.pop(fingerprint, None)

    def fingerprints(self) -> set[str]:
        with self._lock:
            return set(self._items)

    def _trim(self) -> None:
        total = sum(item.size for item in self._items.values())
        for fingerprint in list(self._items):
            if total <= self.max_bytes:
                return
            item = self._items[fingerprint]
            if not item.pinned:
                total -= item.size
                del self._items[fingerprint]


def payload_size(payload: Any) -> int:
    """Bytes of the arrays in a payload (a memory estimate)."""
    if isinstance(payload, dict):
        return sum(payload_size(v) for v in payload.values())
    if isinstance(payload, (list, tuple)):
        return sum(payload_size(v) for v in payload)
    nbytes = getattr(payload, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    numel = getattr(payload, "numel", None)
    if callable(numel):
        return int(numel()) * int(payload.element_size())
    return 0


@dataclass(frozen=True)
class Run:
    """A finished computation of a stage, for its stage run record."""

    job_id: int
    stage: str
    fingerprint: str
    device: str
    worker: str
    started_at: Any  # naive UTC datetime
    seconds: float
    resumed_from_step: Optional[int] = None


class CheckpointStore:
    def __init__(self, work: Path, db: Database, writer: Writer, memo_bytes: int = 64 * 1024 * 1024,
                 describe: Callable[[str], str] = lambda text: text):
        self.cache_dir = work / "cache"
        self.describe = describe  # an error as users may see it (no absolute server paths)
        self.db = db
        self.writer = writer
        self.memo = Memo(memo_bytes)

    def path_for(self, stage: str, fingerprint: str) -> Path:
        return self.cache_dir / stage / f"{fingerprint}{SUFFIX}"

    # Reading ------------------------------------------------------------------------------------

    def load(self, stage: str, fingerprint: str) -> Optional[Remembered]:
        """A result from memory or from its recorded, verified checkpoint; None when neither."""
        remembered = self.memo.get(fingerprint)
        if remembered is not None:
            return remembered
        with self.db.begin() as session:
            row = checkpoints.lookup(session, fingerprint)
            recorded = (row.path, row.sha256, row.size) if row else None
        if recorded is None:
            return None
        try:
            payload = read_checkpoint(Path(recorded[0]), recorded[1])
        except codec.CheckpointError as exc:
            log.warning("%s checkpoint not usable (%s); recomputing", stage, exc)
            with self.db.begin() as session:
                checkpoints.forget(session, fingerprint)
                jobs.add_event(session, None, "checkpoint", f"{stage}: {exc}; recomputed", level="warning")
            return None
        item = Remembered(payload, recorded[1], recorded[2], False)
        self.memo.put(fingerprint, item)
        return item


    def resume_point(self, fingerprint: str) -> tuple[Optional[SampleResume], bool]:
        """The newest usable partial of a stepped stage, and whether any partial was recorded."""
        with self.db.begin() as session:
            found = [(checkpoints.partial_step(r), r.path, r.sha256) for r in checkpoints.partials(session, fingerprint)]
        for step, path, sha in found:
            try:
                state = read_checkpoint(Path(path), sha)
            except codec.CheckpointError as exc:
                log.warning("partial %s not usable (%s)", Path(path).name, exc)
                continue
            log.info("resuming after step %d", step)
            return SampleResume(step=step, state=state), True
        return None, bool(found)

    # Writing ------------------------------------------------------------------------------------

    def save(self, stage: str, fingerprint: str, payload: Any, run: Run, forget_partials: bool,
             then: Optional[Callable[[Session], None]] = None) -> None:
        """Keep the result in memory and have the writer store and record it (with its run,
        and ``then`` in the same transaction)."""
        self.memo.put(fingerprint, Remembered(payload, None, payload_size(payload), True))

        def write() -> None:
            sha, size, error = None, 0, None
            path = self.path_for(stage, fingerprint)
            try:
                sha, size = self._write(stage, fingerprint, payload)
            except RetryableError as exc:
                error = self.describe(str(exc))
                log.warning("%s; the result stays in memory, the stage is computed again if it is needed after "
                            "a restart", exc)
            stale: list[str] = []
            try:
                with self.db.begin() as session:
                    if sha is not None:
                        checkpoints.record(session, fingerprint, stage, str(path), sha, size)
                    checkpoints.record_run(session, run.job_id, stage, fingerprint, sha, run.device, run.worker,
                                           run.started_at, run.seconds, run.resumed_from_step, error)
                    if error is not None:
                        jobs.add_event(session, run.job_id, "checkpoint", error, level="warning")
                    if forget_partials and sha is not None:
                        stale = self._forget_partials(session, fingerprint)
                    if then is not None:
                        then(session)
            finally:
                if sha is not None:
                    self.memo.written(fingerprint, sha, size)
                else:
                    self.memo.written(fingerprint, "", payload_size(payload))
            _unlink(stale)

        self.writer.submit(run.job_id, f"job {run.job_id}: record {stage}", write, stage)

    def record_run_error(self, run: Run, error: str) -> None:
        """Record (in the writer) a computation of a stage that ended without a result."""

        def record() -> None:
            with self.db.begin() as session:
                checkpoints.record_run(session, run.job_id, run.stage, run.fingerprint, None, run.device, run.worker,
                                       run.started_at, run.seconds, run.resumed_from_step, error)

        self.writer.submit(run.job_id, f"job {run.job_id}: record {run.stage} ({error[:40]})", record, run.stage)

    def save_partial(self, job_id: int, stage: str, fingerprint: str, step: int, state: Any) -> None:
        """Store the state after ``step`` of a stepped stage (replacing older partials)."""
        partial = checkpoints.partial_fingerprint(fingerprint, step)

        def write() -> None:
            sha, size = self._write(stage, partial, state)
            with self.db.begin() as session:
                stale = self._forget_partials(session, fingerprint, keep=partial)
                checkpoints.record(session, partial, stage, str(self.path_for(stage, partial)), sha, size)
            _unlink(stale)

        self.writer.submit(job_id, f"job {job_id}: {stage} partial after step {step}", write, stage)

    def _write(self, stage: str, fingerprint: str, payload: Any) -> tuple[str, int]:
        return write_checkpoint(self.path_for(stage, fingerprint), payload,
                                {"qie.stage": stage, "qie.fingerprint": fingerprint})

    def _forget_partials(self, session: Session, fingerprint: str, keep: Optional[str] = None) -> list[str]:
        """Unrecord the partials of a stepped stage but ``keep``; their paths, to remove once committed."""
        stale = [(r.fingerprint, r.path) for r in checkpoints.partials(session, fingerprint) if r.fingerprint != keep]
        for partial, _ in stale:
            checkpoints.forget(session, partial)
        return [path for _, path in stale]

    def note_reuse(self, job_id: int, stage: str, fingerprint: str, device: str, worker: str) -> None:
        """Record (in the writer, after the checkpoint's own record) that a job reused a result."""

        def record() -> None:
            item = self.memo.get(fingerprint)
            with self.db.begin() as session:
                if checkpoints.has_run(session, job_id, stage, fingerprint):
                    checkpoints.touch(session, fingerprint)
                    return
                row = checkpoints.lookup(session, fingerprint)
                sha = row.sha256 if row is not None else (item.sha256 if item is not None else None)
                checkpoints.record_hit(session, job_id, stage, fingerprint, sha or "", device, worker)
            log.info("%s reused from checkpoint %s", stage, fingerprint[:12])

        self.writer.submit(job_id, f"job {job_id}: note reuse of {stage}", record, stage)


def write_checkpoint(path: Path, payload: Any, metadata: Optional[dict[str, str]] = None) -> tuple[str, int]:
    """Encode and durably write a checkpoint file; its sha256 and size. RetryableError when the
    disk refuses (full, read-only, I/O error)."""
    started = time.perf_counter()
    data = codec.encode(payload, metadata)
    try:
        fault_point("checkpoint.write")
        files.write_atomic(path, data, before_rename=lambda: fault_point("checkpoint.rename"))
    except OSError as exc:
        raise RetryableError(f"cannot write the checkpoint {path.name}: {exc.strerror or exc}") from exc
    fault_point("checkpoint.written")
    log.debug("%s written in %.3fs (%d bytes)", path.name, time.perf_counter() - started, len(data))
    return files.digest_bytes(data), len(data)


def read_checkpoint(path: Path, expected_sha256: str) -> Any:
    """A checkpoint's payload, refused (CheckpointError) unless its bytes have the recorded sha256."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise codec.CheckpointError(f"{path.name}: missing") from exc
    actual = files.digest_bytes(data)
    if actual != expected_sha256:
        raise codec.CheckpointError(f"{path.name}: sha256 {actual[:12]} is not the recorded {expected_sha256[:12]}")
    return codec.decode(data, path.name)


def _unlink(paths: list[str]) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)
