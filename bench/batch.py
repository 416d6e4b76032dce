"""Running a batch of tiny jobs through an in-process daemon, for the benchmarks."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from config import load_settings  # noqa: E402
from processor.daemon import Daemon  # noqa: E402
from tests.daemon import make_image, tiny_job  # noqa: E402


def colour(i: int) -> tuple[int, int, int]:
    return (40 + (i * 37) % 200, 60 + (i * 91) % 180, 90 + (i * 53) % 160)


def drop_jobs(inbox: Path, count: int, offset: int = 0, size: int = 64, **job: Any) -> None:
    """``count`` folder jobs, each with its own image (so nothing is reused between them)."""
    inbox.mkdir(parents=True, exist_ok=True)
    for i in range(offset, offset + count):
        folder = inbox / f".staging-{i}"
        folder.mkdir(parents=True)
        make_image(folder / "photo.png", (size, size), colour(i))
        (folder / "job.json").write_text(json.dumps(tiny_job(**{"seed": i, **job})))
        folder.rename(inbox / f"job-{i:04d}")


def settings_for(root: Path, model: Optional[Path], **overrides: Any):
    """Settings for folders below ``root``, computing on the tiny diffusers ``model`` (None: the
    fake engine)."""
    values = dict(inbox=root / "inbox", outbox=root / "outbox", failed=root / "failed", archive=root / "archive",
                  work=root / "work", state=root / "state.db", settle_seconds=0, threads=1, log_level="WARNING",
                  http_listen="off")
    values.update(dict(engine="diffusers", model_path=model) if model is not None else dict(engine="fake"))
    values.update(overrides)
    return load_settings(None, **values)


def drain(daemon: Daemon) -> float:
    """Run units until none is left; the seconds it took."""
    started = time.perf_counter()
    while daemon.tick(time.monotonic()):
        pass
    return time.perf_counter() - started


@dataclass
class BatchResult:
    seconds: float
    loads: dict[str, int]
    unloads: dict[str, int]
    load_seconds: float
    published: int


def run_batch(root: Path, model: Optional[Path], count: int, **overrides: Any) -> BatchResult:
    """Drop ``count`` jobs, then process them all with one daemon; models start unloaded."""
    settings = settings_for(root, model, **overrides)
    drop_jobs(settings.inbox, count)
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        seconds = drain(daemon)
    finally:
        daemon.shutdown()
    stats = daemon.cache.stats
    return BatchResult(seconds, dict(stats.loads), dict(stats.unloads), stats.load_seconds,
                       len(list(settings.outbox.glob("*.png"))))


def model_sizes(root: Path, model: Optional[Path]) -> dict[str, int]:
    """Bytes of each tiny model once loaded."""
    settings = settings_for(root, model)
    drop_jobs(settings.inbox, 1)
    daemon = Daemon(settings, once=True)
    daemon.start()
    try:
        drain(daemon)
        return daemon.cache.sizes()
    finally:
        daemon.shutdown()


def job_values(size: int, steps: int) -> dict:
    return {"megapixels": size * size / 1024 / 1024, "steps": steps}


def direct_loop(settings, root: Path, count: int, size: int, steps: int) -> float:
    """Seconds for the engine loop a script would write over ``count`` images: prepare, the four
    operations, save a PNG (the input images exist before the clock starts, as the daemon's
    dropped jobs do; one warm-up image first, as the daemon's warm-up job)."""
    from config import StageParameters
    from processor.encode import image_bytes
    from stages import ModelCache, create_engine
    from stages.prepare import prepare

    engine = create_engine(settings, ModelCache())
    params = StageParameters(**job_values(size, steps))
    out = root / "direct"
    out.mkdir(parents=True)
    images = {i: make_image(root / "direct-in" / f"{i}.png", (size, size), colour(i)) for i in [10_000, *range(count)]}

    def one(i: int) -> None:
        prepared = prepare([("image1", images[i])], params, settings.max_image_pixels)
        latent = engine.encode_latent(prepared, params)
        text = engine.encode_text(prepared, params, "make the sky purple", "")
        sampled = engine.sample(prepared, latent, text, params, i, None, None)
        decoded = engine.decode(sampled, params)
        (out / f"{i}.png").write_bytes(image_bytes(decoded["image"], "png", 95, {}))

    one(10_000)
    started = time.perf_counter()
    for i in range(count):
        one(i)
    return time.perf_counter() - started
