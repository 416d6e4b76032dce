#!/usr/bin/env python3
"""Peak memory of each stage of one job, on the engine directly.

    python bench/memory.py [--size 64] [--model DIR]

Resident memory is sampled every millisecond while a stage runs; the figure is the peak above
the level before the stage (model loading included, since the stage loads what it needs). On
CUDA the peak allocated GPU memory per stage is shown too. The tiny model's figures show the
method and the relative order, not a real model's sizes: run it with --model on real weights.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from batch import settings_for

from config import StageParameters
from stages import ModelCache, create_engine
from stages.prepare import prepare
from stages.tiny_model import build_tiny_model
from tests.daemon import make_image

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE


class Peak:
    """The highest resident memory seen while the block runs, above the level at its start."""

    def __enter__(self) -> "Peak":
        self.start = rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--model", type=Path, help="a diffusers model folder (default: the tiny model)")
    args = parser.parse_args()
    import torch
    with tempfile.TemporaryDirectory(prefix="qie-bench-") as tmp:
        root = Path(tmp)
        model = args.model or build_tiny_model(root / "model")
        settings = settings_for(root, model)
        engine = create_engine(settings, ModelCache())
        params = StageParameters(megapixels=args.size * args.size / 1024 / 1024, lora=None)
        image = make_image(root / "photo.png", (args.size, args.size))
        cuda = torch.cuda.is_available() and engine.device_name().startswith("cuda")
        rows = []
        state: dict = {}
        steps = (
            ("prepare", lambda: prepare([("image1", image)], params, settings.max_image_pixels)),
            ("encode_text", lambda: engine.encode_text(state["prepare"], params, "make the sky purple", "")),
            ("encode_latent", lambda: engine.encode_latent(state["prepare"], params)),
            ("sample", lambda: engine.sample(state["prepare"], state["encode_latent"], state["encode_text"],
                                             params, 1, None, None)),
            ("decode", lambda: engine.decode(state["sample"], params)),
        )
        for name, run in steps:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            with Peak() as peak:
                state[name] = run()
            gpu = torch.cuda.max_memory_allocated() if cuda else None
            rows.append((name, peak.delta, gpu, time.perf_counter() - started))
    print(f"\npeak memory per stage, {args.size}x{args.size}, {engine.device_name()} "
          f"({'tiny model' if args.model is None else args.model})\n")
    print(f"{'stage':<15}{'RSS peak +MB':>14}{'GPU peak MB':>13}{'seconds':>9}")
    for name, delta, gpu, seconds in rows:
        print(f"{name:<15}{delta / 1e6:>14.1f}{(f'{gpu / 1e6:.1f}' if gpu is not None else '-'):>13}{seconds:>9.3f}")


if __name__ == "__main__":
    main()
