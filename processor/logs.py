"""Logging: readable text by default, JSON lines on request, and every line about a job tagged
with the job's id and stage.

The tag comes from a context, not from the message: code that works on a job enters
``job_context(job_id, stage)`` and every record logged inside it, by any module (a library
included), carries ``job_id`` and ``stage``. Contexts nest (the inner stage wins) and follow
threads and tasks the way ``contextvars`` do.

Text:  ``2026-11-27 10:00:01,123 INFO    processor.runner: [job 12 sample] ...``
JSON:  ``{"time": ..., "level": "INFO", "logger": ..., "message": ..., "job": 12, "stage": "sample"}``

When standard error is a terminal (and not JSON), sampling steps draw one progress bar line that
log records scroll past; elsewhere (the journal, a file) each step is an ordinary log line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Iterator, Optional, TextIO

from config.untrusted import printable

if TYPE_CHECKING:
    from config import Settings

_current: ContextVar[Optional[tuple[int, Optional[str]]]] = ContextVar("qie_job", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(job_tag)s%(message)s"


class TextFormatter(logging.Formatter):
    """The text format; every line of a traceback starts with ``  | ``, so that an exception
    message holding a newline cannot pass for a log line of its own."""

    def formatException(self, ei) -> str:  # noqa: N802 - logging's name
        text = super().formatException(ei)
        return "\n".join("  | " + printable(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 - logging's name
        return "\n".join("  | " + printable(line) for line in stack_info.splitlines())
QUIET_LOGGERS = ("watchdog", "PIL", "urllib3", "httpx", "filelock", "alembic")
_STEP = re.compile(r"\bstep (\d+)/(\d+)\b")


@contextmanager
def job_context(job_id: int, stage: Optional[str] = None) -> Iterator[None]:
    """Tag every log record made inside with ``job_id`` and ``stage``."""
    token = _current.set((job_id, stage))
    try:
        yield
    finally:
        _current.reset(token)


def current_job() -> tuple[Optional[int], Optional[str]]:
    """The (job id, stage) of the innermost ``job_context``, or (None, None)."""
    return _current.get() or (None, None)


class JobContextFilter(logging.Filter):
    """Adds ``job_id``, ``stage`` and ``job_tag`` to every record (an explicit ``extra`` wins), and
    makes its message one safe line: file names and prompts come from whoever drops files, and a
    newline or an escape sequence in them must not forge a log line or drive a terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = printable(record.getMessage())
        record.args = None
        job_id, stage = current_job()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id
        if getattr(record, "stage", None) is None:
            record.stage = stage
        if record.job_id is None:
            record.job_tag = ""
        else:
            record.job_tag = f"[job {record.job_id}{' ' + record.stage if record.stage else ''}] "
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        if getattr(record, "job_id", None) is not None:
            entry["job"] = record.job_id
            entry["stage"] = getattr(record, "stage", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TerminalHandler(logging.StreamHandler):
    """A stream handler that keeps one progress bar line below the log lines it writes."""

    def __init__(self, stream: TextIO, width: int = 30):
        super().__init__(stream)
        self.width = width
        self._bar: Optional[str] = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._bar is None:
            super().emit(record)
            return
        try:
            self.stream.write("\r\x1b[K")
            super().emit(record)
            self.stream.write(self._bar)
            self.flush()
        except Exception:  # noqa: BLE001 - logging must not raise (logging.Handler convention)
            self.handleError(record)

    def show_progress(self, text: str, step: int, total: int) -> None:
        filled = self.width * step // total if total else 0
        bar = f"{printable(text)} [{'#' * filled}{'.' * (self.width - filled)}] {100 * step // max(total, 1):3d}%"
        self.acquire()
        try:
            self.stream.write("\r\x1b[K" + bar)
            if step >= total:
                self.stream.write("\n")
                self._bar = None
            else:
                self._bar = bar
            self.flush()
        finally:
            self.release()

    def end_progress(self) -> None:
        self.acquire()
        try:
            if self._bar is not None:
                self.stream.write("\n")
                self.flush()
                self._bar = None
        finally:
            self.release()


_terminal: dict[str, Optional[TerminalHandler]] = {"handler": None}


def configure(level: str = "INFO", json_lines: bool = False, stream: Optional[TextIO] = None) -> logging.Handler:
    """Send every log record to ``stream`` (standard error) as text or JSON lines."""
    stream = stream if stream is not None else sys.stderr
    terminal = not json_lines and _is_terminal(stream)
    handler: logging.Handler = TerminalHandler(stream) if terminal else logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter(TEXT_FORMAT))
    handler.addFilter(JobContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _terminal["handler"] = handler if terminal else None
    if not terminal:
        # Library progress bars (model loading) are noise in the journal and break JSON lines.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return handler


def configure_for(settings: "Settings") -> logging.Handler:
    """Logging as the settings say: text (or JSON lines with ``log_json``) on standard error,
    tagged with job and stage."""
    return configure(settings.log_level, settings.log_json, sys.stderr)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def report_progress(logger: logging.Logger, text: str) -> None:
    """A progress report (``job 3 (x): sample step 2/8``): a bar on a terminal, else a log line."""
    terminal = _terminal["handler"]
    match = _STEP.search(text)
    if terminal is not None and match and logger.isEnabledFor(logging.INFO):
        step, total = int(match.group(1)), int(match.group(2))
        terminal.show_progress(text, step, total)
        return
    if terminal is not None:
        terminal.end_progress()
    logger.info("%s", text)


def parse_step(text: str) -> Optional[tuple[int, int]]:
    """``(step, total)`` from a progress text, None when it has none."""
    match = _STEP.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None
