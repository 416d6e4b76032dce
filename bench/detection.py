#!/usr/bin/env python3
"""Detection latency: from a job dropped into the inbox to the job being queued.

    python bench/detection.py [--drops 5]

Runs the real daemon process with its default settle times, once watching with native events
(inotify) and once polling, drops jobs the way a person copies files (image, then job file,
each written and closed), and measures until the job's row exists in the database.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch import ROOT, colour

from stages.tiny_model import build_tiny_model
from tests.daemon import make_image, tiny_job


def job_states(state: Path) -> dict[int, str]:
    try:
        with sqlite3.connect(state, timeout=5) as conn:
            return dict(conn.execute("SELECT id, state FROM jobs"))
    except sqlite3.OperationalError:
        return {}


def wait_idle(state: Path, count: int) -> None:
    """Until ``count`` jobs exist and all are done (the daemon is idle, its models loaded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = job_states(state)
        if len(states) >= count and all(s == "done" for s in states.values()):
            return
        time.sleep(0.05)
    raise RuntimeError(f"jobs did not finish: {job_states(state)}")


def drop(inbox: Path, i: int) -> None:
    folder = inbox / f"drop-{i}"
    folder.mkdir()
    make_image(folder / "photo.png", (64, 64), colour(i))
    (folder / "job.json").write_text(json.dumps(tiny_job(seed=i)))


def measure(root: Path, model: Path, mode: str, drops: int) -> list[float]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("QIE_")},
           "QIE_INBOX": str(root / "inbox"), "QIE_OUTBOX": str(root / "outbox"), "QIE_FAILED": str(root / "failed"),
           "QIE_ARCHIVE": str(root / "archive"), "QIE_WORK": str(root / "work"), "QIE_STATE": str(root / "state.db"),
           "QIE_MODEL_PATH": str(model), "QIE_WATCH_MODE": mode, "QIE_LOG_LEVEL": "WARNING"}
    (root / "inbox").mkdir(parents=True)
    daemon = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "serve"], env=env, cwd=root)
    latencies = []
    state = root / "state.db"
    try:
        drop(root / "inbox", 1000)  # warm-up: start-up and model loading are not measured
        wait_idle(state, 1)
        for i in range(drops):
            started = time.monotonic()
            drop(root / "inbox", i)
            while len(job_states(state)) < i + 2:
                if time.monotonic() - started > 60:
                    raise RuntimeError(f"{mode}: drop {i} not queued within 60 s")
                time.sleep(0.005)
            latencies.append(time.monotonic() - started)
            wait_idle(state, i + 2)
    finally:
        daemon.terminate()
        daemon.wait(60)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drops", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qie-bench-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        results = {mode: measure(root / mode, model, mode, args.drops) for mode in ("native", "polling")}
    print(f"\ndrop to queued, {args.drops} drops each (default settings: settle_seconds 2.0, "
          f"settle_after_close 0.5, poll_interval 1.0)\n")
    print(f"{'watching':<10}{'median s':>10}{'max s':>8}   each drop, s")
    for mode, values in results.items():
        print(f"{mode:<10}{statistics.median(values):>10.2f}{max(values):>8.2f}   "
              + " ".join(f"{v:.2f}" for v in values))


if __name__ == "__main__":
    main()
