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

Under systemd, when standard error is the journal (``$JOURNAL_STREAM`` names it), records go to
the journal natively instead, each with its fields: ``PRIORITY``, ``CODE_FILE``/``LINE``/``FUNC``,
and ``QIE_JOB``, ``QIE_STAGE`` and ``QIE_LOGGER``, so ``journalctl QIE_JOB=12`` is one job's
story. The message keeps the ``[job 12 sample]`` tag, for ``journalctl -o cat``.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import logging
import os
import re
import socket
import struct
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


JOURNAL_SOCKET = "/run/systemd/journal/socket"
JOURNAL_FORMAT = "%(name)s: %(job_tag)s%(message)s"
SYSLOG_IDENTIFIER = "qie-hotfolder"
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


class JournalHandler(logging.Handler):
    """Sends each record to the journal in its native protocol: one datagram of ``NAME=value``
    fields (a value holding a newline goes as name, length, bytes). A record too large for a
    datagram goes as a sealed memfd, as ``sd_journal_send`` does. Should the journal be
    unreachable, records go to ``fallback`` (standard error, which systemd also reads)."""

    def __init__(self, fallback: TextIO, address: str = JOURNAL_SOCKET, identifier: str = SYSLOG_IDENTIFIER):
        super().__init__()
        self.address = address
        self.identifier = identifier
        self.fallback = logging.StreamHandler(fallback)
        self.fallback.setFormatter(TextFormatter(TEXT_FORMAT))
        self._socket: Optional[socket.socket] = None
        self.setFormatter(TextFormatter(JOURNAL_FORMAT))

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {"MESSAGE": self.format(record),
                  "PRIORITY": str(_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)),
                  "SYSLOG_IDENTIFIER": self.identifier, "QIE_LOGGER": record.name,
                  "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName}
        if getattr(record, "job_id", None) is not None:
            fields["QIE_JOB"] = str(record.job_id)
            if getattr(record, "stage", None):
                fields["QIE_STAGE"] = str(record.stage)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = encode_journal_fields(self.fields(record))
        except Exception:  # noqa: BLE001 - logging must not raise (logging.Handler convention)
            self.handleError(record)
            return
        try:
            self._send(data)
        except OSError:
            self.fallback.handle(record)

    def _send(self, data: bytes) -> None:
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.sendto(data, self.address)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            fd = os.memfd_create("qie-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            try:
                os.write(fd, data)
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
                rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))
                self._socket.sendmsg([b""], [rights], 0, self.address)  # (socket.send_fds ignores the address)
            finally:
                os.close(fd)

    def close(self) -> None:
        self.acquire()
        try:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
        finally:
            self.release()
        super().close()


def encode_journal_fields(fields: dict[str, str]) -> bytes:
    """The journal's native wire format for ``fields``."""
    parts = []
    for name, value in fields.items():
        raw = value.encode("utf-8", "replace")
        if b"\n" in raw:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n")
        else:
            parts.append(name.encode() + b"=" + raw + b"\n")
    return b"".join(parts)


def is_journal(stream: TextIO, environ: Optional[dict] = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM`` is its
    ``device:inode``; a redirected stream no longer matches)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


_terminal: dict[str, Optional[TerminalHandler]] = {"handler": None}


def configure(level: str = "INFO", json_lines: bool = False, stream: Optional[TextIO] = None) -> logging.Handler:
    """Send every log record to ``stream`` (standard error) as text or JSON lines; to the
    journal, with fields, when ``stream`` is the journal and JSON lines were not asked for."""
    stream = stream if stream is not None else sys.stderr
    terminal = not json_lines and _is_terminal(stream)
    handler: logging.Handler
    if not json_lines and is_journal(stream):
        handler = JournalHandler(stream)
    else:
        handler = TerminalHandler(stream) if terminal else logging.StreamHandler(stream)
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
    logger.info("%s", text, stacklevel=2)  # the caller's file and line, not this one


def parse_step(text: str) -> Optional[tuple[int, int]]:
    """``(step, total)`` from a progress text, None when it has none."""
    match = _STEP.search(text)
    return (int(match.group(1)), int(match.group(2))) if match else None
