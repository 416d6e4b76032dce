#!/usr/bin/env python3
"""Does the device wait? The daemon against a direct loop of the same engine, when the engine is
busy for a known time and the CPU is free meanwhile (a GPU box), and how soon a drop is queued
while a long unit runs.

    python bench/pipeline.py [--unit-seconds 1.0 0.1] [--jobs 8] [--size 512] [--latency-unit 30]

The engine is the fake engine with ``fake.unit_seconds = S``: each of its four operations
(encode_latent, encode_text, sample, decode) sleeps S seconds and does little else, as a card
computing while the host waits. The direct loop is what a script would write: prepare the
image, call the four operations, encode a PNG, write it. The daemon (in this process, models
already loaded after a warm-up job) ingests the same jobs from its inbox and runs them with
every checkpoint written, recorded and fsynced, publishing and archiving included. Both sides
take turns for ``--rounds`` rounds; each side's best round counts.

Then a real ``run.py serve`` process computes a job whose units take ``--latency-unit`` seconds;
while the first of them runs, jobs are dropped into the inbox one after another, and the time
from each drop (renamed into place) to its row in the database, and to its line in
``run.py status``, is printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from batch import ROOT, direct_loop, job_values, drop_jobs, settings_for

from processor.daemon import Daemon
from tests.daemon import Folders, tiny_job


def direct(root: Path, count: int, unit: float, size: int, steps: int) -> float:
    return direct_loop(settings_for(root, None, fake={"unit_seconds": unit}), root, count, size, steps)


def through_daemon(root: Path, count: int, unit: float, size: int, steps: int) -> float:
    """Seconds from the drop of ``count`` jobs until the last is published, ingest running in its
    own thread as in ``serve``."""
    settings = settings_for(root, None, fake={"unit_seconds": unit})
    drop_jobs(settings.inbox, 1, 10_000, size, **job_values(size, steps))  # warm-up job: loads the models
    daemon = Daemon(settings)
    daemon.start()
    daemon.intake.start()
    try:
        run_until(daemon, lambda: published(settings) == 1)
        started = time.perf_counter()
        drop_jobs(settings.inbox, count, 0, size, **job_values(size, steps))
        daemon.intake.wake.set()  # what the watcher would do
        run_until(daemon, lambda: published(settings) == count + 1)
        return time.perf_counter() - started
    finally:
        daemon.shutdown()


def published(settings) -> int:
    return len(list(settings.outbox.glob("job-*.json")))


def run_until(daemon: Daemon, finished) -> None:
    """The compute loop of ``serve``, until ``finished()``, which is asked only while the loop
    has nothing to do (it lists the outbox: asked after every unit, it would cost the loop
    several milliseconds a job that ``serve`` does not spend)."""
    while True:
        if daemon.tick(time.monotonic()):
            continue
        if finished():
            return
        daemon.work_arrived.wait(0.005)
        daemon.work_arrived.clear()


def drop_latency(root: Path, unit: float, drops: int) -> tuple[list[float], list[float]]:
    """Seconds from each drop to its row, and to its line in ``run.py status``, while a unit runs."""
    folders = Folders(root, env_extra={"QIE_FAKE__UNIT_SECONDS": str(unit), "QIE_SETTLE_SECONDS": "2",
                                       "QIE_LOG_LEVEL": "INFO"})
    to_row, to_status = [], []
    with folders.serve() as daemon:
        daemon.wait_ready()
        folders.drop("long", tiny_job(seed=1))
        daemon.wait_for(lambda: folders.db_rows("SELECT id FROM jobs WHERE stage = 'encode_text'"), timeout=60,
                        what="the long unit to start")
        started = time.monotonic()
        for index in range(drops):
            name = f"drop-{index}"
            dropped = time.monotonic()
            folders.drop(name, tiny_job(seed=10 + index))  # renamed into place: closed at once
            daemon.wait_for(lambda: folders.db_rows("SELECT id FROM jobs WHERE name = ?", (name,)), timeout=unit,
                            what=f"{name} queued")
            to_row.append(time.monotonic() - dropped)
            status = json.loads(folders.run("status", "--json").stdout)
            assert name in {job["name"] for job in status["jobs"]}, f"{name} missing from status"
            to_status.append(time.monotonic() - dropped)
        still_first_unit = time.monotonic() - started < unit
        daemon.kill()
    if not still_first_unit:
        print("note: the drops outlasted the first unit; use a longer --latency-unit", file=sys.stderr)
    return to_row, to_status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unit-seconds", type=float, nargs="*", default=[1.0, 0.1],
                        help="none: only the drop latency")
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--latency-unit", type=float, default=30.0, help="seconds of the unit drops arrive during")
    parser.add_argument("--drops", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qie-bench-") as tmp:
        root = Path(tmp)
        print(f"{args.jobs} jobs of {args.size}x{args.size}, {args.steps} steps, fake engine; best of {args.rounds} "
              f"rounds\n")
        print(f"{'unit s':>7}{'direct s/job':>14}{'daemon s/job':>14}{'overhead ms/job':>17}   daemon / direct")
        for unit in args.unit_seconds:
            direct_runs, daemon_runs = [], []
            for r in range(args.rounds):
                direct_runs.append(direct(root / f"direct-{unit}-{r}", args.jobs, unit, args.size, args.steps))
                daemon_runs.append(through_daemon(root / f"daemon-{unit}-{r}", args.jobs, unit, args.size, args.steps))
            direct_s, daemon_s = min(direct_runs), min(daemon_runs)
            print(f"{unit:>7.2f}{direct_s / args.jobs:>14.3f}{daemon_s / args.jobs:>14.3f}"
                  f"{(daemon_s - direct_s) / args.jobs * 1000:>17.1f}   "
                  f"daemon / direct throughput: {direct_s / daemon_s:.1%}", flush=True)
        if args.latency_unit > 0:
            to_row, to_status = drop_latency(root / "latency", args.latency_unit, args.drops)
            print(f"\ndrop to queued while a {args.latency_unit:g} s unit runs: median {statistics.median(to_row):.2f} s, "
                  f"max {max(to_row):.2f} s ({len(to_row)} drops: {', '.join(f'{s:.2f}' for s in to_row)})")
            print(f"drop to shown by run.py status: median {statistics.median(to_status):.2f} s, "
                  f"max {max(to_status):.2f} s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
