#!/usr/bin/env python3
"""Orchestration overhead: N tiny jobs through the daemon versus the engine called directly.

    python bench/overhead.py [--jobs 5] [--rounds 3] [--size 1024] [--steps 4] [--fresh-process]

Both sides run in this process on the same tiny model, after one warm-up job each, with models
already loaded, so the difference is what the daemon adds per job: ingest (hashing, copying),
database records, checkpoints (written, fsynced, hashed), publishing and archiving. Every job
has its own image, so the daemon reuses no encoding. The sides take turns for ``--rounds``
rounds and each side's best round counts, which keeps a busy machine's noise out of the ratio.
The default job is a job file's default (1 MP, 4 steps); ``--size 64`` shows the daemon's costs
at their most visible. ``--fresh-process`` also times ``run.py serve --once`` as a new process
(imports and model loading included).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from batch import ROOT, direct_loop, job_values, drain, drop_jobs, settings_for
from sqlalchemy import event

from processor.daemon import Daemon
from stages.tiny_model import build_tiny_model


def direct(model: Path, root: Path, count: int, threads: int, size: int, steps: int) -> float:
    """The engine loop a script would write (``batch.direct_loop``)."""
    return direct_loop(settings_for(root, model, threads=threads), root, count, size, steps)


@dataclass
class DaemonRun:
    seconds: float
    commits: int  # database transactions committed during the measured batch
    fsyncs: int  # files and folders flushed to disk during it


def through_daemon(model: Path, root: Path, count: int, threads: int, size: int, steps: int) -> DaemonRun:
    settings = settings_for(root, model, threads=threads)
    drop_jobs(settings.inbox, 1, 10_000, size, **job_values(size, steps))  # warm-up job: loads the models
    daemon = Daemon(settings, once=True)
    daemon.start()
    commits = Counter()
    event.listen(daemon.db.engine, "commit", lambda _connection: commits.update(["commit"]))
    try:
        drain(daemon)
        drop_jobs(settings.inbox, count, 0, size, **job_values(size, steps))
        daemon.intake.wake.set()
        commits.clear()
        with counting_fsyncs() as fsyncs:
            elapsed = drain(daemon)
    finally:
        daemon.shutdown()
    published = len(list(settings.outbox.glob("job-*.png")))
    assert published == count + 1, f"only {published} of {count + 1} jobs were published"
    return DaemonRun(elapsed, commits["commit"], fsyncs["fsync"])


@contextmanager
def counting_fsyncs() -> Iterator[Counter]:
    """Count ``os.fsync`` calls while the block runs."""
    counts: Counter = Counter()
    real = os.fsync

    def fsync(fd: int) -> None:
        counts.update(["fsync"])
        real(fd)

    os.fsync = fsync
    try:
        yield counts
    finally:
        os.fsync = real


def fresh_process(model: Path, root: Path, count: int, threads: int, size: int, steps: int) -> float:
    settings = settings_for(root, model, threads=threads)
    drop_jobs(settings.inbox, count, 0, size, **job_values(size, steps))
    env = {"QIE_INBOX": str(settings.inbox), "QIE_OUTBOX": str(settings.outbox), "QIE_FAILED": str(settings.failed),
           "QIE_ARCHIVE": str(settings.archive), "QIE_WORK": str(settings.work), "QIE_STATE": str(settings.state),
           "QIE_MODEL_PATH": str(model), "QIE_SETTLE_SECONDS": "0", "QIE_THREADS": str(threads),
           "QIE_LOG_LEVEL": "WARNING", "PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "run.py"), "serve", "--once"], env=env, check=True, cwd=root)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="each side runs this often, alternately; the best counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels (1024: a job file's default 1 MP)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fresh-process", action="store_true", help="also time run.py serve --once as a new process")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    n, shape = args.jobs, (args.size, args.steps)
    direct_runs: list[float] = []
    daemon_runs: list[DaemonRun] = []
    with tempfile.TemporaryDirectory(prefix="qie-bench-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        for r in range(args.rounds):
            direct_runs.append(direct(model, root / f"direct-{r}", n, args.threads, *shape))
            daemon_runs.append(through_daemon(model, root / f"daemon-{r}", n, args.threads, *shape))
            shutil.rmtree(root / f"direct-{r}", ignore_errors=True)
            shutil.rmtree(root / f"daemon-{r}", ignore_errors=True)
            print(f"round {r + 1}: direct {direct_runs[-1] / n * 1000:.1f} ms/job, "
                  f"daemon {daemon_runs[-1].seconds / n * 1000:.1f} ms/job", flush=True)
        process_s = fresh_process(model, root / "process", n, args.threads, *shape) if args.fresh_process else None
    best = min(daemon_runs, key=lambda run: run.seconds)
    direct_s, daemon_s = min(direct_runs), best.seconds
    print(f"\n{n} tiny {args.size}x{args.size} jobs, {args.steps} steps, torch threads {args.threads}, "
          f"best of {args.rounds} rounds\n")
    print(f"{'path':<44}{'total s':>9}{'ms/job':>9}{'jobs/s':>9}")
    rows = [("engine called directly (models loaded)", direct_s), ("daemon in-process (models loaded)", daemon_s)]
    if process_s is not None:
        rows.append(("run.py serve --once, fresh process", process_s))
    for label, seconds in rows:
        print(f"{label:<44}{seconds:>9.2f}{seconds / n * 1000:>9.1f}{n / seconds:>9.2f}")
    print(f"\nper job, the daemon ran {best.commits / n:.1f} database transactions and {best.fsyncs / n:.1f} file fsyncs")
    print(f"\ndaemon overhead per job: {(daemon_s - direct_s) / n * 1000:.1f} ms")
    print(f"daemon throughput / direct throughput: {direct_s / daemon_s:.1%}")


if __name__ == "__main__":
    main()
