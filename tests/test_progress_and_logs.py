"""Live progress and logs: ``status --watch``, the terminal progress bar, and every log line
about a job carrying its id and stage, as text and as JSON lines."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
import subprocess
import sys
import time

from db import Database, jobs
from processor.logs import JobContextFilter, JsonFormatter, TerminalHandler, TEXT_FORMAT, job_context, report_progress
from tests.daemon import ROOT, Folders, tiny_job


def record_through(formatter: logging.Formatter, message: str) -> str:
    record = logging.LogRecord("processor.runner", logging.INFO, __file__, 1, message, (), None)
    JobContextFilter().filter(record)
    return formatter.format(record)


def test_log_lines_inside_a_job_context_carry_its_id_and_stage_in_both_formats():
    text = logging.Formatter(TEXT_FORMAT)
    assert record_through(text, "waiting").endswith("processor.runner: waiting")
    with job_context(12, "encode_text"):
        assert record_through(text, "loaded").endswith("processor.runner: [job 12 encode_text] loaded")
        with job_context(12, "sample"):  # the inner stage wins
            entry = json.loads(record_through(JsonFormatter(), "step 3/8"))
            assert (entry["job"], entry["stage"], entry["message"]) == (12, "sample", "step 3/8")
        assert json.loads(record_through(JsonFormatter(), "x"))["stage"] == "encode_text"
    assert "job" not in json.loads(record_through(JsonFormatter(), "idle"))


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_sampling_steps_draw_one_progress_bar_that_log_lines_scroll_past():
    stream = FakeTerminal()
    handler = TerminalHandler(stream, width=10)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("qie.test.progress")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    from processor import logs
    logs._terminal["handler"] = handler
    try:
        report_progress(logger, "job 1 (x): sample step 1/4")
        logger.info("a log line meanwhile")
        report_progress(logger, "job 1 (x): sample step 4/4")
        report_progress(logger, "job 1 (x): decode")
    finally:
        logs._terminal["handler"] = None
    out = stream.getvalue()
    assert "\r\x1b[Kjob 1 (x): sample step 1/4 [##........]  25%" in out
    # The log line clears the bar, is written, and the bar is drawn again below it.
    assert "\r\x1b[Ka log line meanwhile\njob 1 (x): sample step 1/4 [##........]  25%" in out
    assert out.endswith("sample step 4/4 [##########] 100%\njob 1 (x): decode\n")


def test_the_daemon_logs_json_lines_naming_job_and_stage(folders: Folders):
    folders.drop("logged", tiny_job(steps=2))
    result = folders.run("serve", "--once", "--log-json")
    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert entries and len(entries) == len([l for l in result.stderr.splitlines() if l.strip()]), result.stderr
    about_job = [e for e in entries if re.match(r"job 1\b", e["message"])]
    assert about_job and all(e.get("job") == 1 and e.get("stage") for e in about_job), about_job
    stages = {e["stage"] for e in entries if e.get("job") == 1}
    assert {"ingest", "sample"} <= stages
    steps = [e["message"] for e in entries if "sample step" in e["message"]]
    assert steps[-1] == "job 1 (logged): sample step 2/2"


def test_status_watch_refreshes_with_per_step_progress_until_interrupted(folders: Folders):
    db = Database(f"sqlite:///{folders.state}")
    with db.begin() as session:
        job = jobs.create_job(session, name="busy", source="busy.json", ingest_key="k", spec={}, inputs=[],
                              work_dir="/w")
        job.state, job.stage, job.step, job.steps_total = "running", "sample", 3, 8
    db.close()
    output = folders.root / "watch.out"
    with open(output, "w") as sink:
        watch = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "status", "--watch", "--interval", "0.2"],
                                 env=folders.env(), cwd=folders.root, stdout=sink, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while output.read_text().count("busy") < 3 and time.monotonic() < deadline and watch.poll() is None:
                time.sleep(0.1)
            assert watch.poll() is None, "status --watch stopped by itself"
            watch.send_signal(signal.SIGINT)  # Ctrl-C
            _, err = watch.communicate(timeout=30)
        finally:
            if watch.poll() is None:
                watch.kill()
    out = output.read_text()
    assert watch.returncode == 0, err
    assert out.count("busy") >= 3, out  # it refreshed
    assert "sample" in out and "[###.......] 3/8" in out
    assert "\x1b[2J" not in out  # not a terminal: no screen clearing
