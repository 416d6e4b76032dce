#!/usr/bin/env python3
"""Orchestration overhead: N tiny jobs through the daemon versus the engine called directly.

    python bench/overhead.py [--jobs 20] [--threads 1] [--size 64] [--steps 4]

Both sides run in this process on the same tiny model, after one warm-up job each, with models
already loaded, so the difference is what the daemon adds per job: ingest (hashing, copying),
database records, checkpoints (written, fsynced, hashed), publishing and archiving. Every job
has its own image, so the daemon reuses no encoding. Also shown: the same batch through
``run.py serve --once`` as a fresh process (imports and model loading included).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from batch import ROOT, colour, drain, drop_jobs, settings_for

from config import StageParameters
from processor import publish
from processor.daemon import Daemon
from stages import ModelCache, create_engine
from stages.prepare import prepare
from stages.tiny_model import build_tiny_model
from tests.daemon import make_image


def job_values(size: int, steps: int) -> dict:
    return {"megapixels": size * size / 1024 / 1024, "steps": steps}


def direct(model: Path, root: Path, count: int, threads: int, size: int, steps: int) -> float:
    """The engine loop a script would write: load, run five operations, save a PNG."""
    settings = settings_for(root, model, threads=threads)
    engine = create_engine(settings, ModelCache())
    params = StageParameters(**job_values(size, steps))
    out = root / "direct"
    out.mkdir(parents=True)

    def one(i: int) -> None:
        image = make_image(root / "direct-in" / f"{i}.png", (size, size), colour(i))
        prepared = prepare([("image1", image)], params, settings.max_image_pixels)
        latent = engine.encode_latent(prepared, params)
        text = engine.encode_text(prepared, params, "make the sky purple", "")
        sampled = engine.sample(prepared, latent, text, params, i, None, None)
        decoded = engine.decode(sampled, params)
        (out / f"{i}.png").write_bytes(publish.image_bytes(decoded["image"], "png", 95, {}))

    one(10_000)  # warm-up
    started = time.perf_counter()
    for i in range(count):
        one(i)
    return time.perf_counter() - started


def through_daemon(model: Path, root: Path, count: int, threads: int, size: int, steps: int) -> float:
    settings = settings_for(root, model, threads=threads)
    drop_jobs(settings.inbox, 1, 10_000, size, **job_values(size, steps))  # warm-up job: loads the models
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        drain(daemon)
        drop_jobs(settings.inbox, count, 0, size, **job_values(size, steps))
        daemon.wake.set()
        elapsed = drain(daemon)
    finally:
        daemon.shutdown()
    published = len(list(settings.outbox.glob("job-*.png")))
    assert published == count + 1, f"only {published} of {count + 1} jobs were published"
    return elapsed


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
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="qie-bench-") as tmp:
        root = Path(tmp)
        model = build_tiny_model(root / "model")
        shape = (args.size, args.steps)
        direct_s = direct(model, root / "direct", args.jobs, args.threads, *shape)
        daemon_s = through_daemon(model, root / "daemon", args.jobs, args.threads, *shape)
        process_s = fresh_process(model, root / "process", args.jobs, args.threads, *shape)
        shutil.rmtree(root / "direct", ignore_errors=True)
    n = args.jobs
    print(f"\n{n} tiny {args.size}x{args.size} jobs, {args.steps} steps, torch threads {args.threads}\n")
    print(f"{'path':<44}{'total s':>9}{'ms/job':>9}{'jobs/s':>9}")
    for label, seconds in (("engine called directly (models loaded)", direct_s),
                           ("daemon in-process (models loaded)", daemon_s),
                           ("run.py serve --once, fresh process", process_s)):
        print(f"{label:<44}{seconds:>9.2f}{seconds / n * 1000:>9.1f}{n / seconds:>9.2f}")
    print(f"\ndaemon overhead per job: {(daemon_s - direct_s) / n * 1000:.1f} ms")
    print(f"daemon throughput / direct throughput: {direct_s / daemon_s:.1%}")


if __name__ == "__main__":
    main()
