#!/usr/bin/env python3
"""Soak: does the daemon's memory stay flat over thousands of jobs?

    python bench/soak.py [--jobs 2000] [--every 100] [--engine diffusers|fake] [--size 64]

A real ``run.py serve`` process takes jobs dropped into its inbox a batch at a time (about 20
waiting at any moment), each with its own image and seed, so nothing is reused between them.
Every ``--every`` finished jobs the daemon's resident memory (RSS, from /proc) is printed with
the jobs done and the seconds since the start. The figure that matters: after warm-up (the
first few hundred jobs: models loaded, caches filled to their bounds) the RSS stays within
100 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemon import Folders, make_image, tiny_job  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 1e6


def drop(folders: Folders, index: int, size: int) -> None:
    staging = folders.root / f"staging-{index}"
    staging.mkdir()
    make_image(staging / "photo.png", (size, size), (index * 37 % 256, index * 91 % 256, index * 53 % 256))
    (staging / "job.json").write_text(__import__("json").dumps(tiny_job(seed=index, megapixels=size * size / 2**20)))
    staging.rename(folders.inbox / f"job-{index:05d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--engine", choices=("diffusers", "fake"), default="diffusers")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--queue", type=int, default=20, help="jobs kept waiting in the inbox or queue")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qie-soak-") as tmp:
        root = Path(tmp)
        model = None
        if args.engine == "diffusers":
            from stages.tiny_model import build_tiny_model
            model = build_tiny_model(root / "model")
        folders = Folders(root / "soak", model, env_extra={
            "QIE_SETTLE_SECONDS": "0.2", "QIE_ORIGINALS": "delete",
            "QIE_PARTIAL_INTERVAL": "5", "QIE_GC_INTERVAL": "600"})
        started = time.monotonic()
        dropped = 0
        samples: list[tuple[int, float]] = []
        print(f"{args.jobs} jobs, {args.engine} engine, {args.size}x{args.size}\n")
        print(f"{'jobs done':>10}{'RSS MB':>9}{'seconds':>9}")
        with folders.serve() as daemon:
            daemon.wait_ready(timeout=120)
            done = 0
            next_sample = 0
            while done < args.jobs:
                while dropped < args.jobs and dropped - done < args.queue:
                    drop(folders, dropped, args.size)
                    dropped += 1
                done = folders.db_rows("SELECT COUNT(*) FROM jobs WHERE state IN ('done', 'failed')")[0][0]
                if done >= next_sample:
                    samples.append((done, rss_mb(daemon.process.pid)))
                    print(f"{done:>10}{samples[-1][1]:>9.0f}{time.monotonic() - started:>9.0f}", flush=True)
                    next_sample += args.every
                if not daemon.alive():
                    raise SystemExit(f"the daemon exited:\n{daemon.log[-3000:]}")
                time.sleep(0.2)
            samples.append((done, rss_mb(daemon.process.pid)))
            failed = folders.db_rows("SELECT COUNT(*) FROM jobs WHERE state = 'failed'")[0][0]
            daemon.stop()
    warm = [mb for jobs, mb in samples if jobs >= min(300, args.jobs // 3)]
    print(f"\nfailed jobs: {failed}")
    print(f"RSS after warm-up (from job {min(300, args.jobs // 3)}): min {min(warm):.0f} MB, max {max(warm):.0f} MB, "
          f"spread {max(warm) - min(warm):.0f} MB (goal: within 100 MB); first sample {samples[0][1]:.0f} MB, "
          f"last {samples[-1][1]:.0f} MB")


if __name__ == "__main__":
    main()
