#!/usr/bin/env python3
"""The web server's cost: page latency with a long history, and the compute loop with a browser.

    python bench/web.py [--history 10000] [--requests 200] [--jobs 30] [--rounds 3] [--browser chromium|follower]

1. Latency: a database with ``--history`` finished jobs (each with five stage runs and three
   events), served by ``run.py web`` in its own process; ``--requests`` sequential requests each
   of the queue page, ``/api/jobs`` (first page, and filtered by state), ``/metrics``: p50, p95.
2. Overhead: ``--jobs`` jobs through an in-process daemon (fake engine, no stage time: what is
   measured is the daemon's own work per job) with its web server in a thread, once with nothing
   connected and once with a browser on the queue page (``--browser chromium``: headless
   Chromium, when installed; ``follower``: a client that follows ``/events`` and loads the page
   every second, in another process). The two take turns for ``--rounds`` rounds; the median
   round of each counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import httpx
from batch import ROOT, drain, drop_jobs, settings_for
from sqlalchemy import insert

from config import InputFile, JobSpec, Published, StageParameters
from db import Database, utcnow
from db.schema import Event, Job, StageRun
from processor.daemon import Daemon
from web import WebServer

STAGES = ("prepare", "encode_latent", "encode_text", "sample", "decode")
FOLLOWER = """
import sys, time, threading, httpx
url = sys.argv[1]
def follow():
    with httpx.stream("GET", url + "/events?page=1", timeout=None) as stream:
        for _ in stream.iter_lines():
            pass
threading.Thread(target=follow, daemon=True).start()
while True:
    httpx.get(url + "/")
    time.sleep(1)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fill_history(settings, count: int) -> None:
    """``count`` finished jobs straight into the database (ingest and compute are not measured)."""
    db = Database(settings.url)
    spec = JobSpec(prompt="make the sky purple", images={"image1": "photo.png"}, seed=1,
                   parameters=StageParameters(steps=4), output_name="photo")
    inputs = [InputFile(key="image1", name="photo.png", sha256="0" * 64, size=1000)]
    now = utcnow()
    states = ["done"] * 8 + ["failed", "cancelled"]
    with db.begin() as session:
        for start in range(0, count, 1000):
            rows = []
            for i in range(start, min(start + 1000, count)):
                at = now - timedelta(seconds=(count - i) * 30)
                state = states[i % len(states)]
                rows.append(dict(id=i + 1, name=f"job-{i:05d}", source=f"job-{i:05d}/job.json",
                                 preset="winter" if i % 3 == 0 else None, ingest_key=f"{i:064d}", inbox_cleared=True,
                                 spec=spec, inputs=inputs, work_dir=f"/nowhere/{i}", state=state, priority=0,
                                 attempts=1, crashes=0, cancel_requested=False, created_at=at, updated_at=at,
                                 started_at=at + timedelta(seconds=2), finished_at=at + timedelta(seconds=20),
                                 error="out of memory" if state == "failed" else None,
                                 error_kind="transient" if state == "failed" else None,
                                 result=Published(image=f"/nowhere/{i}.png") if state == "done" else None))
            session.execute(insert(Job), rows)
            session.execute(insert(StageRun), [
                dict(job_id=row["id"], stage=stage, fingerprint=f"{row['id']}-{stage}", checkpoint_sha256="0" * 64,
                     cache_hit=False, started_at=row["created_at"], finished_at=row["created_at"], duration_s=0.5 + k)
                for row in rows for k, stage in enumerate(STAGES)])
            session.execute(insert(Event), [
                dict(job_id=row["id"], at=row["created_at"], level="info", kind=kind, message=kind)
                for row in rows for kind in ("queued", "done", "archived")])
    db.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(int(len(ordered) * 0.95), len(ordered) - 1)]


def latency(root: Path, history: int, requests: int) -> dict[str, tuple[float, float]]:
    settings = settings_for(root, None)
    settings.inbox.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    fill_history(settings, history)
    print(f"history: {history} jobs written in {time.perf_counter() - started:.1f} s")
    port = free_port()
    env = {**os.environ, "QIE_INBOX": str(settings.inbox), "QIE_OUTBOX": str(settings.outbox),
           "QIE_FAILED": str(settings.failed), "QIE_ARCHIVE": str(settings.archive), "QIE_WORK": str(settings.work),
           "QIE_STATE": str(settings.state), "QIE_ENGINE": "fake", "QIE_LOG_LEVEL": "WARNING",
           "QIE_HTTP_LISTEN": f"127.0.0.1:{port}"}
    server = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "web"], env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    results = {}
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(300):
                try:
                    client.get("/readyz")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            for path in ("/", "/api/jobs", "/api/jobs?state=failed&page=20", "/?preset=winter&page=50", "/metrics"):
                client.get(path).raise_for_status()  # warm-up
                samples = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    client.get(path).raise_for_status()
                    samples.append(time.perf_counter() - t0)
                results[path] = percentiles(samples)
    finally:
        server.terminate()
        server.wait(timeout=20)
    return results


def browser(url: str, kind: str) -> subprocess.Popen:
    chromium = shutil.which("chromium")
    if kind == "chromium" and chromium:
        profile = tempfile.mkdtemp(prefix="qie-bench-chromium-")
        return subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                                 f"--user-data-dir={profile}", "--remote-debugging-port=0", url + "/"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.Popen([sys.executable, "-c", FOLLOWER, url])


def one_round(root: Path, jobs: int, connected: bool, kind: str) -> float:
    """Seconds per job through the daemon's loop, with or without a browser on the queue page."""
    port = free_port()
    settings = settings_for(root, None, http_listen=f"127.0.0.1:{port}")
    drop_jobs(settings.inbox, 1, 10_000)
    daemon = Daemon(settings, once=True)
    daemon.start()
    server = WebServer(settings, daemon=daemon)
    server.start()
    client = None
    try:
        drain(daemon)  # warm-up: models loaded, database created
        if connected:
            client = browser(f"http://127.0.0.1:{port}", kind)
            deadline = time.monotonic() + 30
            while server.app.state.ctx.feed.polls == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert server.app.state.ctx.feed.polls, "the browser did not connect"
        drop_jobs(settings.inbox, jobs, 0)
        daemon.intake.wake.set()
        seconds = drain(daemon)
        polls = server.app.state.ctx.feed.polls
    finally:
        if client is not None:
            client.terminate()
            client.wait(timeout=20)
        server.stop()
        daemon.shutdown()
    published = len(list(settings.outbox.glob("job-*.png")))
    assert published == jobs + 1, f"{published} of {jobs + 1} published"
    if connected:
        print(f"    (the change feed read the queue {polls} times)")
    return seconds / jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--browser", choices=("chromium", "follower"), default="chromium",
                        help="what connects: headless Chromium (its own CPU use competes with the daemon on a small "
                             "machine) or a small client that follows /events and loads the page every second")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qie-bench-web-") as tmp:
        root = Path(tmp)
        if not args.skip_latency:
            print(f"1. latency with {args.history} jobs in history ({args.requests} requests each), ms")
            for path, (p50, p95) in latency(root / "history", args.history, args.requests).items():
                print(f"  {path:<32} p50 {p50 * 1000:6.1f}   p95 {p95 * 1000:6.1f}")
        print(f"2. compute loop per job ({args.jobs} jobs, fake engine without stage time), ms")
        sides: dict[bool, list[float]] = {False: [], True: []}
        for round_number in range(args.rounds):
            for connected in (False, True):
                per_job = one_round(root / f"round-{round_number}-{int(connected)}", args.jobs, connected, args.browser)
                sides[connected].append(per_job)
                print(f"  round {round_number + 1}, {'browser connected' if connected else 'no browser':<17} "
                      f"{per_job * 1000:6.1f}")
        none, with_browser = statistics.median(sides[False]), statistics.median(sides[True])
        print(f"  median: no browser {none * 1000:.1f} ms/job, browser connected {with_browser * 1000:.1f} ms/job "
              f"({(with_browser / none - 1) * 100:+.1f}%)")
        print(json.dumps({"no_browser_ms": [round(x * 1000, 1) for x in sides[False]],
                          "browser_ms": [round(x * 1000, 1) for x in sides[True]]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
