#!/usr/bin/env python3
"""The cost of a job that waits: CPU of an idle daemon whose inbox holds a job folder of many
files waiting for an image that does not come.

    python bench/waiting.py [--files 2000] [--seconds 20] [--root DIR]

Runs the real daemon process (fake engine, default settle and rescan times, native events),
lets it see the waiting job, then reads its CPU time (user + system, from /proc) over
``--seconds`` and prints it as a share of one core, beside the same daemon with an empty inbox.
``--root`` runs another checkout's ``run.py`` (e.g. an older commit) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch import ROOT

from tests.daemon import tiny_job

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def measure(root: Path, run_py: Path, files: int, seconds: float) -> float:
    """Share of one core the daemon used over ``seconds`` once it saw the inbox."""
    for name in ("inbox", "outbox", "failed", "archive", "work"):
        (root / name).mkdir(parents=True)
    if files:
        staging = root / "staging"
        staging.mkdir()
        for i in range(files):
            (staging / f"page-{i:05}.txt").write_text("x")
        (staging / "job.json").write_text(json.dumps(tiny_job(image1="never.png")))
        staging.rename(root / "inbox" / "big")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QIE_")},
           "QIE_INBOX": str(root / "inbox"), "QIE_OUTBOX": str(root / "outbox"), "QIE_FAILED": str(root / "failed"),
           "QIE_ARCHIVE": str(root / "archive"), "QIE_WORK": str(root / "work"), "QIE_STATE": str(root / "state.db"),
           "QIE_ENGINE": "fake", "QIE_LOG_LEVEL": "WARNING", "QIE_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(run_py), "serve"], env=env, cwd=root,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (root / "state.db").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(5)  # start-up, the first scans, imports
        before, start = cpu_seconds(process.pid), time.monotonic()
        time.sleep(seconds)
        return (cpu_seconds(process.pid) - before) / (time.monotonic() - start)
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose run.py to measure")
    args = parser.parse_args()
    run_py = args.root / "run.py"
    with tempfile.TemporaryDirectory() as tmp:
        empty = measure(Path(tmp) / "empty", run_py, 0, args.seconds)
        waiting = measure(Path(tmp) / "waiting", run_py, args.files, args.seconds)
    print(f"daemon CPU over {args.seconds:.0f} s ({run_py}):")
    print(f"  empty inbox                                        {100 * empty:5.1f} % of a core")
    print(f"  a job folder of {args.files} files waiting for an image {100 * waiting:5.1f} % of a core")


if __name__ == "__main__":
    main()
