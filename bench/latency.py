#!/usr/bin/env python3
"""Results as soon as they are ready: the same batch under each scheduling policy, with a memory
budget that holds every model and with one that cannot.

    python bench/latency.py [--jobs 12] [--unit-seconds 0.2] [--sample-seconds 4.0] [--load-delay 1.0]

The engine is the fake engine: encoding and decoding take ``--unit-seconds`` each, sampling
``--sample-seconds`` (sampling-heavy, like the real model), every model load ``--load-delay``
more. Its models weigh 1 MB (VAE), 4 MB (text encoder) and 8 MB (diffusion model); the tight
budget holds the diffusion model and the VAE but not the text encoder besides them, as a 24 GB
card holds the 20 GB diffusion model but not the 9 GB text encoder too.

Each run: one job alone first (its time is the lone-job time, and it gives the estimator its
first measurements), then the batch dropped at once. Per policy and budget: the first result,
the median and 95th percentile latency (drop to published), the total time, model loads per job,
and the error of the finish time estimated when each job was queued.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from batch import ROOT, drop_jobs, settings_for

from db import jobs, utcnow
from processor.daemon import Daemon

MODEL_BYTES = {"vae_bytes": 1_000_000, "text_encoder_bytes": 4_000_000, "transformer_bytes": 8_000_000}
TIGHT = 8_000_000 + 1_000_000 + 1024


def run(root: Path, policy: str, budget: int | None, count: int, unit: float, sample: float,
        load_delay: float) -> dict:
    fake = {"unit_seconds": unit, "sample_seconds": sample, **MODEL_BYTES}
    settings = settings_for(root, None, fake=fake, scheduling=policy, model_memory_budget=budget,
                            model_load_delay=load_delay, log_level="WARNING")
    daemon = Daemon(settings)
    daemon.start()
    daemon.intake.start()
    try:
        lone_started = time.perf_counter()
        drop_jobs(settings.inbox, 1, 10_000, 64)
        daemon.intake.wake.set()
        serve_until(daemon, settings, 1)
        lone = time.perf_counter() - lone_started
        loads_before = sum(daemon.cache.stats.loads.values())

        dropped = utcnow()
        started = time.perf_counter()
        drop_jobs(settings.inbox, count, 0, 64)
        daemon.intake.wake.set()
        serve_until(daemon, settings, count + 1)
        total = time.perf_counter() - started
        loads = sum(daemon.cache.stats.loads.values()) - loads_before
        with daemon.db.begin() as session:
            rows = [(j.finished_at, j.estimated_finish) for j in jobs.list_jobs(session, ["done"], 10_000)
                    if j.name.startswith("job-0")]
    finally:
        daemon.shutdown()
    latencies = sorted((finished - dropped).total_seconds() for finished, _ in rows)
    errors = [abs((finished - estimated).total_seconds()) for finished, estimated in rows if estimated]
    return {"lone": lone, "first": latencies[0], "median": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))], "total": total,
            "loads_per_job": loads / count, "estimate_error": statistics.median(errors) if errors else None,
            "estimated": len(errors)}


def serve_until(daemon: Daemon, settings, published: int) -> None:
    """The compute loop of ``serve`` until ``published`` jobs are done."""
    while len(list(settings.outbox.glob("*.json"))) < published:
        if not daemon.tick(time.monotonic()):
            daemon.work_arrived.wait(0.005)
            daemon.work_arrived.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--unit-seconds", type=float, default=0.2)
    parser.add_argument("--sample-seconds", type=float, default=4.0)
    parser.add_argument("--load-delay", type=float, default=1.0)
    parser.add_argument("--policies", nargs="+", default=["job-by-job", "stage-major", "auto"])
    args = parser.parse_args()
    print(f"{args.jobs} jobs; encode/decode {args.unit_seconds} s each, sampling {args.sample_seconds} s, "
          f"model load +{args.load_delay} s; {datetime.now():%Y-%m-%d %H:%M}\n")
    print(f"{'budget':<8}{'policy':<13}{'lone s':>8}{'first s':>9}{'median s':>10}{'p95 s':>8}{'total s':>9}"
          f"{'loads/job':>11}{'est. err s':>12}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="qie-latency-") as tmp:
        for label, budget in (("ample", None), ("tight", TIGHT)):
            for policy in args.policies:
                root = Path(tmp) / f"{label}-{policy}"
                root.mkdir()
                r = run(root, policy, budget, args.jobs, args.unit_seconds, args.sample_seconds, args.load_delay)
                results[(label, policy)] = r
                error = f"{r['estimate_error']:.2f}" if r["estimate_error"] is not None else "-"
                print(f"{label:<8}{policy:<13}{r['lone']:>8.2f}{r['first']:>9.2f}{r['median']:>10.2f}{r['p95']:>8.2f}"
                      f"{r['total']:>9.2f}{r['loads_per_job']:>11.2f}{error:>12}", flush=True)
    if all((b, p) in results for b in ("ample", "tight") for p in ("job-by-job", "stage-major", "auto")):
        ample, tight = {p: results[("ample", p)] for p in args.policies}, {p: results[("tight", p)] for p in args.policies}
        print("\ngoals:")
        print(f"  ample budget, auto: first result {ample['auto']['first'] / ample['auto']['lone']:.2f}x a lone job "
              f"(goal <= 1.2x); total {ample['auto']['total'] / ample['job-by-job']['total'] - 1:+.1%} "
              f"against job-by-job (goal within 2%)")
        print(f"  tight budget, auto: {tight['auto']['loads_per_job']:.2f} loads per job against job-by-job's "
              f"{tight['job-by-job']['loads_per_job']:.2f} (goal at most half); median latency "
              f"{tight['auto']['median'] / tight['stage-major']['median']:.0%} of stage-major's (goal at most 60%)")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
