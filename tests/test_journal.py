"""Logging to the journal natively: the wire format, the large-record path, and when the daemon
uses it. A unix datagram socket stands in for journald here; tests/test_systemd_booted.py reads
the real journal."""

from __future__ import annotations

import array
import io
import logging
import os
import socket
import struct
import tempfile
from pathlib import Path

import pytest

from processor.logs import JobContextFilter, JournalHandler, configure, encode_journal_fields, is_journal, job_context


def parse_journal_fields(data: bytes) -> dict[str, str]:
    """journald's side of the native protocol."""
    fields, at = {}, 0
    while at < len(data):
        end = data.index(b"\n", at)
        line = data[at:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            at = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            at = end + 10 + size
        fields[name.decode()] = value.decode()
    return fields


class FakeJournal:
    """A unix datagram socket that receives records as journald does: inline, or as a memfd."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="qie-journal-")
        self.address = os.path.join(self._dir, "socket")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.address)
        self.sock.settimeout(5)
        self.via_memfd = 0

    def receive(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancillary, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(fds.itemsize))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
        if fds:
            self.via_memfd += 1
            with os.fdopen(fds[0], "rb") as memfd:
                memfd.seek(0)  # journald maps it; the sender's writes moved the shared offset
                data = memfd.read()
        return parse_journal_fields(data)

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.address)
        os.rmdir(self._dir)


@pytest.fixture
def journal():
    fake = FakeJournal()
    yield fake
    fake.close()


def _logger(handler: logging.Handler) -> logging.Logger:
    handler.addFilter(JobContextFilter())
    logger = logging.getLogger(f"qie.test.journal.{id(handler)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_a_record_inside_a_job_reaches_the_journal_with_job_stage_priority_and_code_location(journal):
    logger = _logger(JournalHandler(io.StringIO(), address=journal.address))
    with job_context(12, "sample"):
        logger.warning("step %d/%d slow", 3, 8)
    fields = journal.receive()
    assert fields["MESSAGE"] == f"{logger.name}: [job 12 sample] step 3/8 slow"
    assert (fields["QIE_JOB"], fields["QIE_STAGE"], fields["PRIORITY"]) == ("12", "sample", "4")
    assert fields["SYSLOG_IDENTIFIER"] == "qie-hotfolder" and fields["QIE_LOGGER"] == logger.name
    assert fields["CODE_FILE"] == __file__ and fields["CODE_FUNC"].startswith("test_a_record_inside")

    logger.debug("between jobs")
    fields = journal.receive()
    assert "QIE_JOB" not in fields and "QIE_STAGE" not in fields and fields["PRIORITY"] == "7"


def test_a_multi_line_message_goes_as_a_sized_field_and_keeps_its_lines(journal):
    logger = _logger(JournalHandler(io.StringIO(), address=journal.address))
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("stage failed")
    message = journal.receive()["MESSAGE"]
    assert message.startswith(f"{logger.name}: stage failed\n  | Traceback (most recent call last):")
    assert message.endswith("  | ValueError: bad\n  | value")  # each line marked, as in the text log
    assert encode_journal_fields({"A": "x\ny", "B": "z"}) == b"A\n" + struct.pack("<Q", 3) + b"x\ny\nB=z\n"


def test_a_record_larger_than_a_datagram_goes_as_a_sealed_memfd(journal):
    handler = JournalHandler(io.StringIO(), address=journal.address)
    logger = _logger(handler)
    logger.info("small")
    assert journal.receive()["MESSAGE"].endswith("small") and journal.via_memfd == 0
    big = "x" * 4_000_000  # beyond any unix datagram (the limit is the socket's send buffer)
    logger.info("%s", big)
    assert journal.receive()["MESSAGE"].endswith(big)
    assert journal.via_memfd == 1


def test_without_a_journal_records_go_to_standard_error_as_text():
    stderr = io.StringIO()
    logger = _logger(JournalHandler(stderr, address="/nonexistent/journal/socket"))
    with job_context(3, "decode"):
        logger.error("disk full")
    assert f"ERROR   {logger.name}: [job 3 decode] disk full" in stderr.getvalue()


def test_the_daemon_logs_to_the_journal_only_when_standard_error_is_the_journal_stream(tmp_path: Path, monkeypatch):
    with open(tmp_path / "stream", "w") as stream, open(tmp_path / "other", "w") as other:
        info = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        assert is_journal(stream, environ)
        assert not is_journal(other, environ)  # standard error redirected elsewhere since
        assert not is_journal(stream, {}) and not is_journal(io.StringIO(), environ)

        monkeypatch.setenv("JOURNAL_STREAM", environ["JOURNAL_STREAM"])
        root = logging.getLogger()
        saved = root.handlers[:], root.level
        try:
            assert isinstance(configure("INFO", stream=stream), JournalHandler)
            assert not isinstance(configure("INFO", json_lines=True, stream=stream), JournalHandler)  # asked for
            assert not isinstance(configure("INFO", stream=other), JournalHandler)
        finally:
            root.handlers[:], root.level = saved
