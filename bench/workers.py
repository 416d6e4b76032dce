#!/usr/bin/env python3
"""Throughput of several worker processes on one PostgreSQL queue, on tiny jobs.

    python bench/workers.py [--jobs 48] [--workers 1,2,3] [--threads 1]

For each worker count: a fresh database on a private PostgreSQL cluster (as in the tests),
fresh shared folders, that many ``run.py worker`` processes (every stage, one torch thread
each). Each worker first runs one warm-up job alone (the others paused with SIGSTOP), so that
its imports and model loads (seconds of CPU each, a one-off per process) are not counted. Then
``--jobs`` tiny jobs (each its own image, so no checkpoint is shared) are ingested at once and
the clock runs until the last one is done. Printed: jobs a second, the ratio to one worker,
and the CPU time the workers spent per job (the PostgreSQL server's is not counted). On a
machine with N cores, more than N workers of one thread each cannot go faster; a real
deployment runs one worker per GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from batch import drop_jobs

from config import load_settings
from db import Database, jobs
from processor.ingest import Ingestor
from stages.tiny_model import build_tiny_model
from tests.daemon import Folders
from tests.postgres import PostgresServer, Unavailable


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(server: PostgresServer, model: Path, root: Path, workers: int, count: int,
        threads: int) -> tuple[float, float]:
    """Seconds until every job is done, and the CPU seconds the workers used meanwhile."""
    url = server.create_database("bench")
    folders = Folders(root, model, env_extra={
        "QIE_DATABASE_URL": url, "QIE_THREADS": str(threads), "QIE_POLL_INTERVAL": "0.05",
        "QIE_GC_INTERVAL": "0", "QIE_LOG_LEVEL": "INFO"})
    db = Database(url)
    settings = load_settings(None, inbox=folders.inbox, outbox=folders.outbox, failed=folders.failed,
                             archive=folders.archive, work=folders.work, database_url=url, settle_seconds=0,
                             model_path=model, log_level="WARNING")
    ingestor = Ingestor(settings, db)
    processes = []

    def ingest(jobs_count: int, offset: int) -> None:
        drop_jobs(folders.inbox, jobs_count, offset=offset)
        ingested = 0
        while ingested < jobs_count:
            ingested += len(ingestor.scan(time.monotonic()).ingested)

    def wait_finished(total: int) -> dict[str, int]:
        while True:
            with db.begin() as session:
                states = jobs.counts_by_state(session)
            if states.get("done", 0) + states.get("failed", 0) >= total:
                if states.get("failed"):
                    raise RuntimeError(f"{states['failed']} jobs failed")
                return states
            if not all(p.alive() for p in processes):
                raise RuntimeError("a worker exited:\n" + next(p.log for p in processes if not p.alive())[-3000:])
            time.sleep(0.01)

    try:
        for index in range(workers):  # one warm-up job each, alone
            processes.append(folders.worker())
            processes[-1].wait_for(lambda p=processes[-1]: "ready" in p.log, timeout=300, what="start-up")
            ingest(1, offset=10_000 + index)
            wait_finished(index + 1)
            processes[-1].process.send_signal(signal.SIGSTOP)
        for process in processes:
            process.process.send_signal(signal.SIGCONT)
        cpu_before = sum(cpu_seconds(p.process.pid) for p in processes)
        started = time.perf_counter()
        ingest(count, offset=0)
        wait_finished(workers + count)
        seconds = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.process.pid) for p in processes) - cpu_before
        return seconds, cpu
    finally:
        for process in processes:
            process.process.send_signal(signal.SIGCONT)
            process.stop()
        db.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--workers", default="1,2,3", help="comma-separated worker counts (default 1,2,3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    try:
        server = PostgresServer.start()
    except Unavailable as exc:
        print(f"no PostgreSQL server: {exc}", file=sys.stderr)
        return 1
    base = Path(tempfile.mkdtemp(prefix="qie-bench-workers-"))
    try:
        model = build_tiny_model(base / "model", seed=0)
        results = {n: run(server, model, base / f"workers-{n}", n, args.jobs, args.threads) for n in counts}
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    one = results.get(1, (None, None))[0]
    print(f"{args.jobs} tiny jobs, PostgreSQL (private cluster), {os.cpu_count()} CPU cores "
          f"(load average {os.getloadavg()[0]:.1f} now), {args.threads} torch thread(s) a worker")
    print(f"{'workers':>7}  {'seconds':>8}  {'jobs/s':>7}  {'vs 1 worker':>11}  {'worker CPU s/job':>16}")
    for n, (seconds, cpu) in results.items():
        ratio = f"{one / seconds:.2f}x" if one else "-"
        print(f"{n:>7}  {seconds:>8.2f}  {args.jobs / seconds:>7.2f}  {ratio:>11}  {cpu / args.jobs:>16.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
