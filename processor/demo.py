"""``demo``: the whole path on the built-in tiny model, in a folder of its own."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from PIL import Image, ImageDraw

from config import load_settings
from processor.daemon import Daemon
from processor.logs import configure_for

DEMO_JOB = {
    "prompt": "Make the sky purple and add a small moon",
    "negative_prompt": "",
    "image1": "photo.png",
    "seed": 42,
    "megapixels": 0.004,  # about 64x64: the tiny model is meant for small images
}


def sample_image(path: Path) -> None:
    """A small synthetic landscape, so the demo needs no file from anywhere."""
    image = Image.new("RGB", (96, 64), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 40, 96, 64), fill=(60, 140, 70))
    draw.ellipse((62, 6, 82, 26), fill=(250, 220, 90))
    draw.polygon([(10, 40), (30, 18), (50, 40)], fill=(110, 110, 120))
    image.save(path)


def run_demo(folder: Path) -> int:
    folder = folder.resolve()
    settings = load_settings(None, inbox=folder / "inbox", outbox=folder / "outbox", failed=folder / "failed",
                             archive=folder / "archive", work=folder / "work", state=folder / "state.db",
                             settle_seconds=0.2)
    configure_for(settings)
    job_folder = settings.inbox / ".demo-job"  # hidden while being written
    job_folder.mkdir(parents=True, exist_ok=True)
    sample_image(job_folder / "photo.png")
    (job_folder / "job.json").write_text(json.dumps(DEMO_JOB, indent=2))
    target = settings.inbox / "demo-job"
    n = 1
    while target.exists():
        target = settings.inbox / f"demo-job-{n}"
        n += 1
    job_folder.rename(target)
    Daemon(settings, once=True).serve()
    outputs = sorted(settings.outbox.glob("*.png"), key=lambda p: p.stat().st_mtime)
    logging.shutdown()
    if not outputs:
        print(f"the demo job did not produce an image; see {settings.failed} and "
              f"cd {folder} && python {Path(sys.argv[0]).resolve()} status")
        return 1
    image = outputs[-1]
    print(f"\nresult: {image}\nmanifest: {image.with_suffix('.json')}\n"
          f"status: cd {folder} && python {Path(sys.argv[0]).resolve()} status\n"
          "(the built-in tiny model is random: the image is noise; it shows the whole path works)")
    return 0
