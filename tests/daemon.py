"""Driving the real daemon process in tests: folders, job drops, start, kill, wait."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent


def make_image(path: Path, size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (120, 170, 230)) -> Path:
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, size[1] * 2 // 3, size[0], size[1]), fill=(60, 140, 70))
    draw.ellipse((size[0] // 2, 4, size[0] // 2 + 14, 18), fill=(250, 220, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def tiny_job(**overrides: Any) -> dict[str, Any]:
    """A job the tiny model runs in well under a second."""
    job = {"prompt": "make the sky purple", "image1": "photo.png", "seed": 7, "megapixels": 0.004}
    job.update(overrides)
    return job


@dataclass
class Folders:
    """A daemon's folders in a test. ``model``: the tiny diffusers model the daemon computes
    with; None (the default) runs the fake engine, which is deterministic and takes milliseconds."""

    root: Path
    model: Optional[Path] = None
    env_extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("inbox", "outbox", "failed", "archive", "work"):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    inbox = property(lambda self: self.root / "inbox")
    outbox = property(lambda self: self.root / "outbox")
    failed = property(lambda self: self.root / "failed")
    archive = property(lambda self: self.root / "archive")
    work = property(lambda self: self.root / "work")
    state = property(lambda self: self.root / "state.db")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QIE_")}
        env.update({
            "QIE_INBOX": str(self.inbox), "QIE_OUTBOX": str(self.outbox), "QIE_FAILED": str(self.failed),
            "QIE_ARCHIVE": str(self.archive), "QIE_WORK": str(self.work), "QIE_STATE": str(self.state),
            **({"QIE_ENGINE": "diffusers", "QIE_MODEL_PATH": str(self.model)} if self.model else {"QIE_ENGINE": "fake"}),
            "QIE_SETTLE_SECONDS": "0.3", "QIE_RESCAN_INTERVAL": "1",
            "QIE_POLL_INTERVAL": "0.2", "QIE_PARTIAL_INTERVAL": "0", "QIE_CORRUPT_GRACE_SECONDS": "2", "QIE_THREADS": "1",
            "QIE_LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1", "QIE_HTTP_LISTEN": "off",
        })
        env.update(self.env_extra)
        env.update(extra)
        return env

    def drop(self, name: str, job: dict[str, Any], images: Optional[dict[str, tuple[int, int]]] = None,
             folder: bool = True) -> Path:
        """Drop a job the way a careful user does: images first, the job file last."""
        base = self.inbox / name if folder else self.inbox
        staging = self.root / f"staging-{name}"
        staging.mkdir(parents=True, exist_ok=True)
        for image_name, size in (images or {job["image1"]: (64, 64)}).items():
            make_image(staging / image_name, size)
        (staging / "job.json").write_text(json.dumps(job))
        if folder:
            staging.rename(base)
            return base / "job.json"
        for path in staging.iterdir():
            if path.name != "job.json":
                path.rename(base / path.name)
        (staging / "job.json").rename(base / f"{name}.json")
        staging.rmdir()
        return base / f"{name}.json"

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], env=self.env(**env), cwd=self.root,
                              capture_output=True, text=True, timeout=300)

    def serve(self, *args: str, **env: str) -> "DaemonProcess":
        return DaemonProcess(self, list(args), env)

    def worker(self, *args: str, **env: str) -> "DaemonProcess":
        """``run.py worker ARGS`` (e.g. ``--stages sample``) in a child process."""
        return DaemonProcess(self, list(args), env, command="worker")

    def db_rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        if not self.state.exists():
            return []
        with sqlite3.connect(self.state, timeout=30) as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                return []

    def job_states(self) -> dict[str, str]:
        return dict(self.db_rows("SELECT name, state FROM jobs ORDER BY id"))

    def stage_runs(self, job_id: int) -> list[tuple]:
        return self.db_rows("SELECT stage, cache_hit, resumed_from_step, error FROM stage_runs "
                            "WHERE job_id = ? ORDER BY id", (job_id,))


class DaemonProcess:
    """``run.py serve`` (or ``command``, e.g. ``worker``) in a child process; its log is kept for
    assertions and failures."""

    def __init__(self, folders: Folders, args: list[str], env: dict[str, str], command: str = "serve"):
        self.folders = folders
        self.log_path = folders.root / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), command, *args],
                                        env=folders.env(**env), cwd=folders.root, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if not self.alive() and not predicate():
                raise AssertionError(f"daemon exited ({self.process.returncode}) before {what}:\n{self.log[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log[-4000:]}")

    def wait_ready(self, timeout: float = 60) -> None:
        """Until the daemon says it has started (folders locked, database open, watching)."""
        self.wait_for(lambda: "ready" in self.log, timeout=timeout, what="start-up")

    def wait_exit(self, timeout: float = 120) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self._log.close()

    def stop(self, timeout: float = 60) -> int:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.wait_exit()

    def __enter__(self) -> "DaemonProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.alive():
            self.process.kill()
        self.wait_exit()
